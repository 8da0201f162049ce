"""Training objectives as small pure functions: contrastive (CLIP, SigLIP) and autoencoder (VAE + GAN).

Everything here maps tensors to tensors and knows nothing about ranks, steps or tasks: the tasks in
`sfumato.training.clip` / `sfumato.training.vae` decide what to feed in (e.g. features gathered from every
rank) and how to weight the terms.

- `clip_loss`: symmetric InfoNCE, Radford et al. 2021, Figure 3.
- `siglip_loss`: pairwise sigmoid loss, Zhai et al. 2023, Algorithm 1.
- `reconstruction_loss`, `kl_loss`: the two terms of a β-weighted Gaussian ELBO (Kingma & Welling 2014;
  Higgins et al. 2017), normalised per image element (see `kl_loss` for why that keeps ldm's β).
- `hinge_d_loss`, `generator_loss`, `adaptive_weight`: the adversarial part of the VQGAN / LDM autoencoder
  objective (Esser et al. 2021, eq. (5)-(7); Rombach et al. 2022, appendix G).
- `NLayerDiscriminator`: the PatchGAN of pix2pix (Isola et al. 2017, sec. 3.2.2) that judges overlapping
  patches, with GroupNorm in place of BatchNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sfumato.models.vae import DiagonalGaussian

# ---------------------------------------------------------------------------------------------------------
# Contrastive image-text objectives


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    negatives: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Figure 3), averaged over both directions.

    image_features, text_features: (N, D), row i of each is a matching pair; normalised here.
    logit_scale: the learnable *log* temperature t (`CLIP.logit_scale`); logits = exp(t) * I_e @ T_e^T.
    negatives: optional (M, D) features of texts that describe no image of the batch (hard negatives, as in
        NegCLIP, Yuksekgonul et al. 2023): extra columns of the image -> text direction only.
    negative_mask: optional (M,) bool, False for negatives to ignore (their logits become -inf).

        logits = exp(t) * norm(I) @ norm([T; Neg])^T   # (N, N + M), entry (i, j) = image i vs text j
        loss   = (CE(logits, arange(N)) + CE(logits[:, :N]^T, arange(N))) / 2

    The first cross-entropy picks each image's caption among the texts (rows), the second each caption's
    image among the N images (columns).
    """
    _check_pairs(image_features, text_features)
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image @ text.t()  # (N, D) @ (D, N) -> (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    i2t = logits
    if negatives is not None:
        extra = logit_scale.exp() * image @ F.normalize(negatives, dim=-1).t()  # (N, M)
        if negative_mask is not None:
            extra = extra.masked_fill(~negative_mask.to(extra.device)[None, :], float("-inf"))
        i2t = torch.cat([logits, extra], dim=1)  # (N, N + M)
    return 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(logits.t(), labels))


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, Algorithm 1 and eq. (1)).

    Every image-text pair is an independent binary problem, positive on the diagonal only:

        z_ij   = +1 if i == j else -1
        loss   = -(1/N) * sum_i sum_j log sigmoid(z_ij * (exp(t) * <x_i, y_j> + b))

    with x, y the normalised image and text features, t = logit_scale (log temperature, init log 10) and
    b = logit_bias (init -10). Note the 1/N, not 1/N²: the paper normalises by the batch size.
    """
    _check_pairs(image_features, text_features)
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image @ text.t() + logit_bias  # (N, N)
    n = logits.shape[0]
    z = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(z * logits).sum() / n


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image and text features must both be (N, D) with row i of each forming a pair, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


# ---------------------------------------------------------------------------------------------------------
# Autoencoder objectives


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean per image element of |x - x_rec| ("l1", as ldm's autoencoder) or (x - x_rec)² ("l2").

    "l2" is the Gaussian log-likelihood -log p(x|z) up to a constant and a factor 1/(2σ²), i.e. the
    reconstruction half of the VAE's ELBO (Kingma & Welling 2014, eq. (3)); "l1" is the Laplace one, which
    keeps edges sharper.
    """
    if kind == "l1":
        return (x - x_rec).abs().mean()
    if kind == "l2":
        return (x - x_rec).square().mean()
    raise ValueError(f"recon must be 'l1' or 'l2', got {kind!r}")


