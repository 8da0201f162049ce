"""CLIP guidance (the shipped CLIP, trained with count hard negatives) on the eval's count prompts and seeds.

    python benchmarks/counts/clip_guided.py MODE SCALE [--uniform] [--all]

The guided denoiser is D'(x) = D(x) + SCALE * w(σ) * ∇ sim(CLIP(VAE.decode(x0)), text), with the gradient
  MODE x0: with respect to x0 = D(x) itself (no backprop through the U-Nets), w = 1;
  MODE x:  with respect to x, through the U-Nets (k-diffusion's cond_fn), w = σ², and only where σ <= 50.
Guidance 3, 20 DPM-Solver++(2M) steps (Karras σ unless --uniform); --all: every prompt, not only counts.
Scored by the eval's checker; SCALE 0 is the plain model (the eval's own count figures).
"""

import sys

import torch
import torch.nn.functional as F

import sfumato
from sfumato.eval.checker import check
from sfumato.eval.shapes import prompt_set
from sfumato.pipelines import stable_diffusion as sd
from sfumato.pipelines.clip import CLIPPipeline
from sfumato.text.tokenizer import CLIPTokenizer

SIGMA_MAX = 50.0


def main() -> None:
    mode, scale = sys.argv[1], float(sys.argv[2])
    karras = "--uniform" not in sys.argv
    torch.set_num_threads(2)
    shipped = "src/sfumato/assets/shapes"
    pipe = sfumato.load(shipped)
    clip = CLIPPipeline.from_pretrained(f"{shipped}/clip.safetensors",
                                        tokenizer=CLIPTokenizer.from_pretrained(f"{shipped}/tokenizer"))  # fmt: skip
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    text = {}

    def similarity(x0: torch.Tensor) -> torch.Tensor:
        image = pipe.vae.decode(pipe.vae.from_diffusion(x0))  # (B, 3, 32, 32) in [-1, 1]
        features = F.normalize(clip.model.encode_image(((image.clamp(-1, 1) + 1) / 2 - mean) / std), dim=-1)
        return (features @ text["features"].T).squeeze(-1)  # (B,)

    plain_cfg = sd.classifier_free_guidance

    def clip_guided_cfg(denoiser, guidance, cond, uncond):
        cfg = plain_cfg(denoiser, guidance, cond, uncond)

        def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            s = float(torch.as_tensor(sigma).flatten()[0])
            if scale == 0 or (mode == "x" and s > SIGMA_MAX):
                return cfg(x, sigma)
            with torch.enable_grad():
                if mode == "x0":
                    x0 = cfg(x, sigma).detach().requires_grad_()
                    return x0.detach() + scale * torch.autograd.grad(similarity(x0).sum(), x0)[0]
                xg = x.detach().requires_grad_()
                x0 = cfg(xg, sigma)
                return x0.detach() + scale * s**2 * torch.autograd.grad(similarity(x0).sum(), xg)[0]

        return guided

    sd.classifier_free_guidance = clip_guided_cfg  # what StableDiffusion._denoise calls
    categories = ("single", "size", "position", "relation", "count") if "--all" in sys.argv else ("count",)
    right = {True: [0, 0], False: [0, 0]}
    passed = {True: [0, 0], False: [0, 0]}
    for k, p in enumerate(prompt_set()):
        if p["category"] not in categories:
            continue
        ids = clip.tokenizer([p["text"]], context_length=clip.model.config.text.context_length)
        text["features"] = F.normalize(clip.model.encode_text(ids), dim=-1).detach()
        with torch.no_grad():
            images = pipe.generate(p["text"], batch=4, seed=[k * 4 + j for j in range(4)], steps=20, guidance=3.0,
                                   karras=karras, progress=False)  # fmt: skip
        for image in images:
            r, held = check(image, p), bool(p["heldout"])
            if r["scores"].get("count") is not None:
                right[held][0] += bool(r["scores"]["count"])
                right[held][1] += 1
            passed[held][0] += r["pass"]
            passed[held][1] += 1
    print(f"mode {mode} scale {scale} karras {karras}: count right seen {right[False]}, held out {right[True]}; "
          f"all criteria seen {passed[False]}, held out {passed[True]}")


if __name__ == "__main__":
    main()
