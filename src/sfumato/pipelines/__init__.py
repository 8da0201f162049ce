"""Inference pipelines over loaded models: `sfumato.load(path)` returns the one a file calls for."""

from __future__ import annotations

from pathlib import Path

import torch

# The model sfumato ships (`sfumato train pipeline --preset shapes`, see README "The shipped model"): a
# bundle folder inside the package, plus the full CLIP (both towers) it was trained with for classification.
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes"
SHIPPED_CLIP = SHIPPED_MODEL / "clip.safetensors"


def default_model(task: str = "text-to-image") -> Path:
    """The shipped model's path for `task` ("text-to-image" or "classification"), or an error saying what to pass."""
    if task not in ("text-to-image", "classification"):
        raise ValueError(f"unknown task {task!r}; choose 'text-to-image' or 'classification'")
    path = SHIPPED_CLIP if task == "classification" else SHIPPED_MODEL
    if path.exists():
        return path
    what = "a sfumato bundle, a diffusers folder or an SD .safetensors file"
    if task == "classification":
        what = "a CLIP model: a transformers folder, an OpenAI / open_clip state dict or a native file"
    raise FileNotFoundError(
        f"the shipped {task} model is missing from this installation ({path}); reinstall sfumato, or pass "
        f"--model PATH ({what})"
    )


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction: str | None = None,
):
    """Load a model and wrap it in its pipeline.

    - a sfumato bundle, a diffusers Stable Diffusion folder or an SD 1.x/2.x single file
      (`.safetensors`; `.ckpt` through `torch.load(weights_only=True)`) -> `StableDiffusion`;
    - a transformers CLIP folder, an OpenAI / open_clip CLIP state dict or a native CLIP file -> `CLIPPipeline`.

    prediction: "eps" or "v" for single files, which do not say (SD 2.x 768 px models are "v").
    """
    from sfumato.checkpoints.bundle import Bundle
    from sfumato.checkpoints.single_file import load_any
    from sfumato.models.clip import CLIP
    from sfumato.pipelines.stable_diffusion import StableDiffusion

    loaded = load_any(path, prediction=prediction)
    if isinstance(loaded, Bundle):
        return StableDiffusion(loaded, device=device, dtype=dtype, source=path)
    if isinstance(loaded, CLIP):
        from sfumato.pipelines.clip import CLIPPipeline

        return CLIPPipeline.from_pretrained(path, device, dtype, model=loaded)
    raise ValueError(
        f"{path} holds a {type(loaded).__name__}, which no pipeline runs alone; text-to-image needs a bundle, "
        "a diffusers folder or an SD checkpoint, classification a CLIP model with both towers"
    )
