"""CLIP zero-shot classification and similarity against transformers (same random weights).

The reference path is transformers' own: its image processor makes the pixels, its tokenizer (read from
our vocabulary files) makes the ids, and its CLIPModel (eager attention) the features and logits. The
template ensemble is rebuilt by hand from ``get_text_features`` as OpenAI's notebook builds it.
"""

import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from sfumato.checkpoints.native import save_model
from sfumato.models.clip import CLIP, PRESETS
from sfumato.pipelines.clip import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_TEMPLATES,
    ENSEMBLE_TEMPLATES,
    Classification,
    CLIPPipeline,
    preprocess,
)
from sfumato.text.tokenizer import CLIPTokenizer, train_bpe

LOGIT_TOL = 1e-4  # float32 through two 2-layer towers, SDPA vs eager attention
PROB_TOL = 1e-5
LABELS = ["cat", "dog", "tree frog", "sports car"]
TEXTS = ["a photo of a cat", "a diagram", "two dogs playing in the snow"]


def _randomise(model, seed=0):
    """Every parameter random and O(1), LayerNorm gains around 1; exp(logit_scale) = 100 as in OpenAI's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif name == "logit_scale":
                p.fill_(math.log(100))
            elif name == "logit_bias":
                p.fill_(0.5)
            elif p.ndim >= 2:
                p.copy_(0.6 * noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def _images():
    """Random-content images of odd sizes and modes, both orientations, alpha included."""
    rng = np.random.default_rng(0)
    out = []
    for w, h, mode in [(37, 53, "RGB"), (101, 45, "RGBA"), (32, 32, "L"), (33, 200, "RGB"), (71, 64, "P")]:
        arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        img = Image.fromarray(arr, "RGBA")
        out.append(img if mode == "RGBA" else Image.fromarray(arr[..., :3]).convert(mode))
    return out


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tok):
    """A tiny transformers CLIPModel over the full OpenAI vocabulary, saved with our tokenizer files."""
    folder = tmp_path_factory.mktemp("hf_clip")
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
        attn_implementation="eager",
    )  # fmt: skip
    model = _randomise(transformers.CLIPModel(cfg))
    model.save_pretrained(folder)
    tok.save(folder)
    hf_tok = transformers.CLIPTokenizer.from_pretrained(folder)
    proc = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return folder, model, hf_tok, proc


@pytest.fixture(scope="module")
def pipe(hf):
    return CLIPPipeline.from_pretrained(hf[0])


def _ref_features(model, hf_tok, texts, pixels):
    ids = hf_tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        t = model.get_text_features(input_ids=ids).pooler_output
        i = model.get_image_features(pixel_values=pixels).pooler_output
    return i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("size", [32, 224])
def test_preprocess_matches_clip_image_processor(size):
    proc = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    images = _images()
    ref = proc(images=images, return_tensors="pt").pixel_values
    ours = preprocess(images, size)
    assert ours.shape == ref.shape == (len(images), 3, size, size) and ours.dtype == torch.float32
    # Same PIL bicubic resize, same floor-offset crop, same float64 rescale: measured 0.0 (bit-identical).
    assert (ours - ref).abs().max().item() <= 1e-6
    assert tuple(proc.image_mean) == CLIP_MEAN and tuple(proc.image_std) == CLIP_STD


def test_preprocess_paths_exif_and_alpha(tmp_path):
    img = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3))  # 6 wide, 4 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    img.save(tmp_path / "turned.png", exif=exif)
    upright = img.transpose(Image.Transpose.ROTATE_270)  # 4 wide, 6 high
    assert torch.equal(preprocess(tmp_path / "turned.png", 4), preprocess(upright, 4))
    assert torch.equal(preprocess([str(tmp_path / "turned.png")], 4), preprocess(upright, 4))
    assert not torch.equal(preprocess(img, 4), preprocess(upright, 4))
    clear = Image.new("RGBA", (3, 3), (0, 0, 0, 0))  # fully transparent black -> white
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(preprocess(clear, 3)[0], white.view(3, 1, 1).expand(3, 3, 3))


# ---------------------------------------------------------------------------------------------------------
# parity with transformers


def test_similarity_matches_transformers(hf, pipe, tok):
    _, model, hf_tok, proc = hf
    images = _images()
    pixels = proc(images=images, return_tensors="pt").pixel_values
    ids = hf_tok(TEXTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, tok(TEXTS))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits_per_image  # (N, M)
    same_pixels = pipe.similarity(pixels, TEXTS)
    end_to_end = pipe.similarity(images, TEXTS)  # through our preprocessing
    assert same_pixels.shape == ref.shape == (len(images), len(TEXTS))
    assert (same_pixels - ref).abs().max().item() <= LOGIT_TOL
    assert (end_to_end - ref).abs().max().item() <= LOGIT_TOL
    assert ref.max() - ref.min() > 5  # logits spread enough that a wrong scale or swapped axis shows
    img, txt = pipe.encode_images(images), pipe.encode_texts(TEXTS)
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(images))) and txt.shape == (len(TEXTS), 16)


def test_classify_matches_hand_built_ensemble(hf, pipe):
    _, model, hf_tok, proc = hf
    images = _images()
    pixels = proc(images=images, return_tensors="pt").pixel_values
    scale = model.logit_scale.exp().item()
    # OpenAI's zeroshot_classifier: per class, normalise each prompt embedding, mean, normalise again.
    weights = []
    for label in LABELS:
        _, t = _ref_features(model, hf_tok, [tmpl.format(label) for tmpl in ENSEMBLE_TEMPLATES], pixels[:1])
        w = t.mean(dim=0)
        weights.append(w / w.norm())
    image, _ = _ref_features(model, hf_tok, ["x"], pixels)
    ref_probs = (scale * image @ torch.stack(weights).T).softmax(dim=-1)  # (N, L)
    results = pipe.classify(images, LABELS, templates="ensemble")
    assert len(results) == len(images) and all(isinstance(r, Classification) for r in results)
    got = torch.tensor([r.probs for r in results])
    assert (got - ref_probs).abs().max().item() <= PROB_TOL
    assert torch.allclose(got.sum(dim=-1), torch.ones(len(images)))
    assert [r.top for r in results] == [LABELS[i] for i in ref_probs.argmax(dim=-1)]
    assert results[0].ranked()[0] == (results[0].top, max(results[0].probs))
    assert list(results[0].as_dict()) == LABELS
    assert ref_probs.max() - ref_probs.min() > 0.1  # not a uniform, uninformative comparison

    # ensemble=False: softmax per template, then the mean of the probabilities
    _, t = _ref_features(
        model, hf_tok, [tmpl.format(lb) for tmpl in ENSEMBLE_TEMPLATES for lb in LABELS], pixels
    )
    per_template = (scale * image @ t.T).view(len(images), len(ENSEMBLE_TEMPLATES), len(LABELS))
    ref_prob_mean = per_template.softmax(dim=-1).mean(dim=1)
    got = torch.tensor([r.probs for r in pipe.classify(images, LABELS, ENSEMBLE_TEMPLATES, ensemble=False)])
    assert (got - ref_prob_mean).abs().max().item() <= PROB_TOL
    assert (ref_prob_mean - ref_probs).abs().max() > 1e-3  # the two ensembles really differ

    # one template: the paper's default prompt; a single image gives a list of one
    one = pipe.classify(images[0], LABELS)
    _, t = _ref_features(model, hf_tok, [DEFAULT_TEMPLATES[0].format(lb) for lb in LABELS], pixels)
    ref_one = (scale * image[:1] @ t.T).softmax(dim=-1)[0]
    assert len(one) == 1 and (torch.tensor(one[0].probs) - ref_one).abs().max().item() <= PROB_TOL
    assert pipe.classify(images[0], LABELS, "a photo of a {}.")[0].probs == one[0].probs


# ---------------------------------------------------------------------------------------------------------
# SigLIP head: sigmoid probabilities


def test_siglip_model_gives_sigmoid_probabilities(tmp_path, tok):
    model = _randomise(CLIP(PRESETS["tiny-siglip"]), seed=3)
    save_model(model, tmp_path / "siglip.safetensors")
    pipe = CLIPPipeline.from_pretrained(tmp_path / "siglip.safetensors")
    assert pipe.is_siglip
    images = _images()
    pixels = preprocess(images, 32)
    ids = tok(LABELS)
    with torch.no_grad():
        logits = model(ids, pixels)[0]  # exp(scale) * cos + bias, (N, L)
    assert (pipe.similarity(images, LABELS) - logits).abs().max().item() <= LOGIT_TOL
    got = torch.tensor([r.probs for r in pipe.classify(images, LABELS, templates="{}")])
    assert (got - torch.sigmoid(logits)).abs().max().item() <= PROB_TOL
    assert (got.sum(dim=-1) - 1).abs().max() > 0.1  # independent per label, not a softmax


# ---------------------------------------------------------------------------------------------------------
# errors


def test_errors(pipe, hf, tmp_path):
    img = _images()[0]
    with pytest.raises(ValueError, match="labels is empty"):
        pipe.classify(img, [])
    with pytest.raises(TypeError, match="single string 'cat'"):
        pipe.classify(img, "cat")
    with pytest.raises(ValueError, match="'dog' appears twice"):
        pipe.classify(img, ["dog", "cat", "dog"])
    with pytest.raises(ValueError, match=r"needs a '\{\}'.*'a photo of a cat'"):
        pipe.classify(img, LABELS, templates=("a photo of a {}.", "a photo of a cat"))
    with pytest.raises(ValueError, match="templates is empty"):
        pipe.classify(img, LABELS, templates=())
    with pytest.raises(TypeError, match=r"got ndarray of shape \(32, 32, 3\).*fromarray"):
        pipe.classify(np.zeros((32, 32, 3), np.uint8), LABELS)
    with pytest.raises(TypeError, match="got int"):
        pipe.encode_images([img, 3])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\), got \(3, 32, 32\)"):
        pipe.encode_images(torch.zeros(3, 32, 32))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pipe.encode_images(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="texts must be"):
        pipe.encode_texts([])

    # a folder holding only a text tower
    text_only = transformers.CLIPTextModel(hf[1].config.text_config)
    text_only.save_pretrained(tmp_path / "text_only")
    with pytest.raises(ValueError, match=r"holds a CLIPTextModel, not a joint CLIP.*text and a vision tower"):
        CLIPPipeline.from_pretrained(tmp_path / "text_only")
    # a tokenizer that is not the model's
    small = train_bpe(["a photo of a cat", "a photo of a dog"] * 3, 600, min_frequency=1)
    with pytest.raises(ValueError, match=r"end-of-text id is \d+ but the text tower pools at id 49407"):
        CLIPPipeline(pipe.model, small)
    with pytest.raises(TypeError, match="got CLIPTextModel"):
        CLIPPipeline(text_only, pipe.tokenizer)


def test_dtype_and_templates_constant(hf):
    assert len(ENSEMBLE_TEMPLATES) == 7 and all(t.count("{}") == 1 for t in ENSEMBLE_TEMPLATES)
    pipe64 = CLIPPipeline.from_pretrained(hf[0], dtype=torch.float64)
    assert pipe64.model.logit_scale.dtype == torch.float64
    out = pipe64.similarity(_images()[:2], TEXTS)
    assert out.dtype == torch.float32 and math.isfinite(out.sum().item())
