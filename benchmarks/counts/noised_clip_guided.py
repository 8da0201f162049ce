"""Guidance by a CLIP trained on noised latents (as GLIDE's noised CLIP) on the eval's count prompts and seeds.

    python benchmarks/counts/noised_clip_guided.py train OUT [STEPS]        # default 1,000 steps; ~8 min on 2 cores
    python benchmarks/counts/noised_clip_guided.py guide OUT SCALE [SIGMA_MAX] [--edits]

train: a vision tower (ViT 4 x 128, patch 2, 4 channels) on x_t = sqrt(abar) z + sqrt(1 - abar) eps, z the shipped
VAE's scaled latent of a training image (the expert stage's data: 30,000 shapes, every place and relation stated;
latents cached in OUT/cache), t uniform; a text tower started from the shipped CLIP's; softmax loss with NegCLIP
hard negatives. Half of each batch has a count caption, whose negative is one of its count edits ("a X",
"three X", "four X") 70 % of the time.
guide: D'(x) = D(x) + SCALE sigma^2 grad_x score(x / sqrt(1 + sigma^2)) for sigma <= SIGMA_MAX (default 50), score the
prompt's logit, or with --edits its log softmax among itself and its count edits; the shipped model at the eval's
settings (guidance 3, 20 DPM-Solver++(2M) steps, Karras sigmas), scored by the eval's checker. SCALE 0 is the
plain model (50 of 72 seen, 8 of 12 held out).
"""

import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from clip_rerank import count_edits  # noqa: E402

import sfumato  # noqa: E402
from sfumato.checkpoints.bundle import load_bundle  # noqa: E402
from sfumato.checkpoints.native import load_model  # noqa: E402
from sfumato.eval.checker import check  # noqa: E402
from sfumato.eval.shapes import prompt_set  # noqa: E402
from sfumato.models.clip import CLIP, CLIPVisionConfig  # noqa: E402
from sfumato.pipelines import stable_diffusion as sd  # noqa: E402
from sfumato.pipelines.steps import discrete_schedule  # noqa: E402
from sfumato.text.tokenizer import CLIPTokenizer  # noqa: E402
from sfumato.training.clip import hard_negative  # noqa: E402
from sfumato.training.losses import clip_loss  # noqa: E402

SHIPPED = "src/sfumato/assets/shapes"


def train_count_edits(c: str) -> list[str]:
    """count_edits in the order the recorded run drew from: "three", "four", then "a"."""
    edits = count_edits(c)
    return edits[1:] + edits[:1] if len(edits) == 3 else edits


