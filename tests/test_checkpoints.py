"""Checkpoint formats: native files and bundles, diffusers folders both ways, SD single files, bad files.

All weights are random and models tiny. The independent references are diffusers itself (its pipeline
loads what we export; its own ldm converters read the single files we build) and transformers.
"""

import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch
import transformers
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import save_file

import sfumato
from sfumato.checkpoints.atomic import replacing, write_text_atomic
from sfumato.checkpoints.bundle import Bundle, ScheduleConfig, load_bundle, save_bundle
from sfumato.checkpoints.clip_keys import to_openai_clip
from sfumato.checkpoints.diffusers_folder import load_diffusers, save_diffusers
from sfumato.checkpoints.keymaps import (
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    unet_config_to_diffusers,
    vae_config_to_diffusers,
)
from sfumato.checkpoints.native import load_model, load_weights, read_metadata, save_model
from sfumato.checkpoints.single_file import load_any, load_single_file
from sfumato.cli import main as cli_main
from sfumato.diffusion.schedules import alphas_cumprod, scaled_linear_betas
from sfumato.models.clip import PRESETS, TEXT_PRESETS, CLIPTextConfig, CLIPTextModel
from sfumato.models.unet import UNet, UNetConfig
from sfumato.models.vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from sfumato.pipelines.metadata import model_hash
from sfumato.text.tokenizer import CLIPTokenizer, train_bpe

TOL = 1e-4
CAPTIONS = ["a photo of a cat", "a painting of a dog riding a horse", "an astronaut on the moon"] * 10


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, norms around 1: a swapped or zeroed tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif p.ndim >= 2:
                p.copy_(0.6 * noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def read_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return train_bpe(CAPTIONS, 600, min_frequency=1)


# ---------------------------------------------------------------------------------------------------
# native files
# ---------------------------------------------------------------------------------------------------

NATIVE = {
    "unet": lambda: UNet(
        UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(2,),
            num_heads=2,
            context_dim=32,
        )
    ),
    "vae": lambda: AutoencoderKL(VAE_PRESETS["tiny"]),
    "clip_text": lambda: CLIPTextModel(TEXT_PRESETS["tiny"]),
    "clip": lambda: __import__("sfumato.models.clip", fromlist=["CLIP"]).CLIP(PRESETS["tiny"]),
}


