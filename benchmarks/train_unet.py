"""Training throughput (images/s of forward + backward + AdamW) of small U-Nets against diffusers, same weights.

Two U-Nets, each built by diffusers (UNet2DConditionModel, random weights, every norm and zero-initialised
layer randomised) and converted by our keymaps:
- "mnist": an MNIST-sized U-Net, 28x28x1 images, batch 64. Widths (32, 64, 64) and 2 blocks per level are
  those of the Hugging Face diffusion course's MNIST U-Net (Unit 1, `UNet2DModel(sample_size=28,
  block_out_channels=(32, 64, 64), layers_per_block=2)`), with its two attention levels as cross-attention
  blocks (4 heads) on a 1-token class context of width 32, since our U-Net is the SD architecture.
- "shipped": the U-Net of the model sfumato ships (`RECIPES["ldm"]["shapes"].unet`) on 16² x 4 latents with
  32 context tokens of width 128, batch 64, as it trains.
A step is the eps-prediction MSE, `backward()` and `torch.optim.AdamW(lr=1e-4)` (default foreach), on the same
fixed batch for both. Steps alternate between the implementations after warm-up. Max diff: the largest
difference of the per-step losses, and of any parameter after all steps. FLOPs: forward + backward,
counted on diffusers with explicit-softmax attention.

    .venv/bin/python benchmarks/train_unet.py [--quick] [--threads 2] [--repeat 10] [--batch 64]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402
from unet_step import shipped_config  # noqa: E402

MNIST_UNET = dict(
    sample_size=28, in_channels=1, out_channels=1, block_out_channels=[32, 64, 64], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=32, attention_head_dim=4,
)  # fmt: skip
# name -> (diffusers config, image side, context tokens)
CASES = {"mnist": (MNIST_UNET, 28, 1), "shipped": (None, 16, 32)}


def setup(ours, ref, cfg, side: int, tokens: int, batch: int):
    """One training step of each implementation on the same fixed batch, their loss logs, GFLOP of a step."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    target = torch.randn(x.shape, generator=g)

    def stepper(model, forward):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(forward(model), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())

        return step, losses

    step_ours, loss_ours = stepper(ours, lambda m: m(x, t, ctx))
    step_ref, loss_ref = stepper(ref, lambda m: m(x, t, ctx).sample)
    ref.set_attn_processor(AttnProcessor())
    gflop = _bench.count_gflops(lambda: F.mse_loss(ref(x, t, ctx).sample, target).backward())
    ref.zero_grad(set_to_none=True)
    ref.set_attn_processor(AttnProcessor2_0())
    return step_ours, step_ref, loss_ours, loss_ref, gflop


def main() -> None:
    from diffusers import UNet2DConditionModel

    from sfumato.checkpoints.keymaps import unet_config_from_diffusers, unet_from_diffusers
    from sfumato.models.unet import UNet

    ap = _bench.parser(__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    _bench.set_threads(args.threads)
    repeat = args.repeat or (2 if args.quick else 10)
    batch = 8 if args.quick else args.batch

    print(_bench.machine())
    mm = _bench.matmul_gflops(2048 if args.quick else 4096)
    print(
        f"float32 matmul rate: {mm:.0f} GFLOP/s; times are medians of {repeat} alternating steps, batch {batch}"
    )
    print(_bench.HEADER)
    for name in args.cases.split(","):
        config, side, tokens = CASES[name]
        config = shipped_config() if config is None else config
        torch.manual_seed(0)
        ref = _bench.randomize_(UNet2DConditionModel(**config)).train()
        cfg = unet_config_from_diffusers(dict(ref.config))
        ours = UNet(cfg).train()
        ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True)

        step_ours, step_ref, loss_ours, loss_ref, gflop = setup(ours, ref, cfg, side, tokens, batch)
        med = _bench.alternate({"ours": step_ours, "ref": step_ref}, repeat, warmup=2)
        loss_diff = max(abs(a - b) for a, b in zip(loss_ours, loss_ref))
        ref_sd = unet_from_diffusers(ref.state_dict(), cfg)
        param_diff = max(_bench.max_diff(p, ref_sd[k]) for k, p in ours.state_dict().items())
        n = sum(p.numel() for p in ours.parameters()) / 1e6
        print(_bench.row(f"train {name} ({n:.1f}M, {side}², B={batch})", med["ours"], med["ref"], gflop, mm,
                         max(loss_diff, param_diff)), flush=True)  # fmt: skip
        print(
            f"    images/s: ours {batch / med['ours']:.1f}, diffusers {batch / med['ref']:.1f} "
            f"(x{med['ref'] / med['ours']:.2f}); max |Δ loss| {loss_diff:.1e}, max |Δ param| {param_diff:.1e}"
        )


if __name__ == "__main__":
    main()