def build() -> tuple[CLIP, CLIPTokenizer]:
    tok = CLIPTokenizer.from_pretrained(f"{SHIPPED}/tokenizer")
    shipped = load_model(f"{SHIPPED}/clip.safetensors", dtype=torch.float32)
    vision = CLIPVisionConfig(image_size=16, patch_size=2, channels=4, width=128, layers=4, heads=4, mlp_width=512,
                              projection_dim=shipped.config.vision.projection_dim)
    model = CLIP(replace(shipped.config, vision=vision))
    sd_ = {k: v for k, v in shipped.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    sd_["logit_scale"] = shipped.state_dict()["logit_scale"]
    missing, unexpected = model.load_state_dict(sd_, strict=False)
    assert not unexpected and all(k.startswith(("vision_model.", "visual_projection.")) for k in missing)
    return model, tok


def train(out: Path, steps: int = 1000) -> None:
    from sfumato.data.cache import build_latent_cache
    from sfumato.training.recipes import dataset_for, recipe

    out.mkdir(parents=True, exist_ok=True)
    model, tok = build()
    shipped = load_bundle(SHIPPED, dtype=torch.float32)
    ds = dataset_for("shapes", 32, 30_000, **recipe("expert", "shapes").shapes_options)
    text_encoder = load_model(f"{SHIPPED}/text_encoder.safetensors", dtype=torch.float32)
    cache = build_latent_cache(ds, shipped.vae, text_encoder, tok, out / "cache")
    abar = discrete_schedule(shipped.schedule).alphas_cumprod.float()
    n_train = len(cache) - 1000
    # captions per index without reading tensors: the shards' metadata
    caps = []
    k = 0
    while len(caps) < len(cache):
        caps += cache._shard(k)[1]
        k += 1
    counted = [i for i in range(n_train) if caps[i].startswith("two ") or " two " in caps[i]]
    print(f"{len(counted)} of {n_train} training captions count objects", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    B = 64
    t0 = time.time()
    for step in range(1, steps + 1):
        lr = 5e-4 * min(1, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        half = torch.randint(0, len(counted), (B // 2,), generator=g).tolist()
        idx = [counted[i] for i in half] + torch.randint(0, n_train, (B - B // 2,), generator=g).tolist()
        b = cache.get(idx)
        z = shipped.vae.to_diffusion(b.mean + b.std * torch.randn(b.mean.shape, generator=g))
        t = torch.randint(0, 999, (B,), generator=g)
        a = abar[t].view(B, 1, 1, 1)
        x = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=g)
        captions = b.captions
        rngs = [random.Random(f"{step}/{c}") for c in captions]  # count captions: "a X", "three X", "four X" too
        negs = [r.choice(train_count_edits(c)) if c.startswith("two ") and r.random() < 0.7 else hard_negative(c, r)
                for c, r in zip(captions, rngs)]
        ids = tok(captions + [n or "" for n in negs], context_length=32, padding="longest")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image = model.encode_image(x, normalize=True)
            text = model.encode_text(ids, normalize=True)
        image, text = image.float(), text.float()
        valid = torch.tensor([n is not None for n in negs])
        scale = model.logit_scale.clamp(max=math.log(100))
        loss = clip_loss(image, text[:B], scale, negatives=text[B:], negative_mask=valid)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                hard = ((image * text[:B]).sum(-1) > (image * text[B:]).sum(-1))[valid].float().mean()
            print(f"step {step} loss {loss.item():.4f} acc_hard {hard:.3f} {step * B / (time.time() - t0):.0f} img/s",
                  flush=True)
    torch.save(model.state_dict(), out / "noised_clip.pt")
    # held-out check: the last 1,000 cached items with a count caption, prompt against its count edits, by t
    model.eval()
    held = [i for i in range(n_train, len(cache)) if caps[i].startswith("two ")]
    b = cache.get(held)
    z = shipped.vae.to_diffusion(b.mean)
    with torch.no_grad():
        for tt in (0, 200, 400, 550, 700, 850, 950):
            a = abar[tt]
            x = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=g)
            img = model.encode_image(x, normalize=True)
            right = 0
            for j, c in enumerate(b.captions):
                txt = model.encode_text(tok([c, *train_count_edits(c)], context_length=32), normalize=True)
                right += int((txt @ img[j]).argmax() == 0)
            print(f"held out t={tt}: prompt beats its count edits in {right} of {len(held)}", flush=True)


def guide(out: Path, scale: float, sigma_max: float, edits: bool) -> None:
    model, tok = build()
    model.load_state_dict(torch.load(out / "noised_clip.pt", weights_only=True))
    model.eval().requires_grad_(False)
    pipe = sfumato.load(SHIPPED)
    text = {}
    plain_cfg = sd.classifier_free_guidance

    def score(x_vp: torch.Tensor) -> torch.Tensor:
        img = model.encode_image(x_vp, normalize=True)
        logits = model.logit_scale.exp().clamp(max=100) * img @ text["f"].T  # (B, 1 or 4)
        return logits.log_softmax(-1)[:, 0] if edits else logits[:, 0]

    def guided_cfg(denoiser, guidance, cond, uncond):
        cfg = plain_cfg(denoiser, guidance, cond, uncond)

        def guided(x, sigma):
            d = cfg(x, sigma)
            s = float(torch.as_tensor(sigma).flatten()[0])
            if scale == 0 or s > sigma_max:
                return d
            with torch.enable_grad():
                xg = x.detach().requires_grad_()
                grad = torch.autograd.grad(score(xg / math.sqrt(1 + s * s)).sum(), xg)[0]
            return d + scale * s * s * grad

        return guided

    sd.classifier_free_guidance = guided_cfg
    right = {False: [0, 0], True: [0, 0]}
    for k, p in enumerate(prompt_set()):
        if p["category"] != "count":
            continue
        texts = [p["text"], *count_edits(p["text"])] if edits else [p["text"]]
        text["f"] = model.encode_text(tok(texts, context_length=32), normalize=True)
        with torch.no_grad():
            images = pipe.generate(p["text"], batch=4, seed=[k * 4 + j for j in range(4)], steps=20, guidance=3.0,
                                   progress=False)
        for im in images:
            r = check(im, p)["scores"]["count"]
            right[bool(p["heldout"])][0] += bool(r)
            right[bool(p["heldout"])][1] += 1
    print(f"scale {scale} sigma_max {sigma_max} edits {edits}: count right seen {right[False]}, held out "
          f"{right[True]}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1000)
    else:
        guide(Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 50.0,
              "--edits" in sys.argv)
