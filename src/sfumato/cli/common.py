"""What the ``sfumato`` commands share: option tables, defaults read from the pipelines' signatures, checks
of user input, model loading and output file naming."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    "candidates": (
        ("--candidates",),
        {"type": int, "metavar": "K"},
        "best of K: draw each image K times and keep the draw the model's own denoiser explains best "
        "(default: the model's own, else 1)",
    ),
    "clip_skip": (
        ("--clip-skip",),
        {"type": int, "metavar": "N"},
        "text encoder layers to skip from the last (0 = last layer; A1111's 'Clip skip: 2' is 1)",
    ),
}
_GENERATE = ("negative_prompt", "steps", "guidance", "sampler", "karras", "eta", "seed", "width", "height",
             "batch", "clip_skip", "candidates")  # fmt: skip
_IMG2IMG = ("strength", *(n for n in _GENERATE if n != "candidates"))
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
    from ..diffusion.samplers import SAMPLERS
    from ..pipelines.metadata import SAMPLER_NAMES

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
    shipped = "shapes model" if task == "text-to-image" else "shapes model's CLIP"
    p.add_argument("--model", metavar="PATH", help=f"{model_help} (default: the {shipped} shipped in the package)")
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
    from ..pipelines.metadata import SAMPLER_NAMES

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
    from ..pipelines.images import check_size

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
    from ..pipelines.stable_diffusion import StableDiffusion

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
    from ..pipelines.metadata import CANDIDATES_KEY, read_parameters

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
    if command == "generate":  # an image made without best of K (any other program's too) was drawn once
        k = extra.pop(CANDIDATES_KEY, "1")
        try:
            params["candidates"] = int(k)
        except ValueError:
            raise ValueError(f"{path} records {CANDIDATES_KEY}: {k!r}, not a whole number") from None
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
    from ..pipelines.metadata import parse_parameters, save_png

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
    from ..pipelines.metadata import parse_parameters

    paths = []
    for im in images:
        seed = parse_parameters(im.info["parameters"])["seed"]
        paths.append(_write_png(im, _out_file(out, f"{seed}-{_slug(prompt)}", ".png"), extra))
    return paths


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