@pytest.mark.parametrize("kind", sorted(NATIVE))
def test_native_round_trip(kind, tmp_path):
    model = randomize_(NATIVE[kind]())
    path = save_model(model, tmp_path / f"{kind}.safetensors")
    assert sorted(os.listdir(tmp_path)) == [f"{kind}.safetensors"]  # no temp file left behind
    meta = read_metadata(path)
    assert meta["kind"] == kind and json.loads(meta["config"]) == json.loads(json.dumps(asdict(model.config)))
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    same_tensors(model.state_dict(), loaded.state_dict())
    half = load_model(path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_the_same_model_always_saves_to_the_same_bytes(tmp_path):
    """safetensors orders the metadata keys by a hash map's randomly seeded order, so two saves of one model
    could differ in bytes and in their model hash ("Model hash" in PNG parameters, eval reports); the saved
    header keeps its keys sorted, and the file still reads back."""
    model = randomize_(NATIVE["vae"]())
    extra = {f"key{i}": str(i) for i in range(6)}  # more keys: more orders a hash map could pick
    blobs = set()
    for i in range(8):
        path = save_model(model, tmp_path / f"{i}.safetensors", extra=extra)
        blobs.add(path.read_bytes())
    assert len(blobs) == 1
    (blob,) = blobs
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    keys = list(header["__metadata__"])
    assert list(header)[0] == "__metadata__" and keys == sorted(keys)
    config = json.dumps(asdict(model.config))
    assert read_metadata(path) == {**extra, "sfumato": sfumato.__version__, "kind": "vae", "config": config}
    same_tensors(model.state_dict(), load_model(tmp_path / "7.safetensors").state_dict())
    assert model_hash(tmp_path / "0.safetensors") == model_hash(tmp_path / "7.safetensors")


def test_saved_files_get_the_usual_permissions_and_a_failed_write_leaves_nothing(tmp_path):
    """Files are created under the umask (0o644 under umask 0o022), not mkstemp's private 0o600, so a
    bundle one user writes stays readable to the others; a write that raises leaves no file at all."""
    old = os.umask(0o022)
    try:
        path = save_model(NATIVE["vae"](), tmp_path / "vae.safetensors")
        write_text_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(RuntimeError, match="disk full"), replacing(tmp_path / "b.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "vae.safetensors"]


def test_load_weights_assigns_the_given_tensors():
    """assign=True: the model's parameters are the file's tensors, not copies into a second allocation."""
    model = NATIVE["unet"]()
    with torch.device("meta"):
        empty = UNet(model.config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(empty, state, "test")
    for k, p in empty.state_dict().items():
        assert p.data_ptr() == state[k].data_ptr(), k


def test_load_model_peak_memory_does_not_double(tmp_path):
    """A ~85 MB U-Net: loading it grows the peak RSS by about one copy of the weights, not two."""
    model = UNet(
        UNetConfig(
            model_channels=128,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(2,),
            num_heads=4,
            context_dim=64,
        )
    )
    path = save_model(model, tmp_path / "unet.safetensors")
    size = path.stat().st_size
    del model
    grown, _ = run_measured(
        f"m = n.load_model({str(path)!r})\n{TOUCH}", "import sfumato.checkpoints.native as n"
    )
    print(f"file {size / 2**20:.1f} MiB, peak RSS grew {grown / 2**20:.1f} MiB")
    assert size > 80 * 2**20
    assert grown < 1.5 * size


# safetensors maps the file and pages tensors in on first use: read every weight so that what is measured
# is a model ready to run (one copy of the weights resident), not a lazy mapping.
TOUCH = "assert all(torch.isfinite(p).all() for p in m.parameters())"


def run_measured(statement: str, setup: str) -> tuple[int, float]:
    """Run `statement` in a fresh process: (its peak RSS above the RSS just before it in bytes, seconds).

    Writing 5 to /proc/self/clear_refs resets the peak-RSS mark (VmHWM) to the current RSS (Linux), so the
    peak reached while importing torch does not hide the statement's.
    """
    code = (
        f"import time, torch\n{setup}\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024\n"
        "before = hwm()\n"
        f"t = time.perf_counter()\n{statement}\nt = time.perf_counter() - t\n"
        "print(hwm() - before, t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    grown, seconds = out.stdout.split()[-2:]
    return int(grown), float(seconds)


def test_native_errors(tmp_path):
    model = NATIVE["vae"]()
    path = save_model(model, tmp_path / "vae.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        load_model(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"plain\.safetensors.*not a sfumato checkpoint"):
        load_model(tmp_path / "plain.safetensors")
    sd = read_all(path)
    meta = read_metadata(path)
    save_file({**sd, "encoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors", meta)
    with pytest.raises(ValueError, match=r"extra\.safetensors.*'encoder\.extra\.weight'"):
        load_model(tmp_path / "extra.safetensors")
    save_file({k: v for k, v in sd.items() if k != "quant_conv.bias"}, tmp_path / "miss.safetensors", meta)
    with pytest.raises(ValueError, match=r"miss\.safetensors.*'quant_conv\.bias'.*missing"):
        load_model(tmp_path / "miss.safetensors")
    save_file({**sd, "quant_conv.bias": torch.zeros(3)}, tmp_path / "shape.safetensors", meta)
    with pytest.raises(ValueError, match=r"shape\.safetensors.*'quant_conv\.bias'.*shape \(3,\)"):
        load_model(tmp_path / "shape.safetensors")


# ---------------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------------


def diffusers_pipeline(tok: CLIPTokenizer, tmp_path) -> StableDiffusionPipeline:
    """A tiny SD-1-like pipeline with random weights; its tokenizer read by transformers from our files."""
    unet = UNet2DConditionModel(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
        sample_size=8,
    )
    vae = DAutoencoderKL(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=16,
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
    tok.save(tmp_path / "vocab")
    hf_tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "vocab")
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    for i, m in enumerate((unet, vae, text)):
        randomize_(m, i)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=hf_tok,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


COMPONENT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
}


def test_diffusers_round_trip_and_pipeline_parity(tok, tmp_path):
    pipe = diffusers_pipeline(tok, tmp_path)
    pipe.save_pretrained(tmp_path / "src")  # transformers 5 writes tokenizer.json only
    bundle = load_diffusers(tmp_path / "src")
    assert bundle.schedule == ScheduleConfig(prediction="v", image_size=16)  # sample_size 8 x VAE f=2
    save_bundle(bundle, tmp_path / "bundle")
    bundle = load_bundle(tmp_path / "bundle")
    save_diffusers(bundle, tmp_path / "out")  # writes vocab.json + merges.txt
    centred = load_bundle(tmp_path / "bundle")
    z = centred.vae.config.z_channels
    centred.vae.config = replace(centred.vae.config, latents_mean=(0.0,) * z, latents_std=(1.0,) * z)
    with pytest.raises(ValueError, match="does not read"):  # diffusers' SD pipeline would decode it wrong
        save_diffusers(centred, tmp_path / "centred")

    # identical tensors: diffusers -> bundle -> diffusers
    for file in COMPONENT_FILES.values():
        same_tensors(read_all(tmp_path / "src" / file), read_all(tmp_path / "out" / file))
    src_text = {
        k.removeprefix("text_model."): v
        for k, v in read_all(tmp_path / "src/text_encoder/model.safetensors").items()
    }
    out_text = {
        k.removeprefix("text_model."): v
        for k, v in read_all(tmp_path / "out/text_encoder/model.safetensors").items()
    }
    same_tensors(src_text, out_text)

    # diffusers runs the export, and computes what we compute
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        same_tensors(getattr(pipe, part).state_dict(), getattr(ref, part).state_dict())
    assert ref.scheduler.config.prediction_type == "v_prediction" and not ref.scheduler.config.clip_sample
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    ids = bundle.tokenizer(prompts)
    ref_ids = ref.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    img = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        ctx, ref_ctx = bundle.text_encoder(ids).last_hidden_state, ref.text_encoder(ids)[0]
        errors = {
            "text_encoder": (ctx - ref_ctx).abs().max().item(),
            "unet": (bundle.unet(x, t, ctx) - ref.unet(x, t, ref_ctx).sample).abs().max().item(),
            "vae_decode": (bundle.vae.decode(x) - ref.vae.decode(x).sample).abs().max().item(),
            "vae_encode": (bundle.vae.encode(img).mean - ref.vae.encode(img).latent_dist.mean)
            .abs()
            .max()
            .item(),
        }
    print("diffusers parity (max abs error):", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOL, errors


def test_diffusers_bin_weights_and_errors(tok, tmp_path):
    pipe = diffusers_pipeline(tok, tmp_path)
    pipe.save_pretrained(tmp_path / "src", safe_serialization=False)  # pickled .bin weights
    assert (tmp_path / "src/unet/diffusion_pytorch_model.bin").is_file()
    bundle = load_diffusers(tmp_path / "src")
    with torch.no_grad():
        ids = bundle.tokenizer(["a cat"])
        err = (bundle.text_encoder(ids).last_hidden_state - pipe.text_encoder(ids)[0]).abs().max()
    assert err <= TOL

    pipe.save_pretrained(tmp_path / "bad")
    f = tmp_path / "bad/unet/diffusion_pytorch_model.safetensors"
    sd = read_all(f)
    save_file({**sd, "down_blocks.0.foo.weight": torch.zeros(1)}, f)
    with pytest.raises(ValueError, match=r"unet.*'down_blocks\.0\.foo\.weight'"):
        load_diffusers(tmp_path / "bad")
    save_file({k: v for k, v in sd.items() if k != "conv_in.bias"}, f)
    with pytest.raises(ValueError, match=r"unet.*missing.*'conv_in\.bias'"):
        load_diffusers(tmp_path / "bad")
    save_file({**sd, "conv_in.bias": torch.zeros(7)}, f)
    with pytest.raises(ValueError, match=r"unet.*'conv_in\.bias'.*shape \(7,\)"):
        load_diffusers(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------------
# SD single files
# ---------------------------------------------------------------------------------------------------


def tiny_sd1(tok):
    """Our tiny models with SD 1.x's context width 768 (the head count is inferred from it)."""
    unet = UNet(
        UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1,),
            num_heads=8,
            context_dim=768,
        )
    )
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tok.vocab_size,
            width=768,
            layers=1,
            heads=12,
            mlp_width=128,
            eos_token_id=tok.eos_token_id,
        )
    )
    return Bundle(randomize_(unet, 1), randomize_(vae, 2), randomize_(text, 3), tok)


def tiny_sd2(tok):
    """SD 2.x layout: Linear projections, 64-channel heads, a 3-layer open_clip (gelu) text tower."""
    unet = UNet(
        UNetConfig(
            model_channels=64,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(2, 1),
            num_heads=None,
            head_dim=64,
            context_dim=1024,
            use_linear_proj=True,
        )
    )
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tok.vocab_size,
            width=1024,
            layers=3,
            heads=16,
            mlp_width=64,
            act="gelu",
            eos_token_id=tok.eos_token_id,
            projection_dim=1024,
        )
    )
    return Bundle(randomize_(unet, 4), randomize_(vae, 5), randomize_(text, 6), tok)


def schedule_buffers() -> dict[str, torch.Tensor]:
    betas = scaled_linear_betas(1000)
    return {
        "betas": betas.float(),
        "alphas_cumprod": alphas_cumprod(betas).float(),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000),
    }


