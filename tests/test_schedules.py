"""Schedules and the forward process, against formulas and against diffusers' own tables."""

import math

import numpy as np
import pytest
import torch

from sfumato.diffusion import schedules as sch
from sfumato.diffusion.forward import q_posterior, q_sample, q_step


def test_linear_and_scaled_linear_endpoints():
    b = sch.linear_betas()
    assert b.dtype == torch.float64 and len(b) == 1000
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    s = sch.scaled_linear_betas()
    assert s[0].item() == pytest.approx(0.00085) and s[-1].item() == pytest.approx(0.012)
    assert torch.allclose(s.sqrt().diff(), s.sqrt().diff()[0].expand(999))  # linear in sqrt(β)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(name):
    from diffusers import DDPMScheduler

    ends = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    ref = DDPMScheduler(beta_schedule=name, **ends).betas.double()
    assert torch.allclose(sch.make_betas(name), ref, atol=1e-7, rtol=1e-5)


def test_cosine_alpha_bar_follows_nichol_dhariwal():
    T, s = 1000, 0.008
    ac = sch.alphas_cumprod(sch.cosine_betas(T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    # equal where no β hit the 0.999 cap (only the very last step does)
    assert torch.allclose(ac[:-1], expected[:-1], rtol=1e-9, atol=1e-12)


def test_sigma_and_log_snr_relations():
    ac = sch.alphas_cumprod(sch.scaled_linear_betas())
    sig = sch.sigmas_from_alphas_cumprod(ac)
    assert torch.allclose(sch.log_snr(ac), -2 * sig.log())
    assert torch.allclose(sch.sigma_to_alpha_bar(sig), ac)
    # Stable Diffusion's well-known range
    assert sig[0].item() == pytest.approx(0.0292, abs=1e-4) and sig[-1].item() == pytest.approx(
        14.6146, abs=1e-3
    )


def test_zero_terminal_snr_rescale():
    betas = sch.rescale_zero_terminal_snr(sch.scaled_linear_betas())
    ac = sch.alphas_cumprod(betas)
    assert ac[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ac[0].item() == pytest.approx(sch.alphas_cumprod(sch.scaled_linear_betas())[0].item(), rel=1e-12)
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    # diffusers' function is dtype-generic; in float32 its cumprod error reaches 1e-5 in the last betas
    # (and differs between CPUs), so compare the same arithmetic in float64
    ref = rescale_zero_terminal_snr(sch.scaled_linear_betas().double())
    assert torch.allclose(betas, ref, rtol=1e-10, atol=1e-12)
    # a schedule built on it keeps σ_T finite (ᾱ_T nudged to 2^-24)
    assert math.isfinite(sch.DiscreteSchedule(ac).sigma_max)


@pytest.mark.parametrize("interpolation", ["log", "linear"])
def test_sigma_t_round_trip_is_exact(interpolation):
    s = sch.DiscreteSchedule.named("scaled_linear", interpolation=interpolation)
    t = torch.tensor([0.0, 0.5, 1.0, 17.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(s.sigma_to_t(s.t_to_sigma(t)), t, atol=1e-9)
    ints = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(s.t_to_sigma(ints), s.sigmas, rtol=1e-12)
    assert torch.allclose(s.sigma_to_t(s.sigmas), ints, atol=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_timestep_spacings_match_diffusers(spacing, steps):
    from diffusers import EulerDiscreteScheduler

    offset = 1 if spacing == "leading" else 0
    ref = EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    ours = sch.timesteps(steps, 1000, spacing, steps_offset=offset)
    assert np.allclose(ours.numpy(), ref.timesteps.numpy(), atol=1e-4)


def test_karras_and_exponential_sigmas():
    k = sch.karras_sigmas(10, 0.03, 14.6)
    assert k[0].item() == pytest.approx(14.6) and k[-1].item() == pytest.approx(0.03)
    assert bool((k.diff() < 0).all())
    # ρ = 7 spacing: σ^(1/7) is linear in the step index
    assert torch.allclose((k ** (1 / 7)).diff(), (k ** (1 / 7)).diff()[0].expand(9))
    e = sch.exponential_sigmas(10, 0.03, 14.6)
    assert torch.allclose(e.log().diff(), e.log().diff()[0].expand(9))


def test_bad_schedule_arguments_name_the_value():
    with pytest.raises(ValueError, match="'cosin'"):
        sch.make_betas("cosin")
    with pytest.raises(ValueError, match="'middle'"):
        sch.timesteps(10, 1000, "middle")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        sch.timesteps(0)


# --- forward process --------------------------------------------------------------------------------


def test_markov_chain_moments_equal_closed_form_exactly():
    """Propagating mean and variance through q(x_t|x_{t-1}) gives sqrt(ᾱ_t) x0 and 1 - ᾱ_t (mathematics)."""
    betas = sch.linear_betas()
    mean_coef, var = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    means, variances = [], []
    for beta in betas:
        mean_coef = (1 - beta).sqrt() * mean_coef
        var = (1 - beta) * var + beta
        means.append(mean_coef)
        variances.append(var)
    ac = sch.alphas_cumprod(betas)
    assert torch.allclose(torch.stack(means), ac.sqrt(), rtol=1e-12)
    assert torch.allclose(torch.stack(variances), 1 - ac, rtol=1e-10)


def test_iterated_chain_samples_match_closed_form_distribution():
    """Monte Carlo: running the chain step by step lands on q(x_t | x0)'s mean and variance."""
    g = torch.Generator().manual_seed(0)
    betas = sch.linear_betas(200, 1e-3, 0.05)  # a short chain keeps the test fast
    ac = sch.alphas_cumprod(betas)
    n = 200_000
    x0 = torch.full((n,), 1.5, dtype=torch.float64)
    x = x0.clone()
    for t in range(200):
        x = q_step(x, t, betas, torch.randn(n, generator=g, dtype=torch.float64))
        if t in (9, 49, 199):
            se_mean, se_var = (1 - ac[t]).sqrt() / n**0.5, (1 - ac[t]) * (2 / n) ** 0.5
            assert abs(x.mean() - ac[t].sqrt() * 1.5) < 5 * se_mean
            assert abs(x.var() - (1 - ac[t])) < 5 * se_var
            jump = q_sample(x0, t, ac, torch.randn(n, generator=g, dtype=torch.float64))
            assert abs(jump.mean() - x.mean()) < 8 * se_mean


def test_posterior_is_consistent_with_the_chain():
    """Sampling x_{t-1} from q(x_{t-1}|x_t, x0) with x_t ~ q(x_t|x0) must reproduce q(x_{t-1}|x0)."""
    g = torch.Generator().manual_seed(1)
    betas = sch.linear_betas()
    ac = sch.alphas_cumprod(betas)
    n, t = 200_000, 300
    x0 = torch.full((n,), -0.7, dtype=torch.float64)
    x_t = q_sample(x0, t, ac, torch.randn(n, generator=g, dtype=torch.float64))
    mean, var = q_posterior(x0, x_t, t, betas)
    x_prev = mean + var.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    assert abs(x_prev.mean() - ac[t - 1].sqrt() * -0.7) < 5 * (1 / n) ** 0.5
    assert abs(x_prev.var() - (1 - ac[t - 1])) < 5 * (2 / n) ** 0.5
