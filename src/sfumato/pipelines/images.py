"""Images in and out of the pipelines: loading user images and masks, size checks, tensor conversion.

Pixel tensors follow diffusers' `VaeImageProcessor` convention so that images and latents can be
compared with it bit for bit:

    uint8 pixels p -> (p / 255) * 2 - 1          in [-1, 1], (B, 3, H, W) float32     (image_to_tensor)
    decoded x      -> round(clamp(x / 2 + 0.5, 0, 1) * 255) as uint8                   (tensor_to_images)

Masks are (B, 1, H, W) in {0, 1}: 1 = repaint, 0 = keep, as the inpainting pipelines expect.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's names for 16-bit grayscale; "I" (32-bit int) is how older Pillows load a 16-bit PNG.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes that carry an alpha channel; "La", "RGBa" are premultiplied, convert("RGBA") undoes that.
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class NonFiniteImageError(FloatingPointError):
    """The decoded image tensor holds NaN or inf: the model overflowed, there is no image to save."""


def _open(image: str | os.PathLike | Image.Image) -> Image.Image:
    """A fully decoded PIL image from a path or a PIL image (which is returned as is)."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected a path or a PIL image, got {type(image).__name__}")
    path = Path(image)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, while the file is open; the pixels outlive the `with`
    except UnidentifiedImageError as e:
        raise ValueError(f"{path} is not an image file that PIL can read") from e
    except OSError as e:
        if not path.exists():
            raise FileNotFoundError(f"no such image file: {path}") from e
        raise ValueError(f"{path} could not be decoded as an image: {e}") from e
    return im


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image onto white. Fully transparent pixels often hold arbitrary colours (editors
    keep whatever was painted there), so dropping alpha would show them; compositing gives white."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit RGB, mapping 0..65535 linearly onto 0..255 with rounding.

    PIL's own `convert("RGB")` clips these values at 255 instead of scaling them, so a 16-bit PNG would
    come out almost all white. Mode "I" is read as 16-bit data too (that is how PIL loads 16-bit PNGs);
    values outside 0..65535 are clipped.
    """
    v = np.asarray(image).astype(np.int64).clip(0, 65535)
    gray = ((v * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257), exact in integers
    transparency = image.info.get("transparency")  # a PNG tRNS chunk: one gray value is transparent
    if isinstance(transparency, int):
        alpha = np.where(v == transparency, 0, 255).astype(np.uint8)
        rgba = np.stack([gray, gray, gray, alpha], axis=-1)  # (H, W) x 4 -> (H, W, 4)
        return _flatten_alpha(Image.fromarray(rgba))
    return Image.fromarray(gray).convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
    """Mode "F" (32-bit float) -> RGB. Values all within [0, 1] are read as 0..1 (the numpy convention);
    otherwise as PIL's 0..255 scale, clipped."""
    v = np.asarray(image, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ValueError("a float (mode 'F') image holds NaN or inf values; it cannot be turned into pixels")
    if v.size and v.min() >= 0.0 and v.max() <= 1.0:
        v = v * 255.0
    gray = np.round(v.clip(0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> "RGB", with the corrections that `image.convert("RGB")` alone gets wrong."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # Palette, L and RGB images can mark transparent colours with a PNG tRNS chunk
        # (info["transparency"]); convert("RGBA") turns those into alpha.
        return _flatten_alpha(image.convert("RGBA"))
    try:
        # "P", "L", "1", "CMYK" (naive inversion, no ICC profile), "YCbCr", ... : PIL's conversion is right.
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert a mode {mode!r} image to RGB: {e}") from e


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """Load an image from a path or a PIL image as an 8-bit "RGB" image, upright.

    - EXIF orientation is applied (`ImageOps.exif_transpose`): a portrait photo stays portrait.
    - Transparency (RGBA, LA, palette or gray/RGB with a tRNS colour) is composited onto white.
    - 16-bit grayscale ("I;16", "I;16B", "I") is scaled from 0..65535 to 0..255.
    - Float ("F") images in [0, 1] are scaled by 255; others are taken as 0..255 and clipped.
    - Palette, grayscale, 1-bit and CMYK images are converted by PIL (ICC profiles are not applied).

    A path that is not a readable image raises `ValueError` naming the path.
    """
    im = _open(image)
    im = ImageOps.exif_transpose(im)  # returns a copy; the caller's image is left alone
    return _to_rgb(im)


def load_mask(mask: str | os.PathLike | Image.Image, size: tuple[int, int]) -> Image.Image:
    """Load an inpainting mask as a mode "L" image of `size` = (width, height): white (255) = repaint,
    black (0) = keep.

    The mask is read like `load_image` (EXIF orientation, transparency composited onto white) and then
    reduced to its luminance; its alpha channel is not used as the mask.

    Size rule: a mask whose size differs from `size` is resized with nearest-neighbour sampling (so it
    stays hard-edged) only when its aspect ratio matches the image's within 1%, e.g. a 256x384 mask for
    a 512x768 image. Any other mismatch raises `ValueError`: stretching a mask of another shape would
    move the region to repaint, so resize or crop the mask to the image's size first.
    """
    width, height = (operator.index(s) for s in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be a positive (width, height), got {tuple(size)}")
    m = load_image(mask).convert("L")  # ITU-R 601-2 luma; exact for gray pixels (weights sum to 1)
    if m.size == (width, height):
        return m
    mw, mh = m.size
    ratio = (mw / mh) / (width / height)
    if abs(ratio - 1.0) > 0.01:
        raise ValueError(
            f"mask is {mw}x{mh} but the image is {width}x{height}; their aspect ratios differ "
            f"({mw / mh:.4f} vs {width / height:.4f}), so the mask cannot be scaled onto the image. "
            f"Resize or crop the mask to the image's size ({width}x{height})."
        )
    return m.resize((width, height), Image.Resampling.NEAREST)


def _nearest_multiples(value: int, multiple: int) -> str:
    below = value // multiple * multiple
    if below <= 0:
        return f"{multiple}"
    return f"{below} or {below + multiple}"


def check_size(width: int, height: int, multiple: int = 8) -> None:
    """Raise `ValueError` unless width and height are positive multiples of `multiple` (the VAE's
    downsampling factor: latents are (H / 8, W / 8)). The message names the nearest valid sizes."""
    multiple = operator.index(multiple)
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    problems = []
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        value = int(value)
        if value <= 0:
            problems.append(f"{name} must be a positive multiple of {multiple}, got {value}; try {multiple}")
        elif value % multiple:
            problems.append(
                f"{name} must be a multiple of {multiple}, got {value}; try {_nearest_multiples(value, multiple)}"
            )
    if problems:
        raise ValueError(". ".join(problems))


def resize_to_multiple(image: Image.Image, multiple: int = 8, max_side: int | None = None) -> Image.Image:
    """Make an arbitrary photo usable for img2img: width and height become multiples of `multiple`.

    1. If `max_side` is given and the longer side exceeds it, the image is scaled down (Lanczos),
       keeping its aspect ratio, so that the longer side is about `max_side`.
    2. Each side is then rounded down to the nearest multiple by cropping the remainder (at most
       `multiple - 1` pixels) equally from both edges, so the picture is never stretched.

    An image already of valid size (and within `max_side`) is returned unchanged.
    """
    multiple = operator.index(multiple)
    w, h = image.size
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    new_w, new_h = w // multiple * multiple, h // multiple * multiple
    if new_w == 0 or new_h == 0:
        raise ValueError(f"image is {w}x{h}, smaller than {multiple} pixels on a side; it cannot be used")
    if (new_w, new_h) == (w, h):
        return image
    left, top = (w - new_w) // 2, (h - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def image_to_tensor(images: list[Image.Image] | Image.Image) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) float32 in [-1, 1], computed as diffusers does
    (`p / 255` in float32, then `2 * x - 1`), so the result matches `VaeImageProcessor.preprocess`."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("image_to_tensor needs at least one image")
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise ValueError(f"all images in a batch must have the same size, got {listed}")
    pixels = np.stack([np.asarray(_to_rgb(im), dtype=np.uint8) for im in images])  # (B, H, W, 3)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    x = x.to(torch.float32) / 255.0
    return 2.0 * x - 1.0


def mask_to_tensor(masks: list[Image.Image] | Image.Image) -> torch.Tensor:
    """Masks of one size -> (B, 1, H, W) float32 in {0, 1}: 1 where `p / 255 >= 0.5` (p >= 128),
    the binarisation of diffusers' mask processor (`do_binarize=True`)."""
    if isinstance(masks, Image.Image):
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("mask_to_tensor needs at least one mask")
    sizes = sorted({m.size for m in masks})
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise ValueError(f"all masks in a batch must have the same size, got {listed}")
    gray = [m if m.mode == "L" else _to_rgb(m).convert("L") for m in masks]
    pixels = np.stack([np.asarray(m, dtype=np.uint8) for m in gray])  # (B, H, W)
    x = torch.from_numpy(pixels)[:, None].to(torch.float32) / 255.0  # (B, H, W) -> (B, 1, H, W)
    return (x >= 0.5).to(torch.float32)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """Decoded images (B, 3, H, W), about [-1, 1] -> uint8 RGB PIL images.

    The arithmetic is diffusers' `VaeImageProcessor.postprocess(x, output_type="pil")` step for step
    (denormalise in x's own dtype, then float32 numpy, `* 255`, round half to even, uint8), so the
    pixels are identical to a diffusers pipeline's. A tensor holding NaN or inf (a float16 overflow,
    typically) raises `NonFiniteImageError` instead of quietly giving black images.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected decoded images of shape (B, 3, H, W), got {tuple(x.shape)}")
    x = x.detach()
    bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum())
    if bad:
        raise NonFiniteImageError(
            f"{bad} of {x.shape[0]} decoded images contain NaN or inf values, so there is no picture to "
            "return. This is usually a float16 overflow: run the model in float32 (or at least the VAE "
            "in float32), or lower the guidance scale."
        )
    x = (x / 2 + 0.5).clamp(0, 1)  # diffusers' denormalize, in x's dtype
    arr = x.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, 3, H, W) -> (B, H, W, 3)
    arr = (arr * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
