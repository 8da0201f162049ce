"""An image-text matching head over a CLIP: does this caption describe this image? One logit per pair.

CLIP compares one vector per image with one per caption, and a single vector each is a poor place to keep
which colour goes with which shape, or how many there are (Yuksekgonul et al. 2023 found CLIPs to treat
captions as bags of words; ours reads the number of objects on generated images little better than chance,
docs/shapes-model.md). A matching head reads both at once instead: the caption's token states attend to the
image's patch states (BLIP's image-text matching head, Li et al. 2022, sec. 3.1, trained like it, as a
binary classifier on true captions and hard negatives). `sfumato.training.matcher` trains one on a data
set's image-caption pairs with captions edited to be false; `StableDiffusion.generate(candidates=K)` adds its
logit under the prompt to the ranking of the K drawn images (`pipelines.ranking.matched_score`).

The head does not own the CLIP it reads: the CLIP stays frozen and is stored once, in its own file (a
bundle's `clip.safetensors`), and `forward` takes it as an argument. What the head adds:
- the CLIP's own judgement, `sim_scale * cos(image embed, text embed) + sim_bias`, so it starts where the
  CLIP is (a bag-of-words matcher) and learns what to add;
- text: the CLIP text tower's token states (LayerNorm, linear to `width`), a learned [CLS] token in front,
  `text_layers` bidirectional pre-LN blocks over the prompt's tokens (the tower itself is causal);
- image: the vision tower's last states, class token and patches (LayerNorm, linear to `width`), and a
  learned null state (with `position_freqs`, Fourier features of each patch's place, through a linear map,
  are added to its state). Softmax attention averages what it attends to, so with patches alone two red
  squares and three read alike; a null state to attend to instead makes the weight on the patches, hence
  their number, part of what comes back (as an "attention sink", Xiao et al. 2024);
- fusion: `layers` blocks of text self-attention, cross-attention from text to image states, and an MLP;
  the [CLS] token's final state through a LayerNorm and a linear map is added to the CLIP's logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sfumato.models.clip import CLIP, MLP, Attention, prompt_mask
from sfumato.models.layers import attention, position_fourier_features


@dataclass
class MatcherConfig:
    text_width: int  # the CLIP text tower's width
    vision_width: int  # the CLIP vision tower's width
    eos_token_id: int  # the tokenizer's end-of-text id: tokens after the first one are padding
    width: int = 128  # width of the head's blocks
    heads: int = 4
    text_layers: int = 2  # bidirectional blocks over the caption alone
    layers: int = 2  # fusion blocks: text self-attention, cross-attention to the image, MLP
    # Fourier frequencies per axis of each patch's place, added (through a linear map) to its state; 0: none
    position_freqs: int = 0
    eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")

    @classmethod
    def for_clip(cls, clip_config, **kw) -> MatcherConfig:
        """A head for a `CLIPConfig`'s towers."""
        t, v = clip_config.text, clip_config.vision
        return cls(text_width=t.width, vision_width=v.width, eos_token_id=t.eos_token_id, **kw)


