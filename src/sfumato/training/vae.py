"""Training the KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1 and appendix G).

The objective is ldm's `LPIPSWithDiscriminator` without the perceptual term and the learnt output
variance:

    L = L_rec + β * KL                                    (the β-VAE ELBO, `sfumato.training.losses.vae_loss`)
      + f(step) * (λ * w * L_adv  +  L_disc)              (Esser et al. 2021, eq. (5)-(7))

with L_adv = -E[D(x_rec)], L_disc the discriminator's hinge loss, λ the adaptive weight, w = disc_weight
and f(step) = 1 from `disc_start` on, 0 before (ldm's `disc_factor`; the terms are still computed, times 0,
so the autograd graph, and DDP's view of which parameters are used, is the same at every step).

One loss, one backward, one optimizer step trains both networks, and yet neither pushes the other:

- the discriminator sees the reconstruction *detached* in L_disc, so L_disc has no gradient into the VAE;
- L_adv runs the discriminator through `torch.func.functional_call` with its parameters *detached*, so
  L_adv's gradient reaches the VAE (through x_rec) but not the discriminator's weights.

So the VAE's gradient is that of L_rec + β KL + λ w L_adv and the discriminator's that of L_disc, exactly
what ldm's two alternating optimizers compute (with the same reconstruction in both halves).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.func import functional_call

from sfumato.checkpoints.native import save_model
from sfumato.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from sfumato.pipelines.images import tensor_to_images
from sfumato.training.distributed import all_reduce_mean, world
from sfumato.training.losses import (
    DiscConfig,
    NLayerDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    vae_loss,
)
from sfumato.training.task import BatchRandom, init_seeded


class VAEWithDiscriminator(nn.Module):
    """What `VAETask` trains: the autoencoder (`.vae`) and, optionally, its discriminator (`.disc`).

    Its forward computes everything the loss needs, so that under DDP every gradient flows through
    `forward` (DDP only synchronises what the wrapped forward produced).
    """

    def __init__(self, vae_config: VAEConfig, disc_config: DiscConfig | None = None):
        super().__init__()
        self.vae = AutoencoderKL(vae_config)
        self.disc = NLayerDiscriminator(disc_config) if disc_config is not None else None

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> dict:
        """x: images (B, 3, H, W) in [-1, 1]; noise: N(0, I) of the latent's shape (B, z, H/f, W/f).

        Returns {"recon", "posterior"} and, with a discriminator, {"logits_fake_g" (D on x_rec with D's
        parameters detached), "logits_real" (D on x), "logits_fake_d" (D on x_rec detached)}.
        """
        posterior = self.vae.encode(x)
        if posterior.mean.dtype != torch.float32:  # under autocast: the KL's sum over latents in float32
            posterior = DiagonalGaussian(torch.cat([posterior.mean, posterior.logvar], dim=1).float())
        z = posterior.mean + posterior.std * noise  # reparameterisation (Kingma & Welling 2014, eq. (10))
        recon = self.vae.decode(z)
        out = {"recon": recon, "posterior": posterior}
        if self.disc is not None:
            frozen = {name: p.detach() for name, p in self.disc.named_parameters()}
            out["logits_fake_g"] = functional_call(self.disc, frozen, (recon,))
            # Real and detached fake in one call: GroupNorm works per sample, so batching them is exact.
            logits = self.disc(torch.cat([x, recon.detach()]))  # (2B, 1, h, w)
            out["logits_real"], out["logits_fake_d"] = logits.chunk(2)
        return out


def _bare(model: nn.Module) -> VAEWithDiscriminator:
    return getattr(model, "module", model)  # unwrap DDP


def psnr(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on [0, 1] with the reconstruction clamped."""
    a = (x.detach().float() + 1) / 2
    b = ((x_rec.detach().float() + 1) / 2).clamp(0, 1)
    mse = (a - b).square().flatten(1).mean(dim=1).clamp_min(1e-10)  # (B,)
    return -10 * torch.log10(mse)


