"""diffusers `StableDiffusionPipeline` folders <-> sfumato bundles; transformers CLIP folders -> our CLIP.

A diffusers folder is `model_index.json` plus one sub-folder per component, each a `config.json` (or
`scheduler_config.json`) and weights (`diffusion_pytorch_model.safetensors`, `model.safetensors`, the
pickled `.bin` variants, or shards listed in a `*.index.json`). Names and configs go through
`keymaps` (U-Net, VAE) and `clip_keys` (text encoder); nothing here imports diffusers or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sfumato import __version__
from sfumato.checkpoints.bundle import Bundle, ScheduleConfig
from sfumato.checkpoints.clip_keys import from_transformers, infer_config
from sfumato.checkpoints.keymaps import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from sfumato.checkpoints.native import build_on_meta, load_weights, read_safetensors, save_tensors
from sfumato.models.clip import CLIPTextConfig
from sfumato.models.experts import NoiseLevelExperts
from sfumato.text.tokenizer import CLIPTokenizer

# diffusers writes this in its own files; a plain number keeps `from_pretrained` from warning about it
DIFFUSERS_VERSION = "0.30.0"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; a diffusers component folder needs it") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def load_torch_pickle(path: str | Path) -> dict:
    """A pickled checkpoint (`.ckpt`, `.pt`, `.bin`) read with `torch.load(weights_only=True)`.

    weights_only unpickles only tensors, dicts, lists and plain numbers; anything else (a custom class, a
    function: code that would run on load) is refused before it runs. mmap=True maps the tensors from the
    file instead of reading them into memory (zip-format files, torch >= 1.6; older files are read whole).
    """
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - pickle raises many types; all mean "cannot read safely"
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise ValueError(
                f"{path} holds more than plain tensors and dicts (torch.load(weights_only=True) refused it: "
                f"{str(e).splitlines()[0]}); sfumato does not run code from checkpoint pickles. Convert it "
                "to .safetensors in an environment you trust, or get the .safetensors release"
            ) from e
        raise ValueError(f"{path} could not be read as a torch checkpoint ({e}); is it truncated?") from e


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or pickled (`.bin`, `.ckpt`, `.pt`, `.pth`) weights file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    sd = load_torch_pickle(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # Lightning / ldm training checkpoints
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict (a dict of tensors)")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path}: entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a tensor; expected a state dict"
        )
    return sd


def _component_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """`stem.safetensors`, `stem.bin` or the shards of `stem.safetensors.index.json` in `folder`."""
    for suffix in (".safetensors", ".bin"):
        if (folder / (stem + suffix)).is_file():
            return load_weights_file(folder / (stem + suffix))
        index = folder / f"{stem}{suffix}.index.json"
        if index.is_file():
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(read_json(index)["weight_map"].values())):
                out |= load_weights_file(folder / shard)
            return out
    raise FileNotFoundError(f"{folder} has no {stem}.safetensors or {stem}.bin (nor a sharded index)")


def _named(source: str, fn, *args):
    """Run a converter; prefix its error with the file it came from."""
    try:
        return fn(*args)
    except (ValueError, KeyError) as e:
        msg = e.args[0] if e.args else str(e)
        raise ValueError(f"{source}: {msg}") from e


# ---------------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------------


def load_diffusers_unet(folder: str | Path):
    folder = Path(folder)
    config = _named(
        str(folder / "config.json"), unet_config_from_diffusers, read_json(folder / "config.json")
    )
    sd = _component_weights(folder, "diffusion_pytorch_model")
    sd = _named(str(folder), unet_from_diffusers, sd, config)
    return load_weights(build_on_meta("unet", config), sd, str(folder)).eval()


def load_diffusers_vae(folder: str | Path):
    folder = Path(folder)
    config = _named(str(folder / "config.json"), vae_config_from_diffusers, read_json(folder / "config.json"))
    sd = _component_weights(folder, "diffusion_pytorch_model")
    sd = _named(str(folder), vae_from_diffusers, sd, config)
    return load_weights(build_on_meta("vae", config), sd, str(folder)).eval()


def text_config_from_transformers(cfg: dict, eos_token_id: int | None = None) -> CLIPTextConfig:
    """Our CLIPTextConfig from a transformers `CLIPTextConfig` dict (a text_encoder/config.json)."""
    vocab = cfg.get("vocab_size", 49408)
    eos = cfg.get("eos_token_id", vocab - 1)
    if eos_token_id is not None:
        eos = eos_token_id
    elif eos == 2:
        # openai/clip-vit-large-patch14 (SD 1.x) still says 2, transformers' legacy marker for "pool at
        # argmax(ids)", i.e. at <|endoftext|>, the largest id of CLIP's vocabulary
        eos = vocab - 1
    with_projection = "CLIPTextModelWithProjection" in cfg.get("architectures", [])
    return CLIPTextConfig(
        vocab_size=vocab,
        context_length=cfg.get("max_position_embeddings", 77),
        width=cfg.get("hidden_size", 512),
        layers=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 8),
        mlp_width=cfg.get("intermediate_size", 2048),
        act=cfg.get("hidden_act", "quick_gelu"),
        eps=cfg.get("layer_norm_eps", 1e-5),
        eos_token_id=eos,
        projection_dim=cfg.get("projection_dim", 512) if with_projection else None,
    )


def text_config_to_transformers(c: CLIPTextConfig, bos_token_id: int, pad_token_id: int) -> dict:
    """A transformers `CLIPTextModel` config.json for our text config (no projection: diffusers' SD)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "hidden_size": c.width,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "intermediate_size": c.mlp_width,
        "hidden_act": c.act,
        "layer_norm_eps": c.eps,
        "projection_dim": c.projection_dim or c.width,
        "bos_token_id": bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": pad_token_id,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def load_transformers_text_encoder(folder: str | Path, eos_token_id: int | None = None):
    folder = Path(folder)
    config = _named(
        str(folder / "config.json"),
        text_config_from_transformers,
        read_json(folder / "config.json"),
        eos_token_id,
    )
    sd = from_transformers(_component_weights(folder, "model"))
    if config.projection_dim is None:
        sd.pop("text_projection.weight", None)
    return load_weights(build_on_meta("clip_text", config), sd, str(folder)).eval()


def load_transformers_clip(folder: str | Path):
    """A transformers `CLIPModel` folder (config.json + model.safetensors) -> our CLIP."""
    folder = Path(folder)
    cfg = read_json(folder / "config.json")
    text_cfg = cfg.get("text_config", {})
    sd = from_transformers(_component_weights(folder, "model"))
    config = _named(
        str(folder),
        lambda: infer_config(
            sd,
            act=text_cfg.get("hidden_act", "quick_gelu"),
            eos_token_id=_eos(text_cfg),
            text_heads=text_cfg.get("num_attention_heads"),
            vision_heads=cfg.get("vision_config", {}).get("num_attention_heads"),
        ),
    )
    return load_weights(build_on_meta("clip", config), sd, str(folder)).eval()


def _eos(text_cfg: dict) -> int | None:
    eos = text_cfg.get("eos_token_id")
    return None if eos in (None, 2) else eos  # 2: the legacy argmax marker, see text_config_from_transformers


# ---------------------------------------------------------------------------------------------------
# whole pipelines
# ---------------------------------------------------------------------------------------------------


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def load_diffusers(directory: str | Path) -> Bundle:
    """A diffusers Stable Diffusion folder -> Bundle."""
    d = Path(directory)
    index = read_json(d / "model_index.json")
    cls = index.get("_class_name", "")
    if "StableDiffusion" not in cls or "XL" in cls:
        raise ValueError(
            f"{d / 'model_index.json'}: _class_name {cls!r}; only Stable Diffusion 1.x/2.x pipelines "
            "(StableDiffusionPipeline and its img2img/inpaint variants) convert to a sfumato bundle"
        )
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (d / part).is_dir():
            raise FileNotFoundError(
                f"{d} has no {part}/ folder; a Stable Diffusion diffusers folder needs it"
            )
    tokenizer = CLIPTokenizer.from_pretrained(d / "tokenizer")
    sched_path = d / "scheduler" / "scheduler_config.json"
    unet, vae = load_diffusers_unet(d / "unet"), load_diffusers_vae(d / "vae")
    sample_size = read_json(d / "unet" / "config.json").get("sample_size")
    schedule = _named(str(sched_path), ScheduleConfig.from_diffusers, read_json(sched_path))
    if isinstance(sample_size, int):
        schedule.image_size = sample_size * vae.config.downsample_factor
    return Bundle(
        unet=unet,
        vae=vae,
        text_encoder=load_transformers_text_encoder(d / "text_encoder", tokenizer.eos_token_id),
        tokenizer=tokenizer,
        schedule=schedule,
    )


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def save_diffusers(bundle: Bundle, directory: str | Path, *, sample_size: int | None = None) -> list[Path]:
    """Write `bundle` as a diffusers `StableDiffusionPipeline` folder; returns the files written.

    sample_size: the latent side diffusers uses as the default image size (64 -> 512 px for SD 1.x).
    A text_projection (only in text encoders trained here with one) is not exported: diffusers' SD pipeline
    runs a plain transformers `CLIPTextModel`, which has none.
    """
    if isinstance(bundle.unet, NoiseLevelExperts):
        raise ValueError(
            "this model has two U-Nets split by noise level (unet_high_noise.safetensors), and diffusers' "
            "StableDiffusionPipeline runs one; keep it as an sfumato bundle"
        )
    if bundle.vae.config.latents_mean is not None:
        raise ValueError(
            "this model's VAE centres its latents per channel (latents_mean / latents_std), which diffusers' "
            "StableDiffusionPipeline does not read (its SDXL pipeline does); keep it as an sfumato bundle"
        )
    d = Path(directory)
    unet_c, vae_c, text_c = bundle.unet.config, bundle.vae.config, bundle.text_encoder.config
    if sample_size is None:
        sample_size = (bundle.schedule.image_size or 512) // vae_c.downsample_factor
    written = [
        _write_json(
            d / "model_index.json",
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "_sfumato_version": __version__,
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
        ),
        _write_json(
            d / "unet" / "config.json",
            {
                "_class_name": "UNet2DConditionModel",
                "_diffusers_version": DIFFUSERS_VERSION,
                "sample_size": sample_size,
                **unet_config_to_diffusers(unet_c),
            },
        ),
        _write_json(
            d / "vae" / "config.json",
            {
                "_class_name": "AutoencoderKL",
                "_diffusers_version": DIFFUSERS_VERSION,
                "sample_size": sample_size * vae_c.downsample_factor,
                **vae_config_to_diffusers(vae_c),
            },
        ),
        _write_json(
            d / "scheduler" / "scheduler_config.json",
            {"_diffusers_version": DIFFUSERS_VERSION, **bundle.schedule.to_diffusers()},
        ),
    ]
    tok = bundle.tokenizer
    written.append(
        _write_json(
            d / "text_encoder" / "config.json",
            text_config_to_transformers(text_c, tok.bos_token_id, tok.pad_token_id),
        )
    )
    tensors = [
        (
            d / "unet" / "diffusion_pytorch_model.safetensors",
            unet_to_diffusers(bundle.unet.state_dict(), unet_c),
        ),
        (d / "vae" / "diffusion_pytorch_model.safetensors", vae_to_diffusers(bundle.vae.state_dict(), vae_c)),
        (
            d / "text_encoder" / "model.safetensors",
            {k: v for k, v in bundle.text_encoder.state_dict().items() if k != "text_projection.weight"},
        ),
    ]
    for path, sd in tensors:
        save_tensors({k: v.detach() for k, v in sd.items()}, path, {"format": "pt"})
        written.append(path)
    tok.save(d / "tokenizer")
    written.append(
        _write_json(
            d / "tokenizer" / "special_tokens_map.json",
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": tok.pad_token,
            },
        )
    )
    return written
