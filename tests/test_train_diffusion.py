"""LDMTask, DDPMTask and the latent cache: the losses train, their random draws are per example, previews and
exports load back. The optimiser loop here is a bare AdamW loop; the real one is `sfumato.training.loop`."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_bundle
from PIL import Image

import sfumato
from sfumato.checkpoints.bundle import ScheduleConfig
from sfumato.data.cache import build_latent_cache
from sfumato.diffusion.denoisers import DiscreteDenoiser
from sfumato.models.clip import CLIPTextModel
from sfumato.models.unet import UNET_PRESETS, UNetConfig
from sfumato.pipelines.images import tensor_to_images
from sfumato.training.ddpm import DDPM_SCHEDULE, DDPMTask, load_ddpm, sample_images
from sfumato.training.ldm import LDMTask
from sfumato.training.task import BatchRandom

COLOURS = {
    "red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1),
    "cyan": (-1, 1, 1), "magenta": (1, -1, 1), "white": (1, 1, 1), "black": (-1, -1, -1),
}  # fmt: skip


class SolidColours(torch.utils.data.Dataset):
    """n solid-colour images (3, px, px) in [-1, 1], captioned with their colour's name."""

    def __init__(self, n: int = 16, px: int = 16, names=tuple(COLOURS)):
        self.n, self.px, self.names = n, px, names

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        name = self.names[i % len(self.names)]
        image = torch.tensor(COLOURS[name], dtype=torch.float32)[:, None, None].expand(3, self.px, self.px)
        return {"image": image.clone(), "caption": f"a {name} square", "index": i}


def collate(examples):
    return {
        "image": torch.stack([e["image"] for e in examples]),
        "caption": [e["caption"] for e in examples],
        "index": torch.tensor([e["index"] for e in examples]),
    }


def batch_of(data, indices):
    return collate([data[int(i)] for i in indices])


def train(task, data, steps: int, *, lr: float = 3e-3, batch_size: int = 16, seed: int = 0) -> list[float]:
    """The loop of Ho et al. 2020, Algorithm 1, with AdamW; returns the training losses."""
    model = task.trainable().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randperm(len(data), generator=g)[:batch_size]
        loss, _ = task.loss(batch_of(data, idx), BatchRandom(seed, step, idx), step, model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def eval_loss(task, data, repeats: int = 4) -> float:
    """The loss over the whole dataset on `repeats` fixed draws of (t, noise, dropout): the same numbers before
    and after training, so the comparison is not swamped by the loss's noise over t."""
    batch = batch_of(data, range(len(data)))
    losses = [task.loss(batch, BatchRandom(123, 10**6 + k, batch["index"]), 0, task.trainable())[0]
              for k in range(repeats)]  # fmt: skip
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="module")
def parts():
    """Random frozen VAE (f = 2) and text encoder (width 32) and a small BPE tokenizer."""
    return tiny_bundle()


def ldm_task(parts, prediction="eps", **kwargs):
    kwargs.setdefault("preview_prompts", ("a red square", ""))
    kwargs.setdefault("preview_seeds", (0, 1))
    kwargs.setdefault("preview_steps", 3)
    schedule = ScheduleConfig(prediction=prediction)  # image_size None: taken from the training images
    return LDMTask(UNET_PRESETS["tiny"], parts.vae, parts.text_encoder, parts.tokenizer, schedule, **kwargs)


# --- LDM --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ldm_loss_falls(parts, prediction):
    # 16 solid-colour 16 px images (8 x 8 latents); the U-Net's output layer starts at zero, so the first loss
    # is E|target|² (1 for eps). 30 AdamW steps learn the easy part (the latents' mean and scale).
    data = SolidColours()
    task = ldm_task(parts, prediction, min_snr_gamma=5.0 if prediction == "v" else None)
    before = eval_loss(task, data)
    losses = train(task, data, 30)
    after = eval_loss(task, data)
    assert all(math.isfinite(v) for v in losses)
    assert after < 0.5 * before, (prediction, before, after)  # 40 steps: 0.14 (eps), 0.30 (v) of before


