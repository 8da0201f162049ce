"""StableDiffusion pipeline behaviour on the tiny random-weight bundle of conftest.py: long prompts, bad
input, DDIM inversion, interpolation, callbacks and seeds, v-prediction and the PNG parameters.

Image-for-image agreement with diffusers lives in test_pipelines_diffusers.py; here every expected value is
built independently of the code under test: CLIP encodings of hand-built token rows, images converted to
RGB by hand, analytic identities (an x-independent network inverts exactly, slerp of orthogonal vectors of
equal norm keeps the norm, a v-network rewritten as an eps-network gives the same samples).

The tiny VAE halves the image (latent factor 2), so sizes here are multiples of 2, not 8; 32 x 32 px images
have 16 x 16 latents.
"""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import random_weights_, tiny_bundle
from PIL import Image

import sfumato
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.pipelines.images import NonFiniteImageError, image_to_tensor
from sfumato.pipelines.metadata import model_hash, parse_parameters, read_parameters, save_png
from sfumato.pipelines.stable_diffusion import StableDiffusion, slerp
from sfumato.pipelines.steps import plan_steps

# Every word below is one token of the tiny BPE vocabulary (checked in `test_prompt_lengths`).
CAT = "a photo of a cat"  # 5 tokens
DOG = "a painting of a dog"  # 5 tokens
HORSE = "a dog riding a horse"  # 5 tokens
HEAD = " ".join([CAT] * 15)  # 75 tokens: exactly one chunk
LONG_A = HEAD + " " + " ".join([DOG] * 5)  # 100 tokens: 75 + 25
LONG_B = HEAD + " " + " ".join([HORSE] * 5)  # 100 tokens, same first 75
VERY_LONG = " ".join([CAT, DOG] * 20)  # 200 tokens: 75 + 75 + 50
FAST = {"steps": 4, "sampler": "euler", "karras": False}  # a quick deterministic setting


@pytest.fixture(scope="module")
def pipe(tiny_bundle_path):
    return sfumato.load(tiny_bundle_path)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth 32 x 32 RGB picture with some texture."""
    yy, xx = np.mgrid[0:32, 0:32]
    rgb = np.stack([xx * 8, yy * 8, 128 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0)], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int64)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(pixels(a) - pixels(b)).max())


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean |Δ| in 1/255 units."""
    assert a.size == b.size
    return float(np.abs(pixels(a) - pixels(b)).mean())


class Recorder(torch.nn.Module):
    """The U-Net, remembering the context of every call."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.config, self.contexts = unet, unet.config, []

    def forward(self, x, t, context):
        self.contexts.append(context)
        return self.unet(x, t, context)


def encode_row(pipe, ids: list[int]) -> torch.Tensor:
    """CLIP's last hidden state (77, D) of one hand-built row of 77 token ids."""
    assert len(ids) == 77
    return pipe.text_encoder(torch.tensor([ids])).last_hidden_state[0]


def chunk_row(pipe, body: list[int]) -> list[int]:
    """start + up to 75 tokens + end + padding: what CLIP reads."""
    tok = pipe.tokenizer
    return [tok.bos_token_id, *body, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(body))


def body(pipe, text: str) -> list[int]:
    return pipe.tokenizer.encode(text)[1:-1]


# ---------------------------------------------------------------------------------------------------------
# 1. Long prompts


def test_prompt_lengths(pipe):
    assert [len(body(pipe, p)) for p in (CAT, DOG, HORSE, HEAD, LONG_A, LONG_B, VERY_LONG)] == [
        5, 5, 5, 75, 100, 100, 200
    ]  # fmt: skip


def test_short_prompt_is_plain_clip(pipe):
    for prompt in ("", CAT, HEAD):  # 0, 5 and 75 tokens: one chunk, exactly diffusers' encoding
        expected = pipe.text_encoder(pipe.tokenizer([prompt])).last_hidden_state
        got = pipe.encode_prompts([prompt])
        assert got.shape == (1, 77, 32)
        assert torch.equal(got, expected)


