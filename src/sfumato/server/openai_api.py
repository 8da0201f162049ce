"""OpenAI's images API (`/v1/images/generations`, `/v1/images/edits`), so that the official `openai` client
and the tools built on it (Open WebUI, LibreChat, ...) can use sfumato by changing their base URL.

Responses are `{"created", "data": [{"b64_json"} | {"url"}], "size", "output_format", "quality"}`, errors
`{"error": {"message", "type", "param", "code"}}`, as the API documents them. sfumato reads the documented
fields it can honour (prompt, n, size, quality, response_format, output_format, output_compression; for
edits image, mask) and a few of its own that the client passes through `extra_body`: negative_prompt,
steps, guidance, sampler, scheduler, seed, strength. `model` is accepted and ignored: one model is loaded.

- `size`: "WIDTHxHEIGHT" (any multiple of the model's latent factor within the pixel cap) or "auto" (the
  model's native size; for edits the image's own size, scaled down to the cap).
- `quality` sets the number of steps when `steps` is not given: low 12, medium/standard/auto 20, high/hd 30.
- `response_format` defaults to b64_json (as for the GPT image models); "url" saves the PNG in the output
  folder and answers its URL on this server.
- Edits follow OpenAI's mask rule: the fully transparent pixels of `mask` (or, without a mask, of `image`)
  are repainted. An image without transparency and no mask is redrawn whole (image-to-image, `strength`
  0.75 unless given).
"""

from __future__ import annotations

import base64
import io
import time

from fastapi import APIRouter, Request
from PIL import Image
from starlette.datastructures import UploadFile

from sfumato.server.jobs import GenerationRequest, Job
from sfumato.server.params import (
    ApiError,
    check_guidance,
    decode_image,
    eta_for,
    fit_image,
    mask_from_alpha,
    resolve_sampler,
    resolve_seed,
)

QUALITY_STEPS = {"low": 12, "medium": 20, "standard": 20, "auto": 20, "high": 30, "hd": 30}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _int(value, name: str, default=None):
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", name) from None


def _float(value, name: str, default=None):
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a number, got {value!r}", name) from None


def _size(state, size) -> tuple[int, int] | None:
    """'WxH' -> (w, h); 'auto' or nothing -> None."""
    if size in (None, "", "auto"):
        return None
    w, sep, h = str(size).lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' or 'auto', got {size!r}", "size")
    return int(w), int(h)


def _settings(state, body) -> dict:
    """The fields both endpoints share, checked."""
    lim = state.limits
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt is required (a non-empty string)", "prompt")
    lim.check_prompt(prompt)
    negative = body.get("negative_prompt") or ""
    lim.check_prompt(negative, "negative_prompt")
    n = _int(body.get("n"), "n", 1)
    lim.check_images(n, "n")
    quality = body.get("quality") or "auto"
    if quality not in QUALITY_STEPS:
        raise ApiError(400, f"quality must be one of {', '.join(QUALITY_STEPS)}, got {quality!r}", "quality")
    # quality's step count is a default, so it bows to the server's cap; an explicit `steps` is checked
    steps = _int(body.get("steps"), "steps", min(QUALITY_STEPS[quality], lim.max_steps))
    lim.check_steps(steps)
    fmt = body.get("output_format") or "png"
    if fmt not in FORMATS:
        raise ApiError(400, f"output_format must be png, jpeg or webp, got {fmt!r}", "output_format")
    response_format = body.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise ApiError(400, f"response_format must be b64_json or url, got {response_format!r}", "response_format")
    if fmt != "png" and response_format == "url":
        raise ApiError(400, "response_format 'url' serves PNG files; use output_format png", "output_format")
    sampler, karras = resolve_sampler(body.get("sampler"), body.get("scheduler"))
    guidance = body.get("guidance", body.get("cfg_scale", state.default_guidance))
    return dict(
        prompt=prompt, negative_prompt=negative, batch=n, steps=steps, sampler=sampler, karras=karras,
        guidance=check_guidance(_float(guidance, "guidance"), "guidance"), eta=eta_for(sampler, None),
        seed=resolve_seed(_int(body.get("seed"), "seed", -1)),
        _out=(fmt, response_format, quality, _int(body.get("output_compression"), "output_compression", 100)),
    )  # fmt: skip


