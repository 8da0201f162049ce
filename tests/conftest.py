"""Shared fixtures: a tiny Stable Diffusion bundle with random weights, saved as a sfumato bundle folder."""

import os

import pytest
import torch

# pytest-xdist runs one worker per core; each worker's torch would otherwise start one thread per core too, and
# on 2 cores the 4 spinning OpenMP threads made the default run take 1,134 s instead of 51 s (a 0.5 s test
# took 68 s). Split the cores between the workers.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from sfumato.checkpoints.bundle import Bundle, ScheduleConfig, save_bundle
from sfumato.models.clip import CLIPTextConfig, CLIPTextModel
from sfumato.models.unet import UNet, UNetConfig
from sfumato.models.vae import VAE_PRESETS, AutoencoderKL
from sfumato.text.tokenizer import train_bpe

CAPTIONS = ["a photo of a cat", "a painting of a dog riding a horse", "an astronaut on the moon"] * 10


def random_weights_(model: torch.nn.Module, seed: int, scale: float = 0.6) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so that nothing zero-initialised hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim >= 2:
                p.copy_(scale * noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def tiny_bundle(in_channels: int = 4, prediction: str = "eps") -> Bundle:
    """U-Net (2 levels, context 32), VAE with f=2, 2-layer text encoder, a 600-token BPE vocabulary;
    default image size 32 px (16 x 16 latents)."""
    tok = train_bpe(CAPTIONS, 600, min_frequency=1)
    unet = UNet(
        UNetConfig(
            in_channels=in_channels,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1,),
            num_heads=2,
            context_dim=32,
        )
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tok.vocab_size, width=32, layers=2, heads=2, mlp_width=64, eos_token_id=tok.eos_token_id
        )
    )
    return Bundle(
        unet=random_weights_(unet, 0, scale=0.5),
        vae=random_weights_(AutoencoderKL(VAE_PRESETS["tiny"]), 1),
        text_encoder=random_weights_(text, 2),
        tokenizer=tok,
        schedule=ScheduleConfig(prediction=prediction, image_size=32),
    )


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory):
    """A sfumato bundle folder of `tiny_bundle()`; `sfumato.load(tiny_bundle_path)` runs in ~0.1 s a step."""
    path = tmp_path_factory.mktemp("tiny") / "bundle"
    save_bundle(tiny_bundle(), path)
    return path


@pytest.fixture(scope="session")
def tiny_inpaint_bundle_path(tmp_path_factory):
    """The same with a 9-channel inpainting U-Net."""
    path = tmp_path_factory.mktemp("tiny-inpaint") / "bundle"
    save_bundle(tiny_bundle(in_channels=9), path)
    return path
