"""The FastAPI application: the web page and its job API, the output folder, and the two client APIs
(A1111's in `a1111.py`, OpenAI's in `openai_api.py`), all behind the `security.Guard` middleware.

    app = create_app(sfumato.load("runs/shapes/model"), outdir="outputs/server")
    uvicorn.run(app, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from sfumato.server.jobs import GenerationRequest, Job, QueueFull, Worker
from sfumato.server.params import (
    A1111_SAMPLERS,
    ApiError,
    Limits,
    check_guidance,
    eta_for,
    resolve_sampler,
    resolve_seed,
)
from sfumato.server.security import LOOPBACK_NAMES, Guard

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png$")
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class ServerState:
    pipe: object
    worker: Worker
    limits: Limits
    outdir: Path
    model_name: str
    model_hash: str | None
    started: float = field(default_factory=time.time)

    @property
    def latent_factor(self) -> int:
        return int(getattr(self.pipe, "latent_factor", 8))

    @property
    def default_size(self) -> int:
        schedule = getattr(self.pipe, "schedule", None)
        return int(getattr(schedule, "image_size", 0) or 512)

    @property
    def default_guidance(self) -> float:
        """The model's own guidance scale (`StableDiffusion.default_guidance`), for requests that name none."""
        return float(getattr(self.pipe, "default_guidance", 7.5))

    @property
    def model_title(self) -> str:
        """A1111's checkpoint title: 'name [hash]'."""
        return f"{self.model_name} [{self.model_hash}]" if self.model_hash else self.model_name

    async def run(self, request: GenerationRequest, http: Request | None = None, *, save: bool = False) -> Job:
        """Queue a request and wait for it; ApiError 429 when the queue is full, 400/500 when it fails.
        When the client of `http` goes away meanwhile, the job is cancelled (queued or running), so nobody's
        abandoned request keeps the worker busy."""
        job = self.submit(request, save=save)
        done = asyncio.wrap_future(job.future)
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(done), timeout=0.25)
                break
            except asyncio.TimeoutError:
                if http is not None and not job.cancel.is_set() and await http.is_disconnected():
                    job.cancel.set()
        if job.status == "failed":
            raise ApiError(400 if job.error_kind == "user" else 500, job.error or "generation failed")
        return job

    def submit(self, request: GenerationRequest, *, save: bool = False, track: bool = False) -> Job:
        try:
            return self.worker.submit(request, save=save, track=track)
        except QueueFull as e:
            raise ApiError(429, str(e)) from None


def error_payload(path: str, status: int, message: str, param: str | None = None) -> dict:
    """Errors in the shape each client parses: OpenAI's under /v1, A1111's elsewhere (which also has the
    `detail` key FastAPI clients read)."""
    if path.startswith("/v1/"):
        kind = {401: "authentication_error", 429: "rate_limit_exceeded", 500: "server_error"}.get(
            status, "invalid_request_error"
        )
        return {"error": {"message": message, "type": kind, "param": param, "code": None}}
    names = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 413: "ContentTooLarge",
             422: "UnprocessableEntity", 429: "TooManyRequests", 500: "InternalServerError"}  # fmt: skip
    return {"error": names.get(status, "Error"), "detail": message}


def build_request(state: ServerState, body: dict, mode: str = "txt2img") -> GenerationRequest:
    """The page's job body (sfumato/A1111 names mixed: prompt, negative_prompt, width, height, steps,
    sampler, scheduler, guidance, seed, batch) -> a checked GenerationRequest."""
    lim = state.limits
    prompt = body.get("prompt", "")
    negative = body.get("negative_prompt", "") or ""
    lim.check_prompt(prompt)
    lim.check_prompt(negative, "negative_prompt")
    size = state.default_size
    width, height = body.get("width", size), body.get("height", size)
    lim.check_size(width, height, state.latent_factor)
    steps = body.get("steps", 20)
    lim.check_steps(steps)
    batch = body.get("batch", 1)
    lim.check_images(batch, "batch")
    sampler, karras = resolve_sampler(body.get("sampler"), body.get("scheduler"))
    return GenerationRequest(
        mode=mode, prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler, karras=karras,
        guidance=check_guidance(body.get("guidance", state.default_guidance), "guidance"),
        eta=eta_for(sampler, body.get("eta")), seed=resolve_seed(body.get("seed", -1)), width=width,
        height=height, batch=batch,
    )  # fmt: skip


