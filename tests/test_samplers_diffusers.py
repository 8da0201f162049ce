"""Our samplers against diffusers' schedulers: the same eps/v network, the same configuration, the same
start and the same noise give the same trajectory (max abs difference <= 1e-4 in float32).

diffusers keeps DDPM/DDIM/DPM-Solver samples variance-preserving and Euler/Heun samples variance-exploding
(REFERENCE-NOTES); we always sample x = x0 + σ ε, so each comparison converts ours into diffusers' space:
x_vp = x / sqrt(1 + σ²). The schedules themselves (timesteps, σ ladders) are built with our functions and
checked against the scheduler's before sampling.
"""

import inspect
import math

import pytest
import torch
from torch import nn

from sfumato.diffusion import samplers as S
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.diffusion.schedules import (
    DiscreteSchedule,
    append_zero,
    karras_sigmas,
    sampling_sigmas,
    timesteps,
)

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
SCHEDULE = DiscreteSchedule.named("scaled_linear")
TOL = 1e-4
# diffusers computes ᾱ in float32, which leaves σ near t = 0 off by up to ~3e-5 relative; ours is float64
SIGMA_RTOL = 5e-5


class TinyNet(nn.Module):
    """A fixed nonlinear function of (x_t, t) standing in for a U-Net; its output is read as eps or v."""

    def __init__(self, channels: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(channels, channels, generator=g) * 0.5)
        self.w2 = nn.Parameter(torch.randn(channels, channels, generator=g) * 0.5)
        self.wt = nn.Parameter(torch.randn(6, channels, generator=g))
        self.register_buffer("freqs", torch.tensor([1 / 8, 1 / 80, 1 / 800]))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        angles = t[:, None] * self.freqs  # (B, 3)
        emb = torch.cat([angles.sin(), angles.cos()], 1) @ self.wt  # (B, C)
        h = torch.einsum("oc,bchw->bohw", self.w1, x) + emb[:, :, None, None]
        return torch.einsum("oc,bchw->bohw", self.w2, torch.tanh(h)) + 0.3 * x


NET = TinyNet()
SHAPE = (2, 4, 8, 8)


def _noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(42))


def _run_diffusers(sched, steps, x_start, *, eta=None, seed=7):
    """The standard diffusers loop; returns the sample after every completed step."""
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x, states = x_start.clone(), []
    for k, t in enumerate(sched.timesteps):
        out = NET(sched.scale_model_input(x, t), t)
        kwargs = {"eta": eta} if eta is not None else {}
        if "generator" in inspect.signature(sched.step).parameters:
            kwargs["generator"] = g
        x = sched.step(out, t, x, **kwargs).prev_sample
        # Heun: a step is complete after its corrector, or after the plain Euler step into σ = 0
        if getattr(sched, "state_in_first_order", True) or k == len(sched.timesteps) - 1:
            states.append(x)
    return states


def _run_ours(sampler, sigmas, x_start_ve, prediction, *, quantize=False, seed=7, schedule=SCHEDULE, **kw):
    den = DiscreteDenoiser(NET, schedule, prediction, quantize=quantize)
    states = []
    sampler(
        den,
        x_start_ve,
        sigmas,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda d: states.append(d["x"]),
        **kw,
    )
    return states


def _compare(ours, theirs, sigmas, vp: bool):
    assert len(ours) == len(theirs)
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if vp:
            a = a / math.sqrt(1 + float(sigmas[i + 1]) ** 2)
        worst = max(worst, (a - b).abs().max().item())
    print(f" max|Δ|={worst:.1e}", end="")
    return worst


