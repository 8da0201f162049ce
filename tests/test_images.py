"""Image and mask loading, size checks and tensor conversion (pipelines/images.py).

Expected pixel values are worked out by hand from the file formats (16-bit scaling, EXIF orientation,
alpha over white); the tensor conversions are compared with diffusers' VaeImageProcessor bit for bit.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.pipelines.images import (
    NonFiniteImageError,
    check_size,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    resize_to_multiple,
    tensor_to_images,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(scope="module")
def vae_processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor


def _png_roundtrip(im: Image.Image, path, **save_args) -> Image.Image:
    im.save(path, format="PNG", **save_args)
    return Image.open(path)


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


# --- load_image ---------------------------------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    # v * 255 / 65535 = v / 257, rounded: 65535 -> 255, 32896 = 128 * 257 -> 128, 257 -> 1,
    # 128 -> 0.498 -> 0, 129 -> 0.502 -> 1.
    values = np.array([[0, 65535, 32896, 257, 128, 129]], dtype=np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # what PIL makes of a 16-bit grayscale PNG
        assert raw.convert("RGB").getpixel((2, 0)) == WHITE  # PIL's own conversion clips: the bug we fix
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (6, 1)
    assert _pixels(im)[0, :, 0].tolist() == [0, 255, 128, 1, 0, 1]
    assert (_pixels(im) == _pixels(im)[..., :1]).all()  # gray: R = G = B


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_modes_in_memory(mode):
    im = Image.new(mode, (2, 1), 0)
    im.putpixel((1, 0), 32896)
    assert _pixels(load_image(im)).tolist() == [[[0, 0, 0], [128, 128, 128]]]


def test_sixteen_bit_png_with_transparent_gray_value(tmp_path):
    values = np.array([[0, 1000]], dtype=np.uint16)
    raw = _png_roundtrip(Image.fromarray(values), tmp_path / "t.png", transparency=1000)
    assert raw.info["transparency"] == 1000
    assert _pixels(load_image(raw)).tolist() == [[[0, 0, 0], list(WHITE)]]


def _exif_image(fmt: str, tmp_path) -> Image.Image:
    # Stored 4 wide x 2 high: red top-left, blue top-right, green bottom-left, the rest gray.
    stored = Image.new("RGB", (4, 2), (128, 128, 128))
    stored.putpixel((0, 0), RED)
    stored.putpixel((3, 0), BLUE)
    stored.putpixel((0, 1), GREEN)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: row 0 is the visual right side, column 0 is the visual top
    path = tmp_path / f"rotated.{fmt.lower()}"
    stored.save(path, format=fmt, exif=exif)
    return path


def test_exif_orientation_6_png(tmp_path):
    im = load_image(_exif_image("PNG", tmp_path))
    # Displayed 2 wide x 4 high. Stored row 0 becomes the right column (x = 1), stored column 0 the top
    # row (y = 0): red (col 0, row 0) -> top-right, blue (col 3, row 0) -> bottom-right,
    # green (col 0, row 1) -> top-left.
    assert im.size == (2, 4)
    assert im.getpixel((1, 0)) == RED
    assert im.getpixel((1, 3)) == BLUE
    assert im.getpixel((0, 0)) == GREEN
    assert im.getpixel((0, 3)) == (128, 128, 128)


def test_exif_orientation_6_jpeg_size(tmp_path):
    stored = Image.new("RGB", (64, 32), WHITE)
    stored.paste(RED, (0, 0, 16, 16))  # top-left block -> displayed top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    stored.save(path, format="JPEG", exif=exif, quality=95)
    im = load_image(path)
    assert im.size == (32, 64)
    r, g, b = im.getpixel((24, 8))  # inside the red block, away from JPEG's block edges
    assert r > 200 and g < 60 and b < 60
    assert min(im.getpixel((8, 8))) > 200  # top-left is white


def test_load_image_does_not_change_the_callers_image(tmp_path):
    with Image.open(_exif_image("PNG", tmp_path)) as raw:
        raw.load()
        load_image(raw)
        assert raw.size == (4, 2) and raw.getexif()[0x0112] == 6


def test_rgba_transparent_pixels_become_white(tmp_path):
    # Fully transparent *red* pixels (garbage colour under alpha 0) must not show as red.
    data = np.zeros((1, 3, 4), dtype=np.uint8)
    data[0, 0] = (255, 0, 0, 0)  # transparent red -> white
    data[0, 1] = (0, 0, 255, 255)  # opaque blue -> blue
    data[0, 2] = (0, 0, 0, 128)  # half-transparent black: 255 * (1 - 128/255) = 127
    im = load_image(_png_roundtrip(Image.fromarray(data), tmp_path / "a.png"))
    assert im.mode == "RGB"
    assert _pixels(im).tolist() == [[list(WHITE), list(BLUE), [127, 127, 127]]]


def test_la_image():
    la = Image.new("LA", (2, 1), (0, 0))  # black, transparent
    la.putpixel((1, 0), (50, 255))
    assert _pixels(load_image(la)).tolist() == [[list(WHITE), [50, 50, 50]]]


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 red, index 1 blue
    p.putpixel((1, 0), 1)
    assert _pixels(load_image(p)).tolist() == [[list(RED), list(BLUE)]]
    transparent = _png_roundtrip(p, tmp_path / "p.png", transparency=0)  # index 0 transparent
    assert transparent.mode == "P"
    assert _pixels(load_image(transparent)).tolist() == [[list(WHITE), list(BLUE)]]


def test_grayscale_one_bit_and_cmyk():
    gray = Image.new("L", (1, 1), 77)
    assert load_image(gray).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == WHITE
    cmyk = Image.new("CMYK", (3, 1), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (0, 0, 0, 255))  # full black ink
    cmyk.putpixel((2, 0), (255, 0, 0, 0))  # full cyan: no red light
    assert _pixels(load_image(cmyk)).tolist() == [[list(WHITE), [0, 0, 0], [0, 255, 255]]]


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))  # [0, 1] convention
    assert unit.mode == "F"
    assert _pixels(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]  # 127.5 rounds to even: 128
    wide = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))  # 0..255, clipped
    assert _pixels(load_image(wide))[0, :, 0].tolist() == [0, 100, 255]
    bad = Image.fromarray(np.array([[np.nan]], dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        load_image(bad)


def test_non_image_file_names_the_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError):
        load_image(42)


# --- load_mask ----------------------------------------------------------------------------------------


def test_mask_luminance_and_rgba(tmp_path):
    m = Image.new("RGB", (2, 1), (0, 0, 0))
    m.putpixel((1, 0), WHITE)
    out = load_mask(m, (2, 1))
    assert out.mode == "L" and _pixels(out).tolist() == [[0, 255]]
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 1] = (0, 0, 0, 255)  # opaque black: keep; pixel 0 transparent: composited to white
    path = tmp_path / "mask.png"
    Image.fromarray(rgba).save(path)
    assert _pixels(load_mask(path, (2, 1))).tolist() == [[255, 0]]


def test_mask_same_aspect_is_resized_nearest():
    m = Image.new("L", (2, 3), 0)
    m.putpixel((1, 0), 255)
    out = load_mask(m, (4, 6))
    assert out.size == (4, 6)
    expected = np.zeros((6, 4), dtype=np.uint8)
    expected[0:2, 2:4] = 255  # each source pixel becomes a 2x2 block, no grey edges
    assert (_pixels(out) == expected).all()
    assert load_mask(Image.new("L", (257, 384), 0), (512, 768)).size == (512, 768)  # 0.4% off: allowed


def test_mask_other_aspect_is_an_error():
    with pytest.raises(ValueError) as e:
        load_mask(Image.new("L", (512, 512), 0), (512, 768))
    msg = str(e.value)
    assert "512x512" in msg and "512x768" in msg and "crop" in msg
    with pytest.raises(ValueError, match="520x768"):
        load_mask(Image.new("L", (520, 768), 0), (512, 768))  # 1.6% off: refused


# --- check_size and resize_to_multiple ----------------------------------------------------------------


def test_check_size_accepts_multiples():
    check_size(512, 768)
    check_size(64, 64, multiple=64)


def test_check_size_messages():
    with pytest.raises(ValueError, match=r"^height must be a multiple of 8, got 513; try 512 or 520$"):
        check_size(512, 513)
    with pytest.raises(ValueError, match=r"width must be a multiple of 8, got 4; try 8$"):
        check_size(4, 512)
    with pytest.raises(ValueError, match=r"width must be a positive multiple of 8, got 0"):
        check_size(0, 512)
    with pytest.raises(ValueError, match=r"got -8"):
        check_size(512, -8)
    with pytest.raises(ValueError) as e:
        check_size(500, 513)  # both are named
    assert "try 496 or 504" in str(e.value) and "try 512 or 520" in str(e.value)
    with pytest.raises(ValueError, match="try 64 or 128"):
        check_size(100, 64, multiple=64)
    with pytest.raises(TypeError):
        check_size(512.0, 512)


def test_resize_to_multiple():
    im = Image.new("RGB", (517, 389), BLUE)
    im.putpixel((2, 2), RED)  # crop removes (517 - 512) // 2 = 2 columns and (389 - 384) // 2 = 2 rows
    out = resize_to_multiple(im)
    assert out.size == (512, 384) and out.getpixel((0, 0)) == RED
    assert resize_to_multiple(Image.new("RGB", (64, 40))).size == (64, 40)
    big = resize_to_multiple(Image.new("RGB", (4000, 3000)), max_side=768)
    assert big.size == (768, 576)  # 4000x3000 -> 768x576, both multiples already
    with pytest.raises(ValueError):
        resize_to_multiple(Image.new("RGB", (5, 100)))


# --- tensors ------------------------------------------------------------------------------------------


def test_image_to_tensor_matches_diffusers(vae_processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(2)]
    images[0].putpixel((0, 0), (0, 255, 128))
    x = image_to_tensor(images)
    assert x.shape == (2, 3, 16, 24) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == [-1.0, 1.0, pytest.approx(128 / 127.5 - 1, abs=1e-6)]
    ref = vae_processor().preprocess(images)
    assert torch.equal(x, ref)


def test_image_to_tensor_sizes_must_agree():
    with pytest.raises(ValueError, match="8x8, 16x8"):
        image_to_tensor([Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))])


def test_mask_to_tensor_binarises_at_half(vae_processor):
    m = Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8))  # 127/255 < 0.5 <= 128/255
    x = mask_to_tensor([m, m])
    assert x.shape == (2, 1, 1, 4) and x.dtype == torch.float32
    assert x[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    rng = np.random.default_rng(1)
    masks = [Image.fromarray(rng.integers(0, 256, (8, 16), dtype=np.uint8)) for _ in range(3)]
    ref = vae_processor(do_normalize=False, do_binarize=True, do_convert_grayscale=True).preprocess(masks)
    assert torch.equal(mask_to_tensor(masks), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_to_images_matches_diffusers_bit_for_bit(vae_processor, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 3, 16, 16, generator=g) * 0.7).to(dtype)
    # values that land exactly on .5 after * 255 (round half to even must agree) and out-of-range ones
    x[0, 0, 0, :4] = torch.tensor([1 / 255 - 1, 3 / 255 - 1, -1.5, 1.5], dtype=dtype)
    ours = tensor_to_images(x)
    ref = vae_processor().postprocess(x, output_type="pil")
    assert len(ours) == 3
    for a, b in zip(ours, ref):
        assert a.mode == "RGB" and a.size == (16, 16)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_tensor_to_images_known_values():
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert np.asarray(tensor_to_images(x)[0])[0, :, 0].tolist() == [0, 128, 255, 0]  # 127.5 -> 128


def test_tensor_to_images_refuses_nan_and_inf():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.float16)
    x[1, 0, 0, 0] = float("nan")
    x[3, 2, 5, 5] = float("inf")
    with pytest.raises(NonFiniteImageError, match="2 of 4") as e:
        tensor_to_images(x)
    assert isinstance(e.value, FloatingPointError) and "float32" in str(e.value)
    with pytest.raises(ValueError, match="shape"):
        tensor_to_images(torch.zeros(3, 8, 8))
