"""Two U-Nets that share the noise levels between them: an "ensemble of expert denoisers" (eDiff-I, Balaji et
al. 2022, sec. 4; SDXL's refiner is the same split across two pipelines).

    U(x, t, c) = high(x, t, c)   for t >= boundary     (the noisiest steps: where things go)
                 low(x, t, c)    for t <  boundary     (the rest: what they look like, edges, texture)

Both read the same latents. By default they also read the same text context, so one VAE and one text encoder
serve both; with `split_context` the high expert reads its own text encoder's states, which `ExpertTextEncoders`
computes beside the low one's from the same token ids and stacks along the features (as SDXL stacks the states of
its two CLIP encoders into one context). A sampler never sees the split: at each step it calls one network, as
with a single U-Net, on one context. Each expert is trained only on its own range of t
(`LDMTask(high_noise_share=1, high_noise_from=boundary)` trains a `high`), so a small model can spend all its
capacity on what that range decides; in sfumato's shipped model the high-noise expert is the part that reads
places and relations ("a red circle above a blue square"), which the one-U-Net recipes
could only learn by giving up the low-noise training that draws shapes (docs/shapes-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .clip import CLIPTextModel, TextOutput
from .unet import UNet, UNetConfig


class NoiseLevelExperts(nn.Module):
    """`high` denoises t >= `boundary`, `low` every t below it (see the module docstring).

    Called like a `UNet`: forward(x, t, context, y=None, context_mask=None). A batch whose timesteps fall on
    both sides is split and each part goes to its expert. `context_mask` reaches only an expert trained with
    `mask_padding` (the other was trained attending to every token and gets None).

    split_context: the high expert has a text encoder of its own (`ExpertTextEncoders`). The context is then
    (B, T, low.context_dim + high.context_dim): low reads the first low.context_dim features, high the rest.
    """

    def __init__(self, high: UNet, low: UNet, boundary: float, *, split_context: bool = False):
        super().__init__()
        names = ("in_channels", "out_channels", "adm_in_channels") + (() if split_context else ("context_dim",))
        for name in names:
            a, b = getattr(high.config, name), getattr(low.config, name)
            if a != b:
                raise ValueError(
                    f"the two experts must read and predict the same tensors, but high.config.{name}={a} and "
                    f"low.config.{name}={b}; train the high-noise U-Net on the low one's latents and text encoder"
                )
        if not boundary > 0:
            raise ValueError(f"boundary must be a timestep > 0 (high serves t >= boundary), got {boundary}")
        self.high, self.low, self.boundary = high, low, float(boundary)
        self.split_context = bool(split_context)
        # what callers read of a U-Net's config: the low expert's, with `mask_padding` set when either expert
        # reads a prompt mask (so that pipelines compute one), and the width of the context it takes
        width = low.config.context_dim + (high.config.context_dim if split_context else 0)
        mask = high.config.mask_padding or low.config.mask_padding
        self.config: UNetConfig = replace(low.config, mask_padding=mask, context_dim=width)

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
        if context.shape[-1] != self.config.context_dim:
            raise ValueError(
                f"the experts take a context of {self.config.context_dim} features, got {context.shape[-1]}"
                + ("; encode the prompt with the bundle's ExpertTextEncoders" if self.split_context else "")
            )
        low_width = self.low.config.context_dim

        def run(unet: UNet, rows: torch.Tensor | slice) -> torch.Tensor:
            mask = context_mask[rows] if context_mask is not None and unet.config.mask_padding else None
            c = context[rows]
            if self.split_context:
                c = c[..., low_width:] if unet is self.high else c[..., :low_width]
            return unet(x[rows], t[rows], c, y=None if y is None else y[rows], context_mask=mask)

        n_high = int(high.sum())  # one host sync per call
        if n_high == B:
            return run(self.high, slice(None))
        if n_high == 0:
            return run(self.low, slice(None))
        h, lo = run(self.high, high), run(self.low, ~high)  # out_channels may differ from x's (inpainting)
        out = h.new_empty((B, *h.shape[1:]))
        out[high], out[~high] = h, lo
        return out


@dataclass(frozen=True)
class ExpertTextConfig:
    """What callers read of a text encoder's config, for `ExpertTextEncoders`: the stacked width, and the
    tokenizer facts both encoders share."""

    width: int  # low.width + high.width: the context's features
    context_length: int
    vocab_size: int
    eos_token_id: int


class ExpertTextEncoders(nn.Module):
    """The text encoders of `NoiseLevelExperts(..., split_context=True)`: `low` (the base model's) and `high`
    (the high-noise expert's own, e.g. a copy of low trained with it) read the same token ids, and the context
    is low's states followed by high's along the features, (B, T, low.width + high.width).

    Called like a `CLIPTextModel`: forward(ids, skip=0).last_hidden_state is that context; `pooled` and `embeds`
    are low's (a bundle's CLIP embedding is the base model's).
    """

    def __init__(self, low: CLIPTextModel, high: CLIPTextModel):
        super().__init__()
        for name in ("context_length", "vocab_size", "eos_token_id"):
            a, b = getattr(low.config, name), getattr(high.config, name)
            if a != b:
                raise ValueError(
                    f"both text encoders must read the same tokenizer's ids, but low.config.{name}={a} and "
                    f"high.config.{name}={b}; start the high-noise expert's encoder from a copy of the low one"
                )
        self.low, self.high = low, high
        c = low.config
        self.config = ExpertTextConfig(c.width + high.config.width, c.context_length, c.vocab_size, c.eos_token_id)

    def forward(self, ids: torch.Tensor, *, skip: int = 0) -> TextOutput:
        out = self.low(ids, skip=skip)
        high = self.high(ids, skip=skip).last_hidden_state
        return TextOutput(
            last_hidden_state=torch.cat([out.last_hidden_state, high], dim=-1), pooled=out.pooled, embeds=out.embeds
        )
