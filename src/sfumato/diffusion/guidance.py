"""Guidance: functions that take a denoiser and return a denoiser (ARCHITECTURE.md, "Guidance").

Classifier-free guidance (Ho & Salimans 2022, eq. (6)) extrapolates from the unconditional prediction
towards the conditional one, D = D_u + w (D_c - D_u). Stable Diffusion pipelines apply it to the
network's eps; on the denoised x0 it is the same thing, because x0 = x - σ·eps (and x0 for v-prediction)
is affine in the network output with coefficients that do not depend on the condition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[..., torch.Tensor]


def classifier_free_guidance(
    denoiser: Denoiser,
    scale: float,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
) -> Denoiser:
    """The guided denoiser ``x, σ -> D_u + scale (D_c - D_u)``, both passes in one batch.

    cond / uncond: keyword arguments of ``denoiser`` (e.g. ``{"context": (B, T, D)}``) for the conditional
    and the unconditional pass, with matching shapes. The batch is ordered [uncond; cond] as diffusers'
    pipelines order it (float32 results do not depend on it, but half precision may). ``scale == 1`` is
    plain conditional sampling and skips the unconditional pass.
    """
    if scale == 1:
        return lambda x, sigma: denoiser(x, sigma, **cond)
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond take different arguments: {sorted(cond)} vs {sorted(uncond)}")
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}  # 2 x (B, ...) -> (2B, ...)

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        sigma2 = torch.cat([sigma, sigma]) if sigma.ndim else sigma
        d_uncond, d_cond = denoiser(torch.cat([x, x]), sigma2, **both).chunk(2)  # (2B, ...) -> 2 x (B, ...)
        return d_uncond + scale * (d_cond - d_uncond)

    return guided


def static_thresholding(denoiser: Denoiser, limit: float = 1.0) -> Denoiser:
    """The denoiser whose x0 predictions are clamped to [-limit, limit], the data range (Ho et al. 2020
    clip the predicted x0 to [-1, 1] when sampling pixels; Saharia et al. 2022 call it static thresholding)."""
    return lambda x, sigma, **cond: denoiser(x, sigma, **cond).clamp(-limit, limit)


def dynamic_thresholding(denoiser: Denoiser, percentile: float = 0.995, max_value: float | None = None) -> Denoiser:
    """The denoiser with Imagen's dynamic thresholding of its x0 predictions (Saharia et al. 2022, sec. 2.3).

    Per image: s = the `percentile` quantile of |x0| over all its pixels and channels, clamped to
    [1, max_value]; x0 becomes clamp(x0, -s, s) / s. So an image whose values mostly stay within [-1, 1] is
    clamped there (static thresholding), and one that guidance pushed further out is shrunk back into it
    instead of saturating. max_value=None leaves s unbounded above (diffusers' `sample_max_value` bounds it).
    """
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile must be in (0, 1] (diffusers' default is 0.995), got {percentile}")
    if max_value is not None and not max_value >= 1:
        raise ValueError(f"max_value must be >= 1 (or None for no bound), got {max_value}")

    def thresholded(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        x0 = denoiser(x, sigma, **cond)
        y = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()  # quantile needs float32/64
        s = torch.quantile(y.reshape(y.shape[0], -1).abs(), percentile, dim=1)  # (B, C*H*W) -> (B,)
        s = s.clamp(min=1.0, max=max_value).view(-1, *[1] * (y.ndim - 1))  # (B, 1, 1, 1)
        return (torch.clamp(y, -s, s) / s).to(x0.dtype)

    return thresholded
