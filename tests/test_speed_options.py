"""The inference fast paths compute what the plain layers compute, and the opt-in speed options behave.

- `Conv2d` (im2col/matmul paths without autograd) and `upsample_conv` (nearest 2x + 3x3 conv as four 2x2
  convolutions) against `F.conv2d` / `F.interpolate`, to float32 rounding;
- `AutoencoderKL.decode_tiled`: exact where one tile covers the latents, exact blending for a decoder that
  is local, bounded error otherwise;
- `StableDiffusion(..., vae_tiling=, int8=, compile=)`: same images where tiling has nothing to do, int8 close to
  float32, the compiled U-Net equal to eager to rounding (slow: it compiles).
Timings live in benchmarks/, not here.
"""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bundle

from sfumato.models import layers
from sfumato.models.layers import Conv2d, Upsample, upsample_conv
from sfumato.models.vae import AutoencoderKL, VAEConfig
from sfumato.pipelines.stable_diffusion import StableDiffusion


@pytest.mark.parametrize(
    "cin, cout, side, kernel, stride, padding",
    [
        (64, 64, 2, 3, 1, 1),  # weight-bound: the im2col + addmm path (64 >= 8 * 2 * 2 * 2)
        (8, 16, 9, 3, 1, 1),  # feature-map-bound: oneDNN
        (16, 32, 5, 1, 1, 0),  # 1x1: batched matmul
        (64, 64, 3, 3, 2, 1),  # strided, weight-bound
        (16, 16, 8, 3, 2, 0),  # VAE downsampling (unpadded, stride 2)
    ],
)
def test_conv_fast_paths_match_conv2d(cin, cout, side, kernel, stride, padding):
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, kernel, stride=stride, padding=padding)
    x = torch.randn(2, cin, side, side)
    expected = F.conv2d(x, conv.weight, conv.bias, stride, padding)
    with torch.no_grad():
        got = conv(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got_grad = conv(x)  # with autograd: the plain convolution
    assert got_grad.requires_grad
    torch.testing.assert_close(got_grad, expected, rtol=0, atol=0)



@pytest.mark.parametrize("cin, cout, side, kernel, stride, padding", [(64, 64, 2, 3, 1, 1), (16, 32, 5, 1, 1, 0)])
def test_conv_fast_paths_leave_channels_last_to_onednn(cin, cout, side, kernel, stride, padding):
    """`model.to(memory_format=torch.channels_last)` (the usual tip for oneDNN and tensor cores): the matrix
    paths, which assume contiguous NCHW, step aside instead of failing on the weight's strides."""
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, kernel, stride=stride, padding=padding).to(memory_format=torch.channels_last)
    x = torch.randn(2, cin, side, side).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = conv(x)
    torch.testing.assert_close(got, F.conv2d(x, conv.weight, conv.bias, stride, padding), rtol=1e-5, atol=1e-5)


def test_a_channels_last_unet_and_vae_compute_what_the_contiguous_ones_do():
    from sfumato.models.unet import UNET_PRESETS, UNet

    torch.manual_seed(0)
    unet, vae = UNet(UNET_PRESETS["tiny"]).eval(), _vae()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0])
    ctx = torch.randn(2, 5, unet.config.context_dim)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = unet(x, t, ctx), vae.decode(vae.encode(image).mean)
        unet.to(memory_format=torch.channels_last), vae.to(memory_format=torch.channels_last)
        cl = lambda a: a.contiguous(memory_format=torch.channels_last)  # noqa: E731
        got = unet(cl(x), t, ctx), vae.decode(vae.encode(cl(image)).mean)
        up = Upsample(8).to(memory_format=torch.channels_last)
        assert up(cl(torch.randn(1, 8, 4, 4))).is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 64, 4, 4), (1, 32, 1, 1)])
