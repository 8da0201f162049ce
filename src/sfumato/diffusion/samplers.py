"""Samplers: pure functions ``sample_x(denoiser, x, sigmas, *, generator=None, callback=None) -> x0``.

``denoiser(x, sigma) -> x0_hat`` acts on the variance-exploding sample ``x = x0 + sigma * eps``; ``x`` starts
as ``noise * sigmas[0]``; ``sigmas`` is descending and normally ends in 0. Nothing here knows about text,
images or networks (conditioning is bound into the denoiser, e.g. with ``functools.partial``).

The probability-flow ODE of this process is dx/dσ = (x - D(x, σ)) / σ (Karras et al. 2022, eq. (3) with
σ(t) = t); DDIM is exactly its Euler discretisation, and DDPM's ancestral step is the exact posterior
q(x_σ' | x_σ, x0 = D(x, σ)) of the Brownian motion x_σ (a bridge).

Random numbers are drawn from ``generator`` on its own device (the CPU for a CPU generator) and moved to
``x``'s device, so a seed gives the same samples on every device. ``callback`` receives a dict with the
step index ``i``, ``x``, ``sigma``, ``sigma_next`` and ``denoised`` after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict], None] | None


def randn_like(
    x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device and moved to ``x``'s.

    A sequence of generators, one per batch row, draws each row from its own generator (so every image of a
    batch can be reproduced alone from its seed, as with diffusers' list of generators)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per row")
        return torch.cat([randn_like(x[i : i + 1], g) for i, g in enumerate(generator)])  # B x (1, ...)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _levels(sigmas: torch.Tensor) -> list[float]:
    """σ ladder as Python floats (the schedule's float64 values), checked to be descending and non-negative."""
    levels = [float(s) for s in torch.as_tensor(sigmas).flatten()]
    if len(levels) < 2:
        raise ValueError(f"sigmas needs at least 2 levels (start and end), got {len(levels)}")
    if any(b >= a for a, b in zip(levels, levels[1:])) or levels[-1] < 0:
        raise ValueError(f"sigmas must be strictly descending and >= 0, got {levels[:4]}...{levels[-2:]}")
    return levels


def _call(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))


def _report(callback: Callback, i: int, x, sigma: float, sigma_next: float, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def _ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step σ → σ' into a deterministic part to σ_down and fresh noise of std σ_up with
    σ_down² + σ_up² = σ'². With η = 1, σ_up² = σ'²(σ² - σ'²)/σ² is the variance of the posterior of the
    noising process (DDPM's β̃, Ho et al. 2020, eq. (7)); η scales it as in DDIM (Song et al. 2021, eq. (16))."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator=None, callback: Callback = None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _call(denoiser, x, sigma)
        d = (x - denoised) / sigma  # dx/dσ
        x = x + d * (sigma_next - sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    eta: float = 0.0,
    generator=None,
    callback: Callback = None,
):
    """DDIM (Song et al. 2021, eq. (12)), written as in the paper on the variance-preserving sample.

    With η = 0 this is the deterministic DDIM sampler (the same numbers as :func:`sample_euler`); with η = 1 it
    is ancestral DDPM sampling. Noise is drawn at every step when η > 0 (as diffusers' ``DDIMScheduler`` does).
    """
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _call(denoiser, x, sigma)
        eps = (x - denoised) / sigma
        ac, ac_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)  # ᾱ_t, ᾱ_{t-1}
        # σ_t(η) of eq. (16): η · sqrt((1-ᾱ_{t-1})/(1-ᾱ_t)) · sqrt(1 - ᾱ_t/ᾱ_{t-1})
        std = eta * math.sqrt((1 - ac_next) / (1 - ac) * (1 - ac / ac_next))
        x_next = math.sqrt(ac_next) * denoised + math.sqrt(1 - ac_next - std**2) * eps  # eq. (12), VP sample
        if eta > 0:
            x_next = x_next + std * randn_like(x, generator)
        x = x_next / math.sqrt(ac_next)  # VP -> VE
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator=None, callback: Callback = None):
    """Ancestral sampling, Ho et al. 2020, Algorithm 2, on any descending sub-ladder of the training levels.

    x_{t-1} = 1/sqrt(α_t) · (x_t - β_t / sqrt(1 - ᾱ_t) · ε̂) + σ_t z with σ_t² = β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t,
    where α_t = ᾱ_t/ᾱ_{t-1} between consecutive levels of the ladder; z = 0 on the last step (σ' = 0).
    """
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _call(denoiser, x, sigma)
        eps = (x - denoised) / sigma
        ac, ac_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        alpha, beta = ac / ac_next, 1 - ac / ac_next
        x_t = x * math.sqrt(ac)  # VE -> VP
        x_prev = (x_t - beta / math.sqrt(1 - ac) * eps) / math.sqrt(alpha)
        if sigma_next > 0:
            x_prev = x_prev + math.sqrt((1 - ac_next) / (1 - ac) * beta) * randn_like(x, generator)
        x = x_prev / math.sqrt(ac_next)  # VP -> VE
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    eta: float = 1.0,
    generator=None,
    callback: Callback = None,
):
    """Euler step to σ_down, then fresh noise of std σ_up (see :func:`_ancestral_step`); with η = 1 each step
    samples the same posterior as DDPM (k-diffusion's ``sample_euler_ancestral``)."""
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _call(denoiser, x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + randn_like(x, generator) * sigma_up
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator=None, callback: Callback = None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn): an Euler predictor and a
    trapezoidal corrector; the last step into σ = 0 is plain Euler. 2n - 1 evaluations for n steps."""
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _call(denoiser, x, sigma)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            d_next = (x_pred - _call(denoiser, x_pred, sigma_next)) / sigma_next
            x = x + (d + d_next) / 2 * dt
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator=None, callback: Callback = None
):
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095), Algorithm 2, in λ = -log σ.

    x_{i+1} = (σ_{i+1}/σ_i) x_i - (e^{-h_i} - 1) D_i with the multistep estimate
    D_i = (1 + 1/(2 r_i)) x̂0_i - 1/(2 r_i) x̂0_{i-1}, r_i = h_{i-1}/h_i; first order on the first step and
    on the step into σ = 0.
    """
    levels = _levels(sigmas)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _call(denoiser, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)  # λ_{i+1} - λ_i
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def invert_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator=None, callback: Callback = None):
    """Deterministic DDIM inversion x0 → x_T (Song et al. 2021, §4.3; Dhariwal & Nichol 2021, eq. (13)).

    ``sigmas`` is the same descending ladder the sampler would use; inversion walks it backwards, from
    ``x`` at ``sigmas[-1]`` (0 for a clean image) to ``sigmas[0]``, returning the VE sample there (divide
    by ``sigmas[0]`` for unit-variance noise). Each step reuses DDIM's update in reverse,
    x' = x + (σ' - σ) ε̂, with ε̂ the network's noise estimate for the current sample taken at the *next*
    level σ' (the usual approximation ε(x_t, t+1) ≈ ε(x_t, t), as in diffusers' ``DDIMInverseScheduler``).
    """
    levels = _levels(sigmas)[::-1]
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        # present the current variance-preserving sample to the denoiser as if it sat at level σ'
        x_in = x * math.sqrt((1 + sigma_next**2) / (1 + sigma**2))
        denoised = _call(denoiser, x_in, sigma_next)
        eps = (x_in - denoised) / sigma_next
        x = x + (sigma_next - sigma) * eps
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
