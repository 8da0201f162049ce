"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G).

An image x (B, 3, H, W) in [-1, 1] is encoded to a diagonal Gaussian over latents (B, z, H/f, W/f),
f = 2**(len(ch_mult) - 1) (8 for Stable Diffusion); the decoder maps a latent back to an image. Module
names are those of the CompVis/ldm `AutoencoderKL`, so `AutoencoderKL(config).state_dict()` has exactly
the keys found under `first_stage_model.` in an SD 1.x/2.x single-file checkpoint (the loss modules
of training checkpoints aside):

    encoder.conv_in, encoder.down.{i}.block.{j}, encoder.down.{i}.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out, quant_conv,
    post_quant_conv, decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j}, decoder.up.{i}.upsample.conv,
    decoder.norm_out, decoder.conv_out

`decoder.up.{i}` is numbered by resolution level like `encoder.down.{i}` (0 = full resolution), although
the decoder runs it last; that is ldm's layout and its checkpoints'.

Latent scale: `encode` and `decode` work on *unscaled* latents. The diffusion model was trained on
`config.scaling_factor * z` (0.18215 for SD, chosen to give the latents unit variance), so a pipeline
does `z = scaling_factor * vae.encode(x).sample()` and `x = vae.decode(z / scaling_factor)`. A VAE whose
config has per-channel `latents_mean` and `latents_std` (diffusers' fields of the same names, as SDXL's
pipeline reads them) gives the diffusion model `(z - latents_mean) * scaling_factor / latents_std` instead,
every channel centred: `to_diffusion` and `from_diffusion` apply whichever the config asks for.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sfumato.models.layers import AttnBlock, Conv2d, ResnetBlock, Upsample, VAEDownsample, group_norm


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out (ldm's out_ch)
    ch: int = 128  # width of the full-resolution level; level i is ch * ch_mult[i] wide
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per level; len - 1 halvings of H and W
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more per level)
    z_channels: int = 4  # latent channels (ldm's z_channels and embed_dim, equal in every SD VAE)
    scaling_factor: float = 0.18215  # multiplies latents before diffusion, see the module docstring
    dropout: float = 0.0  # dropout inside the ResnetBlocks (0 in SD)
    # per-channel statistics subtracted and divided out before diffusion (None: SD's plain scaling)
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # JSON brings tuples back as lists
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std come together; set both or neither")
        if self.latents_mean is not None:
            self.latents_mean = tuple(float(v) for v in self.latents_mean)
            self.latents_std = tuple(float(v) for v in self.latents_std)
            for name in ("latents_mean", "latents_std"):
                if len(getattr(self, name)) != self.z_channels:
                    raise ValueError(f"{name} has {len(getattr(self, name))} values for z_channels={self.z_channels}; "
                                     "give one per latent channel")  # fmt: skip
            if min(self.latents_std) <= 0:
                raise ValueError(f"latents_std must be positive, got {self.latents_std}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)


VAE_PRESETS: dict[str, VAEConfig] = {
    # the f=8, z=4 KL autoencoder shared by SD 1.x and 2.x (kl-f8, ldm's autoencoder_kl_32x32x4.yaml)
    "sd": VAEConfig(),
    # about 0.66M parameters (SD: 83,653,863), f=2, for tests and toy training
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
}


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents, as returned by `AutoencoderKL.encode` (ldm's posterior).

    Built from the encoder's moments (B, 2z, h, w): the first z channels are the mean, the rest the
    log-variance, clamped to [-30, 20] as in ldm so that exp() stays finite.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, 2z, h, w) -> 2 x (B, z, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; noise drawn on the generator's device (CPU by default) for reproducibility."""
        device = generator.device if generator is not None else "cpu"
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over latent elements -> (B,); other defaults to N(0, I)."""
        if other is None:
            kl = self.mean.square() + self.var - 1.0 - self.logvar
        else:
            kl = (self.mean - other.mean).square() / other.var + self.var / other.var - 1.0
            kl = kl - self.logvar + other.logvar
        return 0.5 * kl.sum(dim=(1, 2, 3))


class Encoder(nn.Module):
    """Image -> Gaussian moments (B, 2z, H/f, W/f): ResnetBlocks with downsampling, then a mid attention."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.conv_in = Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c.ch
        for level, mult in enumerate(c.ch_mult):
            down = nn.Module()  # a bare container, so the names read `down.{level}.block.{j}` as in ldm
            down.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                down.block.append(ResnetBlock(ch, c.ch * mult, c.dropout))
                ch = c.ch * mult
            if level != len(c.ch_mult) - 1:
                down.downsample = VAEDownsample(ch)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(ch, ch, c.dropout)
        self.mid.attn_1 = AttnBlock(ch)
        self.mid.block_2 = ResnetBlock(ch, ch, c.dropout)
        self.norm_out = group_norm(ch, eps=1e-6)
        self.conv_out = Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)  # (B, C, H, W) -> (B, C, H/2, W/2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, out_channels, f*h, f*w): mid attention, ResnetBlocks, upsampling."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(ch, ch, c.dropout)
        self.mid.attn_1 = AttnBlock(ch)
        self.mid.block_2 = ResnetBlock(ch, ch, c.dropout)
        ups = []
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                up.block.append(ResnetBlock(ch, c.ch * mult, c.dropout))
                ch = c.ch * mult
            if level != 0:
                up.upsample = Upsample(ch)
            ups.append(up)
        self.up = nn.ModuleList(reversed(ups))  # indexed by level, 0 = full resolution (ldm order)
        self.norm_out = group_norm(ch, eps=1e-6)
        self.conv_out = Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):  # lowest resolution first
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))


