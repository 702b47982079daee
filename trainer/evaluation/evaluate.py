"""Detection quality, measured: labelled evaluation sets, metrics, baselines, hard cases.

Sets (both rebuilt from commands in the repo):
- ``real``: the nDPI captures of quietwire/data/ndpi_labels.yaml; benign files split into
  train and test flows, every flow of a malicious file is an attack of that file's type;
- ``generated``: trafficgen.py's labelled pcap (benign sessions, sixteen attack types).

Every detector is fitted on the same benign training flows and scored on the same test flows.
Payload-borne attacks (a web exploit in one request's bytes) get a table of their own: the
generated set's five exploit types and the real set's files whose label names one.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.features.meter import FlowMeter
from quietwire.trainer.data import load_labels
from quietwire.trainer.model.detector import DTE_SCORES, DiffusionDetector, TrainConfig
from quietwire.trainer.model.preprocess import Preprocessor
from quietwire.trainer.synthesis.fidelity import auroc
from quietwire.trainer.synthesis.generator import FlowGenerator, GeneratorConfig
from quietwire.trainer.traffic.trafficgen import (
    ATTACKS,
    WEB_ATTACKS,
    flow_kinds,
    generate,
    read_labels,
)

FPRS = (1e-2, 1e-3, 1e-4)


# ---- metrics -------------------------------------------------------------------------------


def auprc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step interpolation)."""
    s = np.concatenate([positive, negative])
    y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    tp = np.cumsum(y)
    # evaluate at the last index of each run of equal scores (ties share a threshold)
    last = np.r_[s[1:] != s[:-1], True]
    precision = tp[last] / (np.flatnonzero(last) + 1)
    recall = tp[last] / max(len(positive), 1)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def recall_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float) -> float:
    """Share of positives above the threshold that lets through ``fpr`` of the negatives."""
    threshold = np.quantile(negative, 1.0 - fpr, method="higher")
    return float(np.mean(positive > threshold))


@dataclass
class Report:
    """Metrics of one detector on one set: one run, or the mean of runs with other seeds."""

    auroc: float
    auprc: float
    recall: dict[float, float]
    per_attack: dict[str, dict[str, float]]
    confusion: dict[str, int]  # at the detector's calibrated threshold (FPR 1e-2)
    runs: int = 1
    sd: dict[str, float] = field(default_factory=dict)  # across runs: auroc, type_mean

    @property
    def type_mean(self) -> float:
        """Mean AUROC over attack types (each type counts once, whatever its size)."""
        return float(np.mean([v["auroc"] for v in self.per_attack.values()]))

    def as_dict(self) -> dict:
        return {
            "auroc": self.auroc,
            "auprc": self.auprc,
            "recall_at_fpr": {f"{k:g}": v for k, v in self.recall.items()},
            "per_attack": self.per_attack,
            "mean_auroc_over_types": self.type_mean,
            "confusion": self.confusion,
            "runs": self.runs,
            "sd": self.sd,
        }


def mean_report(runs: list[Report]) -> Report:
    """Every metric averaged over runs (confusion counts rounded), with the standard
    deviation of the AUROC and of the mean over attack types."""
    per = {
        kind: {k: float(np.mean([r.per_attack[kind][k] for r in runs])) for k in v}
        for kind, v in runs[0].per_attack.items()
    }
    for kind in per:
        per[kind]["flows"] = runs[0].per_attack[kind]["flows"]
    return Report(
        float(np.mean([r.auroc for r in runs])),
        float(np.mean([r.auprc for r in runs])),
        {f: float(np.mean([r.recall[f] for r in runs])) for f in runs[0].recall},
        per,
        {k: int(round(np.mean([r.confusion[k] for r in runs]))) for k in runs[0].confusion},
        len(runs),
        {
            "auroc": float(np.std([r.auroc for r in runs])),
            "type_mean": float(np.std([r.type_mean for r in runs])),
        },
    )


def report(benign: np.ndarray, attack: np.ndarray, kinds: np.ndarray, threshold: float) -> Report:
    per = {}
    for kind in sorted(set(kinds.tolist())):
        s = attack[kinds == kind]
        per[kind] = {
            "flows": int(len(s)),
            "auroc": auroc(s, benign),
            "recall_at_1e-3": recall_at_fpr(s, benign, 1e-3),
        }
    confusion = {
        "true_positive": int((attack > threshold).sum()),
        "false_negative": int((attack <= threshold).sum()),
        "false_positive": int((benign > threshold).sum()),
        "true_negative": int((benign <= threshold).sum()),
    }
    return Report(
        auroc(attack, benign),
        auprc(attack, benign),
        {f: recall_at_fpr(attack, benign, f) for f in FPRS},
        per,
        confusion,
    )


