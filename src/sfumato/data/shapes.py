"""The built-in `shapes` data set: coloured geometric shapes on a plain background, with true captions.

It exists to train a small text-to-image model on a CPU and to measure prompt following afterwards: every
item carries its ground truth (`ShapesDataset.attributes`), so a checker can segment a generated image by
colour, classify the shapes and compare them with what the prompt asked for.

    ds = ShapesDataset(10_000, image_size=32, seed=0)
    ds[7]  -> {"image": (3, 32, 32) float32 in [-1, 1], "caption": "a small red circle above a blue square",
               "index": 7, "attributes": {"objects": [...], "relation": {...}, "caption": ..., ...}}

Item i is a pure function of (seed, i): its random numbers come from a `random.Random` seeded with a BLAKE2b
hash of both, so items do not depend on each other, on the order they are read in, or on the process.

Rendering: shapes are filled polygons drawn with PIL at `SUPERSAMPLE` (4) times the output resolution and
reduced by averaging each 4x4 block (a box filter, `Image.reduce`). That is exact 16-sample coverage
anti-aliasing: edges are smooth, and unlike Lanczos the box filter cannot ring, so no pixel takes a colour
that is neither the shape's, the background's nor a blend of the two.

Geometry (coordinates in output pixels, x right, y down, pixel (i, j) covering [i, i+1) x [j, j+1)):
every shape is given by its centre and its `radius` r, half the side of its axis-aligned bounding box, and
touches all four sides of that box: circle (radius r), square (side 2r), triangle (apex up, base 2r, height
2r), diamond (a square on its corner, diagonals 2r) and cross (a plus sign, arms 2r long and 0.8r thick).
The centre of the box lies inside every shape, so the pixel under `center` has the object's colour.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# A plain light grey, farther from every colour below than they are from each other (white is what flattened
# transparent images become, so keeping off it keeps the two apart for a checker).
BACKGROUND = (235, 235, 235)

# Saturated colours chosen far apart: the closest pair (orange, yellow) is ~100 apart in RGB and every pair is
# at least ~40 apart in CIELAB. Hues: red 357, orange 34, yellow 55, green 128, blue 222, purple 289 degrees.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 20, 30),
    "orange": (255, 145, 0),
    "yellow": (250, 235, 50),
    "green": (30, 160, 50),
    "blue": (25, 90, 240),
    "purple": (170, 40, 200),
}

# All five stay distinguishable at 32 px, small ones included (see the module docstring for their geometry).
SHAPES = ("circle", "square", "triangle", "diamond", "cross")

# Size word -> range of `radius` (half the bounding-box side) as a fraction of image_size. At 32 px a small
# shape is 7-10 px across and a large one 14-18 px; the gap between the ranges keeps the words unambiguous.
SIZES: dict[str, tuple[float, float]] = {"small": (0.11, 0.15), "large": (0.22, 0.28)}

# Relation name (as stored in attributes) -> caption words. "A above B" reads: A's centre is higher.
RELATIONS: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left of": "to the left of",
    "right of": "to the right of",
}
_STATES_RELATION = re.compile(r"\b(?:" + "|".join(sorted(RELATIONS.values(), key=len, reverse=True)) + r")\b")


def states_relation(caption: str) -> bool:
    """Whether a caption relates two objects in the data set's words ("a red circle above a blue square",
    "... to the left of ..."); places of one object ("on the left", "at the top") do not count."""
    return _STATES_RELATION.search(caption.lower()) is not None

# Position name (see `true_positions`) -> caption words, for one-object captions.
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
    "center": "in the center",
}

# Combinations never rendered by `ShapesDataset(..., holdout=DEFAULT_HOLDOUT)`, to test compositional
# generalisation: each held-out colour and shape still appears in other combinations during training.
# "relation" entries (colour, shape, relation, colour, shape) exclude every image in which such a pair of
# objects stands in that relation by `relation_between`, whatever its caption says.
DEFAULT_HOLDOUT: dict[str, list[tuple[str, ...]]] = {
    "color_shape": [("red", "triangle"), ("blue", "circle"), ("yellow", "square")],
    "relation": [("green", "circle", "above", "purple", "square")],
}

SUPERSAMPLE = 4  # drawing resolution / output resolution
_RENDER_VERSION = 1  # bump when a change to this file changes any item, so `fingerprint` changes too
_GAP = 0.05  # least background between two objects' bounding boxes, as a fraction of image_size
_BORDER = 0.03  # least background between an object and the image edge, as a fraction of image_size
_DOMINANCE = 2.0  # a relation holds when the centres' offset along its axis is >= 2x the offset across it
_CENTRAL = (0.375, 0.625)  # x / image_size below the first is "left", above the second "right" (same for y)
_MIDDLE = (0.4375, 0.5625)  # both coordinates within this band: "center"
_PLACE_TRIES = 50  # random positions tried per object before the layout is given up
_LAYOUT_TRIES = 200  # layouts tried per item before giving up (only very crowded settings get near it)
_MAX_OBJECTS = 4
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
NUMBERS = {2: "two", 3: "three", 4: "four"}
_CIRCLE = [(math.cos(2 * math.pi * k / 64), math.sin(2 * math.pi * k / 64)) for k in range(64)]


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of a shape centred at (cx, cy) whose bounding box has half-side r, in pixel coordinates."""
    if shape == "circle":
        return [(cx + r * c, cy + r * s) for c, s in _CIRCLE]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = 0.4 * r  # half the thickness of an arm
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def _rgb(color) -> tuple[int, int, int]:
    if isinstance(color, str):
        if color not in COLORS:
            raise ValueError(
                f"unknown colour {color!r}; choose one of {list(COLORS)} or give an (r, g, b) tuple"
            )
        return COLORS[color]
    return tuple(int(c) for c in color)


