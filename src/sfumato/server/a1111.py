"""AUTOMATIC1111's web API (`/sdapi/v1/...`), the one Krita plugins, Open WebUI, SillyTavern and scripts such
as the `webuiapi` package speak.

Field names, defaults and answers follow the webui's API (modules/api/models.py and api.py of
stable-diffusion-webui 1.10): images come back as raw base64 PNGs with the "parameters" text chunk, `info` is
a JSON *string* with the generation settings (all_seeds, infotexts, ...), `parameters` echoes the request.
What the webui can do and sfumato cannot (hires fix, face restoration, tiling, scripts, subseeds, models
chosen per request) is refused with 422 and a message naming the field, not silently ignored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from sfumato.server.jobs import GenerationRequest, Job, png_bytes
from sfumato.server.params import (
    A1111_SAMPLERS,
    SCHEDULERS,
    ApiError,
    check_guidance,
    decode_b64_image,
    eta_for,
    fit_image,
    prepare_mask,
    resolve_sampler,
    resolve_seed,
)


class Txt2ImgRequest(BaseModel):
    """StableDiffusionTxt2ImgProcessingAPI's fields that matter here; unknown fields are accepted and echoed."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    denoising_strength: float | None = None
    enable_hr: bool = False
    override_settings: dict | None = None
    script_name: str | None = None
    alwayson_scripts: dict = {}
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


def _refuse_unsupported(req: Txt2ImgRequest) -> None:
    unsupported = [
        ("enable_hr", req.enable_hr, "hires fix"),
        ("restore_faces", req.restore_faces, "face restoration"),
        ("tiling", req.tiling, "tiling"),
        ("script_name", req.script_name, "scripts"),
        ("subseed_strength", req.subseed_strength, "variation seeds"),
        ("styles", req.styles, "saved prompt styles"),
    ]
    for name, value, what in unsupported:
        if value:
            raise ApiError(422, f"{name}={value!r}: {what} is not supported by sfumato; leave it unset", name)
    for script, cfg in (req.alwayson_scripts or {}).items():
        args = cfg.get("args", []) if isinstance(cfg, dict) else cfg
        if isinstance(args, list) and any(bool(a) for a in args):
            raise ApiError(
                422, f"alwayson_scripts[{script!r}] is enabled, but sfumato has no extensions; leave it out",
                "alwayson_scripts",
            )  # fmt: skip


