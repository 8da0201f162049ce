"""Original single-file checkpoints (SD 1.x / 2.x, OpenAI / transformers CLIP) and `load_any`.

An SD single file is one state dict with the whole latent diffusion model of the CompVis/Stability code:

    model.diffusion_model.*          U-Net (our names, prefix stripped)
    first_stage_model.*              VAE (our names, prefix stripped)
    cond_stage_model.transformer.*   SD 1.x text encoder, transformers CLIPTextModel names
    cond_stage_model.model.*         SD 2.x text encoder, open_clip names (converted by clip_keys)
    betas, alphas_cumprod, ...       the DDPM schedule buffers (checked against SD's, then dropped)
    model_ema.*                      EMA shadow weights of training checkpoints (dropped)

Configs are inferred from the tensor shapes (`keymaps.*_config_from_state_dict`, `clip_keys.infer_config`).
What a file cannot tell must be given: the prediction type (SD 2.x 768-v models predict v), and the
tokenizer (the shipped OpenAI vocabulary by default; SD 2.x pads with "!", id 0, as open_clip does).
Any other key is an error that names it: nothing is silently dropped but the list below.

`load_any(path)` looks at a path and calls the right importer: a native bundle or model file, a diffusers
folder, a transformers CLIP folder, an SD single file or a CLIP state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sfumato.checkpoints.bundle import Bundle, ScheduleConfig, is_bundle, load_bundle
from sfumato.checkpoints.clip_keys import from_openai_clip, from_transformers, infer_config
from sfumato.checkpoints.diffusers_folder import (
    is_diffusers_folder,
    load_diffusers,
    load_transformers_clip,
    load_transformers_text_encoder,
    load_weights_file,
    read_json,
)
from sfumato.checkpoints.keymaps import (
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    unet_config_from_state_dict,
    vae_config_from_state_dict,
)
from sfumato.checkpoints.native import build_on_meta, is_native, load_model, load_weights
from sfumato.diffusion.schedules import alphas_cumprod, scaled_linear_betas
from sfumato.text.tokenizer import CLIPTokenizer

SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # transformers CLIPTextModel names
SD2_TEXT_PREFIX = "cond_stage_model.model."  # open_clip text tower names

# Keys an SD single file may hold that a bundle does not keep. ldm's DDPM registers its schedule as
# buffers (ldm/models/diffusion/ddpm.py, register_schedule) and `logvar` (learned-variance option, unused);
# these are checked against SD's schedule where they define it, then dropped.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
)  # fmt: skip
IGNORED_PREFIXES = ("model_ema.",)  # EMA copies (ldm LitEma: model_ema.decay, model_ema.num_updates, ...)
# SD 2.x's open_clip text tower: used at its penultimate layer, so the last layer, the final projection
# and the temperature never reach the U-Net. Dropped, as diffusers does (see bundle.py).
SD2_DROPPED = ("logit_scale", "text_projection.weight")


def _check_schedule(sd: dict[str, torch.Tensor], path: str) -> None:
    """SD 1.x/2.x were trained on the scaled-linear schedule (ldm's "linear", 0.00085 .. 0.012, T=1000)."""
    if "alphas_cumprod" not in sd:
        return
    got = sd["alphas_cumprod"].double()
    ref = alphas_cumprod(scaled_linear_betas(len(got)))
    if not torch.allclose(got, ref, rtol=1e-3, atol=1e-6):
        raise ValueError(
            f"{path}: 'alphas_cumprod' is not Stable Diffusion's scaled-linear schedule (max difference "
            f"{(got - ref).abs().max().item():.2e}); this converter only knows SD's schedule. Convert to a "
            "diffusers folder with the right scheduler_config.json and import that instead"
        )


def _take(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def load_single_file(
    path: str | Path,
    *,
    prediction: str = "eps",
    tokenizer: CLIPTokenizer | None = None,
    num_heads: int | None = None,
    head_dim: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Bundle:
    """An SD 1.x / 2.x original single-file checkpoint (`.safetensors`, or `.ckpt` via weights_only) -> Bundle.

    prediction: "eps" (SD 1.x, SD 2.x base 512) or "v" (SD 2.x 768-v); the file cannot tell.
    tokenizer: default the shipped OpenAI vocabulary (pad "!" for SD 2.x, as open_clip pads with 0).
    num_heads / head_dim: U-Net attention heads, which the weights do not show (default: SD 1.x 8 heads
        for context 768, SD 2.x 64-channel heads for context 1024).
    """
    path = str(path)
    sd = load_weights_file(path) if state_dict is None else state_dict
    if not any(k.startswith(LDM_UNET_PREFIX) for k in sd):
        hint = ""
        if any(k.startswith(("encoder.conv_in", "decoder.conv_in")) for k in sd):
            hint = " It looks like a VAE on its own (encoder.*/decoder.* keys)."
        elif any(k.startswith(("input_blocks.", "time_embed.")) for k in sd):
            hint = (
                " It looks like a bare U-Net (input_blocks.* keys without the model.diffusion_model. prefix)."
            )
        elif any("text_model." in k or "resblocks." in k for k in sd):
            hint = " It looks like a CLIP model; load it with load_any."
        raise ValueError(
            f"{path} is not a Stable Diffusion single-file checkpoint: no key starts with "
            f"{LDM_UNET_PREFIX!r} (first keys: {sorted(sd)[:3]}).{hint} A full SD checkpoint holds the "
            "U-Net, VAE and text encoder together"
        )
    sd2 = any(k.startswith(SD2_TEXT_PREFIX) for k in sd)
    text_prefix = SD2_TEXT_PREFIX if sd2 else SD1_TEXT_PREFIX
    known = (LDM_UNET_PREFIX, LDM_VAE_PREFIX, text_prefix, *IGNORED_PREFIXES)
    for k in sd:
        if not k.startswith(known) and k not in SCHEDULE_BUFFERS:
            raise ValueError(
                f"{path}: unknown key {k!r}; an SD {'2' if sd2 else '1'}.x single file holds only "
                f"{', '.join(known[:3])}*, model_ema.* and schedule buffers. Remove the key if it is extra "
                "training state, or check that this is an SD 1.x/2.x checkpoint"
            )
    _check_schedule(sd, path)

    unet_sd, vae_sd, text_sd = (_take(sd, p) for p in (LDM_UNET_PREFIX, LDM_VAE_PREFIX, text_prefix))
    for what, part, prefix in (("VAE", vae_sd, LDM_VAE_PREFIX), ("text encoder", text_sd, text_prefix)):
        if not part:
            raise ValueError(
                f"{path}: no {what} weights (no key starts with {prefix!r}); this file has a U-Net only. "
                "Import a full checkpoint, or load the parts separately"
            )
    try:
        unet_config = unet_config_from_state_dict(unet_sd, num_heads=num_heads, head_dim=head_dim)
        vae_config = vae_config_from_state_dict(vae_sd)
        if sd2:
            text_sd = from_openai_clip(text_sd)
            for k in SD2_DROPPED:
                text_sd.pop(k, None)
            text_config = infer_config(text_sd, act="gelu")
            last = text_config.layers - 1  # drop the unused last layer: 24 -> 23 (bundle.py)
            text_sd = {
                k: v for k, v in text_sd.items() if not k.startswith(f"text_model.encoder.layers.{last}.")
            }
            text_config.layers = last
            text_config.projection_dim = None
        else:
            text_sd = from_transformers(text_sd)
            text_config = infer_config(text_sd, act="quick_gelu")
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e.args[0] if e.args else e}") from e

    tokenizer = tokenizer or CLIPTokenizer.default(pad_token="!" if sd2 else "<|endoftext|>")
    if tokenizer.vocab_size != text_config.vocab_size:
        raise ValueError(
            f"{path}: the text encoder has {text_config.vocab_size} token embeddings but the tokenizer has "
            f"{tokenizer.vocab_size} tokens; pass the matching tokenizer (tokenizer=CLIPTokenizer.from_pretrained)"
        )
    text_config.eos_token_id = tokenizer.eos_token_id
    return Bundle(
        unet=load_weights(build_on_meta("unet", unet_config), unet_sd, f"{path} (U-Net)").eval(),
        vae=load_weights(build_on_meta("vae", vae_config), vae_sd, f"{path} (VAE)").eval(),
        text_encoder=load_weights(build_on_meta("clip_text", text_config), text_sd, f"{path} (text)").eval(),
        tokenizer=tokenizer,
        # SD 2.x v-prediction checkpoints are the 768 px models; every other SD 1.x/2.x file is 512 px
        schedule=ScheduleConfig(prediction=prediction, image_size=768 if prediction == "v" else 512),
    )


def load_clip_state_dict_file(
    path: str | Path, *, act: str = "quick_gelu", state_dict: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """An OpenAI / open_clip or transformers CLIP state dict -> our CLIP (or one tower of it).

    act: "quick_gelu" for OpenAI weights, "gelu" for OpenCLIP LAION weights (the file cannot tell).
    """
    path = str(path)
    sd = load_weights_file(path) if state_dict is None else state_dict
    try:
        if any(
            k.startswith(("text_model.", "vision_model.", "final_layer_norm.", "pre_layrnorm.")) for k in sd
        ):
            sd = from_transformers(sd)
        else:
            sd = from_openai_clip(sd)
        config = infer_config(sd, act=act)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e.args[0] if e.args else e}") from e
    kind = {"CLIPConfig": "clip", "CLIPTextConfig": "clip_text", "CLIPVisionConfig": "clip_vision"}
    return load_weights(build_on_meta(kind[type(config).__name__], config), sd, path).eval()


def load_any(
    path: str | Path,
    *,
    prediction: str | None = None,
    act: str = "quick_gelu",
    tokenizer: CLIPTokenizer | None = None,
) -> Bundle | nn.Module:
    """Load whatever `path` holds: a Bundle for text-to-image models, a module for single models.

    - a sfumato bundle folder, or a native `.safetensors` model file;
    - a diffusers Stable Diffusion folder (`model_index.json`);
    - a transformers CLIP folder (`config.json` of model_type clip / clip_text_model + weights);
    - an SD 1.x/2.x single file (`.safetensors`, `.ckpt`, `.pt`; pickles only through weights_only);
    - an OpenAI / open_clip or transformers CLIP state dict file.

    prediction: "eps" or "v"; overrides what a bundle / diffusers folder says, and is the only source of
    it for single files (default "eps"). act: MLP activation of a CLIP state dict ("gelu" for OpenCLIP).
    tokenizer: for SD single files, which carry none (default: the shipped OpenAI vocabulary).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    result: Bundle | nn.Module
    if p.is_dir():
        if is_bundle(p):
            result = load_bundle(p)
        elif is_diffusers_folder(p):
            result = load_diffusers(p)
        elif (p / "config.json").is_file():
            model_type = read_json(p / "config.json").get("model_type")
            if model_type == "clip":
                result = load_transformers_clip(p)
            elif model_type == "clip_text_model":
                result = load_transformers_text_encoder(p)
            else:
                raise ValueError(
                    f"{p}/config.json has model_type {model_type!r}; expected clip or clip_text_model"
                )
        else:
            raise ValueError(
                f"{p} is a folder but neither a sfumato bundle (unet.safetensors, schedule.json, ...), a "
                "diffusers folder (model_index.json) nor a transformers CLIP folder (config.json)"
            )
    elif is_native(p):
        result = load_model(p)
    else:
        sd = load_weights_file(p)
        if any(k.startswith(LDM_UNET_PREFIX) for k in sd):
            result = load_single_file(p, prediction=prediction or "eps", tokenizer=tokenizer, state_dict=sd)
        elif any(
            k.startswith(("text_model.", "vision_model.", "transformer.resblocks.", "visual.")) for k in sd
        ):
            result = load_clip_state_dict_file(p, act=act, state_dict=sd)
        else:
            return load_single_file(p, state_dict=sd)  # raises, naming what the file looks like
    if isinstance(result, Bundle) and prediction is not None:
        result.schedule.prediction = prediction
        result.schedule.__post_init__()
    return result
