"""Two U-Nets split by noise level (`models.experts`): dispatch, bundle files, pipeline and training."""

import copy
import dataclasses
import json

import pytest
import torch
from conftest import random_weights_, tiny_bundle

from sfumato.checkpoints.bundle import (
    EXPERTS_FILE,
    HIGH_NOISE_FILE,
    HIGH_NOISE_TEXT_FILE,
    load_bundle,
    save_bundle,
)
from sfumato.checkpoints.diffusers_folder import save_diffusers
from sfumato.models.clip import prompt_mask
from sfumato.models.experts import ExpertTextEncoders, NoiseLevelExperts
from sfumato.models.unet import UNet
from sfumato.pipelines.stable_diffusion import StableDiffusion
from sfumato.training import recipes as R
from sfumato.training.ldm import HighNoiseExpertTask
from sfumato.training.task import BatchRandom


def _pair(boundary=500):
    """(experts, high, low): a masked high-noise U-Net and the tiny bundle's unmasked one, random weights."""
    bundle = tiny_bundle()
    low = bundle.unet.eval()
    high = random_weights_(UNet(dataclasses.replace(low.config, mask_padding=True)), 7, scale=0.5).eval()
    return NoiseLevelExperts(high, low, boundary), high, low, bundle


@torch.no_grad()
def test_each_timestep_goes_to_its_expert_and_only_the_masked_one_reads_the_mask():
    experts, high, low, _ = _pair(500)
    x, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 4).bool()
    t = torch.tensor([999.0, 500.0, 499.0, 10.0])  # 500 is the first high-noise timestep
    out = experts(x, t, ctx, context_mask=mask)
    want_high = high(x[:2], t[:2], ctx[:2], context_mask=mask[:2])
    want_low = low(x[2:], t[2:], ctx[2:])  # trained attending to every token: no mask
    torch.testing.assert_close(out, torch.cat([want_high, want_low]), rtol=0, atol=1e-6)
    # the two are different functions, so a wrong dispatch could not pass the check above
    assert (high(x[2:], t[2:], ctx[2:], context_mask=mask[2:]) - want_low).abs().max() > 1e-2
    assert (low(x[:2], t[:2], ctx[:2]) - want_high).abs().max() > 1e-2
    # whole batches on one side, and a scalar t
    torch.testing.assert_close(experts(x, 700, ctx, context_mask=mask), high(x, 700, ctx, context_mask=mask))
    torch.testing.assert_close(experts(x, 3, ctx, context_mask=mask), low(x, 3, ctx))
    assert experts.config.mask_padding and not low.config.mask_padding  # the pipeline must make a mask


def test_experts_must_share_channels_and_context():
    _, high, low, _ = _pair()
    other = UNet(dataclasses.replace(low.config, context_dim=16))
    with pytest.raises(ValueError, match="context_dim=16"):
        NoiseLevelExperts(high, other, 500)
    with pytest.raises(ValueError, match="boundary must be a timestep > 0"):
        NoiseLevelExperts(high, low, 0)


@torch.no_grad()
def test_bundle_round_trip_and_the_pipeline_calls_each_expert_on_its_steps(tmp_path):
    experts, high, low, bundle = _pair(550)
    save_bundle(dataclasses.replace(bundle, unet=experts), tmp_path / "m")
    loaded = load_bundle(tmp_path / "m")
    assert isinstance(loaded.unet, NoiseLevelExperts) and loaded.unet.boundary == 550
    for a, b in ((loaded.unet.high, high), (loaded.unet.low, low)):
        assert a.config == b.config
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))

    pipe = StableDiffusion(loaded)
    seen = {"high": [], "low": []}
    for name in seen:
        getattr(pipe.unet, name).register_forward_pre_hook(
            lambda m, args, kw, name=name: seen[name].extend(args[1].tolist()), with_kwargs=True
        )
    pipe.generate("a red circle", steps=10, guidance=3.0, seed=0)
    assert seen["high"] and seen["low"]
    assert min(seen["high"]) >= 550 and max(seen["low"]) < 550
    # a single-U-Net bundle saved over the folder leaves no stale expert behind
    save_bundle(bundle, tmp_path / "m")
    assert not (tmp_path / "m" / HIGH_NOISE_FILE).exists()
    assert isinstance(load_bundle(tmp_path / "m").unet, UNet)



