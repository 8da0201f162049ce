"""The image-text matcher: false captions are false, the head reads its CLIP, a bundle with one ranks by it."""

import itertools
import json
import random
import re
from collections import Counter

import pytest
import torch
from conftest import random_weights_, tiny_bundle

import sfumato
from sfumato.checkpoints.bundle import load_bundle, save_bundle
from sfumato.checkpoints.native import load_model
from sfumato.cli import main
from sfumato.data.shapes import (
    DEFAULT_HOLDOUT,
    POSITIONS,
    RELATIONS,
    ShapesDataset,
    relation_between,
    true_positions,
)
from sfumato.models.clip import CLIP, PRESETS
from sfumato.models.matcher import ImageTextMatcher, MatcherConfig
from sfumato.pipelines import ranking
from sfumato.pipelines.clip import clip_pixels
from sfumato.pipelines.ranking import candidate_seeds, matched_score, pick_best
from sfumato.text.tokenizer import train_bpe
from sfumato.training import recipes as R
from sfumato.training.matcher import MatcherTask, false_caption, states_holdout

_NUM = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
_PHRASE = re.compile(r"\b(a|an|two|three|four) (?:(small|large) )?(\w+) (circles?|squares?|triangles?|diamonds?|cross(?:es)?)\b")


def _claims(caption: str) -> list[tuple[int, str | None, str, str]]:
    """(count, size word, colour, shape) per noun phrase, read independently of the code under test."""
    out = []
    for m in _PHRASE.finditer(caption):
        shape = "cross" if m[4].startswith("cross") else m[4].removesuffix("s")
        out.append((_NUM[m[1]], m[2], m[3], shape))
    return out


def _is_false(caption: str, attributes: dict) -> bool:
    """Whether the ground truth contradicts the caption: another multiset of (colour, shape), a size word that
    some object of its kind does not have, a relation that does not hold, or a place that is not true."""
    objects = attributes["objects"]
    claims = _claims(caption)
    said = Counter()
    for n, _, c, s in claims:
        said[c, s] += n
    if said != Counter((o["color"], o["shape"]) for o in objects):
        return True
    units = [(size, c, s) for n, size, c, s in claims for _ in range(n)]  # one per object the caption names
    if not any(all(size in (None, o["size"]) and (c, s) == (o["color"], o["shape"]) for (size, c, s), o in zip(u, objects))
               for u in itertools.permutations(units)):  # fmt: skip
        return True
    for name, words in RELATIONS.items():
        if f" {words} " in caption and len(objects) == 2:
            fits = lambda o, claim: (o["color"], o["shape"]) == claim[2:] and claim[1] in (None, o["size"])
            a, b = objects
            return not any(relation_between(x, y) == name and fits(x, claims[0]) and fits(y, claims[1])
                           for x, y in ((a, b), (b, a)))  # fmt: skip
    for name, words in POSITIONS.items():
        if caption.endswith(" " + words):
            return name not in true_positions(objects[0]["center"], attributes["image_size"])
    return False


def test_every_edited_caption_is_false_of_its_image_and_true_captions_are_not():
    ds = ShapesDataset(600, seed=3, max_objects=4, repeat_prob=0.3)
    rng = random.Random(0)
    kinds = Counter()
    for i in range(len(ds)):
        a = ds.attributes(i)
        assert not _is_false(a["caption"], a), a["caption"]  # the checker of this test reads true captions as true
        for _ in range(3):
            edited = false_caption(a["caption"], a, rng)
            assert edited is not None and edited != a["caption"]
            assert _is_false(edited, a), (a["caption"], edited)
            kinds["count" if [n for n, *_ in _claims(edited)] != [n for n, *_ in _claims(a["caption"])] else "other"] += 1
    assert kinds["count"] > 300 and kinds["other"] > 300, kinds  # both kinds of edit are drawn often


