"""Step plans: the σ ladder, start scale and timestep mapping with which each sampler name reproduces the
diffusers scheduler of that name on a bundle's training schedule (`ScheduleConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sfumato.checkpoints.bundle import ScheduleConfig
from sfumato.diffusion.samplers import SAMPLERS
from sfumato.diffusion.schedules import (
    DiscreteSchedule,
    append_zero,
    karras_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
    sampling_sigmas,
    timesteps,
)

# samplers whose diffusers scheduler keeps x variance-preserving and starts from unit noise
_VP_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")


def discrete_schedule(config: ScheduleConfig, interpolation: str = "log") -> DiscreteSchedule:
    """The training schedule of a bundle as a σ(t) table."""
    if config.beta_schedule in ("cosine", "squaredcos_cap_v2"):
        betas = make_betas(config.beta_schedule, config.num_timesteps)
    else:
        betas = make_betas(
            config.beta_schedule, config.num_timesteps, beta_start=config.beta_start, beta_end=config.beta_end
        )
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return DiscreteSchedule.from_betas(betas, interpolation)


@dataclass
class StepPlan:
    """How one sampler walks a schedule: the σ ladder, and how unit noise becomes the first sample."""

    sigmas: torch.Tensor  # (steps + 1,) float64, descending; ends at 0, or at σ(t=0) for DDIM
    start_scale: float  # x_VE = unit noise * start_scale at sigmas[0] (see the module docstring)
    schedule: DiscreteSchedule  # maps the ladder's σ back to the timesteps the network sees
    quantize: bool  # feed the network rounded timesteps (diffusers' DPM-Solver with Karras σ)


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def plan_steps(config: ScheduleConfig, sampler: str, steps: int, karras: bool = False) -> StepPlan:
    """The σ ladder diffusers' scheduler for `sampler` would walk with this schedule config.

    ddim -> DDIMScheduler (set_alpha_to_one=False: the last step lands on ᾱ_0, not 1); ddpm -> DDPMScheduler;
    euler / euler_ancestral / heun -> the *DiscreteScheduler of that name (σ interpolated linearly in t,
    Karras σ with log-σ interpolation); dpmpp_2m -> DPMSolverMultistepScheduler (its "leading" spacing
    divides T into steps + 1 intervals; with Karras σ the ladder spans the whole schedule).
    """
    check_sampler(sampler)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if karras and sampler in ("ddim", "ddpm"):
        raise ValueError(f"karras=True is not defined for {sampler}; use euler, euler_ancestral, heun or dpmpp_2m")
    spacing, offset = config.timestep_spacing, config.steps_offset
    schedule = discrete_schedule(config, "log" if karras or sampler in _VP_SAMPLERS else "linear")
    T = schedule.num_timesteps
    if sampler == "ddim":
        sigmas = sampling_sigmas(schedule, steps, spacing=spacing, steps_offset=offset, final="sigma_min")
    elif sampler == "dpmpp_2m" and karras:
        sigmas = append_zero(karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max))
    elif sampler == "dpmpp_2m" and spacing == "leading":
        sigmas = append_zero(schedule.t_to_sigma(timesteps(steps + 1, T, spacing, offset)[:-1]))
    else:
        kind = "karras" if karras else "discrete"
        sigmas = sampling_sigmas(schedule, steps, spacing=spacing, steps_offset=offset, kind=kind)
    sigma0 = float(sigmas[0])
    if sampler in _VP_SAMPLERS or spacing == "leading":
        start = math.sqrt(1 + sigma0**2)
    else:
        start = sigma0
    return StepPlan(sigmas, start, schedule, quantize=karras and sampler == "dpmpp_2m")


def resolve_karras(sampler: str, karras: bool | None) -> bool:
    """Karras σ unless asked otherwise, for the samplers that have them; ddim and ddpm walk their own ladder
    (so that `generate(..., sampler="ddim")` works without `karras=False`)."""
    return sampler not in ("ddim", "ddpm") if karras is None else karras
