"""The checker of the `shapes` benchmark: reads a generated image and scores it against a prompt.

The images of `sfumato.data.shapes` are simple enough to read exactly, so `check` replaces a human judge:

1. **Segment by colour.** The background is a known grey and every object one of six known colours, and an
   anti-aliased edge pixel is a mix of the two: p = bg + a (c - bg) with coverage a in [0, 1]. So each pixel
   is projected onto the six lines from the background to a palette colour; the line it lies closest to
   (within `MAX_RESIDUAL`) names its colour and the projection its coverage. Pixels covered at least half
   by a colour are that colour's; pixels on no line and far from the background are "other" (a colour the
   palette does not have); the rest is background.
2. **Objects** are the 8-connected regions of one colour. Regions whose soft area (the sum of coverage)
   is below `MIN_AREA` of the image are specks and dropped. Objects in the data set never touch and leave
   at least 1.6 px between them, so at coverage 1/2 two objects are never joined.
3. **Shape.** For each of the five shapes the region's coverage-weighted moments give the shape's box
   (width and height from the variances, centre from the mean, using each shape's own moments), the
   shape's exact coverage in that box is rasterised (8 x 8 samples a pixel), and the shape whose coverage
   overlaps the region best (soft IoU) wins, if its IoU reaches `SHAPE_MIN_IOU` and its box is about
   square (`MAX_ASPECT`); otherwise the region has no shape.
4. **Scores** per prompt: colour, shape and colour-shape binding (the prompt's objects found among the
   detected ones, one detected object each), count (as many objects as the prompt names), size, position
   and relation (see `score`).

The checker is validated on real renders in tests/test_eval_shapes.py (it must score >= 99 % on every
criterion there, and must reject renders that contradict the prompt) before it judges any model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from sfumato.data.shapes import (
    BACKGROUND,
    COLORS,
    SHAPES,
    SIZES,
    true_positions,
)

# -- checker constants (RGB units are 0..255, lengths scale with the image) ----------------------------------
MAX_RESIDUAL = 90.0  # farthest a pixel may lie from a background-to-colour line and still be of that colour
OTHER_DISTANCE = 90.0  # a pixel on no colour line but this far from the background is "other"
MIN_COVERAGE = 0.5  # a pixel belongs to a colour's region when covered at least this much
MIN_AREA = 0.008  # least soft area of an object, as a fraction of the image (8.2 px at 32 px; the
# smallest shape in the data, a small triangle, covers >= 24 px there)
# Below this best overlap a region is no recognisable shape. True renders score >= 0.92; the shipped
# recipe's VAE reconstructions of real images >= 0.86 for 99 % of objects (>= 0.8 for 99.6 %), while the
# shapeless blobs of an early checkpoint score 0.6-0.8 against their nearest template.
SHAPE_MIN_IOU = 0.8
# Every shape in the data set fills a square box. A fitted box longer than this along one side than the
# other is an oval or a smear, no shape of the vocabulary; decoded real shapes stay under 1.19 (99.9 %).
MAX_ASPECT = 1.25
# A relation "A above B" holds when B's centre is lower than A's by more than it is offset sideways
# (within 45 degrees of straight down). The data set states relations only when the offset along the
# axis is at least twice the one across (and the boxes do not overlap along it): that is for writing
# captions that are unmistakably true; judging a drawing asks only which way the pair points.
RELATION_DOMINANCE = 1.0
# A position word is accepted when the centre is within this fraction of the image of a place where the
# data set would use it (`true_positions`): 1 px at 32 px, the precision of a drawn centre.
POSITION_TOLERANCE = 1 / 32
# "small" / "large" split at the middle of the gap between the data set's radius ranges (0.15 and 0.22).
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2
_SAMPLES = 8  # supersampling of the template rasteriser, per pixel side
_OTHER = "other"

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)  # (K, 3)
_BG = np.array(BACKGROUND, dtype=np.float64)
_LINES = _PALETTE - _BG  # (K, 3), background -> colour




# ---------------------------------------------------------------------------------------------------------
# Shapes in normalised coordinates: u, v in [-1, 1] across the bounding box (v down), as in the data set's
# module docstring: every shape touches all four sides of its box.


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the points (u, v) lie inside `shape` drawn in the box [-1, 1]^2 (boolean array)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return (au <= 1) & (av <= 1)
    if shape == "diamond":
        return au + av <= 1
    if shape == "triangle":  # apex (0, -1), base from (-1, 1) to (1, 1)
        return (v <= 1) & (au <= (v + 1) / 2)
    if shape == "cross":  # arms 2 long, 0.8 thick (half-thickness 0.4)
        return ((au <= 1) & (av <= 0.4)) | ((au <= 0.4) & (av <= 1))
    raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def _shape_moments(n: int = 1024) -> dict[str, tuple[float, float, float, float]]:
    """Per shape (area as a fraction of its box, mean of v, variance of u, variance of v), on an n x n grid."""
    t = (np.arange(n) + 0.5) / n * 2 - 1
    u, v = np.meshgrid(t, t)
    out = {}
    for s in SHAPES:
        m = inside(s, u, v)
        uu, vv = u[m], v[m]
        out[s] = (float(m.mean()), float(vv.mean()), float(uu.var()), float(vv.var()))
    return out


_MOMENTS = _shape_moments()


def coverage(shape: str, box: Sequence[float], window: tuple[int, int, int, int]) -> np.ndarray:
    """The fraction of each pixel of `window` (x0, y0, width, height) covered by `shape` filling `box`
    (x0, y0, x1, y1, pixel units, y down), from 8 x 8 samples a pixel. Returns (height, width) float64."""
    wx, wy, w, h = window
    bx0, by0, bx1, by1 = box
    k = _SAMPLES
    xs = wx + (np.arange(w * k) + 0.5) / k
    ys = wy + (np.arange(h * k) + 0.5) / k
    rx, ry = max((bx1 - bx0) / 2, 1e-6), max((by1 - by0) / 2, 1e-6)
    u = (xs[None, :] - (bx0 + bx1) / 2) / rx
    v = (ys[:, None] - (by0 + by1) / 2) / ry
    hit = inside(shape, u, v).astype(np.float64)  # (h * k, w * k)
    return hit.reshape(h, k, w, k).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------------------
# The checker


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image (PIL, or an array (H, W, 3) of 0..255), got shape {a.shape}")
    return a.astype(np.float64)


def _pixel_colours(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label (H, W): palette index, K for "other", -1 for background; coverage (H, W, K) clipped to [0, 1],
    with 0 where a pixel is off that colour's line)."""
    K = len(_PALETTE)
    d = pixels - _BG  # (H, W, 3)
    alpha = d @ _LINES.T / (_LINES**2).sum(axis=1)  # (H, W, K): projection onto each line
    a = alpha.clip(0, 1)
    residual = np.linalg.norm(d[:, :, None, :] - a[..., None] * _LINES, axis=-1)  # (H, W, K)
    on_line = residual <= MAX_RESIDUAL
    # the nearest line names the colour (a pure mix lies on its own line, residual 0); the coverage along it
    # decides between that colour and the background
    best = residual.argmin(axis=-1)  # (H, W)
    best_residual = np.take_along_axis(residual, best[..., None], axis=-1)[..., 0]
    best_alpha = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]
    has_colour = (best_residual <= MAX_RESIDUAL) & (best_alpha >= MIN_COVERAGE)
    far = np.linalg.norm(d, axis=-1) > OTHER_DISTANCE
    label = np.where(has_colour, best, np.where((best_residual > MAX_RESIDUAL) & far, K, -1))
    return label, np.where(on_line, a, 0.0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of a boolean mask, as boolean masks (largest label propagation, in numpy)."""
    H, W = mask.shape
    ids = np.where(mask, np.arange(1, H * W + 1).reshape(H, W), 0)
    while True:
        padded = np.pad(ids, 1)
        best = ids.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                best = np.maximum(best, padded[dy : dy + H, dx : dx + W])
        best = np.where(mask, best, 0)
        if np.array_equal(best, ids):
            break
        ids = best
    return [ids == i for i in np.unique(ids) if i != 0]


def _dilate(mask: np.ndarray) -> np.ndarray:
    H, W = mask.shape
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy : dy + H, dx : dx + W]
    return out


def _fit_shape(weights: np.ndarray) -> dict:
    """Classify the soft region `weights` (H, W) by the best template overlap; its box, centre and IoU.

    For each shape: the box in which that shape has the region's coverage-weighted mean and variances
    (less the 1/12 a unit box filter adds), the shape's coverage in that box, and its soft IoU with the
    region, sum(min) / sum(max). The best shape wins.

    Tried and dropped: templates blurred to match a decoder's softness (a blurred diamond then fits a
    decoded small cross better still), and the orientation of the coverage gradients (decoded small
    crosses and diamonds overlap there too). A small cross after a 2x VAE decoder is a rounded blob that
    reads as a diamond about 4 times in 10; `evaluate_shapes` reports the checker's confusion matrix on
    VAE reconstructions of real images, so that this ceiling is visible next to the model's scores."""
    H, W = weights.shape
    ys, xs = np.nonzero(weights)
    area = weights.sum()
    px, py = xs + 0.5, ys + 0.5  # pixel centres
    w = weights[ys, xs]
    mx, my = (w * px).sum() / area, (w * py).sum() / area
    var_x = max((w * (px - mx) ** 2).sum() / area - 1 / 12, 1e-2)  # a box filter adds 1/12 to a variance
    var_y = max((w * (py - my) ** 2).sum() / area - 1 / 12, 1e-2)
    x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, W)
    y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, H)
    window = (int(x0), int(y0), int(x1 - x0), int(y1 - y0))
    target = weights[y0:y1, x0:x1]
    fits = {}
    for s, (_, mean_v, var_u, var_v) in _MOMENTS.items():
        rx, ry = math.sqrt(var_x / var_u), math.sqrt(var_y / var_v)
        cx, cy = mx, my - mean_v * ry
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        t = coverage(s, box, window)
        fits[s] = (float(np.minimum(t, target).sum() / np.maximum(t, target).sum()), box)
    shape = max(fits, key=lambda s: fits[s][0])
    iou, box = fits[shape]
    width, height = box[2] - box[0], box[3] - box[1]
    aspect = max(width / height, height / width)
    return {"shape": shape if iou >= SHAPE_MIN_IOU and aspect <= MAX_ASPECT else None, "iou": iou, "box": box,
            "aspect": aspect, "ious": {s: round(f[0], 3) for s, f in fits.items()}}  # fmt: skip


