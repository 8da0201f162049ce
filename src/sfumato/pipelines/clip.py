"""CLIP as a classifier: image and text embeddings, similarity logits and zero-shot classification.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", sec. 3.1.2
(zero-shot transfer: the class names, written into a prompt, are the classifier's weights) and sec. 3.1.4
(prompt engineering and ensembling). SigLIP (Zhai et al. 2023) models, i.e. a `CLIP` with a
``logit_bias``, score each image-text pair on its own with a sigmoid instead of a softmax over labels.

Images are prepared as OpenAI's ``clip.load`` transform and transformers' ``CLIPImageProcessor`` do it:
RGB, bicubic resize of the shorter side to the model's ``image_size``, centre crop to a square, scale to
[0, 1], normalise with the mean / std of OpenAI's training set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sfumato.checkpoints.single_file import load_any
from sfumato.models.clip import CLIP
from sfumato.pipelines.images import load_image
from sfumato.text.tokenizer import CLIPTokenizer

# Per-channel RGB statistics of OpenAI's CLIP training images (clip/clip.py `_transform`; transformers'
# OPENAI_CLIP_MEAN / OPENAI_CLIP_STD). OpenCLIP's LAION models were trained with the same values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_TEMPLATES = ("a photo of a {}.",)  # the single prompt of Radford et al. 2021, sec. 3.1.4
# The 7 of its 80 ImageNet templates that OpenAI's "Prompt Engineering for ImageNet" notebook picked by
# sequential forward selection, as a cheaper ensemble than all 80.
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

ImageInput = Image.Image | str | os.PathLike


# ---------------------------------------------------------------------------------------------------------
# Images


def _check_image(image) -> None:
    if not isinstance(image, (Image.Image, str, os.PathLike)):
        raise TypeError(
            f"an image must be a PIL.Image.Image or a path, got {type(image).__name__}; for an array use "
            "PIL.Image.fromarray(array) (uint8, (H, W, 3))"
        )


def clip_pixels(images: torch.Tensor, image_size: int, *, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] (what the pipelines decode, what training batches hold) -> normalised
    pixel values (B, 3, image_size, image_size): shorter side resized to image_size (bicubic, antialiased),
    centre crop, ``(x - mean) / std``. The tensor counterpart of `preprocess` (up to PIL's resampling filter)."""
    S = image_size
    x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
    H, W = x.shape[-2:]
    if (H, W) != (S, S):
        h, w = (S, int(S * W / H)) if H <= W else (int(S * H / W), S)
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (h - S) // 2, (w - S) // 2
        x = x[..., top : top + S, left : left + S].clamp(0, 1)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def preprocess(
    images: ImageInput | Sequence[ImageInput],
    image_size: int,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """PIL images or paths -> normalised pixel values (N, 3, image_size, image_size), float32.

    1. RGB and upright (`sfumato.pipelines.images.load_image`: EXIF orientation applied, transparency
       composited onto white as transformers' ``convert_to_rgb`` does, 16-bit images scaled);
    2. resize so that the shorter side is ``image_size``, the longer ``int(image_size * long / short)``
       (truncated, as torchvision's ``Resize`` and transformers), with PIL's bicubic filter;
    3. centre crop at offset ``(side - image_size) // 2`` (transformers' rule; torchvision's
       ``int(round(margin / 2))`` rounds half to even, so for margins 3, 7, 11, ... OpenAI's window sits
       one pixel further right / down);
    4. ``(x / 255 - mean) / std`` per channel.
    """
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        raise TypeError(
            f"images must be a PIL image, a path, or a non-empty list of them, got {_describe(images)}"
            + (
                "; for an array use PIL.Image.fromarray(array) (uint8, (H, W, 3))"
                if hasattr(images, "shape")
                else ""
            )
        )
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for image in images:
        _check_image(image)
        rgb = load_image(image)
        w, h = rgb.size
        short, long = min(w, h), max(w, h)
        new_long = int(image_size * long / short)
        size = (image_size, new_long) if w <= h else (new_long, image_size)  # PIL sizes are (W, H)
        rgb = rgb.resize(size, resample=Image.Resampling.BICUBIC)
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        rgb = rgb.crop((left, top, left + image_size, top + image_size))
        x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # (H, W, 3) uint8
        x = x.permute(2, 0, 1).to(torch.float64).div(255).float()  # (H, W, 3) -> (3, H, W), in [0, 1]
        out.append((x - mean_t) / std_t)
    return torch.stack(out)  # (N, 3, S, S)


def _describe(x) -> str:
    return f"{type(x).__name__} of shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__


# ---------------------------------------------------------------------------------------------------------
# Prompts


def _templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    if templates == "ensemble":
        return ENSEMBLE_TEMPLATES
    if isinstance(templates, str):
        templates = (templates,)
    templates = tuple(templates)
    if not templates:
        raise ValueError('templates is empty; give at least one, e.g. ("a photo of a {}.",), or "ensemble"')
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(
                f"every template needs a '{{}}' where the label goes, got {t!r}; e.g. 'a photo of a {{}}.'"
            )
    return templates


def _labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        raise TypeError(
            f"labels must be a list of class names, got the single string {labels!r}; use [{labels!r}]"
        )
    labels = list(labels)
    if not labels:
        raise ValueError("labels is empty; give the class names to choose between, e.g. ['cat', 'dog']")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"every label must be a non-empty string, got {label!r}")
    seen = set()
    for label in labels:
        if label in seen:
            raise ValueError(f"label {label!r} appears twice; labels must be distinct")
        seen.add(label)
    return labels


