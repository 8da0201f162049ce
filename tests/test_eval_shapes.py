"""The shapes benchmark: its checker against real renders (it must pass true ones and fail false ones), the
prompt set, the Fréchet distance against closed forms, and the `sfumato eval shapes` command's plumbing."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_bundle
from PIL import Image

from sfumato.data.shapes import (
    COLORS,
    DEFAULT_HOLDOUT,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    relation_between,
    render,
    true_positions,
)
from sfumato.eval.checker import check, detect, score
from sfumato.eval.metrics import frechet_distance, frechet_distance_gaussians
from sfumato.eval.shapes import (
    CRITERIA,
    PROMPT_SET_VERSION,
    aggregate,
    count_errors,
    goals,
    prompt_from_attributes,
    prompt_set,
    prompt_set_hash,
    wilson_interval,
)

S = 32  # the data set's and the shipped model's image size


def _rates(pairs) -> tuple[dict, Counter]:
    """(criterion -> fraction of (image, prompt) pairs where the checker says it holds, applicable counts).
    An image met again (several prompts of one image in a row) is not segmented again."""
    held, n = Counter(), Counter()
    last, found = None, None
    for image, prompt in pairs:
        if image is not last:
            last, found = image, detect(image)
        for c, v in score(found, prompt, S).items():
            if v is not None:
                n[c] += 1
                held[c] += bool(v)
    return {c: held[c] / n[c] for c in n}, n


# ---------------------------------------------------------------------------------------------------------
# The checker on true renders: it must score >= 99 % on every criterion


def test_checker_passes_real_dataset_renders():
    """Prompts from the ground truth of 1,200 items of the training distribution (held-out pairs excluded,
    as in training): every object's colour, shape and size, each true position word of a lone object, and
    every relation that holds between two objects by the data set's own rule."""
    ds = ShapesDataset(1200, image_size=S, seed=3, holdout=DEFAULT_HOLDOUT)
    pairs = []
    for i in range(len(ds)):
        attrs = ds.attributes(i)
        image = render(attrs["objects"], S)
        base = prompt_from_attributes(attrs, positions=False)
        base["relation"] = None
        pairs.append((image, base))
        objs = attrs["objects"]
        if len(objs) == 1:
            for word in true_positions(objs[0]["center"], S):
                p = prompt_from_attributes(attrs, positions=False)
                p["objects"][0]["position"] = word
                pairs.append((image, p))
        for a in range(len(objs)):
            for b in range(len(objs)):
                rel = relation_between(objs[a], objs[b]) if a != b else None
                if rel:
                    p = prompt_from_attributes(attrs, positions=False)
                    p["relation"] = {"subject": a, "object": b, "relation": rel}
                    pairs.append((image, p))
    rates, n = _rates(pairs)
    assert set(n) == set(CRITERIA), n
    assert n["relation"] > 300 and n["position"] > 200, n
    for criterion, rate in rates.items():
        assert rate >= 0.99, (criterion, rate, n[criterion])


def _layout(prompt: dict, rng: np.random.Generator) -> list[dict]:
    """Objects that truly show a prompt: sizes as asked (else random), the named position, the relation's
    two objects on either side of the middle along its axis, other objects in free cells of a 3 x 3 grid."""
    objs = prompt["objects"]
    radius = []
    for o in objs:
        size = o.get("size") or ("small" if len(objs) > 2 else ["small", "large"][int(rng.integers(2))])
        lo, hi = SIZES[size]
        radius.append(S * (lo + (hi - lo) * rng.uniform(0.2, 0.8)))
    centres: list[list[float] | None] = [None] * len(objs)
    if len(objs) == 1 and objs[0].get("position"):
        word, r = objs[0]["position"], radius[0]
        lo, hi = max(0.2 * S, r + 1), min(0.8 * S, S - r - 1)  # inside the image, at least 1 px from its edge
        x = lo if "left" in word else hi if "right" in word else S / 2
        y = lo if "top" in word else hi if "bottom" in word else S / 2
        centres[0] = [x, y]
    rel = prompt.get("relation")
    if rel:  # centres 16 px apart, radii at most 7 px (0.22 S, still "large")
        radius = [min(r, 0.22 * S) for r in radius]
        near, far = (0.25, 0.75) if rel["relation"] in ("above", "left of") else (0.75, 0.25)
        off = rng.uniform(-0.05, 0.05) * S
        for k, t in ((rel["subject"], near), (rel["object"], far)):
            vertical = rel["relation"] in ("above", "below")
            centres[k] = [S / 2 + off, t * S] if vertical else [t * S, S / 2 + off]
    cells = [[(i + 0.5) / 3 * S, (j + 0.5) / 3 * S] for j in range(3) for i in range(3)]
    rng.shuffle(cells)
    for k in range(len(objs)):
        if centres[k] is None:
            centres[k] = cells.pop() if len(objs) > 1 else [S / 2, S / 2]
    if len(objs) > 1:  # grid cells hold small shapes only
        radius = [min(r, S * SIZES["small"][1]) if centres[k] in cells or not rel else r
                  for k, r in enumerate(radius)]  # fmt: skip
    return [{"shape": o["shape"], "color": o["color"], "center": c, "radius": r}
            for o, c, r in zip(objs, centres, radius)]  # fmt: skip


