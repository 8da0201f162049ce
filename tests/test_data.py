"""Datasets: image-caption folders (both layouts, bad files, flips, resize-crop), collate, load_dataset, and the
procedural shapes data set (determinism, ground truth against pixels, true captions, holdout, speed)."""

import json
import re
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.data import (
    BACKGROUND,
    COLORS,
    DEFAULT_HOLDOUT,
    SHAPES,
    SIZES,
    CorruptImageWarning,
    ImageCaptionFolder,
    Oversampled,
    ShapesDataset,
    collate,
    holdout_prompts,
    load_dataset,
    relation_between,
    render,
    states_relation,
    true_positions,
)
from sfumato.data.folder import _flip, mirror_caption
from sfumato.data.shapes import POSITIONS, RELATIONS

# ----------------------------------------------------------------------------------------------------------
# image-caption folders


def _image(path, size=(40, 30), color=(200, 30, 30), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color if mode == "RGB" else (*color, 255)
    Image.new(mode, size, fill).save(path, **save)
    return path


def _halves(path, size=(32, 32)):
    """Left half black, right half white: any mirroring shows."""
    a = np.full((size[1], size[0], 3), 255, np.uint8)
    a[:, : size[0] // 2] = 0
    Image.fromarray(a).save(path)


def test_text_file_layout(tmp_path):
    _image(tmp_path / "b.png", (80, 40))
    (tmp_path / "b.txt").write_text("  a red square\n", encoding="utf-8")
    _image(tmp_path / "a.jpg", (50, 90), color=(30, 30, 200))
    (tmp_path / "a.txt").write_text("a blue square", encoding="utf-8")
    _image(tmp_path / "sub" / "c.webp", (33, 33))
    (tmp_path / "sub" / "c.txt").write_text("\ufeffune fenêtre rouge", encoding="utf-8")  # BOM + non-ASCII
    _image(tmp_path / ".hidden" / "d.png")  # no caption, but hidden: ignored
    ds = ImageCaptionFolder(tmp_path, image_size=16)
    assert len(ds) == 3 and ds.skipped == []
    items = [ds[i] for i in range(3)]
    assert [it["path"] for it in items] == ["a.jpg", "b.png", "sub/c.webp"]  # sorted by relative path
    assert [it["caption"] for it in items] == ["a blue square", "a red square", "une fenêtre rouge"]
    assert [it["index"] for it in items] == [0, 1, 2]
    for it in items:
        assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.float32
        assert it["image"].min() >= -1 and it["image"].max() <= 1
    assert items[0]["image"][2].mean() > 0.4 and items[0]["image"][0].mean() < -0.5  # blue stays blue
    assert [ds.caption(i) for i in range(3)] == [it["caption"] for it in items]
    with pytest.raises(IndexError):
        ds[3]


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), c) for c in ((0, 200, 0), (200, 0, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    (tmp_path / "anim.txt").write_text("green then red")
    x = ImageCaptionFolder(tmp_path, image_size=8)[0]["image"]
    assert x[1].mean() > 0.4 and x[0].mean() < -0.9  # green


def test_metadata_jsonl_is_authoritative(tmp_path):
    _image(tmp_path / "imgs" / "x.png")
    _image(tmp_path / "imgs" / "y.png")
    _image(tmp_path / "unlisted.png")  # not in metadata.jsonl: ignored although it has a caption file
    (tmp_path / "unlisted.txt").write_text("ignored")
    (tmp_path / "imgs" / "x.txt").write_text("the .txt loses")
    lines = [
        {"file_name": "imgs/x.png", "text": " from jsonl "},
        {"file_name": "imgs/y.png", "text": "second"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    ds = ImageCaptionFolder(tmp_path, image_size=8)
    assert [ds[i]["caption"] for i in range(len(ds))] == ["from jsonl", "second"]
    assert ds[1]["path"] == "imgs/y.png"


def test_metadata_errors_name_the_line(tmp_path):
    _image(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        ImageCaptionFolder(tmp_path)


def test_corrupt_and_truncated_images_are_skipped_with_a_warning(tmp_path):
    for name in ("good1", "good2", "noise", "cut"):
        (tmp_path / f"{name}.txt").write_text(f"caption of {name}")
    _image(tmp_path / "good1.png")
    _image(tmp_path / "good2.jpg")
    (tmp_path / "noise.png").write_bytes(
        np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    )
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "full.jpg").unlink()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # a JPEG cut off halfway
    with pytest.warns(CorruptImageWarning) as record:
        ds = ImageCaptionFolder(tmp_path, image_size=16)
    messages = " ".join(str(w.message) for w in record)
    assert "noise.png" in messages and "cut.jpg" in messages
    assert sorted(p.name for p, _ in ds.skipped) == ["cut.jpg", "noise.png"]
    assert len(ds) == 2 and [ds[i]["caption"] for i in range(2)] == ["caption of good1", "caption of good2"]


def test_missing_caption_names_the_file_unless_allowed(tmp_path):
    _image(tmp_path / "with.png")
    (tmp_path / "with.txt").write_text("a caption")
    _image(tmp_path / "without.png")
    with pytest.raises(FileNotFoundError, match=r"without\.png.*allow_empty_captions=True"):
        ImageCaptionFolder(tmp_path)
    ds = ImageCaptionFolder(tmp_path, allow_empty_captions=True)
    assert [ds[i]["caption"] for i in range(2)] == ["a caption", ""]


def test_empty_folder_names_the_folder_and_the_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images") as e:
        ImageCaptionFolder(tmp_path)
    assert str(tmp_path) in str(e.value) and "metadata.jsonl" in str(e.value) and ".txt" in str(e.value)
    with pytest.raises(FileNotFoundError):
        ImageCaptionFolder(tmp_path / "nope")


def test_rgba_is_composited_onto_white(tmp_path):
    a = np.zeros((20, 20, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half transparent (black underneath)
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    (tmp_path / "rgba.txt").write_text("half red")
    x = ImageCaptionFolder(tmp_path, image_size=20)[0]["image"]
    assert torch.allclose(x[:, :, -1], torch.ones(3, 20))  # transparent -> white
    assert torch.allclose(x[:, :, 0], torch.tensor([1.0, -1.0, -1.0])[:, None].expand(3, 20))


def test_resize_shorter_side_then_centre_crop(tmp_path):
    a = np.zeros((50, 150, 3), np.uint8)  # 150 wide, 50 high: blue sides, red central 50 x 50 square
    a[:, :, 2] = 255
    a[:, 50:100] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("wide")
    _image(tmp_path / "tall.png", (30, 70))
    (tmp_path / "tall.txt").write_text("tall")
    ds = ImageCaptionFolder(tmp_path, image_size=24)
    assert ds[0]["image"].shape == ds[1]["image"].shape == (3, 24, 24)
    # the red centre survives; the bicubic kernel blends a little blue into the edge columns
    wide = ds[1]["image"]
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    assert torch.allclose(wide[:, :, 1:-1], red.expand(3, 24, 22), atol=0.02)
    assert torch.allclose(wide, red.expand(3, 24, 24), atol=0.2)


def test_no_flips_by_default_and_deterministic_flips_when_on(tmp_path):
    for k in range(24):
        _halves(tmp_path / f"{k:02d}.png")
        (tmp_path / f"{k:02d}.txt").write_text("black left, white right")

    def flipped(ds):
        return [bool(ds[i]["image"][0, 0, 0] > 0) for i in range(len(ds))]  # left column white: mirrored

    assert not any(flipped(ImageCaptionFolder(tmp_path, image_size=16)))
    ds = ImageCaptionFolder(tmp_path, image_size=16, flip=True, seed=3)
    epoch0 = flipped(ds)
    assert epoch0 == [_flip(3, 0, i) for i in range(24)]
    assert 0 < sum(epoch0) < 24
    ds.set_epoch(1)
    epoch1 = flipped(ds)
    assert epoch1 == [_flip(3, 1, i) for i in range(24)] and epoch1 != epoch0
    # a mirrored item's caption says what its image shows
    captions = [ds[i]["caption"] for i in range(24)]
    assert captions == [("black right, white left" if f else "black left, white right") for f in epoch1]
    assert [ds.caption(i) for i in range(24)] == captions
    again = ImageCaptionFolder(tmp_path, image_size=16, flip=True, seed=3)
    again.set_epoch(1)
    assert flipped(again) == epoch1  # a resumed run sees the same items
    assert flipped(ImageCaptionFolder(tmp_path, image_size=16, flip=True, seed=4)) != epoch0


def test_mirror_caption_swaps_left_and_right_words_only():
    cases = {
        "a dog to the left of a cat": "a dog to the right of a cat",
        "Right: a red circle; left: a square": "Left: a red circle; right: a square",
        "THE LEFTMOST BOX, the right-hand door": "THE RIGHTMOST BOX, the left-hand door",
        "walking rightwards, then left": "walking leftwards, then right",
        "bright lefty copyright cleft": "bright lefty copyright cleft",  # not the words themselves
        "a blue circle above a red square": "a blue circle above a red square",
    }
    for caption, mirrored in cases.items():
        assert mirror_caption(caption) == mirrored
        assert mirror_caption(mirrored) == caption


def test_fingerprints_follow_the_data(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("one")
    fp = ImageCaptionFolder(tmp_path).fingerprint()
    assert ImageCaptionFolder(tmp_path).fingerprint() == fp
    assert ImageCaptionFolder(tmp_path, image_size=32).fingerprint() != fp
    (tmp_path / "a.txt").write_text("two")
    assert ImageCaptionFolder(tmp_path).fingerprint() != fp
    shapes = ShapesDataset(10).fingerprint()
    assert ShapesDataset(10).fingerprint() == shapes
    assert ShapesDataset(10, seed=1).fingerprint() != shapes
    assert ShapesDataset(10, holdout=DEFAULT_HOLDOUT).fingerprint() != shapes


def test_collate_types(tmp_path):
    items = [
        {"image": torch.zeros(3, 4, 4), "caption": "a", "index": 5, "attributes": {"k": 1}, "flag": True},
        {"image": torch.ones(3, 4, 4), "caption": "b", "index": 6, "attributes": {"k": 2}, "flag": False},
    ]
    batch = collate(items)
    assert batch["image"].shape == (2, 3, 4, 4)
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [5, 6]
    assert batch["caption"] == ["a", "b"] and batch["attributes"] == [{"k": 1}, {"k": 2}]
    assert batch["flag"] == [True, False]
    shapes = collate([ShapesDataset(10)[i] for i in range(4)])
    assert shapes["image"].shape == (4, 3, 32, 32) and len(shapes["attributes"]) == 4
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(KeyError, match="item 1"):
        collate([{"a": 1}, {"b": 1}])


def test_load_dataset(tmp_path):
    ds = load_dataset("shapes", image_size=16, size=5)
    assert isinstance(ds, ShapesDataset) and ds.image_size == 16 and ds.seed == 0 and len(ds) == 5
    assert load_dataset("shapes:7", image_size=16).seed == 7
    with pytest.raises(ValueError, match="integer"):
        load_dataset("shapes:x", image_size=16)
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    folder = load_dataset(str(tmp_path), image_size=8, flip=True)
    assert isinstance(folder, ImageCaptionFolder) and folder[0]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset(str(tmp_path / "missing"), image_size=8)


# ----------------------------------------------------------------------------------------------------------
# shapes


def _pixels(ds, i):
    return np.asarray(ds.image(i)).astype(int)  # (H, W, 3)


def test_shapes_items_are_deterministic_and_independent():
    a, b = ShapesDataset(100, seed=0), ShapesDataset(100, seed=0)
    order = [17, 3, 99, 3]
    first = {i: a[i] for i in order}
    for i in reversed(order):
        item = b[i]
        assert torch.equal(item["image"], first[i]["image"]) and item["caption"] == first[i]["caption"]
        assert item["index"] == i and item["attributes"] == first[i]["attributes"]
    assert not torch.equal(a[3]["image"], a[4]["image"])
    assert not torch.equal(a[3]["image"], ShapesDataset(100, seed=1)[3]["image"])
    item = a[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    json.dumps(item["attributes"])  # JSON-able
    with pytest.raises(IndexError):
        a[100]


@pytest.mark.parametrize("image_size", [32, 64])
def test_shapes_ground_truth_matches_pixels(image_size):
    ds = ShapesDataset(300, image_size=image_size, seed=1)
    bg = np.array(BACKGROUND)
    for i in range(len(ds)):
        objects = ds.attributes(i)["objects"]
        px = _pixels(ds, i)
        for obj in objects:
            x, y = (int(c) for c in obj["center"])
            assert np.abs(px[y, x] - np.array(COLORS[obj["color"]])).max() <= 8, (i, obj)
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size  # wholly inside the image
            lo, hi = SIZES[obj["size"]]
            assert lo * image_size - 0.01 <= obj["radius"] <= hi * image_size + 0.01
        # outside every (slightly grown) bounding box there is only background
        outside = np.ones(px.shape[:2], bool)
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            outside[max(0, int(y0) - 1) : int(y1) + 2, max(0, int(x0) - 1) : int(x1) + 2] = False
        assert (px[outside] == bg).all(), i
        for corner in (px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]):
            assert (corner == bg).all()


def test_shapes_do_not_overlap():
    ds = ShapesDataset(1000, seed=2, max_objects=4)
    counts = set()
    for i in range(len(ds)):
        objects = ds.attributes(i)["objects"]
        counts.add(len(objects))
        for k, a in enumerate(objects):
            for b in objects[k + 1 :]:
                ax0, ay0, ax1, ay1 = a["bbox"]
                bx0, by0, bx1, by1 = b["bbox"]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (i, a, b)
    assert counts == {1, 2, 3, 4}


def test_render_draws_an_explicit_spec():
    ds = ShapesDataset(20, image_size=32, seed=5)
    for i in range(20):
        assert np.array_equal(np.asarray(render(ds.attributes(i)["objects"], 32)), np.asarray(ds.image(i)))
    spec = [{"shape": "square", "color": "blue", "center": [8, 8], "size": "small"},
            {"shape": "cross", "color": (0, 0, 0), "center": [24.5, 24.5], "radius": 5}]  # fmt: skip
    px = np.asarray(render(spec, 32)).astype(int)
    assert tuple(px[8, 8]) == COLORS["blue"] and tuple(px[24, 24]) == (0, 0, 0)
    assert tuple(px[24, 20]) == (0, 0, 0) and tuple(px[21, 21]) == BACKGROUND  # an arm; between two arms
    with pytest.raises(ValueError, match="unknown shape"):
        render([{"shape": "hexagon", "color": "red", "center": [8, 8], "radius": 3}], 32)


_WORDS = (
    set(COLORS) | set(SHAPES) | set(SIZES) | {s + "s" for s in SHAPES} | {"crosses", "a", "an", "and", "two", "three"}
    | {w for phrase in RELATIONS.values() for w in phrase.split()} | {w for p in POSITIONS.values() for w in p.split()}
)  # fmt: skip


def test_captions_are_true():
    ds = ShapesDataset(2000, seed=3)
    seen_relations, seen_positions, seen_counts = set(), set(), 0
    for i in range(len(ds)):
        attrs = ds.attributes(i)
        caption, objects = attrs["caption"], attrs["objects"]
        assert set(re.findall(r"[a-z]+", caption)) <= _WORDS, caption
        assert caption == caption.strip() and "  " not in caption
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", caption), caption  # "an orange", "a red"
        for obj in objects:  # each object is named by colour and shape (or their plural)
            assert re.search(rf"\b{obj['color']} {obj['shape']}", caption), (caption, obj)
        for word in ("small", "large"):
            if word in caption.split():
                assert any(o["size"] == word for o in objects), caption
        numbers = re.findall(r"\b(two|three)\b", caption)
        seen_counts += bool(numbers)
        named = sum({"two": 2, "three": 3}[n] for n in numbers) + len(re.findall(r"\ban? ", caption))
        assert named == len(objects), caption
        rel = attrs["relation"]
        has_relation_words = any(w in caption for w in ("above", "below", " left of", " right of"))
        assert has_relation_words == (rel is not None), caption
        if rel is not None:
            subject, obj = objects[rel["subject"]], objects[rel["object"]]
            assert relation_between(subject, obj) == rel["relation"]
            (sx, sy), (ox, oy) = subject["center"], obj["center"]
            dx, dy = ox - sx, oy - sy
            expect = {"above": dy > 2 * abs(dx), "below": -dy > 2 * abs(dx),
                      "left of": dx > 2 * abs(dy), "right of": -dx > 2 * abs(dy)}  # fmt: skip
            assert expect[rel["relation"]], (caption, subject, obj)
            first = caption.index(f"{subject['color']} {subject['shape']}")
            assert caption.index(RELATIONS[rel["relation"]]) > first, caption
            seen_relations.add(rel["relation"])
        pos = attrs["position"]
        if pos is not None:
            assert pos["position"] in true_positions(objects[0]["center"], ds.image_size)
            assert caption.endswith(POSITIONS[pos["position"]])
            seen_positions.add(pos["position"])
    assert seen_relations == set(RELATIONS)
    assert seen_positions == set(POSITIONS)
    assert seen_counts > 20


def test_caption_probabilities_change_captions_not_images():
    """position_prob / relation_prob say how often a true place or relation is stated; the layouts stay."""
    base = ShapesDataset(600, seed=4)
    always = ShapesDataset(600, seed=4, position_prob=1.0, relation_prob=1.0)
    never = ShapesDataset(600, seed=4, position_prob=0.0, relation_prob=0.0)
    counts = {"base": 0, "always": 0}
    for i in range(len(base)):
        a, b, c = base.attributes(i), always.attributes(i), never.attributes(i)
        assert a["objects"] == b["objects"] == c["objects"]
        objects = a["objects"]
        assert c["position"] is None and c["relation"] is None
        if len(objects) == 1 and true_positions(objects[0]["center"], base.image_size):
            assert b["position"] is not None, b["caption"]  # a place that applies is always stated
        if a["position"] is not None or a["relation"] is not None:
            assert a["caption"] == b["caption"]  # what the default states, probability 1 states too
        counts["base"] += a["position"] is not None or a["relation"] is not None
        counts["always"] += b["position"] is not None or b["relation"] is not None
    assert counts["always"] > 1.3 * counts["base"]
    assert base.fingerprint() != always.fingerprint()
    assert torch.equal(base[5]["image"], always[5]["image"])
    with pytest.raises(ValueError, match="position_prob must be a probability in \\[0, 1\\], got 1.5"):
        ShapesDataset(10, position_prob=1.5)


def test_repeat_prob_makes_counted_captions_common_and_zero_changes_nothing():
    """repeat_prob > 0 repeats the first object's kind in multi-object layouts (so "two red circles" is
    common); 0 draws no extra random number, so every item stays as it was (and so does the cache key)."""
    import re

    from sfumato.data.shapes import DEFAULT_HOLDOUT, _normalise_holdout

    base = ShapesDataset(600, seed=4, holdout=DEFAULT_HOLDOUT)
    zero = ShapesDataset(600, seed=4, holdout=DEFAULT_HOLDOUT, repeat_prob=0.0)
    rep = ShapesDataset(600, seed=4, holdout=DEFAULT_HOLDOUT, repeat_prob=0.5)
    assert all(base.attributes(i) == zero.attributes(i) for i in range(len(base)))
    assert base.fingerprint() == zero.fingerprint() != rep.fingerprint()

    def counted(ds):
        return sum(bool(re.search(r"\b(two|three|four)\b", ds.attributes(i)["caption"])) for i in range(len(ds)))

    assert counted(base) < 0.08 * len(base) and counted(rep) > 0.2 * len(rep)
    held = _normalise_holdout(DEFAULT_HOLDOUT)[0]
    repeated = 0
    for i in range(len(rep)):
        objects = rep.attributes(i)["objects"]
        kinds = [(o["color"], o["shape"]) for o in objects]
        assert not held & set(kinds)  # a copy of an allowed kind is allowed
        repeated += len(objects) > 1 and kinds.count(kinds[0]) > 1
    multi = sum(len(rep.attributes(i)["objects"]) > 1 for i in range(len(rep)))
    assert 0.4 * multi < repeated < 0.65 * multi  # ~half the layouts, plus the few repeats drawn by chance
    with pytest.raises(ValueError, match="repeat_prob must be a probability"):
        ShapesDataset(10, repeat_prob=-0.1)


def test_same_color_gap_keeps_objects_of_one_colour_apart_and_none_changes_nothing():
    """same_color_gap widens the background between two objects of one colour only (which a checker would
    otherwise read as one region); None keeps every item and the cache key as they were."""
    import itertools

    def gap(a, b):  # background between two boxes along the axis where they are apart
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
        return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)

    base = ShapesDataset(800, seed=6)
    none = ShapesDataset(800, seed=6, same_color_gap=None)
    wide = ShapesDataset(800, seed=6, same_color_gap=0.125)
    assert all(base.attributes(i) == none.attributes(i) for i in range(len(base)))
    assert base.fingerprint() == none.fingerprint() != wide.fingerprint()
    gaps = {"base same": [], "wide same": [], "wide other": []}
    for i in range(len(base)):
        for name, ds in (("base", base), ("wide", wide)):
            for a, b in itertools.combinations(ds.attributes(i)["objects"], 2):
                same = a["color"] == b["color"]
                if name == "base" and same:
                    gaps["base same"].append(gap(a, b))
                elif name == "wide":
                    gaps["wide same" if same else "wide other"].append(gap(a, b))
    # 32 px: 4 px for one colour, 1.6 px (the default) for two
    assert min(gaps["wide same"]) >= 4.0 - 1e-6 and len(gaps["wide same"]) > 50
    assert min(gaps["base same"]) < 4.0  # without it, objects of one colour come closer
    assert min(gaps["wide other"]) < 4.0 and min(gaps["wide other"]) >= 1.6 - 1e-6  # other pairs keep the default
    with pytest.raises(ValueError, match="same_color_gap must lie in"):
        ShapesDataset(10, same_color_gap=0.01)


def test_relation_between_and_positions():
    def box(x, y, r=2):
        return {"center": [x, y], "bbox": [x - r, y - r, x + r, y + r]}

    assert relation_between(box(10, 2), box(11, 20)) == "above"
    assert relation_between(box(11, 20), box(10, 2)) == "below"
    assert relation_between(box(2, 10), box(20, 12)) == "left of"
    assert relation_between(box(20, 12), box(2, 10)) == "right of"
    assert relation_between(box(2, 2), box(20, 20)) is None  # diagonal: no relation
    assert true_positions([4, 4], 32) == ["left", "top", "top left"]
    assert true_positions([16, 16], 32) == ["center"]
    assert true_positions([16, 30], 32) == ["bottom"]


def _held_out(objects, holdout):
    pairs = {tuple(p) for p in holdout.get("color_shape", [])}
    bad = [(o["color"], o["shape"]) for o in objects if (o["color"], o["shape"]) in pairs]
    for a in objects:
        for b in objects:
            rel = relation_between(a, b) if a is not b else None
            entry = (a["color"], a["shape"], rel, b["color"], b["shape"])
            if rel and entry in set(holdout.get("relation", [])):
                bad.append(entry)
    return bad


def test_holdout_combinations_never_appear():
    plain = ShapesDataset(2000, seed=4)
    held = ShapesDataset(2000, seed=4, holdout=DEFAULT_HOLDOUT)
    assert sum(bool(_held_out(plain.attributes(i)["objects"], DEFAULT_HOLDOUT)) for i in range(2000)) > 50
    for i in range(2000):
        attrs = held.attributes(i)
        assert not _held_out(attrs["objects"], DEFAULT_HOLDOUT), (i, attrs["caption"])
    # relation holdout: with every "above" held out, no image has a pair in that relation
    every_above = {
        "relation": [
            (c1, s1, "above", c2, s2) for c1 in COLORS for s1 in SHAPES for c2 in COLORS for s2 in SHAPES
        ]
    }
    no_above = ShapesDataset(300, seed=4, min_objects=2, holdout=every_above)
    for i in range(300):
        objects = no_above.attributes(i)["objects"]
        assert all(relation_between(a, b) != "above" for a in objects for b in objects if a is not b)
        assert "above" not in no_above.attributes(i)["caption"]
    with pytest.raises(ValueError, match="unknown colour"):
        ShapesDataset(holdout={"color_shape": [("pink", "circle")]})
    with pytest.raises(ValueError, match="unknown holdout keys"):
        ShapesDataset(holdout={"colour_shape": []})


def test_holdout_prompts():
    prompts = holdout_prompts(DEFAULT_HOLDOUT)
    assert len(prompts) == len(DEFAULT_HOLDOUT["color_shape"]) + len(DEFAULT_HOLDOUT["relation"])
    captions = {p["caption"] for p in prompts}
    assert "a red triangle" in captions and "a green circle above a purple square" in captions
    rel = next(p for p in prompts if p["relation"])
    assert rel["relation"] == {"subject": 0, "object": 1, "relation": "above"}
    assert rel["objects"] == [{"color": "green", "shape": "circle"}, {"color": "purple", "shape": "square"}]


def test_shapes_render_speed():
    for image_size in (32, 64):
        ds = ShapesDataset(100_000, image_size=image_size)
        ds[0]
        n, start = 500, time.perf_counter()
        for i in range(n):
            ds[i]
        rate = n / (time.perf_counter() - start)
        print(f"shapes at {image_size} px: {rate:.0f} items/s (render + tensor, one core)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's non-writable numpy array warning
        ds[1]


# ----------------------------------------------------------------------------------------------------------
# oversampling relation captions (the shapes expert's recipe)


def test_states_relation_finds_relations_not_places():
    assert states_relation("a red circle above a blue square")
    assert states_relation("A small red circle to the left of a large blue square")
    assert states_relation("a red circle below a blue square") and states_relation("x to the right of y")
    for caption in ("a red circle on the left", "a red circle in the top left corner", "a red circle at the top",
                    "two red circles and a blue square", "a red circle and a blue square", "aboveground"):
        assert not states_relation(caption), caption  # fmt: skip
    ds = ShapesDataset(300, seed=3, position_prob=1.0, relation_prob=1.0)
    for i in range(len(ds)):  # the captions' own words: true exactly when the caption states a relation
        a = ds.attributes(i)
        assert ds.caption(i) == a["caption"]
        assert states_relation(a["caption"]) == (a["relation"] is not None), a["caption"]


def test_oversampled_draws_kept_items_times_per_epoch_and_keeps_their_index(tmp_path):
    ds = ShapesDataset(60, seed=1, relation_prob=1.0)
    over = Oversampled(ds, states_relation, 3)
    rel = [i for i in range(len(ds)) if ds.attributes(i)["relation"] is not None]
    assert rel and over.kept == rel and len(over) == len(ds) + 2 * len(rel)
    seen = [over[j]["index"] for j in range(len(over))]
    assert sorted(seen) == sorted(list(range(len(ds))) + 2 * rel)  # every item once, relations twice more
    j = len(ds) + 1  # a repeat: the item itself, index included (a latent cache of `ds` serves it)
    assert over[j]["index"] == rel[1] and over[j]["caption"] == ds[rel[1]]["caption"]
    torch.testing.assert_close(over[j]["image"], ds[rel[1]]["image"])
    assert len(Oversampled(ds, states_relation, 1)) == len(ds)
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="whole number >= 1"):
            Oversampled(ds, states_relation, bad)

    # datasets with epochs pass them on; captions come from `caption(i)` or, without it, from the item
    for k, text in enumerate(["a red square above a blue circle", "a red square"]):
        _halves(tmp_path / f"{k}.png")
        (tmp_path / f"{k}.txt").write_text(text)
    folder = ImageCaptionFolder(tmp_path, 16, flip=True)
    over = Oversampled(folder, states_relation, 2)
    assert over.kept == [0] and len(over) == 3
    over.set_epoch(5)
    assert folder.epoch == 5

    class Bare(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"caption": ["a above b", "a"][i], "index": i}

    assert Oversampled(Bare(), states_relation, 4).kept == [0]
