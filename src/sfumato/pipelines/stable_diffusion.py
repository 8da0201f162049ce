"""Stable Diffusion inference: text-to-image, image-to-image, inpainting, inversion and interpolation.

Every method is a plain inference function over a loaded bundle; the loop in `_denoise` is the whole of
latent diffusion sampling:

    prompt --tokenizer--> ids --CLIP text encoder--> context (B, 77k, D)
    noise z_T (B, 4, h, w) --sampler(CFG(denoiser(U-Net)))--> z_0 --VAE decoder--> images (B, 3, H, W)

Conventions, chosen so that a seed means the same image here and in diffusers:
- Random numbers come from one CPU `torch.Generator` per image, seeded `seed, seed + 1, ...` (A1111's rule),
  so image k of a batch can be regenerated alone from the seed written into its PNG. With one image this is
  exactly diffusers' single generator; with several it is diffusers' list of generators.
- The initial latent noise is drawn in diffusers' order and scaled as its schedulers scale it: DDIM, DDPM and
  DPM-Solver start from the variance-preserving x_T = noise; Euler, Euler-ancestral and Heun from
  noise * init_noise_sigma (σ_max for "linspace"/"trailing" spacing, sqrt(σ_max² + 1) for "leading").
  Our samplers work on x = x0 + σ·eps, so both become x_VE = noise * scale (ARCHITECTURE.md, Denoiser).
- Long prompts: CLIP reads 77 tokens. A prompt of more than 75 tokens is cut into chunks of 75, each chunk
  framed by start/end tokens and padded to 77, encoded separately, and the chunks' embeddings are
  concatenated along the token axis (as A1111 does), instead of being silently truncated; the U-Net's
  cross-attention takes any number of context tokens. The prompt and the negative prompt are padded to the
  same number of chunks with encodings of an empty chunk. Up to 75 tokens this is exactly diffusers' encoding.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from sfumato.checkpoints.bundle import Bundle
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.diffusion.guidance import classifier_free_guidance
from sfumato.diffusion.samplers import SAMPLERS, invert_ddim
from sfumato.models.clip import prompt_mask
from sfumato.pipelines.clip import clip_pixels
from sfumato.pipelines.images import (
    check_size,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    tensor_to_images,
)
from sfumato.pipelines.metadata import CANDIDATES_KEY
from sfumato.pipelines.ranking import (
    RANK_DRAWS,
    RANK_LEVELS,
    candidate_seeds,
    denoising_error,
    matched_score,
    pick_best,
    ranking_seed,
)
from sfumato.pipelines.steps import StepPlan, plan_steps, resolve_karras

Callback = Callable[[dict], None] | None
ImageInput = str | Path | Image.Image

DEFAULT_GUIDANCE = 7.5  # for models that name none (SD's checkpoints): diffusers' default, the usual 5-9
# the η each sampler takes, and its default (DDIM: deterministic; Euler-ancestral: DDPM-like noise)
_ETA_DEFAULTS = {"ddim": 0.0, "euler_ancestral": 1.0}


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (Shoemake 1985): keeps the norm a Gaussian sample
    has, which linear interpolation shrinks mid-way. Falls back to lerp for nearly parallel inputs."""
    af, bf = a.flatten().double(), b.flatten().double()
    cos = torch.dot(af, bf) / (af.norm() * bf.norm())
    if cos.abs() > 1 - eps:
        return torch.lerp(a, b, t)
    theta = torch.arccos(cos)
    wa, wb = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (wa * a.double() + wb * b.double()).to(a.dtype)


def _as_list(value, n: int, name: str) -> list:
    if isinstance(value, (str, Image.Image, Path)) or value is None:
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} prompts; pass one, or one per prompt")
    return value


def _seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """One seed per image: `seed, seed + 1, ...` for an int, the list as given, or fresh random seeds."""
    if seed is None:
        seed = secrets.randbits(31)
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images; pass one int, or one seed per image")
    return seeds


def _randn(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """(N, ...) standard normal noise, row i from generators[i] on the CPU (diffusers' randn_tensor)."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])  # N x (1, ...)


def _drawn(seed: int, shape: tuple[int, ...]) -> torch.Generator:
    """A generator seeded `seed` that has drawn one image's initial noise of `shape`: the state generate()'s
    generator is in when sampling starts."""
    g = torch.Generator().manual_seed(seed)
    _randn(shape, [g])
    return g


def _check_output(output: str) -> None:
    if output not in ("pil", "latent"):
        raise ValueError(f"output must be 'pil' or 'latent', got {output!r}")


def _check_guidance(guidance: float) -> None:
    if not guidance >= 1:  # also refuses NaN
        raise ValueError(
            f"guidance must be >= 1 (1 turns classifier-free guidance off; SD uses 5-9), got {guidance}"
        )


def _check_strength(strength: float, steps: int) -> int:
    """The number of steps image-to-image runs: diffusers' int(steps * strength)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (1 ignores the input image), got {strength}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no denoising step (int(steps * strength) = 0); "
            f"use strength >= {1 / steps:.3g} or steps >= {math.ceil(1 / strength)}"
        )
    return run


