"""Decode the sampler's denoised estimate at every step, one strip per seed (the last frame is the image).

    python benchmarks/counts/trace.py "two small red squares" 324,325,326,327 trace.png [GUIDANCE] [--uniform]

Seeds 324-327 are what `sfumato eval shapes` gives its first count prompt. --uniform: the schedule's own
(trailing) spacing instead of Karras sigmas.
"""

import sys

import torch
from PIL import Image

import sfumato


def main() -> None:
    torch.set_num_threads(1)
    prompt, seeds, out = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
    rest = [a for a in sys.argv[4:] if not a.startswith("--")]
    guidance = float(rest[0]) if rest else 3.0
    karras = "--uniform" not in sys.argv
    pipe = sfumato.load("src/sfumato/assets/shapes")
    rows = []
    for seed in seeds:
        frames: list[Image.Image] = []

        def keep(info: dict, frames=frames) -> None:
            frames.append(pipe.decode(info["denoised"][:1])[0])

        image = pipe.generate(prompt, seed=seed, steps=20, guidance=guidance, karras=karras, progress=False,
                              callback=keep)[0]  # fmt: skip
        rows.append([*frames, image])
    size = rows[0][0].size[0]
    sheet = Image.new("RGB", (size * len(rows[0]), size * len(rows)), "white")
    for r, frames in enumerate(rows):
        for c, frame in enumerate(frames):
            sheet.paste(frame.convert("RGB"), (size * c, size * r))
    sheet.resize((sheet.width * 3, sheet.height * 3), Image.Resampling.NEAREST).save(out)


if __name__ == "__main__":
    main()
