"""Image for image with diffusers: a tiny Stable Diffusion with random weights, saved by diffusers, loaded by
sfumato, gives the same images for the same seed, steps, sampler, guidance and negative prompt.

Pixels are compared as the uint8 images both write: mean |Δ| <= 1/255 and max |Δ| <= 4/255.
"""

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, random_weights_

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image  # noqa: E402

import sfumato  # noqa: E402
from sfumato.pipelines.stable_diffusion import StableDiffusion  # noqa: E402
from sfumato.text.tokenizer import train_bpe  # noqa: E402

PROMPT, NEGATIVE = "a painting of a cat riding a horse", "a photo of a dog"
SIZE = 32  # pixels; the tiny VAE halves once, so latents are 16 x 16
MEAN_TOL, MAX_TOL = 1 / 255, 4 / 255

# (our sampler, karras) -> diffusers scheduler class and extra config
SCHEDULERS = {
    ("ddim", False): (DDIMScheduler, {}),
    ("ddpm", False): (DDPMScheduler, {}),
    ("euler", False): (EulerDiscreteScheduler, {}),
    ("euler", True): (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    ("euler_ancestral", False): (EulerAncestralDiscreteScheduler, {}),
    ("heun", False): (HeunDiscreteScheduler, {}),
    ("dpmpp_2m", False): (DPMSolverMultistepScheduler, {}),
    ("dpmpp_2m", True): (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}


def tiny_components(tmp_path, in_channels: int = 4):
    tok = train_bpe(CAPTIONS, 600, min_frequency=1)
    tok.save(tmp_path / "vocab")
    unet = UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
        sample_size=SIZE // 2,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=SIZE,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    random_weights_(unet, 0, scale=0.5)
    random_weights_(vae, 1)
    random_weights_(text, 2)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        # explicit, so that every scheduler class made from this config uses it: diffusers fills a key that is
        # absent with the reading class's default (Euler and DPM-Solver: "linspace"; DDIM: "leading")
        timestep_spacing="leading",
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp_path / "vocab"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """diffusers pipelines (text-to-image, img2img, inpainting with a 9-channel U-Net) and ours, loaded
    from the folders diffusers saved."""
    tmp = tmp_path_factory.mktemp("sd")
    ref = StableDiffusionPipeline(**tiny_components(tmp))
    ref.save_pretrained(tmp / "sd")
    ref_inpaint = StableDiffusionInpaintPipeline(**tiny_components(tmp, in_channels=9))
    ref_inpaint.save_pretrained(tmp / "sd-inpaint")
    pipes = {
        "ref": ref,
        "ref_img2img": StableDiffusionImg2ImgPipeline(**ref.components),
        "ref_inpaint_blend": StableDiffusionInpaintPipeline(**ref.components),
        "ref_inpaint": ref_inpaint,
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
        p.base_scheduler_config = dict(p.scheduler.config)
    return {
        **pipes,
        "ours": sfumato.load(tmp / "sd"),
        "ours_inpaint": sfumato.load(tmp / "sd-inpaint"),
    }


def scheduler(pipe, sampler: str, karras: bool, **config):
    """A fresh scheduler for `sampler` from the saved DDIM config (never from a previous test's scheduler,
    whose config would carry options such as use_karras_sigmas over)."""
    cls, extra = SCHEDULERS[(sampler, karras)]
    return cls.from_config({**pipe.base_scheduler_config, **extra, **config})


def compare(ours: list[Image.Image], theirs: list[Image.Image], label: str) -> tuple[float, float]:
    a = np.stack([np.asarray(im, dtype=np.float64) for im in ours]) / 255
    b = np.stack([np.asarray(im, dtype=np.float64) for im in theirs]) / 255
    assert a.shape == b.shape
    diff = np.abs(a - b)
    saturated = np.mean((b == 0) | (b == 1))
    print(f"\n{label}: mean |Δ| {diff.mean() * 255:.3f}/255, max |Δ| {diff.max() * 255:.2f}/255, "
          f"image std {b.std():.2f}, saturated {saturated:.0%}")  # fmt: skip
    assert saturated < 0.5, "the test images are mostly clipped; weaken the random weights"
    assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL
    return diff.mean(), diff.max()


def input_image(seed: int = 3) -> Image.Image:
    """A smooth colour image (a photo stand-in), reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def input_mask() -> Image.Image:
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[8:24, 4:20] = 255  # white = repaint
    return Image.fromarray(m)


@pytest.mark.parametrize(("sampler", "karras"), list(SCHEDULERS), ids=[f"{s}{'-karras' * k}" for s, k in SCHEDULERS])
def test_text_to_image(models, sampler, karras):
    ref, ours = models["ref"], models["ours"]
    ref.scheduler = scheduler(ref, sampler, karras)
    theirs = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=10,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(11),
        height=SIZE,
        width=SIZE,
    ).images
    got = ours.generate(PROMPT, NEGATIVE, steps=10, guidance=7.5, sampler=sampler, karras=karras, seed=11,
                        width=SIZE, height=SIZE)  # fmt: skip
    compare(got, theirs, f"text-to-image {sampler} karras={karras}")


@pytest.mark.parametrize(("sampler", "karras"), [("euler", False), ("dpmpp_2m", False), ("ddim", False)])
def test_trailing_spacing(models, sampler, karras, monkeypatch):
    """Trailing spacing (zero-terminal-SNR models use it): Euler starts at σ_max, not sqrt(σ_max² + 1)."""
    ref, ours = models["ref"], models["ours"]
    ref.scheduler = scheduler(ref, sampler, karras, timestep_spacing="trailing", steps_offset=0)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(2), height=SIZE, width=SIZE).images  # fmt: skip
    monkeypatch.setattr(ours.schedule, "timestep_spacing", "trailing")
    monkeypatch.setattr(ours.schedule, "steps_offset", 0)
    got = ours.generate(PROMPT, NEGATIVE, steps=10, guidance=7.5, sampler=sampler, karras=karras, seed=2,
                        width=SIZE, height=SIZE)  # fmt: skip
    compare(got, theirs, f"trailing {sampler}")


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_batch_of_two_prompts_with_per_image_seeds(models, sampler):
    """Two prompts x two images: image i has seed 5 + i, i.e. diffusers' list of generators."""
    ref, ours = models["ref"], models["ours"]
    ref.scheduler = scheduler(ref, sampler, False)
    prompts = [PROMPT, "an astronaut on the moon"]
    theirs = ref(
        prompts,
        negative_prompt=[NEGATIVE, ""],
        num_images_per_prompt=2,
        num_inference_steps=8,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(5 + i) for i in range(4)],
        height=SIZE,
        width=SIZE,
    ).images
    got = ours.generate(prompts, [NEGATIVE, ""], steps=8, guidance=5.0, sampler=sampler, karras=False, seed=5,
                        batch=2, width=SIZE, height=SIZE)  # fmt: skip
    compare(got, theirs, f"batch 2x2 {sampler}")
    # image 3 alone, from the seed written into its parameters
    alone = ours.generate("an astronaut on the moon", steps=8, guidance=5.0, sampler=sampler, karras=False,
                          seed=8, width=SIZE, height=SIZE)  # fmt: skip
    assert "Seed: 8" in got[3].info["parameters"]
    compare(alone, got[3:], "image 3 regenerated alone")


def test_guidance_one_and_clip_skip(models):
    ref, ours = models["ref"], models["ours"]
    ref.scheduler = scheduler(ref, "euler", False)
    kw = dict(num_inference_steps=6, height=SIZE, width=SIZE)
    theirs = ref(PROMPT, guidance_scale=1.0, generator=torch.Generator().manual_seed(1), **kw).images
    got = ours.generate(PROMPT, steps=6, guidance=1.0, sampler="euler", karras=False, seed=1, width=SIZE,
                        height=SIZE)  # fmt: skip
    compare(got, theirs, "guidance 1 (no CFG)")
    # diffusers 0.42's clip_skip reads `text_encoder.text_model`, which transformers 5 no longer has; its
    # formula (final LayerNorm of hidden_states[-(clip_skip + 1)]) is applied here by hand instead
    def embeds(text):
        ids = ref.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = ref.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
            return ref.text_encoder.final_layer_norm(hidden)

    theirs = ref(prompt_embeds=embeds(PROMPT), negative_prompt_embeds=embeds(""), guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(1), **kw).images  # fmt: skip
    got = ours.generate(PROMPT, steps=6, guidance=4.0, sampler="euler", karras=False, seed=1, clip_skip=1,
                        width=SIZE, height=SIZE)  # fmt: skip
    compare(got, theirs, "clip_skip 1")


@pytest.mark.parametrize(("sampler", "karras"), [("ddim", False), ("euler", False), ("dpmpp_2m", True)])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_image_to_image(models, sampler, karras, strength):
    ref, ours = models["ref_img2img"], models["ours"]
    ref.scheduler = scheduler(ref, sampler, karras)
    image = input_image()
    theirs = ref(
        PROMPT,
        image=image,
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=10,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(4),
    ).images
    got = ours.image_to_image(image, PROMPT, NEGATIVE, strength=strength, steps=10, guidance=7.5,
                              sampler=sampler, karras=karras, seed=4)  # fmt: skip
    compare(got, theirs, f"img2img strength={strength} {sampler} karras={karras}")


@pytest.mark.parametrize("model", ["nine_channel", "blending"])
@pytest.mark.parametrize(("sampler", "karras"), [("ddim", False), ("euler", False), ("dpmpp_2m", True)])
@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpaint(models, model, sampler, karras, strength):
    if model == "nine_channel":
        ref, ours = models["ref_inpaint"], models["ours_inpaint"]
        assert ours.is_inpainting_model
    else:
        ref, ours = models["ref_inpaint_blend"], models["ours"]
        assert not ours.is_inpainting_model
    ref.scheduler = scheduler(ref, sampler, karras)
    image, mask = input_image(), input_mask()
    theirs = ref(
        PROMPT,
        image=image,
        mask_image=mask,
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=10,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(9),
        height=SIZE,
        width=SIZE,
    ).images
    got = ours.inpaint(image, mask, PROMPT, NEGATIVE, strength=strength, steps=10, guidance=7.5, sampler=sampler,
                       karras=karras, seed=9)  # fmt: skip
    compare(got, theirs, f"inpaint {model} strength={strength} {sampler} karras={karras}")


def test_pipeline_is_what_load_returns(models):
    assert isinstance(models["ours"], StableDiffusion)
