"""CLIP: a causal text transformer, a vision transformer and the joint contrastive model.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision" (CLIP);
Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (SigLIP, the optional ``logit_bias``).

Module attribute names mirror transformers' ``CLIPTextModel`` / ``CLIPVisionModel`` / ``CLIPModel``
checkpoint keys (``text_model.encoder.layers.0.self_attn.q_proj.weight``, ``vision_model.pre_layrnorm``,
``visual_projection``, ``logit_scale``, ...), so that

- a transformers / diffusers CLIP checkpoint loads as is,
- an SD 1.x single-file text encoder loads after stripping ``cond_stage_model.transformer.``,
- OpenAI / open_clip state dicts (and SD 2.x text encoders) go through the short rule table in
  ``sfumato.checkpoints.clip_keys``.

Every block is pre-LayerNorm: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sfumato.models.layers import sdpa

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # BPE vocabulary size; 49,408 for OpenAI's vocabulary (bpe_simple_vocab_16e6)
    context_length: int = 77  # number of learned positions, i.e. the longest token sequence
    width: int = 768  # residual stream width (transformers: hidden_size)
    layers: int = 12  # number of transformer blocks
    heads: int = 12  # attention heads; head dim = width / heads (64 in every published CLIP text tower)
    mlp_width: int = 3072  # hidden width of each block's MLP (4 * width in published models)
    act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI weights) or "gelu" (OpenCLIP LAION)
    eps: float = 1e-5  # LayerNorm epsilon
    eos_token_id: int = 49407  # pooled output is read at the first position holding this id (<|endoftext|>)
    projection_dim: int | None = None  # size of `text_projection` (joint embedding); None: no projection

    def __post_init__(self):
        _check_tower("CLIPTextConfig", self.width, self.heads, self.act)
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"CLIPTextConfig.eos_token_id must be a token id below vocab_size={self.vocab_size}, got "
                f"{self.eos_token_id}; set it to the tokenizer's end token (tokenizer.eos_token_id)"
            )


@dataclass
class CLIPVisionConfig:
    image_size: int = 224  # side of the square input image in pixels
    patch_size: int = 14  # side of each square patch; image_size must be a multiple of it
    channels: int = 3  # input image channels
    width: int = 1024  # residual stream width (transformers: hidden_size)
    layers: int = 24  # number of transformer blocks
    heads: int = 16  # attention heads; head dim = width / heads
    mlp_width: int = 4096  # hidden width of each block's MLP
    act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI weights) or "gelu" (OpenCLIP LAION)
    eps: float = 1e-5  # LayerNorm epsilon
    projection_dim: int | None = None  # size of `visual_projection` (joint embedding); None: no projection

    def __post_init__(self):
        _check_tower("CLIPVisionConfig", self.width, self.heads, self.act)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig.image_size={self.image_size} is not a multiple of patch_size="
                f"{self.patch_size}; use e.g. {self.image_size // self.patch_size * self.patch_size}"
            )


@dataclass
class CLIPConfig:
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)  # text tower; projection_dim = joint size
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)  # vision tower, same projection_dim
    logit_scale_init: float = math.log(1 / 0.07)  # initial log temperature (CLIP: 1/0.07; SigLIP: log 10)
    logit_bias_init: float | None = None  # SigLIP's learnable logit bias (init -10); None: plain CLIP

    def __post_init__(self):
        # Accept the nested dicts that `dataclasses.asdict` writes, so CLIPConfig(**asdict(c)) == c.
        if isinstance(self.text, dict):
            self.text = CLIPTextConfig(**self.text)
        if isinstance(self.vision, dict):
            self.vision = CLIPVisionConfig(**self.vision)
        if self.text.projection_dim is None or self.text.projection_dim != self.vision.projection_dim:
            raise ValueError(
                "CLIPConfig needs both towers to project into one joint space, got text.projection_dim="
                f"{self.text.projection_dim} and vision.projection_dim={self.vision.projection_dim}; "
                "set both to the joint embedding size (768 for ViT-L/14, 512 for ViT-B/32)"
            )

    @property
    def embed_dim(self) -> int:
        return self.text.projection_dim


def _check_tower(name: str, width: int, heads: int, act: str) -> None:
    if heads < 1 or width % heads:
        raise ValueError(f"{name}.width={width} is not divisible by heads={heads}; pick heads = width // 64")
    if act not in ACTIVATIONS:
        raise ValueError(f"{name}.act must be one of {ACTIVATIONS}, got {act!r}")


# Text towers as text-to-image models use them (no projection unless the checkpoint carries one).
TEXT_PRESETS: dict[str, CLIPTextConfig] = {
    # OpenAI CLIP ViT-L/14 text tower: the SD 1.x text encoder (openai/clip-vit-large-patch14).
    "vit-l-14": CLIPTextConfig(width=768, layers=12, heads=12, mlp_width=3072, act="quick_gelu"),
    # OpenCLIP ViT-H/14 (LAION-2B) text tower used by SD 2.x: open_clip model_configs/ViT-H-14.json.
    # SD 2.x reads the penultimate layer: call it with skip=1. Its single files carry `text_projection`.
    "vit-h-14-text": CLIPTextConfig(
        width=1024, layers=24, heads=16, mlp_width=4096, act="gelu", projection_dim=1024
    ),
    # OpenAI CLIP ViT-B/32 text tower.
    "vit-b-32": CLIPTextConfig(width=512, layers=12, heads=8, mlp_width=2048, act="quick_gelu"),
    # Tiny towers for tests and from-scratch toy training.
    "tiny": CLIPTextConfig(width=64, layers=2, heads=4, mlp_width=256, projection_dim=32),
}

# Joint image-text models.
PRESETS: dict[str, CLIPConfig] = {
    # OpenAI ViT-L/14 (transformers: openai/clip-vit-large-patch14).
    "vit-l-14": CLIPConfig(
        text=CLIPTextConfig(width=768, layers=12, heads=12, mlp_width=3072, projection_dim=768),
        vision=CLIPVisionConfig(
            image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_width=4096, projection_dim=768
        ),
    ),
    # OpenAI ViT-B/32 (transformers: openai/clip-vit-base-patch32).
    "vit-b-32": CLIPConfig(
        text=CLIPTextConfig(width=512, layers=12, heads=8, mlp_width=2048, projection_dim=512),
        vision=CLIPVisionConfig(
            image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_width=3072, projection_dim=512
        ),
    ),
    # OpenCLIP ViT-H/14 (LAION-2B); the vision tower has head dim 80 (open_clip ViT-H-14.json "head_width").
    "vit-h-14": CLIPConfig(
        text=CLIPTextConfig(width=1024, layers=24, heads=16, mlp_width=4096, act="gelu", projection_dim=1024),
        vision=CLIPVisionConfig(
            image_size=224, patch_size=14, width=1280, layers=32, heads=16, mlp_width=5120, act="gelu",
            projection_dim=1024,
        ),
    ),
    "tiny": CLIPConfig(
        text=CLIPTextConfig(width=64, layers=2, heads=4, mlp_width=256, projection_dim=32),
        vision=CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_width=256,
                                projection_dim=32),
    ),
    # Same towers, SigLIP head: sigmoid loss needs a learnable bias; Zhai et al. 2023 initialise
    # t' = log 10 and b = -10.
    "tiny-siglip": CLIPConfig(
        text=CLIPTextConfig(width=64, layers=2, heads=4, mlp_width=256, projection_dim=32),
        vision=CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_width=256,
                                projection_dim=32),
        logit_scale_init=math.log(10.0),
        logit_bias_init=-10.0,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Blocks shared by both towers


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """Sigmoid approximation of GELU (Hendrycks & Gimpel 2016, sec. 2) that OpenAI CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (transformers' key layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: None or (B, T) bool, True for the tokens that may be attended to (not with `causal`)."""
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hd)
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        keys = None if mask is None else mask[:, None, None, :]  # (B, T) -> (B, 1, 1, T)
        y = sdpa(q, k, v, attn_mask=keys, is_causal=causal)  # scale 1/sqrt(hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hd) -> (B, T, C)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu  # F.gelu: exact erf form, as nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN residual block (Radford et al. 2019, GPT-2 sec. 2.3 layout)."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, act)

    def forward(self, x: torch.Tensor, causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal, mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        c = config
        self.layers = nn.ModuleList(
            EncoderLayer(c.width, c.heads, c.mlp_width, c.act, c.eps) for _ in range(c.layers)
        )

    def forward(self, x: torch.Tensor, causal: bool) -> tuple[torch.Tensor, ...]:
        """Returns the input and every block's output: ``len(layers) + 1`` tensors of shape (B, T, C)."""
        states = [x]
        for layer in self.layers:
            x = layer(x, causal)
            states.append(x)
        return tuple(states)


def prompt_mask(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) bool: True from the start token through the first end token, False for the padding after it
    (a row without an end token, one cut at the context length, is all True). What a U-Net with
    `UNetConfig.mask_padding` attends to."""
    is_eos = ids == eos_token_id  # (B, T)
    before = is_eos.int().cumsum(dim=1) - is_eos.int()  # end tokens strictly before each position
    return before == 0


def _init_encoder(encoder: Encoder, width: int) -> None:
    """OpenAI CLIP's initialisation (clip/model.py `initialize_parameters`); a no-op on the meta device."""
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * len(encoder.layers)) ** -0.5
    fc_std = (2 * width) ** -0.5
    for layer in encoder.layers:
        for lin, std in ((layer.self_attn.q_proj, attn_std), (layer.self_attn.k_proj, attn_std),
                         (layer.self_attn.v_proj, attn_std), (layer.self_attn.out_proj, proj_std),
                         (layer.mlp.fc1, fc_std), (layer.mlp.fc2, proj_std)):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)