def _split_pair(boundary=550):
    """(bundle with ExpertTextEncoders + NoiseLevelExperts(split_context=True), high text encoder): the high
    expert reads its own text encoder, a perturbed copy of the tiny bundle's."""
    experts, high, low, bundle = _pair(boundary)
    high_text = random_weights_(copy.deepcopy(bundle.text_encoder), 11, scale=0.5).eval()
    pair = NoiseLevelExperts(high, low, boundary, split_context=True)
    text = ExpertTextEncoders(bundle.text_encoder, high_text)
    return dataclasses.replace(bundle, unet=pair, text_encoder=text), high_text


@torch.no_grad()
def test_a_high_noise_expert_with_its_own_text_encoder_reads_its_half_of_the_context():
    split, high_text = _split_pair(500)
    pair, text = split.unet, split.text_encoder
    ids = split.tokenizer(["a red circle above a blue square", ""])
    ctx = text(ids).last_hidden_state
    low_ctx, high_ctx = split.text_encoder.low(ids).last_hidden_state, high_text(ids).last_hidden_state
    assert ctx.shape[-1] == 64 == text.config.width == pair.config.context_dim
    torch.testing.assert_close(ctx, torch.cat([low_ctx, high_ctx], -1), rtol=0, atol=0)
    assert (low_ctx - high_ctx).abs().max() > 1e-2  # two encoders: reading the wrong half would show
    x, mask = torch.randn(2, 4, 8, 8), prompt_mask(ids, split.tokenizer.eos_token_id)
    t = torch.tensor([900.0, 100.0])
    out = pair(x, t, ctx, context_mask=mask)
    torch.testing.assert_close(out[:1], pair.high(x[:1], t[:1], high_ctx[:1], context_mask=mask[:1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:], pair.low(x[1:], t[1:], low_ctx[1:]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="context of 64 features, got 32.*ExpertTextEncoders"):
        pair(x, t, low_ctx)
    other = copy.deepcopy(high_text)
    other.config = dataclasses.replace(other.config, eos_token_id=5)
    with pytest.raises(ValueError, match="eos_token_id"):
        ExpertTextEncoders(split.text_encoder.low, other)


@torch.no_grad()
def test_bundle_with_an_expert_text_encoder_round_trips_and_generates(tmp_path):
    split, high_text = _split_pair(550)
    written = save_bundle(split, tmp_path / "m")
    assert tmp_path / "m" / HIGH_NOISE_TEXT_FILE in written
    assert json.loads((tmp_path / "m" / EXPERTS_FILE).read_text()) == {"boundary": 550, "split_context": True}
    loaded = load_bundle(tmp_path / "m")
    assert isinstance(loaded.text_encoder, ExpertTextEncoders) and loaded.unet.split_context
    for a, b in ((loaded.text_encoder.low, split.text_encoder.low), (loaded.text_encoder.high, high_text)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    a = StableDiffusion(split).generate("a red circle", steps=6, guidance=3.0, seed=0, output="latent")
    b = StableDiffusion(loaded).generate("a red circle", steps=6, guidance=3.0, seed=0, output="latent")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the other text encoder changes the picture: the high expert does read its own
    plain = dataclasses.replace(split, unet=NoiseLevelExperts(split.unet.high, split.unet.low, 550),
                                text_encoder=split.text_encoder.low)  # fmt: skip
    assert (StableDiffusion(plain).generate("a red circle", steps=6, guidance=3.0, seed=0, output="latent") - a).abs().max() > 1e-3
    with pytest.raises(ValueError, match="come together"):
        save_bundle(dataclasses.replace(split, text_encoder=split.text_encoder.low), tmp_path / "bad")
    save_bundle(plain, tmp_path / "m")  # saved over: no stale expert text encoder
    assert not (tmp_path / "m" / HIGH_NOISE_TEXT_FILE).exists()
    assert isinstance(load_bundle(tmp_path / "m").text_encoder, type(split.text_encoder.low))
    (tmp_path / "m" / EXPERTS_FILE).write_text(json.dumps({"boundary": 550, "split_context": True}))
    with pytest.raises(FileNotFoundError, match=HIGH_NOISE_TEXT_FILE):
        load_bundle(tmp_path / "m")

def test_diffusers_export_refuses_two_unets(tmp_path, capsys):
    from sfumato.cli import main

    experts, _, _, bundle = _pair()
    with pytest.raises(ValueError, match="two U-Nets"):
        save_diffusers(dataclasses.replace(bundle, unet=experts), tmp_path / "d")
    # from the command line: one line and exit code 2 (convert printed a traceback for bad input before)
    save_bundle(dataclasses.replace(bundle, unet=experts), tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "d"), "--to", "diffusers"]) == 2
    assert "two U-Nets" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_expert_task_trains_only_high_noise_with_the_base_frozen():
    bundle = tiny_bundle(prediction="v")
    base_state = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    config = dataclasses.replace(bundle.unet.config, mask_padding=True)
    task = HighNoiseExpertTask(bundle, config, boundary=600, min_snr_gamma=5.0, min_snr_floor=1.0)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    batch = {"image": images, "caption": ["a red circle at the top"] * 3 + ["a blue square"] * 3,
             "index": torch.arange(6)}  # fmt: skip
    x = task.prepare(batch, BatchRandom(0, 0, batch["index"].tolist()), torch.device("cpu"), step=0)
    assert x["t"].min() >= 600  # every example at the expert's noise levels
    ids = task.text.tokenizer(batch["caption"])
    assert torch.equal(x["context_mask"], prompt_mask(ids, task.text.tokenizer.eos_token_id))
    loss, _ = task.loss(batch, BatchRandom(0, 0, batch["index"].tolist()), 0, task.trainable())
    loss.backward()
    assert all(p.grad is not None for p in task.unet.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in task.low.parameters())
    pair = task.bundle(task.unet)
    assert isinstance(pair.unet, NoiseLevelExperts) and pair.unet.low is task.low and pair.unet.boundary == 600
    assert all(torch.equal(v, base_state[k]) for k, v in task.low.state_dict().items())
    # with its own text encoder: a trained copy of the base's; the base's stays as it was
    base_text = {k: v.clone() for k, v in bundle.text_encoder.state_dict().items()}
    joint = HighNoiseExpertTask(bundle, config, boundary=600, min_snr_gamma=5.0, train_text_encoder=True)
    loss, _ = joint.loss(batch, BatchRandom(0, 0, batch["index"].tolist()), 0, joint.trainable())
    loss.backward()
    trained = joint.joint.text_encoder
    assert trained is not bundle.text_encoder and trained.text_model.embeddings.token_embedding.weight.grad is not None
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    b = joint.bundle(joint.trainable())
    assert isinstance(b.text_encoder, ExpertTextEncoders) and b.unet.split_context
    assert b.text_encoder.high is trained and b.text_encoder.low is joint.text.text_encoder
    assert all(torch.equal(v, base_text[k]) for k, v in b.text_encoder.low.state_dict().items())
    with pytest.raises(ValueError, match="high_noise_share is fixed"):
        HighNoiseExpertTask(bundle, config, boundary=600, high_noise_share=0.5)
    with pytest.raises(ValueError, match="already has a high-noise expert"):
        HighNoiseExpertTask(dataclasses.replace(bundle, unet=pair.unet), config, boundary=600)


def test_expert_initialised_from_the_base_starts_as_its_copy_and_trains_apart_from_it():
    bundle = tiny_bundle(prediction="v")
    base_state = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    config = dataclasses.replace(bundle.unet.config, mask_padding=True)
    fresh = HighNoiseExpertTask(bundle, config, boundary=600)
    task = HighNoiseExpertTask(bundle, config, boundary=600, init_from_base=True)
    state = task.unet.state_dict()
    assert state.keys() == base_state.keys() and task.unet.config.mask_padding
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    assert not all(torch.equal(v, base_state[k]) for k, v in fresh.unet.state_dict().items())
    assert task.unet is not task.low and all(p.requires_grad for p in task.unet.parameters())
    with torch.no_grad():  # a step of training moves the expert, not the frozen base beside it
        for p in task.unet.parameters():
            p.add_(0.01)
    assert all(torch.equal(v, base_state[k]) for k, v in task.low.state_dict().items())
    with pytest.raises(ValueError, match="context_layers=0"):
        HighNoiseExpertTask(bundle, dataclasses.replace(config, context_layers=2), boundary=600, init_from_base=True)
    with pytest.raises(ValueError, match="starts fresh"):
        HighNoiseExpertTask(bundle, config, boundary=600, unet=bundle.unet)


@pytest.mark.parametrize("own_encoder", [False, True], ids=["frozen-encoder", "own-encoder"])
def test_train_expert_stage_writes_a_pair_that_generates(tmp_path, tiny_bundle_path, monkeypatch, own_encoder):
    """The CLI stage; own_encoder: as the shipped recipe runs it (a text encoder of the expert's own, started
    from the base U-Net, relation captions drawn twice); the other variant gives the expert position features
    the base U-Net lacks (ExpertRecipe.position_freqs)."""
    from sfumato.cli import main

    tiny = dataclasses.replace(R.RECIPES["expert"]["tiny"], train_text_encoder=own_encoder,
                               init_from_base=own_encoder, relation_repeat=2 if own_encoder else 1,
                               position_freqs=None if own_encoder else 2)  # fmt: skip
    monkeypatch.setitem(R.RECIPES["expert"], "tiny", tiny)
    out = tmp_path / "expert"
    assert main(["train", "expert", "--preset", "tiny", "--base", str(tiny_bundle_path), "--out", str(out)]) == 0
    pipe = StableDiffusion(load_bundle(out / "final"))
    assert isinstance(pipe.unet, NoiseLevelExperts) and pipe.unet.boundary == R.recipe("expert", "tiny").boundary
    assert pipe.unet.split_context == own_encoder
    assert (pipe.unet.high.config.position_freqs, pipe.unet.low.config.position_freqs) == (0 if own_encoder else 2, 0)
    assert isinstance(pipe.text_encoder, ExpertTextEncoders) == own_encoder
    assert (out / "final" / "text_encoder_high_noise.safetensors").exists() == own_encoder
    assert pipe.generate("a red circle", steps=3, seed=0)[0].size == (32, 32)
    assert main(["train", "expert", "--preset", "tiny", "--base", str(out / "final"), "--out", str(tmp_path / "again")]) == 2
    assert main(["train", "expert", "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2


@torch.no_grad()
def test_context_layers_start_as_identity_and_let_early_tokens_see_later_ones():
    from sfumato.checkpoints.keymaps import unet_to_diffusers
    from sfumato.models.unet import ContextLayer

    bundle = tiny_bundle()
    plain = bundle.unet.eval()
    config = dataclasses.replace(plain.config, context_layers=2, mask_padding=True)
    deep = UNet(config).eval()
    missing, unexpected = deep.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("context_encoder.") for k in missing)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2).bool()
    # new layers pass the context through: the U-Net is the one it was loaded from
    torch.testing.assert_close(deep(x, 300, ctx, context_mask=mask), plain(x, 300, ctx, context_mask=mask))

    layer = random_weights_(ContextLayer(32, 2), 3).eval()
    out = layer(ctx, mask)
    later = ctx.clone()
    later[:, 3] = torch.randn(2, 32)  # a later prompt token moves an earlier token's state (a causal encoder's cannot)
    assert (layer(later, mask) - out)[:, 0].abs().max() > 1e-3
    padding = ctx.clone()
    padding[:, 4:] = 5.0  # masked tokens move nothing that is read
    torch.testing.assert_close(layer(padding, mask)[:, :4], out[:, :4], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="context_layers"):
        unet_to_diffusers(deep.state_dict(), dataclasses.replace(config, mask_padding=False))
    with pytest.raises(ValueError, match="context_layers must be >= 0"):
        dataclasses.replace(config, context_layers=-1)


def test_compile_compiles_each_expert_in_place(monkeypatch):
    """`optimize(compile=True)` on a pair compiles `high` and `low` themselves (not the wrapper, whose choice per
    timestep is a host sync), in place, and the sampling loop runs under inductor's freezing settings."""
    import torch._inductor.config as inductor_config

    experts, high, low, bundle = _pair(550)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((self, kw)))
    pipe = StableDiffusion(dataclasses.replace(bundle, unet=experts), compile=True)
    assert [m for m, _ in compiled] == [high, low] and all(kw == {"dynamic": False} for _, kw in compiled)
    assert pipe.unet is experts
    with pipe._compiler_settings():
        assert inductor_config.freezing and inductor_config.cpp_wrapper
    assert not inductor_config.freezing
