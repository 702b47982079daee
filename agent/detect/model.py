"""Scoring with an exported model: onnxruntime only (no torch in the agent).

A model file declares the feature schema it was trained on; loading refuses a model whose
schema hash differs from this agent's, so train/serve skew is an error, not a silent drift.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quietwire import DATA
from quietwire.agent.detect.risk import RiskCalibration
from quietwire.agent.detect.thresholds import nearest_threshold
from quietwire.agent.errors import QuietwireError
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA_HASH, SCHEMA_VERSION

DEFAULT_MODEL = DATA / "default.onnx"
OUTPUTS = ("score", "tail_probability", "contributions")
SCORE_BATCH = 8192
BULK_MANTISSA_BITS = 5


class ModelError(QuietwireError):
    """A model file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Scores:
    score: np.ndarray  # (n,) higher = more anomalous
    tail_probability: np.ndarray  # (n,) share of held-out benign flows scoring as high
    contributions: np.ndarray  # (n, F) per-feature error, higher = less like benign; 0 for NaN

    def top_features(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """The k features of each flow with the highest contributions."""
        idx = np.argsort(-self.contributions, axis=1)[:, :k]
        vals = np.take_along_axis(self.contributions, idx, axis=1)
        return [
            [(FEATURE_NAMES[i], float(v)) for i, v in zip(r, vr)]
            for r, vr in zip(idx.tolist(), vals.tolist())
        ]


class ScoringModel:
    """A loaded model: ``score(features)``, thresholds by false-positive rate, metadata."""

    def __init__(self, path: str | Path = DEFAULT_MODEL, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{self.path}: cannot read model: {exc.strerror}") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own error types for a bad file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.path}: not a valid ONNX model ({first[:200]})") from exc
        meta = self._session.get_modelmeta().custom_metadata_map
        found = meta.get("schema_hash")
        if found is None:
            raise ModelError(f"{self.path}: not a quietwire model (no schema_hash in metadata)")
        if found != SCHEMA_HASH:
            raise ModelError(
                f"{self.path}: model expects feature schema {found} "
                f"(v{meta.get('schema_version', '?')}), this agent extracts {SCHEMA_HASH} "
                f"(v{SCHEMA_VERSION}); retrain it with this version: quietwire train --benign "
                "CAPTURES_OR_FLOW_LOGS -o model.onnx (the bundled model always matches)"
            )
        outputs = [o.name for o in self._session.get_outputs()]
        if outputs != list(OUTPUTS):
            raise ModelError(f"{self.path}: model outputs {outputs}, expected {list(OUTPUTS)}")
        self.metadata = dict(meta)
        self.version = hashlib.sha256(raw).hexdigest()[:12]
        self.score_kind = meta.get("score", "?")
        try:
            self.thresholds = {
                float(k): float(v) for k, v in json.loads(meta["thresholds"]).items()
            }
            self.training = json.loads(meta.get("training", "{}"))
        except (KeyError, ValueError) as exc:
            raise ModelError(f"{self.path}: bad thresholds metadata ({exc})") from exc
        # the incident threshold and host baselines the site's (or training's) benign
        # traffic set; None: the agent's configured threshold, no baselines
        self.risk: RiskCalibration | None = None
        if "risk" in meta:
            try:
                self.risk = RiskCalibration.from_json(meta["risk"])
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise ModelError(f"{self.path}: bad risk metadata ({exc})") from exc

    def score(self, features: np.ndarray) -> Scores:
        """Score a (n, F) float32 feature matrix (NaN allowed)."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES):
            raise ModelError(
                f"{self.path}: expected (n, {len(FEATURE_NAMES)}) features, got {x.shape}"
            )
        if len(x) == 0:
            return Scores(
                np.zeros(0, np.float32),
                np.zeros(0, np.float32),
                np.zeros((0, len(FEATURE_NAMES)), np.float32),
            )
        # In rows of SCORE_BATCH: the network's intermediates for a whole flood's flows at once
        # would cost memory, and stay out of the CPU caches.
        parts = [
            self._session.run(list(OUTPUTS), {"features": x[i : i + SCORE_BATCH]})
            for i in range(0, len(x), SCORE_BATCH)
        ]
        if len(parts) == 1:
            scores = Scores(*parts[0])
        else:
            scores = Scores(*(np.concatenate(column) for column in zip(*parts)))
        # A feature that does not apply to a flow (NaN: a payload statistic of a flow without
        # payload) explains nothing to an analyst: its share of the error is not named.
        scores.contributions[np.isnan(x)] = 0.0
        return scores

    def score_bulk(self, features: np.ndarray, bits: int = BULK_MANTISSA_BITS) -> Scores:
        """Score many near-identical flows (a flood) at the cost of their distinct shapes: every
        feature is rounded to ``bits`` mantissa bits (at most 1.6% off at 5, less after the
        model's log scale), each distinct rounded row is scored once and its scores go to every
        flow that has it. A spoofed flood's flows differ only in counts that grow by one per
        flow, so hundreds of thousands of rows become a few hundred. The agent uses it in the
        flow table's emergency mode only (bench/bench_flood.py measures the difference)."""
        x = round_mantissa(features, bits)
        if len(x) == 0:
            return self.score(x)
        rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.shape[1] * 4))).ravel()
        _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        s = self.score(x[first])
        inverse = inverse.reshape(-1)
        return Scores(s.score[inverse], s.tail_probability[inverse], s.contributions[inverse])

    def score_mixed(self, features: np.ndarray, bulk: np.ndarray) -> Scores:
        """Score the rows where ``bulk`` is set as score_bulk does, the others exactly."""
        if bulk.all():
            return self.score_bulk(features)
        parts = [(bulk, self.score_bulk(features[bulk])), (~bulk, self.score(features[~bulk]))]
        n = len(features)
        out = Scores(
            np.empty(n, np.float32),
            np.empty(n, np.float32),
            np.empty((n, features.shape[1]), np.float32),
        )
        for rows, s in parts:
            out.score[rows], out.tail_probability[rows] = s.score, s.tail_probability
            out.contributions[rows] = s.contributions
        return out

    def threshold(self, fpr: float) -> float:
        """The score threshold calibrated for a false-positive rate (nearest stored level)."""
        return nearest_threshold(self.thresholds, fpr)


def round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 values rounded to nearest with ``bits`` mantissa bits kept (relative error at
    most 2**-(bits + 1)), by integer operations on their bit patterns; 0, NaN and infinities
    kept, and every NaN one bit pattern, so equal rows are equal bytes."""
    drop = np.uint32(23 - bits)
    raw = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((raw + (np.uint32(1) << (drop - np.uint32(1)))) >> drop) << drop
    out = np.where(np.isfinite(x), rounded.view(np.float32), x).astype(np.float32)
    out[np.isnan(out)] = np.nan
    return out