def _drop_position_ids(state_dict, prefix, *args) -> None:
    # transformers < 4.31 saved the arange `embeddings.position_ids` buffer (SD 1.x single files carry it,
    # sometimes as a float tensor with rounding damage); positions are always 0..T-1, so it is dropped.
    state_dict.pop(prefix + "position_ids", None)


# ---------------------------------------------------------------------------------------------------------
# Text tower


class TextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)
        self._register_load_state_dict_pre_hook(_drop_position_ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if T > self.position_embedding.num_embeddings:
            raise ValueError(
                f"token sequence of length {T} is longer than the model's context_length="
                f"{self.position_embedding.num_embeddings}; truncate it in the tokenizer"
            )
        return self.token_embedding(ids) + self.position_embedding.weight[:T]  # (B, T, C)


@dataclass
class TextOutput:
    last_hidden_state: torch.Tensor  # (B, T, C) final LN of the hidden state `skip` blocks before the last
    pooled: torch.Tensor  # (B, C) final-layer state (with final LayerNorm) at the end-of-text token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each block's output, no final LN
    embeds: torch.Tensor | None = None  # (B, projection_dim) text_projection(pooled), when the model has one


class TextTransformer(nn.Module):
    """Token + position embeddings, causal pre-LN blocks, final LayerNorm (transformers: `text_model`)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.eps)
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        _init_encoder(self.encoder, config.width)

    def forward(self, ids: torch.Tensor, skip: int = 0) -> TextOutput:
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, T) token ids, got shape {tuple(ids.shape)}")
        n = len(self.encoder.layers)
        if not 0 <= skip < n:
            raise ValueError(f"skip must be in [0, {n - 1}] for a {n}-layer text model, got {skip}")
        states = self.encoder(self.embeddings(ids), causal=True)  # (layers + 1) x (B, T, C)
        final = self.final_layer_norm(states[-1])
        hidden = final if skip == 0 else self.final_layer_norm(states[-1 - skip])
        # Pool at the first end-of-text token (transformers' rule since PR #24773; it equals OpenAI's
        # `argmax(ids)` because <|endoftext|> is the largest id and padding comes after it).
        # A row without the token pools position 0.
        eos = (ids == self.config.eos_token_id).int().argmax(dim=-1)  # (B,)
        pooled = final[torch.arange(ids.shape[0], device=ids.device), eos]  # (B, C)
        return TextOutput(last_hidden_state=hidden, pooled=pooled, hidden_states=states)


class CLIPTextModel(nn.Module):
    """The CLIP text encoder; keys `text_model.*` (+ `text_projection.weight` when projection_dim is set).

    ``skip`` gives the conditioning SD 2.x and "clip skip" use: the final LayerNorm applied to the
    hidden state ``skip`` blocks before the last (``hidden_states[-(skip + 1)]``); ``skip=0`` is the usual
    last hidden state, SD 2.x uses ``skip=1``, diffusers' ``clip_skip=n`` is ``skip=n`` and A1111's
    "Clip skip: n" is ``skip=n - 1``. ``pooled`` and ``embeds`` always come from the last block.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        self.text_projection = None
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)
            nn.init.normal_(self.text_projection.weight, std=config.width**-0.5)

    def forward(self, ids: torch.Tensor, *, skip: int = 0, output_hidden_states: bool = False) -> TextOutput:
        """ids: (B, T) LongTensor from the tokenizer, T <= context_length."""
        out = self.text_model(ids, skip)
        if self.text_projection is not None:
            out.embeds = self.text_projection(out.pooled)
        if not output_hidden_states:
            out.hidden_states = None
        return out