def test_caption_dropout_per_example(parts):
    data = SolidColours()
    batch = batch_of(data, range(8))
    device = torch.device("cpu")
    empty = parts.text_encoder(parts.tokenizer([""])).last_hidden_state[0]
    fresh = parts.text_encoder(parts.tokenizer(batch["caption"])).last_hidden_state

    everything = ldm_task(parts, caption_dropout=1.0).prepare(batch, BatchRandom(0, 3, batch["index"]), device)
    assert everything["drop"].all()
    assert all(torch.equal(c, empty) for c in everything["context"])

    nothing = ldm_task(parts, caption_dropout=0.0).prepare(batch, BatchRandom(0, 3, batch["index"]), device)
    assert not nothing["drop"].any()
    assert not any(torch.equal(c, empty) for c in nothing["context"])
    torch.testing.assert_close(nothing["context"], fresh, atol=1e-6, rtol=0)

    # the decision for example i depends on (seed, step, i) only, not on the rest of the batch
    half = ldm_task(parts, caption_dropout=0.5)

    def drops(indices, step):
        b = batch_of(data, indices)
        return dict(zip(indices, half.prepare(b, BatchRandom(0, step, indices), device)["drop"].tolist()))

    for step in range(3):
        together = drops([0, 1, 2, 3, 4, 5, 6, 7], step)
        apart = drops([5, 1, 7], step) | drops([0, 6, 4, 3, 2], step)
        assert together == apart
    # and the rate is the probability asked for (400 Bernoulli(0.5) draws: 4.5 standard deviations = 0.11)
    rate = BatchRandom(0, 0, range(400)).rand().lt(0.5).float().mean()
    assert abs(float(rate) - 0.5) < 0.11


def test_high_noise_share_draws_that_share_from_the_top_timesteps(parts):
    data, device = SolidColours(n=400), torch.device("cpu")
    batch, idx = batch_of(data, range(400)), torch.arange(400)
    t_plain = ldm_task(parts).prepare(batch, BatchRandom(0, 0, idx), device)["t"]
    t_off = ldm_task(parts, high_noise_share=0.0).prepare(batch, BatchRandom(0, 0, idx), device)["t"]
    assert torch.equal(t_plain, t_off)  # off: the draws of a task without it
    t_all = ldm_task(parts, high_noise_share=1.0, high_noise_from=900).prepare(batch, BatchRandom(0, 0, idx), device)["t"]
    assert int(t_all.min()) >= 900 and int(t_all.max()) <= 999 and len(set(t_all.tolist())) > 60
    t_half = ldm_task(parts, high_noise_share=0.5, high_noise_from=900).prepare(batch, BatchRandom(0, 0, idx), device)["t"]
    share = float((t_half >= 900).float().mean())  # 0.5 + 0.5 * 0.1 = 0.55 expected; sd of the mean 0.025
    assert 0.45 < share < 0.65, share
    assert float((t_half < 900).float().mean()) > 0.35


def test_low_noise_until_draws_only_the_low_experts_levels(parts):
    data, device = SolidColours(n=400), torch.device("cpu")
    batch, idx = batch_of(data, range(400)), torch.arange(400)
    t = ldm_task(parts, low_noise_until=550).prepare(batch, BatchRandom(0, 0, idx), device)["t"]
    # 400 draws from U{0..549}: every one below the boundary, spread over the range (P(max < 500) ~ 1e-17)
    assert int(t.min()) >= 0 and int(t.max()) < 550 and int(t.max()) >= 500 and int(t.min()) < 50
    assert len(set(t.tolist())) > 200
    with pytest.raises(ValueError, match="low_noise_until must be a timestep in \\(0, 1000\\], got 0"):
        ldm_task(parts, low_noise_until=0)
    with pytest.raises(ValueError, match="opposite timestep ranges"):
        ldm_task(parts, low_noise_until=550, high_noise_share=0.5)



