"""Key names and configs between diffusers and ours (= the original CompVis/ldm names) for U-Net and VAE.

Our modules carry the ldm names, so an SD single-file checkpoint needs only a prefix strip
(`LDM_UNET_PREFIX`, `LDM_VAE_PREFIX`). diffusers renames the blocks; the correspondence is a short
table of rules, built per config because block indices depend on the number of ResBlocks per level:

    one rule per block:   diffusers prefix <-> ldm prefix   down_blocks.1.resnets.0. <-> input_blocks.4.0.
    inside some blocks:   diffusers module <-> ldm module   norm1 <-> in_layers.0, to_q <-> q

A key is translated by its block rule and, where the block has one, its module table; the rest of the
key passes through unchanged. The result is then checked against the shapes of our model for that
config (built on the meta device, so no memory is spent): an unknown key, a key left over, a missing
key or a shape that differs raises a ValueError naming the key. The only reshape is between a 1x1 conv
(C, C, 1, 1) and a Linear (C, C), and only in the one block where the two sides differ so (the VAE's
mid-block attention: 1x1 convs in ldm, Linear in diffusers). SD 1.x's 1x1-conv and SD 2.x's Linear
transformer projections are the same in both libraries; a mismatch there means a wrong config.

The facts behind the tables are those of diffusers' own converter
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`),
which the tests run against our state dicts.
"""

from dataclasses import dataclass

import torch

from sfumato.checkpoints.native import on_meta
from sfumato.models.unet import UNet, UNetConfig
from sfumato.models.vae import AutoencoderKL, VAEConfig

LDM_UNET_PREFIX = "model.diffusion_model."  # where a single-file SD checkpoint keeps the U-Net
LDM_VAE_PREFIX = "first_stage_model."  # ... and the VAE

# Module renames inside a block, (diffusers, ldm). Where diffusers has two names for one module (the
# deprecated VAE attention names still found in SD 1.x-era diffusers weights), the first is canonical.
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_RESNET = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("conv_shortcut", "nin_shortcut"),
)
_VAE_ATTN = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
    ("query", "q"),
    ("key", "k"),
    ("value", "v"),
    ("proj_attn", "proj_out"),
)


@dataclass(frozen=True)
class _Rule:
    diffusers: str  # key prefix on the diffusers side, ending in "."
    ldm: str  # the same block's key prefix on our (ldm) side
    modules: tuple[tuple[str, str], ...] | None = None  # (diffusers, ldm) module renames; None: names agree
    linear_in_diffusers: bool = False  # ldm's 1x1-conv weights here are Linear weights in diffusers


