"""Best of K by the shipped CLIP: does picking the candidate nearest the prompt fix the count prompts?

    python benchmarks/counts/clip_rerank.py [K]          # default K = 8

For every count prompt and each of the eval's 4 seeds s, K candidates are drawn with seeds s + c * 100000
(c = 0 is the eval's own image), at the eval's settings (guidance 3, 20 DPM-Solver++(2M) steps, Karras σ).
Each candidate is scored three ways by the shipped CLIP: its cosine similarity to the prompt ("sim"), that
minus the best similarity to the prompt's count edits ("a X", "three X", "four X": "margin"), and the log
softmax of the prompt among itself and those edits at temperature 1/100 ("logp"). The pick of the first k
candidates (k = 1, 2, 4, ..., K) is scored by the eval's checker; "oracle" counts the seeds for which any of
the first k candidates has the right count (the ceiling of any reranker). Pairs: among candidates of one seed
whose counts differ, how often the prompt's similarity prefers the right one.
"""

import math
import re
import sys

import torch

import sfumato
from sfumato.data.shapes import _PLURALS, _with_article
from sfumato.eval.checker import check
from sfumato.eval.shapes import prompt_set
from sfumato.pipelines.clip import CLIPPipeline
from sfumato.text.tokenizer import CLIPTokenizer

SINGULAR = {plural: shape for shape, plural in _PLURALS.items()}  # "circles" -> "circle"
SCORES = {
    "sim": lambda s: s[0],
    "margin": lambda s: s[0] - max(s[1:]),
    "logp": lambda s: 100 * s[0] - math.log(sum(math.exp(100 * x) for x in s)),
}


def count_edits(text: str) -> list[str]:
    """ "two red circles and a blue square" -> the same with "a red circle", "three ...", "four ..."; a size
    word may come first ("two small red circles ..."). The "a X" edit is left out where the words after the
    colour are not a known plural."""
    m = re.match(r"two ((?:small |large )?\w+) (\w+)(.*)", text)
    edits = [f"three {text[4:]}", f"four {text[4:]}"]
    if m and m.group(2) in SINGULAR:
        edits.insert(0, _with_article(f"{m.group(1)} {SINGULAR[m.group(2)]}") + m.group(3))
    return edits


def main() -> None:
    K = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.set_num_threads(2)
    shipped = "src/sfumato/assets/shapes"
    pipe = sfumato.load(shipped)
    clip = CLIPPipeline.from_pretrained(f"{shipped}/clip.safetensors",
                                        tokenizer=CLIPTokenizer.from_pretrained(f"{shipped}/tokenizer"))  # fmt: skip
    rows = []  # one per (prompt, eval seed): its K candidates' similarities and count verdicts
    for k, p in enumerate(prompt_set()):
        if p["category"] != "count":
            continue
        seeds = [k * 4 + j for j in range(4)]  # the eval's seeds for prompt k (seed 0, 4 per prompt)
        images = pipe.generate([p["text"]], batch=4 * K, seed=[s + c * 100_000 for s in seeds for c in range(K)],
                               steps=20, guidance=3.0, sampler="dpmpp_2m", karras=True, progress=False)  # fmt: skip
        sims = clip.encode_images(images) @ clip.encode_texts([p["text"], *count_edits(p["text"])]).T
        right = [bool(check(im, p)["scores"]["count"]) for im in images]
        for j in range(4):
            rows.append({"heldout": p["heldout"], "cands": [(sims[j * K + c].tolist(), right[j * K + c])
                                                            for c in range(K)]})  # fmt: skip
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= K]
    for heldout in (False, True):
        part = [r for r in rows if r["heldout"] == heldout]
        print(f"{'held out' if heldout else 'seen'} count prompts, {len(part)} seeds: right counts of the pick "
              f"among the first k candidates, k = {ks}")  # fmt: skip
        for name, score in SCORES.items():
            picks = [[max(r["cands"][:k], key=lambda c: score(c[0]))[1] for r in part] for k in ks]
            print(f"  {name:7s}", "  ".join(f"{sum(p)}/{len(p)}" for p in picks))
        print("  oracle ", "  ".join(f"{sum(any(c[1] for c in r['cands'][:k]) for r in part)}/{len(part)}" for k in ks))
    agree = disagree = 0
    for r in rows:
        for a in range(K):
            for b in range(a + 1, K):
                (sa, ra), (sb, rb) = r["cands"][a], r["cands"][b]
                if ra != rb:
                    agree, disagree = (agree + 1, disagree) if (sa[0] > sb[0]) == ra else (agree, disagree + 1)
    print(f"pairs of one seed's candidates with different counts: the prompt's similarity prefers the right one "
          f"in {agree}, the wrong one in {disagree}")  # fmt: skip


if __name__ == "__main__":
    main()
