"""Does the shipped CLIP tell "two X" from "a X" and "three X" on real renders (an unseen data seed)?

    python benchmarks/counts/clip_counts.py
"""

import torch

from sfumato.data.shapes import DEFAULT_HOLDOUT, ShapesDataset
from sfumato.pipelines.clip import CLIPPipeline
from sfumato.text.tokenizer import CLIPTokenizer

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}


def main() -> None:
    shipped = "src/sfumato/assets/shapes"
    clip = CLIPPipeline.from_pretrained(f"{shipped}/clip.safetensors",
                                        tokenizer=CLIPTokenizer.from_pretrained(f"{shipped}/tokenizer"))  # fmt: skip
    ds = ShapesDataset(20000, 32, seed=20261123, holdout=DEFAULT_HOLDOUT)

    def sims(image, texts) -> torch.Tensor:
        return (clip.encode_images([image]) @ clip.encode_texts(texts).T)[0]  # both L2-normalised

    def one(c: str, s: str) -> str:
        return f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}"

    n = over_one = over_three = 0
    for i in range(len(ds)):
        objs = ds.attributes(i)["objects"]
        if len(objs) == 2 and (objs[0]["color"], objs[0]["shape"]) == (objs[1]["color"], objs[1]["shape"]):
            c, s = objs[0]["color"], objs[0]["shape"]
            sim = sims(ds.image(i), [f"two {c} {PLURALS[s]}", one(c, s), f"three {c} {PLURALS[s]}"])
            n, over_one, over_three = n + 1, over_one + bool(sim[0] > sim[1]), over_three + bool(sim[0] > sim[2])
    print(f"two alike: {n} images; 'two X' scores above 'a X' in {over_one}, above 'three X' in {over_three}")
    m = right = 0
    for i in range(3000):
        objs = ds.attributes(i)["objects"]
        if len(objs) == 1:
            c, s = objs[0]["color"], objs[0]["shape"]
            sim = sims(ds.image(i), [one(c, s), f"two {c} {PLURALS[s]}"])
            m, right = m + 1, right + bool(sim[0] > sim[1])
    print(f"one object: 'a X' scores above 'two X' in {right} of {m}")


if __name__ == "__main__":
    main()
