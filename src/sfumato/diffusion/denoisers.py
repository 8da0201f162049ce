"""From a network to a denoiser, and the training loss that goes with it (STYLE rule 3).

A *denoiser* is ``D(x, sigma, **cond) -> x0_hat`` on the variance-exploding sample ``x = x0 + sigma * eps``
(Karras et al. 2022, §2). A discrete-time network trained as in Ho et al. 2020 sees instead the
variance-preserving sample ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps`` and an integer timestep t, and
predicts one of:

- ``eps``: the noise (Ho et al. 2020, eq. (11));
- ``v``: ``v = sqrt(ᾱ) eps - sqrt(1 - ᾱ) x0`` (Salimans & Ho 2022, §4; Stable Diffusion 2 "768-v");
- ``x0``: the clean sample.

:class:`DiscreteDenoiser` converts between the two views in one place, and its :meth:`DiscreteDenoiser.loss`
defines the training target from the same conversion, so training and sampling cannot disagree.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .schedules import DiscreteSchedule

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS = ("eps", "v", "x0")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


# --- exact conversions between parameterisations --------------------------------------------------
# Notation: x_t = a·x0 + s·eps with a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t), a² + s² = 1; v = a·eps - s·x0.
# Then x0 = a·x_t - s·v and eps = s·x_t + a·v (Salimans & Ho 2022, Appendix D).


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, a, s, prediction: Prediction) -> torch.Tensor:
    """The clean sample implied by a network ``output`` of type ``prediction`` at x_t = a·x0 + s·eps."""
    if prediction == "eps":
        return (x_t - s * output) / a
    if prediction == "v":
        return a * x_t - s * output
    if prediction == "x0":
        return output
    _check_prediction(prediction)


def predicted_eps(output: torch.Tensor, x_t: torch.Tensor, a, s, prediction: Prediction) -> torch.Tensor:
    """The noise implied by a network ``output`` of type ``prediction`` at x_t = a·x0 + s·eps."""
    if prediction == "eps":
        return output
    if prediction == "v":
        return s * x_t + a * output
    if prediction == "x0":
        return (x_t - a * output) / s
    _check_prediction(prediction)


def training_target(x0: torch.Tensor, eps: torch.Tensor, a, s, prediction: Prediction) -> torch.Tensor:
    """What a network of type ``prediction`` should output for x_t = a·x0 + s·eps."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "x0":
        return x0
    _check_prediction(prediction)


def min_snr_weight(
    snr: torch.Tensor, gamma: float, prediction: Prediction, floor: float = 0.0
) -> torch.Tensor:
    """Hang et al. 2023 (Min-SNR-γ): the x0-space loss weight min(SNR, γ), expressed for the MSE on the
    network's own output: eps-MSE = SNR · x0-MSE, v-MSE = (SNR + 1) · x0-MSE.

    floor > 0 clamps the x0-space weight from below too, clamp(SNR, floor, γ). Min-SNR's weight falls with
    SNR at high noise (v-prediction with zero terminal SNR: the top quarter of timesteps gets ~1/450 of the
    lowest quarter's), where a sampler decides the layout; floor=1 gives them plain v-loss's weight there.
    Not for eps-prediction at SNR 0, where the floor divided by SNR is infinite."""
    clipped = snr.clamp(min=floor, max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    _check_prediction(prediction)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () -> (B, 1, 1, ...) to broadcast against x."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class DiscreteDenoiser(nn.Module):
    """Wraps a discrete-time network ``model(x_t, t, **cond)`` trained on ``schedule`` as a denoiser.

    Sampling: for a VE sample x at level σ, the network sees ``x_t = x / sqrt(1 + σ²)`` (c_in) and the
    timestep ``t = schedule.sigma_to_t(σ)`` (fractional between training levels unless ``quantize``);
    its output is converted to x0 exactly.

    Training: :meth:`loss` draws t uniformly from the T training levels and eps ~ N(0, I), builds x_t by the
    closed form q(x_t | x0) and regresses the network output onto :func:`training_target` (Ho et al. 2020,
    Algorithm 1, "L_simple"), optionally weighted by Min-SNR-γ.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: DiscreteSchedule,
        prediction: Prediction = "eps",
        quantize: bool = False,
    ):
        super().__init__()
        _check_prediction(prediction)
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.quantize = (
            quantize  # round t to the nearest training level (diffusers' DPM-Solver with Karras σ)
        )

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) = (sqrt(ᾱ), sqrt(1 - ᾱ)) at level σ, in float64: a = 1/sqrt(1+σ²), s = σ·a."""
        a = (1 + sigma.double() ** 2).rsqrt()
        return a, sigma.double() * a

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        # schedule arithmetic in float64 on the CPU: a float32 σ would move integer timesteps off their level
        sigma = torch.as_tensor(sigma).detach().to("cpu", torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])  # () -> (B,)
        t = self.schedule.sigma_to_t(sigma)
        if self.quantize:
            t = t.round()
        a, s = self.scalings(sigma)
        a_x, s_x = (_bcast(v, x).to(x.device, x.dtype) for v in (a, s))
        x_t = x * a_x  # VE -> VP sample
        out = self.model(x_t, t.to(x.device, torch.float32), **cond)
        return predicted_x0(out, x_t, a_x, s_x, self.prediction)

    def loss(
        self,
        x0: torch.Tensor,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        min_snr_gamma: float | None = None,
        min_snr_floor: float = 0.0,
        **cond,
    ) -> torch.Tensor:
        """Per-example L_simple (mean over all but the batch dimension), shape (B,). Take ``.mean()`` to train."""
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        ac = self.schedule.alphas_cumprod[t.cpu().long()]  # (B,) float64
        a, s = (_bcast(v, x0).to(x0.device, x0.dtype) for v in (ac.sqrt(), (1 - ac).sqrt()))
        x_t = a * x0 + s * noise  # closed form of q(x_t | x0), Ho et al. 2020, eq. (4)
        out = self.model(x_t, t.to(x0.device, torch.float32), **cond)
        target = training_target(x0, noise, a, s, self.prediction)
        per_example = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        if min_snr_gamma is not None:
            snr = ac / (1 - ac)
            weight = min_snr_weight(snr, min_snr_gamma, self.prediction, min_snr_floor)
            per_example = per_example * weight.to(per_example)
        return per_example
