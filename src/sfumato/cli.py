"""The ``sfumato`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def _toy(args: argparse.Namespace) -> int:
    import torch

    from .data.toy import toy_data
    from .diffusion.forward import q_sample
    from .diffusion.samplers import SAMPLERS
    from .diffusion.schedules import sampling_sigmas
    from .eval.metrics import sliced_wasserstein
    from .eval.plots import line_plot, scatter_panels
    from .training.toy import ToyTrainConfig, train_toy

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = ToyTrainConfig(data=args.data, steps=args.train_steps, seed=args.seed, prediction=args.prediction)
    out = Path(args.out or f"outputs/toy-{args.data}")
    t0 = time.time()
    den, losses = train_toy(cfg, progress=sys.stderr.isatty())
    train_s = time.time() - t0
    schedule = den.schedule

    # forward process: x_t ~ q(x_t | x0) at a few t
    g = torch.Generator().manual_seed(args.seed + 1)
    x0 = toy_data(args.data, args.samples, seed=args.seed + 1)  # held-out data
    ts = [0, 50, 150, 300, 600, schedule.num_timesteps - 1]
    panels = [
        (f"t={t}", q_sample(x0, t, schedule.alphas_cumprod, torch.randn(x0.shape, generator=g))) for t in ts
    ]
    scatter_panels(panels, out / "forward.png")

    # reverse process: from noise to data, snapshots along the way
    sigmas = sampling_sigmas(schedule, args.sample_steps, spacing="trailing")
    x = torch.randn(args.samples, 2, generator=g) * math.sqrt(1 + float(sigmas[0]) ** 2)
    shots = {0: ("noise", x / math.sqrt(1 + float(sigmas[0]) ** 2))}
    # most of the structure appears at low noise, so snapshot the first step below each of these σ
    marks = [3.0, 1.0, 0.3, 0.1]

    def snapshot(d):
        if marks and d["sigma_next"] < marks[0]:
            while marks and d["sigma_next"] < marks[0]:
                marks.pop(0)
            vp = d["x"] / math.sqrt(1 + d["sigma_next"] ** 2)  # show the variance-preserving sample
            shots[d["i"] + 1] = (f"step {d['i'] + 1}/{args.sample_steps}, sigma={d['sigma_next']:.2f}", vp)

    with torch.no_grad():
        samples = SAMPLERS[args.sampler](den, x, sigmas, generator=g, callback=snapshot)
    shots[args.sample_steps] = (f"samples ({args.sampler}, {args.sample_steps} steps)", samples)
    panels = [shots[k] for k in sorted(shots)] + [("held-out data", x0)]
    scatter_panels(panels, out / "reverse.png")
    line_plot(losses, out / "loss.png", title=f"training loss ({args.data})")

    noise = torch.randn(args.samples, 2, generator=g)
    report = {
        "data": args.data,
        "train_steps": cfg.steps,
        "train_seconds": round(train_s, 1),
        "sampler": args.sampler,
        "sample_steps": args.sample_steps,
        "sliced_wasserstein_samples": round(sliced_wasserstein(samples, x0), 4),
        "sliced_wasserstein_noise": round(sliced_wasserstein(noise, x0), 4),
        "pngs": [str(out / n) for n in ("forward.png", "reverse.png", "loss.png")],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"{args.data}: trained {cfg.steps} steps in {train_s:.1f}s; sliced Wasserstein to held-out data: "
        f"samples {report['sliced_wasserstein_samples']:.4f}, pure noise {report['sliced_wasserstein_noise']:.4f}"
    )
    print(f"wrote {out}/forward.png, reverse.png, loss.png, report.json")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .checkpoints.bundle import Bundle, save_bundle
    from .checkpoints.diffusers_folder import save_diffusers
    from .checkpoints.native import save_model
    from .checkpoints.single_file import load_any

    t0 = time.time()
    tokenizer = None
    if args.tokenizer:
        from .text.tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    loaded = load_any(args.src, prediction=args.prediction, act=args.act, tokenizer=tokenizer)
    dst = Path(args.dst)
    if isinstance(loaded, Bundle):
        written = save_diffusers(loaded, dst) if args.to == "diffusers" else save_bundle(loaded, dst)
        what = f"Stable Diffusion bundle ({loaded.schedule.prediction}-prediction)"
    elif args.to == "diffusers":
        raise SystemExit(
            f"{args.src} holds a {type(loaded).__name__}, not a text-to-image bundle; only bundles export to "
            "diffusers folders. Use --to native"
        )
    else:
        if dst.suffix != ".safetensors":
            dst = dst / "model.safetensors" if dst.is_dir() else dst.with_suffix(".safetensors")
        written = [save_model(loaded, dst)]
        what = type(loaded).__name__
    print(f"read {args.src}: {what} in {time.time() - t0:.1f}s; wrote ({args.to}):")
    for path in written:
        print(f"  {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Generation commands: generate, img2img, inpaint, invert, interpolate, classify
#
# Every sampling option defaults to None on the command line, so that "given explicitly" can be told from
# "left out": explicit options win over what a PNG (--from-png) or a noise file (--latents) recorded, and
# those over the pipeline method's own defaults, read from its signature (`_api_defaults`), so the CLI and
# the Python API cannot drift apart.

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_OUT = "outputs"
DEFAULT_FPS = 8  # interpolate's GIF frame rate
# Stable Diffusion's VAE downsamples by 8. Sizes are checked against it before a model is loaded, so a typo
# fails in a moment rather than after reading gigabytes of weights; the pipeline checks the loaded VAE's own
# factor again.
SD_LATENT_FACTOR = 8
# A1111 settings we write ourselves and read back: the noise file a --latents image started from.
INIT_NOISE_KEY = "Init noise"
# --out names that are meant as files of another kind, not as folders
_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".safetensors", ".json")

# (API parameter name, flags, argparse keyword arguments, help). Defaults are left out here on purpose.
_SAMPLING_OPTIONS = {
    "negative_prompt": (("--negative",), {"metavar": "TEXT"}, "negative prompt"),
    "strength": (
        ("--strength",),
        {"type": float, "metavar": "X"},
        "how far to move from the input image, in (0, 1]",
    ),
    "steps": (("--steps",), {"type": int, "metavar": "N"}, "sampling steps"),
    "guidance": (
        ("--guidance",),
        {"type": float, "metavar": "X"},
        "classifier-free guidance scale, >= 1 (1 = off; default: the model's own, else 7.5)",
    ),
    "sampler": (("--sampler",), {"choices": None}, "sampler"),  # choices filled in by _add_sampling_options
    "karras": (("--karras",), {"action": argparse.BooleanOptionalAction}, "Karras et al. 2022 sigma spacing"),
    "eta": (
        ("--eta",),
        {"type": float, "metavar": "X"},
        "noise of ddim / euler_ancestral steps (default: the sampler's own)",
    ),
    "seed": (("--seed",), {"type": int, "metavar": "N"}, "seed of the first image; image i gets seed + i"),
    "width": (("--width",), {"type": int, "metavar": "PX"}, "image width in pixels, a multiple of 8"),
    "height": (("--height",), {"type": int, "metavar": "PX"}, "image height in pixels, a multiple of 8"),
    "batch": (("--batch",), {"type": int, "metavar": "N"}, "images per prompt"),
    "clip_skip": (
        ("--clip-skip",),
        {"type": int, "metavar": "N"},
        "text encoder layers to skip from the last (0 = last layer; A1111's 'Clip skip: 2' is 1)",
    ),
}
_GENERATE = ("negative_prompt", "steps", "guidance", "sampler", "karras", "eta", "seed", "width", "height",
             "batch", "clip_skip")  # fmt: skip
_IMG2IMG = ("strength", *_GENERATE)
_INPAINT = tuple(n for n in _IMG2IMG if n not in ("width", "height"))  # inpaint keeps the image's size


def default_model(task: str = "text-to-image") -> str:
    """The model used when --model is not given: the one shipped inside the package."""
    from sfumato.pipelines import default_model as shipped

    try:
        return str(shipped(task))
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def _api_defaults(method) -> dict:
    """The keyword defaults of a pipeline method, as its signature states them."""
    import inspect

    params = inspect.signature(method).parameters.items()
    return {k: p.default for k, p in params if p.default is not inspect.Parameter.empty}


def _describe_default(value) -> str:
    if value is None:
        return ""
    if value == "":
        return " (default: none)"
    if isinstance(value, bool):
        return " (default: on)" if value else " (default: off)"
    if isinstance(value, tuple):
        return f" (default: {' '.join(map(repr, value))})"
    return f" (default: {value})"


def _add_sampling_options(p: argparse.ArgumentParser, method, names: tuple[str, ...]) -> None:
    from .diffusion.samplers import SAMPLERS
    from .pipelines.metadata import SAMPLER_NAMES

    defaults = _api_defaults(method)
    for name in names:
        flags, kwargs, text = _SAMPLING_OPTIONS[name]
        kwargs = dict(kwargs)
        if name == "sampler":
            kwargs["choices"] = list(SAMPLERS)
        if name in ("width", "height"):
            text += " (default: the model's image size)"
        elif name == "seed":
            text += " (default: random)"
        elif name == "karras":
            lacking = " and ".join(s for s in SAMPLERS if (s, True) not in SAMPLER_NAMES)
            # None: the pipeline picks per sampler; either way samplers without a Karras variant get none
            on = defaults[name] is None or defaults[name]
            text += f" (default: on, except for {lacking}, which lack it)" if on else " (default: off)"
        else:
            text += _describe_default(defaults.get(name))
        p.add_argument(*flags, dest=name, default=None, help=text, **kwargs)


def _add_common(p: argparse.ArgumentParser, out_help: str, task: str = "text-to-image") -> None:
    if task == "text-to-image":
        model_help = "a sfumato bundle, a diffusers folder or an SD 1.x/2.x .safetensors/.ckpt file"
    else:
        model_help = "a CLIP model: a transformers folder, an OpenAI / open_clip state dict or a native file"
    p.add_argument(
        "--model", metavar="PATH", help=f"{model_help} (required for now: no model is shipped yet)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
    if task == "text-to-image":
        p.add_argument(
            "--prediction",
            choices=["eps", "v"],
            help="what the U-Net predicts (single files cannot tell; default eps)",
        )
    p.add_argument("--out", metavar="PATH", help=out_help)


def _explicit(args: argparse.Namespace, names) -> dict:
    """The options the command line gave (every sampling option defaults to None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _resolve(method, names, explicit: dict, recorded: dict) -> dict:
    """Keyword arguments for `method`: explicit options, else recorded ones (a PNG's or a noise file's),
    else the method's defaults. Karras spacing and eta belong to a sampler, so they follow it: a recorded or
    default karras=True is dropped for samplers without a Karras variant (a default of None leaves the
    choice to the pipeline), and a recorded eta is dropped when the command line picks another sampler."""
    from .pipelines.metadata import SAMPLER_NAMES

    defaults = _api_defaults(method)
    kw = {n: defaults[n] for n in names if n in defaults}
    kw |= {n: v for n, v in recorded.items() if n in names}
    kw |= explicit
    if "sampler" in kw and kw.get("karras") is not None and "karras" not in explicit:
        kw["karras"] = kw["karras"] and (kw["sampler"], True) in SAMPLER_NAMES
    if "eta" in recorded and "eta" not in explicit and kw.get("sampler") != recorded.get("sampler"):
        kw["eta"] = None
    return kw


def _need_prompt(kw: dict, how: str) -> None:
    if kw.get("prompt") is None:
        raise ValueError(f"no prompt: give PROMPT, or {how}")


def _check_size_early(kw: dict) -> None:
    from .pipelines.images import check_size

    if kw.get("width") is not None or kw.get("height") is not None:
        check_size(
            kw.get("width") or SD_LATENT_FACTOR, kw.get("height") or SD_LATENT_FACTOR, SD_LATENT_FACTOR
        )


def _need_file(path: str, what: str) -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such {what}: {path}")
    if p.is_dir():
        raise ValueError(f"{path} is a folder; expected the {what}")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r} ({e}); use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def _load_sd(args: argparse.Namespace):
    from .pipelines.stable_diffusion import StableDiffusion

    path = args.model or default_model()
    return StableDiffusion.from_pretrained(
        path, device=_device(args.device), dtype=_torch_dtype(args.dtype), prediction=args.prediction
    )


