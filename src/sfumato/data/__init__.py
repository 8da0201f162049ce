"""Datasets: image-caption folders and built-in synthetic data.

Every image dataset here is a `torch.utils.data.Dataset` whose item i is a dict
    {"image": (3, H, W) float32 in [-1, 1], "caption": str, "index": i, ...other JSON-able values}
and whose random augmentation, if any, depends on (seed, epoch, index) only; such datasets have
`set_epoch(epoch)`. `collate` turns a list of items into a batch; `load_dataset` builds one from a name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .folder import IMAGE_EXTENSIONS, CorruptImageWarning, ImageCaptionFolder
from .shapes import (
    BACKGROUND,
    COLORS,
    DEFAULT_HOLDOUT,
    SHAPES,
    SIZES,
    ShapesDataset,
    holdout_prompts,
    relation_between,
    render,
    states_relation,
    true_positions,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "DEFAULT_HOLDOUT",
    "IMAGE_EXTENSIONS",
    "SHAPES",
    "SIZES",
    "CorruptImageWarning",
    "ImageCaptionFolder",
    "Oversampled",
    "ShapesDataset",
    "collate",
    "holdout_prompts",
    "load_dataset",
    "relation_between",
    "render",
    "states_relation",
    "true_positions",
]


def collate(items: list[dict]) -> dict:
    """A batch from dataset items: tensors stacked (B, ...), ints (not bools) as a LongTensor (B,), every
    other value (str, float, bool, dict, list, None) kept as a Python list of length B in item order."""
    if not items:
        raise ValueError("collate needs at least one item, got an empty list")
    keys = list(items[0])
    for k, item in enumerate(items):
        if set(item) != set(keys):
            raise KeyError(f"item {k} of the batch has keys {sorted(item)}, but item 0 has {sorted(keys)}")
    batch = {}
    for key in keys:
        values = [item[key] for item in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


class Oversampled(torch.utils.data.Dataset):
    """`dataset` with some items drawn `times` times per epoch instead of once.

    An epoch holds every item of `dataset` once, then the items whose caption passes `keep` (e.g.
    `states_relation`) `times - 1` more times each; the training loop's permutation mixes them. Items come back
    unchanged, "index" included, so a latent cache of `dataset` (keyed on that index) serves them: build the
    cache on `dataset` itself. Captions are read with `dataset.caption(i)` where it exists (no image loaded).
    """

    def __init__(self, dataset, keep, times: int):
        if int(times) != times or times < 1:
            raise ValueError(f"times must be a whole number >= 1 (1 draws every item once), got {times}")
        caption = getattr(dataset, "caption", None) or (lambda i: dataset[i]["caption"])
        self.dataset, self.times = dataset, int(times)
        self.kept = [i for i in range(len(dataset)) if keep(caption(i))]
        self.order = list(range(len(dataset))) + self.kept * (self.times - 1)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int) -> dict:
        return self.dataset[self.order[j]]


def load_dataset(spec: str, *, image_size: int, **kw) -> torch.utils.data.Dataset:
    """A dataset from a name: "shapes" or "shapes:SEED" -> `ShapesDataset(image_size=..., seed=SEED, **kw)`;
    a folder path -> `ImageCaptionFolder(path, image_size, **kw)`. (For a folder literally named "shapes",
    write "./shapes".)"""
    spec = str(spec)
    if spec == "shapes" or spec.startswith("shapes:"):
        if spec != "shapes":
            seed_text = spec.split(":", 1)[1]
            try:
                seed = int(seed_text)
            except ValueError:
                raise ValueError(
                    f"in dataset {spec!r} the seed must be an integer, got {seed_text!r}"
                ) from None
            if "seed" in kw:
                raise ValueError(
                    f"dataset {spec!r} names a seed and seed={kw['seed']} was passed too; give one"
                )
            kw["seed"] = seed
        return ShapesDataset(image_size=image_size, **kw)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageCaptionFolder(path, image_size, **kw)
    if path.exists():
        raise ValueError(f"dataset {spec!r} is a file; give the folder that holds the images and captions")
    raise ValueError(
        f"unknown dataset {spec!r}: not 'shapes', 'shapes:SEED' (e.g. 'shapes:1') nor an existing folder"
    )
