"""`sfumato serve` / `python -m sfumato.server`: load one model, start the worker, run uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

from sfumato.server.params import Limits

API_KEY_ENV = "SFUMATO_API_KEY"


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `sfumato serve` (the CLI's subparser and `python -m sfumato.server` share them)."""
    d = Limits()
    p.add_argument("--model", default=None,
                   help="a sfumato bundle, diffusers folder or SD .safetensors file (default: the shipped model)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860, as the A1111 webui)")
    p.add_argument("--listen", action="store_true",
                   help="listen on every network interface (0.0.0.0), as the webui's --listen; use with --api-key")
    p.add_argument("--api-key", default=None,
                   help=f"require this key on every route (Bearer, basic-auth password or X-API-Key); the "
                        f"{API_KEY_ENV} environment variable sets it without showing it in the process list")
    p.add_argument("--outdir", default="outputs/server",
                   help="folder for saved images and job state; replicas behind a load balancer share it")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights' dtype (auto: float16 on CUDA, else float32)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode in overlapping 512 px tiles, so decoding memory no longer grows with the image")
    p.add_argument("--int8", action="store_true",
                   help="int8 Linear layers in the U-Net and text encoder (CPU, float32 only; approximate)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: faster steps after minutes of compilation on the first request "
                        "at each image size")
    p.add_argument("--max-queue", type=int, default=8, help="jobs that may wait; more get HTTP 429 (default 8)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"cap on width x height (default {d.max_pixels})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"cap on steps (default {d.max_steps})")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"cap on images per request (default {d.max_images})")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                   help=f"cap on a request body in MiB, larger gets 413 (default {d.max_upload_bytes / 2**20:g})")
    p.add_argument("--preview-interval", type=float, default=1.0,
                   help="seconds between live previews of the image being sampled (default 1; -1: none)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    return p  # fmt: skip


def _device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def build_app(args: argparse.Namespace):
    """Load the model and create the app from parsed `serve` arguments (what serve_main runs)."""
    try:
        from sfumato.server.app import create_app, is_loopback
    except ModuleNotFoundError as e:  # fastapi / uvicorn are the `serve` extra
        raise SystemExit(
            f"sfumato serve needs {e.name}, which is not installed; pip install 'sfumato[serve]'"
        ) from None
    import sfumato
    from sfumato.pipelines import default_model
    from sfumato.pipelines.stable_diffusion import StableDiffusion

    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and api_key is None:
        print(
            f"WARNING: listening on {host}:{args.port} without --api-key: anyone who can reach this machine "
            f"can generate images and read the output folder. Set --api-key or {API_KEY_ENV}.",
            file=sys.stderr,
        )
    path = args.model or default_model()
    device, dtype = _device_dtype(args.device, args.dtype)
    pipe = sfumato.load(path, device=device, dtype=dtype)
    if not isinstance(pipe, StableDiffusion):
        raise SystemExit(f"{path} is not a text-to-image model (it loaded as {type(pipe).__name__})")
    pipe.optimize(vae_tiling=args.vae_tiling, int8=args.int8, compile=args.compile)  # all off by default
    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                    max_upload_bytes=int(args.max_upload_mb * 2**20))  # fmt: skip
    allowed = ("localhost", "127.0.0.1", "::1") if is_loopback(host) else None
    app = create_app(pipe, outdir=args.outdir, limits=limits, api_key=api_key, allowed_hosts=allowed,
                     max_queue=args.max_queue, preview_interval=args.preview_interval)  # fmt: skip
    return app, host


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until interrupted (`sfumato serve ...`)."""
    app, host = build_app(args)
    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    print(f"sfumato: serving on http://{shown}:{args.port}/ (A1111 API /sdapi/v1, OpenAI API /v1/images)",
          file=sys.stderr, flush=True)  # fmt: skip
    # one process, one event loop: the model is loaded once and the worker thread runs the jobs
    uvicorn.run(app, host=host, port=args.port, log_level=args.log_level, server_header=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sfumato.server",
        description="HTTP service: AUTOMATIC1111- and OpenAI-compatible image APIs and a web page",
    )
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve_main(args)
    except (ValueError, OSError) as e:  # a missing or unreadable model: one line, exit 2 (as `sfumato` does)
        print(f"sfumato serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
