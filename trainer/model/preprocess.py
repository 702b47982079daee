"""Preprocessing fitted on benign flows: log for heavy-tailed counts, robust standardisation,
and missing values as explicit indicator columns (never zeros that look like data).

The same arithmetic runs in numpy here, in torch for training and inside the ONNX graph
(export.py), from the parameters this module fits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from quietwire.agent.features.schema import SCHEMA

# Units whose values are non-negative and heavy-tailed: compared on a log scale.
LOG_UNITS = {"s", "packets", "bytes", "packets/s", "bytes/s", "flows", "hosts", "ports"}
CLIP = 20.0  # standardised values beyond +-20 robust deviations add nothing but instability


@dataclass(frozen=True)
class Preprocessor:
    """Fitted parameters; ``transform`` maps raw features (NaN allowed) to model inputs."""

    log_mask: np.ndarray  # bool (F,)
    center: np.ndarray  # float32 (F,)
    scale: np.ndarray  # float32 (F,)
    indicator_index: np.ndarray  # int64 (K,): features whose missingness gets its own column

    @property
    def n_inputs(self) -> int:
        return len(self.center) + len(self.indicator_index)

    @staticmethod
    def fit(x: np.ndarray) -> Preprocessor:
        """Fit on benign raw features (n, F)."""
        log_mask = np.array([f.unit in LOG_UNITS for f in SCHEMA], dtype=bool)
        y = _log(x, log_mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # columns that are all NaN
            center = np.nanmedian(y, axis=0)
            q75, q25 = np.nanpercentile(y, [75, 25], axis=0)
            std = np.nanstd(y, axis=0)
        scale = (q75 - q25) / 1.349
        scale = np.where(np.isfinite(scale) & (scale > 1e-6), scale, std)
        scale = np.where(np.isfinite(scale) & (scale > 1e-6), scale, 1.0)
        center = np.where(np.isfinite(center), center, 0.0)
        nullable = np.array([f.nullable for f in SCHEMA], dtype=bool)
        indicator_index = np.flatnonzero(nullable)
        return Preprocessor(
            log_mask=log_mask,
            center=center.astype(np.float32),
            scale=scale.astype(np.float32),
            indicator_index=indicator_index.astype(np.int64),
        )

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, F) raw features -> (n, n_inputs) float32 model inputs."""
        missing = np.isnan(x)
        z = (_log(x, self.log_mask) - self.center) / self.scale
        z = np.clip(np.where(missing, 0.0, z), -CLIP, CLIP)
        return np.concatenate([z, missing[:, self.indicator_index]], axis=1).astype(np.float32)

    def as_missing(self, inputs: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        """Model inputs with the features where ``missing`` (n, F) is true encoded as
        ``transform`` encodes a NaN: value at the center, indicator (where it has one) set."""
        f = len(self.center)
        out = inputs.clone()
        out[:, :f] = inputs[:, :f].masked_fill(missing, 0.0)
        if len(self.indicator_index):
            index = torch.tensor(self.indicator_index)  # a loaded model's array is read-only
            out[:, f:] = inputs[:, f:].masked_fill(missing[:, index], 1.0)
        return out

    def inverse(self, inputs: np.ndarray) -> np.ndarray:
        """Model inputs (e.g. sampled ones) back to raw features; indicators > 0.5 are NaN."""
        f = len(self.center)
        y = inputs[:, :f] * self.scale + self.center
        x = np.where(self.log_mask, np.expm1(np.clip(y, None, 80.0)), y)
        missing = np.zeros_like(x, dtype=bool)
        missing[:, self.indicator_index] = inputs[:, f:] > 0.5
        return np.where(missing, np.nan, _snap(x)).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "log_mask": self.log_mask,
            "center": self.center,
            "scale": self.scale,
            "indicator_index": self.indicator_index,
        }


INTEGER_UNITS = {"packets", "bytes", "flows", "hosts", "ports", "hops", "bool"}


def _snap(x: np.ndarray) -> np.ndarray:
    """Put generated values where real ones can be: counts are non-negative integers,
    flags 0 or 1, TTLs 0-255, everything else non-negative."""
    out = np.maximum(x, 0.0)
    for j, feature in enumerate(SCHEMA):
        if feature.unit in INTEGER_UNITS:
            out[:, j] = np.round(out[:, j])
        if feature.unit == "bool":
            out[:, j] = np.minimum(out[:, j], 1.0)
        elif feature.unit == "hops":
            out[:, j] = np.minimum(out[:, j], 255.0)
    return out


def _log(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log1p of the masked columns (negative values count as 0); NaN stays NaN."""
    with np.errstate(invalid="ignore"):
        return np.where(mask, np.log1p(np.maximum(x, 0.0)), x)