def test_long_prompt_is_chunked(pipe):
    ids = body(pipe, LONG_A)
    first, second = encode_row(pipe, chunk_row(pipe, ids[:75])), encode_row(pipe, chunk_row(pipe, ids[75:]))
    got = pipe.encode_prompts([LONG_A])
    assert got.shape == (1, 154, 32)
    torch.testing.assert_close(got[0, :77], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0, 77:], second, rtol=0, atol=1e-6)
    # 200 tokens: 75 + 75 + 50
    ids = body(pipe, VERY_LONG)
    rows = [chunk_row(pipe, ids[i : i + 75]) for i in (0, 75, 150)]
    expected = torch.cat([encode_row(pipe, r) for r in rows])
    torch.testing.assert_close(pipe.encode_prompts([VERY_LONG])[0], expected, rtol=0, atol=1e-6)


def test_negative_prompt_padded_with_empty_chunks(pipe, monkeypatch):
    rec = Recorder(pipe.unet)
    monkeypatch.setattr(pipe, "unet", rec)
    empty = encode_row(pipe, chunk_row(pipe, []))
    pipe.generate(LONG_A, "a dog", steps=1, sampler="euler", karras=False, seed=0)
    ctx = rec.contexts[0]
    assert ctx.shape == (2, 154, 32)  # [uncond; cond], same length
    uncond, cond = ctx
    torch.testing.assert_close(
        uncond[:77], encode_row(pipe, chunk_row(pipe, body(pipe, "a dog"))), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(uncond[77:], empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond, pipe.encode_prompts([LONG_A])[0], rtol=0, atol=1e-6)

    # a negative prompt longer than the prompt pads the prompt instead
    rec.contexts.clear()
    pipe.generate(CAT, LONG_B, steps=1, sampler="euler", karras=False, seed=0)
    uncond, cond = rec.contexts[0]
    assert cond.shape == uncond.shape == (154, 32)
    torch.testing.assert_close(cond[:77], pipe.encode_prompts([CAT])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[77:], empty, rtol=0, atol=1e-6)

    # 200 tokens with a short negative: three chunks each
    rec.contexts.clear()
    images = pipe.generate(VERY_LONG, "a dog", steps=2, sampler="euler", karras=False, seed=0)
    assert rec.contexts[0].shape == (2, 231, 32)
    torch.testing.assert_close(rec.contexts[0][0, 77:], torch.cat([empty, empty]), rtol=0, atol=1e-6)
    assert images[0].size == (32, 32)

    # no guidance: no unconditional pass, the prompt alone
    rec.contexts.clear()
    pipe.generate(LONG_A, "a dog", steps=1, guidance=1.0, sampler="euler", karras=False, seed=0)
    assert rec.contexts[0].shape == (1, 154, 32)


def test_prompt_tail_changes_the_image(pipe):
    """The random tiny model listens to its prompt only faintly (two different 5-token prompts move the
    latent by ~0.05%), so the tail's effect is measured against that: it must be of the same order."""
    settings = {**FAST, "seed": 3, "guidance": 7.5, "output": "latent"}
    z = {p: pipe.generate(p, **settings) for p in (HEAD, LONG_A, LONG_B, CAT, DOG)}
    rel = lambda p, q: float((z[p] - z[q]).norm() / z[p].norm())  # noqa: E731
    prompt_effect = rel(CAT, DOG)
    assert prompt_effect > 1e-4  # far above float noise (the same call twice is bit-identical)
    assert torch.equal(pipe.generate(LONG_A, **settings), z[LONG_A])
    assert rel(LONG_A, HEAD) > prompt_effect  # the 25 tokens past 75 are read (not cut)...
    assert rel(LONG_A, LONG_B) > 0.5 * prompt_effect  # ...and which tokens they are matters


# ---------------------------------------------------------------------------------------------------------
# 2. Bad input


def test_size_must_be_a_multiple_of_the_latent_factor(pipe, photo):
    with pytest.raises(ValueError, match=r"width must be a multiple of 2, got 33; try 32 or 34"):
        pipe.generate(CAT, width=33, **FAST)
    with pytest.raises(ValueError, match=r"height must be a multiple of 2, got 31; try 30 or 32"):
        pipe.generate(CAT, height=31, **FAST)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 2, got 0"):
        pipe.generate(CAT, height=0, **FAST)
    with pytest.raises(ValueError, match=r"try 32 or 34"):
        pipe.image_to_image(photo.resize((33, 32)), CAT, **FAST)
    with pytest.raises(ValueError, match=r"try 32 or 34"):
        pipe.inpaint(photo.resize((33, 32)), Image.new("L", (33, 32), 255), CAT, **FAST)
    with pytest.raises(ValueError, match=r"try 16 or 18"):
        pipe.image_to_image(photo, CAT, width=17, height=16, **FAST)
    assert pipe.generate(CAT, width=34, height=30, **FAST)[0].size == (34, 30)


def test_image_to_image_size(pipe, photo):
    assert pipe.image_to_image(photo, CAT, width=16, height=24, **FAST)[0].size == (16, 24)
    for kw in ({"width": 16}, {"height": 16}):  # one side alone would be ignored or crash
        with pytest.raises(ValueError, match="both width and height"):
            pipe.image_to_image(photo, CAT, **kw, **FAST)


def test_strength_errors(pipe, photo):
    mask = Image.new("L", (32, 32), 255)
    for call in (
        lambda **k: pipe.image_to_image(photo, CAT, **k),
        lambda **k: pipe.inpaint(photo, mask, CAT, **k),
    ):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\].*got 0"):
            call(strength=0, steps=20)
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\].*got 1.5"):
            call(strength=1.5, steps=20)
        with pytest.raises(
            ValueError, match=r"strength 0.04 with 20 steps leaves no denoising step.*0.05.*25"
        ):
            call(strength=0.04, steps=20)
        call(strength=0.05, steps=20, sampler="euler", karras=False)  # exactly one step runs


