"""Score thresholds by false-positive rate. A model stores one threshold per calibrated rate
(a site's calibration may replace them); the model and the rules pick among them the same way,
so a rule's ``fpr`` means what ``--fpr`` means."""

from __future__ import annotations

import numpy as np


def nearest_threshold(thresholds: dict[float, float], fpr: float) -> float:
    """The threshold of the stored false-positive rate nearest to ``fpr`` (on a log scale)."""
    level = min(thresholds, key=lambda k: abs(np.log10(k) - np.log10(fpr)))
    return thresholds[level]
