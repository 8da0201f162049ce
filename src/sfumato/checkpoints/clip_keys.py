"""CLIP state dicts: OpenAI / open_clip names <-> sfumato (= transformers) names, config inference, loading.

sfumato's CLIP modules already use transformers' key names (``sfumato.models.clip``), so a transformers
or diffusers checkpoint, and an SD 1.x single-file text encoder after stripping
``cond_stage_model.transformer.``, need no renames. This file handles the other layout: OpenAI's
``clip/model.py`` and open_clip's ``CLIP`` (and SD 2.x single files, whose text encoder sits under
``cond_stage_model.model.``). The differences are fused q/k/v (``attn.in_proj_weight``, rows ordered
q, k, v as in ``nn.MultiheadAttention``) and projections stored as (width, embed_dim) matrices applied
as ``x @ proj``, i.e. the transpose of a Linear weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

# One rule per tensor: (OpenAI / open_clip name, sfumato name, how the tensor changes, its rank).
# `{i}` is a block index, `{p}` is weight|bias, `{qkv}` stands for the three keys q, k, v that one fused
# open_clip tensor is split into. Kinds: "copy"; "T" transpose; "qkv" split in 3 along dim 0.
_BLOCK = [
    ("attn.in_proj_{p}", "self_attn.{qkv}_proj.{p}", "qkv", None),
    ("attn.out_proj.{p}", "self_attn.out_proj.{p}", "copy", None),
    ("ln_1.{p}", "layer_norm1.{p}", "copy", 1),
    ("mlp.c_fc.{p}", "mlp.fc1.{p}", "copy", None),
    ("mlp.c_proj.{p}", "mlp.fc2.{p}", "copy", None),
    ("ln_2.{p}", "layer_norm2.{p}", "copy", 1),
]
RULES: list[tuple[str, str, str, int | None]] = [
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "copy", 2),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", "copy", 2),
    *[("transformer.resblocks.{i}." + a, "text_model.encoder.layers.{i}." + b, k, n)
      for a, b, k, n in _BLOCK],
    ("ln_final.{p}", "text_model.final_layer_norm.{p}", "copy", 1),
    ("text_projection", "text_projection.weight", "T", 2),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "copy", 4),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", "copy", 1),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "copy", 2),
    ("visual.ln_pre.{p}", "vision_model.pre_layrnorm.{p}", "copy", 1),
    *[("visual.transformer.resblocks.{i}." + a, "vision_model.encoder.layers.{i}." + b, k, n)
      for a, b, k, n in _BLOCK],
    ("visual.ln_post.{p}", "vision_model.post_layernorm.{p}", "copy", 1),
    ("visual.proj", "visual_projection.weight", "T", 2),
    ("logit_scale", "logit_scale", "copy", 0),
    ("logit_bias", "logit_bias", "copy", 0),  # SigLIP-style open_clip models
]
# OpenAI's TorchScript archives keep these Python ints as tensors; open_clip drops them too.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

_FIELDS = {"{i}": r"(?P<i>\d+)", "{p}": r"(?P<p>weight|bias)", "{qkv}": r"(?P<qkv>[qkv])"}


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template)
    for name, group in _FIELDS.items():
        regex = regex.replace(re.escape(name), group)
    return re.compile(regex)


_COMPILED = [((_pattern(a), _pattern(b)), (a, b), kind, ndim) for a, b, kind, ndim in RULES]


def _find(name: str, side: int):
    """The rule whose name on `side` (0: OpenAI / open_clip, 1: sfumato) matches, and its fields."""
    for patterns, templates, kind, ndim in _COMPILED:
        m = patterns[side].fullmatch(name)
        if m:
            return templates, kind, ndim, m.groupdict()
    return None


def _fill(template: str, fields: dict[str, str]) -> str:
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template


def _check_rank(key: str, t: torch.Tensor, kind: str, ndim: int | None, fields: dict[str, str]) -> None:
    if kind == "qkv":
        ndim = 2 if fields["p"] == "weight" else 1
    elif ndim is None:
        ndim = 2 if fields.get("p") == "weight" else 1
    if t.ndim != ndim:
        raise ValueError(f"{key}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if kind == "qkv" and (t.shape[0] % 3 or (t.ndim == 2 and t.shape[0] != 3 * t.shape[1])):
        raise ValueError(
            f"{key}: a fused q/k/v tensor must be (3C, C) or (3C,), got shape {tuple(t.shape)}"
        )


def from_openai_clip(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """OpenAI / open_clip CLIP keys -> sfumato keys (text tower, vision tower or both).

    Only keys starting with ``prefix`` are read (``"cond_stage_model.model."`` for an SD 2.x single file);
    every one of them must match a rule, else a KeyError names it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in OPENAI_METADATA_KEYS:
            continue
        rule = _find(name, 0)
        if rule is None:
            raise KeyError(
                f"{key!r} is not an OpenAI / open_clip CLIP key that sfumato knows (text and ViT towers, "
                "no ResNet, no layer scale, no attention pooling); remove it or convert it yourself"
            )
        (_, dst), kind, ndim, fields = rule
        _check_rank(key, t, kind, ndim, fields)
        if kind == "qkv":
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[_fill(dst, {**fields, "qkv": part})] = chunk.clone()  # own storage, safetensors-safe
        else:
            out[_fill(dst, fields)] = t.t().contiguous() if kind == "T" else t
    return out


