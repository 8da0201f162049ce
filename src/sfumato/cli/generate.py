"""The commands that make images (generate, img2img, inpaint, invert, interpolate) and classify them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    _GENERATE,
    _IMG2IMG,
    _INPAINT,
    DEFAULT_OUT,
    INIT_NOISE_KEY,
    _api_defaults,
    _check_model_hash,
    _check_size_early,
    _device,
    _explicit,
    _load_sd,
    _need_file,
    _need_prompt,
    _out_file,
    _read_noise,
    _read_png,
    _reserve,
    _reserve_folder,
    _resolve,
    _save_pngs,
    _slug,
    _torch_dtype,
    _write_png,
    default_model,
)


def _generate(args: argparse.Namespace) -> int:
    from ..pipelines.stable_diffusion import StableDiffusion

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
    from ..pipelines.stable_diffusion import StableDiffusion

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
    from ..pipelines.stable_diffusion import StableDiffusion

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

    from ..checkpoints.native import save_tensors
    from ..pipelines.images import load_image
    from ..pipelines.stable_diffusion import StableDiffusion

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

    from ..pipelines.metadata import save_png
    from ..pipelines.stable_diffusion import StableDiffusion

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


def _classify(args: argparse.Namespace) -> int:
    from ..pipelines.clip import DEFAULT_TEMPLATES, CLIPPipeline

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