def test_false_captions_never_name_what_is_held_out():
    ds = ShapesDataset(400, seed=4, holdout=DEFAULT_HOLDOUT, max_objects=4, repeat_prob=0.3)
    rng = random.Random(1)
    assert states_holdout("two red triangles and a blue square", DEFAULT_HOLDOUT)
    assert states_holdout("a purple square below a green circle", DEFAULT_HOLDOUT)  # the held-out relation, reversed
    assert not states_holdout("a purple square above a green circle", DEFAULT_HOLDOUT)
    n = 0
    for i in range(len(ds)):
        a = ds.attributes(i)
        for _ in range(4):
            edited = false_caption(a["caption"], a, rng, DEFAULT_HOLDOUT)
            n += edited is not None
            assert edited is None or not states_holdout(edited, DEFAULT_HOLDOUT), edited
    assert n > 1500
    # captions in other words get no edit; without ground truth no place is edited
    assert false_caption("a photo of a cat", None, rng) is None
    assert false_caption("a red circle on the left", None, rng) != "a red circle on the left"


def _tiny_clip(tok) -> CLIP:
    c = PRESETS["tiny"]
    text = type(c.text)(**{**c.text.__dict__, "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_token_id})
    return random_weights_(CLIP(type(c)(text=text, vision=c.vision)), 5)


def test_the_head_encodes_each_image_once_and_refuses_another_clip():
    tok = train_bpe(["a red circle", "two blue squares"] * 5, 600, min_frequency=1)
    clip = _tiny_clip(tok)
    m = random_weights_(ImageTextMatcher(MatcherConfig.for_clip(clip.config, width=32, layers=1)), 6)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = tok(["a red circle", "two blue squares", "a red circle"], context_length=16)
    pixels = clip_pixels(images, 32)
    paired = m(clip, pixels, ids, torch.tensor([0, 1, 1]))
    repeated = m(clip, pixels[[0, 1, 1]], ids)
    assert paired.shape == (3,) and torch.allclose(paired, repeated, atol=1e-5)
    assert not torch.allclose(paired[1], paired[2])  # the caption matters
    with pytest.raises(ValueError, match="image_of"):
        m(clip, pixels, ids)
    other = CLIP(PRESETS["tiny"])  # another end token
    with pytest.raises(ValueError, match="pass the CLIP it was trained on"):
        m.check_clip(other)


def test_a_tiny_run_trains_and_exports_the_head(tmp_path, capsys):
    clip_run = tmp_path / "clip"
    R.train_clip("shapes", clip_run, R.recipe("clip", "tiny"), progress=False)
    assert main(["train", "matcher", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 2
    assert "needs --text-from" in capsys.readouterr().err
    assert main(["train", "matcher", "--preset", "tiny", "--text-from", str(clip_run / "final"),
                 "--out", str(tmp_path / "m")]) == 0  # fmt: skip
    path = tmp_path / "m/final/matcher.safetensors"
    assert isinstance(load_model(path), ImageTextMatcher)
    steps = [json.loads(line)["step"] for line in (tmp_path / "m/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == R.recipe("matcher", "tiny").train.steps


def test_a_batch_pairs_each_image_with_its_caption_a_false_one_and_another():
    tok = train_bpe(["a red circle on the left", "two blue squares"] * 5, 600, min_frequency=1)
    task = MatcherTask(_tiny_clip(tok), tok, seed=0, holdout=DEFAULT_HOLDOUT)
    ds = ShapesDataset(8, seed=0, holdout=DEFAULT_HOLDOUT)
    batch = {"caption": [ds.caption(i) for i in range(8)], "attributes": [ds.attributes(i) for i in range(8)],
             "index": torch.arange(8)}  # fmt: skip
    texts = task.captions(batch, step=3)
    assert texts[:8] == batch["caption"]
    assert all(_is_false(t, a) for t, a in zip(texts[8:16], batch["attributes"]))
    assert all(o in batch["caption"] and o != c for o, c in zip(texts[16:], batch["caption"]))
    assert task.captions(batch, step=3) == texts  # a function of (seed, step, index): a resumed run draws the same


def test_matched_score_is_the_logit_less_the_weighted_relative_error():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    errors = torch.tensor([0.10, 0.30, 0.20, 0.20])  # image 0: mean 0.2; image 1: mean 0.2
    score = matched_score(logits, errors, 2, weight=5.0)
    assert torch.allclose(score, torch.tensor([1.0 + 2.5, 2.0 - 2.5, 0.5, -1.0]))
    assert torch.equal(pick_best(-score, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="N \\* 3 alike"):
        matched_score(logits, errors, 3)


def test_a_bundle_with_a_matcher_ranks_by_its_logit_and_the_denoising_error(tmp_path, monkeypatch):
    b = tiny_bundle()
    tok = b.tokenizer
    b.clip = _tiny_clip(tok)
    b.matcher = random_weights_(ImageTextMatcher(MatcherConfig.for_clip(b.clip.config, width=32, layers=1)), 7)
    save_bundle(b, tmp_path / "bundle")
    assert load_bundle(tmp_path / "bundle").matcher is not None
    pipe = sfumato.load(tmp_path / "bundle")
    fast = dict(steps=3, guidance=2.0)
    prompt, k = "a photo of a cat", 4
    for seed in range(9, 20):  # a seed where the matcher and the denoising error disagree, else the test is moot
        cands = pipe.generate(prompt, seed=candidate_seeds(seed, k), batch=k, candidates=1, output="latent", **fast)
        with torch.no_grad():
            pixels = clip_pixels(pipe.vae.decode(pipe.vae.from_diffusion(cands)).clamp(-1, 1), 32)
            logits = pipe.matcher(pipe.clip, pixels, tok([prompt] * k, context_length=32))
        matcher, pipe.matcher = pipe.matcher, None
        by_error = pipe.generate(prompt, seed=seed, candidates=k, output="latent", **fast)
        pipe.matcher = matcher
        if not torch.allclose(by_error[0], cands[int(logits.argmax())], atol=1e-5):
            break
    assert not torch.allclose(by_error[0], cands[int(logits.argmax())], atol=1e-5)
    order = logits.argsort(descending=True)
    assert logits[order[0]] - logits[order[1]] > 1e-4, logits  # a clear winner
    monkeypatch.setattr(ranking, "MATCH_ERROR_WEIGHT", 0.0)  # the matcher alone
    kept = pipe.generate(prompt, seed=seed, candidates=k, output="latent", **fast)
    assert torch.allclose(kept[0], cands[order[0]], atol=1e-5)
    monkeypatch.setattr(ranking, "MATCH_ERROR_WEIGHT", 1e9)  # the error alone: as without a matcher
    kept = pipe.generate(prompt, seed=seed, candidates=k, output="latent", **fast)
    assert torch.allclose(kept[0], by_error[0], atol=1e-5)
    # a matcher without its CLIP is refused on load
    (tmp_path / "bundle/clip.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="clip.safetensors is missing"):
        load_bundle(tmp_path / "bundle")


def test_position_features_add_each_patch_place_and_nothing_else():
    tok = train_bpe(["a red circle on the left", "a red circle on the right"] * 5, 600, min_frequency=1)
    clip = _tiny_clip(tok)
    ids = tok(["a red circle on the left"] * 2, context_length=16)
    pixels = clip_pixels(torch.rand(2, 3, 32, 32) * 2 - 1, 32)
    with_places = random_weights_(ImageTextMatcher(MatcherConfig.for_clip(clip.config, width=32, layers=1,
                                                                          position_freqs=4)), 8)  # fmt: skip
    without = ImageTextMatcher(MatcherConfig.for_clip(clip.config, width=32, layers=1))
    state = {k: v for k, v in with_places.state_dict().items() if not k.startswith("position.")}
    without.load_state_dict(state)
    assert not torch.allclose(with_places(clip, pixels, ids), without(clip, pixels, ids), atol=1e-4)
    with torch.no_grad():  # a zero map from the features: exactly the head without them
        with_places.position.weight.zero_()
        with_places.position.bias.zero_()
    assert torch.allclose(with_places(clip, pixels, ids), without(clip, pixels, ids), atol=1e-6)
