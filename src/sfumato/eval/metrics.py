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


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of features (N, d), in float64 on the CPU."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features (N, d) with N >= 2, got shape {tuple(features.shape)}")
    x = features.detach().double().cpu()
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.t() @ centred / (x.shape[0] - 1)  # (d, N) @ (N, d) -> (d, d)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The PSD square root of a symmetric PSD matrix by eigendecomposition; round-off negatives become 0."""
    sym = (matrix + matrix.t()) / 2
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.t()  # V diag(sqrt(l)) V^T


def frechet_distance_gaussians(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """Squared 2-Wasserstein (Fréchet) distance between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982):

        |mu1 - mu2|² + tr(cov1) + tr(cov2) - 2 tr((cov1^½ cov2 cov1^½)^½)

    the quantity FID reports (Heusel et al. 2017). tr((cov1 cov2)^½) is computed as the trace of the square
    root of the symmetric PSD matrix cov1^½ cov2 cov1^½ (same eigenvalues as cov1 cov2), each root by a
    symmetric eigendecomposition in float64, so no complex parts or non-symmetric sqrtm are involved.
    """
    mu1, mu2 = mu1.double().cpu(), mu2.double().cpu()
    cov1, cov2 = cov1.double().cpu(), cov2.double().cpu()
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"expected means (d,) and covariances (d, d) of one d, got {tuple(mu1.shape)}, {tuple(cov1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(cov2.shape)}"
        )
    root1 = _psd_sqrt(cov1)
    inner = root1 @ cov2 @ root1  # symmetric PSD, eigenvalues = those of cov1 @ cov2
    values = torch.linalg.eigvalsh((inner + inner.t()) / 2).clamp(min=0)
    trace_sqrt = values.sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + cov1.trace() + cov2.trace() - 2 * trace_sqrt)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, d) and b (M, d).

    Biased upwards for finite samples (Chong & Forsyth 2020): two samples of one distribution score > 0,
    roughly in proportion to d / N, so only compare values computed with the same N, and report the
    distance between two real samples of that size next to it.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected two (N, d) feature sets of equal d, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return frechet_distance_gaussians(*gaussian_stats(a), *gaussian_stats(b))
