"""Parameterisations, the network -> denoiser wrapper and its training loss (STYLE rule 3)."""

import pytest
import torch
from torch import nn

from sfumato.diffusion.denoisers import (
    DiscreteDenoiser,
    min_snr_weight,
    predicted_eps,
    predicted_x0,
    training_target,
)
from sfumato.diffusion.schedules import DiscreteSchedule

PREDICTIONS = ["eps", "v", "x0"]
SCHEDULE = DiscreteSchedule.named("scaled_linear")


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    ac = torch.rand(5, 1, 1, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x0, eps, ac.sqrt(), (1 - ac).sqrt()


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_are_exact(prediction):
    x0, eps, a, s = _problem()
    x_t = a * x0 + s * eps
    out = training_target(x0, eps, a, s, prediction)
    assert torch.allclose(predicted_x0(out, x_t, a, s, prediction), x0, atol=1e-12)
    assert torch.allclose(predicted_eps(out, x_t, a, s, prediction), eps, atol=1e-10)


def test_v_definition():
    x0, eps, a, s = _problem()
    assert torch.allclose(training_target(x0, eps, a, s, "v"), a * eps - s * x0)


class Oracle(nn.Module):
    """Knows x0, so it can output the exact target of any parameterisation for whatever x_t it is given."""

    def __init__(self, x0, prediction):
        super().__init__()
        self.x0, self.prediction, self.seen_t = x0, prediction, None

    def forward(self, x_t, t):
        self.seen_t = t
        ac = SCHEDULE.t_to_sigma(t.double()).pow(2).add(1).reciprocal().reshape(-1, 1, 1, 1)
        a, s = ac.sqrt().to(x_t), (1 - ac).sqrt().to(x_t)
        return training_target(self.x0, (x_t - a * self.x0) / s, a, s, self.prediction)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_wrapper_and_loss_agree(prediction):
    """A network that is perfect under the training loss must make the denoiser return x0 exactly."""
    x0, eps, _, _ = _problem()
    oracle = Oracle(x0, prediction)
    den = DiscreteDenoiser(oracle, SCHEDULE, prediction)
    t = torch.tensor([0, 10, 250, 700, 999])
    assert den.loss(x0, t=t, noise=eps).abs().max() < 1e-20
    sigma = SCHEDULE.sigmas[t]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps  # VE sample
    assert torch.allclose(den(x, sigma), x0, atol=1e-10)
    assert torch.allclose(oracle.seen_t, t.float())  # integer levels reach the network as integer timesteps


def test_loss_is_l_simple():
    """Ho et al. 2020, Algorithm 1: ||eps - eps_θ(sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) eps, t)||², per example."""
    torch.manual_seed(0)
    net = nn.Conv2d(3, 3, 1).double()
    model = lambda x, t: net(x) * (1 + t.double().reshape(-1, 1, 1, 1) / 1000)
    den = DiscreteDenoiser(model, SCHEDULE, "eps")
    x0, eps, _, _ = _problem(1)
    t = torch.tensor([3, 40, 400, 600, 990])
    ac = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    expected = (eps - model(x_t, t.float())).pow(2).flatten(1).mean(1)
    assert torch.allclose(den.loss(x0, t=t, noise=eps), expected.float(), rtol=1e-6)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weight_is_min_snr_gamma_in_x0_space(prediction):
    """Hang et al. 2023: whatever the parameterisation, weight × MSE(output) = min(SNR, γ) × MSE(x0)."""
    x0, eps, a, s = _problem(2)
    x_t = a * x0 + s * eps
    delta = 0.1 * torch.randn_like(x0)
    x0_hat = x0 + delta
    out_hat = training_target(x0_hat, (x_t - a * x0_hat) / s, a, s, prediction)
    out = training_target(x0, eps, a, s, prediction)
    snr = (a**2 / s**2).flatten()
    lhs = min_snr_weight(snr, 5.0, prediction) * (out_hat - out).pow(2).flatten(1).mean(1)
    rhs = snr.clamp(max=5.0) * delta.pow(2).flatten(1).mean(1)
    assert torch.allclose(lhs, rhs, rtol=1e-9)
    # with a floor the x0-space weight is clamp(SNR, floor, γ); the problem's SNRs straddle 1
    assert snr.min() < 1 < snr.max()
    lhs = min_snr_weight(snr, 5.0, prediction, floor=1.0) * (out_hat - out).pow(2).flatten(1).mean(1)
    rhs = snr.clamp(min=1.0, max=5.0) * delta.pow(2).flatten(1).mean(1)
    assert torch.allclose(lhs, rhs, rtol=1e-9)


def test_min_snr_floor_at_zero_terminal_snr_is_plain_v_loss():
    """At SNR 0 (a zero-terminal-SNR schedule's t = T) Min-SNR gives v-loss no weight at all; floor 1 gives
    it v-loss's own weight, 1 (v-MSE = (SNR + 1) x0-MSE)."""
    snr = torch.tensor([0.0, 1e-3], dtype=torch.float64)
    assert min_snr_weight(snr, 5.0, "v")[0] == 0
    assert torch.allclose(min_snr_weight(snr, 5.0, "v", floor=1.0), 1 / (snr + 1))


def test_bad_prediction_names_the_value():
    with pytest.raises(ValueError, match="'epsilon'"):
        DiscreteDenoiser(nn.Identity(), SCHEDULE, "epsilon")