# ---------------------------------------------------------------------------------------------------------
# Vision tower


class VisionEmbeddings(nn.Module):
    """Strided-conv patches, a prepended class token, learned positions (Dosovitskiy et al. 2021)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(config.width))
        self.patch_embedding = nn.Conv2d(
            config.channels, config.width, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        n_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(n_positions, config.width)
        self._register_load_state_dict_pre_hook(_drop_position_ids)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixels.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(
                f"image of size {H}x{W} does not match the model's image_size={self.image_size}; "
                f"resize / center-crop it to {self.image_size}x{self.image_size}"
            )
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, C, H/p, W/p) -> (B, N, C)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, C)
        return x + self.position_embedding.weight


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (B, 1 + N, C) last block's output (no post LN), class token first
    pooled: torch.Tensor  # (B, C) post_layernorm of the class token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # pre-LN embeddings + each block's output
    embeds: torch.Tensor | None = None  # (B, projection_dim) visual_projection(pooled), if the model has one


class VisionTransformer(nn.Module):
    """ViT with CLIP's extra LayerNorm before the blocks (transformers: `vision_model`)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.eps)  # (sic) the checkpoint's spelling
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.width, eps=config.eps)
        scale = config.width**-0.5
        nn.init.normal_(self.embeddings.class_embedding, std=scale)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=scale)
        _init_encoder(self.encoder, config.width)

    def forward(self, pixels: torch.Tensor) -> VisionOutput:
        x = self.pre_layrnorm(self.embeddings(pixels))  # (B, 1 + N, C)
        states = self.encoder(x, causal=False)
        pooled = self.post_layernorm(states[-1][:, 0])  # class token, (B, C)
        return VisionOutput(last_hidden_state=states[-1], pooled=pooled, hidden_states=states)


