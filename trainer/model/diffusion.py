"""The diffusion model: noise schedule, denoiser network, training losses. Short on purpose.

- ``NoiseSchedule``: DDPM's linear beta schedule and the closed-form forward process
  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).
- ``Denoiser``: a residual MLP over the feature vector with a sinusoidal timestep embedding.
  With ``out_dim == n_inputs`` it predicts the noise (DDPM); with ``out_dim == n_bins`` it
  classifies how much noise an input carries (Diffusion Time Estimation, Livernoche et al.,
  ICLR 2024).
- ``noise_loss`` / ``time_loss``: per-sample losses, so training can trim the worst ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NoiseSchedule:
    """Linear betas from beta_start to beta_end over ``steps`` diffusion steps."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.steps = steps
        self.betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)

    def noisy(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t for integer steps t (0-based: t=0 is one step of noise)."""
        ab = self.alpha_bar.to(x0.dtype)[t].unsqueeze(-1)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def timestep_embedding(t: torch.Tensor, dim: int, steps: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) steps, as in the transformer/DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = (t.float() * (1000.0 / steps)).unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h))))


class Denoiser(nn.Module):
    """Residual MLP: input projection + time projection, ``depth`` blocks, output head."""

    def __init__(
        self,
        n_inputs: int,
        out_dim: int,
        width: int = 128,
        depth: int = 3,
        time_dim: int = 32,
        steps: int = 1000,
    ) -> None:
        super().__init__()
        self.time_dim, self.steps = time_dim, steps
        self.inp = nn.Linear(n_inputs, width)
        self.time = nn.Linear(time_dim, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.time(timestep_embedding(t, self.time_dim, self.steps))
        for block in self.blocks:
            h = block(h)
        return self.out(nn.functional.silu(self.norm(h)))


def noise_loss(
    model: Denoiser, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample DDPM loss: mean squared error of the predicted noise at a random step."""
    t = torch.randint(0, schedule.steps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    pred = model(schedule.noisy(x0, t, noise), t)
    return ((pred - noise) ** 2).mean(dim=1)


def time_loss(
    model: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    max_step: int,
    n_bins: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-sample DTE loss: cross-entropy of the step bin of a noised sample. Step 0 is
    trained on the clean input, so benign flows are told apart from noise-free ones."""
    t = torch.randint(0, max_step, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    noisy = torch.where((t == 0).unsqueeze(-1), x0, schedule.noisy(x0, t, noise))
    bins = (t * n_bins) // max_step
    logits = model(noisy, torch.zeros_like(t))
    return nn.functional.cross_entropy(logits, bins, reduction="none")