def test_checker_passes_a_true_render_of_every_benchmark_prompt():
    """Each prompt of the set, held-out ones included, drawn truly with `render` three times: the checker
    must pass it on every applicable criterion (so every prompt can be passed, and is read right)."""
    rng = np.random.default_rng(0)
    pairs = [(render(_layout(p, rng), S), p) for p in prompt_set() for _ in range(3)]
    rates, n = _rates(pairs)
    assert n["relation"] == 3 * sum(1 for p in prompt_set() if p["relation"])
    for criterion, rate in rates.items():
        assert rate >= 0.99, (criterion, rate)
    held = [(im, p) for im, p in pairs if p["heldout"]]
    assert len(held) >= 60
    assert all(check(im, p)["pass"] for im, p in held)


def test_count_errors_tell_too_few_from_too_many():
    """Renders of "two ..." with one, two and three such objects (one seen prompt, one held out): the summary
    reads them as one too few, right and one too many, per split; other categories are not counted."""
    rng = np.random.default_rng(1)
    rows = []
    for heldout in (False, True):
        p = next(q for q in prompt_set() if q["category"] == "count" and q["count"] == 2 and q["heldout"] == heldout)
        images = [render(_layout(dict(p, objects=p["objects"][:1] * n), rng), S) for n in (1, 2, 3, 2)]
        rows.append((p, images, [check(im, p) for im in images]))
    single = next(q for q in prompt_set() if q["category"] == "single")
    rows.append((single, [], []))
    e = count_errors(rows)
    for split in ("seen", "heldout"):
        assert e[split] == {"n_images": 4, "right": 2, "too_few": 1, "too_many": 1, "off_by": {"-1": 1, "0": 2, "1": 1}}


def test_goals_carry_their_sample_size_and_wilson_interval():
    """Each goal records how many images it was measured on and the rate's 95 % Wilson interval, which scipy
    computes too; the closed form gives [0, z^2 / (n + z^2)] for 0 of n. A count rate of 59 of 72 meets 80 %
    while its interval reaches well below it: the report shows how little one seed set settles."""
    from scipy.stats import binomtest

    for k, n in [(0, 10), (3, 10), (50, 100), (59, 72), (72, 72), (1, 1)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k / n, n) == pytest.approx((ref.low, ref.high), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 1.96**2 / (10 + 1.96**2)))
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0.5, 0)

    results = [{"category": "count", "heldout": False, "scores": {"count": k < 59, "color": True}, "pass": k < 59}
               for k in range(72)]  # fmt: skip
    results += [{"category": "single", "heldout": False, "scores": {"color": True}, "pass": True}] * 8
    g = goals(aggregate(results))
    count = g["seen/count"]
    assert count["n"] == 72 and count["value"] == round(59 / 72, 4) and count["met"] is True
    assert count["ci95"] == pytest.approx(wilson_interval(59 / 72, 72), abs=1e-4) and count["ci95"][0] < 0.75
    assert g["seen/color"]["n"] == 80 and g["seen/color"]["ci95"][1] == 1.0
    assert g["seen/relation"] == {**g["seen/relation"], "value": None, "n": None, "ci95": None, "met": None}


