"""Best of K by the model's own denoising error: which levels, how many candidates?

    python benchmarks/counts/denoiser_rerank.py [--k 8] [--seed 50000] [--levels 0.2,0.3,0.4,0.5,0.6]
                                                [--draws 4] [--model DIR]

For every count prompt of the eval and each of its 4 seeds s (seed + k * 4 + j, as `sfumato eval shapes
--seed SEED` numbers them; the default 50000 keeps the eval's own seeds, 0-475, out of the tuning), K
candidates are drawn with `ranking.candidate_seeds(s, K)` at the eval's settings (guidance 3, 20
DPM-Solver++(2M) steps, Karras σ), and the eval's checker says whether each has the right count. Each
candidate's `ranking.denoising_error` under the prompt is computed at every level separately, all candidates
of one seed sharing the noise draws (drawn from `ranking_seed(s)`, `draws` per level). The table: the
checker's verdict on the least-error pick among the first k candidates, for each level alone and for groups
of levels (errors summed), as right (+ too many / - too few); "oracle" counts the seeds with any right
candidate among the first k (the ceiling of any reranker). The levels `generate(candidates=K)` uses are
`ranking.RANK_LEVELS`; its noise draws differ from these, so its picks can differ in a few images.
"""

import argparse
import time

import torch

import sfumato
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.eval.checker import check
from sfumato.eval.shapes import prompt_set
from sfumato.pipelines.ranking import RANK_LEVELS, candidate_seeds, denoising_error, ranking_seed
from sfumato.pipelines.steps import plan_steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=50_000)
    ap.add_argument("--levels", default="0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--model", default="src/sfumato/assets/shapes")
    args = ap.parse_args()
    torch.set_num_threads(2)
    K, fracs = args.k, [float(f) for f in args.levels.split(",")]
    pipe = sfumato.load(args.model)
    plan = plan_steps(pipe.schedule, "dpmpp_2m", 20, True)
    T = plan.schedule.num_timesteps
    sigmas = [float(plan.schedule.t_to_sigma(float(round(f * T)))) for f in fracs]
    denoiser = DiscreteDenoiser(pipe.unet, plan.schedule, pipe.schedule.prediction)
    rows, t0 = [], time.time()
    for k, p in enumerate(prompt_set()):
        if p["category"] != "count":
            continue
        for j in range(4):
            s = args.seed + k * 4 + j
            z = pipe.generate(p["text"], seed=candidate_seeds(s, K), batch=K, candidates=1, steps=20, guidance=3.0,
                              sampler="dpmpp_2m", karras=True, progress=False, output="latent")  # fmt: skip
            checks = [check(im, p) for im in pipe.decode(z)]
            gen = torch.Generator().manual_seed(ranking_seed(s))
            noise = torch.randn((len(sigmas), args.draws, 1, *z.shape[1:]), generator=gen).expand(-1, -1, K, -1, -1, -1)
            cond, _ = pipe._contexts([p["text"]], [""], 1.0, 0, K)
            errs = torch.stack([denoising_error(denoiser, z, [sg], noise[i : i + 1], cond) for i, sg in enumerate(sigmas)])
            rows.append({"heldout": p["heldout"], "count": p["count"], "errs": errs,  # (levels, K)
                         "right": [bool(c["scores"]["count"]) for c in checks],
                         "found": [len(c["objects"]) for c in checks]})  # fmt: skip
        print(f"{p['text']}: {time.time() - t0:.0f} s", flush=True)

    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= K]
    groups = [[i] for i in range(len(fracs))] + [list(range(len(fracs)))]
    default = [fracs.index(f) for f in RANK_LEVELS if f in fracs]
    if len(default) == len(RANK_LEVELS):
        groups.append(default)
    for heldout in (False, True):
        part = [r for r in rows if r["heldout"] == heldout]
        print(f"\n{'held out' if heldout else 'seen'} count prompts, {len(part)} seeds (base seed {args.seed}, "
              f"{args.draws} draws per level): the pick among the first k candidates, k = {ks}")  # fmt: skip
        for g in groups:
            cells = []
            for kk in ks:
                picks = [int(r["errs"][g, :kk].sum(0).argmin()) for r in part]
                right = sum(r["right"][c] for r, c in zip(part, picks))
                many = sum(r["found"][c] > r["count"] for r, c in zip(part, picks))
                few = sum(r["found"][c] < r["count"] for r, c in zip(part, picks))
                cells.append(f"{right}/{len(part)} (+{many} -{few})")
            name = "+".join(f"{fracs[i]:g}T" for i in g)
            print(f"  {name:22s}", "  ".join(cells))
        print(f"  {'oracle':22s}", "  ".join(f"{sum(any(r['right'][:kk]) for r in part)}/{len(part)}" for kk in ks))


if __name__ == "__main__":
    main()
