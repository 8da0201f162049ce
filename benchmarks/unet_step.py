"""One U-Net evaluation (a CFG step: batch 2) against diffusers' UNet2DConditionModel on identical weights.

Cases: the SD 1.5 U-Net (the published unet/config.json, random weights) at 256² and 512² images (32² and 64²
latents, 77 context tokens of width 768), and the U-Net of the model sfumato ships
(`RECIPES["ldm"]["shapes"].unet`: 64 channels, mult (1, 2, 2), 16² latents, 32 context tokens of width 128).
diffusers builds each model with random weights (every zero-initialised layer and every norm randomised);
our keymaps convert the state dict. Both run under `torch.inference_mode()`, alternately, after warm-up.
Peak memory: each loads the saved diffusers folder in a fresh process and runs one step (see _bench.py).

    .venv/bin/python benchmarks/unet_step.py [--quick] [--threads 2] [--repeat 3] [--cases sd15-512,...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402

# runwayml/stable-diffusion-v1-5 unet/config.json (the entries that differ from diffusers' defaults)
SD15_UNET = dict(
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2,
    sample_size=64,
)


def shipped_config() -> dict:
    """The shipped U-Net's layout as a diffusers config. Its `mask_padding` (attend to the prompt's tokens
    only) has no diffusers config entry; the timed calls pass no mask to either side, so both attend to
    every context token."""
    from dataclasses import replace

    from sfumato.checkpoints.keymaps import unet_config_to_diffusers
    from sfumato.training.recipes import RECIPES

    return unet_config_to_diffusers(replace(RECIPES["ldm"]["shapes"].unet, mask_padding=False))


# name -> (diffusers config, latent side, context tokens)
CASES = {
    "sd15-512": (SD15_UNET, 64, 77),
    "sd15-256": (SD15_UNET, 32, 77),
    "shipped-32px": (None, 16, 32),
}


def reference(config: dict):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return _bench.randomize_(UNet2DConditionModel(**config))


def ours_from(ref):
    from sfumato.checkpoints.keymaps import unet_config_from_diffusers, unet_from_diffusers
    from sfumato.models.unet import UNet

    config = unet_config_from_diffusers(dict(ref.config))
    model = UNet(config).eval()
    model.load_state_dict(unet_from_diffusers(ref.state_dict(), config), strict=True)
    return model


def inputs(in_channels: int, side: int, tokens: int, context_dim: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_channels, side, side, generator=g)
    context = torch.randn(2, tokens, context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    return x, t, context


def child(impl: str, folder: str, side: int, tokens: int) -> None:
    """Fresh process: load the saved U-Net with one implementation, run one step, print memory figures."""
    base = _bench.rss_mb()
    if impl == "ours":
        from sfumato.checkpoints.diffusers_folder import load_diffusers_unet

        model = load_diffusers_unet(folder).eval()
        c = model.config
        x, t, ctx = inputs(c.in_channels, side, tokens, c.context_dim)
        with torch.inference_mode():
            model(x, t, ctx)
    else:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(folder).eval()
        x, t, ctx = inputs(model.config.in_channels, side, tokens, model.config.cross_attention_dim)
        with torch.inference_mode():
            model(x, t, ctx)
    _bench.child_report(base)


def measure(ref, ours, side: int, tokens: int, repeat: int) -> tuple[float, dict[str, float], float]:
    """GFLOP of one step, median seconds of each implementation, max output difference."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    x, t, ctx = inputs(ours.config.in_channels, side, tokens, ours.config.context_dim)
    with torch.inference_mode():
        ref.set_attn_processor(AttnProcessor())  # explicit softmax, which the FLOP counter sees
        gflop = _bench.count_gflops(lambda: ref(x, t, ctx))
        ref.set_attn_processor(AttnProcessor2_0())
        out = {}

        def run_ours():
            out["ours"] = ours(x, t, ctx)

        def run_ref():
            out["ref"] = ref(x, t, ctx).sample

        med = _bench.alternate({"ours": run_ours, "ref": run_ref}, repeat)
    return gflop, med, _bench.max_diff(out["ours"], out["ref"])


def main() -> None:
    if (argv := _bench.child_argv(4)) is not None:
        impl, folder, side, tokens = argv
        return child(impl, folder, int(side), int(tokens))

    ap = _bench.parser(__doc__)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    threads = _bench.set_threads(args.threads)
    cases = ["shipped-32px"] if args.quick else args.cases.split(",")
    repeat = args.repeat or (1 if args.quick else 3)

    print(_bench.machine())
    mm = _bench.matmul_gflops(2048 if args.quick else 4096)
    print(f"float32 matmul rate: {mm:.0f} GFLOP/s; times are medians of {repeat} alternating runs")
    print(_bench.HEADER)
    built: dict[str, tuple] = {}
    for name in cases:
        config, side, tokens = CASES[name]
        config = shipped_config() if config is None else config
        key = repr(config)
        if key not in built:
            built.clear()  # at most one SD-sized pair in memory
            ref = reference(config)
            built[key] = (ref, ours_from(ref))
        ref, ours = built[key]
        gflop, med, diff = measure(ref, ours, side, tokens, repeat)
        mem = (None, None)
        if not args.no_memory:
            with tempfile.TemporaryDirectory() as tmp:
                ref.save_pretrained(tmp)
                mem = tuple(_bench.child_peak(__file__, [impl, tmp, str(side), str(tokens)], threads)["peak_mb"]
                            for impl in ("ours", "diffusers"))  # fmt: skip
        print(_bench.row(f"unet {name} (B=2, {side}² latents)", med["ours"], med["ref"], gflop, mm, diff, *mem),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
