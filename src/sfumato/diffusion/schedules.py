"""Noise schedules: betas, cumulative alphas, sigmas and the spacings samplers walk along.

Discrete-time models (DDPM, Stable Diffusion) are trained on T levels with ᾱ_t = ∏_{s≤t} (1 - β_s). We
sample them in the variance-exploding parametrisation of Karras et al. 2022, where a noisy sample is
``x = x0 + sigma * eps`` and ``sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t)``; the variance-preserving sample of Ho et al.
is ``x_vp = x / sqrt(1 + sigma²)``. Everything derived here is float64 (as improved-diffusion does):
float32 cumulative products lose the small-t end of the schedule.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Spacing = Literal["leading", "trailing", "linspace"]


# --- betas (each returns float64, shape (T,)) -------------------------------------------------------


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, §4: β linear from 1e-4 to 0.02 over T = 1000."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's schedule: linear in sqrt(β) (ldm's "linear" schedule, diffusers' "scaled_linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. (17): ᾱ(t) = cos²(((t/T + s) / (1 + s)) · π/2), β_t = 1 - ᾱ_t/ᾱ_{t-1},
    clipped at ``max_beta`` so the last step stays finite (diffusers' "squaredcos_cap_v2")."""
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [
        min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(name: str, num_timesteps: int = 1000, **kwargs) -> torch.Tensor:
    """Betas by name: "linear", "scaled_linear" or "cosine" (diffusers' "squaredcos_cap_v2" is accepted)."""
    makers = {
        "linear": linear_betas,
        "scaled_linear": scaled_linear_betas,
        "cosine": cosine_betas,
        "squaredcos_cap_v2": cosine_betas,
    }
    if name not in makers:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(makers)}")
    return makers[name](num_timesteps, **kwargs)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so that ᾱ_T = 0 (zero terminal SNR) while
    ᾱ_0 is kept. The last sigma becomes infinite; use it with v-prediction and trailing spacing."""
    sqrt_ac = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)  # sqrt(ᾱ_T) -> 0, sqrt(ᾱ_0) unchanged
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1 - alphas


# --- derived quantities -----------------------------------------------------------------------------


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 - β_s), in float64."""
    return torch.cumprod(1 - betas.double(), 0)


def sigmas_from_alphas_cumprod(ac: torch.Tensor) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): the noise level of x = x0 + σ ε."""
    ac = ac.double()
    return ((1 - ac) / ac).sqrt()


def log_snr(ac: torch.Tensor) -> torch.Tensor:
    """λ_t = log(ᾱ_t / (1 - ᾱ_t)) = -2 log σ_t."""
    ac = ac.double()
    return ac.log() - (-ac).log1p()


def sigma_to_alpha_bar(sigma: torch.Tensor | float) -> torch.Tensor:
    """ᾱ = 1 / (1 + σ²)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / (1 + sigma**2)