def test_a_low_noise_only_unet_previews_its_own_job(parts, tmp_path):
    """With low_noise_until the preview cannot sample from pure noise (nothing learnt t >= the boundary), so
    it shows the first training images noised to below the boundary and denoised: no level above it runs."""
    data = SolidColours()
    task = ldm_task(parts, low_noise_until=500)
    assert task.preview(task.trainable(), 0, tmp_path / "samples") == []  # no image seen yet
    train(task, data, 2)
    first = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:2]  # train()'s first batch
    for (image, caption), i in zip(task._preview_items, first.tolist()):
        assert caption == data[i]["caption"]
        assert np.array_equal(np.asarray(image), np.asarray(tensor_to_images(data[i]["image"][None])[0]))
    seen = []
    unet = task.trainable()
    hook = unet.register_forward_pre_hook(lambda m, args: seen.append(float(args[1].max())))
    (png,) = task.preview(unet, 2, tmp_path / "samples")
    hook.remove()
    assert seen and max(seen) < 500, seen
    grid = Image.open(png)
    assert grid.size[0] == 3 * 128 and grid.size[1] == 2 * (128 + 14)  # image + 2 seeds, 2 rows with captions


def test_layout_steps_end_the_high_noise_share_and_the_floor(parts):
    """Before `layout_steps` the task draws and weighs like one with the share and floor for the whole run;
    from then on timesteps are uniform and the floor is gone."""
    data, device = SolidColours(n=400), torch.device("cpu")
    batch, idx = batch_of(data, range(400)), torch.arange(400)
    kw = dict(min_snr_gamma=5.0, min_snr_floor=1.0, high_noise_share=1.0, high_noise_from=900)
    task, always = ldm_task(parts, "v", layout_steps=3, **kw), ldm_task(parts, "v", **kw)
    t2 = task.prepare(batch, BatchRandom(0, 2, idx), device, 2)["t"]
    assert torch.equal(t2, always.prepare(batch, BatchRandom(0, 2, idx), device, 2)["t"])
    assert int(t2.min()) >= 900
    t3 = task.prepare(batch, BatchRandom(0, 3, idx), device, 3)["t"]
    share = float((t3 >= 900).float().mean())  # uniform: 0.1 expected, sd of the mean 0.015
    assert 0.04 < share < 0.16 and int(t3.min()) < 100, share

    small, model = batch_of(data, range(8)), task.trainable()
    denoiser = DiscreteDenoiser(model, task.train_schedule, "v")
    with torch.no_grad():
        for step, floor in ((2, 1.0), (3, 0.0)):
            x = task.prepare(small, BatchRandom(0, step, range(8)), device, step)
            weighed = {f: denoiser.loss(x["z0"], t=x["t"], noise=x["noise"], min_snr_gamma=5.0, min_snr_floor=f,
                                        context=x["context"]).mean() for f in (0.0, 1.0)}  # fmt: skip
            assert abs(float(weighed[0.0] - weighed[1.0])) > 1e-3  # the floor matters at these timesteps
            got = task.loss(small, BatchRandom(0, step, range(8)), step, model)[0]
            torch.testing.assert_close(got, weighed[floor])

def test_ldm_loss_is_per_example(parts):
    """The loss of a batch of 4 is the mean of two batches of 2 with the same indices (same draws), whatever
    the order: what makes a run equal across process counts and after resume."""
    data = SolidColours()
    task = ldm_task(parts, caption_dropout=0.5)
    model = task.trainable()
    with torch.no_grad():
        whole = task.loss(batch_of(data, [3, 9, 4, 12]), BatchRandom(7, 5, [3, 9, 4, 12]), 5, model)[0]
        a = task.loss(batch_of(data, [12, 3]), BatchRandom(7, 5, [12, 3]), 5, model)[0]
        b = task.loss(batch_of(data, [9, 4]), BatchRandom(7, 5, [9, 4]), 5, model)[0]
    assert abs(float(whole) - float(a + b) / 2) < 1e-6


