"""How fast could the small U-Nets go in eager float32 at all? The kernels of a step, replayed without Python.

Issue 7 asks for the shipped model's U-Net step at half of diffusers' time and for training 1.3x diffusers'
throughput. Both implementations call the same torch kernels, so the question is how much of a step is
Python and module overhead (which our code can cut) and how much is kernels (which it cannot, short of
computing something else). This script answers it by measurement:

1. One step runs under a `TorchDispatchMode` that records every aten call with its arguments.
2. The recorded calls are replayed back to back: the same kernels on the same shapes, with no Python module
   code, no autograd engine and no optimizer logic between them (each call still goes through the
   dispatcher). "products" replays only the matrix products, convolutions and attention; "all kernels"
   replays every call.
3. The whole step is timed as usual, alternately with the replays and with diffusers' step.

The replay of *our* step's kernels is the floor of any eager implementation that computes what ours
computes with torch's kernels: to go below it, a step has to launch fewer or cheaper kernels (fusion, as
`torch.compile` does: see speed_options.py), not trim Python. Printed next to the goal: 0.5 x diffusers'
inference step, diffusers' training step / 1.3.

Cases: "shipped" inference (one CFG step, batch 2, 16² x 4 latents, 32 context tokens: unet_step.py's
shipped-32px) and "shipped" / "mnist" training (forward, backward, AdamW at batch 64: train_unet.py's cases).

    .venv/bin/python benchmarks/floors.py [--quick] [--threads 2] [--repeat 20] [--cases infer,train-shipped,train-mnist]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402
import train_unet  # noqa: E402
import unet_step  # noqa: E402

aten = torch.ops.aten
# matrix products, convolutions and attention, forward and backward (under inference_mode the dispatch mode
# sees the composite ops, `linear`, `conv2d`, `matmul`; with autograd, what they decompose into)
PRODUCTS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default,
    aten.matmul.default, aten.conv2d.default, aten.convolution.default, aten.convolution_backward.default,
    aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}  # fmt: skip


class Recorder(TorchDispatchMode):
    """Every aten call of a region, with its arguments (kept alive for the replay)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def record(step) -> list[tuple]:
    rec = Recorder()
    with rec:
        step()
    return rec.calls


def replayer(calls: list[tuple], only: set | None = None):
    chosen = [c for c in calls if only is None or c[0] in only]

    def replay():
        with torch.no_grad():  # the calls are below autograd already; in-place ones stay legal on views
            for func, args, kwargs in chosen:
                func(*args, **kwargs)

    return replay, len(chosen)


def timed(fns: dict, repeat: int, inference: bool) -> dict[str, float]:
    """Median seconds of each callable, alternately (`_bench.alternate`), with or without autograd."""
    with torch.inference_mode() if inference else torch.enable_grad():
        return _bench.alternate(fns, repeat)


def report(title: str, med: dict[str, float], counts: dict[str, int], goal_name: str, goal: float) -> None:
    print(title)
    for k, v in med.items():
        n = f"  ({counts[k]} aten calls)" if k in counts else ""
        print(f"  {k:<28} {v * 1e3:9.2f} ms{n}")
    floor = med["ours: all kernels replayed"]
    print(f"  goal: {goal_name} = {goal * 1e3:.2f} ms; our kernels alone take {floor * 1e3:.2f} ms "
          f"({floor / goal:.2f} x the goal), our step {med['ours: step'] * 1e3:.2f} ms; the products alone "
          f"{med['ours: products replayed'] * 1e3:.2f} ms", flush=True)  # fmt: skip


def bench_inference(repeat: int) -> None:
    config = unet_step.shipped_config()
    ref = unet_step.reference(config).eval()
    ours = unet_step.ours_from(ref).eval()
    x, t, ctx = unet_step.inputs(ours.config.in_channels, 16, 32, ours.config.context_dim)
    with torch.inference_mode():
        calls = record(lambda: ours(x, t, ctx))
        ref_calls = record(lambda: ref(x, t, ctx).sample)
    fns, counts = {"ours: step": lambda: ours(x, t, ctx), "diffusers: step": lambda: ref(x, t, ctx).sample}, {}
    for name, c, only in (("ours: all kernels replayed", calls, None), ("ours: products replayed", calls, PRODUCTS),
                          ("diffusers: all kernels", ref_calls, None)):  # fmt: skip
        fns[name], counts[name] = replayer(c, only)
    counts["ours: step"], counts["diffusers: step"] = len(calls), len(ref_calls)
    med = timed(fns, repeat, inference=True)
    report("shipped U-Net, one CFG step (B=2, 16² x 4 latents, 32 tokens), inference", med, counts,
           "0.5 x diffusers' step", 0.5 * med["diffusers: step"])  # fmt: skip


def bench_training(case: str, batch: int, repeat: int) -> None:
    from diffusers import UNet2DConditionModel

    from sfumato.checkpoints.keymaps import unet_config_from_diffusers, unet_from_diffusers
    from sfumato.models.unet import UNet

    config, side, tokens = train_unet.CASES[case]
    config = unet_step.shipped_config() if config is None else config
    torch.manual_seed(0)
    ref = _bench.randomize_(UNet2DConditionModel(**config)).train()
    cfg = unet_config_from_diffusers(dict(ref.config))
    ours = UNet(cfg).train()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True)
    step_ours, step_ref, *_ = train_unet.setup(ours, ref, cfg, side, tokens, batch)
    step_ours()  # AdamW's state exists from here on, so the recorded step is a steady one
    calls = record(step_ours)
    fns = {"ours: step": step_ours, "diffusers: step": step_ref}
    counts = {"ours: step": len(calls)}
    fns["ours: all kernels replayed"], counts["ours: all kernels replayed"] = replayer(calls)
    fns["ours: products replayed"], counts["ours: products replayed"] = replayer(calls, PRODUCTS)
    med = timed(fns, repeat, inference=False)
    report(f"{case} U-Net training step (forward, backward, AdamW; B={batch}, {side}²)", med, counts,
           "diffusers' step / 1.3", med["diffusers: step"] / 1.3)  # fmt: skip
    print(f"  images/s: ours {batch / med['ours: step']:.1f}, diffusers {batch / med['diffusers: step']:.1f}; "
          f"at most {batch / med['ours: all kernels replayed']:.1f} with our kernels and no overhead "
          f"(x{med['diffusers: step'] / med['ours: all kernels replayed']:.2f} diffusers)", flush=True)  # fmt: skip


def main() -> None:
    ap = _bench.parser(__doc__)
    ap.add_argument("--cases", default="infer,train-shipped,train-mnist")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    _bench.set_threads(args.threads)
    repeat = args.repeat or (3 if args.quick else 20)
    batch = 8 if args.quick else args.batch
    print(_bench.machine())
    print(f"float32 matmul rate: {_bench.matmul_gflops(2048 if args.quick else 4096):.0f} GFLOP/s; "
          f"medians of {repeat} alternating runs")  # fmt: skip
    for case in args.cases.split(","):
        if case == "infer":
            bench_inference(repeat)
        else:
            bench_training(case.removeprefix("train-"), batch, max(3, repeat // 2))


if __name__ == "__main__":
    main()
