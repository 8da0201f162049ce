"""Request checking shared by every route: the server's caps, A1111 sampler names, and image uploads.

Every check raises `ApiError(status, message)`; the routes turn it into the error shape their clients expect
(A1111's `{"error", "detail"}`, OpenAI's `{"error": {"message", "type"}}`, or the page's `{"detail"}`).
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from sfumato.pipelines.images import load_image


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The defaults suit a CPU or one GPU; `sfumato serve --max-*` changes them."""

    max_pixels: int = 1024 * 1024  # width x height of an output image
    max_steps: int = 150
    max_images: int = 8  # images per request (A1111: batch_size x n_iter; OpenAI: n)
    max_upload_bytes: int = 16 * 1024 * 1024  # a whole request body (base64 JSON or multipart)
    max_input_pixels: int = 4096 * 4096  # an uploaded image, checked from its header before decoding
    max_prompt_chars: int = 10_000

    def check_size(self, width: int, height: int, multiple: int) -> None:
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ApiError(422, f"{name} must be a positive integer, got {v!r}", name)
            if v % multiple:
                lo = max(multiple, v // multiple * multiple)
                raise ApiError(
                    422, f"{name} must be a multiple of {multiple} for this model, got {v}; try {lo}", name
                )
        if width * height > self.max_pixels:
            raise ApiError(
                422,
                f"width x height = {width}x{height} = {width * height} pixels, more than this server's cap of "
                f"{self.max_pixels} (e.g. {int(self.max_pixels**0.5)}x{int(self.max_pixels**0.5)}); "
                "ask for a smaller image",
                "width",
            )

    def check_steps(self, steps: int) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.max_steps:
            raise ApiError(422, f"steps must be an integer from 1 to {self.max_steps}, got {steps!r}", "steps")

    def check_images(self, n: int, what: str = "batch_size x n_iter") -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_images:
            raise ApiError(422, f"{what} must be from 1 to {self.max_images} images, got {n!r}", "n")

    def check_prompt(self, prompt: str, name: str = "prompt") -> None:
        if not isinstance(prompt, str):
            raise ApiError(422, f"{name} must be a string, got {type(prompt).__name__}", name)
        if len(prompt) > self.max_prompt_chars:
            raise ApiError(
                422, f"{name} has {len(prompt)} characters, more than the {self.max_prompt_chars} accepted", name
            )


# ---------------------------------------------------------------------------------------------------------
# Samplers: A1111's display names (and their k-diffusion aliases) -> (our sampler, Karras σ by default)

# name, our sampler, Karras under scheduler "automatic", aliases. Since webui 1.9 "DPM++ 2M" defaults to the
# Karras schedule (the old "DPM++ 2M Karras" name still works); the others default to their plain ladder.
A1111_SAMPLERS: list[tuple[str, str, bool, list[str]]] = [
    ("DPM++ 2M", "dpmpp_2m", True, ["k_dpmpp_2m", "dpmpp_2m"]),
    ("DPM++ 2M Karras", "dpmpp_2m", True, ["k_dpmpp_2m_ka"]),
    ("Euler a", "euler_ancestral", False, ["k_euler_a", "k_euler_ancestral", "euler_ancestral"]),
    ("Euler", "euler", False, ["k_euler", "euler"]),
    ("Heun", "heun", False, ["k_heun", "heun"]),
    ("DDIM", "ddim", False, ["ddim"]),
    ("DDPM", "ddpm", False, ["ddpm"]),
]
_BY_NAME = {n.lower(): (s, k) for n, s, k, aliases in A1111_SAMPLERS for n in [n, *aliases]}
# A1111 1.9+ "scheduler" values we can honour; the others (exponential, sgm_uniform, ...) are refused.
SCHEDULERS = {"automatic": None, "karras": True, "uniform": False, "normal": False}
_ETA_SAMPLERS = ("ddim", "euler_ancestral")


def resolve_sampler(name: str | None, scheduler: str | None = None, default: str = "DPM++ 2M") -> tuple[str, bool]:
    """(our sampler, karras) for an A1111 sampler name (or alias, or our own name) and scheduler."""
    name = default if name in (None, "") else name
    if not isinstance(name, str) or name.lower().strip() not in _BY_NAME:
        known = ", ".join(n for n, *_ in A1111_SAMPLERS)
        raise ApiError(422, f"unknown sampler {name!r}; this server has: {known}", "sampler_name")
    sampler, karras = _BY_NAME[name.lower().strip()]
    if name.lower().endswith("karras"):
        karras = True
    key = "automatic" if scheduler in (None, "") else str(scheduler).lower()
    if key not in SCHEDULERS:
        raise ApiError(
            422, f"unknown scheduler {scheduler!r}; this server has: {', '.join(SCHEDULERS)}", "scheduler"
        )
    if SCHEDULERS[key] is not None:
        karras = SCHEDULERS[key]
    if karras and sampler in ("ddim", "ddpm"):
        raise ApiError(422, f"scheduler 'karras' is not defined for {name}; use 'automatic'", "scheduler")
    return sampler, karras


def eta_for(sampler: str, eta: float | None) -> float | None:
    """A1111 reads `eta` for DDIM and the ancestral samplers and ignores it for the others; so do we (the
    pipeline would refuse it)."""
    if eta is None or sampler not in _ETA_SAMPLERS:
        return None
    if not eta >= 0:
        raise ApiError(422, f"eta must be >= 0, got {eta}", "eta")
    return float(eta)


def resolve_seed(seed: int | None) -> int:
    """-1 or None: a random seed (A1111's rule); otherwise a non-negative integer."""
    if seed is None or seed == -1:
        return secrets.randbelow(2**32)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ApiError(422, f"seed must be -1 (random) or an integer from 0 to 2^63 - 1, got {seed!r}", "seed")
    return seed


def check_guidance(guidance: float, name: str = "cfg_scale") -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 1 <= guidance <= 100:
        raise ApiError(
            422, f"{name} must be a number from 1 (no guidance) to 100 (SD uses 5-9), got {guidance!r}", name
        )
    return float(guidance)


# ---------------------------------------------------------------------------------------------------------
# Uploaded images

_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """A PIL image (first frame, EXIF-upright, mode RGB or RGBA kept for masks) from uploaded bytes.

    The header's size is checked against `limits.max_input_pixels` *before* the pixels are decoded, so a
    decompression bomb (a small file that inflates to gigapixels) is refused without being inflated (413).
    """
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, f"{what} is {len(data)} bytes, more than the {limits.max_upload_bytes} accepted", what)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own header check (past 2 x MAX_IMAGE_PIXELS)
        raise ApiError(413, f"{what} refused as a decompression bomb: {e}", what) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ApiError(400, f"{what} is not a PNG, JPEG or WebP image: {e}", what) from None
    if im.format not in _FORMATS:
        raise ApiError(400, f"{what} is a {im.format} file; send PNG, JPEG or WebP", what)
    w, h = im.size
    if w * h > limits.max_input_pixels:
        raise ApiError(
            413, f"{what} is {w}x{h} = {w * h} pixels, more than the {limits.max_input_pixels} this server decodes",
            what,
        )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, f"{what} refused as a decompression bomb: {e}", what) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ApiError(400, f"{what} could not be decoded: {e}", what) from None
    return ImageOps.exif_transpose(im)