def to_openai_clip(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """sfumato (= transformers) CLIP keys -> OpenAI / open_clip keys, each prefixed with ``prefix``."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # open_clip key -> {"q": ..., "k": ..., "v": ...}
    for key, t in state_dict.items():
        if key.endswith("embeddings.position_ids"):  # legacy transformers buffer, always arange(T)
            continue
        rule = _find(key, 1)
        if rule is None:
            raise KeyError(f"{key!r} is not a sfumato CLIP key; expected the names of models.clip.CLIP")
        (src, _), kind, ndim, fields = rule
        name = prefix + _fill(src, fields)
        _check_rank(key, t, "copy" if kind == "qkv" else kind, ndim, fields)  # one of q, k, v: (C, C) / (C,)
        if kind == "qkv":
            fused.setdefault(name, {})[fields["qkv"]] = t
        else:
            out[name] = t.t().contiguous() if kind == "T" else t
    for name, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            missing = sorted(set("qkv") - set(parts))
            raise KeyError(f"cannot fuse {name!r}: the {missing} projection(s) are missing")
        shapes = {p: tuple(parts[p].shape) for p in "qkv"}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"cannot fuse {name!r}: q/k/v shapes differ: {shapes}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3C, C) or (3C,)
    return out


def from_transformers(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A transformers CLIP state dict -> sfumato keys.

    Published checkpoints (``openai/clip-vit-large-patch14``, diffusers ``text_encoder/``) and SD 1.x single
    files (``prefix="cond_stage_model.transformer."``) already use our names and only lose ``prefix``.
    transformers >= 5 builds ``CLIPTextModel`` / ``CLIPVisionModel`` without the ``text_model.`` /
    ``vision_model.`` level, so such in-memory state dicts get it back here.
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if any(k.startswith("final_layer_norm.") for k in sd):
        sd = {k if k == "text_projection.weight" else "text_model." + k: v for k, v in sd.items()}
    elif any(k.startswith("pre_layrnorm.") for k in sd):
        sd = {k if k == "visual_projection.weight" else "vision_model." + k: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


# Vision towers whose head dim is not 64 (open_clip model_configs "head_width"): ViT-H/14 80, ViT-g/14 88,
# ViT-bigG/14 104; all three have 16 heads. Text towers of every published CLIP use head dim 64.
_VISION_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


def _count_layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found != set(range(len(found))):
        raise KeyError(f"blocks under {prefix!r} are not numbered 0..n-1: found {sorted(found)}")
    return len(found)


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    act: str,
    eos_token_id: int | None = None,
    text_heads: int | None = None,
    vision_heads: int | None = None,
) -> CLIPConfig | CLIPTextConfig | CLIPVisionConfig:
    """Build the config of a sfumato-keyed CLIP state dict from its tensor shapes.

    Returns a ``CLIPConfig`` when both towers are present, else the one tower's config. What shapes cannot
    tell is asked for: ``act`` ("quick_gelu" for OpenAI weights, "gelu" for OpenCLIP LAION weights such as
    SD 2.x's text encoder), and ``eos_token_id`` (default: the last id, as in OpenAI's vocabulary). Heads
    default to width / 64 (text) and width / 64 or the known open_clip ViT-H/g/bigG values (vision).
    """
    text = vision = None
    if "text_model.embeddings.token_embedding.weight" in state_dict:
        vocab, width = state_dict["text_model.embeddings.token_embedding.weight"].shape
        proj = state_dict.get("text_projection.weight")
        text = CLIPTextConfig(
            vocab_size=vocab,
            context_length=state_dict["text_model.embeddings.position_embedding.weight"].shape[0],
            width=width,
            layers=_count_layers(state_dict, "text_model.encoder.layers."),
            heads=text_heads or width // 64,
            mlp_width=state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            act=act,
            eos_token_id=vocab - 1 if eos_token_id is None else eos_token_id,
            projection_dim=None if proj is None else proj.shape[0],
        )
    if "vision_model.embeddings.class_embedding" in state_dict:
        width = state_dict["vision_model.embeddings.class_embedding"].shape[0]
        _, channels, patch, _ = state_dict["vision_model.embeddings.patch_embedding.weight"].shape
        n_positions = state_dict["vision_model.embeddings.position_embedding.weight"].shape[0]
        grid = round((n_positions - 1) ** 0.5)
        if grid * grid + 1 != n_positions:
            raise ValueError(
                f"vision_model.embeddings.position_embedding.weight has {n_positions} rows; expected a "
                "square grid of patches plus one class token"
            )
        proj = state_dict.get("visual_projection.weight")
        vision = CLIPVisionConfig(
            image_size=grid * patch,
            patch_size=patch,
            channels=channels,
            width=width,
            layers=_count_layers(state_dict, "vision_model.encoder.layers."),
            heads=vision_heads or _VISION_HEADS_BY_WIDTH.get(width, width // 64),
            mlp_width=state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            act=act,
            projection_dim=None if proj is None else proj.shape[0],
        )
    if text is not None and vision is not None:
        if "logit_bias" in state_dict:  # SigLIP head; init values of Zhai et al. 2023, loaded over anyway
            return CLIPConfig(text=text, vision=vision, logit_scale_init=math.log(10), logit_bias_init=-10.0)
        return CLIPConfig(text=text, vision=vision)
    if text is None and vision is None:
        raise KeyError(
            "found neither text_model.embeddings.token_embedding.weight nor "
            "vision_model.embeddings.class_embedding; convert OpenAI / open_clip keys with from_openai_clip"
        )
    return text if text is not None else vision


def load_clip_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Strict load into a sfumato CLIP module; an unexpected, missing or mis-shaped key is an error naming it.

    ``assign=True`` keeps the checkpoint's tensors (for a model built on ``torch.device("meta")``).
    Keys of a joint checkpoint that a one-tower model lacks (``logit_scale``, the other tower) are errors
    too, not silently dropped: pass only the keys the model owns.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
    unexpected = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given))
    if unexpected:
        raise KeyError(
            f"{type(model).__name__} has no parameter {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more unexpected keys)" if len(unexpected) > 1 else "")
            + "; convert OpenAI / open_clip names with from_openai_clip, or drop keys of the other tower"
        )
    if missing:
        raise KeyError(
            f"the state dict lacks {missing[0]!r}"
            + (f" (and {len(missing) - 1} more missing keys)" if len(missing) > 1 else "")
            + f" needed by {type(model).__name__}; is the config right? infer_config(state_dict, act=...) "
            "builds one that matches"
        )
    for k, shape in expected.items():
        if tuple(given[k].shape) != shape:
            raise ValueError(
                f"{k}: checkpoint shape {tuple(given[k].shape)} does not match the model's {shape}; "
                "build the model from infer_config(state_dict, act=...)"
            )
    model.load_state_dict(given, strict=True, assign=assign)