def output_entries(outdir: Path, limit: int) -> list[dict]:
    """The newest PNGs in the output folder with their A1111 parameters (the gallery; any replica sees all)."""
    files = []
    for p in outdir.glob("*.png"):
        try:
            files.append((p.stat().st_mtime, p))
        except OSError:  # removed meanwhile
            continue
    files.sort(reverse=True)
    out = []
    for mtime, p in files[:limit]:
        try:
            with Image.open(p) as im:
                params = str(im.info.get("parameters", ""))
                size = im.size
        except (OSError, ValueError):
            continue
        out.append({"file": p.name, "url": f"outputs/{p.name}", "parameters": params, "created": mtime,
                    "width": size[0], "height": size[1]})  # fmt: skip
    return out


def create_app(
    pipe,
    *,
    outdir: str | Path = "outputs/server",
    model_name: str | None = None,
    limits: Limits | None = None,
    api_key: str | None = None,
    allowed_hosts: tuple[str, ...] | None = None,
    max_queue: int = 8,
    preview_interval: float = 1.0,
) -> FastAPI:
    """The whole service over one loaded `StableDiffusion` pipeline (or anything with its generate /
    image_to_image / inpaint / decode methods). The worker thread starts with the app's lifespan.

    allowed_hosts: Host header names accepted (None: any); `serve_main` passes the loopback names when it
    listens on loopback.
    """
    limits = limits or Limits()
    outdir = Path(outdir)
    source = getattr(pipe, "source", None)
    if model_name is None:
        model_name = (source.stem if source.is_file() else source.name) if source is not None else "sfumato"
    worker = Worker(pipe, outdir, max_queue=max_queue, preview_interval=preview_interval)
    state = ServerState(pipe, worker, limits, outdir, model_name, getattr(pipe, "model_hash", None))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    # no /docs: FastAPI's docs page loads its scripts from a CDN, and this server works offline
    app = FastAPI(title="sfumato", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.sfumato = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(error_payload(request.url.path, exc.status, exc.message, exc.param), exc.status,
                            headers=headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return JSONResponse(error_payload(request.url.path, 422, "; ".join(parts)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_payload(request.url.path, exc.status_code, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    # -- the page ----------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        html = (STATIC / "index.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})  # fmt: skip

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC_FILES:  # a fixed list: nothing else under the package is reachable
            raise ApiError(404, "no such file")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])

    @app.get("/healthz")
    async def healthz():
        job = worker.current
        return {"status": "ok", "queued": worker.queued, "max_queue": worker.max_queue,
                "running": job is not None, "completed": worker.completed, "failed": worker.failed}  # fmt: skip

    @app.get("/api/info")
    async def info():
        lim = limits
        return {
            "model": state.model_name, "model_hash": state.model_hash, "default_size": state.default_size,
            "default_guidance": state.default_guidance, "size_multiple": state.latent_factor,
            "samplers": [n for n, *_ in A1111_SAMPLERS],
            "limits": {"max_pixels": lim.max_pixels, "max_steps": lim.max_steps, "max_images": lim.max_images,
                       "max_upload_bytes": lim.max_upload_bytes},
            "version": _version(),
        }  # fmt: skip

    @app.post("/api/jobs", status_code=202)
    async def create_job(request: Request):
        body = await _json_body(request)
        job = state.submit(build_request(state, body), track=True)
        return job.state()

    @app.get("/api/jobs/{job_id}")
    async def job_state(job_id: str):
        s = worker.job_state(job_id)
        if s is None:
            raise ApiError(404, f"no job {job_id!r} (job ids are 32 hex digits; finished jobs are kept a day)")
        return s

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        if not worker.cancel(job_id):
            raise ApiError(404, f"no job {job_id!r}")
        return {"id": job_id, "cancelling": True}

    @app.get("/api/outputs")
    async def outputs(limit: int = 48):
        limit = max(1, min(limit, 500))
        return await asyncio.to_thread(output_entries, outdir, limit)

    @app.get("/outputs/{name}")
    async def output_file(name: str):
        path = safe_output_path(outdir, name)
        if path is None:
            raise ApiError(404, "no such output")
        return FileResponse(path, media_type="image/png", filename=name)

    from sfumato.server.a1111 import router as a1111_router
    from sfumato.server.openai_api import router as openai_router

    app.include_router(a1111_router(state))
    app.include_router(openai_router(state))
    return Guard(app, api_key=api_key, max_body=limits.max_upload_bytes, allowed_hosts=allowed_hosts)


def safe_output_path(outdir: Path, name: str) -> Path | None:
    """The file `name` directly inside `outdir`, or None. A plain-name pattern (no separators, no leading dot,
    .png only) and a resolved-parent check, so `../`, absolute paths, encoded or backslash forms and symlinks
    out of the folder all miss."""
    if not OUTPUT_NAME.match(name):
        return None
    root = outdir.resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        return None
    return path


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "the request body must be a JSON object")
    return body


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sfumato")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0"


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")
