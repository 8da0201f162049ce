"""A tiny learned preview decoder: latents -> a rough picture, for watching a sample form.

The VAE decoder is the costly way to look at latents: Stable Diffusion's costs about 2.5 TFLOP for one
512 px image, seconds on a CPU, which is why a live preview every second (the server's, a progress
callback's) would slow sampling down to the preview's pace. This network is trained to imitate one VAE's
decoder (`sfumato.training.preview.PreviewTask`: distillation on that VAE's latents of training images)
and costs a few GFLOP at 512 px: it is narrow where the image is large. Its images are blurrier than the
VAE's and meant only for previews; the final image is always the VAE's.

Architecture (ours; TAESD, madebyollin 2023, showed how far a small convolutional decoder gets): a 3x3
convolution from the latent channels to `widths[0]`, then for each width a residual block of two 3x3
convolutions, followed (except after the last) by nearest 2x upsampling and a 3x3 convolution to the next
width; a 3x3 convolution to RGB at the end. `len(widths) - 1` upsamplings, so the decoder matches a VAE
with downsampling factor f = 2 ** (len(widths) - 1).

Input: *unscaled* latents, what `AutoencoderKL.decode` takes (z / scaling_factor of the diffusion latents).
Output: (B, 3, H, W), roughly in [-1, 1] (not clamped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sfumato.models import layers
from sfumato.models.layers import Conv2d, upsample_conv


@dataclass
class PreviewDecoderConfig:
    latent_channels: int = 4  # the VAE's z_channels
    # channels at the latent resolution, then after each 2x upsampling: (64, 32, 16, 8) decodes f = 8
    widths: tuple[int, ...] = (64, 32, 16, 8)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be one or more positive channel counts, got {self.widths}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be positive, got {self.latent_channels}")

    @property
    def downsample_factor(self) -> int:
        """The VAE factor f this decoder undoes: image pixels per latent pixel."""
        return 2 ** (len(self.widths) - 1)

    @classmethod
    def for_vae(cls, vae_config, widths: tuple[int, ...] | None = None) -> PreviewDecoderConfig:
        """A config matching a `VAEConfig` (its z_channels and factor): `widths` or halving from 64."""
        levels = len(vae_config.ch_mult)
        widths = widths or tuple(max(8, 64 >> i) for i in range(levels))
        if len(widths) != levels:
            raise ValueError(f"the VAE has factor {2 ** (levels - 1)}: widths needs {levels} entries, got {widths}")
        return cls(latent_channels=vae_config.z_channels, widths=widths)


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = Conv2d(channels, channels, 3, padding=1)
        self.conv2 = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Up(nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution from c_in to c_out channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if layers.FAST_UPSAMPLE and x.device.type == "cpu":  # the same result without the 4x larger input
            return upsample_conv(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PreviewDecoder(nn.Module):
    """Latents (B, latent_channels, h, w), unscaled -> images (B, 3, h * f, w * f); see the module docstring."""

    def __init__(self, config: PreviewDecoderConfig):
        super().__init__()
        self.config = config
        w = config.widths
        self.conv_in = Conv2d(config.latent_channels, w[0], 3, padding=1)
        self.blocks = nn.ModuleList(_Residual(c) for c in w)
        self.ups = nn.ModuleList(_Up(a, b) for a, b in zip(w[:-1], w[1:]))
        self.conv_out = Conv2d(w[-1], 3, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}"
            )
        x = self.conv_in(z)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.ups):
                x = self.ups[i](x)
        return self.conv_out(F.relu(x))
