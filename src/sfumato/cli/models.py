"""The commands that make, convert and measure models: toy, train, convert and eval shapes."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .common import _api_defaults, _device, _load_sd, _torch_dtype, default_model


def _toy(args: argparse.Namespace) -> int:
    import torch

    from ..data.toy import toy_data
    from ..diffusion.forward import q_sample
    from ..diffusion.samplers import SAMPLERS
    from ..diffusion.schedules import sampling_sigmas
    from ..eval.metrics import sliced_wasserstein
    from ..eval.plots import line_plot, scatter_panels
    from ..training.toy import ToyTrainConfig, train_toy

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
    from ..checkpoints.bundle import Bundle, save_bundle
    from ..checkpoints.diffusers_folder import save_diffusers
    from ..checkpoints.native import save_model
    from ..checkpoints.single_file import load_any

    t0 = time.time()
    tokenizer = None
    if args.tokenizer:
        from ..text.tokenizer import CLIPTokenizer

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


def _clip_for_eval(args: argparse.Namespace, model_path: Path, pipe):
    """The CLIP (both towers) that `eval shapes` scores with: --clip, else MODEL/clip.safetensors.

    A file's tokenizer is the `tokenizer/` folder beside it (how `sfumato train clip` exports one), else the
    text-to-image bundle's own (its text encoder is that CLIP's text tower); a folder brings its own."""
    from ..pipelines.clip import CLIPPipeline

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
        from ..text.tokenizer import CLIPTokenizer

        beside = path.parent / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(beside) if beside.is_dir() else pipe.tokenizer
    clip = CLIPPipeline.from_pretrained(path, _device(args.device), _torch_dtype(args.dtype), tokenizer=tokenizer)
    return clip, path


def _eval_shapes(args: argparse.Namespace) -> int:
    from ..eval.shapes import check_categories, evaluate_shapes, format_table
    from ..pipelines.stable_diffusion import StableDiffusion
    from ..pipelines.steps import resolve_karras

    defaults = _api_defaults(StableDiffusion.generate)
    guidance = defaults["guidance"] if args.guidance is None else args.guidance
    sampler = defaults["sampler"] if args.sampler is None else args.sampler
    karras = resolve_karras(sampler, args.karras)  # the spacing generate() will use, so the report records it
    for name, value, least in (("--steps", args.steps, 1), ("--seeds", args.seeds, 1),
                               ("--limit", args.limit, 1), ("--fd-images", args.fd_images, 0),
                               ("--real-images", args.real_images, 0),
                               ("--candidates", args.candidates, 1)):  # fmt: skip
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if args.fd_images == 1:
        raise ValueError("--fd-images must be 0 (skip the Frechet distance) or >= 2, got 1")
    categories = None if args.categories is None else [c.strip() for c in args.categories.split(",") if c.strip()]
    if categories is not None:  # before the model loads
        try:
            check_categories(categories)
        except ValueError as e:
            raise ValueError(f"--categories {args.categories!r} (comma-separated): {e}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for report.json and contact_sheet.png")
    model_path = Path(args.model or default_model())
    pipe = _load_sd(argparse.Namespace(**{**vars(args), "model": str(model_path)}))
    clip, clip_path = _clip_for_eval(args, model_path, pipe)
    report, sheet = evaluate_shapes(
        pipe, clip=clip, seeds=args.seeds, steps=args.steps, guidance=guidance, sampler=sampler, karras=karras,
        candidates=args.candidates, seed=args.seed, limit=args.limit, categories=categories,
        fd_images=args.fd_images if clip is not None else 0,
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
        f"{s['seeds_per_prompt']} seeds; {s['steps']} steps, guidance {s['guidance']}, {s['sampler']}"
        f"{', Karras sigmas' if s['karras'] else ', uniform sigmas'}"
        f"{', best of ' + str(s['candidates']) if s['candidates'] > 1 else ''})"
    )
    print(format_table(report["rates"]))
    for name, goal in report["goals"].items():
        value = "-" if goal["value"] is None else f"{100 * goal['value']:.1f}%"
        ci = goal["ci95"]  # None where no image was measured
        ci = f" [95% {100 * ci[0]:.0f}-{100 * ci[1]:.0f}%, n={goal['n']}]" if ci else ""
        verdict = {True: "met", False: "NOT met", None: "n/a"}[goal["met"]]
        print(f"  goal {name:<17} {value:>7}{ci} (target {100 * goal['target']:.0f}%, {goal['over']}): {verdict}")
    for split, e in report.get("count_errors", {}).items():
        print(f"  count prompts, {split}: {e['right']} of {e['n_images']} images right, {e['too_many']} with too many "
              f"objects, {e['too_few']} with too few")  # fmt: skip
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
    from ..pipelines.metadata import model_hash

    return model_hash(path) if path is not None and path.exists() else None


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..training import recipes as R

    out = Path(args.out)
    if args.task == "pipeline":
        steps = {t: n for t, n in (("vae", args.vae_steps), ("clip", args.clip_steps), ("ldm", args.ldm_steps),
                                   ("expert", args.expert_steps), ("preview", args.preview_steps),
                                   ("matcher", args.matcher_steps)) if n}  # fmt: skip
        R.train_pipeline(args.data, out, args.preset, resume=args.resume, steps=steps, precision=args.precision)
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
    if args.task == "matcher":
        src = Path(args.text_from) if args.text_from else None
        if src is None or not (src / "clip.safetensors").is_file():
            raise ValueError("sfumato train matcher needs --text-from: a folder with the CLIP to read (clip.safetensors "
                             f"and tokenizer/: a CLIP run's final/, or a bundle), got {args.text_from}")  # fmt: skip
        kw |= dict(clip=src / "clip.safetensors", tokenizer=src / "tokenizer")
    if args.task == "ldm" and r.low_noise_until is not None:
        _low_noise_note(args, r, out, learnt=False)
    fn = {"vae": R.train_vae, "clip": R.train_clip, "ldm": R.train_ldm, "expert": R.train_expert,
          "preview": R.train_preview, "matcher": R.train_matcher, "ddpm": R.train_ddpm}[args.task]  # fmt: skip
    result = fn(args.data, out, r, **kw)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (and writes)
        return 0
    print(f"step {result.step}: {result.images_per_s:.1f} images/s; checkpoint {result.checkpoint}")
    for path in result.exported:
        print(path)
    if args.task == "ldm" and r.low_noise_until is not None:
        _low_noise_note(args, r, out, learnt=True)
    return 0


def _low_noise_note(args: argparse.Namespace, r, out: Path, *, learnt: bool) -> None:
    """Said before and after training: a U-Net of a low-noise-only recipe cannot sample from noise alone."""
    what = "learnt" if learnt else "learns"
    print(f"note: the {args.preset!r} ldm recipe's U-Net {what} t < {r.low_noise_until} only and cannot sample from "
          f"noise alone; give it its high-noise expert (sfumato train expert --preset {args.preset} --base "
          f"{out / 'final'} --out ...), or train one U-Net for every level with --preset shapes-full", flush=True)