def detect(image) -> list[dict]:
    """The objects in an image: [{"color", "shape", "size", "center": [x, y], "bbox": [x0, y0, x1, y1],
    "radius", "area", "iou", "ious", "rgb"}, ...], left to right. "color" is a palette name or "other",
    "shape" a shape name or None (no template fits), coordinates in pixels (y down)."""
    pixels = _as_array(image)
    H, W, _ = pixels.shape
    label, alpha = _pixel_colours(pixels)
    min_area = MIN_AREA * H * W
    size = min(H, W)
    objects = []
    for k in np.unique(label):
        if k < 0:
            continue
        for region in _components(label == k):
            if k < len(_PALETTE):
                # the region's pixels, plus the partly covered rim around it that no other region owns
                rim = _dilate(region) & (label == -1)
                weights = np.where(region, alpha[:, :, k].clip(min=MIN_COVERAGE), 0.0)
                weights = weights + np.where(rim, alpha[:, :, k], 0.0)
            else:
                weights = region.astype(np.float64)
            if weights.sum() < min_area:
                continue
            fit = _fit_shape(weights)
            x0, y0, x1, y1 = fit["box"]
            radius = ((x1 - x0) + (y1 - y0)) / 4
            objects.append({
                "color": _PALETTE_NAMES[k] if k < len(_PALETTE) else _OTHER,
                "shape": fit["shape"],
                "size": "small" if radius < SIZE_SPLIT * size else "large",
                "center": [round((x0 + x1) / 2, 2), round((y0 + y1) / 2, 2)],
                "bbox": [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)],
                "radius": round(radius, 2),
                "area": round(float(weights.sum()), 1),
                "iou": round(fit["iou"], 3),
                "aspect": round(fit["aspect"], 3),
                "ious": fit["ious"],
                "rgb": [int(c) for c in pixels[region].mean(axis=0).round()],
            })  # fmt: skip
    return sorted(objects, key=lambda o: (o["center"][0], o["center"][1]))