def _warn(message: str) -> None:
    print(f"sfumato: warning: {message}", file=sys.stderr)


def _check_model_hash(pipe, recorded_hash: str | None, source: str) -> None:
    """Warn (never fail) when the weights differ from the ones that made `source`: the pixels will too."""
    if recorded_hash and pipe.model_hash and recorded_hash.lower() != pipe.model_hash.lower():
        _warn(
            f"{source} was made by a model with hash {recorded_hash}, but the loaded model's hash is "
            f"{pipe.model_hash}; the result will differ from it"
        )


def _read_png(path: str, command: str) -> dict:
    """The settings a PNG recorded, with the checks that regenerating it with `command` needs."""
    from .pipelines.metadata import read_parameters

    _need_file(path, "PNG file")
    params = read_parameters(path)
    if command == "generate" and params.get("strength") is not None:
        raise ValueError(
            f"{path} is an image-to-image or inpainting result (Denoising strength: {params['strength']}); "
            f"regenerating it needs its source image: sfumato img2img SOURCE --from-png {path} "
            f"(or sfumato inpaint SOURCE MASK --from-png {path})"
        )
    extra = dict(params.get("extra") or {})
    params["init_noise"] = extra.pop(INIT_NOISE_KEY, None)
    if extra:
        _warn(f"{path} also records settings sfumato does not use, ignored: {', '.join(extra)}")
    if "seed" not in params:
        _warn(f"{path} records no seed; a random one is used, so the image will differ")
    return params


