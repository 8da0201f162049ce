"""Training CLIP (Radford et al. 2021) or a SigLIP-head CLIP (Zhai et al. 2023) on image-caption batches.

Each rank encodes its local batch; the features of every rank are gathered (with gradient) and the loss is
computed on the global batch, so the negatives of a pair are all the other pairs of the global batch and the
gradient equals one process's on the whole batch (`sfumato.training.distributed` shows why).

Images arrive as the data pipeline gives them, (B, 3, H, W) in [-1, 1], and are turned into what
`sfumato.pipelines.clip.CLIPPipeline` feeds the exported model: shorter side resized to the model's
image_size (bicubic, antialiased), centre crop, OpenAI's mean / std. So an exported model classifies PIL
images through the pipeline as it saw them in training (up to the resampling filter of PIL vs torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from sfumato.checkpoints.native import build_on_meta, load_weights, save_model
from sfumato.models.clip import CLIP, CLIPConfig
from sfumato.pipelines.clip import CLIPPipeline, clip_pixels
from sfumato.pipelines.images import tensor_to_images
from sfumato.text.tokenizer import CLIPTokenizer
from sfumato.training.distributed import all_gather, all_gather_with_grad
from sfumato.training.losses import clip_loss, siglip_loss
from sfumato.training.task import BatchRandom, init_seeded

LOSSES = ("softmax", "sigmoid")
# The attributes that zero-shot evaluation looks for in a batch's "attributes" (the shapes dataset's).
EVAL_ATTRIBUTES = ("color", "shape")


# Hard negatives (NegCLIP, Yuksekgonul et al. 2023): a contrastive loss over random batches is solved by
# recognising which objects are present, so CLIP text features become bags of words that hardly change with
# "above" / "below" or with which colour goes with which shape. A caption with such a word changed is false
# of its image, and adding it as an extra text the image must not pick forces the encoders to represent it.
_PAIRS = (("above", "below"), ("left", "right"), ("top", "bottom"), ("two", "three"), ("small", "large"))
_OPPOSITES = {a: b for pair in _PAIRS for a, b in (pair, pair[::-1])}
COLOR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray",
               "grey")  # fmt: skip


def hard_negative(caption: str, rng: random.Random) -> str | None:
    """A caption that the image of `caption` contradicts, by one word-level edit chosen at random among those
    that apply, or None when none does:

    - a spatial, count or size word pair (above/below, left/right, top/bottom, two/three, small/large):
      every word of the pair is replaced by its opposite ("a red circle above a blue square" -> "... below
      ..."; "a small red circle and a large blue square" -> "a large red circle and a small blue square");
    - two different colour words: exchanged ("a red circle and a blue square" -> "a blue circle and a red
      square"), which breaks the binding of colours to objects.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    edits = [pair for pair in _PAIRS if pair[0] in words or pair[1] in words]
    colours = list(dict.fromkeys(w for w in words if w in COLOR_WORDS))  # distinct, in order
    if len(colours) >= 2:
        edits.append(("colours", colours[0], colours[1]))
    if not edits:
        return None
    edit = edits[rng.randrange(len(edits))]
    if edit[0] == "colours":
        a, b = edit[1], edit[2]
        swap = {a: b, b: a}
        return re.sub(rf"\b({a}|{b})\b", lambda m: swap[m.group(1)], caption)
    return re.sub(rf"\b({edit[0]}|{edit[1]})\b", lambda m: _OPPOSITES[m.group(1)], caption)


class CLIPForTraining(nn.Module):
    """What `CLIPTask` trains: a `CLIP` (`.clip`) whose forward returns what the loss needs.

    `CLIP.forward` returns the local (B, B) logits; the loss needs the features themselves, to gather them
    over ranks first. Everything goes through this forward so that DDP sees all of it.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.clip = CLIP(config)

    def forward(
        self, ids: torch.Tensor, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(image features (B, D), text features (B, D), logit_scale t (log), logit_bias or None);
        features unnormalised (the losses normalise)."""
        image = self.clip.encode_image(pixels)
        text = self.clip.encode_text(ids)
        return image, text, self.clip.logit_scale, self.clip.logit_bias


def _bare(model: nn.Module) -> CLIPForTraining:
    return getattr(model, "module", model)  # unwrap DDP


def caption_keys(captions: Sequence[str]) -> torch.Tensor:
    """(B,) int64 hashes of the captions, to tell equal captions apart from different ones across ranks."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little", signed=True)
         for c in captions],
        dtype=torch.long,
    )


def retrieval_accuracy(image: torch.Tensor, text: torch.Tensor, keys: torch.Tensor) -> tuple[float, float]:
    """In-batch retrieval: (image -> text, text -> image) top-1 accuracy of cosine similarity.

    A retrieval counts as right when the retrieved item's caption equals the query's own (keys: caption
    hashes), so a batch with repeated captions is not scored by an arbitrary tie-break between them.
    """
    sim = F.normalize(image.detach().float(), dim=-1) @ F.normalize(text.detach().float(), dim=-1).t()  # (N, N)
    keys = keys.to(sim.device)
    i2t = (keys[sim.argmax(dim=1)] == keys).float().mean().item()
    t2i = (keys[sim.argmax(dim=0)] == keys).float().mean().item()
    return i2t, t2i


class CLIPTask:
    """The `Task` that trains a joint `CLIP` with the softmax (CLIP) or sigmoid (SigLIP) loss.

    clip_config: the model (e.g. `PRESETS["tiny"]`, or `PRESETS["tiny-siglip"]` for loss="sigmoid"); its
        text tower's vocab_size / eos_token_id must fit the tokenizer.
    tokenizer: the BPE tokenizer (e.g. `train_bpe` on the captions); exported beside the model.
    loss: "softmax" (Radford et al. 2021) or "sigmoid" (Zhai et al. 2023; needs a config with logit_bias_init).
    seed: the model's initial weights (the objective draws no random numbers).
    max_logit_scale: exp(t) is clamped to at most this in the loss (OpenAI: 100, "to prevent scaling the
        logits by more than 100"); None: no clamp.
    eval_labels: {attribute: class names} for zero-shot evaluation in `preview`, e.g.
        {"color": ["red", "green"], "shape": ["circle", "square"]}; None: the values found in the preview
        batch's "attributes" for "color" and "shape".
    eval_templates: {attribute: prompt templates with "{}"} (averaged in embedding space; "a" / "an" made
        to agree with the word after it); None: prompts in the shapes captions' "a {color} {shape}" style,
        ensembled over the other attribute's names.
    preview_batch: a batch ("image", "caption", optionally "attributes") for the similarity matrix and the
        zero-shot accuracy of `preview`; may also be assigned later.
    hard_negatives: add one `hard_negative` of each caption (where one applies) as an extra text that its
        image must not pick (softmax loss only); the metric acc_hard is how often an image prefers its own
        caption to that negative.
    """

    name = "clip"

    def __init__(
        self,
        clip_config: CLIPConfig,
        tokenizer: CLIPTokenizer,
        *,
        loss: str = "softmax",
        seed: int = 0,
        max_logit_scale: float | None = 100.0,
        eval_labels: dict[str, Sequence[str]] | None = None,
        eval_templates: dict[str, Sequence[str]] | None = None,
        preview_batch: dict | None = None,
        hard_negatives: bool = False,
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if loss == "sigmoid" and clip_config.logit_bias_init is None:
            raise ValueError(
                "loss='sigmoid' needs a learnable logit bias, but clip_config.logit_bias_init is None; set it "
                "(SigLIP: logit_bias_init=-10, logit_scale_init=log(10)) or use PRESETS['tiny-siglip']"
            )
        if loss == "softmax" and clip_config.logit_bias_init is not None:
            raise ValueError(
                f"loss='softmax' does not use a logit bias, but clip_config.logit_bias_init="
                f"{clip_config.logit_bias_init}; set it to None or train with loss='sigmoid'"
            )
        text = clip_config.text
        if tokenizer.vocab_size > text.vocab_size or tokenizer.eos_token_id != text.eos_token_id:
            raise ValueError(
                f"the tokenizer ({tokenizer.vocab_size} tokens, end id {tokenizer.eos_token_id}) does not fit "
                f"the text tower (vocab_size={text.vocab_size}, eos_token_id={text.eos_token_id}); build the "
                "config with vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id"
            )
        self.clip_config = clip_config
        self.tokenizer = tokenizer
        self.loss_kind = loss
        self.seed = seed
        self.max_logit_scale = max_logit_scale
        self.eval_labels = eval_labels
        self.eval_templates = eval_templates
        self.preview_batch = preview_batch
        if hard_negatives and loss != "softmax":
            raise ValueError("hard_negatives=True needs loss='softmax' (the sigmoid loss has no use for them here)")
        self.hard_negatives = hard_negatives

    def trainable(self) -> CLIPForTraining:
        return init_seeded(lambda: CLIPForTraining(self.clip_config), self.seed)

    # -- inputs ----------------------------------------------------------------------------------------------

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised pixel values (B, 3, S, S), S = vision image_size."""
        return clip_pixels(images, self.clip_config.vision.image_size)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, T) ids padded to the longest caption only: the text tower is causal and pools at the end
        token, so the padding after it cannot change the features, and short captions cost T², not 77²."""
        T = min(self.tokenizer.context_length, self.clip_config.text.context_length)
        return self.tokenizer(list(captions), context_length=T, padding="longest")

    # -- objective -------------------------------------------------------------------------------------------

    def loss(
        self, batch: dict, rng: BatchRandom, step: int, model: nn.Module
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(_bare(model).parameters()).device
        pixels = self.pixels(batch["image"].to(device))
        captions = list(batch["caption"])
        B = len(captions)
        negatives = None
        if self.hard_negatives:
            # one random edit per caption, a function of (seed, step, caption) so a resumed run repeats it
            negatives = [hard_negative(c, random.Random(f"{self.seed}/{step}/{c}")) for c in captions]
            captions = captions + [n or "" for n in negatives]  # "" holds the place of a missing negative
        ids = self.tokenize(captions).to(device)
        image, text, t, b = model(ids, pixels)
        neg = None
        if negatives is not None:
            text, neg = text[:B], text[B:]  # (B, D) captions, (B, D) their negatives
        # float32 from here on (under autocast the towers may give bf16): the softmax over the global batch
        # and the normalisation need the precision, and the gathered features are small
        image, text, t = image.float(), text.float(), t.float()
        b = b.float() if b is not None else None
        image, text = all_gather_with_grad(image), all_gather_with_grad(text)  # (W*B, D): the global batch
        if self.max_logit_scale is not None:
            t = t.clamp(max=math.log(self.max_logit_scale))
        metrics_extra = {}
        if neg is not None:
            valid = all_gather(torch.tensor([n is not None for n in negatives], dtype=torch.uint8, device=device))
            valid = valid.bool()  # (W*B,); gathered as bytes, which every backend can send
            neg = all_gather_with_grad(neg.float())  # (W*B, D)
            loss = clip_loss(image, text, t, negatives=neg, negative_mask=valid)
            with torch.no_grad():
                i, tx, ng = (F.normalize(v.detach(), dim=-1) for v in (image, text, neg))
                wins = ((i * tx).sum(-1) > (i * ng).sum(-1))[valid]
                metrics_extra["acc_hard"] = wins.float().mean().item() if len(wins) else float("nan")
        elif self.loss_kind == "softmax":
            loss = clip_loss(image, text, t)
        else:
            loss = siglip_loss(image, text, t, b)
        keys = all_gather(caption_keys(batch["caption"]).to(device))
        i2t, t2i = retrieval_accuracy(image, text, keys)
        metrics = {"loss": loss.item(), "logit_scale": t.exp().item(), "acc_i2t": i2t, "acc_t2i": t2i}
        metrics |= metrics_extra
        if b is not None:
            metrics["logit_bias"] = b.item()
        return loss, metrics

    # -- evaluation ------------------------------------------------------------------------------------------

    def _pipeline(self, model: nn.Module) -> CLIPPipeline:
        clip = _bare(model).clip if not isinstance(model, CLIP) else model
        device = next(clip.parameters()).device
        return CLIPPipeline(clip, self.tokenizer, device=device)

    def _labels(self, batch: dict) -> dict[str, list[str]]:
        if self.eval_labels is not None:
            return {a: list(v) for a, v in self.eval_labels.items()}
        found: dict[str, set[str]] = {}
        for attrs in batch.get("attributes") or []:
            for a in EVAL_ATTRIBUTES:
                found.setdefault(a, set()).update(_values(attrs, a))
        return {a: sorted(v) for a, v in found.items() if len(v) >= 2}

    def _templates(self, attribute: str, labels: dict[str, list[str]]) -> list[str]:
        if self.eval_templates is not None and attribute in self.eval_templates:
            return list(self.eval_templates[attribute])
        if attribute == "color" and "shape" in labels:
            return [f"a {{}} {s}" for s in labels["shape"]]
        if attribute == "shape" and "color" in labels:
            return [f"a {c} {{}}" for c in labels["color"]]
        return ["a {} object"] if attribute == "color" else ["a {}"]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, float]:
        """On one batch: in-batch retrieval accuracy and, where "attributes" give a single value of an
        attribute per image, zero-shot accuracy over `eval_labels` (with its chance level, 1 / #labels)."""
        clip = _bare(model).clip if not isinstance(model, CLIP) else model
        was_training = clip.training
        try:
            pipe = self._pipeline(clip)
            image = pipe.encode_images(self.pixels(batch["image"]))  # (N, D), unit rows
            text = pipe.encode_texts(list(batch["caption"]))
            i2t, t2i = retrieval_accuracy(image, text, caption_keys(batch["caption"]))
            out = {"acc_i2t": i2t, "acc_t2i": t2i}
            labels = self._labels(batch)
            for attribute, names in labels.items():
                truth = [_single(_values(a, attribute)) for a in batch.get("attributes") or []]
                keep = [i for i, v in enumerate(truth) if v in names]
                if not keep:
                    continue
                classes = class_embeddings(pipe, names, self._templates(attribute, labels))  # (L, D)
                pred = (image[keep] @ classes.t()).argmax(dim=1).tolist()
                right = [names[p] == truth[i] for p, i in zip(pred, keep)]
                out[f"zeroshot_{attribute}"] = sum(right) / len(right)
                out[f"zeroshot_{attribute}_chance"] = 1 / len(names)
                out[f"zeroshot_{attribute}_n"] = len(right)
            return out
        finally:
            clip.train(was_training)

    # -- preview and export ----------------------------------------------------------------------------------

    @torch.no_grad()
    def preview(self, model: nn.Module, step: int, folder, max_items: int = 16) -> list[Path]:
        """`clip_{step}.png`, the image-caption probability matrix of (up to `max_items` of) the preview batch
        (rows images, columns captions; softmax over a row for CLIP, sigmoid for SigLIP), and
        `clip_{step}.json` with `evaluate`'s numbers on the whole preview batch. [] without a preview batch."""
        batch = self.preview_batch
        if batch is None:
            return []
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        clip = _bare(model).clip if not isinstance(model, CLIP) else model
        was_training = clip.training
        try:
            pipe = self._pipeline(clip)
            images = batch["image"][:max_items]
            captions = list(batch["caption"])[:max_items]
            logits = pipe._logits(pipe.encode_images(self.pixels(images)), pipe.encode_texts(captions))
            probs = torch.sigmoid(logits) if pipe.is_siglip else logits.softmax(dim=1)
        finally:
            clip.train(was_training)
        png = folder / f"clip_{step:07d}.png"
        similarity_image(probs.cpu(), images, captions).save(png)
        metrics = {"step": step, **self.evaluate(model, batch)}
        js = folder / f"clip_{step:07d}.json"
        js.write_text(json.dumps(metrics, indent=2))
        return [png, js]

    def export(self, model: nn.Module, folder) -> list[Path]:
        """`clip.safetensors` (the joint model), `text_encoder.safetensors` (the text tower alone, as a
        `CLIPTextModel` with its projection, what a latent diffusion bundle conditions on) and `tokenizer/`.

        The logit scale is first clamped in place to `max_logit_scale`, the value the loss has been using
        (OpenAI clamp the parameter itself after every step)."""
        folder = Path(folder)
        clip = _bare(model).clip
        if self.max_logit_scale is not None:
            with torch.no_grad():
                clip.logit_scale.clamp_(max=math.log(self.max_logit_scale))
        paths = [save_model(clip, folder / "clip.safetensors")]
        state = {k: v for k, v in clip.state_dict().items()
                 if k.startswith("text_model.") or k == "text_projection.weight"}
        text = load_weights(build_on_meta("clip_text", self.clip_config.text), state, "CLIPTask.export")
        paths.append(save_model(text, folder / "text_encoder.safetensors"))
        self.tokenizer.save(folder / "tokenizer")
        paths.append(folder / "tokenizer")
        return paths


def with_articles(text: str) -> str:
    """"a orange circle" -> "an orange circle": the article before a vowel, as the shapes captions write it."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an") and words[i + 1]:
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def class_embeddings(pipe: CLIPPipeline, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """`CLIPPipeline.class_embeddings` (normalised mean of the normalised prompt embeddings, Radford et al.
    2021, sec. 3.1.4) with the article of each filled-in prompt made to agree with the label."""
    K = len(templates)
    prompts = [with_articles(t.replace("{}", label)) for label in labels for t in templates]  # label-major
    embeds = pipe.encode_texts(prompts).view(len(labels), K, -1)  # (L * K, D) -> (L, K, D)
    return F.normalize(embeds.mean(dim=1), dim=-1)  # (L, D)


def _values(attrs: dict, attribute: str) -> set[str]:
    """The values of `attribute` in one example's attributes: a flat {"color": "red"} or the shapes
    dataset's {"objects": [{"color": ..., "shape": ...}, ...]}."""
    if attribute in attrs:
        return {str(attrs[attribute])}
    return {str(o[attribute]) for o in attrs.get("objects", []) if attribute in o}


def _single(values: set[str]) -> str | None:
    """The value when an image has exactly one (e.g. all its objects are red), else None (not scored)."""
    return next(iter(values)) if len(values) == 1 else None


# ---------------------------------------------------------------------------------------------------------
# Similarity heat map

# A few points of matplotlib's viridis, linearly interpolated: dark purple (0) to yellow (1).
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _colour(v: float) -> tuple[int, int, int]:
    v = min(max(v, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(v), len(_VIRIDIS) - 2)
    a, b, f = _VIRIDIS[i], _VIRIDIS[i + 1], v - i
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b))


def similarity_image(
    probs: torch.Tensor, images: torch.Tensor, captions: Sequence[str], cell: int = 32
) -> Image.Image:
    """A heat map of probs (N, M) in [0, 1]: image thumbnails down the left, caption numbers across the top,
    the captions listed below by number; each cell shows its value in percent."""
    N, M = probs.shape
    font = ImageFont.load_default()
    left, top, line = cell + 6, 16, 12
    width = max(left + M * cell + 4, 360)
    height = top + N * cell + 8 + line * len(captions) + 4
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, thumb in enumerate(tensor_to_images(images.float().cpu())):
        img.paste(thumb.resize((cell - 2, cell - 2), Image.Resampling.BICUBIC), (2, top + i * cell + 1))
    for j in range(M):
        draw.text((left + j * cell + cell // 3, 2), str(j), fill="black", font=font)
    for i in range(N):
        for j in range(M):
            v = float(probs[i, j])
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_colour(v))
            draw.text((x0 + 3, y0 + cell // 3), f"{100 * v:.0f}", fill="white" if v < 0.6 else "black", font=font)
    y = top + N * cell + 8
    for j, c in enumerate(captions):
        draw.text((4, y + j * line), f"{j}: {c}"[:100], fill="black", font=font)
    return img