def render(objects: Sequence[Mapping], image_size: int, *, background=BACKGROUND) -> Image.Image:
    """Draw objects onto a plain background: an RGB PIL image of image_size x image_size.

    Each object is a dict with "shape" (one of SHAPES), "color" (a COLORS name or an (r, g, b) tuple),
    "center" [x, y] in pixels, and "radius" (half the bounding-box side, pixels) or, instead, "size"
    ("small" / "large": the middle of that size's range). The "objects" of `ShapesDataset.attributes` are
    such dicts, so `render(ds.attributes(i)["objects"], ds.image_size)` redraws item i exactly. Objects are
    drawn in order (later ones on top), at SUPERSAMPLE x the resolution, then box-filtered down.
    """
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * k, image_size * k), _rgb(background))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        if "radius" in obj:
            r = float(obj["radius"])
        else:
            lo, hi = SIZES[obj["size"]]
            r = (lo + hi) / 2 * image_size
        cx, cy = obj["center"]
        # PIL truncates vertices to integers and fills pixels on the boundary too, so a polygon from pixel a
        # to pixel b covers b - a + 1 pixels. A shape spanning [u0, u1) in output pixels should cover the
        # high-resolution pixels u0 * k ... u1 * k - 1: centre (c * k - 0.5), extent shrunk by one high-res
        # pixel, vertices rounded to the nearest integer (half up). Coverage is then exact to half a
        # high-resolution pixel (1/8 output pixel).
        scale = k - 1 / (2 * r)
        points = [
            (
                math.floor(cx * k - 0.5 + (x - cx) * scale + 0.5),
                math.floor(cy * k - 0.5 + (y - cy) * scale + 0.5),
            )
            for x, y in outline(obj["shape"], cx, cy, r)
        ]
        draw.polygon(points, fill=_rgb(obj["color"]))
    return canvas.reduce(k)  # the mean of each k x k block