class CLIPVisionModel(nn.Module):
    """The CLIP image encoder; keys `vision_model.*` (+ `visual_projection.weight` with projection_dim)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = None
        if config.projection_dim is not None:
            self.visual_projection = nn.Linear(config.width, config.projection_dim, bias=False)
            nn.init.normal_(self.visual_projection.weight, std=config.width**-0.5)

    def forward(self, pixels: torch.Tensor, *, output_hidden_states: bool = False) -> VisionOutput:
        """pixels: (B, channels, image_size, image_size), normalised with CLIP's mean/std."""
        out = self.vision_model(pixels)
        if self.visual_projection is not None:
            out.embeds = self.visual_projection(out.pooled)
        if not output_hidden_states:
            out.hidden_states = None
        return out


# ---------------------------------------------------------------------------------------------------------
# Joint model


class CLIP(nn.Module):
    """Both towers, their projections into the joint space and the learnable temperature (and SigLIP bias).

    Keys match transformers' ``CLIPModel``: ``text_model.*``, ``vision_model.*``, ``text_projection.weight``,
    ``visual_projection.weight``, ``logit_scale`` (+ ``logit_bias`` for SigLIP).
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        t, v = config.text, config.vision
        self.text_model = TextTransformer(t)
        self.vision_model = VisionTransformer(v)
        self.text_projection = nn.Linear(t.width, config.embed_dim, bias=False)
        self.visual_projection = nn.Linear(v.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = None
        if config.logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))
        nn.init.normal_(self.text_projection.weight, std=t.width**-0.5)
        nn.init.normal_(self.visual_projection.weight, std=v.width**-0.5)

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, T) token ids -> (B, embed_dim) text embeddings."""
        x = self.text_projection(self.text_model(ids).pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) image embeddings."""
        x = self.visual_projection(self.vision_model(pixels).pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``logits_per_image`` (B_img, B_txt) and ``logits_per_text`` (B_txt, B_img).

        logits = exp(logit_scale) * cos(image, text) (+ logit_bias for SigLIP). The scale is not clamped
        here; OpenAI clamp it to at most 100 during training (that belongs to the training step).
        """
        image = self.encode_image(pixels, normalize=True)  # (B_img, D)
        text = self.encode_text(ids, normalize=True)  # (B_txt, D)
        logits_per_text = self.logit_scale.exp() * text @ image.t()  # (B_txt, B_img)
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        return logits_per_text.t(), logits_per_text