# ---------------------------------------------------------------------------------------------------------
# ... and it must reject renders that contradict the prompt


def _other(value, choices, avoid=()):
    return next(c for c in choices if c != value and c not in avoid)


@pytest.mark.parametrize("criterion", ["color", "shape", "count", "relation", "size", "position"])
def test_checker_rejects_renders_that_contradict_the_prompt(criterion):
    """Every applicable prompt of the set, drawn with one thing wrong: a colour or shape swapped for one the
    prompt does not name, one object missing or one extra, the relation's two objects swapped, the other
    size, the mirrored position. The checker must fail that criterion every time."""
    rng = np.random.default_rng(1)
    prompts = [p for p in prompt_set() if criterion in ("color", "shape", "count") or
               (criterion == "relation" and p["relation"]) or
               any(o.get(criterion) for o in p["objects"])]  # fmt: skip
    assert len(prompts) >= 12
    wrong_accepted = []
    for p in prompts:
        objs = _layout(p, rng)
        if criterion == "color":
            objs[0]["color"] = _other(objs[0]["color"], list(COLORS), {o["color"] for o in objs})
        elif criterion == "shape":
            objs[0]["shape"] = _other(objs[0]["shape"], SHAPES, {o["shape"] for o in objs})
        elif criterion == "count":
            if len(objs) == 1:  # a small extra copy in the corner farthest from the (now small) object
                x, y = objs[0]["center"]
                corner = [0.15 * S if x > S / 2 else 0.85 * S, 0.15 * S if y > S / 2 else 0.85 * S]
                objs[0]["radius"] = 0.12 * S
                objs.append({**objs[0], "center": corner})
            else:
                objs.pop()
        elif criterion == "relation":
            a, b = p["relation"]["subject"], p["relation"]["object"]
            objs[a]["center"], objs[b]["center"] = objs[b]["center"], objs[a]["center"]
        elif criterion == "size":
            for o, e in zip(objs, p["objects"]):
                if e.get("size"):
                    lo, hi = SIZES[_other(e["size"], list(SIZES))]
                    o["radius"] = S * (lo + hi) / 2
        else:  # position: mirrored through the centre ("center" moves to a corner)
            x, y = objs[0]["center"]
            objs[0]["center"] = [S - x, S - y] if p["objects"][0]["position"] != "center" else [0.2 * S, 0.2 * S]
        result = check(render(objs, S), p)
        if result["scores"][criterion] is not False:
            wrong_accepted.append((p["text"], objs))
    assert not wrong_accepted, wrong_accepted[:3]


def test_checker_rejects_other_colours_blobs_and_empty_images():
    red_circle = {"id": "t", "category": "single", "text": "a red circle", "relation": None, "heldout": False,
                  "objects": [{"color": "red", "shape": "circle"}], "count": 1}  # fmt: skip
    blank = Image.new("RGB", (S, S), (235, 235, 235))
    assert check(blank, red_circle)["scores"] == {
        "color": False, "shape": False, "binding": False, "count": False, "size": None, "position": None,
        "relation": None,
    }  # fmt: skip
    # a black circle is no palette colour: found, but as "other"
    r = check(render([{"shape": "circle", "color": (0, 0, 0), "center": [16, 16], "radius": 7}], S), red_circle)
    assert [o["color"] for o in r["objects"]] == ["other"] and r["scores"]["color"] is False
    # a 2 x 2 px red speck is no object
    speck = np.full((S, S, 3), 235, np.uint8)
    speck[10:12, 10:12] = COLORS["red"]
    assert check(Image.fromarray(speck), red_circle)["objects"] == []
    # an oval (two overlapping circles side by side) and an irregular merger of two shapes are no shape
    oval = [{"shape": "circle", "color": "red", "center": [12, 16], "radius": 6},
            {"shape": "circle", "color": "red", "center": [20, 16], "radius": 6}]  # fmt: skip
    merged = [{"shape": "triangle", "color": "red", "center": [14, 16], "radius": 6},
              {"shape": "square", "color": "red", "center": [19, 19], "radius": 4}]  # fmt: skip
    for objs in (oval, merged):
        r = check(render(objs, S), red_circle)
        assert [(o["color"], o["shape"]) for o in r["objects"]] == [("red", None)], r["objects"]
        assert r["scores"]["shape"] is False and r["scores"]["count"] is True
    # random noise is no shape at all
    noise = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    assert not check(Image.fromarray(noise), red_circle)["pass"]