def test_upsample_conv_is_nearest_upsampling_then_conv(shape):
    torch.manual_seed(0)
    up = Upsample(shape[1])
    x = torch.randn(shape)
    expected = up.conv._conv_forward(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(up(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(upsample_conv(x, up.conv.weight, up.conv.bias), expected, rtol=1e-5, atol=1e-5)
        odd = up(x, size=(2 * shape[2] - 1, 2 * shape[3]))  # a size other than 2x: the plain path
    assert odd.shape[-2:] == (2 * shape[2] - 1, 2 * shape[3])


def test_upsample_keeps_upsampling_then_conv_on_small_deep_maps(monkeypatch):
    """Where each phase's convolution would read the weight for few output positions, Upsample upsamples and
    convolves instead (at inference); elsewhere, and under autograd, it takes the four phases."""
    calls = []
    real = layers.upsample_conv
    monkeypatch.setattr(layers, "upsample_conv", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    torch.manual_seed(0)
    up = Upsample(64)
    for shape in [(1, 64, 2, 2), (1, 64, 8, 8)]:  # 64 >= 4 * 3 * 3: plain; 64 < 4 * 9 * 9: phases
        x = torch.randn(shape)
        expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, 1, 1)
        with torch.no_grad():
            torch.testing.assert_close(up(x), expected, rtol=1e-5, atol=1e-5)
    assert calls == [(1, 64, 8, 8)]
    up(torch.randn(2, 64, 2, 2))  # with autograd: the phases
    assert calls == [(1, 64, 8, 8), (2, 64, 2, 2)]


def test_gemm_threshold_is_a_switch():
    """Setting the ratio out of reach sends every 3x3 convolution to oneDNN, bit for bit the plain conv."""
    torch.manual_seed(0)
    conv, x = Conv2d(64, 64, 3, padding=1), torch.randn(2, 64, 2, 2)
    old = layers.GEMM_CONV_RATIO
    try:
        layers.GEMM_CONV_RATIO = float("inf")
        with torch.no_grad():
            assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 1))
    finally:
        layers.GEMM_CONV_RATIO = old


@pytest.mark.parametrize("shape, cout, bias", [((2, 16, 8, 8), 24, True), ((1, 8, 6, 10), 8, False), ((3, 5, 2, 4), 7, True)])
def test_winograd_is_the_3x3_convolution(shape, cout, bias):
    """F(2x2, 3x3) computes the padded 3x3 convolution: same sums, float32 rounding apart; several pieces of
    output channels (a small WINOGRAD_CHUNK) give the same result as one."""
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(cout, shape[1], 3, 3)
    b = torch.randn(cout) if bias else None
    expected = F.conv2d(x, w, b, padding=1)
    got = layers.winograd_conv3x3(x, w, b)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    old = layers.WINOGRAD_CHUNK
    try:
        layers.WINOGRAD_CHUNK = 1  # 16 output channels per piece
        torch.testing.assert_close(layers.winograd_conv3x3(x, w, b), got, rtol=0, atol=0)
    finally:
        layers.WINOGRAD_CHUNK = old


def test_conv2d_takes_winograd_where_it_pays_and_not_otherwise(monkeypatch):
    calls = []
    real = layers.winograd_conv3x3
    monkeypatch.setattr(layers, "winograd_conv3x3", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 16)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_TILES", 8)
    torch.manual_seed(0)
    conv = Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        for shape in [(2, 16, 8, 8), (2, 16, 7, 8), (1, 16, 4, 4)]:  # pays; odd height; 4 tiles only
            x = torch.randn(shape)
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 1), rtol=1e-5, atol=1e-5)
        assert calls == [(2, 16, 8, 8)]
        monkeypatch.setattr(layers, "FAST_WINOGRAD", False)  # the switch: oneDNN, bit for bit
        x = torch.randn(2, 16, 8, 8)
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 1))
    assert calls == [(2, 16, 8, 8)]
    strided = Conv2d(16, 16, 3, stride=2, padding=1)
    with torch.no_grad():
        strided(torch.randn(2, 16, 8, 8))
    assert calls == [(2, 16, 8, 8)]


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()


def test_decode_tiled_is_decode_when_one_tile_covers_it():
    vae, z = _vae(), torch.randn(1, 4, 12, 10)
    with torch.no_grad():
        assert torch.equal(vae.decode_tiled(z, tile=12, overlap=4), vae.decode(z))