def relation_between(a: Mapping, b: Mapping) -> str | None:
    """The spatial relation of object a to object b ("above", "below", "left of", "right of") or None.

    "a above b" holds when the vertical offset of the centres is at least twice the horizontal one and a's
    bounding box lies wholly above b's (touching allowed); the other three likewise. Anything more diagonal
    has no relation, so a caption never calls a mostly-sideways pair "above". Objects are dicts with
    "center" [x, y] and "bbox" [x0, y0, x1, y1], in image coordinates (y down).
    """
    (ax, ay), (bx, by) = a["center"], b["center"]
    dx, dy = bx - ax, by - ay
    if abs(dy) >= _DOMINANCE * abs(dx):
        if dy > 0 and a["bbox"][3] <= b["bbox"][1]:
            return "above"
        if dy < 0 and b["bbox"][3] <= a["bbox"][1]:
            return "below"
    if abs(dx) >= _DOMINANCE * abs(dy):
        if dx > 0 and a["bbox"][2] <= b["bbox"][0]:
            return "left of"
        if dx < 0 and b["bbox"][2] <= a["bbox"][0]:
            return "right of"
    return None


def true_positions(center: Sequence[float], image_size: int) -> list[str]:
    """The POSITIONS names that truly describe a centre: "left" when x < 3/8 of the width, "right" when
    x > 5/8 (likewise "top", "bottom"), the corner names when both hold, "center" when both coordinates are
    within 1/16 of the middle. A centre in between has no position word."""
    x, y = center[0] / image_size, center[1] / image_size
    lo, hi = _CENTRAL
    h = "left" if x < lo else "right" if x > hi else None
    v = "top" if y < lo else "bottom" if y > hi else None
    names = [w for w in (h, v) if w]
    if h and v:
        names.append(f"{v} {h}")
    m0, m1 = _MIDDLE
    if m0 <= x <= m1 and m0 <= y <= m1:
        names.append("center")
    return names


def _item_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"shapes:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _pick(rng: random.Random, seq: Sequence):
    # rng.random() alone, whose stream Python keeps stable across versions (choice/randrange have changed).
    return seq[int(rng.random() * len(seq))]


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _normalise_holdout(holdout) -> tuple[frozenset, frozenset]:
    """holdout dict -> (frozenset of (colour, shape), frozenset of (colour, shape, relation, colour, shape))."""
    if holdout is None:
        return frozenset(), frozenset()
    if not isinstance(holdout, Mapping):
        raise TypeError(
            f"holdout must be a dict like DEFAULT_HOLDOUT ({{'color_shape': [...], 'relation': [...]}}), "
            f"got {type(holdout).__name__}"
        )
    unknown = set(holdout) - {"color_shape", "relation"}
    if unknown:
        raise ValueError(f"unknown holdout keys {sorted(unknown)}; the keys are 'color_shape' and 'relation'")
    pairs, relations = set(), set()
    for pair in holdout.get("color_shape", ()):
        color, shape = pair
        _check_names(color, shape, pair)
        pairs.add((color, shape))
    for item in holdout.get("relation", ()):
        c1, s1, rel, c2, s2 = item
        _check_names(c1, s1, item)
        _check_names(c2, s2, item)
        if rel not in RELATIONS:
            raise ValueError(
                f"unknown relation {rel!r} in holdout entry {item}; choose one of {list(RELATIONS)}"
            )
        relations.add((c1, s1, rel, c2, s2))
    if len(pairs) >= len(COLORS) * len(SHAPES):
        raise ValueError("the holdout excludes every colour-shape pair; nothing would be left to draw")
    return frozenset(pairs), frozenset(relations)


