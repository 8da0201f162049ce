"""Count prompts guided away from their own count edits (composable negatives, Liu et al. 2022).

    python benchmarks/counts/count_negatives.py GUIDANCE W_ONE W_THREE

The guided denoiser is D = D_e + g (D_c - D_e) - w1 (D_one - D_e) - w3 (D_three - D_e): D_e the empty prompt,
D_c the prompt ("two red circles and a blue square"), D_one and D_three the same with "a red circle" and
"three red circles". A negative prompt in place of the empty one is the case w = g - 1 for that edit alone
(D_n + g (D_c - D_n)). The eval's count prompts and seeds, 20 DPM-Solver++(2M) steps, Karras σ, scored by the
eval's checker: right counts, and how the others miss (too few objects: merged; too many).
"""

import sys

import torch
from clip_rerank import count_edits  # this folder is on sys.path when the script runs

import sfumato
from sfumato.eval.checker import check
from sfumato.eval.shapes import prompt_set
from sfumato.pipelines import stable_diffusion as sd


def main() -> None:
    g, w1, w3 = (float(a) for a in sys.argv[1:4])
    torch.set_num_threads(2)
    pipe = sfumato.load("src/sfumato/assets/shapes")
    edits: dict[str, dict] = {}

    def composed(denoiser, guidance, cond, uncond):
        def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            parts = [uncond, cond, edits["one"], edits["three"]]
            kwargs = {key: torch.cat([c[key] for c in parts]) for key in cond}
            sigma = torch.as_tensor(sigma)
            d_e, d_c, d_1, d_3 = denoiser(torch.cat([x] * 4), torch.cat([sigma] * 4) if sigma.ndim else sigma,
                                          **kwargs).chunk(4)  # fmt: skip
            return d_e + guidance * (d_c - d_e) - w1 * (d_1 - d_e) - w3 * (d_3 - d_e)

        return guided

    sd.classifier_free_guidance = composed  # what StableDiffusion._denoise calls
    tally = {False: [0, 0, 0, 0], True: [0, 0, 0, 0]}  # right, too few, too many, images
    for k, p in enumerate(prompt_set()):
        if p["category"] != "count":
            continue
        for name, text in zip(("one", "three"), count_edits(p["text"])):  # "a X ...", "three X ..."
            edits[name] = pipe._contexts([text], [""], 3.0, 0, 4)[0]
        images = pipe.generate([p["text"]], batch=4, seed=[k * 4 + j for j in range(4)], steps=20, guidance=g,
                               sampler="dpmpp_2m", karras=True, progress=False)  # fmt: skip
        for im in images:
            miss = len(check(im, p)["objects"]) - p["count"]
            t = tally[p["heldout"]]
            t[0], t[1], t[2], t[3] = t[0] + (miss == 0), t[1] + (miss < 0), t[2] + (miss > 0), t[3] + 1
    for heldout, (right, few, many, n) in tally.items():
        print(f"g {g} w_one {w1} w_three {w3} {'held out' if heldout else 'seen'}: {right}/{n} right, "
              f"{few} too few, {many} too many")  # fmt: skip


if __name__ == "__main__":
    main()
