"""The U-Net equals diffusers' UNet2DConditionModel, and its state dict is the original ldm one.

Three kinds of evidence, all with random weights (no checkpoint can be downloaded here):
1. diffusers weights converted by our keymaps give the same eps as diffusers, to float32 rounding;
2. diffusers -> ours -> diffusers returns the identical tensors;
3. OUR state dict, under the `model.diffusion_model.` prefix of a single-file checkpoint, goes through
   diffusers' own ldm converter (`convert_ldm_unet_checkpoint`) and loads strictly into diffusers,
   which then computes what we compute: so our names are the ldm names that converter was written for.
"""

import copy
import dataclasses
import functools
import math

import pytest
import torch

from sfumato.checkpoints.keymaps import (
    LDM_UNET_PREFIX,
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from sfumato.models.unet import UNET_PRESETS, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

TOL = 1e-4

# The published unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = SD15_UNET | {
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

# Small random diffusers configs, each exercising one part of the correspondence.
CONFIGS = {
    # attention on the second level only, one ResBlock per level
    "tiny": dict(
        block_out_channels=[32, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
    ),
    # SD 1.x layout: 1x1-conv projections, "attention_head_dim=8" meaning 8 heads, CLIP-L context width
    "sd1-like": dict(
        block_out_channels=[32, 64, 128, 128],
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    # SD 2.x layout: Linear projections, heads growing with width (32 channels each), OpenCLIP-H width
    "sd2-like": dict(
        block_out_channels=[64, 128, 256, 256],
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=[2, 4, 8, 8],
        use_linear_projection=True,
    ),
    # inpainting input, a global embedding y (ldm label_emb), two transformer blocks per transformer
    "inpaint-adm": dict(
        in_channels=9,
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=2,
        cross_attention_dim=48,
        attention_head_dim=4,
        transformer_layers_per_block=2,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=24,
    ),
}


def randomize_norms_(model: torch.nn.Module, seed: int) -> None:
    """diffusers leaves GroupNorm/LayerNorm at weight 1, bias 0, which would hide a swapped norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


@functools.cache
def reference(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(**CONFIGS[name]).eval()
    randomize_norms_(model, seed=1)
    return model


@functools.cache
def ours(name: str) -> UNet:
    ref = reference(name)
    config = unet_config_from_diffusers(dict(ref.config))
    model = UNet(config).eval()
    model.load_state_dict(unet_from_diffusers(ref.state_dict(), config), strict=True)
    return model


def inputs(model: UNet, t, seed: int = 2, B: int = 2, size: int = 16):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, c.in_channels, size, size, generator=g)
    context = torch.randn(B, 7, c.context_dim, generator=g)
    y = torch.randn(B, c.adm_in_channels, generator=g) if c.adm_in_channels else None
    return x, t, context, y


def max_err(name: str, t) -> float:
    x, t, context, y = inputs(ours(name), t)
    with torch.no_grad():
        expected = reference(name)(x, t, context, class_labels=y).sample
        got = ours(name)(x, t, context, y)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


def test_presets_are_the_published_configs():
    assert unet_config_from_diffusers(SD15_UNET) == UNET_PRESETS["sd1"]
    assert unet_config_from_diffusers(SD21_UNET) == UNET_PRESETS["sd2"]
    for config in UNET_PRESETS.values():
        assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config


def test_config_conversion_of_the_test_models():
    assert unet_config_from_diffusers(CONFIGS["sd1-like"]) == UNetConfig(
        model_channels=32, channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=768
    )
    assert unet_config_from_diffusers(CONFIGS["sd2-like"]) == UNetConfig(
        model_channels=64, num_heads=None, head_dim=32, context_dim=1024, use_linear_proj=True
    )
    adm = unet_config_from_diffusers(CONFIGS["inpaint-adm"])
    assert (adm.in_channels, adm.adm_in_channels, adm.transformer_depth) == (9, 24, 2)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize(
    "t",
    [torch.tensor([3, 999]), torch.tensor([0.25, 517.75]), torch.tensor(421.5)],
    ids=["int", "fractional", "scalar"],
)
def test_matches_diffusers(name, t):
    assert max_err(name, t) <= TOL


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", [(15, 16), (13, 10)])
def test_any_latent_size_matches_diffusers(name, size):
    """Sides that are not multiples of 2**levels (512x520 px -> 64x65 latents): the up path meets each
    skip's size, as diffusers' forward_upsample_size does."""
    model = ours(name)
    x, t, context, y = inputs(model, torch.tensor([3, 999]))
    x = x[..., : size[0], : size[1]]
    with torch.no_grad():
        expected = reference(name)(x, t, context, class_labels=y).sample
        got = model(x, t, context, y)
    assert got.shape == expected.shape == x.shape[:1] + (model.config.out_channels,) + x.shape[2:]
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_identity(name):
    ref_sd = reference(name).state_dict()
    config = ours(name).config
    back = unet_to_diffusers(unet_from_diffusers(ref_sd, config), config)
    assert back.keys() == ref_sd.keys()
    for key, tensor in ref_sd.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("name", ["sd1-like", "sd2-like", "inpaint-adm"])
def test_our_names_are_ldm_names(name):
    """diffusers' single-file converter reads our state dict as an ldm checkpoint."""
    model = ours(name)
    checkpoint = {LDM_UNET_PREFIX + k: v for k, v in model.state_dict().items()}
    checkpoint["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # other parts of the file
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(reference(name).config))

    fresh = UNet2DConditionModel(**CONFIGS[name]).eval()
    assert converted.keys() == fresh.state_dict().keys()
    fresh.load_state_dict(converted, strict=True)
    x, t, context, y = inputs(model, torch.tensor([17.0, 803.0]), seed=3)
    with torch.no_grad():
        assert (fresh(x, t, context, class_labels=y).sample - model(x, t, context, y)).abs().max() <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_config_from_state_dict(name):
    config = ours(name).config
    sd = {LDM_UNET_PREFIX + k: v for k, v in ours(name).state_dict().items()}
    heads = dict(num_heads=config.num_heads, head_dim=config.head_dim)
    assert unet_config_from_state_dict(sd, **heads) == config
    # without heads given, ldm's convention: 8 heads for context 768 (SD 1.x), 64-channel heads for 1024
    if config.context_dim == 768:
        assert unet_config_from_state_dict(sd) == dataclasses.replace(config, num_heads=8, head_dim=None)
    elif config.context_dim == 1024:
        assert unet_config_from_state_dict(sd) == dataclasses.replace(config, num_heads=None, head_dim=64)
    else:
        with pytest.raises(
            ValueError, match=f"context_dim {config.context_dim} .* pass num_heads= or head_dim="
        ):
            unet_config_from_state_dict(sd)


def test_meta_init_and_assign():
    name = "sd2-like"
    config = ours(name).config
    with torch.device("meta"):
        model = UNet(config)
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(unet_from_diffusers(reference(name).state_dict(), config), strict=True, assign=True)
    x, t, context, y = inputs(model, torch.tensor([5.0, 250.0]))
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, context), ours(name)(x, t, context))


def test_runs_in_bfloat16():
    """A model cast whole to bf16 runs (norms and the timestep embedding compute in fp32 inside)."""
    model = ours("inpaint-adm")
    x, t, context, y = inputs(model, torch.tensor([3.5, 600.0]))
    with torch.no_grad():
        ref = model(x, t, context, y)
        low = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16(), y.bfloat16())
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_conversion_errors_name_the_key():
    config = ours("tiny").config
    good = reference("tiny").state_dict()

    with pytest.raises(ValueError, match="'down_blocks.0.resnets.0.bogus.weight'"):
        unet_from_diffusers(good | {"down_blocks.0.resnets.0.bogus.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="'add_embedding.linear_1.weight'"):
        unet_from_diffusers(good | {"add_embedding.linear_1.weight": torch.zeros(1)}, config)
    partial = dict(good)
    del partial["up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(
        ValueError, match=r"missing 1 key.*'up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    ):
        unet_from_diffusers(partial, config)
    linear = good | {"mid_block.attentions.0.proj_in.weight": torch.zeros(64, 64)}  # SD 2.x-style, wrong here
    with pytest.raises(ValueError, match=r"'mid_block.attentions.0.proj_in.weight' has shape \(64, 64\)"):
        unet_from_diffusers(linear, config)
    wrong = good | {"conv_in.weight": torch.zeros(32, 9, 3, 3)}
    with pytest.raises(ValueError, match=r"'conv_in.weight' has shape \(32, 9, 3, 3\).*\(32, 4, 3, 3\)"):
        unet_from_diffusers(wrong, config)

    mine = ours("tiny").state_dict()
    with pytest.raises(ValueError, match="'time_embed.1.weight'"):
        unet_to_diffusers(mine | {"time_embed.1.weight": torch.zeros(1)}, config)
    partial = dict(mine)
    del partial["out.2.bias"]
    with pytest.raises(ValueError, match="'out.2.bias'"):
        unet_to_diffusers(partial, config)
    with pytest.raises(ValueError, match="'out.2.bias' has shape"):
        unet_to_diffusers(mine | {"out.2.bias": torch.zeros(5)}, config)


def test_config_errors():
    with pytest.raises(ValueError, match="exactly one of num_heads and head_dim"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(attention_resolutions=(16,))
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift'"):
        unet_config_from_diffusers(SD15_UNET | {"resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ValueError, match="neither a constant count nor a constant head width"):
        unet_config_from_diffusers(SD15_UNET | {"attention_head_dim": [5, 7, 20, 20]})


def test_forward_errors():
    model = ours("tiny")
    x, t, context, _ = inputs(model, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="x has 9 channels"):
        model(torch.randn(2, 9, 16, 16), t, context)
    with pytest.raises(ValueError, match=r"context must be \(B, T, 32\)"):
        model(x, t, torch.randn(2, 7, 768))
    with pytest.raises(ValueError, match="adm_in_channels=None"):
        model(x, t, context, y=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]), context)


@pytest.mark.slow
@pytest.mark.parametrize("preset,published", [("sd1", SD15_UNET), ("sd2", SD21_UNET)])
def test_full_size_stable_diffusion(preset, published):
    """The real SD 1.5 / 2.1 architectures: every diffusers key converts, meta init + assign loads them."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**published).eval()
    randomize_norms_(ref, seed=1)
    config = unet_config_from_diffusers(dict(ref.config))
    assert config == UNET_PRESETS[preset]
    sd = unet_from_diffusers(ref.state_dict(), config)
    with torch.device("meta"):
        model = UNet(config)
    assert sd.keys() == model.state_dict().keys()  # none left over, none missing
    model.load_state_dict(sd, strict=True, assign=True)
    assert unet_config_from_state_dict(model.state_dict()) == config
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    x, t, context, _ = inputs(model, torch.tensor([999.0, 1.5]), size=8)
    with torch.no_grad():
        assert (model.eval()(x, t, context) - ref(x, t, context).sample).abs().max() <= TOL


def test_position_features_are_the_formula():
    """Rows first; pixel (row i, column j) has centre u = (j + 0.5) / W, v = (i + 0.5) / H; [sin, cos] of
    pi 2^k u for every k, then the same of v."""
    from sfumato.models.layers import position_fourier_features

    H, W, F = 3, 5, 2
    feats = position_fourier_features(H, W, F)
    assert feats.shape == (H * W, 4 * F)
    i, j = 2, 1
    u, v = (j + 0.5) / W, (i + 0.5) / H
    row = feats[i * W + j]
    expect = [
        math.sin(math.pi * u),
        math.sin(2 * math.pi * u),
        math.cos(math.pi * u),
        math.cos(2 * math.pi * u),
        math.sin(math.pi * v),
        math.sin(2 * math.pi * v),
        math.cos(math.pi * v),
        math.cos(2 * math.pi * v),
    ]
    assert torch.allclose(row, torch.tensor(expect), atol=1e-6)
    # "the top" is one place at every resolution: the coarse grid's pixel centres are fine-grid midpoints
    coarse, fine = position_fourier_features(2, 2, 1), position_fourier_features(4, 4, 1)
    assert torch.allclose(coarse[0, 2:], (fine[0, 2:] + fine[4, 2:]) / 2 / math.cos(math.pi / 8), atol=1e-6)


def test_position_embedding_option():
    """`position_freqs` starts as the model without it (zero-initialised), then makes the output depend on
    where a pixel is; config inference finds it and diffusers export refuses it by name."""
    base = dataclasses.replace(UNET_PRESETS["tiny"], num_heads=2)
    config = dataclasses.replace(base, position_freqs=4)
    torch.manual_seed(0)
    plain, placed = UNet(base).eval(), UNet(config).eval()
    missing, unexpected = placed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("pos_embed" in k for k in missing)
    for p in plain.parameters():  # proj_out and the last conv start at zero: give them a say
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.2)
    placed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.zeros(1, 4, 8, 8)  # nothing in the input tells pixels apart but the padding
    context = torch.randn(1, 5, base.context_dim)
    with torch.no_grad():
        assert torch.equal(placed(x, 500, context), plain(x, 500, context))
        for module in placed.modules():
            if hasattr(module, "pos_embed"):
                torch.nn.init.normal_(module.pos_embed.weight)
        moved = placed(x, 500, context) - plain(x, 500, context)
    # a change that differs from pixel to pixel, not an offset (the projection has no bias yet)
    assert moved.flatten(2).std(dim=2).amin() > 1e-3
    sd = {LDM_UNET_PREFIX + k: v for k, v in placed.state_dict().items()}
    assert unet_config_from_state_dict(sd, num_heads=2) == config
    with pytest.raises(ValueError, match="position_freqs=4.*diffusers"):
        unet_to_diffusers(placed.state_dict(), config)
    with pytest.raises(ValueError, match="position_freqs must be >= 0"):
        dataclasses.replace(base, position_freqs=-1)