def _ramp(n: int, width: int, rise: bool, fall: bool) -> torch.Tensor:
    """(n,) weights: 1, rising linearly over the first `width` entries if `rise`, falling over the last if `fall`."""
    w = torch.ones(n)
    width = min(width, n)
    ramp = (torch.arange(width) + 0.5) / width  # (0, 1), never exactly 0: every pixel keeps some weight
    if rise:
        w[:width] = torch.minimum(w[:width], ramp)
    if fall:
        w[n - width :] = torch.minimum(w[n - width :], ramp.flip(0))
    return w


class AutoencoderKL(nn.Module):
    """The SD image autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`, on unscaled latents."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.z_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = Conv2d(z, z, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior over unscaled latents for images x (B, in_channels, H, W) in [-1, 1]."""
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"expected images (B, {self.config.in_channels}, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}; crop or resize to a multiple of {f}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # (B, 2z, H/f, W/f)

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        c = self.config
        if c.latents_mean is None:
            return None
        shape = (1, -1) + (1,) * (z.ndim - 2)  # broadcast over channels (dim 1)
        return (torch.tensor(c.latents_mean, device=z.device, dtype=z.dtype).view(shape),
                torch.tensor(c.latents_std, device=z.device, dtype=z.dtype).view(shape))  # fmt: skip

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents from unscaled latents z (B, z, h, w): `scaling_factor * z`, or with per-channel
        statistics `(z - latents_mean) * scaling_factor / latents_std`."""
        stats = self._latent_stats(z)
        if stats is None:
            return z * self.config.scaling_factor
        mean, std = stats
        return (z - mean) * (self.config.scaling_factor / std)

    def from_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_diffusion`: unscaled latents, what `decode` takes."""
        stats = self._latent_stats(latents)
        if stats is None:
            return latents / self.config.scaling_factor
        mean, std = stats
        return latents * (std / self.config.scaling_factor) + mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (about [-1, 1]) from *unscaled* latents: diffusion latents through `from_diffusion` first."""
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise ValueError(f"expected latents (B, {self.config.z_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """`decode` in overlapping tiles of `tile` x `tile` latents, cross-faded over `overlap` latents.

        Peak memory is that of decoding one tile, whatever the image size (a 1024 px SD image: 128² latents,
        nine 64² tiles). Not exact: each tile's GroupNorms and mid-block attention see only the tile, so the
        result differs from `decode` (most near the seams; benchmarks/vae_tiled.py measures it). The defaults
        are diffusers' (`enable_vae_tiling`: 512 px tiles, a quarter overlap); its blending differs.
        """
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} with tile={tile}")
        B, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        f, stride = self.config.downsample_factor, tile - overlap

        def starts(n: int) -> list[int]:  # tile origins covering [0, n), the last one flush with the end
            if n <= tile:
                return [0]
            s = list(range(0, n - tile, stride))
            return s + [n - tile]

        ys, xs = starts(h), starts(w)
        out = z.new_zeros(B, self.config.out_channels, h * f, w * f)
        total = z.new_zeros(h * f, w * f)
        for y0 in ys:
            for x0 in xs:
                th, tw = min(tile, h - y0), min(tile, w - x0)
                img = self.decode(z[:, :, y0 : y0 + th, x0 : x0 + tw])  # (B, C, th*f, tw*f)
                # weight 1 inside, a linear ramp over the overlap on each side that meets another tile
                wy = _ramp(th * f, overlap * f, y0 > 0, y0 + th < h).to(z)
                wx = _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w).to(z)
                weight = wy[:, None] * wx[None, :]  # (th*f, tw*f)
                out[:, :, y0 * f : (y0 + th) * f, x0 * f : (x0 + tw) * f] += img * weight
                total[y0 * f : (y0 + th) * f, x0 * f : (x0 + tw) * f] += weight
        return out / total

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction from a posterior sample, and the posterior (for the KL term of training)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior
