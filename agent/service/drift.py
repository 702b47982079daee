"""Score drift: how the live scores compare with the model's calibration, over a sliding
window, as Prometheus gauges (``quietwire_score_share_over_threshold``, ``quietwire_score_psi``).

A calibrated model promises two things about benign traffic: a share q of the records scores
above its FPR-q threshold, and the records fall into the deciles of its calibration table (the
held-out or site scores its tail probabilities count) in equal shares. When the network is
not the one the model was calibrated on (a new site, new services, a model trained elsewhere)
both move: more than 1% of the records go over the 1e-2 threshold, and the population
stability index (PSI) of the live scores against the table's deciles grows past 0.1 (a
moderate shift) and 0.25 (a significant one; the usual rule of thumb). The fix is to
recalibrate (a learning period, `quietwire calibrate`) or to retrain on the flow log.

Memory is bounded whatever the traffic: one row of counts per minute (records, records over
each threshold, records per decile bin), the window's worth of rows.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

WINDOW_S = 900  # the sliding window: the last 15 minutes
BUCKET_S = 60  # counted per minute
PSI_BINS = 10  # deciles of the calibration table
PSI_FLOOR = 1e-4  # a share below this counts as this much (an empty bin would be infinite)


@dataclass(frozen=True)
class DriftSnapshot:
    """The window's figures at one moment."""

    records: int  # scored records in the window
    share_over: dict[float, float]  # FPR level -> share of the records above its threshold
    psi: float | None  # None without records or without a calibration table


def calibration_table(path: str | Path, version: str) -> np.ndarray | None:
    """The calibration table of the model file at ``path``, or None when the file has none, is
    gone, or is no longer the model of ``version`` (replaced since it was loaded)."""
    import onnx
    from onnx import numpy_helper

    from quietwire.agent.site.calibrate import TABLE

    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(raw).hexdigest()[:12] != version:
        return None
    try:
        proto = onnx.load_from_string(raw)
    except Exception:  # noqa: BLE001 - protobuf's errors; the model loaded, so none expected
        return None
    for init in proto.graph.initializer:
        if init.name == TABLE:
            table = numpy_helper.to_array(init).astype(np.float64).reshape(-1)
            return table[np.isfinite(table)] if np.isfinite(table).any() else None
    return None


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (shares or counts):
    sum of (a - e) ln(a / e), each share at least PSI_FLOOR."""
    a = np.maximum(actual / max(actual.sum(), 1e-300), PSI_FLOOR)
    e = np.maximum(expected / max(expected.sum(), 1e-300), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


class ScoreDrift(Collector):
    """Counts of scored records per minute; at scrape time, the window's share above each
    threshold and its PSI against the calibration table. ``reset`` when the model changes."""

    def __init__(
        self, registry=None, window_s: float = WINDOW_S, bucket_s: float = BUCKET_S, clock=None
    ) -> None:
        self.window_s, self.bucket_s = float(window_s), float(bucket_s)
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._buckets: deque[list] = deque()  # [bucket index, counts], oldest first
        self.levels: tuple[float, ...] = ()
        self._thresholds = np.zeros(0)
        self._edges: np.ndarray | None = None  # decile edges of the calibration table
        self._expected: np.ndarray | None = None  # the table's share in each bin
        if registry is not None:
            registry.register(self)

    def reset(self, thresholds: dict[float, float], table: np.ndarray | None) -> None:
        """A new model: its thresholds and calibration table; the window starts empty."""
        levels = tuple(sorted(thresholds, reverse=True))
        edges = expected = None
        if table is not None and len(table):
            table = np.sort(np.asarray(table, dtype=np.float64))
            edges = np.quantile(table, np.arange(1, PSI_BINS) / PSI_BINS)
            bins = np.searchsorted(edges, table, side="right")
            expected = np.bincount(bins, minlength=PSI_BINS) / len(table)
        with self._lock:
            self.levels = levels
            self._thresholds = np.array([thresholds[q] for q in levels], dtype=np.float64)
            self._edges, self._expected = edges, expected
            self._buckets.clear()

    def observe(self, scores: np.ndarray) -> None:
        """Count a batch of scored records (numpy: one bincount per batch)."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not len(scores):
            return
        with self._lock:
            counts = np.zeros(1 + len(self._thresholds) + PSI_BINS, dtype=np.int64)
            counts[0] = len(scores)
            if len(self._thresholds):
                counts[1 : 1 + len(self._thresholds)] = (
                    scores[:, None] > self._thresholds[None, :]
                ).sum(axis=0)
            if self._edges is not None:
                bins = np.searchsorted(self._edges, scores, side="right")
                counts[1 + len(self._thresholds) :] = np.bincount(bins, minlength=PSI_BINS)
            index = int(self._clock() // self.bucket_s)
            if self._buckets and self._buckets[-1][0] == index:
                self._buckets[-1][1] += counts
            else:
                self._buckets.append([index, counts])
            self._expire(index)

    def _expire(self, index: int) -> None:
        oldest = index - int(np.ceil(self.window_s / self.bucket_s)) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

    def snapshot(self) -> DriftSnapshot:
        """The window's records, shares over the thresholds and PSI, as of now."""
        with self._lock:
            self._expire(int(self._clock() // self.bucket_s))
            n_levels = len(self._thresholds)
            total = np.zeros(1 + n_levels + PSI_BINS, dtype=np.int64)
            for _, counts in self._buckets:
                total += counts
            records = int(total[0])
            levels, expected = self.levels, self._expected
        if not records:
            return DriftSnapshot(0, {}, None)
        share = {q: float(total[1 + i]) / records for i, q in enumerate(levels)}
        value = None if expected is None else psi(total[1 + n_levels :].astype(float), expected)
        return DriftSnapshot(records, share, value)

    def collect(self):
        snap = self.snapshot()
        window = f"the last {self.window_s / 60:g} minutes"
        records = GaugeMetricFamily(
            "quietwire_score_window_records",
            f"Flow records scored in {window} (the drift gauges' sample)",
            value=snap.records,
        )
        share = GaugeMetricFamily(
            "quietwire_score_share_over_threshold",
            f"Share of the flow records scored in {window} above the model's threshold at each "
            "false-positive rate (calibrated: about the rate itself)",
            labels=["fpr"],
        )
        for q, value in snap.share_over.items():
            share.add_metric([f"{q:g}"], value)
        index = GaugeMetricFamily(
            "quietwire_score_psi",
            f"Population stability index of the scores in {window} against the deciles of the "
            "model's calibration table (0.1: moderate drift, 0.25: significant)",
        )
        if snap.psi is not None:
            index.add_metric([], snap.psi)
        yield records
        yield share
        yield index