class FusionBlock(nn.Module):
    """Pre-LN: text self-attention, cross-attention from text to image states (with cross=True), MLP."""

    def __init__(self, c: MatcherConfig, cross: bool):
        super().__init__()
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.width, eps=c.eps)
        self.self_attn = Attention(c.width, c.heads)
        self.cross = cross
        if cross:
            self.norm2 = nn.LayerNorm(c.width, eps=c.eps)
            self.to_q = nn.Linear(c.width, c.width)
            self.to_k = nn.Linear(c.width, c.width)
            self.to_v = nn.Linear(c.width, c.width)
            self.to_out = nn.Linear(c.width, c.width)
        self.norm3 = nn.LayerNorm(c.width, eps=c.eps)
        self.mlp = MLP(c.width, 4 * c.width, "gelu")

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C) text states, mask (B, T) True where they are real, image (B, N, C) (cross blocks only)."""
        x = x + self.self_attn(self.norm1(x), False, mask)
        if self.cross:
            q = self.to_q(self.norm2(x))
            x = x + self.to_out(attention(q, self.to_k(image), self.to_v(image), self.heads))
        return x + self.mlp(self.norm3(x))


class ImageTextMatcher(nn.Module):
    """logits = matcher(clip, pixels, ids): (M,) the log-odds that caption m describes its image."""

    def __init__(self, config: MatcherConfig):
        super().__init__()
        self.config = c = config
        self.text_in = nn.Sequential(nn.LayerNorm(c.text_width, eps=c.eps), nn.Linear(c.text_width, c.width))
        self.image_in = nn.Sequential(
            nn.LayerNorm(c.vision_width, eps=c.eps), nn.Linear(c.vision_width, c.width)
        )
        self.position = nn.Linear(4 * c.position_freqs, c.width) if c.position_freqs else None
        self.cls = nn.Parameter(torch.zeros(c.width))
        self.null = nn.Parameter(torch.zeros(c.width))
        self.text_blocks = nn.ModuleList(FusionBlock(c, cross=False) for _ in range(c.text_layers))
        self.blocks = nn.ModuleList(FusionBlock(c, cross=True) for _ in range(c.layers))
        self.norm_out = nn.LayerNorm(c.width, eps=c.eps)
        self.head = nn.Linear(c.width, 1)
        # the CLIP's cosine similarity, scaled and shifted into a logit; the head's own output starts small
        self.sim_scale = nn.Parameter(torch.tensor(10.0))
        self.sim_bias = nn.Parameter(torch.tensor(-5.0))
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.null, std=0.02)

    def check_clip(self, clip: CLIP) -> None:
        t, v, c = clip.config.text, clip.config.vision, self.config
        if (t.width, v.width, t.eos_token_id) != (c.text_width, c.vision_width, c.eos_token_id):
            raise ValueError(
                f"this matcher reads a CLIP with text width {c.text_width}, vision width {c.vision_width} and end "
                f"token {c.eos_token_id}, got {t.width}, {v.width} and {t.eos_token_id}: pass the CLIP it was "
                "trained on (the bundle's clip.safetensors)"
            )

    def forward(
        self, clip: CLIP, pixels: torch.Tensor, ids: torch.Tensor, image_of: torch.Tensor | None = None
    ) -> torch.Tensor:
        """clip: the frozen CLIP the head was trained on; pixels (N, 3, S, S) normalised for it
        (`pipelines.clip.clip_pixels`); ids (M, T) token ids; image_of (M,) long, the image each caption is
        paired with (None: caption m with image m, M == N). Each image is encoded once."""
        if image_of is None and pixels.shape[0] != ids.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {ids.shape[0]} captions: pass one caption per image, "
                             "or image_of")  # fmt: skip
        with torch.no_grad():  # the CLIP is not trained here
            vision = clip.vision_model(pixels)
            text = clip.text_model(ids)
            image_embeds = F.normalize(clip.visual_projection(vision.pooled), dim=-1)  # (N, D)
            text_embeds = F.normalize(clip.text_projection(text.pooled), dim=-1)  # (M, D)
        image_states = vision.last_hidden_state  # (N, 1 + P, Cv)
        if image_of is not None:
            image_states, image_embeds = (
                image_states[image_of],
                image_embeds[image_of],
            )  # (N, ...) -> (M, ...)
        M = ids.shape[0]
        image = self.image_in(image_states)  # (M, 1 + P, C)
        if self.position is not None:  # the patches' places (the class token has none)
            side = int(round((image.shape[1] - 1) ** 0.5))
            places = position_fourier_features(side, side, self.config.position_freqs, image.device, image.dtype)
            image = image + F.pad(self.position(places), (0, 0, 1, 0))[None]  # (P, C) -> (1, 1 + P, C)
        image = torch.cat([self.null.to(image.dtype).expand(M, 1, -1), image], 1)  # (M, 2 + P, C)
        x = self.text_in(text.last_hidden_state)  # (M, T, C)
        x = torch.cat([self.cls.to(x.dtype).expand(M, 1, -1), x], 1)  # (M, 1 + T, C)
        mask = torch.cat(
            [ids.new_ones(M, 1, dtype=torch.bool), prompt_mask(ids, self.config.eos_token_id)], 1
        )
        for block in self.text_blocks:
            x = block(x, mask, None)
        for block in self.blocks:
            x = block(x, mask, image)
        similarity = (image_embeds * text_embeds).sum(-1).to(x.dtype)  # (M,)
        return self.head(self.norm_out(x[:, 0])).squeeze(-1) + self.sim_scale * similarity + self.sim_bias
