"""Training a preview decoder (`sfumato.models.preview`) to imitate one VAE's decoder.

Distillation: for each training image x, a latent is drawn from the frozen VAE's posterior,
z = μ(x) + σ(x) e with e ~ N(0, I) (the example's own `BatchRandom` stream), and the preview decoder
learns to map z to what the VAE decodes from it:

    loss = |P(z) - clamp(D(z), -1, 1)|_1  +  |P(z) - clamp(D(z), -1, 1)|²       (means over pixels)

The target is the VAE's image, not x: a preview should show what the final decode will, flaws included.
The metric `psnr` is the preview's PSNR against that decode (in dB, images in [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sfumato.checkpoints.native import save_model
from sfumato.models.preview import PreviewDecoder, PreviewDecoderConfig
from sfumato.models.vae import AutoencoderKL
from sfumato.training.ldm import unwrap
from sfumato.training.task import BatchRandom, init_seeded
from sfumato.training.vae import image_grid, psnr


class PreviewTask:
    """The `Task` that distils `vae`'s decoder into a `PreviewDecoder` (see the module docstring).

    config: the decoder (default `PreviewDecoderConfig.for_vae(vae.config)`); its factor must be the VAE's.
    preview_batch: images (B, 3, H, W) in [-1, 1] (or a batch dict) whose decodes `preview` draws.
    """

    name = "preview"

    def __init__(
        self,
        vae: AutoencoderKL,
        config: PreviewDecoderConfig | None = None,
        *,
        seed: int = 0,
        preview_batch: dict | torch.Tensor | None = None,
    ):
        config = config or PreviewDecoderConfig.for_vae(vae.config)
        vc = vae.config
        if config.latent_channels != vc.z_channels or config.downsample_factor != vc.downsample_factor:
            raise ValueError(
                f"the preview decoder takes {config.latent_channels} channels and upsamples "
                f"{config.downsample_factor}x, the VAE has {vc.z_channels} latent channels and factor "
                f"{vc.downsample_factor}; use PreviewDecoderConfig.for_vae(vae.config)"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.config = config
        self.seed = seed
        self.preview_batch = preview_batch
        self.decoder = init_seeded(lambda: PreviewDecoder(config), seed)

    def trainable(self) -> PreviewDecoder:
        return self.decoder

    @torch.no_grad()
    def targets(self, images: torch.Tensor, rng: BatchRandom | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, clamp(D(z))) for images (B, 3, H, W): z a posterior sample (its mode when rng is None)."""
        device = next(self.vae.parameters()).device
        posterior = self.vae.encode(images.to(device))
        if rng is None:
            z = posterior.mode()
        else:
            z = posterior.mean + posterior.std * rng.randn(*posterior.mean.shape[1:]).to(device)
        return z, self.vae.decode(z).clamp(-1, 1)

    def loss(self, batch: dict, rng: BatchRandom, step: int, model: nn.Module) -> tuple[torch.Tensor, dict]:
        device = next(model.parameters()).device
        if next(self.vae.parameters()).device != device:
            self.vae.to(device)
        z, target = self.targets(batch["image"], rng)
        out = model(z)
        diff = out.float() - target.float()
        loss = diff.abs().mean() + diff.pow(2).mean()
        with torch.no_grad():
            quality = psnr(target, out.clamp(-1, 1)).mean()
        return loss, {"loss": loss.item(), "psnr": quality.item()}

    @torch.no_grad()
    def preview(self, model: nn.Module, step: int, folder) -> list[Path]:
        """`preview_{step}.png`: originals, the VAE's decodes, the preview decoder's; [] without a batch."""
        b = self.preview_batch
        images = b["image"] if isinstance(b, dict) else b
        if images is None:
            return []
        decoder = unwrap(model)
        if next(self.vae.parameters()).device != next(decoder.parameters()).device:
            self.vae.to(next(decoder.parameters()).device)
        z, target = self.targets(images, None)
        was_training = decoder.training
        try:
            out = decoder.eval()(z).clamp(-1, 1)
        finally:
            decoder.train(was_training)
        path = Path(folder) / f"{self.name}_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid([images.float().cpu(), target.float().cpu(), out.float().cpu()]).save(path)
        return [path]

    def export(self, model: nn.Module, folder) -> list[Path]:
        """`preview_decoder.safetensors`: the bare decoder, native format (a bundle's optional file)."""
        return [save_model(unwrap(model), Path(folder) / "preview_decoder.safetensors")]