def kl_loss(posterior: DiagonalGaussian, elements_per_image: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch, divided by C*H*W of the image.

    ldm's autoencoder loss sums both the reconstruction and the KL over their elements and divides by the
    batch size, with kl_weight = 1e-6. `reconstruction_loss` is a mean per image element instead (so its
    size does not depend on the resolution); dividing the KL by the same element count keeps the ratio of
    the two terms, hence the meaning of β: `rec + β * kl` here is ldm's loss divided by C*H*W.
    """
    return posterior.kl().mean() / elements_per_image


def vae_loss(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    posterior: DiagonalGaussian,
    *,
    kl_weight: float,
    recon: str = "l1",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The β-VAE objective rec + β·KL (Higgins et al. 2017; β = 1 with "l2" and σ² = 1/2 is the ELBO).

    Returns (total, rec, kl).
    """
    rec = reconstruction_loss(x, x_rec, recon)
    kl = kl_loss(posterior, x[0].numel())
    return rec + kl_weight * kl, rec, kl


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017; Miyato et al. 2018, eq. (16)), halved as in ldm:

        0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (here: decoder's) adversarial loss -E[D(x_rec)], paired with the hinge loss above."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    adv_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    reduce=None,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_adv|| + 1e-4), clamped to [0, max_weight], detached.

    Esser et al. 2021, eq. (7), as the LDM autoencoder uses it (ldm `calculate_adaptive_weight`): G_L is the
    last layer of the decoder (its weight), so the adversarial term's gradient reaching the image is scaled
    to the size of the reconstruction term's. Both gradients are taken with `retain_graph=True` and without
    accumulating into `.grad` (so DDP's gradient hooks do not fire for them).

    reduce: applied to each gradient before its norm, e.g. a mean over ranks
    (`sfumato.training.distributed.all_reduce_mean`), so that λ is that of the global batch and the same
    on every rank; None for one process.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    if reduce is not None:
        g_rec, g_adv = reduce(g_rec), reduce(g_adv)
    weight = g_rec.norm() / (g_adv.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------------------
# Discriminator


@dataclass
class DiscConfig:
    in_channels: int = 3  # image channels
    ch: int = 64  # width of the first conv; doubles per layer up to 8 * ch (pix2pix's ndf)
    n_layers: int = 3  # stride-2 convs after the first (ldm: 3, a 70x70 receptive field)
    norm: str = "group"  # "group" (GroupNorm, per sample) or "none"; see NLayerDiscriminator
    groups: int = 32  # GroupNorm groups (fewer where a layer has fewer channels)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, sec. 3.2.2; the one ldm's autoencoder trains against).

    conv4x4/2 -> LeakyReLU(0.2), then `n_layers - 1` x [conv4x4/2 -> norm -> LeakyReLU], one
    conv4x4/1 -> norm -> LeakyReLU, and a conv4x4/1 to one logit per patch: (B, 3, H, W) ->
    (B, 1, H/2^n - 2, W/2^n - 2), e.g. 30x30 logits for 256x256 images with n_layers=3.

    Normalisation: pix2pix and ldm use BatchNorm. Its batch statistics make a sample's logit depend on the
    rest of its batch (so the loss would change with the number of processes), its running buffers would
    need syncing under DDP (SyncBatchNorm) and saving for resume, and in train mode the real and fake
    batches would be normalised with different statistics. GroupNorm normalises each sample on its own and
    has no buffers, so none of that arises. Convs before a norm have no bias, as in pix2pix.
    """

    def __init__(self, config: DiscConfig):
        super().__init__()
        if config.norm not in ("group", "none"):
            raise ValueError(f"DiscConfig.norm must be 'group' or 'none', got {config.norm!r}")
        if config.n_layers < 1:
            raise ValueError(f"DiscConfig.n_layers must be at least 1, got {config.n_layers}")
        self.config = config
        c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = c.ch
        for n in range(1, c.n_layers + 1):
            out = c.ch * min(2**n, 8)
            stride = 2 if n < c.n_layers else 1  # the last of these keeps the resolution (pix2pix)
            layers += [
                nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=c.norm == "none"),
                self._norm(out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def _norm(self, channels: int) -> nn.Module:
        if self.config.norm == "none":
            return nn.Identity()
        groups = math.gcd(self.config.groups, channels)
        return nn.GroupNorm(groups, channels, eps=1e-6)

    def reset_parameters(self) -> None:
        """pix2pix / taming's `weights_init`: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch logits (B, 1, h, w); H and W of at least 2^n_layers * 4 or so."""
        return self.main(x)
