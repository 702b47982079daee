"""Calibrating a model to a site: new thresholds and tail probabilities from the site's own
flows, with onnxruntime alone (no torch). `quietwire calibrate` and the daemon's learning
period both call ``calibrate``.

A model's thresholds (one per false-positive rate) and its tail-probability table (the ONNX
initializer ``calibration/scores``) come from the benign flows it held out at training. On
another network the same threshold flags another share of the flows. Calibration scores the
site's flows with the model, recomputes both from those scores, and writes a new ONNX file in
which only the table, the thresholds and a ``calibration`` record differ: the scores are the
same.

Robust to a few attacks in the site's flows by **burst balancing**, the rule the model was
trained with (balance.py; the model's own ``host_balance`` and ``server_balance`` by default):
each flow counts with its weight, so a scan's or a flood's thousands of flows count as a few
dozen, and the thresholds are weighted quantiles. Not trimmed quantiles: dropping the top
share e of the scores before taking a quantile raises the false-positive rate by about e on
clean data, and cannot estimate a level below e at all (FPR 1e-4 would need e well under
1e-4, which ignores one flow in 10,000, no help against a scan's hundreds). Balancing costs
nothing where there is no burst and bounds a burst's weight whatever its size. Its limit:
isolated attack flows count fully, and a burst still weighs about ``host_balance * (1 +
ln(flows / host_balance))`` (a 2,000-probe scan about 60), which moves the FPR 1e-2 threshold
unless the site gave well over 100 times that many flows.

A threshold at FPR q is the smallest site score with at most a share q of the (weighted)
site flows strictly above it: the agent alerts on ``score > threshold``. It needs 1/q
balanced flows to mean anything; with fewer, ``calibrate`` refuses unless ``allow_few_flows``,
and then the same rule gives (about) the highest site score, as training does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quietwire import __version__
from quietwire.agent.detect.model import ModelError, ScoringModel
from quietwire.agent.errors import QuietwireError
from quietwire.agent.features.schema import FEATURE_NAMES
from quietwire.agent.site.balance import burst_weights

TABLE = "calibration/scores"  # (1, M) float32: the scores the tail probability counts
TABLE_N_PLUS_1 = "calibration/n_plus_1"  # M + 1, the tail probability's denominator
TABLE_POINTS = 4096  # at most this many points in the table (as training stores)
DEFAULT_BALANCE = (10, 100)  # host_balance, server_balance for a model that records none
SCORE_CHUNK = 1 << 16
MAX_RECORDED_INPUTS = 100


class CalibrationError(QuietwireError):
    """A model cannot be calibrated on these flows; the message names the file and why."""


class TooFewFlowsError(CalibrationError):
    """Fewer balanced flows than the smallest false-positive rate needs."""

    def __init__(self, message: str, fpr: float, needed: int) -> None:
        super().__init__(message)
        self.fpr = fpr
        self.needed = needed


@dataclass(frozen=True)
class LevelReport:
    """One false-positive rate: its threshold before and after, and how the site's flows fall."""

    fpr: float
    old_threshold: float
    new_threshold: float
    share_over_old: float  # share of the site's records scoring above the old threshold
    share_over_new: float
    balanced_share_over_new: float  # the same, each flow counted with its burst weight
    too_few_flows: bool  # fewer balanced flows than 1 / fpr (allowed by allow_few_flows)


@dataclass(frozen=True)
class CalibrationReport:
    """What ``calibrate`` did (also recorded in the new model's ``calibration`` metadata)."""

    model_path: Path
    out_path: Path
    records: int  # scored records: ended flows and interim records of flows still open
    interim_records: int
    balanced_records: float  # their weight after burst balancing
    host_balance: int
    server_balance: int
    levels: tuple[LevelReport, ...]
    table_points: int
    first_start: str | None
    last_end: str | None
    date: str
    inputs: tuple[tuple[str, int], ...] = field(default=())

    @property
    def thresholds(self) -> dict[float, float]:
        """The new thresholds by false-positive rate."""
        return {level.fpr: level.new_threshold for level in self.levels}


def weighted_thresholds(
    scores: np.ndarray, weights: np.ndarray, levels: Sequence[float]
) -> dict[float, float]:
    """For each level q, the smallest score with a weight of at most q * total strictly above
    it (with unit weights: at most a share q of the flows score higher)."""
    order = np.argsort(scores, kind="stable")
    s, w = scores[order], np.asarray(weights, np.float64)[order]
    cum = np.cumsum(w)
    last_equal = np.searchsorted(s, s, side="right") - 1  # ties: the weight above the value
    above = cum[-1] - cum[last_equal]
    # The last score has nothing above it, so argmax always finds a True.
    return {q: float(s[np.argmax(above <= q * cum[-1])]) for q in levels}


def tail_table(scores: np.ndarray, weights: np.ndarray, points: int = TABLE_POINTS) -> np.ndarray:
    """The scores the tail probability counts, sorted: with unit weights and no more flows
    than ``points``, every score (what training stores); otherwise the weighted quantiles at
    (j + 0.5) / M, so that (table entries >= s) / M is the weighted share scoring as high."""
    order = np.argsort(scores, kind="stable")
    s, w = scores[order], np.asarray(weights, np.float64)[order]
    m = min(len(s), points)
    cum = np.cumsum(w)
    targets = (np.arange(m) + 0.5) / m * cum[-1]
    idx = np.minimum(np.searchsorted(cum, targets, side="right"), len(s) - 1)
    return s[idx].astype(np.float32)


def site_scores(model: ScoringModel, features: np.ndarray) -> np.ndarray:
    """The model's scores for the site's flows, SCORE_CHUNK rows at a time (the per-feature
    contributions of each chunk are dropped at once)."""
    parts = [
        model.score(features[i : i + SCORE_CHUNK]).score
        for i in range(0, len(features), SCORE_CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def calibrate(
    model_path: str | Path,
    features: np.ndarray,
    out_path: str | Path,
    *,
    host_balance: int | None = None,
    server_balance: int | None = None,
    allow_few_flows: bool = False,
    min_records: int | None = None,
    inputs: Sequence[tuple[str, int]] = (),
    period: tuple[str | None, str | None] = (None, None),
    now: datetime | None = None,
) -> CalibrationReport:
    """Calibrate the model at ``model_path`` on the site's flows ``features`` ((n, F) float32)
    and write the result to ``out_path`` (atomically; it may be the model itself).

    ``host_balance`` / ``server_balance``: burst balancing's bounds (None: the model's own
    training values; 0 and 0: every flow counts fully). ``min_records``: the balanced records
    needed (default: 1 / the smallest false-positive rate); a level with fewer than 1 / its
    rate then gets about the highest site score. ``inputs`` ((file, records) pairs) and
    ``period`` (the first flow start and last flow end, ISO 8601) are recorded in the model.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    model, proto = _load_calibratable(model_path)
    host_balance, server_balance = _balance_bounds(model, host_balance, server_balance)
    where = _describe(inputs)
    features = np.asarray(features, dtype=np.float32)
    scores = _scores_on_site(model, features, where)
    weights = burst_weights(features, host_balance, server_balance)
    if weights is None:
        weights = np.ones(len(scores))
    balanced = float(weights.sum())
    levels = sorted(model.thresholds, reverse=True)
    smallest = levels[-1]
    if not allow_few_flows:
        _require_enough_flows(len(scores), balanced, smallest, min_records, where)
    new = weighted_thresholds(scores, weights, levels)
    table = tail_table(scores, weights)
    date = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    report = CalibrationReport(
        model_path=model_path,
        out_path=out_path,
        records=len(scores),
        interim_records=int(np.nansum(features[:, FEATURE_NAMES.index("flow_open")])),
        balanced_records=balanced,
        host_balance=host_balance,
        server_balance=server_balance,
        levels=_level_reports(model.thresholds, new, scores, weights, balanced, levels),
        table_points=len(table),
        first_start=period[0],
        last_end=period[1],
        date=date,
        inputs=tuple((str(name), int(n)) for name, n in inputs),
    )
    _rewrite(proto, table, new, _record(report, model))
    save_model(proto, out_path)
    return report


def _load_calibratable(model_path: Path) -> tuple[ScoringModel, onnx.ModelProto]:
    """The model loaded for scoring and as an ONNX graph to rewrite; CalibrationError if it
    lacks the tail-probability table calibration replaces."""
    model = ScoringModel(model_path)
    proto = load_proto(model_path)
    inits = {t.name for t in proto.graph.initializer}
    if TABLE not in inits or TABLE_N_PLUS_1 not in inits:
        raise CalibrationError(
            f"{model_path}: not a quietwire model this agent can calibrate (no {TABLE} table)"
        )
    return model, proto


def _balance_bounds(
    model: ScoringModel, host_balance: int | None, server_balance: int | None
) -> tuple[int, int]:
    """Burst balancing's bounds: those given, else the model's training values."""
    config = json.loads(model.metadata.get("config", "{}") or "{}")
    if host_balance is None:
        host_balance = int(config.get("host_balance", DEFAULT_BALANCE[0]))
    if server_balance is None:
        server_balance = int(config.get("server_balance", DEFAULT_BALANCE[1]))
    if host_balance < 0 or server_balance < 0:
        raise CalibrationError(
            f"host_balance and server_balance must be >= 0, got {host_balance}, {server_balance}"
        )
    return host_balance, server_balance


def _scores_on_site(model: ScoringModel, features: np.ndarray, where: str) -> np.ndarray:
    """The model's scores for the site's flows; CalibrationError if there are none, or if any
    is not finite (a quantile of them would mean nothing)."""
    if len(features) == 0:
        raise CalibrationError(f"no flows to calibrate on in {where}")
    scores = site_scores(model, features)
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise CalibrationError(f"{model.path}: gave {bad} non-finite scores on {where}")
    return scores


def _require_enough_flows(
    records: int, balanced: float, smallest: float, min_records: int | None, where: str
) -> None:
    """TooFewFlowsError unless the balanced records reach ``min_records`` (default: 1 / the
    smallest false-positive rate)."""
    needed = int(np.ceil(1.0 / smallest - 1e-9)) if min_records is None else int(min_records)
    if balanced >= needed * (1 - 1e-9):
        return
    raw = int(np.ceil(needed * records / balanced))
    level = f" FPR {smallest:g}" if min_records is None else ""
    rule = "" if min_records is None else " (min_records)"
    raise TooFewFlowsError(
        f"too few flows in {where} to calibrate{level}: {records:,} records "
        f"({balanced:,.0f} after burst balancing), it needs {needed:,} after burst "
        f"balancing{rule} (about {raw:,} records like these)",
        smallest,
        needed,
    )


def _level_reports(
    old: dict[float, float],
    new: dict[float, float],
    scores: np.ndarray,
    weights: np.ndarray,
    balanced: float,
    levels: Sequence[float],
) -> tuple[LevelReport, ...]:
    """Each level's thresholds before and after, and the shares of the site's flows above."""
    return tuple(
        LevelReport(
            fpr=q,
            old_threshold=old[q],
            new_threshold=new[q],
            share_over_old=float(np.mean(scores > old[q])),
            share_over_new=float(np.mean(scores > new[q])),
            balanced_share_over_new=float(weights[scores > new[q]].sum() / balanced),
            too_few_flows=balanced * q < 1.0 - 1e-9,
        )
        for q in levels
    )


def _describe(inputs: Sequence[tuple[str, int]]) -> str:
    names = [str(name) for name, _ in inputs]
    if not names:
        return "the given flows"
    if len(names) == 1:
        return names[0]
    return f"{names[0]} and {len(names) - 1} more input{'s' if len(names) > 2 else ''}"


def load_proto(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises protobuf's and its own errors for a bad file
        raise ModelError(f"{path}: cannot load ONNX ({str(exc).splitlines()[0][:200]})") from exc


def _record(report: CalibrationReport, model: ScoringModel) -> dict:
    """The ``calibration`` metadata entry."""
    previous = json.loads(model.metadata.get("calibration", "{}") or "{}")
    old = {f"{q:g}": t for q, t in model.thresholds.items()}
    return {
        "date": report.date,
        "quietwire_version": __version__,
        "records": report.records,
        "interim_records": report.interim_records,
        "balanced_records": round(report.balanced_records, 3),
        "burst_balance": {
            "host_balance": report.host_balance,
            "server_balance": report.server_balance,
        },
        "period": {"first_start": report.first_start, "last_end": report.last_end},
        "inputs": [{"path": name, "records": n} for name, n in report.inputs[:MAX_RECORDED_INPUTS]],
        "inputs_total": len(report.inputs),
        "table_points": report.table_points,
        "levels_with_too_few_flows": [f"{lv.fpr:g}" for lv in report.levels if lv.too_few_flows],
        "original_model": {"path": str(report.model_path), "version": model.version},
        "original_thresholds": old,
        # A model calibrated again keeps the thresholds its training gave.
        "trained_thresholds": previous.get("trained_thresholds", old),
    }


def _rewrite(
    proto: onnx.ModelProto, table: np.ndarray, thresholds: dict[float, float], record: dict
) -> None:
    """Replace the table, its denominator, the thresholds and the calibration record."""
    inits = {t.name: t for t in proto.graph.initializer}
    inits[TABLE].CopyFrom(numpy_helper.from_array(table.reshape(1, -1), TABLE))
    inits[TABLE_N_PLUS_1].CopyFrom(
        numpy_helper.from_array(np.array(len(table) + 1, dtype=np.float32), TABLE_N_PLUS_1)
    )
    values = {
        "thresholds": json.dumps({f"{q:g}": t for q, t in thresholds.items()}),
        "calibration": json.dumps(record),
    }
    for prop in proto.metadata_props:
        if prop.key in values:
            prop.value = values.pop(prop.key)
    for key, value in values.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(proto)


def save_model(proto: onnx.ModelProto, out_path: Path) -> None:
    """Write to a temporary file beside ``out_path`` and rename it into place, so a daemon
    loading the file never reads half of it."""
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, out_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CalibrationError(f"{out_path}: cannot write model: {exc.strerror}") from exc
