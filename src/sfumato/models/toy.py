"""A small MLP that predicts the noise of 2-D (or any low-dimensional) data: the seed example of diffusion."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ToyConfig:
    dim: int = 2  # data dimension
    hidden: int = 128  # width of every hidden layer
    depth: int = 3  # number of hidden layers
    time_dim: int = 32  # size of the sinusoidal timestep embedding
    num_timesteps: int = 1000  # T of the training schedule; sets the embedding's longest period


TOY_PRESETS: dict[str, ToyConfig] = {"small": ToyConfig(), "large": ToyConfig(hidden=256, depth=4)}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (fractional) timesteps (Vaswani et al. 2017, §3.5):
    (B,) -> (B, dim) as [cos(t·f_i), sin(t·f_i)] with f_i = max_period^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ToyMLP(nn.Module):
    """model(x_t, t) -> prediction, x_t (B, dim), t (B,) in [0, T)."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        c = config
        self.time_mlp = nn.Sequential(
            nn.Linear(c.time_dim, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden)
        )
        self.inp = nn.Linear(c.dim, c.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(c.hidden), nn.Linear(c.hidden, c.hidden), nn.SiLU())
            for _ in range(c.depth)
        )
        self.out = nn.Linear(c.hidden, c.dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        h = self.inp(x) + self.time_mlp(timestep_embedding(t, self.config.time_dim))
        for block in self.blocks:
            h = h + block(h)  # pre-norm residual MLP
        return self.out(h)
