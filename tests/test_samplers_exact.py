"""Samplers against exact answers: a Gaussian mixture has a closed-form optimal denoiser, so what is left
is each sampler's own discretisation error. Numbers below were measured and then given some headroom."""

import math

import pytest
import torch

from sfumato.diffusion import samplers as S
from sfumato.diffusion.mixture import GaussianMixture
from sfumato.diffusion.schedules import DiscreteSchedule, append_zero, karras_sigmas, sampling_sigmas
from sfumato.eval.metrics import sliced_wasserstein

GM = GaussianMixture.random(K=4, d=2, seed=0)
SD = DiscreteSchedule.named("scaled_linear")


@pytest.fixture(scope="module")
def ode_problem():
    """x_T drawn from the exact noisy marginal at σ = 80, and a 1,000-step Heun solve as the reference."""
    g = torch.Generator().manual_seed(1)
    x0 = GM.sample(2000, g)
    x_T = x0 + 80.0 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ref = S.sample_heun(GM, x_T, append_zero(karras_sigmas(1000, 0.002, 80.0)))
    return x_T, ref


def _ode_error(name, evals, x_T, ref):
    steps = (evals + 1) // 2 if name == "heun" else evals  # Heun: 2n - 1 evaluations for n steps
    out = S.SAMPLERS[name](GM, x_T, append_zero(karras_sigmas(steps, 0.002, 80.0)))
    return (out - ref).norm(dim=1).mean().item()


def test_ode_samplers_converge_with_their_order(ode_problem):
    x_T, ref = ode_problem
    evals = [10, 20, 40, 80]
    err = {n: [_ode_error(n, e, x_T, ref) for e in evals] for n in ["euler", "ddim", "heun", "dpmpp_2m"]}
    order = {n: math.log2(e[-2] / e[-1]) for n, e in err.items()}
    table = "\n".join(
        f"{n:10s} " + " ".join(f"{v:.2e}" for v in e) + f"  order {order[n]:.2f}" for n, e in err.items()
    )
    print(f"\nmean |x - x_ref| at {evals} evaluations\n{table}")
    assert err["ddim"] == pytest.approx(err["euler"], rel=1e-9)  # DDIM is Euler on this ODE
    for name, e in err.items():
        assert e[1] > e[2] > e[3], f"{name} does not converge: {e}"
    assert 0.8 < order["euler"] < 1.2  # first order
    assert order["heun"] > 1.7 and order["dpmpp_2m"] > 1.7  # second order
    for n in ("heun", "dpmpp_2m"):  # better than Euler at equal cost once in the asymptotic range
        assert err[n][2] < err["euler"][2] / 2 and err[n][3] < err["euler"][3] / 5
    assert err["dpmpp_2m"][3] < 1e-2


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"])
def test_samples_converge_to_the_mixture(name):
    """Mean, covariance and sliced Wasserstein distance to fresh true samples, on SD's discrete schedule."""
    n = 10_000
    truth = GM.sample(n, torch.Generator().manual_seed(2))
    floor = sliced_wasserstein(GM.sample(n, torch.Generator().manual_seed(3)), truth)
    stats = {}
    for steps in (5, 100):
        g = torch.Generator().manual_seed(4)
        sig = sampling_sigmas(SD, steps, spacing="trailing")
        x_T = GM.sample(n, g) + float(sig[0]) * torch.randn(n, 2, generator=g, dtype=torch.float64)
        out = S.SAMPLERS[name](GM, x_T, sig, generator=g)
        stats[steps] = (
            (out.mean(0) - GM.mean()).norm().item(),
            ((torch.cov(out.T) - GM.cov()).norm() / GM.cov().norm()).item(),
            sliced_wasserstein(out, truth),
        )
    print(
        f"\n{name}: (|Δmean|, |ΔCov|/|Cov|, SW) at 5 steps {stats[5]}, at 100 {stats[100]}; SW floor {floor:.3f}"
    )
    mean_err, cov_err, sw = stats[100]
    assert mean_err < 0.1  # the sample mean's standard error here is ~0.03
    assert cov_err < 0.03
    assert sw < 2.5 * floor
    assert stats[5][1] > cov_err and stats[5][2] > sw  # and it was worse with few steps


def test_ddpm_equals_ddim_eta1_equals_euler_ancestral():
    """Three derivations of the same step: Ho et al. Alg. 2 with β̃, DDIM with η = 1, and the VE bridge."""
    sig = sampling_sigmas(SD, 20, spacing="leading", steps_offset=1)
    x_T = float(sig[0]) * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda fn, **kw: fn(GM, x_T, sig, generator=torch.Generator().manual_seed(5), **kw)
    ddpm = run(S.sample_ddpm)
    anc = run(S.sample_euler_ancestral)
    assert torch.allclose(ddpm, anc, atol=1e-10)
    # DDIM draws noise on the last step too, so compare all but that step through a callback
    seen = {}
    run(S.sample_ddim, eta=1.0, callback=lambda d: seen.__setitem__(d["i"], d["x"]))
    seen_anc = {}
    run(S.sample_euler_ancestral, callback=lambda d: seen_anc.__setitem__(d["i"], d["x"]))
    for i in range(19):
        assert torch.allclose(seen[i], seen_anc[i], atol=1e-10)


def test_ddim_eta0_is_euler():
    sig = sampling_sigmas(SD, 15, spacing="trailing")
    x_T = float(sig[0]) * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(S.sample_ddim(GM, x_T, sig), S.sample_euler(GM, x_T, sig), atol=1e-10)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_inversion_round_trip(spacing):
    x0 = GM.sample(2000, torch.Generator().manual_seed(0))
    errors = {}
    for steps in (25, 50):
        sig = sampling_sigmas(SD, steps, spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        x_T = S.invert_ddim(GM, x0, sig)
        back = S.sample_ddim(GM, x_T, sig)
        errors[steps] = ((back - x0).norm(dim=1).mean() / x0.std(0).norm()).item()
        assert 0.9 < (x_T / sig[0]).std().item() < 1.3  # lands on (roughly) unit Gaussian noise
    print(f"\nDDIM inversion relative round-trip error ({spacing}): {errors}")
    assert errors[50] < 0.03  # measured 0.019-0.020
    assert errors[50] < 0.7 * errors[25]  # first-order: halves with twice the steps


def test_sampler_rejects_bad_sigmas():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="descending"):
        S.sample_euler(GM, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        S.sample_euler(GM, x, torch.tensor([1.0]))


def test_callback_sees_every_step():
    sig = sampling_sigmas(SD, 7)
    calls = []
    S.sample_dpmpp_2m(
        GM, torch.zeros(3, 2, dtype=torch.float64), sig, callback=lambda d: calls.append(d["i"])
    )
    assert calls == list(range(7))
