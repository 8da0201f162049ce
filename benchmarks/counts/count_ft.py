"""Fine-tune a bundle's high-noise expert (and its text encoder) on captions where "two X" alone is common.

    python benchmarks/counts/count_ft.py src/sfumato/assets/shapes runs/count/ft40 600 0.4
    sfumato eval shapes --model runs/count/ft40/final --categories count --no-clip --out runs/count/eval-ft40

The question: do the count failures come from the data, where "two X" alone captions ~7 images per colour-shape
pair against ~40 for "two X and a Y"? Here a two-object layout repeats its first kind with probability P2
(the last argument) and is then always captioned with its count ("two red circles"); three-object layouts are
as in the recipe. `--stats` prints caption counts and stops. `--resume` continues OUT.
"""

import random
import sys
from dataclasses import replace
from pathlib import Path

import torch

from sfumato.checkpoints.bundle import load_bundle
from sfumato.data import shapes as S
from sfumato.data.cache import build_latent_cache
from sfumato.training.ldm import HighNoiseExpertTask
from sfumato.training.loop import TrainConfig, train
from sfumato.training.recipes import RECIPES


class CountShapes(S.ShapesDataset):
    """The recipe's data, with two-object layouts made alike (and counted) with probability `p2`."""

    def __init__(self, *args, p2: float, **kw):
        super().__init__(*args, **kw)
        self.p2 = p2

    def attributes(self, i: int) -> dict:
        a = super().attributes(i)
        rng = random.Random(S._item_seed(self.seed + 7919, self._index(i)))
        objs = a["objects"]
        if len(objs) != 2 or rng.random() >= self.p2:
            return a
        kind = (objs[0]["color"], objs[0]["shape"])
        for _ in range(50):
            new = S._place(rng, [kind, kind], [o["size"] for o in objs], self.image_size)
            new = new or S._place(rng, [kind, kind], ["small", "small"], self.image_size)
            if new is not None:
                caption = S._counted(rng, new, rng.random() < 0.4)
                return {**a, "objects": new, "relation": None, "position": None, "caption": caption}
        return a

    def fingerprint(self) -> str:
        return super().fingerprint() + f":count_ft:{self.p2}"


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    bundle, out, steps = args[0], Path(args[1]), int(args[2])
    p2 = float(args[3]) if len(args) > 3 else 0.5
    torch.manual_seed(0)
    r = RECIPES["expert"]["shapes"]
    ds = CountShapes(r.data_size, r.image_size, seed=0, holdout=S.DEFAULT_HOLDOUT, p2=p2, **r.shapes_options)
    caps = [ds.attributes(i)["caption"] for i in range(3000)]
    alone = sum(c.startswith("two ") and " and " not in c for c in caps)
    with_other = sum("two " in c and " and " in c for c in caps)
    print(f"p2={p2}: of 3000 captions {alone} are 'two X' alone, {with_other} 'two X and a Y'", flush=True)
    if "--stats" in sys.argv:
        return

    b = load_bundle(bundle, dtype=torch.float32)
    pair, encoders = b.unet, b.text_encoder  # NoiseLevelExperts, ExpertTextEncoders
    base = replace(b, unet=pair.low, text_encoder=encoders.low)
    cache = build_latent_cache(ds, b.vae, encoders.low, b.tokenizer, out / "cache", progress=True)
    task = HighNoiseExpertTask(base, pair.high.config, boundary=int(pair.boundary), caption_dropout=r.caption_dropout,
                               cache=cache, min_snr_gamma=r.min_snr_gamma, min_snr_floor=r.min_snr_floor, seed=1,
                               preview_prompts=("two yellow circles", "two red squares"), train_text_encoder=True)  # fmt: skip
    task.joint.unet.load_state_dict(pair.high.state_dict())
    task.joint.text_encoder.load_state_dict(encoders.high.state_dict())
    cfg = TrainConfig(steps=steps, batch_size=64, lr=1e-4, warmup_steps=50, ema_decay=0.995, preview_every=10**9,
                      checkpoint_every=100, log_every=25, seed=1)  # fmt: skip
    print(train(task, ds, cfg, out, resume="--resume" in sys.argv, progress=True), flush=True)


if __name__ == "__main__":
    main()