def _match(expected: list, found: list, ok: Callable[[dict, dict], bool]) -> bool:
    """Whether every expected object gets its own found object with ok(e, f) (bipartite matching)."""
    owner: dict[int, int] = {}

    def augment(i: int, seen: set) -> bool:
        for j, f in enumerate(found):
            if j not in seen and ok(expected[i], f):
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(len(expected)))


def _candidates(e: dict, found: list[dict]) -> list[dict]:
    """The detected objects that stand for expected object e: those of its colour and shape, or else (a
    wrong shape is the shape score's business) those of its colour."""
    exact = [f for f in found if f["color"] == e["color"] and f["shape"] == e["shape"]]
    return exact or [f for f in found if f["color"] == e["color"]]


def relation_holds(a: Mapping, b: Mapping, relation: str) -> bool:
    """Whether object a stands in `relation` to b: along the relation's axis, b's centre lies beyond a's by
    more than `RELATION_DOMINANCE` times the offset across it (see the constant's comment)."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    dx, dy = bx - ax, by - ay
    along, across = {"above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy)}[relation]
    return along > 0 and along > RELATION_DOMINANCE * abs(across)


def position_holds(center: Sequence[float], position: str, image_size: int) -> bool:
    """Whether a centre is where `position` ("left", "top right", "center", ...) puts it: within
    `POSITION_TOLERANCE` of a point that `true_positions` names so."""
    t = POSITION_TOLERANCE * image_size
    x, y = center
    return any(
        position in true_positions((x + dx, y + dy), image_size) for dx in (-t, 0, t) for dy in (-t, 0, t)
    )


def score(found: list[dict], prompt: Mapping, image_size: int) -> dict[str, bool | None]:
    """Per-criterion verdicts of detected objects against a prompt (None where the prompt says nothing):

    color / shape: every object the prompt names finds its own detected object of that colour / shape;
    binding: ... of that colour and shape; count: exactly as many objects as the prompt names;
    size / position: the detected object standing for it (see `_candidates`) has the size / position asked;
    relation: some detected subject and object (see `_candidates`) stand in the relation (`relation_holds`).
    """
    expected = list(prompt["objects"])
    out: dict[str, bool | None] = {
        "color": _match(expected, found, lambda e, f: f["color"] == e["color"]),
        "shape": _match(expected, found, lambda e, f: f["shape"] == e["shape"]),
        "binding": _match(expected, found, lambda e, f: (f["color"], f["shape"]) == (e["color"], e["shape"])),
        "count": len(found) == len(expected),
        "size": None,
        "position": None,
        "relation": None,
    }
    if any(e.get("size") for e in expected):
        sized = [e for e in expected if e.get("size")]
        out["size"] = _match(sized, found, lambda e, f: f in _candidates(e, found) and f["size"] == e["size"])
    if any(e.get("position") for e in expected):
        placed = [e for e in expected if e.get("position")]
        out["position"] = _match(
            placed,
            found,
            lambda e, f: f in _candidates(e, found) and position_holds(f["center"], e["position"], image_size),
        )
    rel = prompt.get("relation")
    if rel:
        subjects = _candidates(expected[rel["subject"]], found)
        objects = _candidates(expected[rel["object"]], found)
        out["relation"] = any(
            s is not o and relation_holds(s, o, rel["relation"]) for s in subjects for o in objects
        )
    return out


def check(image, prompt: Mapping) -> dict:
    """Read one image against one prompt: {"scores": {criterion: True / False / None}, "pass": all
    applicable criteria hold, "objects": what `detect` found}."""
    pixels = _as_array(image)
    found = detect(pixels)
    scores = score(found, prompt, min(pixels.shape[:2]))
    return {"scores": scores, "pass": all(v for v in scores.values() if v is not None), "objects": found}
