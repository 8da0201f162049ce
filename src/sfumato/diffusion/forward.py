"""The forward (noising) process of Ho et al. 2020, both ways.

- one Markov step, eq. (2): q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I);
- the closed form, eq. (4): q(x_t | x0) = N(sqrt(ᾱ_t) x0, (1 - ᾱ_t) I);
- the posterior, eqs. (6)-(7): q(x_{t-1} | x_t, x0) = N(μ̃_t, β̃_t I).
Timesteps are 0-based indices into ``betas`` / ``alphas_cumprod`` (t = 0 is the first noising step).
"""

from __future__ import annotations

import torch


def _at(v: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """Schedule values at timesteps t (int or (B,)), shaped to broadcast against x, in x's dtype."""
    v = v[torch.as_tensor(t, device=v.device).long()]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)).to(x.device, x.dtype)


def q_step(x_prev: torch.Tensor, t, betas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One step of the Markov chain: x_t = sqrt(1 - β_t) x_{t-1} + sqrt(β_t) ε."""
    beta = _at(betas, t, x_prev)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise


def q_sample(x0: torch.Tensor, t, alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Jump straight to step t: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
    ac = _at(alphas_cumprod, t, x0)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


def q_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, t, betas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ̃_t and variance β̃_t of q(x_{t-1} | x_t, x0) for t >= 1 (eq. (7))."""
    ac = torch.cumprod(1 - betas.double(), 0)
    ac_t, ac_prev, beta = _at(ac, t, x0), _at(ac, torch.as_tensor(t) - 1, x0), _at(betas, t, x0)
    mean = (ac_prev.sqrt() * beta / (1 - ac_t)) * x0 + ((1 - beta).sqrt() * (1 - ac_prev) / (1 - ac_t)) * x_t
    return mean, (1 - ac_prev) / (1 - ac_t) * beta