def _clip_skip(req: Txt2ImgRequest) -> int:
    """override_settings.CLIP_stop_at_last_layers (A1111 counts the last layer as 1; ours is 0)."""
    n = (req.override_settings or {}).get("CLIP_stop_at_last_layers", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ApiError(422, f"CLIP_stop_at_last_layers must be an integer >= 1, got {n!r}", "override_settings")
    return n - 1


def _sampler_label(sampler: str, karras: bool) -> str:
    for name, ours, default_karras, _ in A1111_SAMPLERS:
        if ours == sampler and default_karras == karras and "Karras" not in name:
            return name
    return next(n for n, ours, *_ in A1111_SAMPLERS if ours == sampler) + (" Karras" if karras else "")


def _common(state, req: Txt2ImgRequest) -> dict:
    lim = state.limits
    _refuse_unsupported(req)
    lim.check_prompt(req.prompt)
    lim.check_prompt(req.negative_prompt, "negative_prompt")
    lim.check_steps(req.steps)
    if req.batch_size < 1 or req.n_iter < 1:
        raise ApiError(422, f"batch_size and n_iter must be >= 1, got {req.batch_size} and {req.n_iter}", "batch_size")
    lim.check_images(req.batch_size * req.n_iter)
    sampler, karras = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    return dict(
        prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
        guidance=check_guidance(req.cfg_scale), sampler=sampler, karras=karras, eta=eta_for(sampler, req.eta),
        seed=resolve_seed(req.seed), batch=req.batch_size, n_iter=req.n_iter, clip_skip=_clip_skip(req),
    )  # fmt: skip


def _answer(state, job: Job, req: Txt2ImgRequest, gen: GenerationRequest, started: float, mode: str) -> dict:
    infotexts = [im.info.get("parameters", "") for im in job.images]
    n = len(job.images)
    seeds = [gen.seed + i for i in range(n)]
    info = {
        "prompt": gen.prompt,
        "all_prompts": [gen.prompt] * n,
        "negative_prompt": gen.negative_prompt,
        "all_negative_prompts": [gen.negative_prompt] * n,
        "seed": gen.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": gen.width,
        "height": gen.height,
        "sampler_name": _sampler_label(gen.sampler, gen.karras),
        "cfg_scale": gen.guidance,
        "steps": gen.steps,
        "batch_size": gen.batch,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": state.model_name,
        "sd_model_hash": state.model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": gen.strength,
        "extra_generation_params": {"Schedule type": "Karras"} if gen.karras else {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": datetime.fromtimestamp(started).strftime("%Y%m%d%H%M%S"),
        "clip_skip": gen.clip_skip + 1,
        "is_using_inpainting_conditioning": gen.mode == "inpaint" and bool(getattr(state.pipe, "is_inpainting_model", False)),
        "version": f"sfumato {_version()}",
        "interrupted": job.status == "interrupted",
        "files": job.files,
    }  # fmt: skip
    params = req.model_dump()
    if mode == "img2img":
        params["init_images"] = None  # the webui does not send the images back either
        params["mask"] = None
    params["seed"] = gen.seed
    images = [base64.b64encode(png_bytes(im)).decode() for im in job.images] if req.send_images else []
    return {"images": images, "parameters": params, "info": json.dumps(info)}


def _version() -> str:
    from sfumato.server.app import _version as v

    return v()


def router(state) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

    @r.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest, http: Request):
        started = time.time()
        common = _common(state, req)
        state.limits.check_size(req.width, req.height, state.latent_factor)
        gen = GenerationRequest(mode="txt2img", width=req.width, height=req.height, **common)
        job = await state.run(gen, http, save=req.save_images)
        return _answer(state, job, req, gen, started, "txt2img")

    @r.post("/img2img")
    async def img2img(req: Img2ImgRequest, http: Request):
        started = time.time()
        common = _common(state, req)
        state.limits.check_size(req.width, req.height, state.latent_factor)
        if not req.init_images:
            raise ApiError(422, "init_images is empty; send one base64 image", "init_images")
        if len(req.init_images) > 1:
            raise ApiError(422, f"got {len(req.init_images)} init_images; sfumato takes one", "init_images")
        strength = req.denoising_strength
        if strength is None or not 0 < strength <= 1:
            raise ApiError(422, f"denoising_strength must be in (0, 1], got {strength!r}", "denoising_strength")
        if int(req.steps * strength) < 1:
            raise ApiError(
                422, f"denoising_strength {strength} with {req.steps} steps runs no step (int(steps x strength) = 0); "
                "raise either", "denoising_strength",
            )  # fmt: skip
        lim = state.limits
        image = await _in_thread(decode_b64_image, req.init_images[0], lim, "init_images[0]")
        image = fit_image(image, req.width, req.height, req.resize_mode)
        mode, mask = "img2img", None
        if req.mask:
            raw = await _in_thread(decode_b64_image, req.mask, lim, "mask")
            blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
            mask = prepare_mask(raw, req.width, req.height, blur, bool(req.inpainting_mask_invert))
            mode = "inpaint"
        gen = GenerationRequest(mode=mode, width=req.width, height=req.height, strength=strength, image=image,
                                mask=mask, **common)  # fmt: skip
        job = await state.run(gen, http, save=req.save_images)
        return _answer(state, job, req, gen, started, "img2img")

    @r.get("/progress")
    async def progress(skip_current_image: bool = False):
        job = state.worker.current
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0,
                    "state": {"skipped": False, "interrupted": False, "stopped": False, "job": "",
                              "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                              "sampling_steps": 0},
                    "current_image": None, "textinfo": None, "current_task": None}  # fmt: skip
        preview = None
        if not skip_current_image and job.preview:
            preview = base64.b64encode(job.preview).decode()
        return {
            "progress": round(job.progress, 4),
            "eta_relative": job.eta_seconds() or 0.0,
            "state": {"skipped": False, "interrupted": job.cancel.is_set(), "stopped": False,
                      "job": f"{job.request.mode}", "job_count": job.request.n_iter,
                      "job_timestamp": datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
                      "job_no": job.call_index, "sampling_step": job.step, "sampling_steps": job.steps},
            "current_image": preview,
            "textinfo": f"step {job.step}/{job.steps}, {state.worker.queued} waiting",
            "current_task": f"task({job.id})",
        }  # fmt: skip

    @r.post("/interrupt")
    async def interrupt():
        state.worker.interrupt_current()
        return {}

    @r.post("/skip")
    async def skip():
        state.worker.interrupt_current()  # one image per call here, so skipping it is interrupting it
        return {}

    @r.get("/samplers")
    async def samplers():
        return [
            {"name": name, "aliases": aliases, "options": {"scheduler": "karras"} if karras else {}}
            for name, _, karras, aliases in A1111_SAMPLERS
        ]

    @r.get("/schedulers")
    async def schedulers():
        return [{"name": k, "label": k.capitalize(), "aliases": None, "default_rho": -1, "need_inner_model": False}
                for k in SCHEDULERS]  # fmt: skip

    @r.get("/sd-models")
    async def sd_models():
        source = getattr(state.pipe, "source", None)
        return [{"title": state.model_title, "model_name": state.model_name, "hash": state.model_hash,
                 "sha256": None, "filename": source.name if source is not None else state.model_name,
                 "config": None}]  # fmt: skip

    @r.get("/sd-vae")
    async def sd_vae():
        return []

    @r.get("/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    def current_options() -> dict:
        return {
            "sd_model_checkpoint": state.model_title,
            "sd_checkpoint_hash": state.model_hash,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            "eta_ddim": 0.0,
            "eta_ancestral": 1.0,
            "outdir_samples": "",  # the folder is the server's business; no paths leave it
        }

    @r.get("/options")
    async def options():
        return current_options()

    @r.post("/options")
    async def set_options(request: Request):
        """Read-only, but clients that "select" the loaded model before every request (webuiapi's
        util_set_model, Open WebUI) keep working: setting an option to its current value is accepted."""
        body = await request.json()
        if not isinstance(body, dict):
            raise ApiError(422, "options must be a JSON object")
        current = current_options()
        for key, value in body.items():
            same = current.get(key) == value
            if key == "sd_model_checkpoint":
                same = value in (state.model_title, state.model_name)
            if not same:
                raise ApiError(422, f"option {key!r} cannot be changed on sfumato (options are read-only; the "
                               "model is chosen with `sfumato serve --model`)", key)  # fmt: skip
        return {}

    @r.post("/png-info")
    async def png_info(request: Request):
        from sfumato.pipelines.metadata import parse_parameters

        body = await request.json()
        im = await _in_thread(decode_b64_image, body.get("image", ""), state.limits, "image")
        text = str(im.info.get("parameters", ""))
        try:
            parsed = parse_parameters(text) if text else {}
        except ValueError:
            parsed = {}
        return {"info": text, "items": {k: str(v) for k, v in im.info.items() if isinstance(v, str)},
                "parameters": parsed}  # fmt: skip

    return r


async def _in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)
