"""How close synthetic flows are to real ones, and whether they are flows at all.

- ``constraint_violations``: the schema's rules, checked row by row on raw features: counts
  are counts, a direction with packets has bytes, min <= mean <= max, one packet has std 0,
  NaN exactly where agent/features/schema.py says a feature does not apply, port classes valid.
  Every rule holds on every real flow (tests/test_generator.py checks it on the nDPI corpus),
  so a generated row that breaks one is not a flow.
- ``compare``: per-feature KS and W1, a correlation-matrix distance, the share of missing
  values, and two-sample classifier tests (logistic regression and gradient-boosted trees,
  cross-fitted: each half trains once and is scored by the other half's classifier) of
  synthetic rows against real rows that the generator never saw.
- ``utility``: a detector trained on synthetic benign flows only against one trained on the
  real benign flows, both scored on held-out real benign flows and real attacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA
from quietwire.trainer.model.preprocess import Preprocessor
from quietwire.trainer.synthesis.flowcolumns import DIRECTIONS, not_applicable

_J = {name: j for j, name in enumerate(FEATURE_NAMES)}
SHARES = tuple(
    f.name
    for f in SCHEMA
    if f.unit == "ratio" and f.name not in ("dst2src_src2dst_bytes_ratio", "pair_gap_cv")
)
INTEGERS = tuple(
    f.name for f in SCHEMA if f.unit in {"packets", "flows", "hosts", "ports", "hops", "count"}
) + tuple(
    f.name for f in SCHEMA if f.unit == "bytes" and "_mean" not in f.name and "_std" not in f.name
)
BOOLS = tuple(f.name for f in SCHEMA if f.unit == "bool")


def _close(a: np.ndarray, b: np.ndarray, rel: float = 1e-3, tol: float = 1e-6) -> np.ndarray:
    return np.abs(a - b) <= rel * np.maximum(np.abs(a), np.abs(b)) + tol


def constraint_violations(x: np.ndarray) -> dict[str, np.ndarray]:
    """{rule: bool (n,) rows that break it} for raw features (n, F)."""
    x = np.asarray(x, dtype=np.float64)
    c = {name: x[:, j] for name, j in _J.items()}
    nan = {name: np.isnan(v) for name, v in c.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        out = _value_rules(x, c)
        out["packets and bytes add up"] = _totals_broken(c, len(x))
        out["min <= mean <= max"], out["one packet (or one gap): std 0"] = _order_broken(c, len(x))
        out["NaN where a feature does not apply"] = _nan_pattern(c, nan)
        out["protocol and port class valid"] = _port_class_broken(c)
        out["ratios match their parts"] = _ratios_broken(c, nan)
        out["distinct peers <= flows"] = (
            (c["src_host_distinct_dst_hosts"] > c["src_host_flows"])
            | (c["src_host_distinct_dst_ports"] > c["src_host_flows"])
            | (c["dst_host_distinct_src_hosts"] > c["dst_host_flows"])
        )
    return out


def _value_rules(x: np.ndarray, c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rules on single values: finite, present where not nullable, in their range."""
    out: dict[str, np.ndarray] = {}
    out["finite"] = np.isinf(x).any(1)
    out["not nullable is NaN"] = np.isnan(x[:, [not f.nullable for f in SCHEMA]]).any(1)
    v = x[:, [_J[n] for n in INTEGERS]]
    out["counts are non-negative integers"] = ((v < 0) | ((v != np.round(v)) & ~np.isnan(v))).any(1)
    v = x[:, [_J[n] for n in BOOLS]]
    out["flags are 0 or 1"] = ((v != 0) & (v != 1) & ~np.isnan(v)).any(1)
    v = x[:, [_J[n] for n in SHARES]]
    out["shares in [0, 1]"] = ((v < 0) | (v > 1 + 1e-6)).any(1)
    out["TTL <= 255"] = (c["src2dst_ttl_min"] > 255) | (c["dst2src_ttl_min"] > 255)
    ent = np.stack([c[f"{d}_payload_entropy"] for d in DIRECTIONS], 1)
    out["entropy in [0, 8]"] = ((ent < 0) | (ent > 8 + 1e-6)).any(1)
    out["duration >= 0"] = ~(c["duration_s"] >= 0)
    out["src2dst packets >= 1"] = ~(c["src2dst_packets"] >= 1)
    return out


