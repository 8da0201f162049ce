"""Hard-negative captions for CLIP training (NegCLIP, Yuksekgonul et al. 2023) and the loss that uses them."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from sfumato.training.clip import CLIPTask, hard_negative
from sfumato.training.losses import clip_loss
from sfumato.training.task import BatchRandom

STEPS = 300  # the tiny towers find the word order after ~200 steps (a plateau before it)


def all_negatives(caption: str, tries: int = 200) -> set[str]:
    rng = random.Random(0)
    return {hard_negative(caption, rng) for _ in range(tries)}


def test_each_edit_contradicts_the_caption():
    assert all_negatives("a red circle above a blue square") == {
        "a red circle below a blue square",  # relation
        "a blue circle above a red square",  # colour binding
    }
    assert all_negatives("a small green triangle in the top left corner") == {
        "a small green triangle in the bottom left corner",
        "a small green triangle in the top right corner",
        "a large green triangle in the top left corner",
    }
    assert all_negatives("a small orange cross to the left of a large orange circle") == {
        "a small orange cross to the right of a large orange circle",
        "a large orange cross to the left of a small orange circle",  # sizes swap; one colour: no colour edit
    }
    assert all_negatives("two red circles and a blue square") == {
        "three red circles and a blue square",
        "two blue circles and a red square",
    }


def test_no_edit_applies_to_a_bare_object():
    assert all_negatives("a blue cross") == {None}
    assert all_negatives("a photo of a cat") == {None}


def test_negatives_join_the_image_to_text_softmax_only():
    g = torch.Generator().manual_seed(0)
    image, text, neg = (torch.randn(4, 8, generator=g) for _ in range(3))
    t = torch.tensor(math.log(10.0))
    plain = clip_loss(image, text, t)
    # every negative masked out: the plain loss
    assert torch.allclose(clip_loss(image, text, t, neg, torch.zeros(4, dtype=torch.bool)), plain)
    # by hand: image -> text softmax over the 4 captions and the 4 negatives, text -> image over the images
    i, tx, n = (F.normalize(v, dim=-1) for v in (image, text, neg))
    logits = 10 * i @ tx.t()
    i2t = 10 * torch.cat([i @ tx.t(), i @ n.t()], dim=1)
    want = 0.5 * (
        -torch.log_softmax(i2t, 1).diagonal().mean() - torch.log_softmax(logits.t(), 1).diagonal().mean()
    )
    assert torch.allclose(clip_loss(image, text, t, neg), want, atol=1e-6)
    # a negative equal to its own caption halves that image's probability: the i2t term rises
    assert clip_loss(image, text, t, text.clone()) > plain


@pytest.mark.slow  # 15 s alone, ~2 min beside another worker: the slow stage
def test_clip_task_with_hard_negatives_learns_to_prefer_the_true_relation():
    """Two squares, one above the other; captions say which colour is above ("a red square above a blue
    square" or "a blue square below a red square"). acc_hard, how often an image prefers its caption to the
    edited one (relation or colours swapped), starts at chance and ends near 1."""
    from sfumato.models.clip import PRESETS
    from sfumato.text.tokenizer import train_bpe

    colours = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "green": (-1.0, 1.0, -1.0)}
    names = list(colours)

    def batch(n, seed):
        r = random.Random(seed)
        images, captions = [], []
        for _ in range(n):
            a, b = r.sample(names, 2)
            img = torch.ones(3, 32, 32)
            img[:, 2:14, 10:22] = torch.tensor(colours[a])[:, None, None]  # a on top
            img[:, 18:30, 10:22] = torch.tensor(colours[b])[:, None, None]
            images.append(img)
            captions.append(f"a {a} square above a {b} square" if r.random() < 0.5 else f"a {b} square below a {a} square")
        return {"image": torch.stack(images), "caption": captions, "index": torch.arange(n)}

    tok = train_bpe([c for s in range(5) for c in batch(32, s)["caption"]], 600, min_frequency=1)
    from dataclasses import replace

    cfg = PRESETS["tiny"]
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id))
    task = CLIPTask(cfg, tok, hard_negatives=True)
    torch.manual_seed(0)
    model = task.trainable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for step in range(STEPS):
        b = batch(64, 100 + step)
        loss, metrics = task.loss(b, BatchRandom(0, step, b["index"]), step, model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics["acc_hard"])
    assert sum(history[:10]) / 10 < 0.75
    assert sum(history[-10:]) / 10 > 0.9, history[-10:]


def test_hard_negatives_need_the_softmax_loss():
    from dataclasses import replace

    from sfumato.models.clip import PRESETS
    from sfumato.text.tokenizer import train_bpe

    tok = train_bpe(["a red square above a blue square"] * 4, 600, min_frequency=1)
    cfg = PRESETS["tiny-siglip"]
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id))
    with pytest.raises(ValueError, match="softmax"):
        CLIPTask(cfg, tok, loss="sigmoid", hard_negatives=True)
