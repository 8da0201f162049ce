"""Best of K with the model as a count classifier: does comparing a candidate's denoising error under the prompt
with its errors under the prompt's count edits pick right counts more often than the error alone?

    python benchmarks/counts/count_classifier.py [--k 4] [--seed 50000] [--levels 0.2,...,0.8] [--draws 4]
                                                 [--model DIR]

Li et al. 2023 classify an image by which prompt's conditional denoiser restores it best from noise. Here the
classes are the prompt ("two red squares") and its count edits ("a red square", "three red squares"); all of
them and every candidate of one seed share the noise draws (common random numbers), so the differences
err(prompt) - err(edit) carry little of the estimator's noise. Candidates, seeds and the checker are as in
`denoiser_rerank.py` (guidance 3, 20 DPM-Solver++(2M) steps, Karras σ; base seed 50000 keeps the eval's own
seeds out of the tuning). Rules compared, for the levels alone and in groups (errors summed over the group):

  error     least err(prompt) (the shipped rule, `pipelines.ranking`)
  margin    least err(prompt) - min over edits err(edit): the candidate the classifier most prefers the
            prompt for
  gate      least err(prompt) among the candidates the classifier gives the prompt (err(prompt) below every
            edit's), else least err(prompt)

The table: right of N seeds (+ too many / - too few objects) for the pick among the first k candidates.
"""

import argparse
import re
import time

import torch

import sfumato
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.eval.checker import check
from sfumato.eval.shapes import prompt_set
from sfumato.pipelines.ranking import candidate_seeds, denoising_error, ranking_seed
from sfumato.pipelines.steps import plan_steps


def singular(noun: str) -> str:
    return noun[:-2] if re.search(r"(s|x|ch|sh)es$", noun) else noun[:-1]


def count_edits(text: str) -> list[str]:
    """'two red squares ...' -> ['a red square ...', 'three red squares ...'] (the eval's count prompts all
    open with 'two': one fewer and one more of the first kind)."""
    m = re.match(r"two (\w+) (\w+)(.*)$", text)
    if m is None:
        raise ValueError(f"expected a prompt opening 'two <colour> <shapes>', got {text!r}")
    colour, shapes, rest = m.groups()
    one = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {singular(shapes)}{rest}"
    return [one, f"three {colour} {shapes}{rest}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=50_000)
    ap.add_argument("--levels", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--model", default="src/sfumato/assets/shapes")
    ap.add_argument("--save", default=None, help="torch.save the per-seed rows here (errors, verdicts)")
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
        texts = [p["text"], *count_edits(p["text"])]
        for j in range(4):
            s = args.seed + k * 4 + j
            z = pipe.generate(p["text"], seed=candidate_seeds(s, K), batch=K, candidates=1, steps=20, guidance=3.0,
                              sampler="dpmpp_2m", karras=True, progress=False, output="latent")  # fmt: skip
            checks = [check(im, p) for im in pipe.decode(z)]
            gen = torch.Generator().manual_seed(ranking_seed(s))
            noise = torch.randn((len(sigmas), args.draws, 1, *z.shape[1:]), generator=gen).expand(-1, -1, K, -1, -1, -1)
            errs = []  # (texts, levels, K)
            for text in texts:
                cond, _ = pipe._contexts([text], [""], 1.0, 0, K)
                errs.append(torch.stack([denoising_error(denoiser, z, [sg], noise[i : i + 1], cond)
                                         for i, sg in enumerate(sigmas)]))  # fmt: skip
            rows.append({"heldout": p["heldout"], "count": p["count"], "errs": torch.stack(errs),
                         "right": [bool(c["scores"]["count"]) for c in checks],
                         "found": [len(c["objects"]) for c in checks]})  # fmt: skip
        print(f"{p['text']} (edits {texts[1:]}): {time.time() - t0:.0f} s", flush=True)
    if args.save:
        torch.save(rows, args.save)

    def pick(e: torch.Tensor, rule: str) -> int:  # e: (texts, k) summed over the group's levels
        if rule == "error":
            return int(e[0].argmin())
        margin = e[0] - e[1:].min(0).values
        if rule == "margin":
            return int(margin.argmin())
        ok = margin < 0
        return int(torch.where(ok, e[0], torch.inf).argmin()) if ok.any() else int(e[0].argmin())

    ks = [k for k in (1, 2, 4, 8, 16) if k <= K]
    n = len(fracs)
    groups = []  # each level alone, the shipped levels, the expert's, all: empty and repeated groups dropped
    for g in [[i] for i in range(n)] + [[i for i in range(n) if 0.3 <= fracs[i] <= 0.5],
                                        [i for i in range(n) if fracs[i] >= 0.6], list(range(n))]:  # fmt: skip
        if g and g not in groups:
            groups.append(g)
    for heldout in (False, True):
        part = [r for r in rows if r["heldout"] == heldout]
        print(f"\n{'held out' if heldout else 'seen'} count prompts, {len(part)} seeds (base seed {args.seed}, "
              f"{args.draws} draws per level), pick among the first k = {ks}")  # fmt: skip
        for g in groups:
            name = "+".join(f"{fracs[i]:g}T" for i in g)
            for rule in ("error", "margin", "gate"):
                cells = []
                for kk in ks:
                    picks = [pick(r["errs"][:, g, :kk].sum(1), rule) for r in part]
                    right = sum(r["right"][c] for r, c in zip(part, picks))
                    many = sum(r["found"][c] > r["count"] for r, c in zip(part, picks))
                    few = sum(r["found"][c] < r["count"] for r, c in zip(part, picks))
                    cells.append(f"{right}/{len(part)} (+{many} -{few})")
                print(f"  {name:28s} {rule:7s}", "  ".join(cells))
        print(f"  {'oracle':36s}", "  ".join(f"{sum(any(r['right'][:kk]) for r in part)}/{len(part)}" for kk in ks))
        # how often the classifier alone names the right class for a candidate, by what the checker found
        for g in groups[n:] or groups:
            hit = tot = 0
            for r in part:
                e = r["errs"][:, g].sum(1)  # (texts, K)
                for c in range(K):
                    f = r["found"][c]
                    truth = {1: 1, r["count"]: 0, r["count"] + 1: 2}.get(f) if r["count"] == 2 else None
                    if truth is None:
                        continue
                    tot += 1
                    hit += int(e[:, c].argmin()) == truth
            print(f"  classifier right on {hit}/{tot} candidates with 1 / 2 / 3 of the first kind "
                  f"({'+'.join(f'{fracs[i]:g}T' for i in g)})")  # fmt: skip


if __name__ == "__main__":
    main()
