"""DiffusionDetector: fit on benign flows, score (higher = more anomalous), calibrated
thresholds, and sampling of synthetic benign flows. Torch only; export.py writes it as ONNX.

Scores (all deterministic, so they export):
- ``dte``: Diffusion Time Estimation. A classifier learns how many diffusion steps of noise an
  input carries; a clean input's expected step is its score: benign flows look noise-free,
  anomalies look like noised benign flows.
- ``noise``: the denoiser's noise-prediction error, averaged over a few fixed steps with fixed
  noise vectors.
- ``dte_noise``: the DTE score times the denoiser's error at ``contribution_steps`` (relative
  to its median on the training flows). DTE saturates: an input noisier than the largest step
  it was trained on gets the top step, so the most anomalous flows tie with the few most
  unusual benign ones; the denoiser's error, already computed for the contributions, ranks
  them. Same scale as DTE for typical flows, no extra network pass.
- ``dte_clean``: how surely the DTE classifier says the input is not clean, in nats:
  -log P(step < ``dte_clean_step`` | x), plus ``dte_clean_noise_weight`` times the log of the
  denoiser's error at ``contribution_steps`` over its training median when above it. Unlike the
  expected step it has no ceiling and tells a confidently mid-noise flow (a scanner's probe)
  from a flow whose noise level the classifier is unsure of (an odd benign application); no
  extra network pass. The default: with ``mask_augment`` (training inputs with features
  encoded as missing at random) a flow with features missing is no longer "not clean" for
  that alone, which without it ranked masked benign flows above masked attacks.
Per-feature contributions always come from the denoiser's error at ``contribution_steps``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from quietwire.agent.errors import QuietwireError
from quietwire.agent.site.balance import burst_weights
from quietwire.trainer.model.diffusion import Denoiser, NoiseSchedule, noise_loss, time_loss
from quietwire.trainer.model.preprocess import CLIP, Preprocessor

FPR_LEVELS = (1e-2, 1e-3, 1e-4)
SCORES = ("dte", "noise", "dte_noise", "dte_clean")
DTE_SCORES = ("dte", "dte_noise", "dte_clean")  # the scores that use the time estimator
MAX_CALIBRATION_POINTS = 4096


class TrainingError(QuietwireError):
    """The training data cannot give a model (too few flows, no finite values, ...)."""


HOLDOUT_SPLITS = ("random", "last")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; the defaults work on a few thousand flows in seconds on a CPU."""

    score: str = "dte_clean"
    width: int = 128
    depth: int = 3
    time_dim: int = 32
    steps: int = 1000
    dte_max_step: int = 300
    dte_bins: int = 30
    dte_clean_step: int = 30  # dte_clean: the steps below it count as a clean input
    dte_clean_noise_weight: float = 2.0  # dte_clean: weight of the denoiser's log error ratio
    noise_steps: tuple[int, ...] = (25, 50, 100, 200)
    contribution_steps: tuple[int, ...] = (50,)
    train_steps: int = 2000  # optimiser steps per network (at least one epoch)
    batch_size: int = 256
    lr: float = 1e-3
    trim: float = 0.05  # robust training: ignore this share of each batch's highest losses
    # robust training: a burst of near-identical flows is sampled less, so it cannot teach
    # the model that it is normal: flows of a client that started more than host_balance in
    # the context window (scan, flood, brute force) and flows to a server that more than
    # server_balance distinct clients reached in it (spoofed or distributed flood); weight
    # the smaller of host_balance / client's flows and server_balance / server's clients;
    # 0 turns either side off
    host_balance: int = 10
    server_balance: int = 100
    # robust training: fit, drop this share of the training flows that score highest, fit
    # again (twice the training time); 0 = one fit
    refit: float = 0.0
    # robust training: in half of each batch's rows, up to this share of the features (a
    # uniform draw per row) are encoded as missing, so a flow with features missing at random
    # (a sensor that cannot compute some) is not an anomaly for that alone; 0 = off
    mask_augment: float = 0.15
    holdout: float = 0.2  # share of benign flows kept aside to calibrate thresholds
    # which: "random" (a seeded draw), or "last" (the flows read last: a later time window,
    # so thresholds hold on traffic the model did not see the like of; fine-tuning uses it)
    holdout_split: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        width = self.dte_max_step / self.dte_bins
        if not (0 < self.dte_clean_step < self.dte_max_step and self.dte_clean_step % width == 0):
            raise ValueError(
                f"dte_clean_step must be a multiple of dte_max_step / dte_bins ({width:g}) "
                f"in (0, {self.dte_max_step}), got {self.dte_clean_step!r}"
            )
        if self.dte_clean_noise_weight < 0:
            raise ValueError(
                f"dte_clean_noise_weight must be >= 0, got {self.dte_clean_noise_weight!r}"
            )
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim!r}")
        if self.host_balance < 0 or self.server_balance < 0:
            raise ValueError(
                f"host_balance and server_balance must be >= 0, got {self.host_balance!r}, "
                f"{self.server_balance!r}"
            )
        if not 0.0 <= self.refit < 0.5:
            raise ValueError(f"refit must be in [0, 0.5), got {self.refit!r}")
        if not 0.0 <= self.mask_augment < 1.0:
            raise ValueError(f"mask_augment must be in [0, 1), got {self.mask_augment!r}")
        if not 0.05 <= self.holdout <= 0.5:
            raise ValueError(f"holdout must be in [0.05, 0.5], got {self.holdout!r}")
        if self.holdout_split not in HOLDOUT_SPLITS:
            raise ValueError(
                f"holdout_split must be one of {HOLDOUT_SPLITS}, got {self.holdout_split!r}"
            )


