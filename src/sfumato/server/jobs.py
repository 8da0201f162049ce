"""One generation worker: a bounded queue of jobs, run one at a time on the loaded pipeline.

HTTP handlers never touch the model. They build a `GenerationRequest`, `Worker.submit` it (which refuses with
`QueueFull` when `max_queue` jobs already wait, so the server answers 429 instead of piling up work), and await
the job's future. The worker thread runs each job's pipeline calls with a step callback that records progress,
renders a preview of the current x0 estimate now and then, and raises `Interrupted` when the job was cancelled.

A job that raises (a bad argument the pipeline refused, a bug, running out of memory) is marked failed with
its message and the worker goes on with the next one. Nothing a job computes outlives it: the pipeline is
stateless between calls (every image draws its noise from its own seeded generator), and the worker drops
its references and, on an accelerator, empties the allocator cache after a failure.

Jobs created by the web page are *tracked*: their state is written to `<outdir>/.jobs/<id>.json` (atomically,
throttled) and their images saved in `<outdir>`, so that any server process that shares the output folder can
answer "how is job X doing" and "cancel job X" (a `<id>.cancel` file the worker polls). That is the only state
two replicas share; see README "HTTP service".
"""

from __future__ import annotations

import base64
import concurrent.futures
import gc
import io
import json
import os
import queue
import re
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from sfumato.checkpoints.atomic import replacing

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class QueueFull(Exception):
    """The worker already has `max_queue` jobs waiting; the client should retry later (HTTP 429)."""


class Interrupted(Exception):
    """Raised from the step callback to stop sampling of a cancelled job."""


@dataclass
class GenerationRequest:
    """One text-to-image, image-to-image or inpainting request, in sfumato's terms, already validated.

    `n_iter` pipeline calls of `batch` images each run one after another (A1111's batch count x batch size);
    image k of the job gets seed `seed + k`, as in the webui.
    """

    mode: str  # "txt2img" | "img2img" | "inpaint"
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0
    sampler: str = "dpmpp_2m"
    karras: bool = True
    eta: float | None = None
    seed: int = 0
    width: int = 512
    height: int = 512
    batch: int = 1
    n_iter: int = 1
    clip_skip: int = 0
    strength: float | None = None  # img2img / inpaint
    image: Image.Image | None = None  # img2img / inpaint, already width x height
    mask: Image.Image | None = None  # inpaint, mode "L", white = repaint

    @property
    def images(self) -> int:
        return self.batch * self.n_iter

    def calls(self) -> list[tuple[str, dict]]:
        """The pipeline method and keyword arguments of each of the n_iter calls."""
        common = dict(
            negative_prompt=self.negative_prompt, steps=self.steps, guidance=self.guidance, sampler=self.sampler,
            karras=self.karras, eta=self.eta, batch=self.batch, clip_skip=self.clip_skip,
        )  # fmt: skip
        out = []
        for k in range(self.n_iter):
            seed = self.seed + k * self.batch
            if self.mode == "txt2img":
                kw = dict(prompt=self.prompt, width=self.width, height=self.height, seed=seed, **common)
                out.append(("generate", kw))
            elif self.mode == "img2img":
                kw = dict(image=self.image, prompt=self.prompt, strength=self.strength, seed=seed, **common)
                out.append(("image_to_image", kw))
            elif self.mode == "inpaint":
                kw = dict(image=self.image, mask=self.mask, prompt=self.prompt, strength=self.strength, seed=seed,
                          **common)  # fmt: skip
                out.append(("inpaint", kw))
            else:
                raise ValueError(f"unknown generation mode {self.mode!r}")
        return out

    def describe(self) -> dict:
        """The request as JSON-able settings (what the job file and the page show)."""
        d = {k: getattr(self, k) for k in (
            "mode", "prompt", "negative_prompt", "steps", "guidance", "sampler", "karras", "eta", "seed",
            "width", "height", "batch", "n_iter", "clip_skip", "strength")}  # fmt: skip
        return d


