"""A Gaussian mixture and its exact denoiser: the ground truth samplers are measured against.

If x0 ~ Σ_k π_k N(μ_k, Σ_k) and x = x0 + σ ε, then x ~ Σ_k π_k N(μ_k, Σ_k + σ² I) and the optimal
denoiser (the posterior mean, Tweedie / Bayes) is

    E[x0 | x] = Σ_k w_k(x) (μ_k + Σ_k (Σ_k + σ² I)⁻¹ (x - μ_k)),  w_k(x) ∝ π_k N(x; μ_k, Σ_k + σ² I).

A sampler driven by this denoiser has no network error, so what remains is its discretisation error.
"""

from __future__ import annotations

import math

import torch


class GaussianMixture:
    """K Gaussians in d dimensions: ``means`` (K, d), ``covs`` (K, d, d), ``weights`` (K,). float64."""

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        K, d = self.means.shape
        if self.covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape {(K, d, d)}, got {tuple(self.covs.shape)}")
        w = (
            torch.full((K,), 1 / K, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights).double()
        )
        self.weights = w / w.sum()

    @classmethod
    def random(cls, K: int = 4, d: int = 2, spread: float = 2.0, seed: int = 0) -> GaussianMixture:
        """Well-separated random components with random anisotropic covariances (deterministic by seed)."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(K, d, generator=g, dtype=torch.float64)
        a = 0.4 * torch.randn(K, d, d, generator=g, dtype=torch.float64)
        covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64)
        weights = 0.5 + torch.rand(K, generator=g, dtype=torch.float64)
        return cls(means, covs, weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        """Law of total covariance: Σ_k π_k (Σ_k + μ_k μ_kᵀ) - m mᵀ."""
        m = self.mean()
        second = torch.einsum(
            "k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None]
        )
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        chol = torch.linalg.cholesky(self.covs)  # (K, d, d)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (chol[k] @ z[:, :, None]).squeeze(-1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """E[x0 | x0 + σ ε = x] for x (B, d) and σ scalar or (B,), computed in float64, returned in x.dtype."""
        xd = x.double()
        B, d = xd.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float64).to(x.device).expand(B)  # (B,)
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        covs, means = self.covs.to(x.device), self.means.to(x.device)
        noisy = covs[None] + sigma[:, None, None, None] ** 2 * eye  # (B, K, d, d)
        chol = torch.linalg.cholesky(noisy)
        diff = (xd[:, None, :] - means[None]).unsqueeze(-1)  # (B, K, d, 1)
        sol = torch.cholesky_solve(diff, chol)  # (Σ_k + σ² I)⁻¹ (x - μ_k), (B, K, d, 1)
        maha = (diff * sol).sum((-2, -1))  # (B, K)
        logdet = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # (B, K)
        log_w = self.weights.to(x.device).log() - 0.5 * (maha + logdet + d * math.log(2 * math.pi))
        w = torch.softmax(log_w, dim=1)  # (B, K)
        post = means[None] + (covs[None] @ sol).squeeze(-1)  # (B, K, d)
        return (w[:, :, None] * post).sum(1).to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self.denoise(x, sigma)
