"""Pixel-space DDPM (Ho et al. 2020): our U-Net trained directly on images in [-1, 1].

Training is Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps, regress the
network onto eps (or v), through `DiscreteDenoiser.loss`. Sampling is Algorithm 2 (ancestral) on a ladder
of `steps` of the T training levels (`sample_ddpm`), or DDIM for speed.

The U-Net always has cross-attention. Unconditional models get a *zero context* (B, 1, context_dim): the
keys and values of cross-attention are then constants (`to_k`/`to_v` have no bias: all zero, so the
attention output is just `to_out`'s bias), a learned constant the network absorbs. Conditional models
(`conditional=True`) get a frozen CLIP text encoder's contexts, with caption dropout for classifier-free
guidance, as in `LDMTask`.

Per example i the draws are, in this order: u_i (caption dropout, conditional models only), t_i, eps_i.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from sfumato.checkpoints.atomic import write_text_atomic
from sfumato.checkpoints.bundle import ScheduleConfig
from sfumato.checkpoints.native import load_model, save_model
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.diffusion.guidance import classifier_free_guidance, static_thresholding
from sfumato.diffusion.samplers import SAMPLERS
from sfumato.models.clip import CLIPTextModel
from sfumato.models.unet import UNet, UNetConfig
from sfumato.pipelines.images import tensor_to_images
from sfumato.pipelines.metadata import save_png
from sfumato.pipelines.steps import discrete_schedule, plan_steps
from sfumato.text.tokenizer import CLIPTokenizer
from sfumato.training.ldm import (
    TextContexts,
    check_dropout,
    check_size,
    dropped,
    image_grid,
    t_quartile_metrics,
    unwrap,
)
from sfumato.training.task import BatchRandom, init_seeded

# Ho et al. 2020, sec. 4: β linear from 1e-4 to 0.02 over T = 1000; sampling starts at t = T - 1 ("trailing")
DDPM_SCHEDULE = ScheduleConfig(
    beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000, prediction="eps",
    steps_offset=0, timestep_spacing="trailing",
)  # fmt: skip


def zero_context(batch: int, context_dim: int, device=None) -> torch.Tensor:
    """(B, 1, context_dim) zeros: the context of an unconditional model (see the module docstring)."""
    return torch.zeros(batch, 1, context_dim, device=device)


@torch.no_grad()
def sample_images(
    unet: nn.Module,
    schedule: ScheduleConfig,
    *,
    seeds: Sequence[int],
    image_size: int | tuple[int, int],
    steps: int = 100,
    sampler: str = "ddpm",
    context: torch.Tensor | None = None,
    uncond_context: torch.Tensor | None = None,
    guidance: float = 1.0,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] from a pixel-space U-Net, image i from its own generator seeded seeds[i].

    context: (N, T, D) text contexts, or None for an unconditional model (zero contexts). With guidance > 1,
    classifier-free guidance against `uncond_context` (the empty prompt's context, (N, T, D)).
    sampler: "ddpm" is ancestral sampling (Ho et al. 2020, Algorithm 2) on `steps` of the training levels;
    "ddim" is deterministic DDIM (Song et al. 2021); any name of `sfumato.diffusion.samplers.SAMPLERS` works.
    clip_denoised: clamp every x0 prediction to [-1, 1], as Ho et al.'s sampler does (`clip_denoised=True`
    in their code; "static thresholding", Saharia et al. 2022, sec. 2.3). An eps-prediction's
    x0 = (x_t - sqrt(1 - ᾱ) ε̂) / sqrt(ᾱ) multiplies the error of ε̂ by ~150 at t = T - 1 of the linear
    schedule; clamping keeps those early, meaningless predictions inside the data range.
    """
    p = next(unet.parameters())
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    n = len(seeds)
    plan = plan_steps(schedule, sampler, steps)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn((unet.config.in_channels, H, W), generator=g) for g in gens])
    x = (noise * plan.start_scale).to(p.device, p.dtype)  # unit noise -> the VE sample at sigmas[0]
    denoiser = DiscreteDenoiser(unet, plan.schedule, schedule.prediction, plan.quantize)
    if context is None:
        context = zero_context(n, unet.config.context_dim)
    cond = {"context": context.to(p.device, p.dtype)}
    if guidance != 1 and uncond_context is None:
        raise ValueError("guidance != 1 needs uncond_context (the empty prompt's context)")
    uncond = {"context": uncond_context.to(p.device, p.dtype)} if guidance != 1 else {}
    guided = classifier_free_guidance(denoiser, guidance, cond, uncond)
    if clip_denoised:
        guided = static_thresholding(guided)
    x0 = SAMPLERS[sampler](guided, x, plan.sigmas, generator=gens)
    return x0.float().clamp(-1, 1)