@dataclass
class FitSummary:
    flows: int
    train_flows: int
    calibration_flows: int
    features: int
    inputs: int
    seconds: float
    seconds_per_epoch: float
    final_noise_loss: float
    final_time_loss: float
    config: dict = field(default_factory=dict)
    refit_removed: int = 0
    fine_tuned_from: dict = field(default_factory=dict)  # the init model (quietwire train --init)


class DiffusionDetector:
    """fit(X) on benign raw features; score(X); ``threshold_`` by false-positive rate."""

    def __init__(self, config: TrainConfig | None = None) -> None:
        self.config = config or TrainConfig()
        self.schedule = NoiseSchedule(self.config.steps)
        self.preprocessor: Preprocessor | None = None
        self.denoiser: Denoiser | None = None
        self.dte: Denoiser | None = None
        self.threshold_: dict[float, float] = {}
        self.noise_reference_ = 1.0  # median training error at contribution_steps (dte_noise)
        self.calibration_scores_ = np.zeros(0, dtype=np.float32)
        self.summary_: FitSummary | None = None
        g = torch.Generator().manual_seed(self.config.seed + 1)
        self.noise_vectors: torch.Tensor | None = None  # (K, inputs), fixed at fit
        self._noise_gen = g

    # ---- fitting -----------------------------------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        progress: Callable[[str, int, int], None] | None = None,
        init: DiffusionDetector | None = None,
    ):
        """Fit on benign raw features (n, F); hold out part of them to calibrate. With
        ``init`` (a fitted detector of the same architecture and score): fine-tune, starting
        from its networks, with its preprocessing and fixed noise kept."""
        cfg = self.config
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) < 50:
            raise TrainingError(f"need at least 50 benign flows to train, got {len(x)}")
        if init is not None:
            _check_init(init, cfg, x.shape[1])
        started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        n_cal = max(int(len(x) * cfg.holdout), 20)
        if cfg.holdout_split == "last":  # x comes in reading order: the last are the latest
            order = np.r_[np.arange(len(x) - n_cal, len(x)), rng.permutation(len(x) - n_cal)]
        else:
            order = rng.permutation(len(x))
        cal, train = x[order[:n_cal]], x[order[n_cal:]]
        epochs, loss_n, loss_t = self._fit_networks(train, progress, init)
        removed = 0
        if cfg.refit:
            # Robust training: the flows the first model finds least benign are likelier
            # contamination than benign; fit again without them.
            scores = self.score(train)[0]
            keep = scores <= np.quantile(scores, 1.0 - cfg.refit, method="lower")
            removed = int((~keep).sum())
            train = train[keep]
            more, loss_n, loss_t = self._fit_networks(train, progress, init)
            epochs += more
        seconds = time.perf_counter() - started
        self.calibrate(cal)
        self.summary_ = FitSummary(
            flows=len(x),
            train_flows=len(train),
            calibration_flows=len(cal),
            features=x.shape[1],
            inputs=self.preprocessor.n_inputs,
            seconds=round(seconds, 2),
            seconds_per_epoch=round(seconds / epochs, 4),
            final_noise_loss=round(loss_n, 4),
            final_time_loss=round(loss_t, 4),
            config={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
            refit_removed=removed,
        )
        return self

    def _fit_networks(self, train: np.ndarray, progress, init=None) -> tuple[float, float, float]:
        """Preprocessing and both networks on ``train`` (from ``init``'s when given); (epochs
        of both networks together, final losses)."""
        cfg = self.config
        # Fine-tuning keeps the preprocessing: the networks' weights are functions of inputs
        # on its scale (a refit would move every input under them).
        self.preprocessor = Preprocessor.fit(train) if init is None else init.preprocessor
        inputs = torch.from_numpy(self.preprocessor.transform(train))
        d = inputs.shape[1]
        if init is None:
            self.noise_vectors = torch.randn(
                (len(cfg.noise_steps) + len(cfg.contribution_steps), d), generator=self._noise_gen
            )
        else:
            self.noise_vectors = init.noise_vectors.clone()
        gen = torch.Generator().manual_seed(cfg.seed)
        self.denoiser = Denoiser(d, d, cfg.width, cfg.depth, cfg.time_dim, cfg.steps)
        self.dte = Denoiser(d, cfg.dte_bins, cfg.width, cfg.depth, cfg.time_dim, cfg.steps)
        if init is not None:
            self.denoiser.load_state_dict(init.denoiser.state_dict())
            if init.dte is not None:  # a "noise" model's file has none (its score needs none)
                self.dte.load_state_dict(init.dte.state_dict())

        def denoise_loss(batch):
            return noise_loss(self.denoiser, self.schedule, batch, gen)

        def dte_loss(batch):
            return time_loss(self.dte, self.schedule, batch, cfg.dte_max_step, cfg.dte_bins, gen)

        per_epoch = max(1, -(-len(inputs) // cfg.batch_size))
        steps = max(cfg.train_steps, per_epoch)
        weights = host_weights(train, cfg.host_balance, cfg.server_balance)
        args = (inputs, weights, steps, gen)
        loss_n = self._train(self.denoiser, denoise_loss, *args, "denoiser", progress)
        loss_t = self._train(self.dte, dte_loss, *args, "time estimator", progress)
        with torch.no_grad():
            k = len(cfg.noise_steps)
            train_err = self._noise_error(inputs, cfg.contribution_steps, self.noise_vectors[k:])
        self.noise_reference_ = float(train_err.mean(1).median())
        return 2 * steps / per_epoch, loss_n, loss_t

    def _train(self, model, loss_fn, inputs, weights, steps, gen, name, progress) -> float:
        cfg = self.config
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        warmup = steps // 10
        model.train()
        recent = []
        n = len(inputs)
        perm = torch.randperm(n, generator=gen)
        pos = 0
        for step in range(steps):
            if weights is not None:
                batch = inputs[torch.multinomial(weights, cfg.batch_size, True, generator=gen)]
            else:
                if pos + cfg.batch_size > n:
                    perm, pos = torch.randperm(n, generator=gen), 0
                batch = inputs[perm[pos : pos + cfg.batch_size]]
                pos += cfg.batch_size
            if cfg.mask_augment:
                missing = random_missing(len(batch), len(self.preprocessor.center), cfg, gen)
                batch = self.preprocessor.as_missing(batch, missing)
            losses = loss_fn(batch)
            if cfg.trim and step >= warmup:
                # Contaminated benign data: the worst-explained samples are likelier attacks.
                keep = max(1, int(round(len(losses) * (1 - cfg.trim))))
                losses = torch.topk(losses, keep, largest=False).values
            loss = losses.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            recent.append(loss.item())
            if progress and (step % 50 == 0 or step == steps - 1):
                progress(name, step + 1, steps)
        model.eval()
        return float(np.mean(recent[-50:]))

    def calibrate(self, benign: np.ndarray) -> None:
        """Thresholds at FPR_LEVELS and the score distribution of held-out benign flows."""
        scores = np.sort(self.score(benign)[0])
        self.threshold_ = {}
        for fpr in FPR_LEVELS:
            # With fewer than 1/fpr flows the highest benign score is the best estimate.
            self.threshold_[fpr] = float(np.quantile(scores, 1.0 - fpr, method="higher"))
        if len(scores) > MAX_CALIBRATION_POINTS:
            idx = np.linspace(0, len(scores) - 1, MAX_CALIBRATION_POINTS).round().astype(int)
            scores = scores[idx]
        self.calibration_scores_ = scores.astype(np.float32)

    # ---- scoring -----------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.preprocessor is None:
            raise TrainingError("the detector is not fitted")

    @torch.no_grad()
    def score(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n,), per-feature contributions (n, F)) for raw features."""
        self._check_fitted()
        inputs = torch.from_numpy(self.preprocessor.transform(np.asarray(x, np.float32)))
        cfg = self.config
        k = len(cfg.noise_steps)
        contrib = self._noise_error(inputs, cfg.contribution_steps, self.noise_vectors[k:])
        if cfg.score == "dte":
            score = self.expected_step(inputs)
        elif cfg.score == "dte_noise":
            score = self.expected_step(inputs) * contrib.mean(1) / self.noise_reference_
        elif cfg.score == "dte_clean":
            score = self.clean_surprise(inputs, contrib.mean(1))
        else:
            score = self._noise_error(inputs, cfg.noise_steps, self.noise_vectors[:k]).mean(1)
        n_features = len(self.preprocessor.center)
        return score.numpy(), contrib[:, :n_features].numpy()

    def _noise_error(self, inputs, steps, noise) -> torch.Tensor:
        """Squared noise-prediction error per input dimension, averaged over fixed steps."""
        errors = []
        for t, eps in zip(steps, noise):
            tt = torch.full((len(inputs),), t, dtype=torch.long)
            pred = self.denoiser(self.schedule.noisy(inputs, tt, eps.expand_as(inputs)), tt)
            errors.append((pred - eps) ** 2)
        return torch.stack(errors).mean(0)

    def expected_step(self, inputs: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        logits = self.dte(inputs, torch.zeros(len(inputs), dtype=torch.long))
        centers = (torch.arange(cfg.dte_bins, dtype=torch.float32) + 0.5) * (
            cfg.dte_max_step / cfg.dte_bins
        )
        return torch.softmax(logits, dim=1) @ centers

    def clean_bins(self) -> int:
        """dte_clean: how many of the DTE classifier's first bins are the clean steps."""
        cfg = self.config
        return round(cfg.dte_clean_step * cfg.dte_bins / cfg.dte_max_step)

    def clean_surprise(self, inputs: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """dte_clean: -log P(clean | x) + weight * log(max(error / its training median, 1)),
        with ``error`` the mean denoiser error at contribution_steps (n,)."""
        logits = self.dte(inputs, torch.zeros(len(inputs), dtype=torch.long))
        k = self.clean_bins()
        # -log P(clean) = softplus(log-odds of not clean): no cancellation for clean inputs
        odds = torch.logsumexp(logits[:, k:], 1) - torch.logsumexp(logits[:, :k], 1)
        surprise = torch.nn.functional.softplus(odds)
        ratio = torch.clamp(error / self.noise_reference_, min=1.0).log()
        return surprise + self.config.dte_clean_noise_weight * ratio

    # ---- generation --------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n synthetic benign flows (raw features) by DDPM ancestral sampling."""
        self._check_fitted()
        return sample_flows(self.denoiser, self.schedule, self.preprocessor, n, seed)


# What a fine-tuned model keeps of the one it starts from: its networks' shapes and its score.
INIT_FIELDS = ("score", "width", "depth", "time_dim", "steps", "dte_max_step", "dte_bins")
INIT_FIELDS += ("noise_steps", "contribution_steps")


def _check_init(init: DiffusionDetector, config: TrainConfig, n_features: int) -> None:
    """A model to fine-tune must be fitted, read the same features and have the networks and
    score ``config`` describes."""
    init._check_fitted()
    if len(init.preprocessor.center) != n_features:
        raise TrainingError(
            f"the initial model reads {len(init.preprocessor.center)} features, the data has "
            f"{n_features}"
        )
    for name in INIT_FIELDS:
        if getattr(init.config, name) != getattr(config, name):
            raise TrainingError(
                f"fine-tuning keeps the initial model's {name} ({getattr(init.config, name)!r}),"
                f" the configuration asks for {getattr(config, name)!r}"
            )


def host_weights(x: np.ndarray, client: int, server: int = 0) -> torch.Tensor | None:
    """Sampling weights of burst balancing (quietwire.agent.site.balance.burst_weights, the one
    rule that calibration uses too) as a tensor, or None when both bounds are off."""
    w = burst_weights(x, client, server)
    return None if w is None else torch.from_numpy(w)


def random_missing(n: int, f: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Mask augmentation's draw (n, f): in half of the rows, each feature with a probability
    drawn uniformly from [0, cfg.mask_augment) for that row; the other rows keep every one."""
    share = torch.rand(n, 1, generator=gen) * cfg.mask_augment
    share = share * (torch.rand(n, 1, generator=gen) < 0.5)
    return torch.rand(n, f, generator=gen) < share


@torch.no_grad()
def sample_flows(
    denoiser: Denoiser, schedule: NoiseSchedule, prep: Preprocessor, n: int, seed: int = 0
) -> np.ndarray:
    """DDPM ancestral sampling from pure noise to model inputs, then back to raw features.

    Each step predicts the clean input, clips it to the range training data can have (the
    standard "clip denoised" of DDPM implementations; without it a small error at high
    noise compounds over a thousand steps), and samples the posterior q(x_{t-1} | x_t, x_0).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, prep.n_inputs), generator=gen)
    betas, alphas = schedule.betas.float(), schedule.alphas.float()
    abar = schedule.alpha_bar.float()
    abar_prev = torch.cat([torch.ones(1), abar[:-1]])
    for t in range(schedule.steps - 1, -1, -1):
        eps = denoiser(x, torch.full((n,), t, dtype=torch.long))
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-CLIP, CLIP)
        mean = (betas[t] * abar_prev[t].sqrt() * x0 + (1 - abar_prev[t]) * alphas[t].sqrt() * x) / (
            1 - abar[t]
        )
        if t > 0:
            var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
            x = mean + var.sqrt() * torch.randn(x.shape, generator=gen)
        else:
            x = mean
    return prep.inverse(x.numpy())