def test_ldm_loss_calls_the_wrapper(parts):
    """The U-Net runs through the forward of the module passed in (DDP synchronises only forward calls)."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    task = ldm_task(parts)
    wrapper = Wrapper(task.trainable())
    data = SolidColours(4)
    loss, metrics = task.loss(batch_of(data, range(4)), BatchRandom(0, 0, range(4)), 0, wrapper)
    loss.backward()
    assert wrapper.calls == 1
    assert all(p.grad is not None for p in task.trainable().parameters())
    assert not any(p.requires_grad for p in parts.vae.parameters())
    assert not any(p.requires_grad for p in parts.text_encoder.parameters())
    assert {"loss", "caption_dropped"} <= set(metrics)
    assert all(k in ("loss", "caption_dropped", "loss_q0", "loss_q1", "loss_q2", "loss_q3") for k in metrics)


def test_ldm_preview_and_export_load(parts, tmp_path):
    data = SolidColours()
    task = ldm_task(parts)
    train(task, data, 2)
    (png,) = task.preview(task.trainable(), 2, tmp_path / "samples")
    grid = Image.open(png)
    assert grid.size[0] == 2 * 128 and grid.size[1] > 2 * 128  # 2 seeds x 2 prompts, 16 px tiles shown at 128

    task.export(task.trainable(), tmp_path / "model")
    pipe = sfumato.load(tmp_path / "model")
    assert pipe.schedule.image_size == 16  # the training size, not SD's 512
    (image,) = pipe.generate("a red square", steps=2, seed=0, progress=False)
    assert image.size == (16, 16)
    # the exported U-Net is the trained one
    for k, v in task.trainable().state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v), k


def test_ldm_with_trained_text_encoder(parts, tmp_path):
    """train_text_encoder=True: the same loss as a frozen encoder at the start (same draws, "" for dropped
    captions), then gradients reach a copy of the text encoder, which the bundle exports; the original and
    the pooled projection stay as they were."""
    data = SolidColours()
    # the tiny bundle's tower has no projection; this one has, as a CLIP's text tower exported whole would
    projected = CLIPTextModel(replace(parts.text_encoder.config, projection_dim=16))
    missing, unexpected = projected.load_state_dict(parts.text_encoder.state_dict(), strict=False)
    assert missing == ["text_projection.weight"] and not unexpected
    parts = replace(parts, text_encoder=projected.eval().requires_grad_(False))
    frozen = ldm_task(parts, caption_dropout=0.4)
    joint = ldm_task(parts, caption_dropout=0.4, train_text_encoder=True)
    joint.unet.load_state_dict(frozen.unet.state_dict())
    model = joint.trainable()
    assert model.unet is joint.unet and model.text_encoder is not parts.text_encoder
    for step, indices in enumerate([[0, 1, 2, 3, 4, 5], [9, 3, 11]]):
        batch = batch_of(data, indices)
        with torch.no_grad():
            a = frozen.loss(batch, BatchRandom(2, step, indices), step, frozen.trainable())[0]
            b = joint.loss(batch, BatchRandom(2, step, indices), step, model)[0]
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    original = {k: v.clone() for k, v in parts.text_encoder.state_dict().items()}
    loss, _ = joint.loss(batch_of(data, range(8)), BatchRandom(0, 0, range(8)), 0, model)
    loss.backward()
    text = model.text_encoder
    assert all(p.grad is not None for n, p in text.named_parameters() if not n.startswith("text_projection"))
    assert all(p.grad is None and not p.requires_grad for p in text.text_projection.parameters())
    model.zero_grad(set_to_none=True)

    losses = train(joint, data, 10)
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(text.state_dict()["text_model.embeddings.token_embedding.weight"],
                           original["text_model.embeddings.token_embedding.weight"])  # fmt: skip
    torch.testing.assert_close(text.text_projection.weight, original["text_projection.weight"], atol=0, rtol=0)
    assert all(torch.equal(v, parts.text_encoder.state_dict()[k]) for k, v in original.items())

    joint.export(model, tmp_path / "model")
    pipe = sfumato.load(tmp_path / "model")
    for k, v in text.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[k], v), k
    for k, v in joint.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v), k
    (png,) = joint.preview(model, 10, tmp_path / "samples")
    assert Image.open(png).size[0] == 2 * 128
    assert model.training and model.text_encoder.training  # the preview gives the training mode back


# --- the latent cache ---------------------------------------------------------------------------------


class CountingVAE:
    """Counts calls of `vae.encode` by wrapping the bound method on the instance."""

    def __init__(self, vae):
        self.calls, self._encode = 0, vae.encode
        vae.encode = self

    def __call__(self, x):
        self.calls += 1
        return self._encode(x)


def test_cache_matches_fresh_encodings_and_is_reused(parts, tmp_path):
    vae = tiny_bundle().vae  # its own copy: the instance method is patched and the weights changed below
    counter = CountingVAE(vae)
    data = SolidColours(12)
    build = lambda: build_latent_cache(data, vae, parts.text_encoder, parts.tokenizer, tmp_path, dataset_id="s12",
                                       batch_size=5, shard_size=8, progress=False)  # fmt: skip
    cache = build()
    assert counter.calls == 3  # shards of 8 + 4 examples, in batches of 5: 5 + 3 + 4
    assert len(cache) == 12

    images = batch_of(data, range(12))["image"]
    with torch.no_grad():
        post = vae.encode(images)
        context = parts.text_encoder(parts.tokenizer(batch_of(data, range(12))["caption"])).last_hidden_state
    got = cache.get([11, 0, 5])
    torch.testing.assert_close(got.mean, post.mean[[11, 0, 5]], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.std, post.std[[11, 0, 5]], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.context, context[[11, 0, 5]], atol=1e-6, rtol=0)
    assert got.captions == ["a yellow square", "a red square", "a magenta square"]

    counter.calls = 0
    again = build()
    assert counter.calls == 0 and again.folder == cache.folder

    # an interrupted build (shards written, no manifest) resumes without re-encoding the finished shards
    (cache.folder / "manifest.json").unlink()
    (cache.folder / "shard-00001.safetensors").unlink()
    assert build().folder == cache.folder and counter.calls == 1  # only the second shard, 4 examples

    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)  # new VAE weights: the old cache must not be used
    counter.calls = 0
    changed = build()
    assert counter.calls == 3 and changed.folder != cache.folder


def test_ldm_loss_with_cache_equals_without(parts, tmp_path):
    data = SolidColours(8)
    cache = build_latent_cache(data, parts.vae, parts.text_encoder, parts.tokenizer, tmp_path, dataset_id="s8",
                               progress=False)  # fmt: skip
    plain, cached = ldm_task(parts, caption_dropout=0.3), ldm_task(parts, caption_dropout=0.3, cache=cache)
    cached.unet.load_state_dict(plain.unet.state_dict())
    for step, indices in enumerate([[0, 1, 2, 3], [7, 2, 5]]):
        batch = batch_of(data, indices)
        with torch.no_grad():
            a = plain.loss(batch, BatchRandom(1, step, indices), step, plain.unet)[0]
            b = cached.loss(batch, BatchRandom(1, step, indices), step, cached.unet)[0]
        assert abs(float(a) - float(b)) < 1e-5

    # a caption that differs from the cached one is encoded afresh (datasets with several captions per image)
    batch = batch_of(data, [0, 1])
    batch["caption"] = ["a purple square", batch["caption"][1]]
    with torch.no_grad():
        x = cached.prepare(batch, BatchRandom(1, 0, [0, 1]), torch.device("cpu"))
        expected = parts.text_encoder(parts.tokenizer(batch["caption"])).last_hidden_state
    for i in range(2):
        if not x["drop"][i]:
            torch.testing.assert_close(x["context"][i], expected[i], atol=1e-6, rtol=0)

    # images that are not the cached ones (a flip, a different dataset) are refused
    batch = batch_of(data, [0, 1])
    batch["image"][0] = torch.linspace(-1, 1, 16)[None, None, :].expand(3, 16, 16)
    with pytest.raises(ValueError, match="differ from the ones in the latent cache"):
        cached.loss(batch, BatchRandom(1, 0, [0, 1]), 0, cached.unet)


def test_ldm_latents_follow_the_vae_scale_and_any_cache_serves_it(parts, tmp_path):
    """z0 is `vae.to_diffusion` of the posterior sample, so per-channel statistics in the VAE's config centre
    and divide each channel; the cache holds unscaled posteriors, so one built under the plain VAE serves a VAE
    with the same weights and statistics and gives the z0 of encoding afresh."""
    data = SolidColours(8)
    z = parts.vae.config.z_channels
    mean, std = tuple(0.5 * c - 1 for c in range(z)), tuple(0.5 + c for c in range(z))
    vae = tiny_bundle().vae
    vae.load_state_dict(parts.vae.state_dict())
    vae.config = replace(parts.vae.config, scaling_factor=1.0, latents_mean=mean, latents_std=std)
    cache = build_latent_cache(data, parts.vae, parts.text_encoder, parts.tokenizer, tmp_path, dataset_id="s8",
                               progress=False)  # fmt: skip
    make = lambda v, **kw: LDMTask(UNET_PRESETS["tiny"], v, parts.text_encoder, parts.tokenizer, ScheduleConfig(),
                                   preview_prompts=("",), preview_seeds=(0,), **kw)  # fmt: skip
    indices = [0, 3, 5]
    batch = batch_of(data, indices)
    with torch.no_grad():
        plain, fresh, cached = (t.prepare(batch, BatchRandom(1, 0, indices), torch.device("cpu"))["z0"]
                                for t in (make(parts.vae), make(vae), make(vae, cache=cache)))  # fmt: skip
    unscaled = plain / parts.vae.config.scaling_factor
    expected = (unscaled - torch.tensor(mean).view(1, z, 1, 1)) / torch.tensor(std).view(1, z, 1, 1)
    torch.testing.assert_close(fresh, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=0)


# --- pixel-space DDPM -------------------------------------------------------------------------------------

RED, BLUE = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])


def nearest_colour_distance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image (N, 3, H, W): the RMS distance per pixel to the nearer of solid red and solid blue, and
    which one it is (0 red, 1 blue)."""
    colours = torch.stack([RED, BLUE])[None, :, :, None, None]  # (1, 2, 3, 1, 1)
    d = (x[:, None] - colours).pow(2).mean((2, 3, 4)).sqrt()  # (N, 2)
    return d.min(1)


