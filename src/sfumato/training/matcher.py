"""Training an `ImageTextMatcher` (sfumato.models.matcher) over a frozen CLIP: true captions against edits.

Each image of a batch is paired with its own caption (label 1), with its caption edited to be false of it
(label 0; `false_caption`) and with another image's caption (label 0); the loss is binary cross-entropy on
the logits, the positives weighted by `pos_weight` (2: as much weight on them as on the two negatives), as
BLIP trains its matching head (Li et al. 2022, sec. 3.1), there with negatives mined from the contrastive
similarities, here made by editing the true caption. Other images' captions alone teach only which objects
are present; the edits teach what a caption says beyond that. The shapes data set's captions name every
object and count objects of one kind exactly, so changing a count, a colour, a shape, a size, a relation or
a place, or naming an object more or one less, always makes a caption that the image contradicts. Captions
in other words (an image folder's) get no edit, only the other images' captions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sfumato.checkpoints.native import save_model
from sfumato.data.shapes import (
    COLORS,
    NUMBERS,
    PLURALS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    list_phrases,
    true_positions,
    with_article,
)
from sfumato.models.clip import CLIP
from sfumato.models.matcher import ImageTextMatcher, MatcherConfig
from sfumato.pipelines.clip import clip_pixels
from sfumato.text.tokenizer import CLIPTokenizer
from sfumato.training.ldm import unwrap
from sfumato.training.task import BatchRandom, init_seeded

# the caption grammar is the data set's (`data.shapes`): its plurals, number words, articles and lists
_SINGULAR = {v: k for k, v in PLURALS.items()}
_NUMBER = {"a": 1, "an": 1, **{word: n for n, word in NUMBERS.items()}}
_PHRASE = re.compile(
    r"\b(a|an|two|three|four) (?:(small|large) )?("
    + "|".join(COLORS)
    + r") ("
    + "|".join(list(PLURALS) + list(PLURALS.values()))
    + r")\b"
)
_RELATION = re.compile(r" (" + "|".join(sorted(RELATIONS.values(), key=len, reverse=True)) + r") ")
_POSITION = re.compile(r" (" + "|".join(sorted(POSITIONS.values(), key=len, reverse=True)) + r")$")


def _phrase(n: int, size: str | None, color: str, shape: str) -> str:
    words = " ".join(w for w in (size, color, shape if n == 1 else PLURALS[shape]) if w)
    return with_article(words) if n == 1 else f"{NUMBERS[n]} {words}"


_MIRROR = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_RELATION_NAME = {words: name for name, words in RELATIONS.items()}
_FLIP = {RELATIONS[a]: RELATIONS[b] for a, b in _MIRROR.items()}  # "above" -> "below", "to the left of" -> ...


def states_holdout(caption: str, holdout: Mapping | None) -> bool:
    """Whether `caption` names a held-out colour-shape pair or states a held-out relation (either way round),
    in the shapes data set's words; holdout like `data.shapes.DEFAULT_HOLDOUT`, or None."""
    if not holdout:
        return False
    pairs = {tuple(p) for p in holdout.get("color_shape", ())}
    found = [(m[3], _SINGULAR.get(m[4], m[4])) for m in _PHRASE.finditer(caption)]
    if any(k in pairs for k in found):
        return True
    relation = _RELATION.search(caption)
    if relation and len(found) == 2:
        (c1, s1), (c2, s2) = found
        rel = _RELATION_NAME[relation[1]]
        facts = {(c1, s1, rel, c2, s2), (c2, s2, _MIRROR[rel], c1, s1)}
        return bool(facts & {tuple(r) for r in holdout.get("relation", ())})
    return False


def false_caption(caption: str, attributes: Mapping, rng: random.Random, holdout: Mapping | None = None,
                  tries: int = 8) -> str | None:  # fmt: skip
    """`edited_caption`, drawn again (up to `tries` times) while it names what `holdout` holds out: a model
    that saw "a red triangle" only in false captions would learn that the words are false, and the held-out
    combinations would no longer measure generalisation."""
    for _ in range(tries):
        edited = edited_caption(caption, attributes, rng)
        if edited is None or not states_holdout(edited, holdout):
            return edited
    return None


