"""Latent diffusion training (Rombach et al. 2022): the objective of a text-to-image U-Net.

One step of `LDMTask.loss`, per example i of the batch (all random numbers from example i's own stream,
`BatchRandom`, drawn in this order):

    1. u_i ~ U[0, 1): the caption is replaced by "" when u_i < caption_dropout, so that the same network
       also learns the unconditional model that classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2)
    2. t_i ~ U{0, ..., T-1}; with `high_noise_share` s > 0, first v_i ~ U[0, 1), then t_i ~ U{T_h, ..., T-1}
       (T_h = `high_noise_from`) when v_i < s, else U{0, ..., T-1}. With `layout_steps` L, that holds for
       steps < L; from step L on the same numbers are drawn and t_i is the U{0, ..., T-1} draw.
       With `low_noise_until` T_l, t_i ~ U{0, ..., T_l-1} instead (the low expert of `NoiseLevelExperts`)
    3. e_i ~ N(0, I): the VAE posterior sample z0 = scaling_factor · (μ(x) + σ(x) e_i)   (frozen VAE; with
       per-channel statistics, `AutoencoderKL.to_diffusion` of μ(x) + σ(x) e_i)
    4. n_i ~ N(0, I): the diffusion noise; x_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) n_i
    loss_i = |U-Net(x_t, t, context_i) - target|², target = n_i (eps) or v (Salimans & Ho 2022)

Steps 4 and the loss are `DiscreteDenoiser.loss` (Ho et al. 2020, Algorithm 1), so the training target and
the sampler's reading of the network come from one place. With a `LatentCache`, μ, σ and the contexts are
read from disk instead of computed, and the draws are the same, so the loss is the same (up to rounding).

The frozen VAE and text encoder live on the task (eval mode, no gradients) and follow the U-Net to its
device the first time a loss or preview runs there. With `train_text_encoder=True` a copy of the text
encoder trains with the U-Net instead (`TextToImageModel`): a CLIP tower trained only on its pooled output
need not make its token states say what the U-Net must read (a contrastive loss over small batches is met
by a bag of words, and positions and relations get lost), and the diffusion loss can teach it that.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from sfumato.checkpoints.bundle import Bundle, ScheduleConfig, save_bundle
from sfumato.data.cache import LatentCache
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.models.clip import CLIPTextModel, prompt_mask
from sfumato.models.experts import ExpertTextEncoders, NoiseLevelExperts
from sfumato.models.unet import UNet, UNetConfig
from sfumato.models.vae import AutoencoderKL
from sfumato.pipelines.images import tensor_to_images
from sfumato.pipelines.metadata import save_png  # atomic: temporary name, then rename
from sfumato.pipelines.stable_diffusion import StableDiffusion
from sfumato.pipelines.steps import discrete_schedule
from sfumato.text.tokenizer import CLIPTokenizer
from sfumato.training.task import BatchRandom, init_seeded

DEFAULT_PROMPTS = ("a red circle", "a blue square", "a photo of a cat", "")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DDP / AveragedModel wrappers (both keep it as `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def freeze(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def check_dropout(p: float) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"caption_dropout must be a probability in [0, 1] (SD used 0.1), got {p}")


def dropped(rng: BatchRandom, p: float) -> torch.Tensor:
    """(B,) bool, True where example i's caption is replaced by "" (one uniform draw per example)."""
    return rng.rand() < p  # u in [0, 1): p = 0 drops none, p = 1 drops all


class TextContexts:
    """Frozen text encoder + tokenizer: captions -> contexts (B, T, D), with "" for dropped captions.

    A dropped row is exactly the context of the empty prompt (computed once), which is also what the
    pipeline feeds the unconditional half of classifier-free guidance."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer):
        self.text_encoder = freeze(text_encoder)
        self.tokenizer = tokenizer
        self._empty: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.text_encoder.config.width

    def to(self, device: torch.device) -> None:
        """Move the encoder to `device` (a no-op when it is there already)."""
        if next(self.text_encoder.parameters()).device != device:
            self.text_encoder.to(device)

    @torch.no_grad()
    def encode(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(list(captions)).to(device)  # (B, T)
        return self.text_encoder(ids).last_hidden_state.float()  # (B, T, D)

    def empty(self, device: torch.device) -> torch.Tensor:
        """(1, T, D) context of the empty prompt."""
        if self._empty is None or self._empty.device != device:
            self._empty = self.encode([""], device)
        return self._empty

    def contexts(
        self,
        captions: Sequence[str],
        drop: torch.Tensor,
        device: torch.device,
        cached: torch.Tensor | None = None,
        cached_captions: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Contexts of `captions` (B, T, D); rows with drop[i] get the empty prompt's. With `cached` contexts,
        only captions that differ from `cached_captions` are encoded."""
        empty = self.empty(device)
        out = empty.expand(len(captions), -1, -1).clone()  # (1, T, D) -> (B, T, D)
        if cached is not None:
            same = torch.tensor([c == k for c, k in zip(captions, cached_captions)], dtype=torch.bool)
            use = ~drop & same
            out[use.to(device)] = cached.to(device)[use.to(device)]
            todo = [i for i in range(len(captions)) if not drop[i] and not same[i]]
        else:
            todo = [i for i in range(len(captions)) if not drop[i]]
        if todo:
            out[todo] = self.encode([captions[i] for i in todo], device)
        return out


