"""Two U-Nets that share the noise levels between them: an "ensemble of expert denoisers" (eDiff-I, Balaji et
al. 2022, sec. 4; SDXL's refiner is the same split across two pipelines).

    U(x, t, c) = high(x, t, c)   for t >= boundary     (the noisiest steps: where things go)
                 low(x, t, c)    for t <  boundary     (the rest: what they look like, edges, texture)

Both read the same latents and the same text context, so one VAE and one text encoder serve both. A sampler
never sees the split: at each step it calls one network, as with a single U-Net. Each expert is trained only
on its own range of t (`LDMTask(high_noise_share=1, high_noise_from=boundary)` trains a `high`), so a small
model can spend all its capacity on what that range decides; in sfumato's shipped model the high-noise expert
is the part that reads places and relations ("a red circle above a blue square"), which the one-U-Net recipes
could only learn by giving up the low-noise training that draws shapes (README, "The shipped model").
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .unet import UNet, UNetConfig


class NoiseLevelExperts(nn.Module):
    """`high` denoises t >= `boundary`, `low` every t below it (see the module docstring).

    Called like a `UNet`: forward(x, t, context, y=None, context_mask=None). A batch whose timesteps fall on
    both sides is split and each part goes to its expert. `context_mask` reaches only an expert trained with
    `mask_padding` (the other was trained attending to every token and gets None).
    """

    def __init__(self, high: UNet, low: UNet, boundary: float):
        super().__init__()
        for name in ("in_channels", "out_channels", "context_dim", "adm_in_channels"):
            a, b = getattr(high.config, name), getattr(low.config, name)
            if a != b:
                raise ValueError(
                    f"the two experts must read and predict the same tensors, but high.config.{name}={a} and "
                    f"low.config.{name}={b}; train the high-noise U-Net on the low one's latents and text encoder"
                )
        if not boundary > 0:
            raise ValueError(f"boundary must be a timestep > 0 (high serves t >= boundary), got {boundary}")
        self.high, self.low, self.boundary = high, low, float(boundary)
        # what callers read of a U-Net's config: the low expert's, with `mask_padding` set when either expert
        # reads a prompt mask (so that pipelines compute one)
        self.config: UNetConfig = replace(low.config, mask_padding=high.config.mask_padding or low.config.mask_padding)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(B) if t.numel() == 1 else t
        high = t >= self.boundary  # (B,) bool

        def run(unet: UNet, rows: torch.Tensor | slice) -> torch.Tensor:
            mask = context_mask[rows] if context_mask is not None and unet.config.mask_padding else None
            return unet(x[rows], t[rows], context[rows], y=None if y is None else y[rows], context_mask=mask)

        n_high = int(high.sum())  # one host sync per call
        if n_high == B:
            return run(self.high, slice(None))
        if n_high == 0:
            return run(self.low, slice(None))
        h, lo = run(self.high, high), run(self.low, ~high)  # out_channels may differ from x's (inpainting)
        out = h.new_empty((B, *h.shape[1:]))
        out[high], out[~high] = h, lo
        return out