class DiscreteSchedule:
    """The T training noise levels of a discrete-time model and the map between timestep t and sigma.

    ``t_to_sigma`` and ``sigma_to_t`` interpolate between integer timesteps by the same rule, so they are
    exact inverses and integer timesteps map to their exact σ. The rule is ``interpolation="log"`` (log σ
    linear in t, as k-diffusion and diffusers' ``_sigma_to_t``) or ``"linear"`` (σ linear in t, as diffusers'
    Euler/Heun place fractional "linspace" timesteps); they differ only between training levels.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, interpolation: Literal["log", "linear"] = "log"):
        if interpolation not in ("log", "linear"):
            raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")
        self.interpolation = interpolation
        ac = alphas_cumprod.double()
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D tensor of T >= 2 levels, got shape {tuple(ac.shape)}"
            )
        if not bool((ac[1:] <= ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing in t")
        if ac[-1] <= 0:
            # zero terminal SNR (Lin et al. 2023) puts σ_T at infinity; a sampler cannot start there, so the
            # last level is nudged to ᾱ = 2^-24 (σ ≈ 4096), the value diffusers uses for the same purpose
            ac = ac.clone()
            ac[-1] = 2.0**-24
        self.alphas_cumprod = ac  # (T,) float64
        self.sigmas = sigmas_from_alphas_cumprod(ac)  # (T,) ascending in t
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(
        cls, betas: torch.Tensor, interpolation: Literal["log", "linear"] = "log"
    ) -> DiscreteSchedule:
        return cls(alphas_cumprod(betas), interpolation)

    @classmethod
    def named(
        cls, name: str = "scaled_linear", num_timesteps: int = 1000, interpolation: str = "log", **kwargs
    ) -> DiscreteSchedule:
        """``DiscreteSchedule.named("scaled_linear")`` is Stable Diffusion's; "linear" is DDPM's."""
        return cls.from_betas(make_betas(name, num_timesteps, **kwargs), interpolation)

    def _table(self) -> torch.Tensor:
        """The per-level values that are interpolated linearly in t: log σ or σ."""
        return self.log_sigmas if self.interpolation == "log" else self.sigmas

    def _to_table(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() if self.interpolation == "log" else sigma

    def _from_table(self, v: torch.Tensor) -> torch.Tensor:
        return v.exp() if self.interpolation == "log" else v

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """σ at (possibly fractional) timesteps. float64."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        table = self._table()
        return self._from_table((1 - w) * table[low] + w * table[low + 1])

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The (fractional) timestep whose σ is ``sigma``; the inverse of ``t_to_sigma``. float64."""
        v = self._to_table(torch.as_tensor(sigma, dtype=torch.float64))
        table = self._table()
        # index of the last training level at or below σ, kept where an interval [low, low+1] exists
        low = (torch.searchsorted(table, v.reshape(-1).contiguous(), right=True) - 1).clamp(0, self.num_timesteps - 2)
        lo, hi = table[low], table[low + 1]
        w = ((v.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        return (low + w).reshape(v.shape)


# --- sampling spacings ------------------------------------------------------------------------------


def timesteps(
    steps: int, num_timesteps: int = 1000, spacing: Spacing = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending sampling timesteps, named as in Lin et al. 2023, Table 2, and diffusers.

    - "leading": t = k·(T // n) + offset, k = n-1 … 0 (Stable Diffusion's configs use offset 1);
    - "trailing": t = round(T - k·T/n) - 1, starting exactly at T-1;
    - "linspace": n points evenly from T-1 to 0, fractional (diffusers' Euler/Heun keep them unrounded).
    Returned as float64.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T = num_timesteps
    if spacing == "leading":
        if steps > T:
            raise ValueError(f"leading spacing needs steps <= {T}, got {steps}")
        t = torch.arange(steps, dtype=torch.float64).flip(0) * (T // steps) + steps_offset
    elif spacing == "trailing":
        t = torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1
    elif spacing == "linspace":
        t = torch.linspace(T - 1, 0, steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose 'leading', 'trailing' or 'linspace'")
    return t


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. (5): σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ. Descending,
    ``steps`` values, no trailing zero (use ``append_zero``)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """σ evenly spaced in log σ (equal steps in log-SNR) from σ_max down to σ_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sampling_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    *,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    kind: Literal["discrete", "karras", "exponential"] = "discrete",
    final: Literal["zero", "sigma_min"] = "zero",
) -> torch.Tensor:
    """The descending σ ladder for ``steps`` model evaluations of a first-order sampler, ending in ``final``.

    "discrete" takes the σ of the spaced timesteps; "karras" and "exponential" respace between the σ of the
    first and last of those timesteps (as diffusers' ``use_karras_sigmas`` does). ``final="zero"`` ends at
    σ = 0 (the clean sample); "sigma_min" ends at σ of t = 0, which is DDIM's ``set_alpha_to_one=False``.
    """
    sigmas = schedule.t_to_sigma(timesteps(steps, schedule.num_timesteps, spacing, steps_offset))
    if kind == "karras":
        sigmas = karras_sigmas(steps, float(sigmas[-1]), float(sigmas[0]))
    elif kind == "exponential":
        sigmas = exponential_sigmas(steps, float(sigmas[-1]), float(sigmas[0]))
    elif kind != "discrete":
        raise ValueError(f"unknown sigma kind {kind!r}; choose 'discrete', 'karras' or 'exponential'")
    if final == "zero":
        return append_zero(sigmas)
    if final == "sigma_min":
        return torch.cat([sigmas, schedule.sigmas[:1]])
    raise ValueError(f"unknown final sigma {final!r}; choose 'zero' or 'sigma_min'")