def test_detected_geometry_matches_the_truth():
    """Centres within 0.25 px and radii within 0.25 px of the truth on 300 renders; at 64 px too."""
    for size in (32, 64):
        ds = ShapesDataset(150, image_size=size, seed=8)
        for i in range(len(ds)):
            attrs = ds.attributes(i)
            found = check(ds.image(i), prompt_from_attributes(attrs))["objects"]
            assert len(found) == len(attrs["objects"])
            for o in attrs["objects"]:
                f = min(found, key=lambda f: math.dist(f["center"], o["center"]))
                assert math.dist(f["center"], o["center"]) < 0.25, (i, o, f)
                assert abs(f["radius"] - o["radius"]) < 0.25, (i, o, f)
                assert (f["color"], f["shape"]) == (o["color"], o["shape"])


# ---------------------------------------------------------------------------------------------------------
# The prompt set


def test_prompt_set_is_fixed_and_versioned():
    prompts = prompt_set()
    assert prompts == prompt_set()
    # Changing the prompts changes this hash: then bump PROMPT_SET_VERSION and write the new hash here.
    assert (PROMPT_SET_VERSION, prompt_set_hash(prompts), len(prompts)) == (1, "44e437283274", 119)
    assert len({p["id"] for p in prompts}) == len(prompts) == len({p["text"] for p in prompts})
    counts = Counter((p["category"], p["heldout"]) for p in prompts)
    assert all(counts[c, False] >= 12 for c in ("single", "size", "position", "relation", "count")), counts
    assert all(counts[c, True] >= 3 for c in ("single", "size", "position", "relation", "count")), counts
    assert 100 <= len(prompts) <= 300
    # held out exactly when a held-out pair or the held-out relation (either way round) appears
    held_pairs = {tuple(x) for x in DEFAULT_HOLDOUT["color_shape"]}
    for p in prompts:
        pairs = {(o["color"], o["shape"]) for o in p["objects"]}
        relation = p["relation"] and (
            (*pairs_of(p, "subject"), p["relation"]["relation"], *pairs_of(p, "object"))
        )
        is_held = bool(pairs & held_pairs) or relation in {
            ("green", "circle", "above", "purple", "square"),
            ("purple", "square", "below", "green", "circle"),
        }
        assert p["heldout"] == is_held, p
    assert "a green circle above a purple square" in {p["text"] for p in prompts}


def pairs_of(p, role):
    o = p["objects"][p["relation"][role]]
    return o["color"], o["shape"]


def _template(text: str) -> str:
    """A caption with its colour, shape and size words replaced: the phrasing alone."""
    words = []
    for w in text.split():
        if w in COLORS:
            w = "C"
        elif w in SHAPES:
            w = "S"
        elif w.rstrip("es") in SHAPES or w[:-1] in SHAPES or w[:-2] in SHAPES:
            w = "SS"
        elif w in SIZES:
            w = "Z"
        words.append(w)
    return re.sub(r"\ban? C\b", "a C", re.sub(r"\ban? Z\b", "a Z", " ".join(words)))


def test_prompts_use_the_training_captions_phrasing():
    """Every prompt's phrasing (colours, shapes and sizes blanked) occurs among the data set's captions."""
    ds = ShapesDataset(20000, image_size=S, seed=0, holdout=DEFAULT_HOLDOUT)
    seen = {_template(ds.attributes(i)["caption"]) for i in range(0, 20000, 3)}
    missing = [p["text"] for p in prompt_set() if _template(p["text"]) not in seen]
    assert not missing, missing
    # and the articles agree with the next word as the captions write them
    for p in prompt_set():
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", p["text"]), p["text"]
    assert set(POSITIONS) == {o["position"] for p in prompt_set() for o in p["objects"] if o.get("position")}