def _unet_rules(c: UNetConfig) -> list[_Rule]:
    """Block correspondence of diffusers' UNet2DConditionModel and ldm's UNetModel for one config."""
    rules = [
        _Rule("conv_in.", "input_blocks.0.0."),
        _Rule("time_embedding.linear_1.", "time_embed.0."),
        _Rule("time_embedding.linear_2.", "time_embed.2."),
        _Rule("class_embedding.linear_1.", "label_emb.0.0."),  # class_embed_type="projection"
        _Rule("class_embedding.linear_2.", "label_emb.0.2."),
        _Rule("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        _Rule("mid_block.attentions.0.", "middle_block.1."),
        _Rule("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
        _Rule("conv_norm_out.", "out.0."),
        _Rule("conv_out.", "out.2."),
    ]
    n, per_level = len(c.channel_mult), c.num_res_blocks + 1
    for level in range(n):
        # down path: after conv_in, each level has num_res_blocks stages, then one downsampler stage
        d, has_attn = f"down_blocks.{level}.", 2**level in c.attention_resolutions
        for j in range(c.num_res_blocks):
            i = 1 + level * per_level + j
            rules.append(_Rule(f"{d}resnets.{j}.", f"input_blocks.{i}.0.", _UNET_RESNET))
            if has_attn:
                rules.append(_Rule(f"{d}attentions.{j}.", f"input_blocks.{i}.1."))
        if level < n - 1:
            rules.append(_Rule(f"{d}downsamplers.0.conv.", f"input_blocks.{(level + 1) * per_level}.0.op."))
        # up path: diffusers' up_blocks.b is level n-1-b, with num_res_blocks + 1 stages; the upsampler
        # sits in the last stage, after the ResBlock and (where the level has one) the transformer
        b = n - 1 - level
        u = f"up_blocks.{b}."
        for j in range(per_level):
            i = b * per_level + j
            rules.append(_Rule(f"{u}resnets.{j}.", f"output_blocks.{i}.0.", _UNET_RESNET))
            if has_attn:
                rules.append(_Rule(f"{u}attentions.{j}.", f"output_blocks.{i}.1."))
        if level > 0:
            last = b * per_level + c.num_res_blocks
            rules.append(
                _Rule(f"{u}upsamplers.0.conv.", f"output_blocks.{last}.{2 if has_attn else 1}.conv.")
            )
    return rules


def _vae_rules(c: VAEConfig) -> list[_Rule]:
    """Block correspondence of diffusers' AutoencoderKL and ldm's AutoencoderKL for one config."""
    rules = [_Rule("quant_conv.", "quant_conv."), _Rule("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        m = f"{part}.mid_block."
        rules += [
            _Rule(f"{part}.conv_in.", f"{part}.conv_in."),
            _Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
            _Rule(f"{part}.conv_out.", f"{part}.conv_out."),
            _Rule(f"{m}resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
            _Rule(f"{m}attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN, linear_in_diffusers=True),
            _Rule(f"{m}resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
        ]
    n = len(c.ch_mult)
    for level in range(n):
        d, ld = f"encoder.down_blocks.{level}.", f"encoder.down.{level}."
        for j in range(c.num_res_blocks):
            rules.append(_Rule(f"{d}resnets.{j}.", f"{ld}block.{j}.", _VAE_RESNET))
        rules.append(_Rule(f"{d}downsamplers.0.conv.", f"{ld}downsample.conv."))
        # diffusers numbers decoder blocks in execution order (lowest resolution first), ldm by level
        u, lu = f"decoder.up_blocks.{n - 1 - level}.", f"decoder.up.{level}."
        for j in range(c.num_res_blocks + 1):
            rules.append(_Rule(f"{u}resnets.{j}.", f"{lu}block.{j}.", _VAE_RESNET))
        rules.append(_Rule(f"{u}upsamplers.0.conv.", f"{lu}upsample.conv."))
    return rules


def _rename(key: str, rules: list[_Rule], to_ldm: bool) -> tuple[str | None, _Rule | None]:
    """The other side's name of `key` and the rule that gave it; None where no rule knows the key."""
    for rule in rules:
        src, dst = (rule.diffusers, rule.ldm) if to_ldm else (rule.ldm, rule.diffusers)
        if not key.startswith(src):
            continue
        rest = key[len(src) :]
        if rule.modules is None:
            return dst + rest, rule
        module, _, param = rest.rpartition(".")  # "to_out.0.weight" -> "to_out.0", "weight"
        table = {}
        for d, l in rule.modules:
            table.setdefault(d if to_ldm else l, l if to_ldm else d)  # first pair is the canonical name
        return (dst + table[module] + "." + param if module in table else None), rule
    return None, None


def _expected_shapes(model_cls, config) -> dict[str, torch.Size]:
    with on_meta():
        model = model_cls(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _shape_error(key: str, tensor: torch.Tensor, shape: torch.Size, what: str) -> ValueError:
    return ValueError(
        f"{what} key {key!r} has shape {tuple(tensor.shape)}, the config expects {tuple(shape)}; the config "
        "does not describe these weights (check widths, context_dim, heads, use_linear_proj, in_channels)"
    )


def _missing_error(missing: list[str], what: str) -> ValueError:
    return ValueError(
        f"{what} state dict is missing {len(missing)} key(s), first {missing[0]!r}: {missing[:5]}; the "
        "weights are incomplete or the config has more blocks, levels or features than they do"
    )


def _from_diffusers(state_dict, config, rules, model_cls, what) -> dict[str, torch.Tensor]:
    shapes = _expected_shapes(model_cls, config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new, rule = _rename(key, rules, to_ldm=True)
        if new is None or new not in shapes:
            raise ValueError(
                f"unknown diffusers {what} key {key!r}" + (f" (-> {new!r})" if new else "") + "; it has no "
                "counterpart in our model for this config (an unsupported diffusers option or a wrong config)"
            )
        if new in out:
            raise ValueError(f"diffusers {what} key {key!r} duplicates {new!r} (given under two names)")
        if rule.linear_in_diffusers and tensor.ndim == 2 and shapes[new] == (*tensor.shape, 1, 1):
            tensor = tensor[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        if tensor.shape != shapes[new]:
            raise _shape_error(key, tensor, shapes[new], f"diffusers {what}")
        out[new] = tensor
    missing = sorted(set(shapes) - set(out))
    if missing:  # name them as the diffusers weights would
        raise _missing_error([_rename(k, rules, to_ldm=False)[0] for k in missing], f"diffusers {what}")
    return out


def _to_diffusers(state_dict, config, rules, model_cls, what) -> dict[str, torch.Tensor]:
    shapes = _expected_shapes(model_cls, config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new, rule = _rename(key, rules, to_ldm=False)
        if key not in shapes or new is None:
            raise ValueError(f"unknown {what} key {key!r}: not in our model for this config")
        if tensor.shape != shapes[key]:
            raise _shape_error(key, tensor, shapes[key], what)
        if rule.linear_in_diffusers and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        out[new] = tensor
    missing = sorted(set(shapes) - set(state_dict))
    if missing:
        raise _missing_error(missing, what)
    return out


def unet_from_diffusers(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers `UNet2DConditionModel` state dict -> ours (ldm names) for `config`."""
    return _from_diffusers(state_dict, config, _unet_rules(config), UNet, "U-Net")


def _check_diffusers_can_hold(c: UNetConfig) -> None:
    if c.position_freqs:
        raise ValueError(
            f"this U-Net has position embeddings (position_freqs={c.position_freqs}), which diffusers' "
            "UNet2DConditionModel has no place for; keep it as an sfumato bundle (or single-file ldm checkpoint)"
        )
    if c.context_layers:
        raise ValueError(
            f"this U-Net has {c.context_layers} transformer layers over its text context (context_layers), which "
            "diffusers' UNet2DConditionModel has no place for; keep it as an sfumato bundle"
        )
    if c.mask_padding:
        raise ValueError(
            "this U-Net was trained to attend to the prompt's tokens only (mask_padding=True), and diffusers' "
            "StableDiffusionPipeline passes no encoder_attention_mask, so its images would differ; keep it as "
            "an sfumato bundle"
        )


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Our (ldm-named) U-Net state dict -> diffusers `UNet2DConditionModel` names."""
    _check_diffusers_can_hold(config)
    return _to_diffusers(state_dict, config, _unet_rules(config), UNet, "U-Net")


def vae_from_diffusers(state_dict: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict (current or deprecated attention names) -> ours."""
    return _from_diffusers(state_dict, config, _vae_rules(config), AutoencoderKL, "VAE")


def vae_to_diffusers(state_dict: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """Our (ldm-named) VAE state dict -> diffusers `AutoencoderKL` names (current attention names)."""
    return _to_diffusers(state_dict, config, _vae_rules(config), AutoencoderKL, "VAE")


# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------

# diffusers UNet2DConditionModel options our U-Net (ldm's SD U-Net) has no counterpart for: the value we
# implement. A config.json that sets another value is refused rather than silently converted.
_UNET_FIXED = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "attention_type": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "reverse_transformer_layers_per_block": None,
    "mid_block_only_cross_attention": None,
}
# Not architecture (or fp16-only numerics: we always softmax in the input dtype's SDPA kernel): ignored.
_UNET_IGNORED = {
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
    "upcast_attention",
    # used only with addition_embed_type, which must be None
    "addition_time_embed_dim", "addition_embed_type_num_heads",
}  # fmt: skip


def _check_fixed(cfg: dict, fixed: dict, what: str) -> None:
    for name, value in fixed.items():
        if name not in cfg or cfg[name] == value:
            continue
        seen = cfg[name] if isinstance(cfg[name], (list, tuple)) else [cfg[name]]
        if not value and not any(seen):  # None / False / [False, ...] all mean "off"
            continue
        raise ValueError(
            f"diffusers {what} config has {name}={cfg[name]!r}; only {value!r} (Stable Diffusion 1.x/2.x) "
            "is supported"
        )


def _per_level(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}={value!r} needs one entry per level ({n} levels)")
    return values


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """Our UNetConfig from the fields of a diffusers `UNet2DConditionModel` config.json.

    Head counts: diffusers' `attention_head_dim` is (for historical reasons) the number of heads, per
    level or for all; `num_attention_heads`, when set, wins. We map a constant head count to `num_heads`
    (SD 1.x: 8) and a constant width per head to `head_dim` (SD 2.x: [5, 10, 20, 20] over widths
    [320, 640, 1280, 1280] is 64), as ldm's configs are written.
    """
    unknown = set(cfg) - set(_UNET_FIXED) - _UNET_IGNORED - {
        "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
        "layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
        "transformer_layers_per_block", "use_linear_projection", "class_embed_type",
        "projection_class_embeddings_input_dim", "dropout",
    }  # fmt: skip
    if unknown:
        raise ValueError(f"unknown diffusers U-Net config fields {sorted(unknown)}; not an SD 1.x/2.x U-Net?")
    _check_fixed(cfg, _UNET_FIXED, "U-Net")

    widths = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(widths)
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ValueError(
            f"block_out_channels {widths} are not multiples of the first; ldm cannot express that"
        )
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)))
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or up != [
        "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)
    ]:
        raise ValueError(
            f"down_block_types {down} / up_block_types {up}: need (CrossAttn)DownBlock2D and the mirrored "
            "(CrossAttn)UpBlock2D, as in SD 1.x/2.x"
        )
    layers = cfg.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(
                f"layers_per_block={layers} varies per level; ldm's num_res_blocks is one number"
            )
        layers = layers[0]
    depth = set(_per_level(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"))
    if len(depth) != 1:
        raise ValueError(
            f"transformer_layers_per_block={cfg['transformer_layers_per_block']} varies per level"
        )

    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = _per_level(heads, n, "attention_head_dim")
    used = [level for level in range(n) if attn[level]] + [n - 1]  # the middle block uses the last level's
    if len({heads[level] for level in used}) == 1:
        num_heads, head_dim = heads[n - 1], None
    elif len({widths[level] // heads[level] for level in used}) == 1:
        num_heads, head_dim = None, widths[n - 1] // heads[n - 1]
    else:
        raise ValueError(
            f"attention heads {heads} over widths {widths} are neither a constant count nor a constant "
            "head width, which ldm configs cannot express"
        )

    class_embed = cfg.get("class_embed_type")
    if class_embed not in (None, "projection"):
        raise ValueError(f"class_embed_type={class_embed!r}: only None or 'projection' (ldm's label_emb)")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=layers,
        attention_resolutions=tuple(2**level for level in range(n) if attn[level]),
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=depth.pop(),
        context_dim=cfg.get("cross_attention_dim", 1280),
        use_linear_proj=bool(cfg.get("use_linear_projection", False)),
        adm_in_channels=cfg.get("projection_class_embeddings_input_dim") if class_embed else None,
        dropout=cfg.get("dropout", 0.0),
    )


def unet_config_to_diffusers(c: UNetConfig) -> dict:
    """diffusers `UNet2DConditionModel(**config)` arguments for our config."""
    _check_diffusers_can_hold(c)
    n = len(c.channel_mult)
    attn = [2**level in c.attention_resolutions for level in range(n)]
    widths = [c.model_channels * m for m in c.channel_mult]
    cfg = {
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "layers_per_block": c.num_res_blocks,
        # diffusers' historical name for the number of heads
        "attention_head_dim": c.num_heads if c.num_heads is not None else [w // c.head_dim for w in widths],
        "transformer_layers_per_block": c.transformer_depth,
        "cross_attention_dim": c.context_dim,
        "use_linear_projection": c.use_linear_proj,
        "dropout": c.dropout,
    }
    if c.adm_in_channels is not None:
        cfg |= {"class_embed_type": "projection", "projection_class_embeddings_input_dim": c.adm_in_channels}
    return cfg


_VAE_FIXED = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
}
_VAE_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "sample_size",
    "force_upcast",
}


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """Our VAEConfig from the fields of a diffusers `AutoencoderKL` config.json."""
    known = {
        "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
        "layers_per_block", "latent_channels", "scaling_factor", "latents_mean", "latents_std",
    }  # fmt: skip
    unknown = set(cfg) - known - set(_VAE_FIXED) - _VAE_IGNORED
    if unknown:
        raise ValueError(f"unknown diffusers VAE config fields {sorted(unknown)}; not an SD 1.x/2.x VAE?")
    _check_fixed(cfg, _VAE_FIXED, "VAE")
    widths = list(cfg.get("block_out_channels", (64,)))
    n = len(widths)
    if any(w % widths[0] for w in widths):
        raise ValueError(
            f"block_out_channels {widths} are not multiples of the first; ldm cannot express that"
        )
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(cfg.get(name, [block] * n)) != [block] * n:
            raise ValueError(f"{name}={cfg[name]}: only {block} (one per level) is supported")
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 1),
        z_channels=cfg.get("latent_channels", 4),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
        latents_mean=cfg.get("latents_mean"),
        latents_std=cfg.get("latents_std"),
    )


def vae_config_to_diffusers(c: VAEConfig) -> dict:
    """diffusers `AutoencoderKL(**config)` arguments for our config."""
    n = len(c.ch_mult)
    return {
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": [c.ch * m for m in c.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": c.num_res_blocks,
        "latent_channels": c.z_channels,
        "scaling_factor": c.scaling_factor,
        "latents_mean": None if c.latents_mean is None else list(c.latents_mean),
        "latents_std": None if c.latents_std is None else list(c.latents_std),
    }


def _strip(sd: dict, prefix: str) -> dict:
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _require(sd: dict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(
            f"cannot infer the {what} config: key {key!r} is missing; is this an ldm {what} state dict?"
        )
    return sd[key]


def unet_config_from_state_dict(
    state_dict: dict[str, torch.Tensor], *, num_heads: int | None = None, head_dim: int | None = None
) -> UNetConfig:
    """Infer the U-Net architecture from ldm-named weights (ours, or a single-file checkpoint).

    Everything but the attention heads shows in the weight shapes. Heads do not (q/k/v are one matrix),
    so unless given we follow the published ldm configs: 8 heads for context 768 (SD 1.x), 64-channel
    heads for context 1024 (SD 2.x).
    """
    sd = _strip(state_dict, LDM_UNET_PREFIX)
    conv_in = _require(sd, "input_blocks.0.0.weight", "U-Net")
    mc = conv_in.shape[0]
    # walk the down path: a stage is a ResBlock (with maybe a transformer) or a downsampler
    levels: list[list[int]] = [[]]  # per level, the index of each ResBlock stage
    i = 1
    while f"input_blocks.{i}.0.op.weight" in sd or f"input_blocks.{i}.0.in_layers.2.weight" in sd:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(i)
        i += 1
    if len({len(stages) for stages in levels}) != 1 or not levels[0]:
        raise ValueError(f"irregular U-Net down path {levels}; not an ldm UNetModel state dict?")
    mult = tuple(sd[f"input_blocks.{stages[0]}.0.in_layers.2.weight"].shape[0] // mc for stages in levels)
    attn = tuple(2**lv for lv, stages in enumerate(levels) if f"input_blocks.{stages[0]}.1.norm.weight" in sd)
    mid = "middle_block.1."
    context_dim = _require(sd, mid + "transformer_blocks.0.attn2.to_k.weight", "U-Net").shape[1]
    depth = 0
    while f"{mid}transformer_blocks.{depth}.norm1.weight" in sd:
        depth += 1
    if num_heads is None and head_dim is None:
        if context_dim == 768:
            num_heads = 8
        elif context_dim == 1024:
            head_dim = 64
        else:
            raise ValueError(
                f"context_dim {context_dim} is neither SD 1.x's 768 nor SD 2.x's 1024, so the head count is "
                "unknown; pass num_heads= or head_dim= (from the model's ldm yaml)"
            )
    label = sd.get("label_emb.0.0.weight")
    pos = sd.get(mid + "pos_embed.weight")  # ours only (UNetConfig.position_freqs): (inner, 4 * freqs)
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=_require(sd, "out.2.weight", "U-Net").shape[0],
        model_channels=mc,
        channel_mult=mult,
        num_res_blocks=len(levels[0]),
        attention_resolutions=attn,
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_proj=_require(sd, mid + "proj_in.weight", "U-Net").ndim == 2,
        adm_in_channels=None if label is None else label.shape[1],
        position_freqs=0 if pos is None else pos.shape[1] // 4,
    )


def vae_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> VAEConfig:
    """Infer the VAE architecture from ldm-named weights (scaling_factor is not in them: SD's 0.18215)."""
    sd = _strip(state_dict, LDM_VAE_PREFIX)
    conv_in = _require(sd, "encoder.conv_in.weight", "VAE")
    ch = conv_in.shape[0]
    n = 0
    while f"encoder.down.{n}.block.0.conv1.weight" in sd:
        n += 1
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in sd:
        blocks += 1
    return VAEConfig(
        in_channels=conv_in.shape[1],
        out_channels=_require(sd, "decoder.conv_out.weight", "VAE").shape[0],
        ch=ch,
        ch_mult=tuple(sd[f"encoder.down.{lv}.block.0.conv1.weight"].shape[0] // ch for lv in range(n)),
        num_res_blocks=blocks,
        z_channels=_require(sd, "decoder.conv_in.weight", "VAE").shape[1],
    )