def _read_noise(path: str):
    """A noise tensor (N, C, h, w) and the settings stored with it by `sfumato invert`."""
    from safetensors import SafetensorError, safe_open

    _need_file(path, "noise file")
    try:
        with safe_open(path, framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            if "noise" not in keys and len(keys) != 1:
                raise ValueError(
                    f"{path} holds tensors {keys}; expected one named 'noise' (what sfumato invert writes)"
                )
            noise = f.get_tensor("noise" if "noise" in keys else keys[0])
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if noise.ndim == 3:
        noise = noise[None]  # (C, h, w) -> (1, C, h, w)
    if noise.ndim != 4:
        raise ValueError(f"{path}: expected noise of shape (N, C, h, w), got {tuple(noise.shape)}")
    recorded: dict = {}
    try:
        for key, cast in (("prompt", str), ("steps", int), ("guidance", float), ("clip_skip", int),
                          ("sampler", str)):  # fmt: skip
            if key in meta:
                recorded[key] = cast(meta[key])
    except ValueError:
        raise ValueError(f"{path}: metadata {key}={meta[key]!r} is not a valid {cast.__name__}") from None
    if "sampler" in recorded:
        recorded["karras"] = meta.get("karras", "false").lower() == "true"
    return noise, recorded, meta.get("model_hash")


def _slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe ASCII rendering of a prompt: 'A red fox, snow!' -> 'a-red-fox-snow'."""
    import re
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "image"


def _reserve(path: Path) -> Path:
    """`path`, or `stem-2.ext`, `stem-3.ext`, ...: the first name not taken, claimed by creating the file
    empty with O_EXCL, so outputs are never overwritten even by two runs writing into one folder at once.
    The caller replaces the empty file atomically (save_png / save_tensors write and rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    i = 1
    while True:
        candidate = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        try:
            with open(candidate, "x"):
                return candidate
        except FileExistsError:
            i += 1


def _out_file(out: str | None, name: str, suffix: str) -> Path:
    """--out as a file when it ends in `suffix`, else as the folder that `name + suffix` goes into."""
    out_path = Path(out or DEFAULT_OUT)
    if out_path.suffix.lower() == suffix:
        return out_path
    if out_path.suffix.lower() in _FILE_SUFFIXES and not out_path.is_dir():  # not a folder named "x.jpg"
        raise ValueError(f"--out {out}: this command writes {suffix} files; give a {suffix} name or a folder")
    return out_path / f"{name}{suffix}"


def _write_png(image, path: Path, extra: dict | None = None) -> Path:
    """Save a pipeline's image at `path` (or the next free name, see `_reserve`) with the generation
    parameters it carries, plus `extra` A1111 settings."""
    from .pipelines.metadata import parse_parameters, save_png

    parameters = image.info["parameters"]
    if extra:
        parameters = parse_parameters(parameters)
        parameters["extra"] = {**parameters["extra"], **extra}
    path = _reserve(path)
    try:
        return save_png(image, path, parameters)
    except BaseException:
        path.unlink(missing_ok=True)  # the empty placeholder
        raise


def _save_pngs(images, out: str | None, prompt: str, extra: dict | None = None) -> list[Path]:
    """Write each image to `<out>/<seed>-<slug of prompt>.png` (or to --out FILE.png, numbered after the
    first); returns the paths."""
    from .pipelines.metadata import parse_parameters

    paths = []
    for im in images:
        seed = parse_parameters(im.info["parameters"])["seed"]
        paths.append(_write_png(im, _out_file(out, f"{seed}-{_slug(prompt)}", ".png"), extra))
    return paths


def _generate(args: argparse.Namespace) -> int:
    from .pipelines.stable_diffusion import StableDiffusion

    names = ("prompt", *_GENERATE)
    recorded: dict = {}
    latents, png, noise_hash = None, None, None
    if args.latents:
        latents, noise_settings, noise_hash = _read_noise(args.latents)
        recorded |= noise_settings
    if args.from_png:
        png = _read_png(args.from_png, "generate")
        if png["init_noise"] and not args.latents:
            raise ValueError(
                f"{args.from_png} started from the noise file {png['init_noise']!r}, not from its seed; "
                "pass --latents PATH to regenerate it"
            )
        recorded |= png
    explicit = _explicit(args, names)
    kw = _resolve(StableDiffusion.generate, names, explicit, recorded)
    _need_prompt(kw, "--from-png IMAGE.png or --latents NOISE.safetensors from sfumato invert")
    _out_file(args.out, "", ".png")  # a bad --out fails now, not after sampling
    _check_size_early(kw)
    pipe = _load_sd(args)
    if png is not None:
        _check_model_hash(pipe, png.get("model_hash"), args.from_png)
    if latents is not None:
        _check_model_hash(pipe, noise_hash, args.latents)
        f = pipe.latent_factor
        kw["height"] = explicit.get("height", latents.shape[2] * f)  # (N, C, h, w): the noise sets the size
        kw["width"] = explicit.get("width", latents.shape[3] * f)
        kw["batch"] = explicit.get("batch", latents.shape[0])
    images = pipe.generate(**kw, latents=latents)
    extra = {INIT_NOISE_KEY: Path(args.latents).name} if args.latents else None
    for path in _save_pngs(images, args.out, kw["prompt"], extra):
        print(path)
    return 0


def _img2img(args: argparse.Namespace) -> int:
    from .pipelines.stable_diffusion import StableDiffusion

    names = ("prompt", *_IMG2IMG)
    _need_file(args.image, "image file")
    png = _read_png(args.from_png, "img2img") if args.from_png else {}
    kw = _resolve(StableDiffusion.image_to_image, names, _explicit(args, names), png)
    _need_prompt(kw, "--from-png IMAGE.png")
    _out_file(args.out, "", ".png")  # a bad --out fails now, not after sampling
    _check_size_early(kw)
    pipe = _load_sd(args)
    if png:
        _check_model_hash(pipe, png.get("model_hash"), args.from_png)
    images = pipe.image_to_image(args.image, **kw)
    for path in _save_pngs(images, args.out, kw["prompt"]):
        print(path)
    return 0


def _inpaint(args: argparse.Namespace) -> int:
    from .pipelines.stable_diffusion import StableDiffusion

    names = ("prompt", *_INPAINT)
    _need_file(args.image, "image file")
    _need_file(args.mask, "mask file")
    png = _read_png(args.from_png, "inpaint") if args.from_png else {}
    kw = _resolve(StableDiffusion.inpaint, names, _explicit(args, names), png)
    _need_prompt(kw, "--from-png IMAGE.png")
    _out_file(args.out, "", ".png")  # a bad --out fails now, not after sampling
    pipe = _load_sd(args)
    if png:
        _check_model_hash(pipe, png.get("model_hash"), args.from_png)
    images = pipe.inpaint(args.image, args.mask, **kw)
    for path in _save_pngs(images, args.out, kw["prompt"]):
        print(path)
    return 0


def _invert(args: argparse.Namespace) -> int:
    import numpy as np

    from .checkpoints.native import save_tensors
    from .pipelines.images import load_image
    from .pipelines.stable_diffusion import StableDiffusion

    names = ("prompt", "steps", "guidance", "clip_skip")
    _out_file(args.out, "", ".safetensors")
    _need_file(args.image, "image file")
    kw = _resolve(StableDiffusion.invert, names, _explicit(args, names), {})
    pipe = _load_sd(args)
    # (1, C, h, w), unit variance. Contiguous, as the file will hold it: generate's result depends on the
    # latents' memory layout (a channels-last tensor takes other conv kernels), and the check must match
    # what `generate --latents FILE` gives.
    noise = pipe.invert(args.image, **kw).contiguous()
    f = pipe.latent_factor
    height, width = noise.shape[2] * f, noise.shape[3] * f
    # What `sfumato generate --latents` needs to regenerate the image: DDIM with the same prompt, steps,
    # guidance and clip skip (Song et al. 2021, sec. 4.3). safetensors metadata values are strings.
    meta = {
        "prompt": kw["prompt"], "steps": str(kw["steps"]), "guidance": repr(float(kw["guidance"])),
        "clip_skip": str(kw["clip_skip"]), "sampler": "ddim", "karras": "false", "width": str(width),
        "height": str(height), "image": Path(args.image).name,
    }  # fmt: skip
    if pipe.model_hash:
        meta["model_hash"] = pipe.model_hash
    path = _reserve(_out_file(args.out, f"{Path(args.image).stem}-noise", ".safetensors"))
    try:
        save_tensors({"noise": noise}, path, meta)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    print(path)
    if args.check:
        images = pipe.generate(
            kw["prompt"], steps=kw["steps"], guidance=kw["guidance"], clip_skip=kw["clip_skip"],
            sampler="ddim", karras=False, seed=0, width=width, height=height, latents=noise,
        )  # fmt: skip
        check = _write_png(images[0], path.with_name(f"{path.stem}-check.png"), {INIT_NOISE_KEY: path.name})
        a = np.asarray(images[0], dtype=np.float64)
        b = np.asarray(load_image(args.image), dtype=np.float64)
        print(check)
        print(f"mean absolute pixel error of the reconstruction: {np.abs(a - b).mean():.3f} (of 255)")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    import secrets

    from .pipelines.metadata import save_png
    from .pipelines.stable_diffusion import StableDiffusion

    names = ("frames", "negative_prompt", "steps", "guidance", "sampler", "karras", "width", "height",
             "clip_skip", "batch")  # fmt: skip
    kw = _resolve(StableDiffusion.interpolate, names, _explicit(args, names), {})
    if not args.fps > 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    _check_size_early(kw)
    seeds = args.seeds or [secrets.randbits(31)]  # one seed: the walk is through the prompts only
    pipe = _load_sd(args)
    frames = pipe.interpolate(args.prompts, seeds, **kw)
    folder = _reserve_folder(
        Path(args.out or DEFAULT_OUT) / f"{seeds[0]}-{_slug(args.prompts[0])}-interpolation"
    )
    for i, im in enumerate(frames):
        save_png(im, folder / f"frame-{i:03d}.png")
    gif = folder / f"{folder.name}.gif"
    # GIF stores frame times in centiseconds; PIL rounds the milliseconds given here.
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=1000 / args.fps, loop=0)
    print(folder)
    print(gif)
    return 0


def _reserve_folder(path: Path) -> Path:
    """A new folder at `path`, or `path-2`, `path-3`, ... when that exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    i = 1
    while True:
        candidate = path if i == 1 else path.with_name(f"{path.name}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            i += 1


def _classify(args: argparse.Namespace) -> int:
    from .pipelines.clip import DEFAULT_TEMPLATES, CLIPPipeline

    for image in args.images:
        _need_file(image, "image file")
    if args.templates is None:
        templates = _api_defaults(CLIPPipeline.classify)["templates"]
    elif args.templates == ["ensemble"]:
        templates = "ensemble"
    elif args.templates == ["default"]:
        templates = DEFAULT_TEMPLATES
    else:
        templates = tuple(args.templates)
    path = args.model or default_model("classification")
    pipe = CLIPPipeline.from_pretrained(path, _device(args.device), _torch_dtype(args.dtype))
    results = pipe.classify(args.images, args.labels, templates=templates)
    report = [
        {"image": str(image), "top": r.top, "probs": dict(r.ranked())}
        for image, r in zip(args.images, results)
    ]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(label) for label in args.labels)
        for item in report:
            print(f"{item['image']}: {item['top']}")
            for label, prob in item["probs"].items():
                print(f"  {label:<{width}}  {prob:.4f}")
    if args.out:
        out = _reserve(Path(args.out))
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(out, file=sys.stderr if args.json else sys.stdout)
    return 0


def _clip_for_eval(args: argparse.Namespace, model_path: Path, pipe):
    """The CLIP (both towers) that `eval shapes` scores with: --clip, else MODEL/clip.safetensors.

    A file's tokenizer is the `tokenizer/` folder beside it (how `sfumato train clip` exports one), else the
    text-to-image bundle's own (its text encoder is that CLIP's text tower); a folder brings its own."""
    from .pipelines.clip import CLIPPipeline

    if args.no_clip:
        return None, None
    path = Path(args.clip) if args.clip else model_path / "clip.safetensors"
    if not path.exists():
        if args.clip:
            raise FileNotFoundError(f"no such CLIP model: {args.clip}")
        raise ValueError(
            f"{model_path} has no clip.safetensors for the zero-shot and Frechet metrics; pass --clip PATH (a "
            "CLIP with both towers, e.g. runs/NAME/clip/final/clip.safetensors), or --no-clip to skip them"
        )
    tokenizer = None
    if path.is_file():
        from .text.tokenizer import CLIPTokenizer

        beside = path.parent / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(beside) if beside.is_dir() else pipe.tokenizer
    clip = CLIPPipeline.from_pretrained(path, _device(args.device), _torch_dtype(args.dtype), tokenizer=tokenizer)
    return clip, path


def _eval_shapes(args: argparse.Namespace) -> int:
    from .eval.shapes import evaluate_shapes, format_table
    from .pipelines.stable_diffusion import StableDiffusion

    defaults = _api_defaults(StableDiffusion.generate)
    guidance = defaults["guidance"] if args.guidance is None else args.guidance
    sampler = defaults["sampler"] if args.sampler is None else args.sampler
    for name, value, least in (("--steps", args.steps, 1), ("--seeds", args.seeds, 1),
                               ("--limit", args.limit, 1), ("--fd-images", args.fd_images, 0)):  # fmt: skip
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if args.fd_images == 1:
        raise ValueError("--fd-images must be 0 (skip the Frechet distance) or >= 2, got 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for report.json and contact_sheet.png")
    model_path = Path(args.model or default_model())
    pipe = _load_sd(argparse.Namespace(**{**vars(args), "model": str(model_path)}))
    clip, clip_path = _clip_for_eval(args, model_path, pipe)
    report, sheet = evaluate_shapes(
        pipe, clip=clip, seeds=args.seeds, steps=args.steps, guidance=guidance, sampler=sampler,
        seed=args.seed, limit=args.limit, fd_images=args.fd_images if clip is not None else 0,
        real_images=args.real_images, progress=sys.stderr.isatty(),
    )  # fmt: skip
    report = {
        "model": str(model_path), "model_hash": pipe.model_hash,
        "clip": str(clip_path) if clip_path else None,
        "clip_hash": _hash_or_none(clip_path),
        **report,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    sheet.save(out / "contact_sheet.png")
    s = report["settings"]
    print(
        f"sfumato eval shapes (prompt set v{report['prompt_set_version']}, {report['n_prompts']} prompts x "
        f"{s['seeds_per_prompt']} seeds; {s['steps']} steps, guidance {s['guidance']}, {s['sampler']})"
    )
    print(format_table(report["rates"]))
    for name, goal in report["goals"].items():
        value = "-" if goal["value"] is None else f"{100 * goal['value']:.1f}%"
        verdict = {True: "met", False: "NOT met", None: "n/a"}[goal["met"]]
        print(f"  goal {name:<17} {value:>7} (target {100 * goal['target']:.0f}%, {goal['over']}): {verdict}")
    m = report["metrics"]
    if "vae_psnr" in m:
        recon = m["checker_on_vae_reconstructions"]
        print(f"VAE reconstruction PSNR {m['vae_psnr']['mean_db']:.2f} dB ({m['real_images']['n']} real images); "
              f"checker on them: all {100 * recon['all']:.1f}%, shape {100 * recon['shape']:.1f}%")  # fmt: skip
    if "clip_zero_shot" in m:
        z = m["clip_zero_shot"]
        print(f"CLIP zero-shot on real images: colour {100 * z['color']['accuracy']:.1f}% (n={z['color']['n']}), "
              f"shape {100 * z['shape']['accuracy']:.1f}% (n={z['shape']['n']})")  # fmt: skip
    if "frechet_clip" in m:
        f = m["frechet_clip"]
        print(f"Frechet distance in CLIP features (n={f['n']}): generated-real {f['generated_vs_real']:.4f}, "
              f"real-real {f['real_vs_real']:.4f} (the estimator's floor at this n)")  # fmt: skip
        if "warning" in f:
            print(f"  warning: {f['warning']}")
    print(f"{report['timing']['total_s']:.0f}s; wrote {out / 'report.json'} and {out / 'contact_sheet.png'}")
    return 0


def _hash_or_none(path: Path | None) -> str | None:
    from .pipelines.metadata import model_hash

    return model_hash(path) if path is not None and path.exists() else None


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .training import recipes as R

    out = Path(args.out)
    if args.task == "pipeline":
        steps = {t: n for t, n in (("vae", args.vae_steps), ("clip", args.clip_steps), ("ldm", args.ldm_steps),
                                   ("expert", args.expert_steps), ("preview", args.preview_steps)) if n}  # fmt: skip
        R.train_pipeline(args.data, out, args.preset, resume=args.resume, steps=steps)
        return 0
    r = R.recipe(args.task, args.preset)
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr),
                                    ("device", args.device), ("precision", args.precision),
                                    ("num_workers", args.workers), ("seed", args.seed)) if v is not None}  # fmt: skip
    r = replace(r, train=replace(r.train, **overrides))
    if args.image_size:
        r = replace(r, image_size=args.image_size)
    kw = dict(resume=args.resume, until=args.until)
    if args.task == "ldm":
        src = Path(args.text_from) if args.text_from else None
        missing = [n for n, v in (("--vae", args.vae), ("--text-from", src)) if v is None]
        if missing:
            raise ValueError(
                f"sfumato train ldm needs {' and '.join(missing)}: a trained VAE (vae.safetensors) and a CLIP run's "
                "final/ folder (text_encoder.safetensors + tokenizer/); `sfumato train pipeline` does all three"
            )
        kw |= dict(vae=args.vae, text_encoder=src / "text_encoder.safetensors", tokenizer=src / "tokenizer")
    if args.task == "expert":
        if args.base is None:
            raise ValueError("sfumato train expert needs --base: the text-to-image bundle it adds a high-noise U-Net "
                             "to (e.g. a `sfumato train ldm` run's final/)")  # fmt: skip
        kw |= dict(base=args.base)
    if args.task == "preview":
        if args.vae is None:
            raise ValueError("sfumato train preview needs --vae: the VAE to imitate (vae.safetensors, a bundle, a "
                             "diffusers folder or an SD single file)")  # fmt: skip
        kw |= dict(vae=args.vae)
    fn = {"vae": R.train_vae, "clip": R.train_clip, "ldm": R.train_ldm, "expert": R.train_expert,
          "preview": R.train_preview, "ddpm": R.train_ddpm}[args.task]  # fmt: skip
    result = fn(args.data, out, r, **kw)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (and writes)
        return 0
    print(f"step {result.step}: {result.images_per_s:.1f} images/s; checkpoint {result.checkpoint}")
    for path in result.exported:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .data.toy import TOY_DATASETS
    from .diffusion.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="sfumato", description="Text-to-image diffusion from scratch.")
    p.add_argument("--version", action="version", version=f"sfumato {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    toy = sub.add_parser(
        "toy", help="train a 2-D diffusion model in seconds and draw its forward/reverse process"
    )
    toy.add_argument("data", choices=sorted(TOY_DATASETS), help="which 2-D data set")
    toy.add_argument("--train-steps", type=int, default=3000, help="optimiser steps (default 3000)")
    toy.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpmpp_2m")
    toy.add_argument("--sample-steps", type=int, default=50)
    toy.add_argument("--samples", type=int, default=4000, help="points to sample and compare")
    toy.add_argument("--prediction", choices=["eps", "v", "x0"], default="eps")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--out", help="output folder (default outputs/toy-DATA)")
    toy.set_defaults(func=_toy)

    conv = sub.add_parser(
        "convert",
        help="convert an SD single file, a diffusers folder, a CLIP checkpoint or a bundle to a native bundle "
        "or a diffusers folder",
    )
    conv.add_argument(
        "src", help="a .safetensors/.ckpt file, a diffusers or transformers folder, or a bundle"
    )
    conv.add_argument("dst", help="output folder (a .safetensors file for a single model)")
    conv.add_argument(
        "--prediction",
        choices=["eps", "v"],
        help="what the U-Net predicts (single files cannot tell; default eps)",
    )
    conv.add_argument("--to", choices=["native", "diffusers"], default="native", help="output format")
    conv.add_argument(
        "--act", choices=["quick_gelu", "gelu"], default="quick_gelu", help="activation of a CLIP state dict"
    )
    conv.add_argument(
        "--tokenizer", help="tokenizer folder for an SD single file (default: the shipped CLIP vocabulary)"
    )
    conv.set_defaults(func=_convert, user_errors=True)

    tr = sub.add_parser(
        "train",
        help="train a VAE, CLIP/SigLIP, latent diffusion U-Net, preview decoder or pixel DDPM (or all of "
        "text-to-image)",
        description="Train one component, or `pipeline` = VAE -> CLIP -> latent diffusion -> high-noise expert -> "
        "preview decoder into one bundle. `expert` adds to a model (--base) a second U-Net that takes over its "
        "noisiest steps. `preview` distils a VAE's decoder (--vae) into a tiny one for live previews; copy its "
        "final/preview_decoder.safetensors into a bundle folder to use it. "
        "Runs write checkpoints to OUT/checkpoints and continue exactly with --resume. Under "
        "`torchrun --nproc_per_node N -m sfumato train ...` the run uses DDP (only rank 0 writes).",
    )
    tr.add_argument("task", choices=["vae", "clip", "ldm", "expert", "preview", "ddpm", "pipeline"])
    tr.add_argument("--data", default="shapes", help="an image-caption folder, or shapes[:SEED] (built in)")
    tr.add_argument("--out", required=True, help="run folder (checkpoints, samples, metrics, final model)")
    tr.add_argument("--preset", default="shapes", help="recipe name: shapes (the shipped model's) or tiny")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tr.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    tr.add_argument("--until", type=int, help="stop after this step with a checkpoint (resume later)")
    tr.add_argument("--batch-size", type=int, help="global batch size (default: the recipe's)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    tr.add_argument("--image-size", type=int, help="training image size in pixels (default: the recipe's)")
    tr.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    tr.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    tr.add_argument("--workers", type=int, help="DataLoader worker processes")
    tr.add_argument("--seed", type=int, help="data order and noise seed (default 0)")
    tr.add_argument("--vae", help="ldm: the trained VAE (vae.safetensors); preview: the VAE to imitate (that, or "
                    "any model sfumato loads: a bundle, a diffusers folder, an SD single file)")
    tr.add_argument("--text-from", help="ldm: a CLIP run's final/ folder (text_encoder.safetensors, tokenizer/)")
    tr.add_argument("--base", help="expert: the bundle whose noisiest steps a new U-Net takes over (e.g. an ldm "
                    "run's final/); its VAE and text encoder are used frozen")
    tr.add_argument("--vae-steps", type=int, help="pipeline: VAE steps")
    tr.add_argument("--clip-steps", type=int, help="pipeline: CLIP steps")
    tr.add_argument("--ldm-steps", type=int, help="pipeline: latent diffusion steps")
    tr.add_argument("--expert-steps", type=int, help="pipeline: high-noise expert steps")
    tr.add_argument("--preview-steps", type=int, help="pipeline: preview decoder steps")
    tr.set_defaults(func=_train, user_errors=True)

    from .pipelines.clip import CLIPPipeline
    from .pipelines.stable_diffusion import StableDiffusion

    png_out = (
        "output folder, or a .png file (default outputs/); files are named SEED-PROMPT.png, never overwritten"
    )
    gen = sub.add_parser(
        "generate",
        help="text to image: PNGs that carry their parameters; --from-png regenerates one exactly",
        description="Text to image. Each image is written as a PNG carrying its generation parameters "
        "(AUTOMATIC1111's format), from which --from-png regenerates the same pixels.",
    )
    gen.add_argument("prompt", nargs="?", help="what to draw (optional with --from-png or --latents)")
    _add_sampling_options(gen, StableDiffusion.generate, _GENERATE)
    gen.add_argument(
        "--from-png",
        metavar="PNG",
        help="regenerate the image whose parameters this PNG records (sfumato's, or A1111's with a supported "
        "sampler); options given on the command line override the recorded ones",
    )
    gen.add_argument(
        "--latents",
        metavar="NOISE",
        help="start from this noise (a .safetensors file from sfumato invert) instead of the seed's; the "
        "prompt, steps, guidance and sampler (ddim) stored with it are the defaults",
    )
    _add_common(gen, png_out)
    gen.set_defaults(func=_generate, user_errors=True)

    i2i = sub.add_parser("img2img", help="image to image (SDEdit): redraw an image under a prompt")
    i2i.add_argument("image", help="the input image (resized to --width x --height when given)")
    i2i.add_argument("prompt", nargs="?", help="what to draw (optional with --from-png)")
    _add_sampling_options(i2i, StableDiffusion.image_to_image, _IMG2IMG)
    i2i.add_argument(
        "--from-png",
        metavar="PNG",
        help="redo the img2img result this PNG records, from the same input image",
    )
    _add_common(i2i, png_out)
    i2i.set_defaults(func=_img2img, user_errors=True)

    inp = sub.add_parser("inpaint", help="repaint the white part of a mask under a prompt")
    inp.add_argument("image", help="the input image")
    inp.add_argument("mask", help="the mask: white = repaint, black = keep")
    inp.add_argument("prompt", nargs="?", help="what to draw (optional with --from-png)")
    _add_sampling_options(inp, StableDiffusion.inpaint, _INPAINT)
    inp.add_argument(
        "--from-png",
        metavar="PNG",
        help="redo the inpainting result this PNG records, from the same image and mask",
    )
    _add_common(inp, png_out)
    inp.set_defaults(func=_inpaint, user_errors=True)

    invert_defaults = _api_defaults(StableDiffusion.invert)
    inv = sub.add_parser(
        "invert",
        help="DDIM inversion: the noise from which DDIM regenerates an image (use with generate --latents)",
    )
    inv.add_argument("image", help="the image to invert (sides multiples of 8)")
    inv.add_argument("--prompt", default=None, help="the prompt that describes the image (default: empty)")
    inv.add_argument("--steps", type=int, help=f"DDIM steps (default: {invert_defaults['steps']})")
    inv.add_argument(
        "--guidance",
        type=float,
        help=f"guidance scale (default: {invert_defaults['guidance']}; above 1 the round trip is inexact)",
    )
    inv.add_argument("--clip-skip", dest="clip_skip", type=int, help=_SAMPLING_OPTIONS["clip_skip"][2])
    inv.add_argument(
        "--check",
        action="store_true",
        help="regenerate the image from the noise with DDIM, write it as NOISE-check.png and print the mean "
        "absolute pixel error against the input",
    )
    _add_common(inv, "output folder, or a .safetensors file (default outputs/IMAGE-noise.safetensors)")
    inv.set_defaults(func=_invert, user_errors=True)

    interp = sub.add_parser(
        "interpolate", help="frames and a GIF that walk between prompts and/or seeds (slerp of the noise)"
    )
    interp.add_argument(
        "--prompt", dest="prompts", action="append", required=True, metavar="TEXT",
        help="a keyframe's prompt; repeat for each keyframe (one prompt with several seeds walks the noise)",
    )  # fmt: skip
    interp.add_argument(
        "--seed", dest="seeds", action="append", type=int, metavar="N",
        help="a keyframe's seed; repeat for each keyframe (default: one random seed for all)",
    )  # fmt: skip
    interp_defaults = _api_defaults(StableDiffusion.interpolate)
    interp.add_argument(
        "--frames", type=int,
        help=f"frames per pair of keyframes; K keyframes give (K - 1) * frames + 1 images "
        f"(default: {interp_defaults['frames']})",
    )  # fmt: skip
    interp.add_argument(
        "--fps", type=float, default=DEFAULT_FPS, help=f"GIF frame rate (default: {DEFAULT_FPS})"
    )
    _add_sampling_options(
        interp,
        StableDiffusion.interpolate,
        ("negative_prompt", "steps", "guidance", "sampler", "karras", "width", "height", "clip_skip"),
    )
    interp.add_argument(
        "--batch", type=int, help=f"frames per forward pass (default: {interp_defaults['batch']})"
    )
    _add_common(interp, "folder to create the frames' folder in (default outputs/)")
    interp.set_defaults(func=_interpolate, user_errors=True)

    templates = " ".join(repr(t) for t in _api_defaults(CLIPPipeline.classify)["templates"])
    cls = sub.add_parser("classify", help="zero-shot classification of images with a CLIP model")
    cls.add_argument("images", nargs="+", metavar="IMAGE", help="images to classify")
    cls.add_argument("--labels", nargs="+", required=True, help="the class names to choose between")
    cls.add_argument(
        "--templates",
        nargs="+",
        metavar="TEMPLATE",
        help="prompts with {} for the label, 'ensemble' (OpenAI's 7 ImageNet templates, averaged) or "
        f"'default' (default: {templates})",
    )
    cls.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_common(cls, "also write the results as JSON to this file", task="classification")
    cls.set_defaults(func=_classify, user_errors=True)

    ev = sub.add_parser("eval", help="benchmarks of a trained model")
    ev_sub = ev.add_subparsers(dest="benchmark", required=True)
    shp = ev_sub.add_parser(
        "shapes",
        help="prompt following on the built-in shapes data: colour, shape, size, position, relation, count",
        description="Generate the versioned shapes prompt set (seen and held-out combinations), score every "
        "image with a programmatic checker (colour segmentation, shape templates), and add CLIP zero-shot "
        "accuracy, VAE reconstruction PSNR and the Frechet distance in CLIP features on real images. Writes "
        "OUT/report.json and OUT/contact_sheet.png and prints a table.",
    )
    shp.add_argument("--model", metavar="DIR", help="the text-to-image bundle (default: the shipped model)")
    shp.add_argument(
        "--clip", metavar="PATH",
        help="the CLIP with both towers (default: MODEL/clip.safetensors); a file's tokenizer is the tokenizer/ "
        "folder beside it, else the bundle's",
    )  # fmt: skip
    shp.add_argument("--no-clip", action="store_true", help="skip CLIP zero-shot accuracy and the Frechet distance")
    shp.add_argument("--out", required=True, metavar="DIR", help="folder for report.json and contact_sheet.png")
    shp.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    gen_defaults = _api_defaults(StableDiffusion.generate)
    shp.add_argument("--guidance", type=float, help="guidance scale (default: the model's own, else 7.5)")
    shp.add_argument("--sampler", choices=list(SAMPLERS), help=f"sampler (default {gen_defaults['sampler']})")
    shp.add_argument("--seeds", type=int, default=4, help="images per prompt (default 4)")
    shp.add_argument("--seed", type=int, default=0, help="base seed: image j of prompt k gets seed + k * seeds + j")
    shp.add_argument("--limit", type=int, help="evaluate only this many prompts, spread over the set (a quick look)")
    shp.add_argument(
        "--fd-images", type=int, default=512,
        help="real images (and as many generated from their captions) for the Frechet distance (default 512, "
        "4x the shapes CLIP's 128 feature dimensions; 0 skips)",
    )  # fmt: skip
    shp.add_argument(
        "--real-images", type=int, default=256,
        help="real images for zero-shot accuracy, VAE PSNR and the checker's own check (default 256)",
    )  # fmt: skip
    shp.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda, cuda:1, mps")
    shp.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
    shp.set_defaults(func=_eval_shapes, user_errors=True, prediction=None)

    from .server.main import add_serve_arguments, serve_main  # argparse only; the server's stack loads on run

    srv = sub.add_parser("serve", help="HTTP service: A1111 and OpenAI image APIs and a web page",
                         description="One model loaded once, one generation worker with a bounded queue. "
                         "Listens on 127.0.0.1 unless --listen; see README 'HTTP service'.")  # fmt: skip
    add_serve_arguments(srv)
    srv.set_defaults(func=serve_main, user_errors=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "user_errors", False):
        return args.func(args)
    # Bad input (a wrong size, a missing file, an unreadable PNG, a NaN image) is the user's to fix: one
    # line and exit code 2, as argparse does for bad options. Other exceptions are bugs and keep their
    # traceback.
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"sfumato: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sfumato: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
