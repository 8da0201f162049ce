"""The Stable Diffusion U-Net: an eps/v-prediction network on latents, conditioned on text by cross-attention.

Ronneberger et al. 2015 (U-Net), as refined for diffusion by Ho et al. 2020 and Dhariwal & Nichol 2021
(`openaimodel.py`), with the spatial transformers of Rombach et al. 2022 (latent diffusion, sec. 3.3).
Module names are those of the CompVis/ldm `UNetModel`, so `UNet(config).state_dict()` has exactly the
keys found under `model.diffusion_model.` in an SD 1.x/2.x single-file checkpoint:

    time_embed.{0,2}                        timestep MLP
    label_emb.0.{0,2}                       optional global embedding MLP (unCLIP-style `y`)
    input_blocks.0.0                        3x3 conv in
    input_blocks.{i}.0 / .1                 ResBlock / SpatialTransformer, or `.0.op` a downsampler
    middle_block.{0,1,2}                    ResBlock, SpatialTransformer, ResBlock
    output_blocks.{i}.0 / .1 / .{1,2}.conv  ResBlock on [h, skip] / SpatialTransformer / upsampler
    out.{0,2}                               GroupNorm, (SiLU), 3x3 conv out
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from sfumato.models.clip import EncoderLayer
from sfumato.models.layers import (
    Conv2d,
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_init_,
)


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels in; 9 for inpainting models (latent + mask + masked-image latent)
    out_channels: int = 4  # channels predicted (eps or v), the latent channels
    model_channels: int = 320  # width of the first level; level i is model_channels * channel_mult[i] wide
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per resolution level, one level per entry
    num_res_blocks: int = 2  # ResBlocks per level on the way down; the way up has one more per level
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors 2**level with transformers
    num_heads: int | None = 8  # heads in every transformer (SD 1.x); None to derive heads from head_dim
    head_dim: int | None = None  # channels per head, heads = width // head_dim (SD 2.x: 64); or None
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    context_dim: int = 768  # width of the text embeddings attended to (CLIP ViT-L/14: 768, OpenCLIP-H: 1024)
    use_linear_proj: bool = (
        False  # Linear (SD 2.x) instead of 1x1-conv (SD 1.x) transformer in/out projections
    )
    adm_in_channels: int | None = None  # width of a global embedding `y` added to the time embedding, or None
    dropout: float = 0.0  # dropout in ResBlocks and transformer MLPs (0 for all SD checkpoints)
    # > 0: every transformer adds a learned projection of `position_freqs` Fourier frequencies of each pixel's
    # place in the image to its tokens (not in SD or ldm, whose attention sees no position: 0 keeps their
    # layout). Without it a query cannot tell "top" from "bottom" except through the convolutions' zero padding
    position_freqs: int = 0
    # True: cross-attention reads only the prompt's tokens (start token to end token) and not the padding after
    # them; callers pass `context_mask` (`sfumato.models.clip.prompt_mask`). SD attends to all 77 tokens (False).
    # With 20 real tokens out of 32, the near-identical padding states take ~80 % of every query's attention
    # and carry a word like "top" at 2 % of its own weight: a small model then learns colours but not places
    mask_padding: bool = False
    # > 0: that many bidirectional transformer layers over the text context before any cross-attention (not in
    # SD or ldm). CLIP's text encoder is causal, so a word's state depends only on the words before it: "red
    # circle" has the same states in "a red circle above a blue square" and "a red circle below a blue square",
    # and only the words after "above" can say which object goes where. These layers let every token see the
    # whole prompt (only its own tokens when a context_mask is given); they start as the identity
    context_layers: int = 0

    def __post_init__(self):
        # JSON (checkpoint metadata) brings tuples back as lists
        self.channel_mult = tuple(self.channel_mult)
        # a set in meaning; kept sorted as ldm's yaml writes it, (4, 2, 1), so equal configs compare equal
        self.attention_resolutions = tuple(sorted(set(self.attention_resolutions), reverse=True))
        if self.context_layers < 0:
            raise ValueError(f"context_layers must be >= 0 (0: the text context as given), got {self.context_layers}")
        if self.position_freqs < 0:
            raise ValueError(
                f"position_freqs must be >= 0 (0: no position embedding), got {self.position_freqs}"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"set exactly one of num_heads and head_dim, got num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}; SD 1.x uses num_heads=8, SD 2.x head_dim=64"
            )
        levels = {2**level for level in range(len(self.channel_mult))}
        bad = [r for r in self.attention_resolutions if r not in levels]
        if bad:
            raise ValueError(
                f"attention_resolutions {self.attention_resolutions} has {bad}, which are not downsampling "
                f"factors 2**level of the {len(self.channel_mult)} levels; use values from {sorted(levels)}"
            )
        last = len(self.channel_mult) - 1  # the middle block's transformer runs at the last level's width
        for level, mult in enumerate(self.channel_mult):
            if 2**level not in self.attention_resolutions and level != last:
                continue
            width = self.model_channels * mult
            heads, head_dim = self.heads_for(width)
            if heads < 1 or heads * head_dim != width:
                raise ValueError(
                    f"a transformer of width {width} cannot be split into heads with num_heads="
                    f"{self.num_heads}, head_dim={self.head_dim}; pick values that divide every level's width"
                )

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of the transformer at a level of this width, as ldm derives them."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim

    @property
    def downsample_factor(self) -> int:
        """How many latent pixels one pixel of the innermost feature map covers; H and W must divide by it."""
        return 2 ** (len(self.channel_mult) - 1)


UNET_PRESETS: dict[str, UNetConfig] = {
    # SD 1.x (v1-inference.yaml): CLIP ViT-L/14 text, 8 heads at every level, 1x1-conv projections
    "sd1": UNetConfig(),
    # SD 2.x (v2-inference-v.yaml): OpenCLIP ViT-H/14 penultimate layer, 64-channel heads, Linear projections
    "sd2": UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True),
    # about a million parameters (SD 1.x has 859,520,964), for tests and toy training
    "tiny": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_heads=2,
        context_dim=32,
    ),  # fmt: skip
}
UNET_PRESETS["sd1-inpaint"] = replace(UNET_PRESETS["sd1"], in_channels=9)
UNET_PRESETS["sd2-inpaint"] = replace(UNET_PRESETS["sd2"], in_channels=9)


class ContextLayer(EncoderLayer):
    """CLIP's pre-LN transformer layer run bidirectionally over text tokens (`UNetConfig.context_layers`), with
    its output projections at zero, so that a new layer passes the context through unchanged."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads, 4 * width, act="gelu", eps=1e-5)
        zero_init_(self.self_attn.out_proj)
        zero_init_(self.mlp.fc2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return super().forward(x, causal=False, mask=mask)


class UNet(nn.Module):
    """eps/v-prediction U-Net: `forward(x, t, context, y=None) -> (B, out_channels, H, W)`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim = 4 * c.model_channels  # ldm's time_embed_dim

        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if c.context_layers:
            heads = c.num_heads if c.num_heads is not None else max(1, c.context_dim // c.head_dim)
            self.context_encoder = nn.ModuleList(ContextLayer(c.context_dim, heads) for _ in range(c.context_layers))
        if c.adm_in_channels is not None:
            # ldm `num_classes="sequential"`: an MLP on y, one Sequential deeper (hence `label_emb.0.0`)
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        def transformer(ch: int) -> SpatialTransformer:
            heads, head_dim = c.heads_for(ch)
            return SpatialTransformer(ch, heads, head_dim, c.context_dim, c.transformer_depth, c.use_linear_proj,
                                      c.dropout, c.position_freqs)  # fmt: skip

        # Down path. `skip_chans` records the width of every stage's output, consumed by the up path.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(c.in_channels, c.model_channels, 3, padding=1))]
        )
        ch, skip_chans = c.model_channels, [c.model_channels]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                stage = [ResBlock(ch, c.model_channels * mult, emb_dim, c.dropout)]
                ch = c.model_channels * mult
                if 2**level in c.attention_resolutions:
                    stage.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*stage))
                skip_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, emb_dim, c.dropout), transformer(ch), ResBlock(ch, ch, emb_dim, c.dropout)
        )

        # Up path: each stage takes the previous output concatenated with one skip, widest level first.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                stage = [ResBlock(ch + skip_chans.pop(), c.model_channels * mult, emb_dim, c.dropout)]
                ch = c.model_channels * mult
                if 2**level in c.attention_resolutions:
                    stage.append(transformer(ch))
                if level > 0 and i == c.num_res_blocks:
                    stage.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*stage))

        self.out = nn.Sequential(
            group_norm(ch, eps=1e-5), nn.SiLU(), zero_init_(Conv2d(ch, c.out_channels, 3, padding=1))
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the network target (eps or v, per checkpoint) for latents `x` at timesteps `t`.

        x: (B, in_channels, H, W), any H and W (multiples of `config.downsample_factor` need no resizing).
        t: (B,) or a scalar, integer or fractional timesteps in the training range (0..999 for SD).
        context: (B, T, context_dim) text embeddings. y: (B, adm_in_channels) when the config has it.
        context_mask: None (attend to every context token) or (B, T) bool, True for the tokens to attend to
            (diffusers' `encoder_attention_mask`); a model with `config.mask_padding` was trained with
            `prompt_mask` of its token ids and expects it.
        """
        c = self.config
        B, C, H, W = x.shape
        if C != c.in_channels:
            raise ValueError(
                f"x has {C} channels, this U-Net takes {c.in_channels} (shape {tuple(x.shape)}); "
                "inpainting models take 9: latent, mask and masked-image latent concatenated"
            )
        if context.ndim != 3 or context.shape[-1] != c.context_dim:
            raise ValueError(
                f"context must be (B, T, {c.context_dim}), got {tuple(context.shape)}; SD 1.x takes "
                "CLIP ViT-L (768), SD 2.x the OpenCLIP ViT-H penultimate layer (1024)"
            )
        if (y is None) != (c.adm_in_channels is None):
            raise ValueError(
                f"y must be given exactly when config.adm_in_channels is set; adm_in_channels="
                f"{c.adm_in_channels}, y is {'None' if y is None else tuple(y.shape)}"
            )
        if context_mask is not None:
            if context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool:
                raise ValueError(
                    f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} (batch, tokens), got "
                    f"{context_mask.dtype} {tuple(context_mask.shape)}"
                )
            # a data-dependent check (a host sync): eager only, so that a compiled U-Net stays one graph
            if not torch.compiler.is_compiling() and not bool(context_mask.any(1).all()):
                raise ValueError("every row of context_mask needs a True token (at least the start token)")
        if c.context_layers:
            for layer in self.context_encoder:
                context = layer(context, context_mask)
        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(B)  # scalar -> (B,)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")

        dtype = self.input_blocks[0][0].weight.dtype  # a conv's: Linear weights may be int8-quantised
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(dtype))  # (B,) -> (B, 4*mc)
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))

        h, skips = x, []
        for stage in self.input_blocks:
            h = stage(h, emb, context, context_mask=context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask=context_mask)
        for stage in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C, H, W) + (B, Cs, H, W) -> (B, C+Cs, H, W)
            # any latent size works: a stage that upsamples meets the size of the skip it is joined to next
            # (2H, or 2H - 1 where a stride-2 convolution rounded an odd side up)
            h = stage(h, emb, context, skips[-1].shape[-2:] if skips else None, context_mask)
        return self.out(h)
