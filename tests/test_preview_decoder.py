"""The tiny preview decoder (models.preview): shapes, its fast upsampling path, distillation of a real VAE
(the shipped model's) through the training loop, and its use by bundles, pipelines and the server."""

import pytest
import torch
from conftest import tiny_bundle

import sfumato
from sfumato.checkpoints.bundle import save_bundle
from sfumato.checkpoints.native import load_model
from sfumato.data import load_dataset
from sfumato.models import layers
from sfumato.models.preview import PreviewDecoder, PreviewDecoderConfig
from sfumato.models.vae import VAE_PRESETS
from sfumato.pipelines import default_model
from sfumato.training.loop import TrainConfig, train
from sfumato.training.preview import PreviewTask
from sfumato.training.task import BatchRandom
from sfumato.training.vae import psnr


def test_config_follows_the_vae_and_shapes_match():
    sd = PreviewDecoderConfig.for_vae(VAE_PRESETS["sd"])
    assert sd.downsample_factor == 8 and sd.widths == (64, 32, 16, 8)
    tiny = tiny_bundle().vae
    config = PreviewDecoderConfig.for_vae(tiny.config)
    assert config.downsample_factor == tiny.config.downsample_factor
    z = torch.randn(2, tiny.config.z_channels, 5, 7)  # odd sizes too
    with torch.no_grad():
        assert PreviewDecoder(config)(z).shape == tiny.decode(z).shape
    with pytest.raises(ValueError, match="expected latents"):
        PreviewDecoder(config)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="widths needs"):
        PreviewDecoderConfig.for_vae(tiny.config, (8, 8, 8))
    with pytest.raises(ValueError, match="for_vae"):
        PreviewTask(tiny, PreviewDecoderConfig(widths=(8, 8, 8)))


def test_fast_upsampling_matches_plain(monkeypatch):
    torch.manual_seed(0)
    model = PreviewDecoder(PreviewDecoderConfig(widths=(16, 8, 8))).eval()
    z = torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        fast = model(z)
        monkeypatch.setattr(layers, "FAST_UPSAMPLE", False)
        monkeypatch.setattr(layers, "FAST_CONV", False)
        plain = model(z)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # 150 steps: ~40 s on 2 idle cores
def test_distils_the_shipped_vae(tmp_path):
    """150 steps of the loop (batch 32 of 32 px shapes) teach the decoder to reproduce the shipped VAE's
    decodes of unseen images: PSNR against them from ~7 dB untrained to > 20 dB (measured: 30.3 dB)."""
    vae = load_model(default_model() / "vae.safetensors", dtype=torch.float32)  # stored as float16
    data = load_dataset("shapes", image_size=32, size=4000)
    held = torch.stack([load_dataset("shapes:7", image_size=32, size=32)[i]["image"] for i in range(32)])
    task = PreviewTask(vae, seed=0)

    def quality(model) -> float:
        z, target = task.targets(held, None)
        with torch.no_grad():
            return float(psnr(target, model.eval()(z)).mean())

    before = quality(task.trainable())
    cfg = TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=None, log_every=50,
                      checkpoint_every=150, preview_every=0)  # fmt: skip
    result = train(task, data, cfg, tmp_path / "run", progress=False)
    path = tmp_path / "run/final/preview_decoder.safetensors"
    assert result.exported == [path]
    after = quality(load_model(path))
    print(f"preview decoder PSNR against the VAE's decodes: {before:.1f} dB untrained, {after:.1f} dB trained")
    assert before < 12 and after > 20, (before, after)


def test_bundle_pipeline_and_server_use_it(tmp_path):
    bundle = tiny_bundle()
    plain = tmp_path / "plain"
    save_bundle(bundle, plain)
    bundle.preview_decoder = PreviewDecoder(PreviewDecoderConfig.for_vae(bundle.vae.config))
    with_preview = tmp_path / "with"
    save_bundle(bundle, with_preview)
    assert (with_preview / "preview_decoder.safetensors").is_file()

    a, b = sfumato.load(plain), sfumato.load(with_preview)
    assert a.preview_decoder is None and b.preview_decoder is not None
    latents = a.generate("a red circle", steps=2, seed=0, output="latent")
    assert [im.tobytes() for im in a.preview(latents)] == [im.tobytes() for im in a.decode(latents)]
    quick = b.preview(latents)
    z = b.vae.from_diffusion(latents)
    with torch.no_grad():
        expected = b.preview_decoder(z)
    assert quick[0].size == a.decode(latents)[0].size
    assert quick[0].tobytes() == sfumato.pipelines.images.tensor_to_images(expected)[0].tobytes()

    from sfumato.server.jobs import Worker

    assert Worker(b, tmp_path / "out")._preview == b.preview


def test_preview_task_loss_draws_per_example():
    bundle = tiny_bundle()
    task = PreviewTask(bundle.vae)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    model = task.trainable()
    whole, m = task.loss({"image": images}, BatchRandom(0, 1, [0, 1, 2, 3]), 1, model)
    half = task.loss({"image": images[2:]}, BatchRandom(0, 1, [2, 3]), 1, model)[0]
    other = task.loss({"image": images[:2]}, BatchRandom(0, 1, [0, 1]), 1, model)[0]
    assert set(m) == {"loss", "psnr"}
    # means over every pixel, each example's noise its own: two halves of equal size average to the whole
    torch.testing.assert_close(whole, (half + other) / 2, atol=1e-5, rtol=1e-5)