def decode_b64_image(text: str, limits: Limits, what: str = "image") -> Image.Image:
    """A1111's image fields: base64 PNG/JPEG/WebP, with or without a `data:image/...;base64,` prefix.
    (A1111 can also fetch http URLs here; this server never fetches anything.)"""
    if not isinstance(text, str) or not text:
        raise ApiError(422, f"{what} must be a base64-encoded image string", what)
    if text.startswith(("http://", "https://")):
        raise ApiError(422, f"{what} is a URL; this server does not fetch URLs, send the image as base64", what)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) * 3 // 4 > limits.max_upload_bytes:
        raise ApiError(413, f"{what} is larger than the {limits.max_upload_bytes} bytes accepted", what)
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{what} is not valid base64", what) from None
    return decode_image(data, limits, what)


def fit_image(image: Image.Image, width: int, height: int, resize_mode: int = 0) -> Image.Image:
    """An RGB image of width x height: A1111's resize_mode 0 ("just resize") or 1 ("crop and resize")."""
    image = load_image(image)
    if image.size == (width, height):
        return image
    if resize_mode == 0:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if resize_mode == 1:
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    raise ApiError(422, f"resize_mode {resize_mode} is not supported; use 0 (just resize) or 1 (crop and resize)",
                   "resize_mode")  # fmt: skip


def mask_from_alpha(image: Image.Image) -> Image.Image | None:
    """OpenAI's mask rule: fully transparent pixels (alpha 0) are the ones to repaint. Mode "L", white = repaint;
    None when the image has no transparent pixel."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    return repaint if repaint.getbbox() is not None else None


def prepare_mask(mask: Image.Image, width: int, height: int, blur: int = 0, invert: bool = False) -> Image.Image:
    """A1111 mask handling: luminance (white = repaint), optional inversion, resize, Gaussian blur of
    `mask_blur` px; the pipeline then binarises at 50% grey."""
    m = load_image(mask).convert("L")
    if invert:
        m = ImageOps.invert(m)
    if m.size != (width, height):
        m = m.resize((width, height), Image.Resampling.NEAREST)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return m