class _Progress:
    """A tqdm bar on terminals (or when asked), plus the user's callback, as one sampler callback."""

    def __init__(self, total: int, callback: Callback, progress: bool | None, desc: str):
        if progress is None:
            progress = sys.stderr.isatty()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)
        self.callback, self.total = callback, total

    def __call__(self, info: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback({**info, "steps": self.total})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _blended(denoiser, blend):
    """The denoiser that first passes its input through `blend(x, σ)` (inpainting's kept region)."""
    return lambda x, sigma: denoiser(blend(x, sigma), sigma)


class _InpaintUNet(torch.nn.Module):
    """A 9-channel inpainting U-Net seen as a 4-channel one: the (scaled) latent, then the mask and the
    masked image's latent, concatenated on the channel axis as the model was trained (Rombach et al. 2022)."""

    def __init__(self, unet: torch.nn.Module, mask: torch.Tensor, masked_latents: torch.Tensor):
        super().__init__()
        self.unet, self.mask, self.masked_latents = unet, mask, masked_latents

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kw) -> torch.Tensor:
        reps = x.shape[0] // self.mask.shape[0]  # CFG doubles the batch: [uncond; cond]
        extra = torch.cat([self.mask, self.masked_latents], 1).repeat(reps, 1, 1, 1)  # (B, 5, h, w)
        return self.unet(torch.cat([x, extra], 1), t, context, **kw)  # (B, 4 + 1 + 4, h, w)


# ---------------------------------------------------------------------------------------------------------
# The pipeline


# Inductor settings of a U-Net compiled by `StableDiffusion.optimize(compile=True)` on the CPU. Freezing folds
# the inference-only weights into the graph, so inductor pre-packs them for oneDNN once instead of on every call;
# the C++ wrapper runs the graph without a Python call per kernel. Both pay most on small models
# (benchmarks/speed_options.py).
CPU_COMPILE_OPTIONS = {"freezing": True, "cpp_wrapper": True}


