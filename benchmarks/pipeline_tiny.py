"""Text-to-image wall time: sfumato against diffusers on the same tiny random-weight Stable Diffusion.

A small SD-shaped model (U-Net 64-128-256 channels with attention, an f=8 VAE, a 4-layer text encoder) is built
in diffusers, saved with `save_pretrained`, and loaded by sfumato. Both then make the same 20-step 256x256
image (DPM-Solver++(2M) with Karras σ, guidance 7.5, one seed); the best of `--repeat` runs is reported with the
ratio sfumato / diffusers and the pixel difference of the two images.

    python benchmarks/pipeline_tiny.py [--size 256] [--steps 20] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_reference(folder: Path):
    import transformers
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    from sfumato.text.tokenizer import CLIPTokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.default()
    tok.save(folder / "vocab")
    unet = UNet2DConditionModel(
        block_out_channels=[64, 128, 256],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=2,
        cross_attention_dim=256,
        attention_head_dim=8,
        sample_size=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64, 128, 128],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        sample_size=256,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    with torch.no_grad():  # diffusers zero-initialises output layers; make every weight count
        for m in (unet, vae, text):
            for p in m.parameters():
                if p.ndim >= 2 and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=True,
    )
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "vocab"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def best_time(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import sfumato

    with tempfile.TemporaryDirectory() as tmp:
        ref = build_reference(Path(tmp))
        ours = sfumato.load(Path(tmp) / "sd")
        prompt, negative = "a watercolor painting of a lighthouse at dusk", "blurry"
        n_params = sum(p.numel() for p in ours.unet.parameters()) / 1e6

        def run_ref():
            return ref(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=7.5,
                       height=args.size, width=args.size, generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip

        def run_ours():
            return ours.generate(prompt, negative, steps=args.steps, guidance=7.5, sampler="dpmpp_2m",
                                 karras=True, seed=0, width=args.size, height=args.size, progress=False)[0]  # fmt: skip

        run_ours(), run_ref()  # warm-up
        t_ours, im_ours = best_time(run_ours, args.repeat)
        t_ref, im_ref = best_time(run_ref, args.repeat)
    diff = np.abs(np.asarray(im_ours, np.float64) - np.asarray(im_ref, np.float64))
    print(f"tiny SD (U-Net {n_params:.1f}M params), {args.steps} steps DPM++ 2M Karras, CFG 7.5, "
          f"{args.size}x{args.size}, {args.threads} threads, best of {args.repeat}")  # fmt: skip
    print(f"  sfumato   {t_ours:7.2f} s")
    print(f"  diffusers {t_ref:7.2f} s")
    print(f"  ratio sfumato/diffusers {t_ours / t_ref:.2f}")
    print(f"  images: mean |Δ| {diff.mean():.3f}/255, max |Δ| {diff.max():.0f}/255")


if __name__ == "__main__":
    main()