@pytest.mark.slow  # a training run: minutes on 2 cores
def test_ddpm_learns_two_colours_and_exports(tmp_path):
    """Unconditional pixel DDPM on 8 px images that are all solid red or solid blue.

    v-prediction (Salimans & Ho 2022): an eps-network's x0 = (x_t - s ε̂) / a multiplies its error by s/a
    (~150 at t = T - 1 of DDPM's linear schedule), so after 200 steps eps-prediction samples are still
    mostly wrong in colour, while v-prediction's x0 error stays about its own error.

    Thresholds: red and blue are sqrt(8/3) = 1.63 apart (RMS per pixel); an untrained model's samples are
    > 1 from both; half-red half-blue images are 1.15 from both. A sample within 0.6 of a colour is that
    colour, with small per-pixel errors. With 200 steps, training seeds 0-3 gave a largest distance of
    0.17-0.26, a mean of 0.11-0.22 and a loss ratio after/before of 0.25-0.38; the bounds leave room for
    other CPUs' rounding. The colour balance after 200 steps is far from 1:1 and moves with float32 rounding:
    of 64 samples, training seed 0 gave 13 blue, and 61 after a change of summation order in the
    SpatialTransformer's projections (16 of the first 16), so no collapse is checked on 64 samples, not 16.
    """
    data = SolidColours(16, px=8, names=("red", "blue"))
    config = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_heads=2, context_dim=8)  # fmt: skip
    schedule = replace(DDPM_SCHEDULE, prediction="v")
    task = DDPMTask(config, schedule, image_size=8, preview_seeds=range(4), preview_steps=50)
    seeds = list(range(16))
    untrained, _ = nearest_colour_distance(task.samples(task.trainable(), seeds))
    before = eval_loss(task, data)
    train(task, data, 200)
    after = eval_loss(task, data)
    assert after < 0.6 * before, (before, after)

    samples = task.samples(task.trainable(), seeds)
    dist, which = nearest_colour_distance(task.samples(task.trainable(), list(range(64))))
    assert untrained.mean() > 1.0
    assert dist.max() < 0.6 and dist.mean() < 0.35, dist
    assert 0 < int(which.sum()) < 64, int(which.sum())  # both colours appear (not a collapse onto one)

    (png,) = task.preview(task.trainable(), 200, tmp_path / "samples")
    assert Image.open(png).size == (4 * 128, 128)

    task.export(task.trainable(), tmp_path / "ddpm")
    unet, loaded_schedule = load_ddpm(tmp_path / "ddpm")
    assert loaded_schedule == task.schedule and loaded_schedule.image_size == 8
    again = sample_images(unet, loaded_schedule, seeds=seeds, image_size=8, steps=50)
    torch.testing.assert_close(again, samples, atol=1e-5, rtol=0)