class VAETask:
    """The `Task` that trains an `AutoencoderKL` (optionally against a PatchGAN discriminator).

    vae_config: the autoencoder to train (e.g. `VAE_PRESETS["tiny"]`).
    kl_weight: β; 1e-6 as ldm's kl-f8 (with the KL normalised as `losses.kl_loss` explains).
    recon: "l1" (ldm) or "l2".
    disc: a discriminator config, or None for a plain β-VAE.
    disc_start: the step from which the adversarial terms count (ldm: 50,001 for kl-f8).
    disc_weight: w, multiplying the adaptive weight λ (ldm: 0.5).
    seed: the initial weights, and (with the step and the example's index) the per-example posterior noise.
    preview_batch: a batch (a dict with "image", or an image tensor) whose reconstructions `preview`
        draws and whose latents set the exported `scaling_factor` (unless `stats_batch` is given); may also
        be assigned later.
    channel_stats: export per-channel `latents_mean` and `latents_std`, and `scaling_factor` = `channel_scale`,
        so that every channel of the diffusion latents is centred and has std `channel_scale`
        (`AutoencoderKL.to_diffusion`), instead of SD's single factor 1 / std. A small VAE's channels can
        settle far from zero (means of -4 to +4 against within-channel stds near 1 in this project's runs);
        a single factor then leaves that offset in the latents, and its size, which differs from run to run,
        sets how much of the diffusion model's unit variance is image content.
    channel_scale: the std of every channel of the diffusion latents with `channel_stats`.
    stats_batch: the images to estimate the exported statistics on (default the preview batch).
    """

    name = "vae"

    def __init__(
        self,
        vae_config: VAEConfig,
        *,
        kl_weight: float = 1e-6,
        recon: str = "l1",
        disc: DiscConfig | None = None,
        disc_start: int = 50_001,
        disc_weight: float = 0.5,
        seed: int = 0,
        preview_batch: dict | torch.Tensor | None = None,
        channel_stats: bool = False,
        channel_scale: float = 1.0,
        stats_batch: dict | torch.Tensor | None = None,
    ):
        if recon not in ("l1", "l2"):
            raise ValueError(f"recon must be 'l1' or 'l2', got {recon!r}")
        if kl_weight < 0 or disc_weight < 0:
            raise ValueError(f"kl_weight and disc_weight must be >= 0, got {kl_weight} and {disc_weight}")
        self.vae_config = vae_config
        self.kl_weight = kl_weight
        self.recon = recon
        self.disc = disc
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.seed = seed
        self.preview_batch = preview_batch
        if channel_scale <= 0:
            raise ValueError(f"channel_scale must be > 0, got {channel_scale}")
        self.channel_stats = channel_stats
        self.channel_scale = channel_scale
        self.stats_batch = stats_batch

    def trainable(self) -> VAEWithDiscriminator:
        return init_seeded(lambda: VAEWithDiscriminator(self.vae_config, self.disc), self.seed)

    # -- objective -------------------------------------------------------------------------------------------

    def loss_terms(
        self, batch: dict, rng: BatchRandom, step: int, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The weighted terms whose sum is the loss, and the metrics.

        Terms: "rec" (L_rec), "kl" (β KL) and, with a discriminator, "adv" (f λ w L_adv: gradient into the
        VAE only) and "disc" (f L_disc: gradient into the discriminator only).
        """
        bare = _bare(model)
        device = next(bare.parameters()).device
        x = batch["image"].to(device)
        c = self.vae_config
        f = c.downsample_factor
        noise = rng.randn(c.z_channels, x.shape[-2] // f, x.shape[-1] // f).to(device)  # (B, z, h, w)
        out = model(x, noise)
        _, rec, kl = vae_loss(x, out["recon"], out["posterior"], kl_weight=self.kl_weight, recon=self.recon)
        terms = {"rec": rec, "kl": self.kl_weight * kl}
        metrics = {"rec": rec.item(), "kl": kl.item(), "psnr": psnr(x, out["recon"]).mean().item()}
        if bare.disc is not None:
            active = step >= self.disc_start
            adv = generator_loss(out["logits_fake_g"])
            d_loss = hinge_d_loss(out["logits_real"], out["logits_fake_d"])
            if active:
                # λ from the global batch's gradients: averaged over ranks it is the same everywhere and
                # the same as one process would compute on the whole batch.
                last = bare.vae.decoder.conv_out.weight
                lam = adaptive_weight(rec, adv, last, reduce=all_reduce_mean if world()[1] > 1 else None)
            else:
                lam = torch.zeros((), device=device)
            factor = 1.0 if active else 0.0
            terms["adv"] = factor * lam * self.disc_weight * adv
            terms["disc"] = factor * d_loss
            metrics |= {"adv": adv.item(), "disc": d_loss.item(), "lambda": lam.item(),
                        "logits_real": out["logits_real"].mean().item(),
                        "logits_fake": out["logits_fake_d"].mean().item()}
        return terms, metrics

    def loss(
        self, batch: dict, rng: BatchRandom, step: int, model: nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]:
        terms, metrics = self.loss_terms(batch, rng, step, model)
        loss = sum(terms.values())
        metrics["loss"] = loss.item()
        return loss, metrics

    # -- preview and export ----------------------------------------------------------------------------------

    def _preview_images(self) -> torch.Tensor | None:
        b = self.preview_batch
        return b["image"] if isinstance(b, dict) else b

    def _stats_images(self) -> torch.Tensor | None:
        b = self.stats_batch if self.stats_batch is not None else self.preview_batch
        return b["image"] if isinstance(b, dict) else b

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstructions decode(mode(encode(x))) of images (B, 3, H, W) in [-1, 1]."""
        vae = _bare(model).vae if not isinstance(model, AutoencoderKL) else model
        device = next(vae.parameters()).device
        return vae.decode(vae.encode(images.to(device)).mode()).float().cpu()

    def preview(self, model: nn.Module, step: int, folder) -> list[Path]:
        """`vae_{step}.png`: originals on the top row, reconstructions (posterior mode) below; [] without a
        preview batch."""
        images = self._preview_images()
        if images is None:
            return []
        recon = self.reconstruct(model, images)
        path = Path(folder) / f"vae_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid([images.float().cpu(), recon]).save(path)
        return [path]

    @torch.no_grad()
    def estimate_scaling_factor(self, model: nn.Module, batches: Iterable, seed: int = 0) -> float:
        """1 / std of posterior samples over the given batches (dicts with "image", or image tensors).

        Rombach et al. 2022, sec. 4.3.2 / appendix G: the latents that the diffusion model sees are rescaled
        to unit standard deviation, the factor estimated once on the first batch (ldm's
        `LatentDiffusion.on_train_batch_start`: 1 / z.flatten().std() of posterior samples); for SD's kl-f8
        this is the 0.18215 in every SD config. The noise comes from a CPU generator seeded with `seed`.
        """
        return float(1.0 / self._posterior_samples(model, batches, seed).std())

    @torch.no_grad()
    def estimate_latent_stats(
        self, model: nn.Module, batches: Iterable, seed: int = 0
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of posterior samples over the given batches: the `latents_mean` and
        `latents_std` that make each channel of the diffusion latents zero-mean and of unit variance."""
        z = self._posterior_samples(model, batches, seed)  # (N, z, h, w)
        z = z.transpose(0, 1).flatten(1)  # (z, N h w)
        return tuple(z.mean(1).tolist()), tuple(z.std(1).tolist())

    def _posterior_samples(self, model: nn.Module, batches: Iterable, seed: int) -> torch.Tensor:
        vae = _bare(model).vae if not isinstance(model, AutoencoderKL) else model
        device = next(vae.parameters()).device
        g = torch.Generator().manual_seed(seed)
        zs = []
        for b in batches:
            x = b["image"] if isinstance(b, dict) else b
            zs.append(vae.encode(x.to(device)).sample(g).float().cpu())
        if not zs:
            raise ValueError("estimating the latent scale needs at least one batch of images")
        return torch.cat(zs)

    def export(self, model: nn.Module, folder) -> list[Path]:
        """`vae.safetensors`: the bare AutoencoderKL, native format. Its config's latent scale is
        re-estimated on the stats (else the preview) batch when there is one, else kept: `scaling_factor`
        (`estimate_scaling_factor`) or, with `channel_stats`, per-channel statistics (`estimate_latent_stats`)."""
        vae = _bare(model).vae
        config = vae.config
        images = self._stats_images()
        if images is not None:
            vae.config = self.exported_config(vae, images)
        try:
            return [save_model(vae, Path(folder) / "vae.safetensors")]
        finally:
            vae.config = config

    def exported_config(self, vae: AutoencoderKL, images: torch.Tensor) -> VAEConfig:
        """`vae`'s config with the latent scale estimated on `images`, as `export` writes it."""
        if self.channel_stats:
            mean, std = self.estimate_latent_stats(vae, [images])
            return replace(vae.config, scaling_factor=self.channel_scale, latents_mean=mean, latents_std=std)
        return replace(vae.config, scaling_factor=self.estimate_scaling_factor(vae, [images]),
                       latents_mean=None, latents_std=None)  # fmt: skip


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> Image.Image:
    """Rows of images (each (N, 3, H, W) in [-1, 1], same N, H, W) -> one PIL image, `pad` px of white."""
    pil_rows = [tensor_to_images(r) for r in rows]
    w, h = pil_rows[0][0].size
    cols = len(pil_rows[0])
    grid = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for i, row in enumerate(pil_rows):
        for j, im in enumerate(row):
            grid.paste(im, (pad + j * (w + pad), pad + i * (h + pad)))
    return grid