def _answer(request: Request, job: Job, out: tuple, width: int, height: int) -> dict:
    fmt, response_format, quality, compression = out
    data = []
    for i, im in enumerate(job.images):
        if response_format == "url":
            data.append({"url": str(request.base_url) + f"outputs/{job.files[i]}"})
            continue
        if fmt == "png":
            from sfumato.server.jobs import png_bytes

            raw = png_bytes(im)
        else:
            buf = io.BytesIO()
            im.save(buf, format=FORMATS[fmt], quality=max(1, min(compression, 100)))
            raw = buf.getvalue()
        data.append({"b64_json": base64.b64encode(raw).decode()})
    return {"created": int(time.time()), "data": data, "size": f"{width}x{height}", "output_format": fmt,
            "quality": quality, "background": "opaque"}  # fmt: skip


def router(state) -> APIRouter:
    r = APIRouter(prefix="/v1/images", tags=["OpenAI"])

    @r.post("/generations")
    async def generations(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        s = _settings(state, body)
        out = s.pop("_out")
        size = _size(state, body.get("size")) or (state.default_size, state.default_size)
        state.limits.check_size(*size, state.latent_factor)
        gen = GenerationRequest(mode="txt2img", width=size[0], height=size[1], **s)
        job = await state.run(gen, request, save=out[1] == "url")
        return _answer(request, job, out, *size)

    @r.post("/edits")
    async def edits(request: Request):
        lim = state.limits
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception as e:  # noqa: BLE001 - python-multipart raises several types for a broken body
            raise ApiError(400, f"the request is not a valid multipart form: {e}") from None
        images = [v for k in ("image", "image[]") for v in form.getlist(k) if isinstance(v, UploadFile)]
        if not images:
            raise ApiError(400, "image is required: send it as a multipart file field 'image'", "image")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        s = _settings(state, fields)
        out = s.pop("_out")
        image = decode_image(await images[0].read(), lim, "image")
        mask_file = form.get("mask")
        mask = None
        if isinstance(mask_file, UploadFile):
            m = decode_image(await mask_file.read(), lim, "mask")
            if m.size != image.size:
                raise ApiError(400, f"mask is {m.size[0]}x{m.size[1]} but image is {image.size[0]}x{image.size[1]}; "
                               "they must have the same dimensions", "mask")  # fmt: skip
            if "A" not in m.getbands() and "transparency" not in m.info:
                raise ApiError(400, "mask must be a PNG with an alpha channel: its transparent pixels mark the "
                               "region to edit", "mask")  # fmt: skip
            mask = mask_from_alpha(m)
            if mask is None:
                raise ApiError(400, "mask has no fully transparent pixel, so there is nothing to edit", "mask")
        else:
            mask = mask_from_alpha(image)
        size = _size(state, fields.get("size")) or _auto_size(state, image.size)
        lim.check_size(*size, state.latent_factor)
        pixels = fit_image(image, *size)
        if mask is not None:
            mask = mask.resize(size, Image.Resampling.NEAREST)
        strength = _float(fields.get("strength"), "strength", 1.0 if mask is not None else 0.75)
        if not 0 < strength <= 1 or int(s["steps"] * strength) < 1:
            raise ApiError(400, f"strength must be in (0, 1] and leave at least one step, got {strength}", "strength")
        gen = GenerationRequest(mode="inpaint" if mask is not None else "img2img", width=size[0], height=size[1],
                                strength=strength, image=pixels, mask=mask, **s)  # fmt: skip
        job = await state.run(gen, request, save=out[1] == "url")
        return _answer(request, job, out, *size)

    return r


def _auto_size(state, size: tuple[int, int]) -> tuple[int, int]:
    """An image's own size, scaled down to fit the pixel cap and rounded down to the latent factor."""
    w, h = size
    scale = min(1.0, (state.limits.max_pixels / (w * h)) ** 0.5)
    f = state.latent_factor
    return max(f, int(w * scale) // f * f), max(f, int(h * scale) // f * f)
