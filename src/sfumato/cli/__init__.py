"""The ``sfumato`` command line: `build_parser` and `main`; the commands live in `generate` (images),
`models` (toy, train, convert, eval) and `common` (what they share)."""

from __future__ import annotations

import argparse
import sys

from .common import (
    _GENERATE,
    _IMG2IMG,
    _INPAINT,
    _SAMPLING_OPTIONS,
    DEFAULT_FPS,
    DTYPES,
    _add_common,
    _add_sampling_options,
    _api_defaults,
)
from .generate import _classify, _generate, _img2img, _inpaint, _interpolate, _invert
from .models import _convert, _eval_shapes, _toy, _train


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..data.toy import TOY_DATASETS
    from ..diffusion.samplers import SAMPLERS

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
        help="train a VAE, CLIP/SigLIP, latent diffusion U-Net, preview decoder, image-text matcher or pixel DDPM "
        "(or all of text-to-image)",
        description="Train one component, or `pipeline` = VAE -> CLIP -> latent diffusion -> high-noise expert -> "
        "preview decoder -> matcher into one bundle. `expert` adds to a model (--base) a second U-Net that takes over its "
        "noisiest steps. `preview` distils a VAE's decoder (--vae) into a tiny one for live previews; copy its "
        "final/preview_decoder.safetensors into a bundle folder to use it. `matcher` trains an image-text matching "
        "head over a CLIP (--clip) that picks the best of K candidates; copy its final/matcher.safetensors and the "
        "CLIP (as clip.safetensors) into a bundle folder to use it. "
        "Runs write checkpoints to OUT/checkpoints and continue exactly with --resume. Under "
        "`torchrun --nproc_per_node N -m sfumato train ...` the run uses DDP (only rank 0 writes).",
    )
    tr.add_argument("task", choices=["vae", "clip", "ldm", "expert", "preview", "matcher", "ddpm", "pipeline"])
    tr.add_argument("--data", default="shapes", help="an image-caption folder, or shapes[:SEED] (built in)")
    tr.add_argument("--out", required=True, help="run folder (checkpoints, samples, metrics, final model)")
    tr.add_argument("--preset", default="shapes",
                    help="recipe name: shapes (the shipped model's), tiny, or for `ldm` shapes-full (one U-Net for "
                    "every noise level: shapes' ldm stage learns t < 550 only, for its expert)")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tr.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    tr.add_argument("--until", type=int, help="stop after this step with a checkpoint (resume later)")
    tr.add_argument("--batch-size", type=int, help="global batch size (default: the recipe's)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    tr.add_argument("--image-size", type=int, help="training image size in pixels (default: the recipe's)")
    tr.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    tr.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                    help="autocast precision; default: the recipe's (shapes: bf16, CLIP fp32). Pipeline: every stage. "
                    "fp32 on CPUs without bf16 instructions (avx512_bf16/AMX), where bf16 is slower")
    tr.add_argument("--workers", type=int, help="DataLoader worker processes")
    tr.add_argument("--seed", type=int, help="data order and noise seed (default 0)")
    tr.add_argument("--vae", help="ldm: the trained VAE (vae.safetensors); preview: the VAE to imitate (that, or "
                    "any model sfumato loads: a bundle, a diffusers folder, an SD single file)")
    tr.add_argument("--text-from", help="ldm: a CLIP run's final/ folder (text_encoder.safetensors, tokenizer/); "
                    "matcher: the same folder (clip.safetensors, tokenizer/), or a bundle with its clip.safetensors")
    tr.add_argument("--base", help="expert: the bundle whose noisiest steps a new U-Net takes over (e.g. an ldm "
                    "run's final/); its VAE and text encoder are used frozen")
    tr.add_argument("--vae-steps", type=int, help="pipeline: VAE steps")
    tr.add_argument("--clip-steps", type=int, help="pipeline: CLIP steps")
    tr.add_argument("--ldm-steps", type=int, help="pipeline: latent diffusion steps")
    tr.add_argument("--expert-steps", type=int, help="pipeline: high-noise expert steps")
    tr.add_argument("--preview-steps", type=int, help="pipeline: preview decoder steps")
    tr.add_argument("--matcher-steps", type=int, help="pipeline: image-text matcher steps")
    tr.set_defaults(func=_train, user_errors=True)

    from ..pipelines.clip import CLIPPipeline
    from ..pipelines.stable_diffusion import StableDiffusion

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
    shp.add_argument(
        "--karras", action=argparse.BooleanOptionalAction,
        help="Karras et al. 2022 sigma spacing (default: on, for the samplers that have it)",
    )  # fmt: skip
    shp.add_argument("--candidates", type=int, metavar="K",
                     help="best of K: draws per image kept, ranked by the model's own denoising error "
                     "(default: the model's own, else 1)")
    shp.add_argument("--seeds", type=int, default=4, help="images per prompt (default 4)")
    shp.add_argument("--seed", type=int, default=0, help="base seed: image j of prompt k gets seed + k * seeds + j")
    shp.add_argument("--limit", type=int, help="evaluate only this many prompts, spread over the set (a quick look)")
    shp.add_argument(
        "--categories", metavar="LIST",
        help="evaluate only these prompt categories, comma-separated: single, size, position, relation, count "
        "(seeds stay those of the full run)",
    )  # fmt: skip
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

    from ..server.main import (  # argparse only; the server's stack loads on run
        add_serve_arguments,
        serve_main,
    )

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