def sd1_state_dict(b: Bundle) -> dict[str, torch.Tensor]:
    return {
        **{LDM_UNET_PREFIX + k: v for k, v in b.unet.state_dict().items()},
        **{LDM_VAE_PREFIX + k: v for k, v in b.vae.state_dict().items()},
        **{"cond_stage_model.transformer." + k: v for k, v in b.text_encoder.state_dict().items()},
        # transformers < 4.31 saved this buffer; SD 1.x files carry it
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        **schedule_buffers(),
    }


def sd2_state_dict(b: Bundle) -> dict[str, torch.Tensor]:
    return {
        **{LDM_UNET_PREFIX + k: v for k, v in b.unet.state_dict().items()},
        **{LDM_VAE_PREFIX + k: v for k, v in b.vae.state_dict().items()},
        **to_openai_clip(b.text_encoder.state_dict(), prefix="cond_stage_model.model."),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6),
        **schedule_buffers(),
    }


def test_sd1_single_file_loads_back_equal(tok, tmp_path):
    ours = tiny_sd1(tok)
    save_file({k: v.contiguous() for k, v in sd1_state_dict(ours).items()}, tmp_path / "sd1.safetensors")
    b = load_any(tmp_path / "sd1.safetensors", prediction="eps", tokenizer=tok)
    assert isinstance(b, Bundle) and b.schedule == ScheduleConfig(image_size=512)
    for part in ("unet", "vae", "text_encoder"):
        assert getattr(b, part).config == getattr(ours, part).config
        same_tensors(getattr(ours, part).state_dict(), getattr(b, part).state_dict())
    # .ckpt: the same dict pickled (a Lightning-style {"state_dict": ...} with a step counter)
    torch.save({"state_dict": sd1_state_dict(ours), "global_step": 7}, tmp_path / "sd1.ckpt")
    b = load_any(tmp_path / "sd1.ckpt", prediction="v", tokenizer=tok)
    assert b.schedule.prediction == "v"
    same_tensors(ours.unet.state_dict(), b.unet.state_dict())

    # cross-check with diffusers' own ldm converters: same diffusers tensors as our export
    save_diffusers(b, tmp_path / "out")
    sd = sd1_state_dict(ours)
    ref_unet = convert_ldm_unet_checkpoint(sd, unet_config_to_diffusers(ours.unet.config))
    ref_vae = convert_ldm_vae_checkpoint(sd, vae_config_to_diffusers(ours.vae.config))
    same_tensors(ref_unet, read_all(tmp_path / "out" / COMPONENT_FILES["unet"]))
    out_vae = read_all(tmp_path / "out" / COMPONENT_FILES["vae"])
    same_tensors({k: v.reshape(out_vae[k].shape) for k, v in ref_vae.items()}, out_vae)