def edited_caption(caption: str, attributes: Mapping | None, rng: random.Random) -> str | None:
    """A caption that the image of `caption` contradicts, made by one edit chosen at random among those that
    apply, or None when none does. attributes: the item's (`ShapesDataset.attributes`), for true places; None
    (an image folder's item): no place is edited.

    Edits: another count for one group of objects ("two red circles" -> "three red circles" / "a red
    circle"); one group named more or left out; another colour or shape for one group; the colours of two
    groups exchanged; another size word; the relation reversed; another place, one that does not hold."""
    found = [
        (m.span(), _NUMBER[m[1]], m[2], m[3], _SINGULAR.get(m[4], m[4])) for m in _PHRASE.finditer(caption)
    ]
    if not found:
        return None
    relation = _RELATION.search(caption)
    position = _POSITION.search(caption)
    kinds = {(c, s) for _, _, _, c, s in found}
    edits = ["colour", "shape"]
    if not relation and not position:
        edits += ["count", "add"] + (["drop"] if len(found) > 1 else [])
    if any(a[3] != b[3] and a[4] != b[4] for a in found for b in found):  # colours and shapes both differ
        edits.append("swap")
    if any(size for _, _, size, _, _ in found):
        edits.append("size")
    if relation and len({(size, c, s) for _, _, size, c, s in found}) > 1:  # "an X left of an X" holds both ways
        edits.append("relation")
    if position and attributes is not None:
        edits.append("position")
    edit = edits[rng.randrange(len(edits))]
    if edit == "relation":
        a, b = relation.span(1)
        return caption[:a] + _FLIP[relation[1]] + caption[b:]
    if edit == "position":
        obj = attributes["objects"][0]
        wrong = [p for p in POSITIONS if p not in true_positions(obj["center"], attributes["image_size"])]
        a, b = position.span(1)
        return caption[:a] + POSITIONS[wrong[rng.randrange(len(wrong))]] + caption[b:]
    parts = [[n, size, c, s] for _, n, size, c, s in found]
    k = rng.randrange(len(parts))
    if edit == "count":
        parts[k][0] = rng.choice([n for n in (1, 2, 3) if n != parts[k][0]])
    elif edit == "add":
        free = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in kinds]
        c, s = free[rng.randrange(len(free))]
        parts.insert(rng.randrange(len(parts) + 1), [1, None, c, s])
    elif edit == "drop":
        parts.pop(k)
    elif edit == "colour":
        parts[k][2] = rng.choice([c for c in COLORS if c != parts[k][2]])
    elif edit == "shape":
        parts[k][3] = rng.choice([s for s in SHAPES if s != parts[k][3]])
    elif edit == "swap":
        k, j = rng.choice(
            [
                (k, j)
                for k, p in enumerate(parts)
                for j, q in enumerate(parts)
                if k < j and p[2] != q[2] and p[3] != q[3]
            ]
        )
        parts[k][2], parts[j][2] = parts[j][2], parts[k][2]
    elif edit == "size":
        k = rng.choice([i for i, p in enumerate(parts) if p[1]])
        parts[k][1] = "small" if parts[k][1] == "large" else "large"
    phrases = [_phrase(*p) for p in parts]
    if edit in ("add", "drop"):  # the list's own words change: rewrite it
        return list_phrases(phrases)
    out, last = [], 0  # keep everything between the groups (relation or place words, "and", commas)
    for (span, *_), phrase in zip(found, phrases):
        out += [caption[last : span[0]], phrase]
        last = span[1]
    return "".join(out) + caption[last:]


class MatcherTask:
    """The `Task` that trains an `ImageTextMatcher` over the frozen `clip` (see the module docstring).

    tokenizer: the CLIP's. config: the head (default `MatcherConfig.for_clip(clip.config)`).
    holdout: the data set's held-out combinations (`data.shapes.DEFAULT_HOLDOUT`): no false caption names them.
    """

    name = "matcher"

    def __init__(
        self,
        clip: CLIP,
        tokenizer: CLIPTokenizer,
        config: MatcherConfig | None = None,
        *,
        seed: int = 0,
        holdout: Mapping | None = None,
        pos_weight: float = 2.0,
    ):
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config or MatcherConfig.for_clip(clip.config)
        self.seed, self.holdout, self.pos_weight = seed, holdout, float(pos_weight)
        self.matcher = init_seeded(lambda: ImageTextMatcher(self.config), seed)
        self.matcher.check_clip(clip)

    def trainable(self) -> ImageTextMatcher:
        return self.matcher

    def captions(self, batch: dict, step: int) -> list[str]:
        """The batch's B captions, then B false ones, then B other images' captions. Each item's draws are a
        function of (seed, step, its index), so a resumed run and any split over processes draw the same."""
        captions = list(batch["caption"])
        attributes = batch.get("attributes") or [None] * len(captions)
        B = len(captions)
        edited, others = [], []
        for i, (caption, attrs, index) in enumerate(zip(captions, attributes, batch["index"].tolist())):
            rng = random.Random(f"{self.seed}/{step}/{index}")
            other = captions[(i + 1 + rng.randrange(B - 1)) % B] if B > 1 else ""
            edited.append(false_caption(caption, attrs, rng, self.holdout) or other)
            others.append(other)
        return captions + edited + others

    def loss(self, batch: dict, rng: BatchRandom, step: int, model: nn.Module) -> tuple[torch.Tensor, dict]:
        device = next(model.parameters()).device
        if next(self.clip.parameters()).device != device:
            self.clip.to(device)
        pixels = clip_pixels(batch["image"].to(device), self.clip.config.vision.image_size)
        texts = self.captions(batch, step)
        B = len(texts) // 3
        T = min(self.tokenizer.context_length, self.clip.config.text.context_length)
        ids = self.tokenizer(texts, context_length=T).to(device)
        image_of = torch.arange(B, device=device).repeat(3)
        logits = model(self.clip, pixels, ids, image_of).float()
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).to(device)
        loss = F.binary_cross_entropy_with_logits(
            logits, labels, pos_weight=torch.tensor(self.pos_weight, device=device)
        )
        with torch.no_grad():
            right = (logits > 0) == labels.bool()
            metrics = {"loss": loss.item(), "acc_true": right[:B].float().mean().item(),
                       "acc_edited": right[B : 2 * B].float().mean().item(),
                       "acc_other": right[2 * B :].float().mean().item()}  # fmt: skip
        return loss, metrics

    def preview(self, model: nn.Module, step: int, folder) -> list[Path]:
        return []  # the metrics say how it does; nothing to look at

    def export(self, model: nn.Module, folder) -> list[Path]:
        """`matcher.safetensors`: the head alone (native format; it reads the CLIP it was trained on)."""
        return [save_model(unwrap(model), Path(folder) / "matcher.safetensors")]
