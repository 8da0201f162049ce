"""Distances between sets of samples."""

from __future__ import annotations

import torch


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, n_projections: int = 256, seed: int = 0, n_quantiles: int = 512
) -> float:
    """Sliced 2-Wasserstein distance between point sets a (N, d) and b (M, d).

    SW₂² = E_θ W₂²(θᵀa, θᵀb) over random unit directions θ (Bonneel et al. 2015); each 1-D W₂ compares
    the two empirical quantile functions at ``n_quantiles`` levels, so N and M may differ. Directions are
    drawn from ``seed``, so two calls with the same seed compare like with like.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected two (N, d) point sets of equal d, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    q = (torch.arange(n_quantiles, dtype=torch.float64) + 0.5) / n_quantiles
    pa = torch.quantile(a.double().cpu() @ theta, q, dim=0)  # (Q, P)
    pb = torch.quantile(b.double().cpu() @ theta, q, dim=0)
    return float((pa - pb).pow(2).mean().sqrt())
