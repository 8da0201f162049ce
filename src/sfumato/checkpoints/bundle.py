"""A model bundle: everything text-to-image needs, as a folder of native files.

    unet.safetensors           native U-Net (config in the metadata)
    vae.safetensors            native VAE (its latent scale, `scaling_factor` and any per-channel
                               `latents_mean` / `latents_std`, is part of its config)
    text_encoder.safetensors   native CLIP text tower
    tokenizer/                 vocab.json + merges.txt + tokenizer_config.json (CLIPTokenizer.save)
    preview_decoder.safetensors  optional: a tiny decoder for live previews (`models.preview`)
    clip.safetensors           optional: a joint CLIP (both towers), for `sfumato classify` and the eval
    matcher.safetensors        optional, with clip.safetensors: an image-text matching head over that CLIP
                               (`models.matcher`) that picks the best of K candidates (`generate(candidates=K)`;
                               without it the denoising error picks)
    unet_high_noise.safetensors  optional, with experts.json {"boundary": b}: a second U-Net that denoises
                               t >= b while unet.safetensors denoises t < b (`models.experts`)
    text_encoder_high_noise.safetensors  optional, with the high-noise U-Net: its own text encoder (experts.json
                               then says {"boundary": b, "split_context": true}; `ExpertTextEncoders`)
    schedule.json              the training noise schedule and prediction type, and the model's default
                               image size and guidance scale (ScheduleConfig)

SD 2.x text encoders: SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H's 24-layer text tower.
A bundle follows diffusers here: the text encoder keeps only the layers that are used (23) and is read at
its last layer with the final LayerNorm (`skip=0`), which is exactly `skip=1` of the 24-layer tower. So
every bundle's text encoder is used the same way, `text_encoder(ids).last_hidden_state`, and a bundle
exports to a diffusers folder without renumbering. The unused 24th layer and the `text_projection` of an
SD 2.x single file are dropped on import (they only feed the pooled CLIP embedding, which SD never reads).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from sfumato.checkpoints.atomic import write_text_atomic
from sfumato.checkpoints.native import load_model, save_model
from sfumato.models.clip import CLIP, CLIPTextModel
from sfumato.models.experts import ExpertTextEncoders, NoiseLevelExperts
from sfumato.models.matcher import ImageTextMatcher
from sfumato.models.preview import PreviewDecoder
from sfumato.models.unet import UNet
from sfumato.models.vae import AutoencoderKL
from sfumato.text.tokenizer import CLIPTokenizer


@dataclass
class ScheduleConfig:
    """The discrete training schedule of a diffusion model and how diffusers spaces its sampling steps."""

    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" (SD) | "squaredcos_cap_v2" (cosine)
    beta_start: float = 0.00085  # first beta (SD: 0.00085); unused by the cosine schedule
    beta_end: float = 0.012  # last beta (SD: 0.012)
    num_timesteps: int = 1000  # T, the number of training noise levels
    prediction: str = "eps"  # what the U-Net predicts: "eps" (SD 1.x, SD 2 base) or "v" (SD 2.x 768-v)
    steps_offset: int = 1  # diffusers' offset added to "leading" timesteps (SD: 1)
    timestep_spacing: str = "leading"  # "leading" (SD's configs) | "trailing" | "linspace"
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023 zero terminal SNR rescaling
    image_size: int | None = None  # default generation size in pixels (diffusers: unet sample_size × VAE f)
    guidance: float | None = None  # default classifier-free guidance scale; None: 7.5 (what SD is run at)
    candidates: int | None = None  # default best-of-K of generate (pipelines.ranking); None: 1, no ranking

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {self.timestep_spacing!r}"
            )
        if self.guidance is not None and not self.guidance >= 1:
            raise ValueError(f"guidance must be None or >= 1 (1 turns guidance off), got {self.guidance}")
        if self.candidates is not None and (isinstance(self.candidates, bool) or not isinstance(self.candidates, int)
                                            or self.candidates < 1):
            raise ValueError(f"candidates must be None or an int >= 1 (images drawn per image kept), got {self.candidates!r}")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine"):
            raise ValueError(
                f"beta_schedule {self.beta_schedule!r} is not one of linear, scaled_linear, squaredcos_cap_v2"
            )

    @classmethod
    def from_json(cls, path: str | Path) -> ScheduleConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown schedule fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    # -- diffusers scheduler_config.json -------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str = "scheduler config") -> ScheduleConfig:
        """From a diffusers scheduler_config.json (any of the discrete SD schedulers)."""
        prediction = {"epsilon": "eps", "v_prediction": "v"}.get(cfg.get("prediction_type", "epsilon"))
        if prediction is None:
            raise ValueError(
                f"{source}: prediction_type={cfg['prediction_type']!r}; only 'epsilon' and 'v_prediction' "
                "are supported"
            )
        if cfg.get("trained_betas") is not None:
            raise ValueError(f"{source}: trained_betas (an explicit beta table) is not supported")
        return cls(
            beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
            beta_start=float(cfg.get("beta_start", 0.00085)),
            beta_end=float(cfg.get("beta_end", 0.012)),
            num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            prediction=prediction,
            steps_offset=int(cfg.get("steps_offset", 0)),
            timestep_spacing=cfg.get("timestep_spacing", "leading"),
            rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
        )

    def to_diffusers(self) -> dict:
        """A DDIMScheduler config with SD's settings (no x0 clipping, ᾱ_prev of the first step = ᾱ_0)."""
        return {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": "squaredcos_cap_v2" if self.beta_schedule == "cosine" else self.beta_schedule,
            "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[self.prediction],
            "steps_offset": self.steps_offset,
            "timestep_spacing": self.timestep_spacing,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "trained_betas": None,
        }


