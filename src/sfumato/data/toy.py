"""Two-dimensional data sets for watching diffusion work, scaled to roughly unit variance."""

from __future__ import annotations

import math

import torch

from ..diffusion.mixture import GaussianMixture


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """The 2-D Swiss roll: angle θ ~ U(1.5π, 4.5π), point θ·(cos θ, sin θ), scaled by 1/8 (Sohl-Dickstein et
    al. 2015 used its 3-D sibling)."""
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    x = torch.stack([theta * theta.cos(), theta * theta.sin()], 1) / 8
    return x + noise * torch.randn(n, 2, generator=generator)


def moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """Two interleaved half circles, centred and scaled."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = math.pi * torch.rand(n, generator=generator)
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.4
    return pts + noise * torch.randn(n, 2, generator=generator)


def gaussian_mixture(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eight Gaussians on a circle of radius 1.5 (std 0.1 each): the classic mode-coverage test."""
    angles = torch.arange(8) * (2 * math.pi / 8)
    means = 1.5 * torch.stack([angles.cos(), angles.sin()], 1)
    covs = 0.01 * torch.eye(2).expand(8, 2, 2)
    return GaussianMixture(means, covs).sample(n, generator).float()


TOY_DATASETS = {"swiss-roll": swiss_roll, "moons": moons, "gaussian-mixture": gaussian_mixture}


def toy_data(name: str, n: int, seed: int = 0) -> torch.Tensor:
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {sorted(TOY_DATASETS)}")
    return TOY_DATASETS[name](n, torch.Generator().manual_seed(seed))