class DDPMTask:
    """DDPM on pixels: `trainable()` is a U-Net with 3 channels in and out.

    schedule_config: the noise schedule and prediction; None is Ho et al.'s (`DDPM_SCHEDULE`).
    image_size: the side of the training images (checked against every batch; previews use it).
    conditional: condition on captions through a frozen `text_encoder` + `tokenizer`, with caption dropout;
        otherwise the U-Net sees a zero context (module docstring).
    """

    name = "ddpm"

    def __init__(
        self,
        unet_config: UNetConfig,
        schedule_config: ScheduleConfig | None = None,
        *,
        image_size: int,
        conditional: bool = False,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        caption_dropout: float = 0.1,
        min_snr_gamma: float | None = None,
        seed: int = 0,
        preview_seeds: Sequence[int] = tuple(range(8)),
        preview_prompts: Sequence[str] = ("a red circle", "a blue square", ""),
        preview_sampler: str = "ddpm",
        preview_steps: int = 100,
        preview_guidance: float = 3.0,
    ):
        if unet_config.in_channels != 3 or unet_config.out_channels != 3:
            raise ValueError(
                f"a pixel-space DDPM U-Net maps 3 -> 3 channels, got {unet_config.in_channels} -> "
                f"{unet_config.out_channels}; set UNetConfig(in_channels=3, out_channels=3)"
            )
        check_size(image_size, image_size, unet_config.downsample_factor, "DDPMTask")
        check_dropout(caption_dropout)
        self.text: TextContexts | None = None
        if conditional:
            if text_encoder is None or tokenizer is None:
                raise ValueError("conditional=True needs a text_encoder and a tokenizer")
            if unet_config.context_dim != text_encoder.config.width:
                raise ValueError(
                    f"UNetConfig.context_dim={unet_config.context_dim} but the text encoder is "
                    f"{text_encoder.config.width} wide; set context_dim={text_encoder.config.width}"
                )
            self.text = TextContexts(text_encoder, tokenizer)
        elif text_encoder is not None:
            raise ValueError("a text_encoder was given but conditional=False; pass conditional=True to use it")
        self.unet = init_seeded(lambda: UNet(unet_config), seed)
        self.schedule = replace(schedule_config or DDPM_SCHEDULE, image_size=image_size)
        self.train_schedule = discrete_schedule(self.schedule)
        self.image_size = image_size
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.seed = seed
        self.preview_seeds = list(preview_seeds)
        self.preview_prompts = list(preview_prompts)
        self.preview_sampler, self.preview_steps = preview_sampler, preview_steps
        self.preview_guidance = preview_guidance

    @property
    def conditional(self) -> bool:
        return self.text is not None

    def trainable(self) -> nn.Module:
        return self.unet

    def loss(
        self, batch: dict, rng: BatchRandom, step: int, model: nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        x0 = batch["image"].to(device, torch.float32)
        B, C, H, W = x0.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"DDPMTask(image_size={self.image_size}) got a batch of {W}x{H} px images")
        metrics: dict[str, float] = {}
        if self.conditional:
            drop = dropped(rng, self.caption_dropout)
            self.text.to(device)
            context = self.text.contexts(list(batch["caption"]), drop, device)
            metrics["caption_dropped"] = float(drop.float().mean())
        else:
            context = zero_context(B, self.unet.config.context_dim, device)
        t = rng.randint(self.train_schedule.num_timesteps)
        noise = rng.randn(C, H, W).to(device)
        denoiser = DiscreteDenoiser(model, self.train_schedule, self.schedule.prediction)
        per_example = denoiser.loss(x0, t=t, noise=noise, min_snr_gamma=self.min_snr_gamma, context=context)
        loss = per_example.mean()
        metrics = {"loss": float(loss.detach())} | metrics
        metrics |= t_quartile_metrics(per_example, t, self.train_schedule.num_timesteps)
        return loss, metrics

    @torch.no_grad()
    def samples(self, model: nn.Module, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(len(prompts) * len(seeds), 3, H, W) samples, prompt-major; prompts only for conditional models."""
        unet = unwrap(model)
        was_training = unet.training
        unet.eval()
        try:
            context = uncond = None
            guidance = 1.0
            if self.conditional:
                device = next(unet.parameters()).device
                self.text.to(device)
                prompts = list(prompts if prompts is not None else self.preview_prompts)
                context = self.text.encode(prompts, device).repeat_interleave(len(seeds), 0)  # (P*S, T, D)
                uncond = self.text.empty(device).expand(len(context), -1, -1)
                guidance = self.preview_guidance
                seeds = [s for _ in prompts for s in seeds]
            return sample_images(unet, self.schedule, seeds=seeds, image_size=self.image_size,
                                 steps=self.preview_steps, sampler=self.preview_sampler, context=context,
                                 uncond_context=uncond, guidance=guidance)  # fmt: skip
        finally:
            unet.train(was_training)

    def preview(self, model: nn.Module, step: int, folder) -> list[Path]:
        """A grid of samples: one row (per prompt, for conditional models), one column per seed."""
        images = tensor_to_images(self.samples(model, self.preview_seeds).cpu())
        n = len(self.preview_seeds)
        rows = [images[i : i + n] for i in range(0, len(images), n)]
        grid = image_grid(rows, self.preview_prompts if self.conditional else None)
        return [save_png(grid, Path(folder) / f"{self.name}-{step:07d}.png")]

    def export(self, model: nn.Module, folder) -> list[Path]:
        """unet.safetensors + schedule.json (+ text_encoder.safetensors and tokenizer/ when conditional);
        `load_ddpm(folder)` reads them back."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        written = [save_model(unwrap(model), d / "unet.safetensors")]
        if self.conditional:
            written.append(save_model(self.text.text_encoder, d / "text_encoder.safetensors"))
            self.text.tokenizer.save(d / "tokenizer")
            written.append(d / "tokenizer")
        write_text_atomic(d / "schedule.json", json.dumps(asdict(self.schedule), indent=2) + "\n")
        return written + [d / "schedule.json"]


def load_ddpm(folder) -> tuple[UNet, ScheduleConfig]:
    """The U-Net and schedule written by `DDPMTask.export` (sample them with `sample_images`)."""
    d = Path(folder)
    unet = load_model(d / "unet.safetensors")
    if not isinstance(unet, UNet):
        raise ValueError(f"{d / 'unet.safetensors'} holds a {type(unet).__name__}, not a UNet")
    return unet.eval(), ScheduleConfig.from_json(d / "schedule.json")