@dataclass
class Bundle:
    """A text-to-image model: U-Net (or two, split by noise level), VAE, CLIP text encoder, tokenizer and
    schedule."""

    unet: UNet | NoiseLevelExperts
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | ExpertTextEncoders  # the second with NoiseLevelExperts(split_context=True)
    tokenizer: CLIPTokenizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    preview_decoder: PreviewDecoder | None = None  # trained to imitate this VAE's decoder, for previews
    matcher: ImageTextMatcher | None = None  # ranks best-of-K candidates, reading `clip`
    clip: CLIP | None = None  # the matcher's CLIP (loaded with it; the tokenizer is the CLIP's)


BUNDLE_FILES = ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "schedule.json")
PREVIEW_FILE = "preview_decoder.safetensors"
MATCHER_FILE, CLIP_FILE = "matcher.safetensors", "clip.safetensors"
HIGH_NOISE_FILE, EXPERTS_FILE = "unet_high_noise.safetensors", "experts.json"
HIGH_NOISE_TEXT_FILE = "text_encoder_high_noise.safetensors"


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and all((p / name).is_file() for name in BUNDLE_FILES)


def save_bundle(bundle: Bundle, directory: str | Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """Write `bundle` as a folder of native files; returns the paths written.

    dtype: store the weights in this dtype (torch.float16 halves the folder; see `save_model`).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    experts = bundle.unet if isinstance(bundle.unet, NoiseLevelExperts) else None
    split = experts is not None and experts.split_context
    if split != isinstance(bundle.text_encoder, ExpertTextEncoders):
        raise ValueError(
            "a high-noise expert with its own text encoder (NoiseLevelExperts(split_context=True)) and "
            "ExpertTextEncoders come together; this bundle has one without the other"
        )
    text = bundle.text_encoder
    written = [
        save_model(bundle.unet if experts is None else experts.low, d / "unet.safetensors", dtype=dtype),
        save_model(bundle.vae, d / "vae.safetensors", dtype=dtype),
        save_model(text.low if split else text, d / "text_encoder.safetensors", dtype=dtype),
    ]
    if bundle.preview_decoder is not None:
        written.append(save_model(bundle.preview_decoder, d / PREVIEW_FILE, dtype=dtype))
    if bundle.matcher is not None and bundle.clip is None:
        raise ValueError("a bundle's matcher reads its CLIP (Bundle.clip), and this bundle has none")
    (d / MATCHER_FILE).unlink(missing_ok=True)
    if bundle.clip is not None:
        written.append(save_model(bundle.clip, d / CLIP_FILE, dtype=dtype))
    if bundle.matcher is not None:
        written.append(save_model(bundle.matcher, d / MATCHER_FILE, dtype=dtype))
    for name in (HIGH_NOISE_FILE, HIGH_NOISE_TEXT_FILE, EXPERTS_FILE):  # a folder saved over keeps no stale expert
        (d / name).unlink(missing_ok=True)
    if experts is not None:
        written.append(save_model(experts.high, d / HIGH_NOISE_FILE, dtype=dtype))
        meta: dict = {"boundary": experts.boundary}
        if split:
            written.append(save_model(text.high, d / HIGH_NOISE_TEXT_FILE, dtype=dtype))
            meta["split_context"] = True
        write_text_atomic(d / EXPERTS_FILE, json.dumps(meta, indent=2) + "\n")
        written.append(d / EXPERTS_FILE)
    bundle.tokenizer.save(d / "tokenizer")
    write_text_atomic(d / "schedule.json", json.dumps(asdict(bundle.schedule), indent=2) + "\n")
    return written + [d / "tokenizer", d / "schedule.json"]


def _expect(model, cls, path: Path):
    if not isinstance(model, cls):
        raise ValueError(f"{path} holds a {type(model).__name__}, a bundle needs a {cls.__name__} there")
    return model


def load_bundle(directory: str | Path, device="cpu", dtype=None) -> Bundle:
    """Load a folder written by `save_bundle`."""
    d = Path(directory)
    missing = [name for name in (*BUNDLE_FILES, "tokenizer") if not (d / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{d} is not a sfumato bundle: {missing} missing; convert a checkpoint with `sfumato convert`"
        )
    unet = _expect(load_model(d / "unet.safetensors", device, dtype), UNet, d / "unet.safetensors")
    text = _expect(load_model(d / "text_encoder.safetensors", device, dtype), CLIPTextModel, d / "text_encoder.safetensors")
    if (d / EXPERTS_FILE).is_file():
        meta = json.loads((d / EXPERTS_FILE).read_text())
        split = bool(meta.get("split_context", False))
        for name in (HIGH_NOISE_FILE,) + ((HIGH_NOISE_TEXT_FILE,) if split else ()):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / EXPERTS_FILE} names a high-noise expert, but {name} is missing")
        high = _expect(load_model(d / HIGH_NOISE_FILE, device, dtype), UNet, d / HIGH_NOISE_FILE)
        unet = NoiseLevelExperts(high, unet, meta["boundary"], split_context=split)
        if split:
            high_text = load_model(d / HIGH_NOISE_TEXT_FILE, device, dtype)
            text = ExpertTextEncoders(text, _expect(high_text, CLIPTextModel, d / HIGH_NOISE_TEXT_FILE))
    matcher = clip = None
    if (d / MATCHER_FILE).is_file():
        if not (d / CLIP_FILE).is_file():
            raise FileNotFoundError(f"{d / MATCHER_FILE} reads a CLIP, but {d / CLIP_FILE} is missing")
        matcher = _expect(load_model(d / MATCHER_FILE, device, dtype), ImageTextMatcher, d / MATCHER_FILE)
        clip = _expect(load_model(d / CLIP_FILE, device, dtype), CLIP, d / CLIP_FILE)
        matcher.check_clip(clip)
    return Bundle(
        unet=unet,
        vae=_expect(load_model(d / "vae.safetensors", device, dtype), AutoencoderKL, d / "vae.safetensors"),
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(d / "tokenizer"),
        schedule=ScheduleConfig.from_json(d / "schedule.json"),
        preview_decoder=(
            _expect(load_model(d / PREVIEW_FILE, device, dtype), PreviewDecoder, d / PREVIEW_FILE)
            if (d / PREVIEW_FILE).is_file()
            else None
        ),
        matcher=matcher,
        clip=clip,
    )