def _totals_broken(c: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Rows whose packets and bytes do not add up: bytes with packets, header + payload,
    payload and flag packets within the packets, both directions to the bidirectional."""
    bad = np.zeros(n, bool)
    for d in DIRECTIONS:
        p, b = c[f"{d}_packets"], c[f"{d}_bytes"]
        bad |= (p > 0) != (b > 0)
        bad |= ~_close(c[f"{d}_header_bytes"] + c[f"{d}_payload_bytes"], b)
        bad |= c[f"{d}_payload_packets"] > p
        bad |= (c[f"{d}_payload_packets"] > 0) != (c[f"{d}_payload_bytes"] > 0)
        for flag in ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr"):
            bad |= c[f"{d}_{flag}_packets"] > p
    bad |= ~_close(c["bidirectional_packets"], c["src2dst_packets"] + c["dst2src_packets"])
    bad |= ~_close(c["bidirectional_bytes"], c["src2dst_bytes"] + c["dst2src_bytes"])
    return bad


def _order_broken(c: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose length or gap statistics break min <= mean <= max or bound the std, rows
    with one packet or one gap whose std is not 0)."""
    bad = np.zeros(n, bool)
    one = np.zeros(n, bool)
    for d in (*DIRECTIONS, "bidirectional"):
        p = c[f"{d}_packets"]
        lo, mean = c[f"{d}_pkt_len_min"], c[f"{d}_pkt_len_mean"]
        sd, hi = c[f"{d}_pkt_len_std"], c[f"{d}_pkt_len_max"]
        has = p > 0
        bad |= has & ~(
            (lo <= mean * (1 + 1e-4) + 1e-3)
            & (mean <= hi * (1 + 1e-4) + 1e-3)
            & _close(mean * p, c[f"{d}_bytes"])
            & (sd <= (hi - lo) / 2 * (1 + 1e-3) + 1e-3)
        )
        one |= (p == 1) & ~((sd == 0) & (lo == hi))
        g = c[f"{d}_iat_min_s"], c[f"{d}_iat_mean_s"], c[f"{d}_iat_std_s"], c[f"{d}_iat_max_s"]
        bad |= (p > 1) & ~(
            (g[0] <= g[1] * (1 + 1e-4) + 1e-9)
            & (g[1] <= g[3] * (1 + 1e-4) + 1e-9)
            & (g[2] <= (g[3] - g[0]) / 2 * (1 + 1e-3) + 1e-6)
            & (g[0] >= 0)
        )
        one |= (p == 2) & ~(g[2] == 0)
    return bad, one


def _port_class_broken(c: dict[str, np.ndarray]) -> np.ndarray:
    """Rows with more than one protocol, two port classes, or a port class where there is
    no port (ICMP) or none where there is one."""
    proto = np.stack([c["proto_tcp"], c["proto_udp"], c["proto_icmp"]], 1)
    wk, reg = c["dst_port_well_known"], c["dst_port_registered"]
    ported = (c["proto_tcp"] == 1) | (c["proto_udp"] == 1)
    return (
        (proto.sum(1) > 1)
        | ((wk == 1) & (reg == 1))
        | (ported & np.isnan(wk))
        | ((c["proto_icmp"] == 1) & ~np.isnan(wk))
        | (np.isnan(wk) != np.isnan(reg))
    )


def _ratios_broken(c: dict[str, np.ndarray], nan: dict[str, np.ndarray]) -> np.ndarray:
    """Rows whose ratios and rates differ from their parts (where present)."""
    return (
        ~_close(c["dst2src_src2dst_bytes_ratio"], c["dst2src_bytes"] / c["src2dst_bytes"])
        | ~(
            nan["packets_per_s"]
            | _close(c["packets_per_s"], c["bidirectional_packets"] / c["duration_s"])
        )
        | ~(
            nan["bytes_per_s"]
            | _close(c["bytes_per_s"], c["bidirectional_bytes"] / c["duration_s"])
        )
        | ~(
            nan["src2dst_payload_ratio"]
            | _close(c["src2dst_payload_ratio"], c["src2dst_payload_bytes"] / c["src2dst_bytes"])
        )
        | ~(
            nan["dst2src_payload_ratio"]
            | _close(c["dst2src_payload_ratio"], c["dst2src_payload_bytes"] / c["dst2src_bytes"])
        )
    )


def _nan_pattern(c: dict, nan: dict) -> np.ndarray:
    """Rows whose missing values differ from the schema's rules (agent/features/schema.py)."""
    bad = np.zeros(len(c["duration_s"]), bool)
    for names, should in not_applicable(c, c["proto_tcp"] == 1, c["bidirectional_packets"]):
        for n in names:
            bad |= nan[n] != should
    return bad


def violation_share(x: np.ndarray) -> tuple[float, dict[str, float]]:
    """(share of rows breaking any rule, {rule: share of rows breaking it})."""
    v = constraint_violations(x)
    if len(x) == 0:
        return 0.0, {k: 0.0 for k in v}
    anyrow = np.zeros(len(x), bool)
    for rows in v.values():
        anyrow |= rows
    return float(anyrow.mean()), {k: float(r.mean()) for k, r in v.items()}


# ---- distances ------------------------------------------------------------------------------


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """max |ECDF_a - ECDF_b| over the pooled values."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(
        np.max(
            np.abs(
                np.searchsorted(a, grid, side="right") / len(a)
                - np.searchsorted(b, grid, side="right") / len(b)
            )
        )
    )


def wasserstein_1(a: np.ndarray, b: np.ndarray, points: int = 256) -> float:
    """W1 between two samples via their quantile functions."""
    q = (np.arange(points) + 0.5) / points
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    s = np.concatenate([positive, negative])
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]  # average rank within ties
    n_p, n_n = len(positive), len(negative)
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def _logistic(xt: np.ndarray, yt: np.ndarray, xe: np.ndarray) -> np.ndarray:
    lin = torch.nn.Linear(xt.shape[1], 1)
    with torch.no_grad():  # a convex problem: start at zero, the same answer every run
        lin.weight.zero_()
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)
    a, b = torch.from_numpy(xt), torch.from_numpy(yt)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(a).squeeze(1), b)
        loss = loss + 1e-3 * (lin.weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return lin(torch.from_numpy(xe)).squeeze(1).numpy()


def _boosted(xt: np.ndarray, yt: np.ndarray, xe: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier

    keep = ~np.isnan(xt).all(0)  # an all-missing column breaks the binning
    clf = HistGradientBoostingClassifier(max_iter=200, max_leaf_nodes=15, random_state=seed)
    return clf.fit(xt[:, keep], yt).predict_proba(xe[:, keep])[:, 1]


def classifier_auc(
    real: np.ndarray, synthetic: np.ndarray, kind: str = "logistic", seed: int = 0
) -> float:
    """Two-sample test: cross-fitted AUC of a classifier telling synthetic (1) from real (0)
    raw feature rows; 0.5 = it cannot. ``kind``: "logistic" (on log / robust-scaled features
    with missing-value indicators, fitted on the real rows) or "trees" (gradient-boosted
    trees on the raw features, NaN as its own branch)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([real, synthetic]).astype(np.float32)
    y = np.concatenate([np.zeros(len(real)), np.ones(len(synthetic))]).astype(np.float32)
    if kind == "logistic":
        x = Preprocessor.fit(np.asarray(real, np.float32)).transform(x)
    elif kind != "trees":
        raise ValueError(f"classifier kind must be 'logistic' or 'trees', got {kind!r}")
    fold = np.zeros(len(x), bool)
    for label in (0, 1):  # stratified halves
        idx = np.flatnonzero(y == label)
        fold[rng.permutation(idx)[: len(idx) // 2]] = True
    scores = np.empty(len(x))
    for held in (fold, ~fold):
        tr = ~held
        if kind == "logistic":
            scores[held] = _logistic(x[tr], y[tr], x[held])
        else:
            scores[held] = _boosted(x[tr], y[tr], x[held], seed)
    # AUC per half (scores of two classifiers are not on one scale), averaged
    return float(
        np.mean([auroc(scores[h & (y == 1)], scores[h & (y == 0)]) for h in (fold, ~fold)])
    )


def correlation_distance(real: np.ndarray, synthetic: np.ndarray, prep: Preprocessor) -> float:
    """Mean |corr_real - corr_synthetic| over pairs of model inputs (log / robust-scaled
    features and missing-value indicators); constant columns correlate 0."""

    def corr(z):
        z = z - z.mean(0)
        sd = np.sqrt((z**2).mean(0))
        z = np.where(sd > 1e-9, z / np.where(sd > 1e-9, sd, 1), 0.0)
        return (z.T @ z) / len(z)

    a, b = corr(prep.transform(real)), corr(prep.transform(synthetic))
    iu = np.triu_indices(len(a), 1)
    return float(np.mean(np.abs(a - b)[iu]))


@dataclass(frozen=True)
class FidelityReport:
    ks: np.ndarray  # (F,) two-sample Kolmogorov-Smirnov statistic on present values
    wasserstein: np.ndarray  # (F,) W1 distance in robust-standardised units
    missing_gap: np.ndarray  # (F,) |share missing (synthetic) - share missing (real)|
    classifier_auc: float  # logistic regression telling synthetic from real; 0.5 = cannot
    trees_auc: float  # gradient-boosted trees, the same test
    correlation_distance: float
    violations: float  # share of synthetic rows breaking a schema rule
    violations_by_rule: dict[str, float] = field(default_factory=dict)
    real_rows: int = 0
    synthetic_rows: int = 0
    real_note: str = ""  # what the caller knows of the real rows, e.g. that they are held out

    def table(self, worst: int = 10) -> str:
        broken = ", ".join(f"{k} {v:.3f}" for k, v in self.violations_by_rule.items() if v)
        lines = [
            f"real rows {self.real_rows}"
            + (f" ({self.real_note})" if self.real_note else "")
            + f", synthetic rows {self.synthetic_rows}",
            f"classifier AUC synthetic vs real: {self.classifier_auc:.3f} logistic regression, "
            f"{self.trees_auc:.3f} gradient-boosted trees (0.5 = indistinguishable)",
            f"mean KS {np.nanmean(self.ks):.3f}, median KS {np.nanmedian(self.ks):.3f}, "
            f"mean W1 {np.nanmean(self.wasserstein):.3f} robust SDs, correlation distance "
            f"{self.correlation_distance:.3f}, mean missing gap {np.mean(self.missing_gap):.3f}",
            f"rows breaking a schema rule: {self.violations:.4f}"
            + (f" ({broken})" if broken else ""),
            f"{'feature':<34} {'KS':>6} {'W1':>7} {'missing gap':>11}",
        ]
        order = np.argsort(-np.nan_to_num(self.ks, nan=-1))[:worst]
        for i in order:
            lines.append(
                f"{FEATURE_NAMES[i]:<34} {self.ks[i]:6.3f} {self.wasserstein[i]:7.3f} "
                f"{self.missing_gap[i]:11.3f}"
            )
        return "\n".join(lines)


def compare(
    real: np.ndarray, synthetic: np.ndarray, seed: int = 0, real_note: str = ""
) -> FidelityReport:
    """Fidelity of synthetic raw features against real raw features, which should be flows
    the generator never saw (distances in the units of a preprocessing fitted on the real
    rows)."""
    real = np.asarray(real, np.float32)
    synthetic = np.asarray(synthetic, np.float32)
    prep = Preprocessor.fit(real)
    f = real.shape[1]
    ks = np.full(f, np.nan)
    w1 = np.full(f, np.nan)
    zr, zs = prep.transform(real), prep.transform(synthetic)
    for j in range(f):
        pr, ps = ~np.isnan(real[:, j]), ~np.isnan(synthetic[:, j])
        if pr.any() and ps.any():
            ks[j] = ks_statistic(real[pr, j], synthetic[ps, j])
            w1[j] = wasserstein_1(zr[pr, j], zs[ps, j])
    gap = np.abs(np.isnan(synthetic).mean(0) - np.isnan(real).mean(0))
    share, by_rule = violation_share(synthetic)
    return FidelityReport(
        ks,
        w1,
        gap,
        classifier_auc(real, synthetic, "logistic", seed),
        classifier_auc(real, synthetic, "trees", seed),
        correlation_distance(real, synthetic, prep),
        share,
        by_rule,
        len(real),
        len(synthetic),
        real_note,
    )


def utility(
    synthetic: np.ndarray,
    real_train: np.ndarray,
    real_benign: np.ndarray,
    attacks: np.ndarray,
    train_steps: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """AUROC (attacks against held-out real benign) of a detector trained on synthetic benign
    flows only and of one trained on the real benign flows, and their ratio."""
    from quietwire.trainer.model.detector import DiffusionDetector, TrainConfig

    out = {}
    for name, x in (("real", real_train), ("synthetic", synthetic)):
        det = DiffusionDetector(TrainConfig(train_steps=train_steps, seed=seed)).fit(x)
        out[name] = auroc(det.score(attacks)[0], det.score(real_benign)[0])
    out["ratio"] = out["synthetic"] / out["real"]
    return out