class TextToImageModel(nn.Module):
    """A U-Net and the text encoder that feeds it, trained as one module: forward takes token ids, so the
    diffusion loss reaches the text encoder (and DDP sees both in one call)."""

    def __init__(self, unet: UNet, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        context = self.text_encoder(ids).last_hidden_state
        mask = prompt_mask(ids, self.text_encoder.config.eos_token_id) if self.unet.config.mask_padding else None
        return self.unet(x, t, context=context.to(x.dtype), context_mask=mask)


def check_size(H: int, W: int, factor: int, what: str) -> None:
    if H % factor or W % factor:
        raise ValueError(
            f"{what}: images of {W}x{H} px do not divide into the U-Net's levels (multiples of {factor} px "
            f"needed); resize the dataset to e.g. {max(factor, W // factor * factor)} px"
        )


def t_quartile_metrics(per_example: torch.Tensor, t: torch.Tensor, T: int) -> dict[str, float]:
    """loss_q0 .. loss_q3: mean loss of the examples whose t lies in each quarter of [0, T) (only the
    quarters present in this batch), to see which noise levels the model has not learnt yet."""
    q = (t.cpu() * 4) // T  # (B,) in 0..3
    per = per_example.detach().float().cpu()
    return {f"loss_q{k}": float(per[q == k].mean()) for k in range(4) if bool((q == k).any())}


def image_grid(rows: list[list[Image.Image]], labels: Sequence[str] | None = None, tile: int = 128) -> Image.Image:
    """Rows of images as one picture; each tile upscaled (nearest) to at least `tile` px so that 32 px
    samples stay visible; labels[r] (the prompt) written under row r."""
    w0, h0 = rows[0][0].size
    scale = max(1, -(-tile // max(w0, h0)))
    w, h = w0 * scale, h0 * scale
    label_h = 14 if labels is not None else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w, len(rows) * (h + label_h)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for r, row in enumerate(rows):
        y = r * (h + label_h)
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (c * w, y))
        if labels is not None:
            text = labels[r] or '"" (unconditional)'
            max_chars = max(4, cols * w // 6)
            draw.text((3, y + h + 1), text if len(text) <= max_chars else text[: max_chars - 1] + "…",
                      fill="black", font=font)  # fmt: skip
    return grid


class LDMTask:
    """Text-to-image latent diffusion: a U-Net trained on frozen-VAE latents with frozen CLIP text contexts.

    unet_config: the U-Net to train from scratch (initialised from `seed`), or None with `unet=` to fine-tune
        existing weights (`LDMTask.from_bundle`).
    schedule: the training noise schedule and prediction type ("eps" or "v"); its `image_size`, when None,
        is taken from the training images and written into the exported bundle.
    caption_dropout: probability that a caption is replaced by "" (classifier-free guidance; SD used 0.1).
    min_snr_gamma: Min-SNR-γ loss weighting (Hang et al. 2023; 5 is their choice), or None for L_simple.
    min_snr_floor: with min_snr_gamma, the x0-space weight is clamp(SNR, floor, γ) (`min_snr_weight`): a floor
        keeps the highest noise levels, where layout is decided, from being trained at a weight near 0.
    high_noise_share, high_noise_from: the share of examples whose timestep is drawn from [high_noise_from, T)
        instead of [0, T) (diffusers' SDXL script calls this a "later" timestep bias). Where objects go is
        decided at the first, noisiest steps, and what a prompt says about places is learnt only there.
    layout_steps: a two-phase run. For steps < layout_steps, `high_noise_share` and `min_snr_floor` apply (the
        layout phase); from then on timesteps are uniform and the weight is plain Min-SNR-γ (the detail
        phase: the low noise levels, where edges are drawn, get their full share back). None: the whole run.
    low_noise_until: draw every t from [0, low_noise_until) only: a U-Net that will serve as the `low` of
        `NoiseLevelExperts` with that boundary, beside a high-noise expert (`HighNoiseExpertTask`) that learns
        the rest, spends all its steps on the levels it will be asked about (eDiff-I trains each expert on its
        own range). Such a U-Net cannot sample from pure noise alone, so its previews show its own job
        instead: the first training images seen, noised to just below the boundary and denoised under their
        captions (image-to-image at strength low_noise_until / T). None: every level.
    cache: a `LatentCache` of this dataset under this VAE and text encoder (`build_latent_cache`); with
        `train_text_encoder` only its latents are read.
    train_text_encoder: train a copy of the text encoder with the U-Net (`TextToImageModel`); the exported
        bundle then carries the trained copy. The text encoder's projection (pooled CLIP embedding) is not
        part of a bundle's use and stays as it was.
    preview_*: the sample grid of `preview`: prompts x seeds, sampler, steps and guidance scale.
    """

    name = "ldm"

    def __init__(
        self,
        unet_config: UNetConfig | None,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        schedule: ScheduleConfig,
        *,
        caption_dropout: float = 0.1,
        min_snr_gamma: float | None = None,
        min_snr_floor: float = 0.0,
        high_noise_share: float = 0.0,
        high_noise_from: int = 750,
        layout_steps: int | None = None,
        low_noise_until: int | None = None,
        seed: int = 0,
        preview_prompts: Sequence[str] = DEFAULT_PROMPTS,
        preview_seeds: Sequence[int] = (0, 1, 2, 3),
        preview_sampler: str = "dpmpp_2m",
        preview_steps: int = 20,
        preview_guidance: float = 5.0,
        cache: LatentCache | None = None,
        unet: UNet | None = None,
        train_text_encoder: bool = False,
    ):
        if unet is None:
            if unet_config is None:
                raise ValueError("give a unet_config to train from scratch, or unet= weights to fine-tune")
            unet = init_seeded(lambda: UNet(unet_config), seed)
        elif unet_config is not None and unet_config != unet.config:
            raise ValueError(f"unet_config {unet_config} differs from the given unet's {unet.config}")
        c, z = unet.config, vae.config.z_channels
        if c.in_channels != z or c.out_channels != z:
            raise ValueError(
                f"the U-Net maps {c.in_channels} -> {c.out_channels} channels but the VAE's latents have {z}; "
                f"set UNetConfig(in_channels={z}, out_channels={z})"
            )
        if c.context_dim != text_encoder.config.width:
            raise ValueError(
                f"UNetConfig.context_dim={c.context_dim} but the text encoder is {text_encoder.config.width} "
                f"wide; set context_dim={text_encoder.config.width}"
            )
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive (Hang et al. use 5) or None, got {min_snr_gamma}")
        if min_snr_floor and (min_snr_gamma is None or not 0 < min_snr_floor <= min_snr_gamma):
            raise ValueError(
                f"min_snr_floor={min_snr_floor} needs min_snr_gamma set and 0 < floor <= gamma "
                f"(gamma={min_snr_gamma}); 1 gives high noise levels plain v-loss's weight"
            )
        if min_snr_floor and schedule.prediction == "eps" and schedule.rescale_betas_zero_snr:
            raise ValueError(
                "min_snr_floor with eps-prediction and zero terminal SNR weights t=T by floor/0; use "
                "prediction='v' (as zero-SNR schedules require anyway) or no floor"
            )
        check_dropout(caption_dropout)
        if not 0 <= high_noise_share <= 1:
            raise ValueError(f"high_noise_share must be a probability in [0, 1] (0: uniform timesteps), got {high_noise_share}")
        T = int(schedule.num_timesteps)
        if high_noise_share and not 0 <= high_noise_from < T:
            raise ValueError(f"high_noise_from must be a timestep in [0, {T}), got {high_noise_from}")
        if layout_steps is not None and (layout_steps < 0 or not (high_noise_share or min_snr_floor)):
            raise ValueError(
                f"layout_steps={layout_steps} ends a layout phase that needs high_noise_share > 0 or "
                f"min_snr_floor > 0 and a step count >= 0; leave it None for a single-phase run"
            )
        if low_noise_until is not None:
            if not 0 < low_noise_until <= T:
                raise ValueError(f"low_noise_until must be a timestep in (0, {T}], got {low_noise_until}")
            if high_noise_share:
                raise ValueError(
                    f"low_noise_until={low_noise_until} and high_noise_share={high_noise_share} ask for opposite "
                    "timestep ranges; a low-noise expert takes no high-noise share"
                )
        self.unet = unet
        self.vae = freeze(vae)
        self.text = TextContexts(text_encoder, tokenizer)
        self.schedule = schedule
        self.train_schedule = discrete_schedule(schedule)  # ᾱ_t table for the loss
        self.caption_dropout = caption_dropout
        self.min_snr_gamma, self.min_snr_floor = min_snr_gamma, min_snr_floor
        self.high_noise_share, self.high_noise_from = high_noise_share, high_noise_from
        self.layout_steps = layout_steps
        self.low_noise_until = low_noise_until
        self.seed = seed
        self.preview_prompts = list(preview_prompts)
        self.preview_seeds = list(preview_seeds)
        self.preview_sampler, self.preview_steps = preview_sampler, preview_steps
        self.preview_guidance = preview_guidance
        self.cache = cache
        self.image_size: tuple[int, int] | None = None  # (H, W) of the training images, once seen
        self.joint: TextToImageModel | None = None
        self._preview_items: list[tuple[Image.Image, str]] | None = None  # low_noise_until's previews
        if train_text_encoder:
            trained = copy.deepcopy(text_encoder).train().requires_grad_(True)
            if trained.text_projection is not None:  # unused by the loss: no gradient, and DDP would stall on it
                trained.text_projection.requires_grad_(False)
            self.joint = TextToImageModel(unet, trained)

    @classmethod
    def from_bundle(cls, bundle: Bundle, **kwargs) -> LDMTask:
        """Fine-tune a loaded model: its U-Net (copied) is trained, its VAE and text encoder stay frozen."""
        return cls(None, bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.schedule,
                   unet=copy.deepcopy(bundle.unet).train().requires_grad_(True), **kwargs)  # fmt: skip

    # -- Task ---------------------------------------------------------------------------------------------

    def trainable(self) -> nn.Module:
        return self.joint if self.joint is not None else self.unet

    def _to(self, device: torch.device) -> None:
        """Move the frozen parts to the U-Net's device (once; a no-op afterwards)."""
        if next(self.vae.parameters()).device != device:
            self.vae.to(device)
        self.text.to(device)

    def in_layout_phase(self, step: int | None) -> bool:
        """Whether `step` trains with the high-noise share and the Min-SNR floor (see `layout_steps`)."""
        return self.layout_steps is None or (step is not None and step < self.layout_steps)

    def prepare(
        self, batch: dict, rng: BatchRandom, device: torch.device, step: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The inputs of one loss evaluation: latents z0 (B, z, h, w), context (B, T, D), t (B,), noise
        (B, z, h, w) and drop (B,) bool, all from `rng` as described in the module docstring. `step` matters
        only with `layout_steps` (None counts as past the layout phase)."""
        images, captions, indices = batch["image"], list(batch["caption"]), batch["index"].tolist()
        B, _, H, W = images.shape
        f = self.vae.config.downsample_factor
        check_size(H, W, f * self.unet.config.downsample_factor, "LDMTask")
        self.image_size = self.image_size or (H, W)
        if self.low_noise_until is not None and self._preview_items is None:  # no draw: the batch stays the same
            k = min(B, len(self.preview_seeds))
            self._preview_items = list(zip(tensor_to_images(images[:k].float()), captions[:k]))
        latent_shape = (self.vae.config.z_channels, H // f, W // f)

        drop = dropped(rng, self.caption_dropout)  # 1.
        T = self.train_schedule.num_timesteps
        if self.high_noise_share:  # 2.
            high = rng.rand() < self.high_noise_share
            high_t, uniform_t = self.high_noise_from + rng.randint(T - self.high_noise_from), rng.randint(T)
            t = torch.where(high, high_t, uniform_t) if self.in_layout_phase(step) else uniform_t
        else:
            t = rng.randint(T if self.low_noise_until is None else self.low_noise_until)
        posterior_eps = rng.randn(*latent_shape).to(device)  # 3.
        noise = rng.randn(*latent_shape).to(device)  # 4.

        self._to(device)
        cond = {}
        ids = None  # the prompts' token ids ("" where dropped), when the model reads them or masks by them
        if self.joint is not None or self.unet.config.mask_padding:
            ids = self.text.tokenizer(["" if d else c for c, d in zip(captions, drop.tolist())]).to(device)
        if self.joint is not None:  # the trained text encoder runs inside the model's forward (and masks there)
            cond["ids"] = ids
        with torch.no_grad():
            if self.cache is not None:
                cached = self.cache.get(indices, device)
                self.cache.check_images(indices, images, cached.thumb)
                mean, std = cached.mean, cached.std
                if self.joint is None:
                    cond["context"] = self.text.contexts(captions, drop, device, cached.context, cached.captions)
            else:
                posterior = self.vae.encode(images.to(device))
                mean, std = posterior.mean.float(), posterior.std.float()
                if self.joint is None:
                    cond["context"] = self.text.contexts(captions, drop, device)
            z0 = self.vae.to_diffusion(mean + std * posterior_eps)
        if "context" in cond and ids is not None:
            cond["context_mask"] = prompt_mask(ids, self.text.tokenizer.eos_token_id)
        return {"z0": z0, "t": t, "noise": noise, "drop": drop, **cond}

    def loss(
        self, batch: dict, rng: BatchRandom, step: int, model: nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        x = self.prepare(batch, rng, device, step)
        floor = self.min_snr_floor if self.in_layout_phase(step) else 0.0
        # through `model`'s own forward, so that DDP sees the call and synchronises gradients
        denoiser = DiscreteDenoiser(model, self.train_schedule, self.schedule.prediction)
        cond = {k: x[k] for k in ("ids", "context", "context_mask") if k in x}
        per_example = denoiser.loss(x["z0"], t=x["t"], noise=x["noise"], min_snr_gamma=self.min_snr_gamma,
                                    min_snr_floor=floor, **cond)  # fmt: skip
        loss = per_example.mean()
        metrics = {"loss": float(loss.detach()), "caption_dropped": float(x["drop"].float().mean())}
        metrics |= t_quartile_metrics(per_example, x["t"], self.train_schedule.num_timesteps)
        return loss, metrics

    # -- previews and export ------------------------------------------------------------------------------

    def export_schedule(self) -> ScheduleConfig:
        """The schedule with `image_size` set (from the training images when the config had none)."""
        if self.schedule.image_size is not None or self.image_size is None:
            return self.schedule
        return replace(self.schedule, image_size=max(self.image_size))

    def bundle(self, model: nn.Module) -> Bundle:
        """A `Bundle` of `model`'s U-Net (the EMA copy, say; and its text encoder when they train together)
        with this task's frozen parts."""
        unet, text_encoder = unwrap(model), self.text.text_encoder
        if isinstance(unet, TextToImageModel):
            unet, text_encoder = unet.unet, unet.text_encoder
        if type(unet) is not UNet:
            raise TypeError(f"expected the task's UNet (or a wrapper of it), got {type(unet).__name__}")
        return Bundle(unet=unet, vae=self.vae, text_encoder=text_encoder,
                      tokenizer=self.text.tokenizer, schedule=self.export_schedule())  # fmt: skip

    @torch.no_grad()
    def preview(self, model: nn.Module, step: int, folder) -> list[Path]:
        """A grid of samples, one row per preview prompt and one column per seed, prompt under each row."""
        unet = unwrap(model)
        p = next(unet.parameters())
        was_training = unet.training
        self._to(p.device)
        try:
            pipe = StableDiffusion(self.bundle(unet), device=p.device, dtype=p.dtype)  # sets eval()
            if self.low_noise_until is not None:
                return self._low_noise_preview(pipe, step, folder)
            H, W = self.image_size or (self.schedule.image_size or 64,) * 2
            images = pipe.generate(
                self.preview_prompts, steps=self.preview_steps, guidance=self.preview_guidance,
                sampler=self.preview_sampler, batch=len(self.preview_seeds),
                seed=[s for _ in self.preview_prompts for s in self.preview_seeds],
                width=W, height=H, candidates=1, progress=False,  # the model as it is: no best of K
            )  # fmt: skip
        finally:
            unet.train(was_training)
        n = len(self.preview_seeds)
        rows = [images[r * n : (r + 1) * n] for r in range(len(self.preview_prompts))]
        grid = image_grid(rows, self.preview_prompts)
        return [save_png(grid, Path(folder) / f"{self.name}-{step:07d}.png")]

    def _low_noise_preview(self, pipe: StableDiffusion, step: int, folder) -> list[Path]:
        """Per row a training image, then what the U-Net makes of it from just below `low_noise_until`
        under its caption, one column per preview seed (see `low_noise_until`)."""
        if not self._preview_items:  # before any batch (a preview at step 0)
            return []
        strength = self.low_noise_until / self.train_schedule.num_timesteps
        rows, labels = [], []
        for image, caption in self._preview_items:
            out = pipe.image_to_image(image, caption, strength=strength, steps=self.preview_steps,
                                      guidance=self.preview_guidance, sampler=self.preview_sampler,
                                      batch=len(self.preview_seeds), seed=list(self.preview_seeds), progress=False)  # fmt: skip
            rows.append([image, *out])
            labels.append(caption)
        return [save_png(image_grid(rows, labels), Path(folder) / f"{self.name}-{step:07d}.png")]

    def export(self, model: nn.Module, folder) -> list[Path]:
        """A bundle folder (`sfumato.load(folder)`, `sfumato generate --model folder`)."""
        return save_bundle(self.bundle(model), folder)


class HighNoiseExpertTask(LDMTask):
    """Train a high-noise expert for an existing text-to-image model (`models.experts.NoiseLevelExperts`).

    A fresh U-Net learns only t in [boundary, T) (`high_noise_share=1`, `high_noise_from=boundary`), on the
    base model's latents and with its text encoder frozen, so that both U-Nets read the same context. The
    base U-Net stays as it is and denoises t < boundary. Previews and the export are the pair, so
    `OUT/final` is the finished model. `kwargs` go to `LDMTask` (a Min-SNR floor keeps the noisiest levels,
    where nothing else is learnt here, from a weight near 0).

    train_text_encoder: the expert gets a text encoder of its own, a copy of the base's trained with it; the
    base's stays frozen for the low expert, and the pair reads both (`ExpertTextEncoders`, `split_context`).
    init_from_base: start the expert from the base U-Net's weights instead of a fresh initialisation, as
    eDiff-I (Balaji et al. 2022) starts its experts from one trained model; `unet_config` must then have
    the base's parameters (flags such as `mask_padding` may differ).
    """

    name = "expert"

    def __init__(
        self, base: Bundle, unet_config: UNetConfig, *, boundary: int, init_from_base: bool = False, **kwargs
    ):
        if isinstance(base.unet, NoiseLevelExperts):
            raise ValueError("the base model already has a high-noise expert; give a model with one U-Net")
        for key in ("high_noise_share", "high_noise_from", "layout_steps", "low_noise_until"):
            if key in kwargs:
                raise ValueError(f"{key} is fixed for a high-noise expert (it trains on t >= boundary only)")
        if "unet" in kwargs:
            raise ValueError("the expert starts fresh from unet_config or, with init_from_base=True, from the base")
        if init_from_base:
            unet = UNet(unet_config)
            missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"init_from_base needs the base U-Net's parameters, but unet_config lacks {unexpected[:3]} "
                    f"and adds {missing[:3]} ({len(unexpected)} and {len(missing)} in all); give the base's "
                    "architecture (e.g. context_layers=0) or init_from_base=False"
                )
            kwargs["unet"] = unet.train().requires_grad_(True)
        super().__init__(unet_config, base.vae, base.text_encoder, base.tokenizer, base.schedule,
                         high_noise_share=1.0, high_noise_from=boundary, **kwargs)  # fmt: skip
        self.low = freeze(base.unet)
        self.boundary = boundary
        self.preview_decoder = base.preview_decoder
        NoiseLevelExperts(self.unet, self.low, boundary)  # the pair must fit: same channels and context

    def _to(self, device: torch.device) -> None:
        super()._to(device)
        if next(self.low.parameters()).device != device:
            self.low.to(device)

    def bundle(self, model: nn.Module) -> Bundle:
        b = super().bundle(model)  # the expert, and its own text encoder when they train together
        split = self.joint is not None
        return replace(
            b,
            unet=NoiseLevelExperts(b.unet, self.low, self.boundary, split_context=split),
            text_encoder=ExpertTextEncoders(self.text.text_encoder, b.text_encoder) if split else b.text_encoder,
            preview_decoder=self.preview_decoder,
        )