def test_mask_size(pipe, photo):
    half = Image.new("L", (16, 16), 0)
    half.paste(255, (0, 0, 8, 16))  # repaint the left half
    full = half.resize((32, 32), Image.Resampling.NEAREST)
    settings = {**FAST, "seed": 1}
    # a mask of the image's aspect ratio is scaled (nearest) onto it: same as the full-size mask
    assert (
        max_diff(pipe.inpaint(photo, half, CAT, **settings)[0], pipe.inpaint(photo, full, CAT, **settings)[0])
        == 0
    )
    # within 1% of the aspect ratio is accepted too (32x32 image, 100x101 mask: 0.9901)
    pipe.inpaint(photo, Image.new("L", (100, 101), 255), CAT, **FAST)
    for size in ((32, 16), (100, 98)):  # 2.0 and 1.0204
        with pytest.raises(ValueError, match=rf"mask is {size[0]}x{size[1]} but the image is 32x32"):
            pipe.inpaint(photo, Image.new("L", size, 255), CAT, **FAST)


def _formats(photo: Image.Image, tmp_path) -> dict[str, tuple[object, Image.Image]]:
    """Input images in awkward formats, each with the RGB image it should be read as (worked out by hand)."""
    rgb = pixels(photo).astype(np.uint8)
    out = {}
    # RGBA: fully transparent pixels hold red paint, which must come out white (alpha over white)
    alpha = (
        np.where(np.arange(32)[None, :] < 10, 0, 255).repeat(32, 0).astype(np.uint8)
    )  # left 10 columns clear
    hidden = rgb.copy()
    hidden[alpha == 0] = (255, 0, 0)
    expected = np.where(alpha[..., None] == 0, 255, rgb).astype(np.uint8)
    out["rgba"] = (Image.fromarray(np.dstack([hidden, alpha]), "RGBA"), Image.fromarray(expected))
    # palette: its own colours
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    idx, table = np.asarray(pal), np.asarray(pal.getpalette(), dtype=np.uint8).reshape(-1, 3)
    out["palette"] = (pal, Image.fromarray(table[idx]))
    # 16-bit gray: 0..65535 is 0..255 (v * 257 / 257), not clipped at 255
    gray = rgb[..., 1]
    out["16-bit"] = (Image.fromarray(gray.astype(np.uint16) * 257), Image.fromarray(np.dstack([gray] * 3)))
    # EXIF orientation 6 ("rotate 90° clockwise to display") on a 32 wide x 48 high file: 48 x 32 upright
    tall = np.concatenate([rgb, rgb[:16, ::-1]], 0)  # (48, 32, 3), asymmetric
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    Image.fromarray(tall).save(path, exif=exif)
    out["exif"] = (path, Image.fromarray(np.ascontiguousarray(np.rot90(tall, k=-1))))  # clockwise
    return out