# ---------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_closed_forms():
    # diagonal covariances: |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    s1, s2 = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, 2.0, 0.1], dtype=torch.float64)
    fd = frechet_distance_gaussians(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert fd == pytest.approx(5.0 + 4.0 + 0.0 + 0.16, rel=1e-12)
    # a common rotation of both (commuting covariances) changes nothing
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rot = frechet_distance_gaussians(q @ mu1.double(), q @ torch.diag(s1**2).double() @ q.T,
                                     q @ mu2.double(), q @ torch.diag(s2**2).double() @ q.T)  # fmt: skip
    assert rot == pytest.approx(fd, rel=1e-10)
    # non-commuting 2 x 2: tr sqrt(A B) = sqrt(tr(A B) + 2 sqrt(det A det B)), as the eigenvalues of A B
    # are real and >= 0
    a = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    tr_sqrt = math.sqrt(float(torch.trace(a @ b)) + 2 * math.sqrt(float(torch.det(a) * torch.det(b))))
    zero = torch.zeros(2, dtype=torch.float64)
    expected = float(torch.trace(a) + torch.trace(b)) - 2 * tr_sqrt
    assert frechet_distance_gaussians(zero, a, zero, b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance_gaussians(zero, a, zero, a) == pytest.approx(0.0, abs=1e-12)
    # singular covariances (fewer samples than dimensions' worth of rank) stay finite and >= 0
    c = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert frechet_distance_gaussians(zero, c, zero, c) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_of_samples():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + 1
    # N(0, I) vs N(1, 4I) in 4 dims: 4 * 1 + 4 * (2 - 1)^2 = 8
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.03)
    assert frechet_distance(a[:10000], a[10000:]) < 0.01
    with pytest.raises(ValueError, match="equal d"):
        frechet_distance(a, b[:, :3])


def test_frechet_distance_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 6, 6, generator=g, dtype=torch.float64)[:2]
    a, b = x @ x.T, y @ y.T
    zero = torch.zeros(6, dtype=torch.float64)
    expected = float(torch.trace(a + b)) - 2 * np.trace(linalg.sqrtm(a.numpy() @ b.numpy())).real
    assert frechet_distance_gaussians(zero, a, zero, b) == pytest.approx(expected, rel=1e-8)


# ---------------------------------------------------------------------------------------------------------
# The command (random weights: the plumbing only)


def _tiny_clip(tokenizer):
    from sfumato.models.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=tokenizer.vocab_size, width=32, layers=1, heads=2, mlp_width=64,
                          eos_token_id=tokenizer.eos_token_id, projection_dim=16)  # fmt: skip
    vision = CLIPVisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_width=64,
                              projection_dim=16)  # fmt: skip
    return CLIP(CLIPConfig(text=text, vision=vision))


def test_eval_shapes_command_writes_report_and_contact_sheet(tiny_bundle_path, tmp_path, capsys):
    from sfumato.checkpoints.native import save_model
    from sfumato.cli import main
    from sfumato.text.tokenizer import CLIPTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_bundle_path, model)
    out = tmp_path / "eval"
    argv = ["eval", "shapes", "--model", str(model), "--out", str(out), "--limit", "3", "--seeds", "2",
            "--steps", "2", "--fd-images", "4", "--real-images", "6"]  # fmt: skip
    # no CLIP beside the bundle: an error that says what to pass
    assert main(argv) == 2
    assert "--clip PATH" in capsys.readouterr().err
    save_model(_tiny_clip(CLIPTokenizer.from_pretrained(model / "tokenizer")), model / "clip.safetensors")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "seen single" in printed and "goal seen/color" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["prompt_set_version"] == PROMPT_SET_VERSION
    assert report["n_prompts"] == 3 and len(report["prompts"]) == 3
    assert report["model_hash"] and report["clip"].endswith("clip.safetensors")
    assert report["settings"]["steps"] == 2 and report["settings"]["seeds_per_prompt"] == 2
    # the sigma spacing the images were made with, resolved: Karras is dpmpp_2m's default
    assert report["settings"]["karras"] is True and "Karras sigmas" in printed
    assert all(len(p["scores"]) == 2 and len(p["seeds"]) == 2 for p in report["prompts"])
    assert report["rates"]["all"]["all"]["n_images"] == 6
    m = report["metrics"]
    assert m["checker_on_real"]["all"] == 1.0  # the checker's own check on real renders
    assert set(m["clip_zero_shot"]) == {"color", "shape"} and m["frechet_clip"]["n"] == 4
    assert math.isfinite(m["frechet_clip"]["generated_vs_real"]) and m["vae_psnr"]["mean_db"] > 0
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 2 * 96 and sheet.size[1] > 96
    # a bad option fails before any model is loaded
    assert main([*argv[:-2], "--fd-images", "1"]) == 2
    assert "--fd-images" in capsys.readouterr().err


