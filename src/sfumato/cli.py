"""The ``sfumato`` command line."""

from __future__ import annotations

import argparse
import json
import math
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
    conv.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