def test_decode_tiled_blends_a_local_decoder_exactly(monkeypatch):
    """With a decoder that maps each latent to its own f x f pixels, tiles agree where they overlap, so the
    cross-fade must give the full decode back exactly: the weights sum to one everywhere."""
    vae = _vae()
    f = vae.config.downsample_factor
    monkeypatch.setattr(vae, "decode", lambda z: F.interpolate(z[:, :3], scale_factor=f, mode="nearest").tanh())
    z = torch.randn(2, 4, 37, 23)
    full = vae.decode(z)
    for tile, overlap in [(8, 2), (16, 4), (10, 0), (30, 29)]:
        torch.testing.assert_close(vae.decode_tiled(z, tile, overlap), full, rtol=1e-6, atol=1e-6)


def test_decode_tiled_real_decoder_shape_and_errors():
    vae, z = _vae(), torch.randn(1, 4, 20, 28)
    with torch.no_grad():
        tiled, full = vae.decode_tiled(z, tile=12, overlap=4), vae.decode(z)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    with pytest.raises(ValueError, match="overlap must be in"):
        vae.decode_tiled(z, tile=8, overlap=8)


def test_pipeline_vae_tiling_and_int8():
    args = dict(steps=3, seed=0, output="latent", progress=False)
    base = StableDiffusion(tiny_bundle())
    z = base.generate("a photo of a cat", **args)
    images = base.decode(z)
    # 32 px images are 16 latents: a 64-latent tile covers them, so tiling changes nothing
    tiled = StableDiffusion(tiny_bundle(), vae_tiling=True)
    assert [im.tobytes() for im in tiled.decode(z)] == [im.tobytes() for im in images]
    small_tiles = StableDiffusion(tiny_bundle(), vae_tiling=8)
    assert small_tiles.decode(z)[0].size == images[0].size
    with pytest.raises(ValueError, match="tile size of at least 8"):
        StableDiffusion(tiny_bundle(), vae_tiling=4)

    quantized = StableDiffusion(tiny_bundle(), int8=True)
    from sfumato.models.quant import Int8Linear

    for module in (quantized.unet, quantized.text_encoder):
        assert any(isinstance(m, Int8Linear) for m in module.modules())
        assert not any(type(m) is torch.nn.Linear for m in module.modules())
    zq = quantized.generate("a photo of a cat", **args)
    assert zq.shape == z.shape
    rel = ((zq - z).norm() / z.norm()).item()
    assert rel < 0.1, f"int8 latents differ from float32 by {rel:.3f} (relative L2)"


def test_upsample_conv_gradients_match():
    """The four-phase upsampling convolution also runs in training: its gradients are the plain ones."""
    torch.manual_seed(0)
    up = Upsample(8)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    g = torch.randn(2, 8, 10, 12)
    (up(x) * g).sum().backward()
    got = [x.grad.clone(), up.conv.weight.grad.clone(), up.conv.bias.grad.clone()]
    x.grad = None
    up.zero_grad()
    plain = up.conv._conv_forward(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias)
    (plain * g).sum().backward()
    for a, b in zip(got, [x.grad, up.conv.weight.grad, up.conv.bias.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler",
)
def test_pipeline_compile_matches_eager_and_keeps_names():
    """`optimize(compile=True)`: the compiled U-Net (frozen weights, C++ wrapper) gives the eager output to float32
    rounding, it is compiled in place (parameter names still the checkpoint's), sampling works through it, and
    inductor's settings hold only around the pipeline's calls."""
    import torch._inductor.config as inductor_config

    pipe = StableDiffusion(tiny_bundle())
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([999.0, 10.0]), torch.randn(2, 77, 32)
    args = dict(steps=3, seed=0, output="latent", progress=False)
    with torch.inference_mode():
        before = pipe.unet(x, t, ctx)
    eager = pipe.generate("a photo of a cat", **args)
    keys = list(pipe.unet.state_dict())

    pipe.optimize(compile=True)
    with torch.inference_mode(), pipe._compiler_settings():
        after = pipe.unet(x, t, ctx)
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 1e-5, f"the compiled U-Net differs from eager by {rel:.2e} (relative L2)"
    assert list(pipe.unet.state_dict()) == keys
    compiled = pipe.generate("a photo of a cat", **args)
    # 3 steps of a random model amplify rounding: two identical eager bundles on 1 thread differ by 5e-4
    rel = ((compiled - eager).norm() / eager.norm()).item()
    assert rel < 1e-2, f"latents sampled through the compiled U-Net differ from eager by {rel:.2e}"
    assert not inductor_config.freezing and not inductor_config.cpp_wrapper  # the settings did not leak