class StableDiffusion:
    """Text-to-image and friends over a `Bundle` (U-Net, VAE, CLIP text encoder, tokenizer, schedule).

    ``pipe = sfumato.load(path)``, then ``pipe.generate("a red fox in the snow")[0].save("fox.png")``.
    `generate`, `image_to_image` and `inpaint` return PIL images whose ``info["parameters"]`` holds the
    generation parameters in AUTOMATIC1111's text format (what `sfumato.pipelines.metadata.save_png` writes).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str | Path | None = None,
        vae_tiling: bool | int = False,
        int8: bool = False,
        compile: bool = False,
    ):
        self.bundle = bundle
        self.device, self.dtype = torch.device(device), dtype
        self.unet = bundle.unet.to(self.device, dtype).eval()
        self.vae = bundle.vae.to(self.device, dtype).eval()
        self.text_encoder = bundle.text_encoder.to(self.device, dtype).eval()
        preview = bundle.preview_decoder
        self.preview_decoder = None if preview is None else preview.to(self.device, dtype).eval()
        # an image-text matching head and the CLIP it reads pick the best of K when the bundle has them
        self.matcher = None if bundle.matcher is None else bundle.matcher.to(self.device, dtype).eval()
        self.clip = None if bundle.clip is None else bundle.clip.to(self.device, dtype).eval()
        self.tokenizer = bundle.tokenizer
        self.schedule = bundle.schedule
        self.source = Path(source) if source is not None else None
        self._hash: str | None = None
        self.vae_tile: int | None = None
        self._compiled = False
        self.optimize(vae_tiling=vae_tiling, int8=int8, compile=compile)

    def optimize(self, *, vae_tiling: bool | int = False, int8: bool = False, compile: bool = False) -> StableDiffusion:
        """Opt-in memory and speed options (all off by default); returns the pipeline. benchmarks/speed_options.py
        measures what each buys and costs.

        vae_tiling: decode in overlapping tiles (True: 64 latents, 512 px for SD; an int: that many latents), so
            decoding memory no longer grows with the image: a 1024 px image decodes in ~2 GB. Tiles see only
            themselves through the VAE's GroupNorms and attention, so images change slightly near the seams.
        int8: dynamic int8 quantisation of the U-Net's and text encoder's Linear layers (`models.quant`: int8
            weights per output channel, inputs quantised per row at each call, one `torch._int_mm` each). Faster
            on CPUs with int8 dot products (VNNI, AMX), approximate (see the benchmark for the error). Replaces
            the layers in place, in the bundle's modules too; float32 on the CPU only.
        compile: `unet.compile(dynamic=False)` (each expert's, for a pair), with inductor's `freezing` and
            `cpp_wrapper` on the CPU; in place, in the bundle's modules too. The first generation at each new size
            pays the compilation (1.5-3 minutes for the shipped model on 2 cores); the results match eager float32
            to rounding. Frozen weights are constants of the compiled graph: loading other weights into the U-Net
            afterwards needs a new pipeline.
        """
        if vae_tiling:
            self.vae_tile = 64 if vae_tiling is True else int(vae_tiling)
            if self.vae_tile < 8:
                raise ValueError(f"vae_tiling must be True or a tile size of at least 8 latents, got {vae_tiling}")
        if int8:
            if self.device.type != "cpu" or self.dtype != torch.float32:
                raise ValueError(f"int8=True needs a float32 pipeline on the CPU, got {self.dtype} on {self.device}")
            from sfumato.models.quant import quantize_linears_

            for module in (self.unet, self.text_encoder):
                quantize_linears_(module)
        if compile:
            # Static shapes: a second image size compiles again rather than switching the graph to symbolic
            # shapes, which inductor failed to lower for the SD U-Net (torch 2.13, a 1x1 conv at 32² latents).
            # `Module.compile` works in place, so parameter names stay the checkpoint's; a pair of experts is
            # compiled member by member, which leaves their choice per timestep (a host sync) to eager Python.
            from sfumato.models.experts import NoiseLevelExperts

            nets = [self.unet.high, self.unet.low] if isinstance(self.unet, NoiseLevelExperts) else [self.unet]
            for net in nets:
                net.compile(dynamic=False)
            self._compiled = True
        return self

    def _compiler_settings(self) -> contextlib.AbstractContextManager:
        """Where the U-Net is called: with `compile=True` on the CPU, inductor's `CPU_COMPILE_OPTIONS`. Dynamo
        reads `freezing` when it traces (whether parameters become constants), so the settings must hold
        around the call that compiles, not only be passed to `torch.compile(options=...)`; a context keeps
        them out of the rest of the process."""
        if not (self._compiled and self.device.type == "cpu"):
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(CPU_COMPILE_OPTIONS)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        prediction: str | None = None,
    ) -> StableDiffusion:
        """A sfumato bundle, a diffusers folder or an SD 1.x/2.x single file (see `sfumato.load`)."""
        from sfumato.checkpoints.single_file import load_any

        loaded = load_any(path, prediction=prediction)
        if not isinstance(loaded, Bundle):
            raise ValueError(
                f"{path} holds a {type(loaded).__name__}, not a text-to-image model; Stable Diffusion needs "
                "a bundle, a diffusers folder or an SD single-file checkpoint"
            )
        return cls(loaded, device=device, dtype=dtype, source=path)

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def default_guidance(self) -> float:
        """The guidance scale used when none is given: the model's own (`ScheduleConfig.guidance`, written by
        its training recipe), else Stable Diffusion's customary 7.5."""
        g = self.schedule.guidance
        return DEFAULT_GUIDANCE if g is None else float(g)

    @property
    def default_candidates(self) -> int:
        """Candidates drawn per image kept when none is given: the model's own (`ScheduleConfig.candidates`),
        else 1 (plain sampling)."""
        k = self.schedule.candidates
        return 1 if k is None else int(k)

    def _candidates(self, candidates: int | None) -> int:
        k = self.default_candidates if candidates is None else candidates
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"candidates must be an int >= 1 (1: no ranking), got {candidates!r}")
        return k

    def _guidance(self, guidance: float | None) -> float:
        guidance = self.default_guidance if guidance is None else guidance
        _check_guidance(guidance)
        return guidance

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return self.vae.config.downsample_factor

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def is_inpainting_model(self) -> bool:
        return self.unet.config.in_channels == 2 * self.vae.config.z_channels + 1

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash" of the weights this pipeline was loaded from (computed once, when needed)."""
        if self._hash is None and self.source is not None and self.source.exists():
            from sfumato.pipelines.metadata import model_hash

            self._hash = model_hash(self.source)
        return self._hash

    # -- text ------------------------------------------------------------------------------------------------

    def _chunks(self, text: str) -> list[list[int]]:
        """Token ids of `text` in chunks of the context length L (SD: 77): [start] + up to L - 2 tokens + [end]
        + padding."""
        tok = self.tokenizer
        n = tok.context_length - 2
        body = tok.encode(text)[1:-1]  # without start/end tokens
        pieces = [body[i : i + n] for i in range(0, len(body), n)] or [[]]
        return [[tok.bos_token_id, *p, tok.eos_token_id] + [tok.pad_token_id] * (n - len(p)) for p in pieces]

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], clip_skip: int = 0, min_chunks: int = 1
    ) -> torch.Tensor:
        """CLIP text embeddings (P, L * k, D) of P prompts, L the context length (SD: 77), k = the most chunks
        any prompt needs.

        clip_skip: use the hidden state that many layers before the last (diffusers' ``clip_skip``; A1111's
        "Clip skip: n" is n - 1), through the final LayerNorm.
        """
        return self._encode_text(prompts, clip_skip, min_chunks)[0]

    def _encode_text(
        self, prompts: Sequence[str], clip_skip: int, min_chunks: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_prompts`'s embeddings (P, L * k, D) and their `prompt_mask` (P, L * k), chunk by chunk."""
        chunked = [self._chunks(p) for p in prompts]
        k = max(min_chunks, *(len(c) for c in chunked))
        empty = self._chunks("")[0]
        rows = [c + [empty] * (k - len(c)) for c in chunked]  # P x k x L
        ids = torch.tensor([chunk for row in rows for chunk in row], device=self.device)  # (P * k, L)
        hidden = self.text_encoder(ids, skip=clip_skip).last_hidden_state  # (P * k, L, D)
        mask = prompt_mask(ids, self.tokenizer.eos_token_id)  # (P * k, L)
        P = len(prompts)
        return hidden.reshape(P, -1, hidden.shape[-1]), mask.reshape(P, -1)  # -> (P, k * L, D), (P, k * L)

    def _contexts(
        self, prompts: list[str], negatives: list[str], guidance: float, clip_skip: int, batch: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The U-Net's text arguments for the conditional and (when guided) the unconditional pass, each
        repeated `batch` times per prompt: {"context": (N, T, D)}, and "context_mask" (N, T) for a U-Net
        trained with `mask_padding`."""
        cond = self._encode_text(prompts, clip_skip)
        uncond = None
        if guidance > 1:
            n = self.tokenizer.context_length  # 77 for SD; our own models may use fewer
            uncond = self._encode_text(negatives, clip_skip, min_chunks=cond[0].shape[1] // n)
            extra = (uncond[0].shape[1] - cond[0].shape[1]) // n
            if extra > 0:  # a negative prompt longer than the prompt: pad the prompt with empty chunks
                hidden, mask = self._encode_text([""], clip_skip)  # (1, L, D), (1, L)
                P = len(prompts)
                cond = (torch.cat([cond[0], hidden.repeat(P, extra, 1)], 1),
                        torch.cat([cond[1], mask.repeat(P, extra)], 1))  # fmt: skip
        masked = self.unet.config.mask_padding

        def kwargs(pair: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            context, mask = (t.repeat_interleave(batch, 0) for t in pair)  # (P, ...) -> (P * batch, ...)
            return {"context": context, "context_mask": mask} if masked else {"context": context}

        return kwargs(cond), (kwargs(uncond) if uncond is not None else None)

    # -- latents and images ------------------------------------------------------------------------------

    def _size(self, width: int | None, height: int | None) -> tuple[int, int]:
        default = self.schedule.image_size or 512
        width = default if width is None else width  # 0 is an error below, not "use the default"
        height = default if height is None else height
        check_size(width, height, self.latent_factor)
        return width, height

    @torch.no_grad()
    def _encode(self, images: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        """Scaled latents of images (N, 3, H, W) in [-1, 1]: a posterior sample, row i drawn from
        generators[i] (diffusers' `retrieve_latents`), or the posterior mean when generators is None."""
        post = self.vae.encode(images.to(self.device, self.dtype))
        if generators is None:
            z = post.mode()
        else:
            noise = _randn(tuple(post.mean.shape), generators).to(post.mean)
            z = post.mean + post.std * noise
        return self.vae.to_diffusion(z)

    def _decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), about [-1, 1] (not clamped), from diffusion latents."""
        z = self.vae.from_diffusion(latents.to(self.device, self.dtype))
        if self.vae_tile is not None:
            return self.vae.decode_tiled(z, self.vae_tile, self.vae_tile // 4)
        return self.vae.decode(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """PIL images from diffusion latents (the VAE's `to_diffusion` scale)."""
        return tensor_to_images(self._decode_tensor(latents).float().cpu())

    @torch.no_grad()
    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """A quick look at diffusion latents, e.g. a callback's ``info["denoised"]``: the bundle's preview
        decoder when it has one (`sfumato.models.preview`: blurrier, a few hundred times fewer FLOPs than SD's
        VAE decoder), else the full `decode`."""
        if self.preview_decoder is None:
            return self.decode(latents)
        z = self.vae.from_diffusion(latents.to(self.device, self.dtype))
        return tensor_to_images(self.preview_decoder(z).float().cpu())

    def _load_images(self, image, n: int, size: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(n, 3, H, W) in [-1, 1] from one image (repeated) or one image per prompt, resized to `size`."""
        images = [load_image(im) for im in (image if isinstance(image, (list, tuple)) else [image] * n)]
        if len(images) != n:
            raise ValueError(f"got {len(images)} images for {n} prompts; pass one, or one per prompt")
        w, h = size if size is not None else images[0].size
        check_size(w, h, self.latent_factor)
        images = [im if im.size == (w, h) else im.resize((w, h), Image.Resampling.LANCZOS) for im in images]
        return image_to_tensor(images), (w, h)

    # -- the sampling loop ------------------------------------------------------------------------------

    def _denoise(
        self,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        plan: StepPlan,
        sampler: str,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor] | None,
        guidance: float,
        generators: list[torch.Generator],
        *,
        eta: float | None,
        unet: torch.nn.Module | None = None,
        blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        callback: Callback = None,
        progress: bool | None = None,
        desc: str = "sampling",
    ) -> torch.Tensor:
        """Run `sampler` from the VE sample x at sigmas[0] down the ladder; returns the clean latents."""
        denoiser = DiscreteDenoiser(
            unet if unet is not None else self.unet, plan.schedule, self.schedule.prediction, plan.quantize
        )
        guided = classifier_free_guidance(denoiser, 1.0 if uncond is None else guidance, cond, uncond or {})
        if blend is not None:
            guided = _blended(guided, blend)

        kwargs = {}
        if eta is not None:
            if sampler not in _ETA_DEFAULTS:
                raise ValueError(f"eta applies to {' and '.join(_ETA_DEFAULTS)}, not to {sampler}")
            if not eta >= 0:
                raise ValueError(f"eta must be >= 0 (0: deterministic, 1: DDPM-like noise), got {eta}")
            kwargs["eta"] = eta
        bar = _Progress(len(sigmas) - 1, callback, progress, desc)
        try:
            with self._compiler_settings():
                x = SAMPLERS[sampler](guided, x, sigmas, generator=generators, callback=bar, **kwargs)
        finally:
            bar.close()
        return x / math.sqrt(1 + float(sigmas[-1]) ** 2)  # VE -> VP at the last level (DDIM ends at σ_min)

    def _params(self, **params) -> dict:
        params = {k: v for k, v in params.items() if v is not None}
        if self.model_hash is not None:
            params["model_hash"] = self.model_hash
        if self.source is not None:
            params["model"] = self.source.stem if self.source.is_file() else self.source.name
        return params

    def _finish(self, latents: torch.Tensor, params: list[dict], output: str):
        if output == "latent":
            return latents
        from sfumato.pipelines.metadata import format_parameters

        images = self.decode(latents)
        for im, p in zip(images, params):
            im.info["parameters"] = format_parameters(p)
        return images

    # -- text to image ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        steps: int = 25,
        guidance: float | None = None,
        sampler: str = "dpmpp_2m",
        karras: bool | None = None,
        eta: float | None = None,
        seed: int | Sequence[int] | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        clip_skip: int = 0,
        candidates: int | None = None,
        latents: torch.Tensor | None = None,
        callback: Callback = None,
        progress: bool | None = None,
        output: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """Images for each prompt (`batch` per prompt): classifier-free guidance with the conditional and
        unconditional passes in one batch, the negative prompt in place of the empty one.

        candidates: best of K. Each image is drawn K times (its own seed first, then seeds derived from it by
        `ranking.candidate_seeds`) and the draw its conditional denoiser explains best is kept
        (`sfumato.pipelines.ranking`): K draws, each then scored by 12 conditional denoiser calls, so at 20
        guided steps (40 calls) about 1.3 K times the work of one image. A bundle with a matcher
        (`models.matcher`) adds its judgement of each draw against the prompt (`ranking.matched_score`; K
        decodes and one call of a small head over the CLIP). None (the default) means the
        model's own (`ScheduleConfig.candidates`), else 1 (and 1 when `latents` are given); the shipped model
        draws 4.

        karras: Karras σ spacing; None (the default) means yes, except for ddim and ddpm, which have none.
        seed: an int (image i gets seed + i), one seed per image, or None for random seeds (written into
        each image's parameters). latents: start from this unit-variance noise (N, 4, h, w) instead of
        seeded noise, e.g. what `invert` returns. output: "pil" or "latent".
        callback(info) runs after every step with i, x, sigma, sigma_next, denoised, steps; with candidates
        K > 1 also "candidates": K, and x and denoised then hold all N * K draws, image-major (image i's first
        draw, its plain image, is row i * K).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty; pass a string or a list of strings")
        negatives = _as_list(negative_prompt or "", len(prompts), "negative_prompt")
        guidance = self._guidance(guidance)
        _check_output(output)
        karras = resolve_karras(sampler, karras)
        if batch < 1:
            raise ValueError(f"batch must be >= 1 images per prompt, got {batch}")
        plan = plan_steps(self.schedule, sampler, steps, karras)
        width, height = self._size(width, height)
        # given latents fix each image's one draw; the model's default best of K gives way to them
        k = 1 if latents is not None and candidates is None else self._candidates(candidates)
        if latents is not None and k > 1:
            raise ValueError(f"latents fix each image's starting noise, candidates={k} draws several; pass one")
        n = len(prompts) * batch
        seeds = _seeds(seed, n)
        gens = [torch.Generator().manual_seed(c) for s in seeds for c in candidate_seeds(s, k)]  # image-major
        cond, uncond = self._contexts(prompts, negatives, guidance, clip_skip, batch * k)
        shape = (n * k, self.vae.config.z_channels, height // self.latent_factor, width // self.latent_factor)
        if latents is None:
            noise = _randn(shape, gens)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for these settings, got {tuple(latents.shape)}")
        else:
            # contiguous: the U-Net's CPU convolutions pick kernels by memory layout, and their results
            # differ in the last bits; a channels-last noise tensor would not reproduce a saved one exactly
            noise = latents.float().cpu().contiguous()
        x = (noise * plan.start_scale).to(self.device, self.dtype)
        if k > 1 and callback is not None:
            user_callback = callback

            def callback(info: dict) -> None:  # x and denoised hold every draw: say how many per image
                user_callback({**info, "candidates": k})

        z = self._denoise(x, plan.sigmas, plan, sampler, cond, uncond, guidance, gens, eta=eta,
                          callback=callback, progress=progress)  # fmt: skip
        if k > 1:
            errors = self._denoising_errors(z, plan, cond, seeds, progress)
            if self.matcher is not None:
                logits = self._match_logits(z, [prompts[i // batch] for i in range(n)])
                keep = pick_best(-matched_score(logits, errors, k), k)
            else:
                keep = pick_best(errors, k)
            z = z[keep]
        extra = {"extra": {CANDIDATES_KEY: str(k)}} if k > 1 else {}
        params = [
            self._params(
                prompt=prompts[i // batch], negative_prompt=negatives[i // batch], steps=steps, sampler=sampler,
                karras=karras, guidance=guidance, seed=seeds[i], width=width, height=height,
                clip_skip=clip_skip, eta=eta, **extra,
            )  # fmt: skip
            for i in range(n)
        ]
        return self._finish(z, params, output)

    def _match_logits(self, z: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(N * K,) the bundle's matcher's logits of z's N * K clean latents (image-major) under their image's
        prompt texts[i]."""
        k = z.shape[0] // len(texts)
        S = self.clip.config.vision.image_size
        pixels = clip_pixels(self._decode_tensor(z).clamp(-1, 1), S).to(self.device, self.dtype)  # (N * K, 3, S, S)
        T = min(self.tokenizer.context_length, self.clip.config.text.context_length)
        ids = self.tokenizer([t for t in texts for _ in range(k)], context_length=T).to(self.device)
        return self.matcher(self.clip, pixels, ids).float().cpu()  # (N * K,)

    def _denoising_errors(
        self, z: torch.Tensor, plan: StepPlan, cond: dict[str, torch.Tensor], seeds: list[int], progress
    ) -> torch.Tensor:
        """(N * K,) the `denoising_error` of z's N * K clean latents (image-major) under their prompt, every
        candidate of image i (seed seeds[i]) scored with the same noise, drawn from its own generator (seeded
        apart from every candidate's)."""
        k = z.shape[0] // len(seeds)
        T = plan.schedule.num_timesteps
        sigmas = [float(plan.schedule.t_to_sigma(float(round(f * T)))) for f in RANK_LEVELS]
        gens = [torch.Generator().manual_seed(ranking_seed(s)) for s in seeds]
        noise = torch.stack([torch.randn((len(sigmas), RANK_DRAWS, *z.shape[1:]), generator=g) for g in gens], 2)
        noise = noise.repeat_interleave(k, 2)  # (levels, draws, N * K, ...): an image's candidates share draws
        denoiser = DiscreteDenoiser(self.unet, plan.schedule, self.schedule.prediction, plan.quantize)
        bar = _Progress(len(sigmas) * RANK_DRAWS, None, progress, "ranking")
        try:
            with self._compiler_settings():
                errors = denoising_error(denoiser, z, sigmas, noise, cond, on_level=lambda: bar({}))
        finally:
            bar.close()
        return errors

    # -- image to image --------------------------------------------------------------------------------------

    @torch.no_grad()
    def image_to_image(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        strength: float = 0.8,
        steps: int = 25,
        guidance: float | None = None,
        sampler: str = "dpmpp_2m",
        karras: bool | None = None,
        eta: float | None = None,
        seed: int | Sequence[int] | None = None,
        batch: int = 1,
        clip_skip: int = 0,
        width: int | None = None,
        height: int | None = None,
        callback: Callback = None,
        progress: bool | None = None,
        output: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """SDEdit (Meng et al. 2022): noise the image's latent to the level `strength` of the way up the
        schedule, then denoise it under the prompt; int(steps * strength) steps run (diffusers' rule).

        The image is resized to width x height when they are given (multiples of 8), else used at its size.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty; pass a string or a list of strings")
        negatives = _as_list(negative_prompt or "", len(prompts), "negative_prompt")
        guidance = self._guidance(guidance)
        _check_output(output)
        if (width is None) != (height is None):
            raise ValueError(
                f"give both width and height to resize the image (got width={width}, height={height}), "
                "or neither to keep its size"
            )
        karras = resolve_karras(sampler, karras)
        run = _check_strength(strength, steps)
        plan = plan_steps(self.schedule, sampler, steps, karras)
        sigmas = plan.sigmas[steps - run :]  # diffusers: timesteps[t_start * order:]
        n = len(prompts) * batch
        size = None if width is None else (width, height)
        pixels, (width, height) = self._load_images(image, len(prompts), size)
        pixels = pixels.repeat_interleave(batch, 0)  # (P, 3, H, W) -> (N, 3, H, W)
        seeds = _seeds(seed, n)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        cond, uncond = self._contexts(prompts, negatives, guidance, clip_skip, batch)
        z0 = self._encode(pixels, gens).float().cpu()  # draws first, as diffusers' prepare_latents does
        noise = _randn(tuple(z0.shape), gens)
        x = (z0 + float(sigmas[0]) * noise).to(self.device, self.dtype)  # q(x_t | x_0) in VE form
        z = self._denoise(x, sigmas, plan, sampler, cond, uncond, guidance, gens, eta=eta,
                          callback=callback, progress=progress, desc="img2img")  # fmt: skip
        params = [
            self._params(
                prompt=prompts[i // batch], negative_prompt=negatives[i // batch], steps=steps, sampler=sampler,
                karras=karras, guidance=guidance, seed=seeds[i], width=width, height=height,
                clip_skip=clip_skip, eta=eta, strength=strength,
            )  # fmt: skip
            for i in range(n)
        ]
        return self._finish(z, params, output)

    # -- inpainting ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str,
        negative_prompt: str = "",
        *,
        strength: float = 1.0,
        steps: int = 25,
        guidance: float | None = None,
        sampler: str = "dpmpp_2m",
        karras: bool | None = None,
        eta: float | None = None,
        seed: int | Sequence[int] | None = None,
        batch: int = 1,
        clip_skip: int = 0,
        callback: Callback = None,
        progress: bool | None = None,
        output: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """Repaint the white part of `mask` under the prompt, keeping the black part.

        A 9-channel inpainting U-Net sees the mask and the masked image's latent at every step. An ordinary
        4-channel model is steered by latent blending: before every denoiser call the kept region is replaced
        by the original latent noised to the current level (which, for these elementwise samplers, is the
        same as diffusers' blending after every step), and the kept region of the result is the original
        latent. The mask is binarised at 50% grey; see `sfumato.pipelines.images.load_mask` for its size rule.
        """
        guidance = self._guidance(guidance)
        _check_output(output)
        karras = resolve_karras(sampler, karras)
        run = _check_strength(strength, steps)
        plan = plan_steps(self.schedule, sampler, steps, karras)
        sigmas = plan.sigmas[steps - run :]
        pil = load_image(image)
        width, height = pil.size
        check_size(width, height, self.latent_factor)
        pixels = image_to_tensor([pil]).repeat(batch, 1, 1, 1)  # (N, 3, H, W)
        m = mask_to_tensor([load_mask(mask, (width, height))]).repeat(batch, 1, 1, 1)  # (N, 1, H, W) in {0, 1}
        f = self.latent_factor
        m_lat = torch.nn.functional.interpolate(m, size=(height // f, width // f))  # nearest, as diffusers
        seeds = _seeds(seed, batch)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        cond, uncond = self._contexts([prompt], [negative_prompt or ""], guidance, clip_skip, batch)

        # random draws in diffusers' order: image latent (when needed), noise, masked-image latent
        nine = self.is_inpainting_model
        if not nine and self.unet.config.in_channels != self.vae.config.z_channels:
            raise ValueError(
                f"the U-Net takes {self.unet.config.in_channels} channels; inpainting needs a "
                f"{self.vae.config.z_channels}-channel model or a {2 * self.vae.config.z_channels + 1}-channel "
                "inpainting model"
            )
        z_img = self._encode(pixels, gens).float().cpu() if (not nine or strength < 1) else None
        shape = (batch, self.vae.config.z_channels, height // f, width // f)
        noise = _randn(shape, gens)
        z_masked = self._encode(pixels * (m < 0.5), gens)  # diffusers draws this even for 4-channel models
        if strength == 1:
            x = noise * plan.start_scale
        else:
            x = z_img + float(sigmas[0]) * noise
        x = x.to(self.device, self.dtype)

        unet, blend = None, None
        if nine:
            unet = _InpaintUNet(self.unet, m_lat.to(self.device, self.dtype), z_masked)
        else:
            keep = (1 - m_lat).to(self.device, self.dtype)
            z_keep, noise_d = z_img.to(self.device, self.dtype), noise.to(self.device, self.dtype)
            first = float(sigmas[0]) if strength == 1 else None  # diffusers does not blend the pure-noise start

            def blend(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                s = float(torch.as_tensor(sigma).flatten()[0])
                if s == first:
                    return x
                return keep * (z_keep + s * noise_d) + (1 - keep) * x

        z = self._denoise(x, sigmas, plan, sampler, cond, uncond, guidance, gens, eta=eta, unet=unet,
                          blend=blend, callback=callback, progress=progress, desc="inpaint")  # fmt: skip
        if not nine:
            z = keep * z_keep + (1 - keep) * z
        params = [
            self._params(
                prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler, karras=karras,
                guidance=guidance, seed=seeds[i], width=width, height=height, clip_skip=clip_skip, eta=eta,
                strength=strength,
            )  # fmt: skip
            for i in range(batch)
        ]
        return self._finish(z, params, output)

    # -- inversion -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def invert(
        self,
        image: ImageInput,
        prompt: str = "",
        *,
        steps: int = 50,
        guidance: float = 1.0,
        clip_skip: int = 0,
        callback: Callback = None,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """DDIM inversion (Song et al. 2021 §4.3): the unit-variance noise (1, 4, h, w) from which DDIM
        sampling with the same prompt, steps and guidance regenerates `image`:

            noise = pipe.invert(img, "a cat")
            pipe.generate("a cat", latents=noise, sampler="ddim", steps=50, guidance=1.0)

        The image's latent is the posterior mean. Guidance above 1 makes the round trip inexact (the
        inverted path is not the guided one); 1 is the faithful choice.
        """
        guidance = self._guidance(guidance)
        plan = plan_steps(self.schedule, "ddim", steps)
        pixels, _ = self._load_images([image], 1, None)
        z0 = self._encode(pixels, None)
        cond, uncond = self._contexts([prompt], [""], guidance, clip_skip, 1)
        denoiser = DiscreteDenoiser(self.unet, plan.schedule, self.schedule.prediction)
        guided = classifier_free_guidance(denoiser, guidance, cond, uncond or {})
        sigmas = plan.sigmas
        x = z0 * math.sqrt(1 + float(sigmas[-1]) ** 2)  # the clean latent as DDIM's last (VE) sample
        bar = _Progress(len(sigmas) - 1, callback, progress, "inverting")
        try:
            with self._compiler_settings():
                x = invert_ddim(guided, x, sigmas, callback=bar)
        finally:
            bar.close()
        return (x / math.sqrt(1 + float(sigmas[0]) ** 2)).float().cpu().contiguous()  # VE -> unit noise

    # -- interpolation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def interpolate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        frames: int = 8,
        negative_prompt: str = "",
        steps: int = 25,
        guidance: float | None = None,
        sampler: str = "ddim",
        karras: bool = False,
        width: int | None = None,
        height: int | None = None,
        clip_skip: int = 0,
        batch: int = 4,
        callback: Callback = None,
        progress: bool | None = None,
    ) -> list[Image.Image]:
        """Frames that walk through keyframes (prompt_i, seed_i): `frames` per segment between consecutive
        keyframes, the noise by slerp, the prompt embeddings linearly. A deterministic sampler (ddim, euler,
        heun, dpmpp_2m) makes the walk smooth. One prompt with several seeds walks the noise only; one seed
        with several prompts walks the text only. Returns len(keyframes - 1) * frames + 1 images. Every frame
        is drawn once: a keyframe is ``generate(prompt_i, seed=seed_i, candidates=1)``, whatever best of K the
        model defaults to.
        """
        keys = max(len(prompts), len(seeds))
        if keys < 2:
            raise ValueError("interpolate needs two keyframes: at least two prompts or two seeds")
        prompts = list(prompts) * keys if len(prompts) == 1 else list(prompts)
        seeds = list(seeds) * keys if len(seeds) == 1 else list(seeds)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds; give one, or one per keyframe")
        if frames < 1:
            raise ValueError(f"frames must be >= 1 per segment, got {frames}")
        guidance = self._guidance(guidance)
        plan = plan_steps(self.schedule, sampler, steps, karras)
        width, height = self._size(width, height)
        f = self.latent_factor
        shape = (1, self.vae.config.z_channels, height // f, width // f)
        noises = [_randn(shape, [torch.Generator().manual_seed(s)]) for s in seeds]
        cond_all, uncond = self._contexts(prompts, [negative_prompt] * keys, guidance, clip_skip, 1)
        # (segment, t) for every frame, then the last keyframe itself
        points = [(k, j / frames) for k in range(keys - 1) for j in range(frames)] + [(keys - 2, 1.0)]
        images: list[Image.Image] = []
        for start in range(0, len(points), batch):
            chunk = points[start : start + batch]
            noise = torch.cat([slerp(noises[k], noises[k + 1], t) for k, t in chunk])  # (b, 4, h, w)
            ctx = cond_all["context"]
            cond = {"context": torch.stack([torch.lerp(ctx[k], ctx[k + 1], t) for k, t in chunk])}  # (b, T, D)
            if "context_mask" in cond_all:  # a blend of two prompts reads the tokens of both
                m = cond_all["context_mask"]
                cond["context_mask"] = torch.stack([m[k] | m[k + 1] for k, _ in chunk])  # (b, T)
            # a frame's sampler noise continues its keyframe's generator after the initial noise draw, as in
            # generate(), so that keyframes are generate(prompt_i, seed=seed_i) with stochastic samplers too
            gens = [_drawn(seeds[k + 1] if t == 1 else seeds[k], shape) for k, t in chunk]
            u = None if uncond is None else {k: v[:1].expand(len(chunk), *v.shape[1:]) for k, v in uncond.items()}
            x = (noise * plan.start_scale).to(self.device, self.dtype)
            z = self._denoise(x, plan.sigmas, plan, sampler, cond, u, guidance, gens, eta=None,
                              callback=callback, progress=progress,
                              desc=f"frames {start + 1}-{start + len(chunk)}/{len(points)}")  # fmt: skip
            images += self.decode(z)
        return images
