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

from .features import FEATURE_NAMES, SCHEMA_HASH

DEFAULT_MODEL = DATA / "default.onnx"
OUTPUTS = ("score", "tail_probability", "contributions")


class ModelError(Exception):
    """A model file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Scores:
    score: np.ndarray  # (n,) higher = more anomalous
    tail_probability: np.ndarray  # (n,) share of held-out benign flows scoring as high
    contributions: np.ndarray  # (n, F) per-feature error, higher = less like benign

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
                f"(v{meta.get('schema_version', '?')}), this agent extracts {SCHEMA_HASH}; "
                "retrain the model with this version"
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
        score, tail, contrib = self._session.run(list(OUTPUTS), {"features": x})
        return Scores(score, tail, contrib)

    def threshold(self, fpr: float) -> float:
        """The score threshold calibrated for a false-positive rate (nearest stored level)."""
        return nearest_threshold(self.thresholds, fpr)


def nearest_threshold(thresholds: dict[float, float], fpr: float) -> float:
    """The threshold of the stored false-positive rate nearest to ``fpr`` (on a log scale)."""
    level = min(thresholds, key=lambda k: abs(np.log10(k) - np.log10(fpr)))
    return thresholds[level]