def test_sd2_single_file_keeps_the_penultimate_layer(tok, tmp_path):
    ours = tiny_sd2(tok)
    save_file({k: v.contiguous() for k, v in sd2_state_dict(ours).items()}, tmp_path / "sd2.safetensors")
    b = load_any(
        tmp_path / "sd2.safetensors",
        prediction="v",
        tokenizer=CLIPTokenizer(tok.vocab, tok.merges, pad_token="!"),
    )
    assert b.schedule.prediction == "v" and b.tokenizer.pad_token_id == b.tokenizer.vocab["!"]
    same_tensors(ours.unet.state_dict(), b.unet.state_dict())
    same_tensors(ours.vae.state_dict(), b.vae.state_dict())
    assert b.text_encoder.config.layers == 2 and b.text_encoder.text_projection is None
    ids = tok(["a photo of a cat", "an astronaut"])
    with torch.no_grad():  # 2 layers read at the last == 3 layers read at skip=1 (SD 2.x conditioning)
        err = (
            (b.text_encoder(ids).last_hidden_state - ours.text_encoder(ids, skip=1).last_hidden_state)
            .abs()
            .max()
        )
    assert err <= 1e-6
    # diffusers' open_clip converter reads the same file to the same (23-of-24 style) text encoder
    hf_text = SimpleNamespace(config=SimpleNamespace(hidden_size=1024))  # the converter reads only this
    ref = convert_open_clip_checkpoint(hf_text, sd2_state_dict(ours))
    ref_sd = {k.removeprefix("text_model."): v for k, v in ref.items()}
    ours_sd = {k.removeprefix("text_model."): v for k, v in b.text_encoder.state_dict().items()}
    same_tensors({k: v for k, v in ref_sd.items() if k in ours_sd}, ours_sd)