STEPS = [10, 25, 50]
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm(steps, prediction, spacing):
    offset = 1 if spacing == "leading" else 0
    sched = diffusers.DDPMScheduler(
        **SD_BETAS,
        clip_sample=False,
        prediction_type=PREDICTIONS[prediction],
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    sched.set_timesteps(steps)
    ts = timesteps(steps, 1000, spacing, offset)
    assert torch.equal(ts.long(), sched.timesteps)
    sigmas = append_zero(SCHEDULE.t_to_sigma(ts))
    x = _noise()  # VP start: x_T = noise
    theirs = _run_diffusers(sched, steps, x)
    ours = _run_ours(S.sample_ddpm, sigmas, x * math.sqrt(1 + float(sigmas[0]) ** 2), prediction)
    assert _compare(ours, theirs, sigmas, vp=True) <= TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(steps, prediction, eta):
    """Stable Diffusion's DDIM configuration: leading spacing, offset 1, final ᾱ = ᾱ_0 (not 1)."""
    sched = diffusers.DDIMScheduler(
        **SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=PREDICTIONS[prediction],
    )
    sigmas = sampling_sigmas(SCHEDULE, steps, spacing="leading", steps_offset=1, final="sigma_min")
    x = _noise()
    theirs = _run_diffusers(sched, steps, x, eta=eta)
    assert torch.equal(timesteps(steps, 1000, "leading", 1).long(), sched.timesteps)
    ours = _run_ours(S.sample_ddim, sigmas, x * math.sqrt(1 + float(sigmas[0]) ** 2), prediction, eta=eta)
    assert _compare(ours, theirs, sigmas, vp=True) <= TOL


def _euler_like(cls, sampler, steps, prediction, spacing, schedule=SCHEDULE, **extra):
    offset = 1 if spacing == "leading" else 0
    sched = cls(
        **SD_BETAS,
        prediction_type=PREDICTIONS[prediction],
        timestep_spacing=spacing,
        steps_offset=offset,
        **extra,
    )
    sched.set_timesteps(steps)
    sigmas = sampling_sigmas(
        schedule,
        steps,
        spacing=spacing,
        steps_offset=offset,
        kind="karras" if extra.get("use_karras_sigmas") else "discrete",
    )
    their_sigmas = sched.sigmas
    if cls is diffusers.HeunDiscreteScheduler:  # [σ0, σ1, σ1, σ2, σ2, …, 0]: the corrector repeats each level
        their_sigmas = torch.cat([their_sigmas[:1], their_sigmas[1::2]])
    assert torch.allclose(sigmas.float(), their_sigmas, rtol=SIGMA_RTOL), "σ ladders differ"
    x = _noise() * sched.init_noise_sigma  # VE start, as diffusers scales it
    theirs = _run_diffusers(sched, steps, x)
    ours = _run_ours(sampler, sigmas, x, prediction, schedule=schedule)
    return _compare(ours, theirs, sigmas, vp=False)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler(steps, prediction, spacing):
    assert _euler_like(diffusers.EulerDiscreteScheduler, S.sample_euler, steps, prediction, spacing) <= TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_linspace_spacing(steps, prediction, sampler):
    """diffusers' default Euler/Heun spacing puts fractional timesteps at σ interpolated linearly in t;
    a schedule built with ``interpolation="linear"`` reproduces it (the default log rule differs slightly)."""
    cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}[sampler]
    linear = DiscreteSchedule.named("scaled_linear", interpolation="linear")
    assert _euler_like(cls, S.SAMPLERS[sampler], steps, prediction, "linspace", schedule=linear) <= TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_karras(steps, prediction):
    err = _euler_like(
        diffusers.EulerDiscreteScheduler, S.sample_euler, steps, prediction, "leading", use_karras_sigmas=True
    )
    assert err <= TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_ancestral(steps, prediction, spacing):
    err = _euler_like(
        diffusers.EulerAncestralDiscreteScheduler, S.sample_euler_ancestral, steps, prediction, spacing
    )
    assert err <= TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_heun(steps, prediction, spacing):
    assert _euler_like(diffusers.HeunDiscreteScheduler, S.sample_heun, steps, prediction, spacing) <= TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m(steps, prediction, karras):
    """DPM-Solver++(2M), diffusers' defaults (midpoint, lower-order final step into σ = 0). Without Karras σ
    its leading spacing divides T into steps + 1 intervals; with them the ladder spans the whole schedule
    and the network sees rounded timesteps."""
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type=PREDICTIONS[prediction],
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=karras,
    )
    sched.set_timesteps(steps)
    if karras:
        sigmas = append_zero(karras_sigmas(steps, SCHEDULE.sigma_min, SCHEDULE.sigma_max))
    else:
        sigmas = append_zero(SCHEDULE.t_to_sigma(timesteps(steps + 1, 1000, "leading", 1)[:-1]))
    assert torch.allclose(sigmas.float(), sched.sigmas, rtol=SIGMA_RTOL), "σ ladders differ"
    x = _noise()
    theirs = _run_diffusers(sched, steps, x)
    ours = _run_ours(
        S.sample_dpmpp_2m, sigmas, x * math.sqrt(1 + float(sigmas[0]) ** 2), prediction, quantize=karras
    )
    assert _compare(ours, theirs, sigmas, vp=True) <= TOL


@pytest.mark.parametrize("steps", STEPS)
def test_ddim_inversion(steps):
    """invert_ddim against DDIMInverseScheduler (eps prediction; SD configuration)."""
    sched = diffusers.DDIMInverseScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )
    sched.set_timesteps(steps)
    x0 = _noise() * 0.5  # a stand-in for a latent image
    theirs = x0.clone()
    for t in sched.timesteps:
        theirs = sched.step(NET(theirs, t), t, theirs).prev_sample
    sigmas = sampling_sigmas(SCHEDULE, steps, spacing="leading", steps_offset=1, final="sigma_min")
    den = DiscreteDenoiser(NET, SCHEDULE, "eps")
    ours = S.invert_ddim(den, x0 * math.sqrt(1 + float(sigmas[-1]) ** 2), sigmas)
    ours_vp = ours / math.sqrt(1 + float(sigmas[0]) ** 2)
    err = (ours_vp - theirs).abs().max().item()
    print(f" max|Δ|={err:.1e}", end="")
    assert err <= TOL