def fill(templates: Sequence[str], label: str) -> list[str]:
    """Every template with ``{}`` replaced by the label (``str.replace``, so other braces are harmless)."""
    return [t.replace("{}", label) for t in templates]


# ---------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Classification:
    """Zero-shot result for one image: ``probs[i]`` is the probability of ``labels[i]``.

    With a CLIP model the probabilities are a softmax over the labels (they sum to 1); with a SigLIP model
    each is an independent sigmoid "does this caption match" probability.
    """

    labels: list[str]
    probs: list[float]

    @property
    def top(self) -> str:
        """The most probable label."""
        return self.labels[max(range(len(self.probs)), key=self.probs.__getitem__)]

    def ranked(self) -> list[tuple[str, float]]:
        """(label, probability) pairs, most probable first."""
        return sorted(zip(self.labels, self.probs), key=lambda lp: -lp[1])

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.labels, self.probs))


@dataclass
class CLIPPipeline:
    """A joint CLIP (or SigLIP-head) model with its tokenizer, for embeddings, similarity and zero-shot use.

    model: a `CLIP` with both towers. tokenizer: the BPE tokenizer the text tower was trained with.
    device / dtype: where the model runs; ``dtype=None`` keeps the model's own. Embeddings and logits are
    returned in float32 on ``device`` (normalised and scaled in float32 whatever the model's dtype).
    mean / std: image normalisation (OpenAI's by default). batch_size: images / prompts per forward pass.
    """

    model: CLIP
    tokenizer: CLIPTokenizer
    device: torch.device | str = "cpu"
    dtype: torch.dtype | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    batch_size: int = 64

    def __post_init__(self):
        if not isinstance(self.model, CLIP):
            raise TypeError(
                f"CLIPPipeline needs a joint CLIP model (text and vision towers), got {type(self.model).__name__}"
            )
        text = self.model.config.text
        if self.tokenizer.vocab_size > text.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the text tower only "
                f"{text.vocab_size} token embeddings; pass the tokenizer the model was trained with"
            )
        if self.tokenizer.eos_token_id != text.eos_token_id:
            raise ValueError(
                f"the tokenizer's end-of-text id is {self.tokenizer.eos_token_id} but the text tower pools at "
                f"id {text.eos_token_id}; pass the tokenizer the model was trained with"
            )
        self.device = torch.device(self.device)
        self.dtype = self.dtype or next(self.model.parameters()).dtype
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        *,
        tokenizer: CLIPTokenizer | None = None,
        act: str = "quick_gelu",
        model: torch.nn.Module | None = None,
    ) -> CLIPPipeline:
        """Load a joint CLIP model with `load_any`: a transformers ``CLIPModel`` folder, an OpenAI / open_clip
        state dict (``act="gelu"`` for OpenCLIP LAION weights) or a native ``clip`` file.

        tokenizer: default the folder's own (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) when it
        has one, else OpenAI's vocabulary shipped with sfumato. A ``preprocessor_config.json`` in the folder
        supplies ``image_mean`` / ``image_std``. model: what `load_any(path)` already returned, if known.
        """
        p = Path(path)
        if model is None:
            model = load_any(p, act=act)
        if not isinstance(model, CLIP):
            held = type(model).__name__
            raise ValueError(
                f"{p} holds a {held}, not a joint CLIP model; classification and similarity need a CLIP with "
                "both a text and a vision tower (a transformers CLIPModel folder, an OpenAI / open_clip CLIP "
                "state dict, or a native 'clip' file)"
                + ("; a text-to-image bundle's text encoder has no vision tower" if held == "Bundle" else "")
            )
        if tokenizer is None:
            has_files = p.is_dir() and (
                (p / "tokenizer.json").is_file()
                or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())
            )
            tokenizer = CLIPTokenizer.from_pretrained(p) if has_files else CLIPTokenizer.default()
        mean, std = CLIP_MEAN, CLIP_STD
        if p.is_dir() and (p / "preprocessor_config.json").is_file():
            pre = json.loads((p / "preprocessor_config.json").read_text(encoding="utf-8"))
            mean = tuple(pre.get("image_mean", mean))
            std = tuple(pre.get("image_std", std))
        return cls(model, tokenizer, device=device, dtype=dtype, mean=mean, std=std)

    # -- embeddings ----------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    @property
    def is_siglip(self) -> bool:
        """Whether the model has SigLIP's logit bias (sigmoid probabilities) rather than CLIP's softmax."""
        return self.model.logit_bias is not None

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> pixel values (N, 3, S, S) as this model expects them (see the module `preprocess`)."""
        return preprocess(images, self.image_size, mean=self.mean, std=self.std)

    @torch.inference_mode()
    def encode_images(self, images: ImageInput | Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Images -> L2-normalised image embeddings (N, D), float32.

        images: a PIL image, a path, a list of them, or a tensor (N, 3, S, S) of pixel values already made by
        `preprocess` (what transformers calls ``pixel_values``).
        """
        if isinstance(images, torch.Tensor):
            S = self.image_size
            if images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
                raise ValueError(
                    f"a tensor of images must be preprocessed pixel values of shape (N, 3, {S}, {S}), got "
                    f"{tuple(images.shape)}; pass PIL images or paths to have them resized and normalised"
                )
            pixels = images
        else:
            pixels = self.preprocess(images)
        embeds = [
            self.model.encode_image(chunk.to(self.device, self.dtype)).float()
            for chunk in pixels.split(self.batch_size)
        ]
        return F.normalize(torch.cat(embeds), dim=-1)  # (N, D)

    @torch.inference_mode()
    def encode_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalised text embeddings (M, D), float32. Longer texts are cut to the context length."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a string or a non-empty list of strings, got {texts!r:.80}")
        T = min(self.tokenizer.context_length, self.model.config.text.context_length)
        ids = self.tokenizer(texts, context_length=T)  # (M, T)
        embeds = [
            self.model.encode_text(chunk.to(self.device)).float() for chunk in ids.split(self.batch_size)
        ]
        return F.normalize(torch.cat(embeds), dim=-1)  # (M, D)

    def _logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cosine (+ logit_bias): (N, D), (M, D) unit vectors -> (N, M)."""
        logits = self.model.logit_scale.float().exp() * image_embeds @ text_embeds.t()
        if self.model.logit_bias is not None:
            logits = logits + self.model.logit_bias.float()
        return logits

    @torch.inference_mode()
    def similarity(
        self, images: ImageInput | Sequence[ImageInput] | torch.Tensor, texts: str | Sequence[str]
    ) -> torch.Tensor:
        """Image-text logits (N, M) as CLIP defines them: ``exp(logit_scale) * cos(image_i, text_j)``.

        For a SigLIP model ``logit_bias`` is added, so ``sigmoid(logits)`` is the match probability. This is
        transformers' ``logits_per_image`` (our `CLIP.forward`'s first output). The learnt scale is used as
        is (100 for OpenAI's released models, whose training clamps it there).
        """
        return self._logits(self.encode_images(images), self.encode_texts(texts))

    # -- zero-shot classification ------------------------------------------------------------------------

    @torch.inference_mode()
    def class_embeddings(
        self, labels: Sequence[str], templates: str | Sequence[str] = DEFAULT_TEMPLATES
    ) -> torch.Tensor:
        """The zero-shot classifier's weights (L, D): one unit vector per label.

        Each label is written into every template; the prompts' embeddings are normalised, averaged and
        normalised again (Radford et al. 2021, sec. 3.1.4: the ensemble lives in embedding space, so it
        costs one vector per class and can be cached). OpenAI's notebook builds its ImageNet classifier so.
        """
        labels, templates = _labels(labels), _templates(templates)
        K = len(templates)
        prompts = [p for label in labels for p in fill(templates, label)]  # label-major, L * K prompts
        embeds = self.encode_texts(prompts).view(len(labels), K, -1)  # (L * K, D) -> (L, K, D)
        return F.normalize(embeds.mean(dim=1), dim=-1)  # (L, D)

    @torch.inference_mode()
    def classify(
        self,
        images: ImageInput | Sequence[ImageInput] | torch.Tensor,
        labels: Sequence[str],
        templates: str | Sequence[str] = DEFAULT_TEMPLATES,
        *,
        ensemble: bool = True,
    ) -> list[Classification]:
        """Zero-shot classification (Radford et al. 2021, sec. 3.1.2): one `Classification` per image.

        templates: prompts with ``{}`` for the label; ``"ensemble"`` selects `ENSEMBLE_TEMPLATES`.
        ensemble=True: average the templates in embedding space (`class_embeddings`), then
        ``logits = exp(logit_scale) * cos(image, class)`` (+ bias) and one softmax over the labels (CLIP) or a
        sigmoid per label (SigLIP). ensemble=False: score each template on its own and average the
        probabilities (the probability-space ensemble the paper compares against). With one template the
        two agree.
        """
        labels, templates = _labels(labels), _templates(templates)
        image_embeds = self.encode_images(images)  # (N, D)
        to_probs = torch.sigmoid if self.is_siglip else (lambda x: x.softmax(dim=-1))
        if ensemble:
            probs = to_probs(self._logits(image_embeds, self.class_embeddings(labels, templates)))  # (N, L)
        else:
            K = len(templates)
            prompts = [t.replace("{}", label) for t in templates for label in labels]  # template-major
            text_embeds = self.encode_texts(prompts)  # (K * L, D)
            logits = self._logits(image_embeds, text_embeds)  # (N, K * L)
            logits = logits.view(-1, K, len(labels))  # (N, K * L) -> (N, K, L)
            probs = to_probs(logits).mean(dim=1)  # (N, L)
        return [Classification(labels=list(labels), probs=row.tolist()) for row in probs.cpu()]
