"""How close synthetic flows are to real ones: per-feature distances and a classifier test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quietwire.agent.features import FEATURE_NAMES

from .preprocess import Preprocessor


@dataclass(frozen=True)
class FidelityReport:
    ks: np.ndarray  # (F,) two-sample Kolmogorov-Smirnov statistic on present values
    wasserstein: np.ndarray  # (F,) W1 distance in robust-standardised units
    missing_gap: np.ndarray  # (F,) |share missing (synthetic) - share missing (real)|
    classifier_auc: float  # logistic regression telling synthetic from real; 0.5 = cannot

    def table(self, worst: int = 10) -> str:
        lines = [
            f"classifier AUC synthetic vs real: {self.classifier_auc:.3f} "
            "(0.5 = indistinguishable)",
            f"mean KS {np.nanmean(self.ks):.3f}, median KS {np.nanmedian(self.ks):.3f}, "
            f"mean W1 {np.nanmean(self.wasserstein):.3f} robust SDs",
            f"{'feature':<34} {'KS':>6} {'W1':>7} {'missing gap':>11}",
        ]
        order = np.argsort(-np.nan_to_num(self.ks, nan=-1))[:worst]
        for i in order:
            lines.append(
                f"{FEATURE_NAMES[i]:<34} {self.ks[i]:6.3f} {self.wasserstein[i]:7.3f} "
                f"{self.missing_gap[i]:11.3f}"
            )
        return "\n".join(lines)


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


def classifier_auc(real: np.ndarray, synthetic: np.ndarray, seed: int = 0) -> float:
    """Held-out AUC of a logistic regression trained to tell the two apart."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([real, synthetic]).astype(np.float32)
    y = np.concatenate([np.zeros(len(real)), np.ones(len(synthetic))]).astype(np.float32)
    idx = rng.permutation(len(x))
    half = len(x) // 2
    tr, te = idx[:half], idx[half:]
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(xt).squeeze(1), yt)
        loss = loss + 1e-3 * (lin.weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = lin(torch.from_numpy(x[te])).squeeze(1).numpy()
    return auroc(s[y[te] == 1], s[y[te] == 0])


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


def compare(real: np.ndarray, synthetic: np.ndarray, prep: Preprocessor) -> FidelityReport:
    """Fidelity of synthetic raw features against real raw features."""
    f = real.shape[1]
    ks = np.full(f, np.nan)
    w1 = np.full(f, np.nan)
    zr, zs = prep.transform(real), prep.transform(synthetic)
    for j in range(f):
        a, b = real[:, j], synthetic[:, j]
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        if len(a) and len(b):
            ks[j] = ks_statistic(a, b)
            pa, pb = zr[:, j][~np.isnan(real[:, j])], zs[:, j][~np.isnan(synthetic[:, j])]
            w1[j] = wasserstein_1(pa, pb)
    gap = np.abs(np.isnan(synthetic).mean(0) - np.isnan(real).mean(0))
    return FidelityReport(ks, w1, gap, classifier_auc(zr, zs))