def test_eval_categories_keep_the_full_runs_seeds(tmp_path, capsys):
    """`categories` evaluates only those prompts, with the seeds they get in a full run, and the goals say
    what "all" covers; unknown categories are refused by the function and by the command, before loading."""
    from sfumato.cli import main
    from sfumato.eval.shapes import evaluate_shapes

    class Blank:
        """A pipeline that draws empty canvases and records the seeds it was asked for."""

        def __init__(self):
            self.seeds, self.karras = [], set()

        def generate(self, prompts, *, seed, **kw):
            self.seeds += list(seed)
            self.karras.add(kw["karras"])
            return [Image.new("RGB", (32, 32), (128, 128, 128)) for _ in seed]

    full = prompt_set()
    pipe = Blank()
    report, _ = evaluate_shapes(pipe, vae=None, categories=["count"], seeds=2, fd_images=0, real_images=0,
                                karras=False)  # fmt: skip
    assert pipe.karras == {False} and report["settings"]["karras"] is False
    counts = [k for k, p in enumerate(full) if p["category"] == "count"]
    assert [p["text"] for p in report["prompts"]] == [full[k]["text"] for k in counts]
    assert pipe.seeds == [k * 2 + j for k in counts for j in range(2)]
    assert report["settings"]["categories"] == ["count"]
    assert report["goals"]["seen/color"]["over"].endswith("of the categories count only")
    assert report["goals"]["seen/relation"]["value"] is None  # no relation prompt was asked
    with pytest.raises(ValueError, match="choose from"):
        evaluate_shapes(pipe, vae=None, categories=["counts"], fd_images=0, real_images=0)
    # no real images: no reconstruction PSNR, even with a VAE (an empty PSNR raised from numpy before)
    report, _ = evaluate_shapes(pipe, vae=tiny_bundle().vae, categories=["size"], seeds=1, fd_images=0,
                                real_images=0)  # fmt: skip
    assert "vae_psnr" not in report["metrics"] and report["metrics"]["real_images"]["n"] == 0
    assert main(["eval", "shapes", "--out", str(tmp_path / "e"), "--categories", "count,colour"]) == 2
    assert "--categories" in capsys.readouterr().err


def test_eval_uses_the_models_best_of_k_and_records_it():
    """A model that defaults to best of K is evaluated at it, an explicit `candidates` wins, and a pipeline
    without the notion (default 1) is never passed the argument."""
    from sfumato.eval.shapes import evaluate_shapes

    class Ranked:
        default_candidates = 8

        def __init__(self):
            self.asked = set()

        def generate(self, prompts, *, seed, **kw):
            self.asked.add(kw.get("candidates"))
            return [Image.new("RGB", (32, 32), (128, 128, 128)) for _ in seed]

    pipe = Ranked()
    report, _ = evaluate_shapes(pipe, vae=None, limit=2, seeds=1, fd_images=0, real_images=0)
    assert pipe.asked == {8} and report["settings"]["candidates"] == 8
    pipe = Ranked()
    report, _ = evaluate_shapes(pipe, vae=None, limit=2, seeds=1, fd_images=0, real_images=0, candidates=1)
    assert pipe.asked == {None} and report["settings"]["candidates"] == 1
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        evaluate_shapes(pipe, vae=None, limit=2, candidates=0, fd_images=0, real_images=0)
