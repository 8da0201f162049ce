"""Whole text-to-image against diffusers' StableDiffusionPipeline on the same SD 1.5-shaped weights and seed.

diffusers builds an SD 1.5-configured pipeline with random weights (U-Net and VAE at the published configs,
the CLIP ViT-L/14 text encoder, OpenAI's tokenizer vocabulary, every zero-initialised layer and every norm
randomised) and saves it; `sfumato.load` reads the saved folder. Both make the same 256x256 image: 20 steps of
DPM-Solver++(2M) with Karras σ, guidance 7.5, a negative prompt, seed 0, prompt to PIL image. They run
alternately after a 2-step warm-up. FLOPs: counted on diffusers' pipeline with explicit-softmax attention at
1 and 2 steps, extrapolated linearly to 20 (text encoding and decoding are in the 1-step count).
Peak memory: each loads the folder and makes one 2-step image in a fresh process (see _bench.py).

    .venv/bin/python benchmarks/pipeline_sd.py [--quick] [--threads 2] [--repeat 2] [--size 256] [--steps 20]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402
from unet_step import SD15_UNET  # noqa: E402
from vae_clip import SD_VAE, VIT_L_TEXT  # noqa: E402

PROMPT, NEGATIVE = "a watercolor painting of a lighthouse at dusk", "blurry, low quality"
# a small SD-shaped model for --quick (the one of pipeline_tiny.py)
TINY_UNET = dict(block_out_channels=[64, 128, 256], cross_attention_dim=256, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2)  # fmt: skip
TINY_VAE = dict(block_out_channels=[32, 64, 128, 128], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4)  # fmt: skip
TINY_TEXT = VIT_L_TEXT | dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
)


def build_reference(folder: Path, quick: bool):
    import transformers
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    from sfumato.text.tokenizer import CLIPTokenizer

    CLIPTokenizer.default().save(folder / "vocab")
    torch.manual_seed(0)
    unet = _bench.randomize_(UNet2DConditionModel(**(TINY_UNET if quick else SD15_UNET)), 1)
    vae = _bench.randomize_(AutoencoderKL(**(TINY_VAE if quick else SD_VAE)), 2)
    text = _bench.randomize_(
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**(TINY_TEXT if quick else VIT_L_TEXT))), 3
    )
    # stable-diffusion-v1-5 scheduler_config.json, with Karras σ
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1, timestep_spacing="leading", use_karras_sigmas=True)  # fmt: skip
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "vocab", model_max_length=77)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder / "sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, size: int, steps: int):
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, height=size,
                width=size, generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip


def run_ours(pipe, size: int, steps: int):
    return pipe.generate(PROMPT, NEGATIVE, steps=steps, guidance=7.5, sampler="dpmpp_2m", karras=True, seed=0,
                         width=size, height=size, progress=False)[0]  # fmt: skip


def child(impl: str, folder: str, size: int, steps: int) -> None:
    base = _bench.rss_mb()
    if impl == "ours":
        import sfumato

        run_ours(sfumato.load(folder), size, steps)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        run_reference(pipe, size, steps)
    _bench.child_report(base)


def count_gflops(ref, size: int, steps: int) -> float:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    ref.unet.set_attn_processor(AttnProcessor())
    ref.vae.set_attn_processor(AttnProcessor())
    ref.text_encoder.set_attn_implementation("eager")
    one, two = (_bench.count_gflops(lambda n=n: run_reference(ref, size, n)) for n in (1, 2))
    ref.unet.set_attn_processor(AttnProcessor2_0())
    ref.vae.set_attn_processor(AttnProcessor2_0())
    ref.text_encoder.set_attn_implementation("sdpa")
    return one + (steps - 1) * (two - one)


def main() -> None:
    if (argv := _bench.child_argv(4)) is not None:
        impl, folder, size, steps = argv
        return child(impl, folder, int(size), int(steps))

    ap = _bench.parser(__doc__)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bf16", action="store_true",
                    help="also time ours loaded with dtype=torch.bfloat16 (an approximate mode) against both")
    args = ap.parse_args()
    threads = _bench.set_threads(args.threads)
    size = args.size or (64 if args.quick else 256)
    repeat = args.repeat or (1 if args.quick else 2)

    import sfumato

    print(_bench.machine())
    mm = _bench.matmul_gflops(2048 if args.quick else 4096)
    print(f"float32 matmul rate: {mm:.0f} GFLOP/s; times are medians of {repeat} alternating runs")
    with tempfile.TemporaryDirectory() as tmp:
        ref = build_reference(Path(tmp), args.quick)
        ours = sfumato.load(Path(tmp) / "sd")
        with torch.inference_mode():
            gflop = count_gflops(ref, size, args.steps)
        run_ours(ours, size, 2), run_reference(ref, size, 2)  # warm-up
        out = {}
        med = _bench.alternate({"ours": lambda: out.__setitem__("ours", run_ours(ours, size, args.steps)),
                                "ref": lambda: out.__setitem__("ref", run_reference(ref, size, args.steps))},
                               repeat, warmup=0)  # fmt: skip
        a, b = (np.asarray(out[k], np.float64) for k in ("ours", "ref"))
        if args.bf16:
            half = sfumato.load(Path(tmp) / "sd", dtype=torch.bfloat16)
            run_ours(half, size, 2)  # warm-up
            med_h = _bench.alternate({"bf16": lambda: out.__setitem__("bf16", run_ours(half, size, args.steps)),
                                      "ours": lambda: run_ours(ours, size, args.steps)}, repeat, warmup=0)  # fmt: skip
            h = np.asarray(out["bf16"], np.float64)
            print(f"ours in bfloat16: {med_h['bf16']:.2f} s against ours in float32 {med_h['ours']:.2f} s "
                  f"(x{med_h['ours'] / med_h['bf16']:.2f}) and diffusers in float32 {med['ref']:.2f} s (ratio "
                  f"{med_h['bf16'] / med['ref']:.2f}); image against float32: mean |Δ| {np.abs(h - a).mean():.2f}, "
                  f"max {np.abs(h - a).max():.0f} of 255")  # fmt: skip
            del half
        mem = (None, None)
        if not args.no_memory:
            del ref, ours
            # peak memory does not grow with the number of steps: the children make 2-step images
            mem = tuple(_bench.child_peak(__file__, [impl, str(Path(tmp) / "sd"), str(size), "2"],
                                          threads)["peak_mb"] for impl in ("ours", "diffusers"))  # fmt: skip
    name = "tiny SD" if args.quick else "SD 1.5-shaped"
    print(f"{name}, {args.steps} steps DPM++ 2M Karras, CFG 7.5, {size}x{size}; max diff in /255 pixel levels, "
          f"mean |Δ| {np.abs(a - b).mean():.3f}")  # fmt: skip
    print(_bench.HEADER)
    print(_bench.row(f"txt2img {size}² {args.steps} steps", med["ours"], med["ref"], gflop, mm,
                     np.abs(a - b).max(), *mem))  # fmt: skip


if __name__ == "__main__":
    main()