def test_single_file_errors(tok, tmp_path):
    ours = tiny_sd1(tok)
    good = sd1_state_dict(ours)

    def check(sd, pattern, name="x.safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / name)
        with pytest.raises(ValueError, match=pattern):
            load_single_file(tmp_path / name, tokenizer=tok)

    check({k: v for k, v in ours.vae.state_dict().items()}, r"x\.safetensors.*not a Stable Diffusion.*VAE")
    check({"foo.weight": torch.zeros(2), "bar": torch.zeros(1)}, r"not a Stable Diffusion.*'bar'")
    check(good | {"cond_stage_model.extra": torch.zeros(1)}, r"unknown key 'cond_stage_model\.extra'")
    check(good | {LDM_UNET_PREFIX + "foo.weight": torch.zeros(1)}, r"U-Net.*'foo\.weight'.*not a parameter")
    missing = LDM_UNET_PREFIX + "out.0.bias"
    check({k: v for k, v in good.items() if k != missing}, r"U-Net.*'out\.0\.bias'.*missing")
    check(
        good | {LDM_VAE_PREFIX + "quant_conv.bias": torch.zeros(3)}, r"VAE.*'quant_conv\.bias'.*shape \(3,\)"
    )
    check(good | {"alphas_cumprod": torch.linspace(1, 0.1, 1000)}, r"alphas_cumprod.*scaled-linear")
    # the shipped 49,408-token vocabulary does not fit a 600-token text encoder: say so
    save_file({k: v.contiguous() for k, v in good.items()}, tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match=r"\d+ token embeddings.*49408 tokens.*tokenizer="):
        load_single_file(tmp_path / "v.safetensors")


class _Payload:
    """Unpickling this would run code (create a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# the hand-written file is a raw protocol-4 pickle, which torch's weights-only unpickler warns about before refusing
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
def test_pickle_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _Payload(str(marker))}}, f)
    torch.save({"state_dict": {"a": _Payload(str(marker))}}, tmp_path / "evil2.ckpt")
    for name in ("evil.ckpt", "evil2.ckpt"):
        with pytest.raises(ValueError, match=rf"{name}.*more than plain tensors"):
            load_any(tmp_path / name)
    assert not marker.exists()
    (tmp_path / "trunc.ckpt").write_bytes((tmp_path / "evil2.ckpt").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"trunc\.ckpt"):
        load_any(tmp_path / "trunc.ckpt")


# ---------------------------------------------------------------------------------------------------
# CLIP files and the command line
# ---------------------------------------------------------------------------------------------------


def test_clip_folders_and_state_dicts(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            eos_token_id=99,
            bos_token_id=98,
        ),
        vision_config=dict(
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )
    ref = randomize_(transformers.CLIPModel(cfg))
    ref.save_pretrained(tmp_path / "hf")
    ours = load_any(tmp_path / "hf")
    ids = torch.tensor([[98, 5, 7, 99, 99, 99], [98, 3, 99, 99, 99, 99]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels)
        err = (ours(ids, pixels)[0] - out.logits_per_image).abs().max()
    assert err <= TOL
    # the same weights as an OpenAI-layout state dict file
    save_file(to_openai_clip(ours.state_dict()), tmp_path / "openai.safetensors")
    again = load_any(tmp_path / "openai.safetensors")
    same_tensors(ours.state_dict(), again.state_dict())


def test_cli_convert(tok, tmp_path, capsys):
    pipe = diffusers_pipeline(tok, tmp_path)
    pipe.save_pretrained(tmp_path / "src")
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "b"), "--prediction", "eps"]) == 0
    assert "unet.safetensors" in capsys.readouterr().out
    assert load_bundle(tmp_path / "b").schedule.prediction == "eps"
    assert cli_main(["convert", str(tmp_path / "b"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert "model_index.json" in capsys.readouterr().out
    same_tensors(
        read_all(tmp_path / "src" / COMPONENT_FILES["unet"]),
        read_all(tmp_path / "d" / COMPONENT_FILES["unet"]),
    )
    save_model(NATIVE["vae"](), tmp_path / "vae.safetensors")
    with pytest.raises(SystemExit, match="not a text-to-image bundle"):
        cli_main(["convert", str(tmp_path / "vae.safetensors"), str(tmp_path / "x"), "--to", "diffusers"])


# ---------------------------------------------------------------------------------------------------
# full size
# ---------------------------------------------------------------------------------------------------

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}  # fmt: skip


@pytest.mark.slow
def test_full_size_sd15_unet_from_diffusers_folder(tmp_path):
    ref = UNet2DConditionModel.from_config({k: v for k, v in SD15_UNET.items() if k != "_class_name"})
    ref.save_pretrained(tmp_path / "unet")
    n = sum(p.numel() for p in ref.parameters())
    del ref
    setup = "from sfumato.checkpoints.diffusers_folder import load_diffusers_unet"
    grown, seconds = run_measured(
        f"m = load_diffusers_unet({str(tmp_path / 'unet')!r})\n"
        f"{TOUCH}\n"
        "assert not any(p.is_meta for p in m.parameters()) and sum(p.numel() for p in m.parameters()) == "
        f"{n}",
        setup,
    )
    size = (tmp_path / "unet/diffusion_pytorch_model.safetensors").stat().st_size
    print(
        f"SD 1.5 U-Net: {n:,} parameters, file {size / 2**30:.2f} GiB; load + read every weight {seconds:.1f} s; "
        f"peak RSS grew {grown / 2**30:.2f} GiB"
    )
    assert n == 859_520_964
    assert grown < 1.6 * size


def test_loading_a_bundle_skips_random_init_and_imports_no_compiler(tiny_bundle_path):
    """Models are built on `meta` without their random initialisers (on meta, `normal_` imports torch._dynamo,
    1.5 s of a fresh process's load); the loaded weights are the file's, and a CPU tensor filled inside the
    context is still filled."""
    code = (
        "import sys, torch\n"
        "from sfumato.checkpoints.bundle import load_bundle\n"
        "from sfumato.checkpoints.native import on_meta\n"
        f"b = load_bundle({str(tiny_bundle_path)!r})\n"
        "assert 'torch._dynamo' not in sys.modules, 'loading imported torch._dynamo'\n"
        "with on_meta():\n"
        "    cpu = torch.nn.init.normal_(torch.zeros(1000, device='cpu'))\n"
        "assert cpu.std() > 0.5, 'a CPU tensor was left unfilled'\n"
        "print(b.unet.input_blocks[0][0].weight.detach().abs().sum().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = load_bundle(tiny_bundle_path).unet.input_blocks[0][0].weight.detach().abs().sum().item()
    assert float(out.stdout.strip()) == pytest.approx(ours)