# ---- detectors -----------------------------------------------------------------------------


class Baseline:
    """A detector on the diffusion model's own preprocessing; threshold_ at FPR 1e-2 from a
    held-out fifth of the benign training flows."""

    name = "baseline"

    def fit(self, x: np.ndarray, seed: int = 0):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(x))
        cal, train = x[order[: len(x) // 5]], x[order[len(x) // 5 :]]
        self.prep = Preprocessor.fit(train)
        self._fit(self.prep.transform(train), seed)
        self.threshold_ = float(np.quantile(self.score(cal), 0.99, method="higher"))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        return self._score(self.prep.transform(x))


class IsolationForestBaseline(Baseline):
    name = "isolation_forest"

    def _fit(self, z, seed):
        from sklearn.ensemble import IsolationForest

        self.model = IsolationForest(n_estimators=200, random_state=seed).fit(z)

    def _score(self, z):
        return -self.model.score_samples(z)


class LOFBaseline(Baseline):
    name = "lof"

    def _fit(self, z, seed):
        from sklearn.neighbors import LocalOutlierFactor

        self.model = LocalOutlierFactor(n_neighbors=20, novelty=True).fit(z)

    def _score(self, z):
        return -self.model.score_samples(z)


class AutoencoderBaseline(Baseline):
    name = "autoencoder"

    def _fit(self, z, seed, steps: int = 2000):
        torch.manual_seed(seed)
        d = z.shape[1]
        self.model = torch.nn.Sequential(
            torch.nn.Linear(d, 64),
            torch.nn.SiLU(),
            torch.nn.Linear(64, 16),
            torch.nn.SiLU(),
            torch.nn.Linear(16, 64),
            torch.nn.SiLU(),
            torch.nn.Linear(64, d),
        )
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        data = torch.from_numpy(z)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = data[torch.randint(0, len(data), (256,), generator=gen)]
            loss = ((self.model(batch) - batch) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def _score(self, z):
        x = torch.from_numpy(z)
        return ((self.model(x) - x) ** 2).mean(1).numpy()


class DiffusionBaseline:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.name = f"diffusion ({config.score})"

    def fit(self, x, seed=0):
        self.det = DiffusionDetector(replace(self.config, seed=seed)).fit(x)
        self.threshold_ = self.det.threshold_[1e-2]
        return self

    def score(self, x):
        return self.det.score(x)[0]


# ---- data sets -----------------------------------------------------------------------------


@dataclass
class EvalSet:
    name: str
    train: np.ndarray  # benign flows to fit on
    benign: np.ndarray  # benign test flows
    attack: np.ndarray  # attack test flows
    kinds: np.ndarray  # attack type of each attack flow
    payload_borne: tuple[str, ...] = ()  # the attack types whose attack is in a request's bytes


# A real-set label reason that names a web exploit carried in a request's payload.
PAYLOAD_BORNE = re.compile(
    r"sql injection|cross-site scripting|\bxss\b|log4shell|log4j|remote-code-execution|\brce\b",
    re.IGNORECASE,
)


def payload_borne_files(labels: dict) -> tuple[str, ...]:
    """The real set's attack types (file stems) whose label reason names a payload-borne web
    attack: SQL injection, XSS, Log4Shell, remote code execution."""
    out = []
    for name, reason in labels["malicious"].items():
        text = reason if isinstance(reason, str) else str((reason or {}).get("reason", ""))
        if PAYLOAD_BORNE.search(text):
            out.append(name.rsplit(".", 1)[0])
    return tuple(sorted(out))


def _features(path: Path):
    meter = FlowMeter(seed=1)
    parts = [meter.add(b) for b in read_capture(path)]
    parts += list(meter.drain())
    return parts


def real_set(pcap_dir: Path, seed: int = 0) -> EvalSet:
    labels = load_labels()
    benign = np.concatenate(
        [f.features for name in labels["benign"] for f in _features(pcap_dir / name)]
    )
    attacks, kinds = [], []
    for name in labels["malicious"]:
        x = np.concatenate([f.features for f in _features(pcap_dir / name)])
        attacks.append(x)
        kinds += [name.rsplit(".", 1)[0]] * len(x)
    order = np.random.default_rng(seed).permutation(len(benign))
    cut = int(len(benign) * 0.7)
    return EvalSet(
        "real",
        benign[order[:cut]],
        benign[order[cut:]],
        np.concatenate(attacks),
        np.array(kinds),
        payload_borne_files(labels),
    )


def generated_set(workdir: Path, seed: int = 0, scale: float = 1.0) -> EvalSet:
    pcap, label_file = workdir / "generated.pcap", workdir / "generated.labels.csv"
    generate(pcap, label_file, seed=seed, scale=scale)
    labels = read_labels(label_file)
    x, kinds = [], []
    for part in _features(pcap):
        kinds += flow_kinds(part.records, labels)
        x.append(part.features)
    x, kinds = np.concatenate(x), np.array(kinds)
    benign = x[kinds == "benign"]
    order = np.random.default_rng(seed).permutation(len(benign))
    cut = int(len(benign) * 0.7)
    is_attack = np.isin(kinds, ATTACKS)
    return EvalSet(
        "generated",
        benign[order[:cut]],
        benign[order[cut:]],
        x[is_attack],
        kinds[is_attack],
        WEB_ATTACKS,
    )


# ---- experiments ---------------------------------------------------------------------------


def detectors(train_steps: int) -> list:
    """The default diffusion model first (the one the hard cases use), the other DTE-based
    scores next, then the baselines."""
    default = TrainConfig(train_steps=train_steps)
    others = [s for s in DTE_SCORES if s != default.score]
    return [
        DiffusionBaseline(default),
        *(DiffusionBaseline(replace(default, score=s)) for s in others),
        IsolationForestBaseline(),
        LOFBaseline(),
        AutoencoderBaseline(),
    ]


@dataclass
class Comparison:
    reports: dict[str, Report]  # per detector, averaged over seeds
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # (benign, attack) of the first seed
    diffusion: DiffusionBaseline  # the first seed's fitted default diffusion model


def compare(s: EvalSet, train_steps: int, seeds=(0,)) -> Comparison:
    """Every detector fitted on s.train once per seed, reported on s.benign vs s.attack.
    A seed changes the detector's initialisation and its calibration split; the reports are
    the means over seeds, so one lucky or unlucky run does not decide a comparison."""
    runs: dict[str, list[Report]] = {}
    scores, first = {}, None
    for seed in seeds:
        for det in detectors(train_steps):
            det.fit(s.train, seed=seed)
            b, a = det.score(s.benign), det.score(s.attack)
            runs.setdefault(det.name, []).append(report(b, a, s.kinds, det.threshold_))
            if seed == seeds[0]:
                scores[det.name] = (b, a)
                if first is None and isinstance(det, DiffusionBaseline):
                    first = det
    return Comparison({k: mean_report(v) for k, v in runs.items()}, scores, first)


PLAIN = {"trim": 0.0, "host_balance": 0, "server_balance": 0, "refit": 0.0}  # all off
MODES = {"plain": PLAIN, "robust": {}, "robust+refit": {"refit": 0.1}}


def contamination(
    s: EvalSet,
    train_steps: int,
    shares=(0.0, 0.01, 0.05),
    seeds=(0,),
    modes: dict[str, dict] | None = None,
) -> dict:
    """AUROC and recall@1e-3 with attacks mixed into the benign training data, per training
    mode: by default ``plain`` (every robust option off), ``robust`` (the trainer's
    defaults) and ``robust+refit`` (the defaults and a refit without the 10% of training
    flows the first fit scores highest). Half the attack flows are the contamination pool,
    the other half the test attacks, so no test attack was trained on. Each seed draws
    another pool, mix and initialisation, and every mode trains on the same draw; the values
    are means over seeds (``runs`` keeps each seed's AUROC)."""
    modes = modes if modes is not None else MODES
    out: dict[str, dict] = {}
    for seed in seeds:
        rng = np.random.default_rng(seed + 1)
        order = rng.permutation(len(s.attack))
        pool, test = order[: len(order) // 2], order[len(order) // 2 :]
        for share in shares:
            n = int(round(share * len(s.train) / (1 - share)))
            drawn = rng.choice(pool, n, replace=n > len(pool))
            mixed = np.concatenate([s.train, s.attack[drawn]])
            for mode, options in modes.items():
                config = TrainConfig(train_steps=train_steps, seed=seed, **options)
                det = DiffusionDetector(config).fit(mixed)
                b, a = det.score(s.benign)[0], det.score(s.attack[test])[0]
                entry = out.setdefault(f"{mode} contamination={share:g}", {"runs": []})
                entry["runs"].append(
                    {
                        "seed": seed,
                        "auroc": auroc(a, b),
                        "recall_at_1e-3": recall_at_fpr(a, b, 1e-3),
                    }
                )
    for entry in out.values():
        for k in ("auroc", "recall_at_1e-3"):
            entry[k] = float(np.mean([r[k] for r in entry["runs"]]))
        entry["auroc_sd"] = float(np.std([r["auroc"] for r in entry["runs"]]))
    return out


def degradation(s: EvalSet, det, seed: int = 0) -> dict:
    """AUROC when test features are masked (NaN) or jittered: timing jitter (clock noise on
    times and rates) and, as a stress test, multiplicative noise on every feature."""
    from quietwire.agent.features.schema import SCHEMA

    rng = np.random.default_rng(seed)
    timing = np.array([f.unit in ("s", "packets/s", "bytes/s") for f in SCHEMA])

    def jitter(x, sd, cols):
        noise = rng.normal(1.0, sd, x.shape).astype(np.float32)
        return np.where(cols, x * noise, x)

    out = {}
    for name, fn in (
        ("clean", lambda x: x),
        ("10% masked", lambda x: np.where(rng.random(x.shape) < 0.1, np.nan, x)),
        ("30% masked", lambda x: np.where(rng.random(x.shape) < 0.3, np.nan, x)),
        ("10% timing jitter", lambda x: jitter(x, 0.1, timing)),
        ("30% timing jitter", lambda x: jitter(x, 0.3, timing)),
        ("10% jitter, all features", lambda x: jitter(x, 0.1, np.ones_like(timing))),
    ):
        out[name] = auroc(det.score(fn(s.attack)), det.score(fn(s.benign)))
    return out


def imbalance(benign: np.ndarray, attack: np.ndarray, rates=(0.01, 0.001), draws: int = 50) -> dict:
    """AUPRC when attacks are a realistic share of flows (attack scores resampled)."""
    rng = np.random.default_rng(0)
    out = {}
    for rate in rates:
        n = max(1, int(round(rate * len(benign) / (1 - rate))))
        out[f"{rate:g}"] = float(
            np.mean([auprc(rng.choice(attack, n), benign) for _ in range(draws)])
        )
    return out


def augmentation(s: EvalSet, train_steps: int, small: int = 200, synthetic: int = 1000) -> dict:
    """With little benign data: AUROC trained on it alone, and with synthetic flows added,
    sampled from a FlowGenerator fitted on the same small set (what ``quietwire train
    --augment`` does, with its default of five generator steps per detector step)."""
    rng = np.random.default_rng(2)
    few = s.train[rng.permutation(len(s.train))[:small]]
    base = DiffusionDetector(TrainConfig(train_steps=train_steps)).fit(few)
    gen = FlowGenerator(GeneratorConfig(train_steps=5 * train_steps)).fit(few)
    fake = gen.sample(synthetic, seed=3)
    aug = DiffusionDetector(TrainConfig(train_steps=train_steps)).fit(np.concatenate([few, fake]))
    out = {}
    for name, det in (("small", base), ("small + synthetic", aug)):
        out[name] = auroc(det.score(s.attack)[0], det.score(s.benign)[0])
    return out


def workdir(path: Path | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="quietwire-eval-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def table(name: str, reports: dict[str, Report]) -> str:
    """The comparison table: one row per detector, then per attack type. Means over seeds
    when the reports are; the AUROC columns then carry their standard deviation."""
    runs = next(iter(reports.values())).runs
    over = f", mean of {runs} seeds (± sd)" if runs > 1 else ""
    lines = [
        f"== {name}: AUROC, AUPRC, recall at FPR 1e-2 / 1e-3 / 1e-4, confusion at the "
        f"calibrated threshold (FPR 1e-2){over}",
        f"{'detector':<22} {'AUROC':>12} {'AUPRC':>6} {'R@1e-2':>7} {'R@1e-3':>7} "
        f"{'R@1e-4':>7} {'TP':>6} {'FN':>6} {'FP':>5} {'TN':>6}",
    ]

    def pm(value: float, sd: float | None) -> str:
        return f"{value:.3f}" + (f"±{sd:.3f}" if runs > 1 and sd is not None else "      ")

    for det, r in reports.items():
        c = r.confusion
        lines.append(
            f"{det:<22} {pm(r.auroc, r.sd.get('auroc')):>12} {r.auprc:6.3f} "
            f"{r.recall[1e-2]:7.3f} {r.recall[1e-3]:7.3f} {r.recall[1e-4]:7.3f} "
            f"{c['true_positive']:6} {c['false_negative']:6} {c['false_positive']:5} "
            f"{c['true_negative']:6}"
        )
    kinds = sorted(next(iter(reports.values())).per_attack)
    dets = list(reports)
    lines.append(f"AUROC per attack type ({', '.join(dets)}):")
    for kind in kinds:
        flows = reports[dets[0]].per_attack[kind]["flows"]
        values = " ".join(f"{reports[d].per_attack[kind]['auroc']:12.3f}" for d in dets)
        best = max(dets, key=lambda d: reports[d].per_attack[kind]["auroc"])
        lines.append(f"  {kind:<30} {flows:6} flows {values}   best: {best}")
    lines.append(
        f"  {'mean over attack types':<42}"
        + " ".join(f"{pm(reports[d].type_mean, reports[d].sd.get('type_mean')):>12}" for d in dets)
    )
    return "\n".join(lines)


def payload_borne(reports: dict[str, Report], kinds: tuple[str, ...]) -> dict:
    """Each payload-borne attack type's flows and AUROC per detector (the types the set
    has flows of), and each detector's mean over them."""
    first = next(iter(reports.values()))
    present = [k for k in kinds if k in first.per_attack]
    types = {
        k: {
            "flows": first.per_attack[k]["flows"],
            "auroc": {d: r.per_attack[k]["auroc"] for d, r in reports.items()},
        }
        for k in present
    }
    mean = {
        d: float(np.mean([types[k]["auroc"][d] for k in present])) if present else None
        for d in reports
    }
    return {"types": types, "mean_auroc": mean}


def _short(detector: str) -> str:
    """A detector's name in a 12-character column: the score of a diffusion model."""
    if detector.startswith("diffusion ("):
        return detector[len("diffusion (") : -1][:12]
    return {"isolation_forest": "iforest"}.get(detector, detector)[:12]


def payload_table(results: dict[str, dict]) -> str:
    """The payload-borne attacks of each set ({set name: payload_borne(...)}): AUROC per
    detector, one row per type and a mean per set."""
    dets = next((list(r["mean_auroc"]) for r in results.values() if r["types"]), [])
    lines = [
        "== payload-borne attacks (a web exploit in one request's bytes): AUROC per detector",
        f"{'':<10} {'attack type':<24} {'flows':>6} " + " ".join(f"{_short(d):>12}" for d in dets),
    ]
    for name, r in results.items():
        for kind, t in r["types"].items():
            values = " ".join(f"{t['auroc'][d]:12.3f}" for d in dets)
            lines.append(f"{name:<10} {kind:<24} {t['flows']:6} {values}")
        if r["types"]:
            means = " ".join(f"{r['mean_auroc'][d]:12.3f}" for d in dets)
            label = f"mean over {len(r['types'])} types"
            lines.append(f"{name:<10} {label:<31} {means}")
    lines.append(f"detectors: {', '.join(dets)}")
    return "\n".join(lines)


def plots(out: Path, name: str, scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[Path]:
    """ROC and PR curves and score histograms, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for det, (benign, attack) in scores.items():
        s = np.concatenate([attack, benign])
        y = np.r_[np.ones(len(attack)), np.zeros(len(benign))][np.argsort(-s)]
        tpr, fpr = np.cumsum(y) / y.sum(), np.cumsum(1 - y) / (1 - y).sum()
        precision = np.cumsum(y) / np.arange(1, len(y) + 1)
        axes[0].plot(fpr, tpr, label=det)
        axes[1].plot(tpr, precision, label=det)
    axes[0].set(
        xscale="log",
        xlim=(1e-4, 1),
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title=f"ROC ({name})",
    )
    axes[1].set(xlabel="recall", ylabel="precision", title=f"precision-recall ({name})")
    benign, attack = next(iter(scores.values()))
    bins = np.linspace(min(benign.min(), attack.min()), max(benign.max(), attack.max()), 60)
    axes[2].hist(benign, bins, alpha=0.6, density=True, label="benign")
    axes[2].hist(attack, bins, alpha=0.6, density=True, label="attack")
    axes[2].set(title=f"{next(iter(scores))} scores ({name})", xlabel="score")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
