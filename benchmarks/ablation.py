"""What each inference fast path of sfumato.models.layers buys: our U-Net / VAE decoder with each switched off.

Variants, run alternately after warm-up on the same weights and inputs (those of unet_step.py / vae_clip.py):
"all on" (the default), each of `FAST_CONV` (weight-bound and 1x1 convolutions as matrix products),
`FAST_WINOGRAD` (3x3 convolutions of deep, small maps by Winograd F(2x2, 3x3)), `FAST_UPSAMPLE` (upsampling + conv as one 2x2 convolution) and `INPLACE` (in-place SiLU and residual sums)
turned off alone, and "all off" (the plain layers: what the models computed before these paths existed,
up to the GroupNorm fast path and the unrolled Sequentials, which have no switch).
Each row gives the median time, the ratio to "all on", and the max output difference to "all off".

    .venv/bin/python benchmarks/ablation.py [--quick] [--threads 2] [--repeat 3] [--cases sd15-256,shipped-32px]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _bench  # noqa: E402
import unet_step  # noqa: E402
import vae_clip  # noqa: E402

from sfumato.models import layers  # noqa: E402

SWITCHES = ("FAST_CONV", "FAST_WINOGRAD", "FAST_UPSAMPLE", "INPLACE")
CASES = ("sd15-256", "sd15-512", "shipped-32px", "decode-512")


def variant(off: tuple[str, ...]):
    def run(fn):
        for name in SWITCHES:
            setattr(layers, name, name not in off)
        try:
            return fn()
        finally:
            for name in SWITCHES:
                setattr(layers, name, True)

    return run


def workload(case: str):
    """A no-argument callable running our model on one case's inputs."""
    if case.startswith("decode"):
        model = vae_clip.ours_vae(vae_clip.reference_vae())
        z = vae_clip.inputs(case)
        return lambda: model.decode(z)
    config, side, tokens = unet_step.CASES[case]
    model = unet_step.ours_from(unet_step.reference(unet_step.shipped_config() if config is None else config))
    x, t, ctx = unet_step.inputs(model.config.in_channels, side, tokens, model.config.context_dim)
    return lambda: model(x, t, ctx)


def measure(case: str, variants: dict, repeat: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    fn, out = workload(case), {}
    calls = {
        name: (lambda n=name, off=off: out.__setitem__(n, variant(off)(fn))) for name, off in variants.items()
    }
    with torch.inference_mode():
        return _bench.alternate(calls, repeat), out


def main() -> None:
    ap = _bench.parser(__doc__)
    ap.add_argument("--cases", default="sd15-256,shipped-32px,decode-512")
    args = ap.parse_args()
    _bench.set_threads(args.threads)
    cases = ["shipped-32px", "decode-64"] if args.quick else args.cases.split(",")
    repeat = args.repeat or (1 if args.quick else 3)
    variants = {"all on": (), **{f"{n} off": (n,) for n in SWITCHES}, "all off": SWITCHES}
    print(_bench.machine())
    print(f"medians of {repeat} alternating runs")
    for case in cases:
        med, out = measure(case, variants, repeat)
        print(f"{case}:")
        for name in variants:
            print(f"  {name:<18}{med[name]:9.3f} s  x{med[name] / med['all on']:.2f}  "
                  f"max diff to all off {_bench.max_diff(out[name], out['all off']):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
