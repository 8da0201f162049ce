"""Generation parameters inside PNG files, in the AUTOMATIC1111 webui's format.

A1111 stores a text chunk (tEXt, or iTXt when the text is not latin-1) with the keyword `parameters`:

    <prompt, may span several lines>
    Negative prompt: <negative prompt, may span lines>
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, Size: 512x768, Model hash: 1a2b3c4d5e

The last line is `Key: value` pairs joined by ", "; a value holding a comma, colon, quote or newline is
written JSON-quoted. The "Negative prompt:" line is left out when the negative prompt is empty. Many
tools (the webui's "PNG Info" tab, image hosts) read this chunk, so writing it makes our images
reproducible elsewhere; reading it lets us rerun an image we find.

Our dict uses sfumato's names: prompt, negative_prompt, steps, sampler, karras, guidance, seed, width,
height, model_hash, model, clip_skip, strength, eta, and `extra` for every other pair (kept as strings).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sfumato.checkpoints.atomic import replacing

# (our sampler name, Karras sigmas) -> the webui's display name.
SAMPLER_NAMES: dict[tuple[str, bool], str] = {
    ("ddim", False): "DDIM",
    ("ddpm", False): "DDPM",
    ("euler", False): "Euler",
    ("euler_ancestral", False): "Euler a",
    ("heun", False): "Heun",
    ("dpmpp_2m", False): "DPM++ 2M",
    ("dpmpp_2m", True): "DPM++ 2M Karras",
    ("euler", True): "Euler Karras",
    ("heun", True): "Heun Karras",
    ("euler_ancestral", True): "Euler a Karras",
}
_SAMPLER_KEYS = {name: key for key, name in SAMPLER_NAMES.items()}

_NEGATIVE = "Negative prompt:"
_REQUIRED = ("prompt", "steps", "sampler", "guidance", "seed", "width", "height")
# a pair sfumato writes in "extra": best of K (`StableDiffusion.generate(candidates=K)`), when K > 1
CANDIDATES_KEY = "Candidates"
_OPTIONAL = ("negative_prompt", "karras", "model_hash", "model", "clip_skip", "strength", "eta", "extra")
# Webui keys we turn into typed fields; all other keys go to params["extra"].
_KNOWN_KEYS = (
    "Steps",
    "Sampler",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "Clip skip",
    "Denoising strength",
    "Eta",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")


def _quote(value: str) -> str:
    """A value as the webui writes it: JSON-quoted when it holds a comma, colon or newline (the webui's
    rule), and also when it holds a quote (an unquoted '"x"' would be read back as x) or when it is
    empty or has surrounding spaces (readers strip them)."""
    needs_quotes = value == "" or value != value.strip() or any(c in value for c in ',:"\n\r')
    return json.dumps(value, ensure_ascii=False) if needs_quotes else value


def _float(value, name: str) -> str:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    try:
        value = float(value)  # also numpy / torch scalars, whose repr is not a plain number
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    # repr gives the shortest string that reads back as the same float: 7.5, 0.35, 0.001, 1e-05.
    return repr(value)


def _int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def format_parameters(params: dict) -> str:
    """The webui's `parameters` text for a dict of generation settings (the inverse of
    `parse_parameters`).

    Required keys: prompt, steps, sampler, guidance, seed, width, height. Optional: negative_prompt (""),
    karras (False), model_hash, model, clip_skip (0 = the text encoder's last layer; written as the
    webui's "Clip skip: clip_skip + 1", left out when 0), strength ("Denoising strength"), eta, and
    extra (a dict of other "Key: value" pairs, written as strings after the known ones).

    A prompt line that starts with "Negative prompt:" cannot be told apart from the negative prompt by
    any reader, so it raises `ValueError`; the text anywhere else in a line is fine.
    """
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise ValueError(f"generation parameters lack {missing}; required keys are {list(_REQUIRED)}")
    unknown = [k for k in params if k not in _REQUIRED and k not in _OPTIONAL]
    if unknown:
        raise ValueError(
            f"unknown generation parameters {unknown}; known keys are {list(_REQUIRED + _OPTIONAL)}. "
            "Put other settings in params['extra'] (a dict of strings)."
        )
    prompt, negative = str(params["prompt"]), str(params.get("negative_prompt", ""))
    if any(line.startswith(_NEGATIVE) for line in prompt.split("\n")):
        raise ValueError(
            f"a line of the prompt starts with {_NEGATIVE!r}; readers of this format would take it as "
            "the start of the negative prompt. Reword that line."
        )

    key = (params["sampler"], bool(params.get("karras", False)))
    if key not in SAMPLER_NAMES:
        known = ", ".join(f"{s} (karras={k})" for s, k in SAMPLER_NAMES)
        raise ValueError(f"no webui name for sampler {key[0]!r} with karras={key[1]}; known: {known}")

    pairs = [
        ("Steps", str(_int(params["steps"], "steps"))),
        ("Sampler", SAMPLER_NAMES[key]),
        ("CFG scale", _float(params["guidance"], "guidance")),
        ("Seed", str(_int(params["seed"], "seed"))),
        ("Size", f"{_int(params['width'], 'width')}x{_int(params['height'], 'height')}"),
    ]
    if params.get("model_hash") is not None:
        pairs.append(("Model hash", str(params["model_hash"])))
    if params.get("model") is not None:
        pairs.append(("Model", str(params["model"])))
    clip_skip = _int(params.get("clip_skip", 0), "clip_skip")
    if clip_skip < 0:
        raise ValueError(f"clip_skip must be >= 0 (0 = last layer), got {clip_skip}")
    if clip_skip:
        pairs.append(("Clip skip", str(clip_skip + 1)))  # the webui counts the last layer as 1
    if params.get("strength") is not None:
        pairs.append(("Denoising strength", _float(params["strength"], "strength")))
    if params.get("eta") is not None:
        pairs.append(("Eta", _float(params["eta"], "eta")))
    for k, v in (params.get("extra") or {}).items():
        k = str(k)
        if k in _KNOWN_KEYS:
            raise ValueError(f"extra key {k!r} is one of the typed fields; set it through its own parameter")
        if k == "Schedule type" and str(v) == "Karras":  # parse_parameters reads this as karras=True
            raise ValueError(
                "extra 'Schedule type: Karras' would be read back as karras=True; set karras instead"
            )
        if k != k.strip() or not k or any(c in k for c in ',:"\n\r'):
            raise ValueError(f'extra key {k!r} cannot be written: keys must not contain , : " or newlines')
        pairs.append((k, str(v)))

    settings = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs)
    lines = [prompt]
    if negative:
        lines.append(f"{_NEGATIVE} {negative}")
    lines.append(settings)
    return "\n".join(lines)


def _parse_settings(line: str) -> list[tuple[str, str]] | None:
    """Split a settings line into (key, value) pairs; None when the line is not one.

    A value starting with a quote is read as a JSON string when it is one followed by a comma or the
    line's end; otherwise, as every other value, it runs to the next comma (the webui reads it so too).
    """
    pairs, i, n = [], 0, len(line)
    decoder = json.JSONDecoder()
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        if i == n:  # a trailing ", "
            break
        colon = line.find(":", i)
        if colon < 0:
            return None
        key = line[i:colon].strip()
        if not key or any(c in key for c in ',"'):
            return None
        i = colon + 1
        while i < n and line[i] == " ":
            i += 1
        value = None
        if i < n and line[i] == '"':
            try:
                decoded, end = decoder.raw_decode(line, i)
            except json.JSONDecodeError:
                decoded, end = None, i
            rest = line[end:].lstrip(" ")
            if isinstance(decoded, str) and (rest == "" or rest.startswith(",")):
                value, i = decoded, n - len(rest)
        if value is None:
            comma = line.find(",", i)
            end = n if comma < 0 else comma
            value, i = line[i:end].strip(), end
        pairs.append((key, value))
        i += 1  # past the comma (or past the end)
    return pairs


def _to_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}: expected an integer, got {value!r}") from None


def _to_float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{key}: expected a number, got {value!r}") from None


def parse_parameters(text: str) -> dict:
    """Read a webui `parameters` text (ours or the webui's own) into our dict.

    Always present: prompt, negative_prompt ("" when absent), clip_skip (0 when absent), extra (dict of
    the pairs we have no field for, values as strings). The others appear when their key does. The webui
    1.9+ "Schedule type: Karras" sets karras=True; other schedule types stay in extra. An unknown sampler
    name raises `ValueError` listing the known ones.
    """
    lines = text.rstrip().split("\n")
    settings = _parse_settings(lines[-1])
    # Like the webui, require a few pairs before taking the last line as settings: a one-line prompt
    # such as "portrait: soft light" must stay a prompt.
    if settings is not None and len(settings) >= 3:
        lines = lines[:-1]
    else:
        settings = []

    prompt_lines, negative_lines = lines, []
    for i, line in enumerate(lines):
        if line.startswith(_NEGATIVE):
            first = line[len(_NEGATIVE) :]
            first = first[1:] if first.startswith(" ") else first
            prompt_lines, negative_lines = lines[:i], [first, *lines[i + 1 :]]
            break
    params: dict = {
        "prompt": "\n".join(prompt_lines),
        "negative_prompt": "\n".join(negative_lines),
        "clip_skip": 0,
        "extra": {},
    }

    schedule_karras = False
    for key, value in settings:
        if key == "Steps":
            params["steps"] = _to_int(key, value)
        elif key == "Sampler":
            if value not in _SAMPLER_KEYS:
                raise ValueError(
                    f"unknown sampler {value!r}; known samplers: {', '.join(SAMPLER_NAMES.values())}"
                )
            params["sampler"], params["karras"] = _SAMPLER_KEYS[value]
        elif key == "CFG scale":
            params["guidance"] = _to_float(key, value)
        elif key == "Seed":
            params["seed"] = _to_int(key, value)
        elif key == "Size":
            w, sep, h = value.partition("x")
            if not sep:
                raise ValueError(f"Size: expected WIDTHxHEIGHT, got {value!r}")
            params["width"], params["height"] = _to_int(key, w), _to_int(key, h)
        elif key == "Model hash":
            params["model_hash"] = value
        elif key == "Model":
            params["model"] = value
        elif key == "Clip skip":
            n = _to_int(key, value)
            if n < 1:
                raise ValueError(f"Clip skip: the webui counts from 1 (last layer), got {n}")
            params["clip_skip"] = n - 1
        elif key == "Denoising strength":
            params["strength"] = _to_float(key, value)
        elif key == "Eta":
            params["eta"] = _to_float(key, value)
        elif key == "Schedule type" and value == "Karras":
            schedule_karras = True
        else:
            params["extra"][key] = value
    if schedule_karras:
        if "sampler" not in params:
            params["extra"]["Schedule type"] = "Karras"  # nothing to attach it to; keep it verbatim
        elif (params["sampler"], True) not in SAMPLER_NAMES:
            raise ValueError(
                f"sampler {params['sampler']!r} has no Karras variant among {list(SAMPLER_NAMES.values())}"
            )
        else:
            params["karras"] = True
    return params


def model_hash(path: str | os.PathLike) -> str:
    """The webui's "AutoV2" model hash: the first 10 hex digits of the SHA-256 of the file.

    For a folder (a sfumato bundle, a diffusers folder) the hash is of the concatenated bytes of every
    `*.safetensors`, `*.bin` and `*.ckpt` file below it, in sorted order of their relative paths
    (as "/"-separated strings): it identifies the weights, not configs or tokenizer files. A folder
    holding two copies of the weights (.bin and .safetensors, or fp16 variants) hashes all of them.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise ValueError(f"{path} holds no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no such model file or folder: {path}")
    sha = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):  # 1 MiB at a time: checkpoints are gigabytes
                sha.update(chunk)
    return sha.hexdigest()[:10]


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict | str | None = None) -> Path:
    """Write `image` as a PNG at `path` with a `parameters` text chunk (from `format_parameters`, or a
    ready string), atomically: the file is written under a temporary name in the same folder and renamed
    over `path`, so a reader never sees half an image. Parent folders are created."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_png writes PNG files; give a path ending in .png, got {path}")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        text = parameters if isinstance(parameters, str) else format_parameters(parameters)
        info.add_text("parameters", text)  # PIL writes iTXt (UTF-8) when the text is not latin-1
    with replacing(path) as tmp, open(tmp, "xb") as f:
        image.save(f, format="PNG", pnginfo=info)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_parameters(path_or_image: str | os.PathLike | Image.Image) -> dict:
    """The generation parameters stored in a PNG's `parameters` chunk, parsed by `parse_parameters`.
    A file without the chunk raises `ValueError` naming it."""
    if isinstance(path_or_image, Image.Image):
        im = path_or_image
        name = getattr(im, "filename", "") or "the image"
        text = _text_chunks(im).get("parameters")
    else:
        name = str(path_or_image)
        try:
            with Image.open(path_or_image) as im:
                text = _text_chunks(im).get("parameters")
        except UnidentifiedImageError as e:
            raise ValueError(f"{name} is not an image file that PIL can read") from e
    if text is None:
        raise ValueError(
            f"{name} has no 'parameters' text chunk: it was not saved with generation parameters"
        )
    try:
        return parse_parameters(str(text))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def _text_chunks(im: Image.Image) -> dict:
    # PngImageFile.text reads text chunks that come after the pixel data too; info has only earlier ones.
    text = getattr(im, "text", None)
    return dict(text) if isinstance(text, dict) else dict(im.info)