def _check_names(color, shape, entry) -> None:
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r} in holdout entry {entry}; choose one of {list(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} in holdout entry {entry}; choose one of {list(SHAPES)}")


def _apart(a: Sequence[float], b: Sequence[float], gap: float) -> bool:
    """Boxes [x0, y0, x1, y1] separated by at least `gap` along x or along y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(
    rng: random.Random, kinds: list, sizes: list, image_size: int, same_color_gap: float = _GAP
) -> list[dict] | None:
    """Non-overlapping objects, each wholly inside the image, or None when one found no room. Boxes of one
    colour stay `same_color_gap` (a fraction of image_size) apart, the others `_GAP`."""
    placed: list[dict] = []
    gap, border = _GAP * image_size, _BORDER * image_size
    gap_same = same_color_gap * image_size
    for (color, shape), size in zip(kinds, sizes):
        lo, hi = SIZES[size]
        r = round(image_size * (lo + (hi - lo) * rng.random()), 2)
        span = image_size - 2 * (r + border)  # room for the centre along each axis
        for _ in range(_PLACE_TRIES):
            cx = round(r + border + span * rng.random(), 2)
            cy = round(r + border + span * rng.random(), 2)
            box = [round(cx - r, 2), round(cy - r, 2), round(cx + r, 2), round(cy + r, 2)]
            if all(_apart(box, o["bbox"], gap_same if o["color"] == color else gap) for o in placed):
                obj = {
                    "shape": shape,
                    "color": color,
                    "size": size,
                    "center": [cx, cy],
                    "bbox": box,
                    "radius": r,
                }
                placed.append(obj)
                break
        else:
            return None
    return placed


def _breaks_relation_holdout(objects: list[dict], relations: frozenset) -> bool:
    if not relations:
        return False
    for a in objects:
        for b in objects:
            if a is not b:
                rel = relation_between(a, b)
                if rel and (a["color"], a["shape"], rel, b["color"], b["shape"]) in relations:
                    return True
    return False


def _phrase(obj: dict, use_size: bool) -> str:
    words = f"{obj['size']} {obj['color']} {obj['shape']}" if use_size else f"{obj['color']} {obj['shape']}"
    return with_article(words)


def list_phrases(parts: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _counted(rng: random.Random, objects: list[dict], use_size: bool) -> str:
    """ "two red circles and a blue square": objects of one colour and shape are counted, groups in random order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for obj in objects:
        groups.setdefault((obj["color"], obj["shape"]), []).append(obj)
    keys = list(groups)
    rng.shuffle(keys)
    parts = []
    for color, shape in keys:
        members = groups[color, shape]
        if len(members) == 1:
            parts.append(_phrase(members[0], use_size))
        else:
            sizes = {m["size"] for m in members}
            # a size word only if all members share it
            size = f"{sizes.pop()} " if use_size and len(sizes) == 1 else ""
            parts.append(f"{NUMBERS[len(members)]} {size}{color} {PLURALS[shape]}")
    return list_phrases(parts)


def _caption(
    rng: random.Random, objects: list[dict], image_size: int, position_prob: float = 0.5, relation_prob: float = 0.8
) -> tuple[str, dict | None, dict | None]:
    """(caption, stated relation or None, stated position or None); every statement is true of the layout.
    The draws do not depend on the probabilities, so they change which statements are made, not the layout."""
    n = len(objects)
    use_size = rng.random() < 0.4  # sizes are always true: the ranges of "small" and "large" do not meet
    if n == 1:
        where = true_positions(objects[0]["center"], image_size)
        if where and rng.random() < position_prob:
            pos = _pick(rng, where)
            return f"{_phrase(objects[0], use_size)} {POSITIONS[pos]}", None, {"object": 0, "position": pos}
        return _phrase(objects[0], use_size), None, None
    repeated = len({(o["color"], o["shape"]) for o in objects}) < n
    if n == 2:
        if repeated and rng.random() < 0.5:
            return _counted(rng, objects, use_size), None, None
        i, j = (0, 1) if rng.random() < 0.5 else (1, 0)
        rel = relation_between(objects[i], objects[j])
        if rel and rng.random() < relation_prob:
            caption = f"{_phrase(objects[i], use_size)} {RELATIONS[rel]} {_phrase(objects[j], use_size)}"
            return caption, {"subject": i, "object": j, "relation": rel}, None
        return f"{_phrase(objects[i], use_size)} and {_phrase(objects[j], use_size)}", None, None
    if repeated:
        return _counted(rng, objects, use_size), None, None
    order = list(range(n))
    rng.shuffle(order)
    return list_phrases([_phrase(objects[k], use_size) for k in order]), None, None


def holdout_prompts(holdout=DEFAULT_HOLDOUT) -> list[dict]:
    """Evaluation prompts for the held-out combinations, one per entry, with the ground truth to check:
    [{"caption": "a red triangle", "objects": [{"color": "red", "shape": "triangle"}], "relation": None}, ...,
     {"caption": "a green circle above a purple square", "objects": [..., ...],
      "relation": {"subject": 0, "object": 1, "relation": "above"}}]."""
    pairs, relations = _normalise_holdout(holdout)
    prompts = []
    for color, shape in sorted(pairs):
        obj = {"color": color, "shape": shape}
        prompts.append({"caption": with_article(f"{color} {shape}"), "objects": [obj], "relation": None})
    for c1, s1, rel, c2, s2 in sorted(relations):
        caption = f"{with_article(f'{c1} {s1}')} {RELATIONS[rel]} {with_article(f'{c2} {s2}')}"
        objects = [{"color": c1, "shape": s1}, {"color": c2, "shape": s2}]
        prompts.append(
            {"caption": caption, "objects": objects, "relation": {"subject": 0, "object": 1, "relation": rel}}
        )
    return prompts


class ShapesDataset(Dataset):
    """`size` procedurally drawn images of 1-3 coloured shapes with true captions (see the module docstring).

    Item i: {"image": (3, image_size, image_size) float32 in [-1, 1], "caption": str, "index": i,
    "attributes": `self.attributes(i)`}. Per item, the number of objects is uniform in [min_objects,
    max_objects]; each object's (colour, shape) is uniform over the pairs not held out, its size "small" or
    "large" with equal odds, its position uniform where it overlaps nothing (rejection sampling, 50 tries per
    object; a layout that does not fit is retried with all objects small, then redrawn from scratch).

    holdout: None or a dict like DEFAULT_HOLDOUT. Held-out colour-shape pairs are never drawn; an image in
    which a held-out relation holds between two objects (by `relation_between`) is redrawn. `holdout_prompts`
    lists the prompts to evaluate them with.
    position_prob: how often a one-object caption states the object's place when one applies ("... at the
        top"); relation_prob: how often a two-object caption states their relation when one holds ("... above
        ..."). Only the captions change with them: item i's image is the same for every value.
    repeat_prob: how often a layout of two or more objects repeats the first one's colour and shape (in both
        of two objects; in two to all of more), which makes counted captions ("two red circles and a blue square") common:
        with independent draws, 4 % of the captions count. 0 (the default) leaves every item as it was; any
        other value changes the layouts.
    same_color_gap: the least background between the bounding boxes of two objects of one colour, as a fraction
        of image_size (None: `_GAP`, as between any two objects, 1.6 px at 32 px). Two such objects closer than
        a pixel or two read as one region of that colour; a wider gap teaches a model to keep them apart. Any
        value other than None changes the layouts that hold two objects of one colour.
    """

    def __init__(
        self,
        size: int = 10_000,
        image_size: int = 32,
        seed: int = 0,
        *,
        min_objects: int = 1,
        max_objects: int = 3,
        holdout: Mapping | None = None,
        position_prob: float = 0.5,
        relation_prob: float = 0.8,
        repeat_prob: float = 0.0,
        same_color_gap: float | None = None,
    ):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if image_size < 16:
            raise ValueError(
                f"image_size must be at least 16 pixels for shapes to be recognisable, got {image_size}"
            )
        if not 1 <= min_objects <= max_objects <= _MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {_MAX_OBJECTS}, got min_objects={min_objects}, "
                f"max_objects={max_objects}"
            )
        for name, p in (("position_prob", position_prob), ("relation_prob", relation_prob), ("repeat_prob", repeat_prob)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self.position_prob, self.relation_prob = float(position_prob), float(relation_prob)
        self.repeat_prob = float(repeat_prob)
        if same_color_gap is not None and not _GAP <= same_color_gap <= 0.5:
            raise ValueError(
                f"same_color_gap must lie in [{_GAP}, 0.5] (a fraction of image_size; None for the default "
                f"{_GAP}), got {same_color_gap}"
            )
        self.same_color_gap = same_color_gap
        self.size, self.image_size, self.seed = int(size), int(image_size), int(seed)
        self.min_objects, self.max_objects = min_objects, max_objects
        self.holdout = holdout
        held_pairs, self._held_relations = _normalise_holdout(holdout)
        self._kinds = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held_pairs]

    def __len__(self) -> int:
        return self.size

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a ShapesDataset of {self.size} items")
        return i

    def attributes(self, i: int) -> dict:
        """The ground truth of item i (JSON-able):

        {"objects": [{"shape", "color", "size", "center": [x, y], "bbox": [x0, y0, x1, y1], "radius"}, ...],
         "relation": {"subject": k, "object": m, "relation": "above"} or None  (the relation the caption states),
         "position": {"object": 0, "position": "left"} or None                (the position the caption states),
         "caption": str, "image_size": int}
        Pixels, y down; "radius" is half the bounding-box side. Computing it costs no rendering.
        """
        i = self._index(i)
        rng = random.Random(_item_seed(self.seed, i))
        span = self.max_objects - self.min_objects + 1
        gap = _GAP if self.same_color_gap is None else self.same_color_gap
        for _ in range(_LAYOUT_TRIES):
            n = self.min_objects + int(rng.random() * span)
            kinds = [_pick(rng, self._kinds) for _ in range(n)]
            if self.repeat_prob and n > 1 and rng.random() < self.repeat_prob:  # no draw at all when 0
                same = n if n == 2 else 2 + int(rng.random() * (n - 1))  # 2 of 2; 2..n of n
                kinds[1:same] = [kinds[0]] * (same - 1)
            sizes = ["large" if rng.random() < 0.5 else "small" for _ in range(n)]
            objects = _place(rng, kinds, sizes, self.image_size, gap)
            if objects is None:
                objects = _place(rng, kinds, ["small"] * n, self.image_size, gap)
            if objects is not None and not _breaks_relation_holdout(objects, self._held_relations):
                break
        else:
            raise RuntimeError(
                f"could not lay out item {i} in {_LAYOUT_TRIES} tries (max_objects={self.max_objects} at "
                f"{self.image_size} px); lower max_objects"
            )
        caption, relation, position = _caption(rng, objects, self.image_size, self.position_prob, self.relation_prob)
        return {
            "objects": objects,
            "relation": relation,
            "position": position,
            "caption": caption,
            "image_size": self.image_size,
        }

    def fingerprint(self) -> str:
        """A cheap identity of the data (for caches keyed on it): the arguments and the rendering version."""
        held = _normalise_holdout(self.holdout)
        parts = [_RENDER_VERSION, self.size, self.image_size, self.seed, self.min_objects, self.max_objects,
                 self.position_prob, self.relation_prob]  # fmt: skip
        if self.repeat_prob:  # only then: the caches of existing datasets keep their keys
            parts.append(self.repeat_prob)
        if self.same_color_gap is not None:
            parts.append(("same_color_gap", self.same_color_gap))
        return f"shapes:{parts}:{sorted(held[0])}:{sorted(held[1])}"

    def caption(self, i: int) -> str:
        """Item i's caption, without rendering its image."""
        return self.attributes(i)["caption"]

    def image(self, i: int) -> Image.Image:
        """Item i as an RGB PIL image."""
        return render(self.attributes(i)["objects"], self.image_size)

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        attributes = self.attributes(i)
        pixels = np.array(render(attributes["objects"], self.image_size))  # (H, W, 3) uint8, writable
        x = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32) / 255.0  # (H, W, 3) -> (3, H, W)
        return {
            "image": 2.0 * x - 1.0,
            "caption": attributes["caption"],
            "index": i,
            "attributes": attributes,
        }