def test_ddpm_conditional_loss_and_preview(parts, tmp_path):
    config = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_heads=2, context_dim=32)  # fmt: skip
    task = DDPMTask(config, image_size=8, conditional=True, text_encoder=parts.text_encoder,
                    tokenizer=parts.tokenizer, caption_dropout=0.5, preview_seeds=(0, 1), preview_steps=3,
                    preview_prompts=("a red square", ""))  # fmt: skip
    data = SolidColours(4, px=8)
    loss, metrics = task.loss(batch_of(data, range(4)), BatchRandom(0, 0, range(4)), 0, task.trainable())
    loss.backward()
    assert math.isfinite(metrics["loss"]) and "caption_dropped" in metrics
    (png,) = task.preview(task.trainable(), 0, tmp_path)
    assert Image.open(png).size[0] == 2 * 128
    task.export(task.trainable(), tmp_path / "cond")
    assert (tmp_path / "cond" / "text_encoder.safetensors").is_file()


def test_bad_configs_say_what_to_do(parts):
    with pytest.raises(ValueError, match="context_dim=32"):
        LDMTask(replace(UNET_PRESETS["tiny"], context_dim=16), parts.vae, parts.text_encoder,
                parts.tokenizer, ScheduleConfig())  # fmt: skip
    with pytest.raises(ValueError, match="caption_dropout"):
        ldm_task(parts, caption_dropout=1.5)
    with pytest.raises(ValueError, match="min_snr_floor=1.0 needs min_snr_gamma"):
        ldm_task(parts, "v", min_snr_floor=1.0)
    with pytest.raises(ValueError, match="min_snr_floor=6.0 .* 0 < floor <= gamma"):
        ldm_task(parts, "v", min_snr_gamma=5.0, min_snr_floor=6.0)
    with pytest.raises(ValueError, match="high_noise_share must be a probability in \\[0, 1\\].*got 1.5"):
        ldm_task(parts, high_noise_share=1.5)
    with pytest.raises(ValueError, match="high_noise_from must be a timestep in \\[0, 1000\\), got 1000"):
        ldm_task(parts, high_noise_share=0.5, high_noise_from=1000)
    with pytest.raises(ValueError, match="layout_steps=100 ends a layout phase that needs high_noise_share"):
        ldm_task(parts, layout_steps=100)
    with pytest.raises(ValueError, match="in_channels=3"):
        DDPMTask(UNET_PRESETS["tiny"], image_size=8)
