"""Time-to-quality of every sampler on the exact Gaussian-mixture denoiser.

For each sampler and budget of model evaluations: the mean distance to a 1,000-step Heun reference solve from
the same x_T (deterministic samplers only; stochastic ones follow other paths), and the sliced Wasserstein
distance of the samples to fresh true samples (every sampler). No network is involved, so the numbers are
the samplers' own discretisation error.

    python benchmarks/samplers_time_to_quality.py [--n 4000]
"""

from __future__ import annotations

import argparse
import time

import torch

from sfumato.diffusion import samplers as S
from sfumato.diffusion.mixture import GaussianMixture
from sfumato.diffusion.schedules import append_zero, karras_sigmas
from sfumato.eval.metrics import sliced_wasserstein

DETERMINISTIC = {"euler", "ddim", "heun", "dpmpp_2m"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--evals", type=int, nargs="+", default=[5, 10, 20, 40, 80, 160])
    args = ap.parse_args()

    gm = GaussianMixture.random(K=4, d=2, seed=0)
    g = torch.Generator().manual_seed(1)
    x_T = gm.sample(args.n, g) + 80.0 * torch.randn(args.n, 2, generator=g, dtype=torch.float64)
    t0 = time.time()
    ref = S.sample_heun(gm, x_T, append_zero(karras_sigmas(1000, 0.002, 80.0)))
    truth = gm.sample(args.n, torch.Generator().manual_seed(2))
    floor = sliced_wasserstein(gm.sample(args.n, torch.Generator().manual_seed(3)), truth)
    print(
        f"reference: Heun, 1,000 steps, Karras σ ∈ [0.002, 80] ({time.time() - t0:.1f}s); "
        f"SW between two true sample sets (noise floor): {floor:.3f}\n"
    )
    print("sampler           " + "".join(f"{e:>16d}" for e in args.evals) + "   (evaluations)")
    for name, fn in S.SAMPLERS.items():
        cells = []
        for e in args.evals:
            steps = (e + 1) // 2 if name == "heun" else e
            out = fn(
                gm,
                x_T,
                append_zero(karras_sigmas(steps, 0.002, 80.0)),
                generator=torch.Generator().manual_seed(5),
            )
            ode = f"{(out - ref).norm(dim=1).mean().item():.1e}" if name in DETERMINISTIC else "   -   "
            cells.append(f"{ode} / {sliced_wasserstein(out, truth):.3f}")
        print(f"{name:16s}  " + "".join(f"{c:>16s}" for c in cells))
    print("\ncells: mean |x - x_ref| / sliced Wasserstein to true samples")


if __name__ == "__main__":
    main()