@dataclass
class Job:
    request: GenerationRequest
    track: bool = False  # write state to <outdir>/.jobs and save images (the web page's jobs)
    save: bool = False  # save images to <outdir>
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    status: str = "queued"  # queued | running | done | interrupted | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    call_index: int = 0  # which of the n_iter calls runs
    step: int = 0  # steps finished in this call
    steps: int = 0  # steps this call runs (img2img: int(steps * strength))
    images: list = field(default_factory=list)  # PIL images with info["parameters"]
    files: list = field(default_factory=list)  # names of saved PNGs in outdir
    parameters: list = field(default_factory=list)  # each image's A1111 parameters text
    preview: bytes | None = None  # PNG of the current x0 estimate of the first image
    error: str | None = None
    error_kind: str | None = None  # "user" (the request was refused by the pipeline) | "internal"
    cancel: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    written_at: float = 0.0  # monotonic time of the last job-file write

    @property
    def progress(self) -> float:
        """Fraction of the job's sampling steps done, 0..1."""
        if self.status in ("done", "interrupted", "failed"):
            return 1.0
        calls = self.request.n_iter
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.call_index + within) / calls)

    def eta_seconds(self) -> float | None:
        if self.started is None or self.status != "running" or self.progress <= 0:
            return None
        elapsed = time.time() - self.started
        return elapsed / self.progress - elapsed

    def state(self, with_preview: bool = True) -> dict:
        """What GET /api/jobs/<id> answers."""
        d = {
            "id": self.id,
            "status": self.status,
            "progress": round(self.progress, 4),
            "eta_seconds": self.eta_seconds(),
            "step": self.step,
            "steps": self.steps,
            "job_no": self.call_index,
            "job_count": self.request.n_iter,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "request": self.request.describe(),
            "images": [
                {"file": name, "url": f"outputs/{name}", "parameters": params}
                for name, params in zip(self.files, self.parameters)
            ],
        }
        if with_preview:
            d["preview"] = base64.b64encode(self.preview).decode() if self.preview else None
        return d


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes of an image with its `parameters` text chunk (A1111's PNG info) when it has one."""
    info = PngImagePlugin.PngInfo()
    if image.info.get("parameters"):
        info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def _interrupted_parameters(job: Job, seed: int) -> str:
    """A1111 parameters text for an image decoded from an interrupted run (its x0 estimate at that step)."""
    from sfumato.pipelines.metadata import format_parameters

    r = job.request
    params = dict(
        prompt=r.prompt, negative_prompt=r.negative_prompt, steps=r.steps, sampler=r.sampler, karras=r.karras,
        guidance=r.guidance, seed=seed, width=r.width, height=r.height, clip_skip=r.clip_skip, eta=r.eta,
        strength=r.strength, extra={"Interrupted at step": f"{job.step}/{job.steps}"},
    )  # fmt: skip
    try:
        return format_parameters({k: v for k, v in params.items() if v is not None})
    except ValueError:
        return ""


class Worker:
    """Runs jobs one at a time on a daemon thread; `submit` is safe to call from any thread."""

    def __init__(
        self,
        pipe,
        outdir: str | os.PathLike,
        *,
        max_queue: int = 8,
        preview_interval: float = 1.0,
        state_interval: float = 0.25,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.pipe = pipe
        self.outdir = Path(outdir)
        self.jobs_dir = self.outdir / ".jobs"
        self.max_queue = max_queue
        self.preview_interval = preview_interval
        self.state_interval = state_interval
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.current: Job | None = None
        self.completed = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sfumato-worker", daemon=True)
        self._stopping = False
        self._recent: dict[str, Job] = {}  # tracked jobs of this process, newest last (bounded)
        # live previews through the model's tiny preview decoder when it has one (StableDiffusion.preview)
        self._preview = getattr(pipe, "preview", None) or pipe.decode

    # -- public --------------------------------------------------------------------------------------------

    def start(self) -> Worker:
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(exist_ok=True)
        self._prune_job_files()
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job and stop the thread after it (queued jobs are failed)."""
        self._stopping = True
        if self.current is not None:
            self.current.cancel.set()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._finish(job, "failed", error="the server is shutting down", kind="internal")
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self.queue.qsize()

    def submit(self, request: GenerationRequest, *, track: bool = False, save: bool = False) -> Job:
        """Queue a job; raises `QueueFull` when `max_queue` jobs already wait."""
        if self._stopping:
            raise QueueFull("the server is shutting down")
        job = Job(request, track=track, save=save or track)
        if track:
            self._write_state(job, force=True)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            if track:
                (self.jobs_dir / f"{job.id}.json").unlink(missing_ok=True)
            raise QueueFull(
                f"{self.max_queue} jobs are already waiting (the server runs one at a time); retry later"
            ) from None
        if track:
            with self._lock:
                self._recent[job.id] = job
                while len(self._recent) > 256:
                    self._recent.pop(next(iter(self._recent)))
        return job

    def interrupt_current(self) -> bool:
        """A1111's /interrupt: stop the job now running (queued jobs go on)."""
        job = self.current
        if job is None:
            return False
        job.cancel.set()
        return True

    def cancel(self, job_id: str) -> bool:
        """Cancel a tracked job by id, whichever process runs it: a local job directly, any job through a
        `<id>.cancel` file in the shared output folder. False when no such job exists."""
        if not JOB_ID.match(job_id):
            return False
        job = self._recent.get(job_id)
        if job is not None:
            job.cancel.set()
        state = self.jobs_dir / f"{job_id}.json"
        if not state.exists():
            return job is not None
        (self.jobs_dir / f"{job_id}.cancel").touch()
        return True

    def job_state(self, job_id: str) -> dict | None:
        """The state of a tracked job: from memory when this process has it, else from the shared job file."""
        if not JOB_ID.match(job_id):
            return None
        job = self._recent.get(job_id)
        if job is not None:
            return job.state()
        path = self.jobs_dir / f"{job_id}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # -- the thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self._stopping:
                self._finish(job, "failed", error="the server is shutting down", kind="internal")
                continue
            self.current = job
            try:
                self._execute(job)
            finally:
                self.current = None

    def _cancelled(self, job: Job) -> bool:
        if job.cancel.is_set():
            return True
        if job.track and (self.jobs_dir / f"{job.id}.cancel").exists():
            job.cancel.set()
            return True
        return False

    def _execute(self, job: Job) -> None:
        job.status, job.started = "running", time.time()
        self._write_state(job, force=True)
        last = {"denoised": None, "preview_at": 0.0}

        def callback(info: dict) -> None:
            job.step, job.steps = info["i"] + 1, info["steps"]
            # with best of K the rows are every draw, image-major: keep each image's first (its plain draw)
            last["denoised"] = info["denoised"][:: info.get("candidates", 1)]
            now = time.monotonic()
            if self.preview_interval >= 0 and now - last["preview_at"] >= self.preview_interval:
                last["preview_at"] = now
                job.preview = png_bytes(self._preview(info["denoised"][:1])[0])
            self._write_state(job)
            if self._cancelled(job):
                raise Interrupted

        try:
            if self._cancelled(job):
                raise Interrupted
            for k, (method, kwargs) in enumerate(job.request.calls()):
                job.call_index, job.step, job.steps = k, 0, 0
                last["denoised"] = None
                images = getattr(self.pipe, method)(**kwargs, callback=callback, progress=False)
                job.images.extend(images)
            self._save(job)
            self._finish(job, "done")
        except Interrupted:
            # A1111 returns what sampling had reached: decode the x0 estimate of the last finished step
            if last["denoised"] is not None:
                partial = self.pipe.decode(last["denoised"])
                first_seed = job.request.seed + job.call_index * job.request.batch
                for i, im in enumerate(partial):
                    im.info["parameters"] = _interrupted_parameters(job, first_seed + i)
                job.images.extend(partial)
            self._save(job)
            self._finish(job, "interrupted")
        except Exception as e:  # noqa: BLE001 - a failed job must not stop the server
            oom = isinstance(e, torch.OutOfMemoryError)
            user = isinstance(e, (ValueError, TypeError)) and not oom
            msg = f"{type(e).__name__}: {e}"
            if oom:
                msg = f"out of memory while generating ({e}); lower width x height, batch or steps"
            if not user:
                traceback.print_exc()
            job.images.clear()
            self._finish(job, "failed", error=msg, kind="user" if user else "internal")
        finally:
            last.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _save(self, job: Job) -> None:
        job.parameters = [im.info.get("parameters", "") for im in job.images]
        if not job.save:
            return
        for i, im in enumerate(job.images):
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{job.id[:12]}-{i:02d}.png"
            _write_atomic(self.outdir / name, png_bytes(im))
            job.files.append(name)
        if job.track:
            # a tracked job is remembered (for its state) after its request is answered: keep its file
            # names and parameters, not its pixels, or 256 remembered jobs would pin 256 jobs' images
            job.images = []
            job.request.image = job.request.mask = None

    def _finish(self, job: Job, status: str, error: str | None = None, kind: str | None = None) -> None:
        job.status, job.finished, job.error, job.error_kind = status, time.time(), error, kind
        if status == "failed":
            self.failed += 1
            gc.collect()
        else:
            self.completed += 1
        self._write_state(job, force=True)
        (self.jobs_dir / f"{job.id}.cancel").unlink(missing_ok=True)
        if self.current is job:  # before the future: a client that got its answer sees the worker idle
            self.current = None
        if not job.future.done():
            job.future.set_result(job)

    # -- shared job files ------------------------------------------------------------------------------------

    def _write_state(self, job: Job, force: bool = False) -> None:
        if not job.track:
            return
        now = time.monotonic()
        if not force and now - job.written_at < self.state_interval:
            return
        job.written_at = now
        try:
            _write_atomic(self.jobs_dir / f"{job.id}.json", json.dumps(job.state()).encode())
        except OSError:
            traceback.print_exc()  # a full disk must not kill the job; its state is still served from memory

    def _prune_job_files(self, max_age: float = 24 * 3600) -> None:
        cutoff = time.time() - max_age
        for p in self.jobs_dir.glob("*"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except OSError:
                pass
