"""The KL autoencoder equals diffusers' AutoencoderKL, and its state dict is the original ldm one.

As for the U-Net: random diffusers weights through our keymaps give the same posterior and decoding;
the conversion round-trips exactly; and OUR state dict, under `first_stage_model.`, goes through
diffusers' own ldm converter (`convert_ldm_vae_checkpoint`) and loads strictly into diffusers.
"""

import copy
import functools
from dataclasses import replace

import pytest
import torch

from sfumato.checkpoints.keymaps import (
    LDM_VAE_PREFIX,
    vae_config_from_diffusers,
    vae_config_from_state_dict,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from sfumato.models.vae import VAE_PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TOL = 1e-4

# The published vae/config.json of runwayml/stable-diffusion-v1-5 (stabilityai/stable-diffusion-2-1
# differs only in sample_size 768).
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

CONFIGS = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2),
    # the SD layout (4 levels, 2 ResnetBlocks, width changes between levels) at a quarter of the width
    "sd-like": dict(block_out_channels=[32, 64, 128, 128], layers_per_block=2,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
}  # fmt: skip


def randomize_norms_(model: torch.nn.Module, seed: int) -> None:
    """diffusers leaves GroupNorm at weight 1, bias 0, which would hide a swapped norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


@functools.cache
def reference(name: str) -> DiffusersAutoencoderKL:
    torch.manual_seed(0)
    model = DiffusersAutoencoderKL(**CONFIGS[name]).eval()
    randomize_norms_(model, seed=1)
    return model


@functools.cache
def ours(name: str) -> AutoencoderKL:
    ref = reference(name)
    config = vae_config_from_diffusers(dict(ref.config))
    model = AutoencoderKL(config).eval()
    model.load_state_dict(vae_from_diffusers(ref.state_dict(), config), strict=True)
    return model


def images(B: int = 2, size: int = 32, seed: int = 2) -> torch.Tensor:
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def compare(ref: DiffusersAutoencoderKL, model: AutoencoderKL, size: int = 32) -> dict[str, float]:
    x = images(size=size)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist
        got = model.encode(x)
        z = torch.randn(got.mean.shape, generator=torch.Generator().manual_seed(3))
        decoded = (model.decode(z) - ref.decode(z).sample).abs().max().item()
    return {
        "mean": (got.mean - expected.mean).abs().max().item(),
        "logvar": (got.logvar - expected.logvar).abs().max().item(),
        "decode": decoded,
    }


def test_presets():
    assert vae_config_from_diffusers(SD_VAE) == VAE_PRESETS["sd"]
    assert VAE_PRESETS["sd"].downsample_factor == 8 and VAE_PRESETS["sd"].scaling_factor == 0.18215
    for config in VAE_PRESETS.values():
        assert vae_config_from_diffusers(vae_config_to_diffusers(config)) == config
    assert vae_config_from_diffusers(CONFIGS["sd-like"]) == VAEConfig(ch=32)


def test_latent_scale_plain_and_per_channel():
    """`to_diffusion`: SD's `scaling_factor * z`; with latents_mean / latents_std, SDXL pipeline's
    `(z - mean) * scaling_factor / std` per channel; `from_diffusion` inverts either."""
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    plain = AutoencoderKL(VAE_PRESETS["tiny"])
    torch.testing.assert_close(plain.to_diffusion(z), VAE_PRESETS["tiny"].scaling_factor * z)
    torch.testing.assert_close(plain.from_diffusion(plain.to_diffusion(z)), z)
    mean, std = (1.0, -2.0, 0.5, 3.0), (0.5, 2.0, 1.0, 4.0)
    config = replace(VAE_PRESETS["tiny"], scaling_factor=0.9, latents_mean=list(mean), latents_std=list(std))
    assert config.latents_mean == mean  # JSON's lists back to tuples
    stats = AutoencoderKL(config)
    expected = torch.stack([(z[:, c] - mean[c]) * 0.9 / std[c] for c in range(4)], dim=1)
    torch.testing.assert_close(stats.to_diffusion(z), expected)
    torch.testing.assert_close(stats.from_diffusion(expected), z)
    low = stats.to_diffusion(z.bfloat16())  # in the latents' dtype
    assert low.dtype == torch.bfloat16 and (low.float() - expected).abs().max() < 0.05
    # diffusers' own fields: its AutoencoderKL takes them, and they come back
    cfg = vae_config_to_diffusers(config)
    assert list(DiffusersAutoencoderKL(**cfg).config.latents_std) == list(std)
    assert vae_config_from_diffusers(cfg) == config
    assert vae_config_to_diffusers(VAE_PRESETS["sd"])["latents_mean"] is None
    with pytest.raises(ValueError, match="set both or neither"):
        replace(VAE_PRESETS["tiny"], latents_mean=mean)
    with pytest.raises(ValueError, match="3 values for z_channels=4"):
        replace(VAE_PRESETS["tiny"], latents_mean=mean[:3], latents_std=std[:3])
    with pytest.raises(ValueError, match="latents_std must be positive"):
        replace(VAE_PRESETS["tiny"], latents_mean=mean, latents_std=(1.0, 0.0, 1.0, 1.0))


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(name):
    errors = compare(reference(name), ours(name))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_identity(name):
    ref_sd = reference(name).state_dict()
    config = ours(name).config
    back = vae_to_diffusers(vae_from_diffusers(ref_sd, config), config)
    assert back.keys() == ref_sd.keys()
    for key, tensor in ref_sd.items():
        assert torch.equal(back[key], tensor), key


def test_deprecated_diffusers_attention_names():
    """Older diffusers VAE weights (SD 1.x era) name the mid attention query/key/value/proj_attn."""
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    ref_sd = reference("tiny").state_dict()
    old = {}
    for key, tensor in ref_sd.items():
        for new, deprecated in old_names.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{deprecated}")
        old[key] = tensor
    assert "encoder.mid_block.attentions.0.query.weight" in old
    config = ours("tiny").config
    converted, expected = vae_from_diffusers(old, config), vae_from_diffusers(ref_sd, config)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_our_names_are_ldm_names(name):
    """diffusers' single-file converter reads our state dict as an ldm checkpoint's first stage."""
    model = ours(name)
    checkpoint = {LDM_VAE_PREFIX + k: v for k, v in model.state_dict().items()}
    # the mid attention is a 1x1 conv in ldm and here: the converter is what makes it Linear
    assert checkpoint[LDM_VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4
    converted = convert_ldm_vae_checkpoint(checkpoint, dict(reference(name).config))
    fresh = DiffusersAutoencoderKL(**CONFIGS[name]).eval()
    assert converted.keys() == fresh.state_dict().keys()
    fresh.load_state_dict(converted, strict=True)
    errors = compare(fresh, model)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", CONFIGS)
def test_config_from_state_dict(name):
    config = ours(name).config
    sd = {LDM_VAE_PREFIX + k: v for k, v in ours(name).state_dict().items()}
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the rest of a single-file checkpoint
    assert vae_config_from_state_dict(sd) == config


def test_meta_init_and_assign():
    config = ours("sd-like").config
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(
        vae_from_diffusers(reference("sd-like").state_dict(), config), strict=True, assign=True
    )
    x = images()
    with torch.no_grad():
        assert torch.equal(model.eval().encode(x).mean, ours("sd-like").encode(x).mean)


def test_diagonal_gaussian():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 5, generator=g)
    moments[0, 4:] = 100.0  # log-variances far outside [-30, 20] are clamped, as in ldm
    moments[1, 4:] = -100.0
    p = DiagonalGaussian(moments)
    assert p.mean.shape == p.logvar.shape == (3, 4, 4, 5)
    assert p.logvar[0].eq(20.0).all() and p.logvar[1].eq(-30.0).all()
    assert torch.equal(p.mode(), moments[:, :4])
    torch.testing.assert_close(p.std, torch.exp(0.5 * p.logvar))

    a, b = p.sample(torch.Generator().manual_seed(7)), p.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    noise = torch.randn(p.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, p.mean + p.std * noise)

    # closed-form KL against torch.distributions, to N(0, I) and between two posteriors
    q = DiagonalGaussian(torch.randn(3, 8, 4, 5, generator=g))
    normal = torch.distributions.Normal
    kl_std = torch.distributions.kl_divergence(normal(q.mean, q.std), normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.kl(), kl_std)
    r = DiagonalGaussian(torch.randn(3, 8, 4, 5, generator=g))
    kl_qr = torch.distributions.kl_divergence(normal(q.mean, q.std), normal(r.mean, r.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.kl(r), kl_qr)


def test_forward_returns_reconstruction_and_posterior():
    model = ours("tiny")
    x = images(size=16)
    with torch.no_grad():
        recon, posterior = model(x, generator=torch.Generator().manual_seed(1))
        expected = model.decode(posterior.sample(torch.Generator().manual_seed(1)))
    assert recon.shape == x.shape and posterior.mean.shape == (2, 4, 8, 8)
    torch.testing.assert_close(recon, expected)


def test_runs_in_bfloat16():
    model = ours("sd-like")
    x = images()
    with torch.no_grad():
        ref = model.decode(model.encode(x).mode())
        low = copy.deepcopy(model).to(torch.bfloat16)
        out = low.decode(low.encode(x.bfloat16()).mode())
    assert out.dtype == torch.bfloat16
    # bf16 keeps ~3 digits; through ~30 random layers diffusers' own AutoencoderKL cast to bf16 is off by
    # as much as ours (0.15 vs our 0.13, of a largest value of 2, measured on these weights)
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()


def test_errors_name_the_key_and_value():
    config = ours("tiny").config
    good = reference("tiny").state_dict()
    with pytest.raises(ValueError, match="'encoder.mid_block.attentions.0.to_z.weight'"):
        vae_from_diffusers(good | {"encoder.mid_block.attentions.0.to_z.weight": torch.zeros(1)}, config)
    partial = dict(good)
    del partial["decoder.up_blocks.0.resnets.1.conv2.bias"]
    with pytest.raises(ValueError, match=r"missing 1 key.*'decoder.up_blocks.0.resnets.1.conv2.bias'"):
        vae_from_diffusers(partial, config)
    with pytest.raises(ValueError, match=r"'quant_conv.weight' has shape \(8, 8, 3, 3\)"):
        vae_from_diffusers(good | {"quant_conv.weight": torch.zeros(8, 8, 3, 3)}, config)
    with pytest.raises(ValueError, match="'encoder.mid_block.attentions.0.query.weight' duplicates"):
        vae_from_diffusers(
            good | {"encoder.mid_block.attentions.0.query.weight": torch.zeros(64, 64)}, config
        )

    mine = ours("tiny").state_dict()
    with pytest.raises(ValueError, match="'encoder.down.5.block.0.conv1.weight'"):
        vae_to_diffusers(mine | {"encoder.down.5.block.0.conv1.weight": torch.zeros(1)}, config)
    partial = dict(mine)
    del partial["decoder.mid.attn_1.q.bias"]
    with pytest.raises(ValueError, match="'decoder.mid.attn_1.q.bias'"):
        vae_to_diffusers(partial, config)
    with pytest.raises(ValueError, match=r"'decoder.mid.attn_1.q.weight' has shape \(64, 64\)"):
        vae_to_diffusers(mine | {"decoder.mid.attn_1.q.weight": torch.zeros(64, 64)}, config)

    with pytest.raises(ValueError, match="norm_num_groups=16"):
        vae_config_from_diffusers(SD_VAE | {"norm_num_groups": 16})
    with pytest.raises(ValueError, match=r"H and W multiples of 2, got \(1, 3, 15, 16\)"):
        ours("tiny").encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, h, w\), got \(1, 3, 8, 8\)"):
        ours("tiny").decode(torch.zeros(1, 3, 8, 8))


@pytest.mark.slow
def test_full_size_sd_vae():
    """The real SD VAE architecture: every diffusers key converts, meta init + assign loads them."""
    torch.manual_seed(0)
    ref = DiffusersAutoencoderKL(**SD_VAE).eval()
    randomize_norms_(ref, seed=1)
    config = vae_config_from_diffusers(dict(ref.config))
    assert config == VAE_PRESETS["sd"]
    sd = vae_from_diffusers(ref.state_dict(), config)
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert sd.keys() == model.state_dict().keys()  # none left over, none missing
    model.load_state_dict(sd, strict=True, assign=True)
    assert vae_config_from_state_dict(model.state_dict()) == config
    errors = compare(ref, model.eval(), size=64)
    assert max(errors.values()) <= TOL, errors