@pytest.mark.parametrize("kind", ["rgba", "palette", "16-bit", "exif"])
def test_awkward_image_formats(pipe, photo, tmp_path, kind):
    given, expected = _formats(photo, tmp_path)[kind]
    assert expected.mode == "RGB"
    settings = {**FAST, "seed": 5}
    got = pipe.image_to_image(given, CAT, strength=0.6, **settings)[0]
    assert got.size == expected.size  # (48, 32) for the rotated one
    assert max_diff(got, pipe.image_to_image(expected, CAT, strength=0.6, **settings)[0]) == 0
    mask = Image.new("L", expected.size, 0)
    mask.paste(255, (0, 0, expected.size[0] // 2, expected.size[1]))
    got = pipe.inpaint(given, mask, CAT, **settings)[0]
    assert got.size == expected.size
    assert max_diff(got, pipe.inpaint(expected, mask, CAT, **settings)[0]) == 0


def test_guidance_below_one(pipe, photo):
    calls = [
        lambda: pipe.generate(CAT, guidance=0.5, **FAST),
        lambda: pipe.image_to_image(photo, CAT, guidance=0.5, **FAST),
        lambda: pipe.inpaint(photo, photo, CAT, guidance=0.5, **FAST),
        lambda: pipe.invert(photo, CAT, guidance=0.5, steps=4),
        lambda: pipe.interpolate([CAT], [1, 2], guidance=0.5, steps=4),
        lambda: pipe.generate(CAT, guidance=float("nan"), **FAST),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"guidance must be >= 1"):
            call()


def test_default_guidance_is_the_models(tiny_bundle_path, photo):
    """A model that names its guidance scale (schedule.json) is run at it when the call names none; others
    at SD's 7.5; an explicit guidance wins. Checked through the CFG scale each image records."""
    from dataclasses import replace

    def scale(im) -> str:
        return next(p for p in im.info["parameters"].split(", ") if p.startswith("CFG scale"))

    sd = sfumato.load(tiny_bundle_path)
    assert sd.default_guidance == 7.5 and scale(sd.generate(CAT, **FAST)[0]) == "CFG scale: 7.5"
    own = sfumato.load(tiny_bundle_path)
    own.schedule = replace(own.schedule, guidance=3.0)
    assert own.default_guidance == 3.0
    assert scale(own.generate(CAT, **FAST)[0]) == "CFG scale: 3.0"
    assert scale(own.image_to_image(photo, CAT, **FAST)[0]) == "CFG scale: 3.0"
    assert scale(own.inpaint(photo, photo, CAT, **FAST)[0]) == "CFG scale: 3.0"
    assert scale(own.generate(CAT, guidance=6.0, **FAST)[0]) == "CFG scale: 6.0"
    # and it is the guidance really used: the same image as asking for 3 by name
    assert max_diff(own.generate(CAT, seed=1, **FAST)[0], sd.generate(CAT, seed=1, guidance=3.0, **FAST)[0]) == 0
    with pytest.raises(ValueError, match="guidance must be None or >= 1"):
        replace(own.schedule, guidance=0.5)


def test_unknown_sampler(pipe, photo):
    listed = r"choose one of ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m"
    for call in (
        lambda: pipe.generate(CAT, sampler="plms", steps=4),
        lambda: pipe.image_to_image(photo, CAT, sampler="plms", steps=4),
        lambda: pipe.inpaint(photo, photo, CAT, sampler="plms", steps=4),
        lambda: pipe.interpolate([CAT], [1, 2], sampler="plms", steps=4),
    ):
        with pytest.raises(ValueError, match=rf"unknown sampler 'plms'; {listed}"):
            call()


def test_karras_default_follows_the_sampler(pipe, photo):
    """ddim and ddpm have no Karras ladder: leaving `karras` out must work (as `invert`'s docstring shows);
    asking for it is an error."""
    for sampler in ("ddim", "ddpm"):
        im = pipe.generate(CAT, sampler=sampler, steps=3, seed=0)[0]
        assert parse_parameters(im.info["parameters"])["karras"] is False
        pipe.image_to_image(photo, CAT, sampler=sampler, steps=4)
        with pytest.raises(ValueError, match=f"karras=True is not defined for {sampler}"):
            pipe.generate(CAT, sampler=sampler, steps=3, karras=True)
    for sampler in ("euler", "dpmpp_2m"):  # these keep Karras σ by default
        default = pipe.generate(CAT, sampler=sampler, steps=3, seed=0)[0]
        assert max_diff(default, pipe.generate(CAT, sampler=sampler, steps=3, seed=0, karras=True)[0]) == 0


def test_eta(pipe):
    for sampler in ("euler", "heun", "dpmpp_2m", "ddpm"):
        with pytest.raises(ValueError, match=rf"eta applies to ddim and euler_ancestral, not to {sampler}"):
            pipe.generate(CAT, sampler=sampler, karras=False, eta=0.5, steps=3)
    with pytest.raises(ValueError, match=r"eta must be >= 0"):
        pipe.generate(CAT, sampler="ddim", eta=-0.5, steps=3)
    ddim = {"sampler": "ddim", "steps": 4, "seed": 2}
    assert max_diff(pipe.generate(CAT, eta=0.0, **ddim)[0], pipe.generate(CAT, **ddim)[0]) == 0
    assert mean_diff(pipe.generate(CAT, eta=1.0, **ddim)[0], pipe.generate(CAT, **ddim)[0]) > 1.0
    # Euler-ancestral without its noise is Euler on the same ladder
    ea = pipe.generate(CAT, sampler="euler_ancestral", karras=False, eta=0.0, steps=4, seed=2)[0]
    assert max_diff(ea, pipe.generate(CAT, sampler="euler", karras=False, steps=4, seed=2)[0]) == 0


def test_other_bad_arguments(pipe, photo):
    with pytest.raises(ValueError, match="output must be"):
        pipe.generate(CAT, output="np", **FAST)
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe.image_to_image(photo, [], **FAST)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        pipe.generate(CAT, steps=0)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe.generate(CAT, latents=torch.zeros(1, 4, 8, 8), **FAST)


@pytest.fixture(scope="module")
def plain_bundle():
    return tiny_bundle()


def test_nan_decoder_raises_and_saves_nothing(plain_bundle, tmp_path):
    broken = copy.deepcopy(plain_bundle)
    with torch.no_grad():
        broken.vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    pipe = StableDiffusion(broken)
    target = tmp_path / "out.png"
    with pytest.raises(NonFiniteImageError, match="NaN or inf"):
        save_png(pipe.generate(CAT, **FAST)[0], target)
    assert not target.exists()
    # NaN from the U-Net reaches the decoder too
    broken = copy.deepcopy(plain_bundle)
    with torch.no_grad():
        next(p for n, p in broken.unet.named_parameters() if n.endswith("out.2.weight")).fill_(float("nan"))
    with pytest.raises(NonFiniteImageError):
        StableDiffusion(broken).generate(CAT, **FAST)


# ---------------------------------------------------------------------------------------------------------
# 3. DDIM inversion


class NoiseOfTime(torch.nn.Module):
    """A "U-Net" whose noise estimate depends on t and the prompt but not on x: DDIM's ODE then has
    x-independent velocity, and inversion followed by sampling must return the latent exactly."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.pattern = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t, context):
        return torch.sin(t / 97.0)[:, None, None, None] * self.pattern + context.mean() + 0 * x


def _round_trip(pipe, image, steps):
    noise = pipe.invert(image, CAT, steps=steps)
    latent = pipe.generate(CAT, latents=noise, sampler="ddim", steps=steps, guidance=1.0, output="latent")
    return noise, latent


def test_inversion_is_exact_for_an_x_independent_network(plain_bundle, photo):
    pipe = StableDiffusion(copy.deepcopy(plain_bundle))
    pipe.unet = NoiseOfTime(pipe.unet.config)
    z = pipe._encode(image_to_tensor([photo]), None)  # posterior mean, what invert starts from
    for steps in (7, 20):
        noise, latent = _round_trip(pipe, photo, steps)
        assert noise.shape == (1, 4, 16, 16)
        assert (noise - z).norm() > 3 * z.norm()  # the walk really went somewhere
        torch.testing.assert_close(latent, z, rtol=0, atol=5e-5 * float(noise.abs().max()))


def _inversion_errors(pipe, image, steps_list) -> tuple[float, list[float]]:
    floor = pipe.decode(pipe._encode(image_to_tensor([image]), None))[0]  # VAE round trip alone
    errors = []
    for steps in steps_list:
        out = pipe.generate(CAT, latents=pipe.invert(image, CAT, steps=steps), sampler="ddim", steps=steps,
                            guidance=1.0)[0]  # fmt: skip
        errors.append(mean_diff(out, floor))
    return mean_diff(floor, image), errors


def test_inversion_round_trip_smooth_model(plain_bundle, photo):
    """With U-Net weights at 0.1 of their usual size (a network that varies slowly with x, as trained
    ones do on their data) DDIM inversion returns the VAE round trip to well under a pixel level."""
    bundle = copy.deepcopy(plain_bundle)
    random_weights_(bundle.unet, 0, scale=0.1)
    floor, errors = _inversion_errors(StableDiffusion(bundle), photo, (10, 25, 50))
    print(f"\nsmooth U-Net: VAE round trip vs input {floor:.2f}/255; inversion vs VAE round trip "
          f"(10, 25, 50 steps): {', '.join(f'{e:.2f}' for e in errors)} /255")  # fmt: skip
    assert errors[0] > errors[1] > errors[2]  # converges with the step count
    assert errors[2] < 1.0


def test_inversion_round_trip_conftest_model(pipe, photo):
    """The conftest U-Net (weights at 0.5) is rough in x: DDIM inversion's first-order error
    ε(x_t, t') ≈ ε(x_t', t') is large at 50 steps, but still shrinks with the step count."""
    floor, errors = _inversion_errors(pipe, photo, (10, 50))
    print(f"\nconftest U-Net: VAE round trip vs input {floor:.2f}/255; inversion vs VAE round trip "
          f"(10, 50 steps): {', '.join(f'{e:.2f}' for e in errors)} /255")  # fmt: skip
    assert errors[0] > errors[1]


# ---------------------------------------------------------------------------------------------------------
# 4. Interpolation


@pytest.mark.parametrize(("sampler", "batch"), [("ddim", 4), ("dpmpp_2m", 1), ("euler_ancestral", 3)])
def test_interpolation_keyframes_are_generate(pipe, sampler, batch):
    prompts, seeds = [CAT, HORSE, "an astronaut on the moon"], [11, 12, 13]
    settings = {"sampler": sampler, "steps": 5, "guidance": 5.0}
    frames = pipe.interpolate(prompts, seeds, frames=3, batch=batch, negative_prompt="a dog", **settings)
    assert len(frames) == (3 - 1) * 3 + 1
    # keyframes 0, 3, 6 are the images generate() makes; frames are batched (float results may differ by
    # an ulp with the batch size on some hardware, hence 1/255)
    for i, prompt, seed in zip((0, 3, 6), prompts, seeds):
        alone = pipe.generate(prompt, "a dog", seed=seed, karras=False, **settings)[0]
        assert max_diff(frames[i], alone) <= 1, f"keyframe {i}"
    assert mean_diff(frames[1], frames[0]) > 0.5 and mean_diff(frames[1], frames[3]) > 0.5


def test_interpolation_counts_and_arguments(pipe):
    assert len(pipe.interpolate([CAT], [1, 2], frames=4, steps=2)) == 5  # noise walk only
    assert len(pipe.interpolate([CAT, DOG], [7], frames=1, steps=2)) == 2  # text walk only
    with pytest.raises(ValueError, match="two keyframes"):
        pipe.interpolate([CAT], [1], steps=2)
    with pytest.raises(ValueError, match="2 prompts and 3 seeds"):
        pipe.interpolate([CAT, DOG], [1, 2, 3], steps=2)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        pipe.interpolate([CAT, DOG], [1], frames=0, steps=2)


def test_slerp():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    b = b - (b * a).sum() / (a * a).sum() * a  # orthogonal to a...
    b = b * a.norm() / b.norm()  # ...and of the same norm
    for t in (0.1, 0.25, 0.5, 0.9):
        assert float(slerp(a, b, t).norm()) == pytest.approx(float(a.norm()), rel=1e-6)
    # at t = 1/2 the great-circle midpoint of orthogonal unit directions is (a + b) / √2
    torch.testing.assert_close(slerp(a, b, 0.5), (a + b) / math.sqrt(2), rtol=0, atol=1e-5)
    assert float(torch.lerp(a, b, 0.5).norm()) == pytest.approx(float(a.norm()) / math.sqrt(2), rel=1e-5)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    # plain Gaussian samples (nearly orthogonal in 1024 dimensions) keep their typical norm
    c = torch.randn(4, 16, 16, generator=g)
    for t in (0.3, 0.5):
        assert float(slerp(a, c, t).norm()) == pytest.approx(32.0, rel=0.1)
    # nearly parallel inputs fall back to lerp
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)


# ---------------------------------------------------------------------------------------------------------
# 5. Callbacks, outputs and seeds


def test_callback_once_per_step(pipe, photo):
    for sampler in ("euler", "heun", "ddim"):
        calls = []
        latent = pipe.generate(CAT, sampler=sampler, karras=False, steps=6, seed=0, callback=calls.append,
                               output="latent")  # fmt: skip
        sigmas = plan_steps(pipe.schedule, sampler, 6).sigmas
        assert [c["i"] for c in calls] == list(range(6))
        assert all(c["steps"] == 6 for c in calls)
        assert [c["sigma"] for c in calls] == pytest.approx(sigmas[:-1].tolist())
        assert [c["sigma_next"] for c in calls] == pytest.approx(sigmas[1:].tolist())
        assert all(c["x"].shape == c["denoised"].shape == (1, 4, 16, 16) for c in calls)
        # the returned latent is the last x, as a variance-preserving sample at the last level
        torch.testing.assert_close(latent, calls[-1]["x"] / math.sqrt(1 + float(sigmas[-1]) ** 2))

    calls = []
    pipe.image_to_image(
        photo, CAT, strength=0.5, steps=20, sampler="euler", karras=False, callback=calls.append
    )
    assert len(calls) == 10 and [c["i"] for c in calls] == list(range(10)) and calls[0]["steps"] == 10
    sigmas = plan_steps(pipe.schedule, "euler", 20).sigmas
    assert [c["sigma"] for c in calls] == pytest.approx(sigmas[10:20].tolist())

    calls = []
    pipe.inpaint(photo, Image.new("L", (32, 32), 255), CAT, strength=0.5, steps=20, callback=calls.append)
    assert len(calls) == 10

    calls = []
    pipe.invert(photo, CAT, steps=7, callback=calls.append)
    assert len(calls) == 7 and calls[-1]["steps"] == 7


def test_latent_output(pipe):
    settings = {**FAST, "seed": 4, "batch": 2}
    latents = pipe.generate([CAT, DOG], output="latent", **settings)
    assert isinstance(latents, torch.Tensor) and latents.shape == (4, 4, 16, 16)
    images = pipe.generate([CAT, DOG], **settings)
    assert len(images) == 4
    assert all(max_diff(a, b) == 0 for a, b in zip(pipe.decode(latents), images))
    assert pipe.image_to_image(images[0], CAT, output="latent", **FAST).shape == (1, 4, 16, 16)


def test_seeds(pipe):
    first = pipe.generate(CAT, **FAST)[0]
    seed = parse_parameters(first.info["parameters"])["seed"]
    assert isinstance(seed, int)
    assert max_diff(pipe.generate(CAT, seed=seed, **FAST)[0], first) == 0
    other = pipe.generate(CAT, **FAST)[0]
    assert parse_parameters(other.info["parameters"])["seed"] != seed
    # image k of a batch is seed + k, and regenerates alone
    batch = pipe.generate(CAT, seed=100, batch=3, **FAST)
    assert [parse_parameters(im.info["parameters"])["seed"] for im in batch] == [100, 101, 102]
    assert max_diff(batch[2], pipe.generate(CAT, seed=102, **FAST)[0]) <= 1
    assert mean_diff(batch[0], batch[1]) > 1.0


# ---------------------------------------------------------------------------------------------------------
# 6. v-prediction


class EpsFromV(torch.nn.Module):
    """A v-prediction network seen as an eps-prediction one: ε = sqrt(1-ᾱ_t) x_t + sqrt(ᾱ_t) v (Salimans &
    Ho 2022, §4), with ᾱ from SD's scaled-linear betas computed here; t must be a training timestep."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def forward(self, x, t, context):
        assert torch.allclose(t, t.round(), atol=1e-3), t
        ac = self.alphas_cumprod[t.round().long()][:, None, None, None]
        a, s = ac.sqrt().float(), (1 - ac).sqrt().float()
        return s * x + a * self.unet(x, t, context)


def test_v_prediction():
    v_pipe = StableDiffusion(tiny_bundle(prediction="v"))
    eps_pipe = StableDiffusion(tiny_bundle())  # the same weights, read as eps
    settings = {"sampler": "ddim", "steps": 8, "seed": 6, "guidance": 6.0}
    v_img = v_pipe.generate(CAT, "a dog", **settings)[0]
    assert np.isfinite(pixels(v_img)).all()
    assert mean_diff(v_img, eps_pipe.generate(CAT, "a dog", **settings)[0]) > 5.0
    # the eps pipeline running the v network rewritten as an eps network makes the same image
    eps_pipe.unet = EpsFromV(v_pipe.unet)
    v_latent = v_pipe.generate(CAT, "a dog", output="latent", **settings)
    e_latent = eps_pipe.generate(CAT, "a dog", output="latent", **settings)
    # the random tiny U-Net amplifies float rounding (thread count, kernel choice) along the 8 guided steps,
    # so the whole trajectory is compared loosely and one denoiser evaluation tightly
    torch.testing.assert_close(e_latent, v_latent, rtol=0, atol=2e-2 * float(v_latent.abs().max()))
    plan = plan_steps(v_pipe.schedule, "ddim", 8)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    context = v_pipe.encode_prompts([CAT, "a dog"])
    with torch.no_grad():
        for sigma in plan.sigmas[:-1]:
            d_v = DiscreteDenoiser(v_pipe.unet, plan.schedule, "v")(x, sigma, context=context)
            d_e = DiscreteDenoiser(eps_pipe.unet, plan.schedule, "eps")(x, sigma, context=context)
            torch.testing.assert_close(d_e, d_v, rtol=1e-4, atol=1e-4 * float(d_v.abs().max()))


# ---------------------------------------------------------------------------------------------------------
# 7. PNG parameters


def test_png_parameters(pipe, photo, tiny_bundle_path, tmp_path):
    common = {"model": "bundle", "model_hash": model_hash(tiny_bundle_path), "extra": {}}
    prompt, negative = "a photo of a cat, oil: on canvas", "a dog\nblurry"
    im = pipe.generate(prompt, negative, steps=5, sampler="euler", karras=True, guidance=6.5, seed=42,
                       clip_skip=1, width=24, height=16)[0]  # fmt: skip
    assert im.size == (24, 16)
    expected = {"prompt": prompt, "negative_prompt": negative, "steps": 5, "sampler": "euler", "karras": True,
                "guidance": 6.5, "seed": 42, "width": 24, "height": 16, "clip_skip": 1, **common}  # fmt: skip
    assert parse_parameters(im.info["parameters"]) == expected
    path = save_png(im, tmp_path / "im.png", im.info["parameters"])
    assert read_parameters(path) == expected

    im = pipe.image_to_image(
        photo, CAT, strength=0.5, steps=10, sampler="ddim", eta=0.3, guidance=4.0, seed=9
    )[0]
    assert parse_parameters(im.info["parameters"]) == {
        "prompt": CAT, "negative_prompt": "", "steps": 10, "sampler": "ddim", "karras": False,
        "guidance": 4.0, "seed": 9, "width": 32, "height": 32, "clip_skip": 0, "strength": 0.5, "eta": 0.3,
        **common,
    }  # fmt: skip

    im = pipe.inpaint(photo, Image.new("L", (32, 32), 255), CAT, "a dog", strength=0.75, steps=4, seed=3)[0]
    assert parse_parameters(im.info["parameters"]) == {
        "prompt": CAT, "negative_prompt": "a dog", "steps": 4, "sampler": "dpmpp_2m", "karras": True,
        "guidance": 7.5, "seed": 3, "width": 32, "height": 32, "clip_skip": 0, "strength": 0.75, **common,
    }  # fmt: skip
