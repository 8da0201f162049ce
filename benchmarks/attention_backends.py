"""Why `models.layers.sdpa` sends short attention that trains in bf16 on the CPU down PyTorch's math path.

Part 1 times one attention call, forward and backward, for (B=64, 4 heads, Tq queries, Tk keys, head dim 32)
in float32 and bfloat16, on the fused CPU kernel (SDPBackend.FLASH_ATTENTION) and on the math path
(SDPBackend.MATH), alternately; the sizes are those of the shipped U-Net (16 and 64 pixel tokens, 32 prompt
tokens), CLIP (65 patches) and larger ones where the fused kernel wins.
Part 2 times a whole training step (forward, backward, AdamW) of the shipped U-Net under bf16 autocast at batch
64, with `sdpa`'s rule (`MATH_PATH_MAX_PAIRS`) on and off.

    .venv/bin/python benchmarks/attention_backends.py [--quick] [--threads 2] [--repeat 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402

SIZES = [(16, 16, False), (64, 64, False), (64, 32, True), (65, 65, False), (128, 128, False), (256, 32, True),
         (256, 128, False), (256, 256, False), (1024, 77, True)]  # fmt: skip


def attention_call(Tq: int, Tk: int, masked: bool, dtype: torch.dtype, backend: SDPBackend, batch: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, 4, T, 32, generator=g).to(dtype).requires_grad_() for T in (Tq, Tk, Tk))
    mask = None
    if masked:  # keys a prompt's padding would hide; the first always stays
        mask = torch.rand(batch, 1, 1, Tk, generator=g) > 0.3
        mask[..., 0] = True

    def call():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.float().sum().backward()

    return call


def unet_step(batch: int):
    from sfumato.models.unet import UNet
    from sfumato.training.recipes import RECIPES

    torch.manual_seed(0)
    model = UNet(RECIPES["ldm"]["shapes"].unet)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = torch.randn(batch, 4, 16, 16), torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, 32, model.config.context_dim)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, context)
        F.mse_loss(out.float(), x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = _bench.parser(__doc__).parse_args()
    threads = _bench.set_threads(args.threads)
    repeat = args.repeat or (1 if args.quick else 5)
    batch = 8 if args.quick else 64
    sizes = SIZES[:3] if args.quick else SIZES
    print(_bench.machine(), f"({threads} threads)")
    print(f"\none attention call, forward + backward, batch {batch}, 4 heads, head dim 32: median ms")
    print(f"{'Tq x Tk':>14} {'dtype':>9} {'fused':>8} {'math':>8} {'math/fused':>11}")
    for Tq, Tk, masked in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            fns = {name: attention_call(Tq, Tk, masked, dtype, be, batch)
                   for name, be in (("fused", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH))}  # fmt: skip
            t = _bench.alternate(fns, repeat)
            label = f"{Tq} x {Tk}{' m' if masked else ''}"
            print(f"{label:>14} {str(dtype)[6:]:>9} {t['fused'] * 1e3:8.1f} {t['math'] * 1e3:8.1f} "
                  f"{t['math'] / t['fused']:11.2f}")  # fmt: skip

    from sfumato.models import layers

    step = unet_step(batch)
    rule = layers.MATH_PATH_MAX_PAIRS

    def with_rule(pairs: int):
        def run():
            layers.MATH_PATH_MAX_PAIRS = pairs
            try:
                step()
            finally:
                layers.MATH_PATH_MAX_PAIRS = rule

        return run

    t = _bench.alternate({"fused": with_rule(0), "sdpa rule": with_rule(rule)}, max(repeat, 3))
    print(f"\nshipped U-Net training step, bf16 autocast, batch {batch}: fused attention only "
          f"{batch / t['fused']:.1f} img/s, sdpa's rule (math below {rule} pairs) {batch / t['sdpa rule']:.1f} img/s, "
          f"x{t['fused'] / t['sdpa rule']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
