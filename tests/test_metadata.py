"""Generation parameters in PNGs, AUTOMATIC1111 style (pipelines/metadata.py).

The webui strings below are written by hand in the shape the webui produces (versions 1.0 to 1.9), with
the fields we expect read off them by eye.
"""

import hashlib

import numpy as np
import pytest
from PIL import Image

from sfumato.pipelines.metadata import (
    SAMPLER_NAMES,
    format_parameters,
    model_hash,
    parse_parameters,
    read_parameters,
    save_png,
)

BASE = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "",
    "steps": 20,
    "sampler": "dpmpp_2m",
    "karras": True,
    "guidance": 7.5,
    "seed": 1234,
    "width": 512,
    "height": 768,
    "clip_skip": 0,
    "extra": {},
}


def test_format_matches_the_webui_layout():
    params = {
        **BASE,
        "prompt": "a lighthouse at dusk,\noil painting",
        "negative_prompt": "blurry",
        "model_hash": "1a2b3c4d5e",
        "model": "my-model",
        "clip_skip": 1,
        "strength": 0.6,
    }
    assert format_parameters(params) == (
        "a lighthouse at dusk,\noil painting\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, Size: 512x768, "
        "Model hash: 1a2b3c4d5e, Model: my-model, Clip skip: 2, Denoising strength: 0.6"
    )


def test_empty_negative_prompt_and_zero_clip_skip_are_left_out():
    text = format_parameters(BASE)
    assert text == (
        "a lighthouse at dusk\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, Size: 512x768"
    )
    assert parse_parameters(text) == BASE


@pytest.mark.parametrize(
    "prompt, negative",
    [
        ("line one,\nline two, with commas", "neg one\nneg two"),
        ('she said "hello", then: left', 'no "quotes", please'),
        ("a sign reading Negative prompt: none, in red", "Negative prompt: twice\nNegative prompt: again"),
        ("café ☕, 東京の夜", "ugly ✗"),
        ("", "only a negative"),
        ("", ""),
        ("trailing newline\n", "  leading spaces kept"),
        ("\n\nblank lines\n\n", ""),
        ("Steps: 5, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 8x8", "Steps: 9, Seed: 2, Size: 1x1"),
        ("windows\r\nline ends", ""),
    ],
)
def test_hard_prompts_round_trip(prompt, negative):
    params = {**BASE, "prompt": prompt, "negative_prompt": negative}
    assert parse_parameters(format_parameters(params)) == params


@pytest.mark.parametrize("value", [7.5, 0.35, 1e-3, 1e-7, 0.1 + 0.2, 12.0, 1 / 3, 123456.789])
def test_floats_round_trip_exactly(value):
    params = {**BASE, "guidance": value, "strength": value, "eta": value}
    text = format_parameters(params)
    out = parse_parameters(text)
    assert out["guidance"] == value and out["strength"] == value and out["eta"] == value
    assert out == params


def test_float_text_has_no_noise():
    text = format_parameters({**BASE, "guidance": 7.5, "strength": 0.35, "eta": 1e-3})
    assert "CFG scale: 7.5," in text and "Denoising strength: 0.35," in text and text.endswith("Eta: 0.001")
    assert "CFG scale: 7," in format_parameters({**BASE, "guidance": 7})
    assert "CFG scale: 7.5," in format_parameters({**BASE, "guidance": np.float64(7.5)})


def test_all_fields_and_awkward_values_round_trip():
    params = {
        **BASE,
        "model_hash": "6ce0161689",
        "model": 'my model, v2: "final"',
        "clip_skip": 1,
        "strength": 0.75,
        "eta": 0.0,
        "extra": {
            "Hires upscale": "2",
            "Lora hashes": "detail: 1a2b, style: 3c4d",
            "Note": "",
            "Padded": "  spaces  ",
            "Quoted": '"already quoted"',
            "Version": "v1.6.0",
        },
    }
    text = format_parameters(params)
    assert 'Model: "my model, v2: \\"final\\""' in text and 'Lora hashes: "detail: 1a2b, style: 3c4d"' in text
    assert parse_parameters(text) == params


@pytest.mark.parametrize("key", sorted(SAMPLER_NAMES))
def test_every_sampler_round_trips(key):
    sampler, karras = key
    params = {**BASE, "sampler": sampler, "karras": karras}
    text = format_parameters(params)
    assert f"Sampler: {SAMPLER_NAMES[key]}," in text
    assert parse_parameters(text) == params


def test_clip_skip_is_shifted_by_one():
    assert "Clip skip: 2" in format_parameters({**BASE, "clip_skip": 1})
    assert "Clip skip" not in format_parameters({**BASE, "clip_skip": 0})
    assert parse_parameters(format_parameters({**BASE, "clip_skip": 3}))["clip_skip"] == 3


def test_format_refusals():
    with pytest.raises(ValueError, match="starts with 'Negative prompt:'"):
        format_parameters({**BASE, "prompt": "fine\nNegative prompt: not fine"})
    with pytest.raises(ValueError, match="'scheduler'.*extra"):
        format_parameters({**BASE, "scheduler": "karras"})
    with pytest.raises(ValueError, match="lack \\['seed'\\]"):
        format_parameters({k: v for k, v in BASE.items() if k != "seed"})
    with pytest.raises(ValueError, match="'ddim' with karras=True"):
        format_parameters({**BASE, "sampler": "ddim", "karras": True})
    with pytest.raises(ValueError, match="typed fields"):
        format_parameters({**BASE, "extra": {"Seed": "3"}})
    with pytest.raises(ValueError, match="set karras instead"):
        format_parameters({**BASE, "karras": False, "extra": {"Schedule type": "Karras"}})
    with pytest.raises(ValueError, match="cannot be written"):
        format_parameters({**BASE, "extra": {"a,b": "3"}})
    with pytest.raises(TypeError, match="steps"):
        format_parameters({**BASE, "steps": 20.0})
    with pytest.raises(ValueError, match="finite"):
        format_parameters({**BASE, "guidance": float("nan")})


# --- the webui's own strings --------------------------------------------------------------------------

WEBUI_TXT2IMG_HIRES = (
    "masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer\n"
    "<lora:add_detail:0.5>\n"
    "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3141592653, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0'
)

WEBUI_SCHEDULE_TYPE = (
    "a watercolor painting of a lighthouse at dusk, soft light\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 42, Size: 768x512, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.9.4"
)

WEBUI_IMG2IMG_OLD = (
    "portrait of an old fisherman, detailed face\n"
    "Negative prompt: blurry\n"
    "Steps: 50, Sampler: Euler a, CFG scale: 12.0, Seed: 1234, Face restoration: CodeFormer, "
    "Size: 512x512, Model hash: 7460a6fa, Denoising strength: 0.75, Eta: 0.67, ENSD: 31337, Mask blur: 4"
)


def test_parse_webui_hires_txt2img():
    assert parse_parameters(WEBUI_TXT2IMG_HIRES) == {
        "prompt": "masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer\n<lora:add_detail:0.5>",
        "negative_prompt": "lowres, bad anatomy, (worst quality:1.4)",
        "steps": 28,
        "sampler": "dpmpp_2m",
        "karras": True,
        "guidance": 7.0,
        "seed": 3141592653,
        "width": 512,
        "height": 768,
        "model_hash": "6ce0161689",
        "model": "v1-5-pruned-emaonly",
        "strength": 0.45,
        "clip_skip": 1,
        "extra": {
            "Hires upscale": "2",
            "Hires upscaler": "Latent",
            "Lora hashes": "add_detail: 7c6bad76eb54",
            "Version": "v1.6.0",
        },
    }


def test_parse_webui_schedule_type_karras():
    p = parse_parameters(WEBUI_SCHEDULE_TYPE)
    assert (p["sampler"], p["karras"], p["guidance"], p["width"], p["height"]) == (
        "dpmpp_2m",
        True,
        5.5,
        768,
        512,
    )
    assert p["negative_prompt"] == "" and p["extra"] == {"Version": "v1.9.4"}
    assert p["prompt"] == "a watercolor painting of a lighthouse at dusk, soft light"


def test_parse_webui_old_img2img():
    p = parse_parameters(WEBUI_IMG2IMG_OLD)
    assert (p["sampler"], p["karras"], p["steps"], p["seed"]) == ("euler_ancestral", False, 50, 1234)
    assert (p["guidance"], p["strength"], p["eta"], p["model_hash"]) == (12.0, 0.75, 0.67, "7460a6fa")
    assert p["clip_skip"] == 0 and "model" not in p
    assert p["extra"] == {"Face restoration": "CodeFormer", "ENSD": "31337", "Mask blur": "4"}


def test_webui_strings_survive_format_after_parse():
    for text in (WEBUI_TXT2IMG_HIRES, WEBUI_SCHEDULE_TYPE, WEBUI_IMG2IMG_OLD):
        p = parse_parameters(text)
        assert parse_parameters(format_parameters(p)) == p


def test_parse_unknown_sampler_lists_known_ones():
    text = WEBUI_IMG2IMG_OLD.replace("Euler a", "UniPC")
    with pytest.raises(ValueError, match="'UniPC'.*DPM\\+\\+ 2M Karras"):
        parse_parameters(text)


def test_parse_text_without_settings_is_all_prompt():
    assert parse_parameters("portrait: soft light, 85mm") == {
        "prompt": "portrait: soft light, 85mm",
        "negative_prompt": "",
        "clip_skip": 0,
        "extra": {},
    }
    p = parse_parameters("a cat\nNegative prompt: dog\n")
    assert (p["prompt"], p["negative_prompt"]) == ("a cat", "dog")


def test_parse_bad_values_name_the_key():
    with pytest.raises(ValueError, match="Steps: expected an integer, got 'many'"):
        parse_parameters("x\nSteps: many, Sampler: Euler, Seed: 1")
    with pytest.raises(ValueError, match="Size"):
        parse_parameters("x\nSteps: 2, Sampler: Euler, Size: 512")


# --- PNG files ----------------------------------------------------------------------------------------


def _image():
    return Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))


def test_save_png_and_read_back_unicode(tmp_path):
    params = {**BASE, "prompt": "café ☕, 東京", "negative_prompt": "naïve"}
    path = save_png(_image(), tmp_path / "out" / "deep" / "img.png", params)
    assert path == tmp_path / "out" / "deep" / "img.png"
    assert b"iTXt" in path.read_bytes()  # not latin-1: PIL stores UTF-8 in an iTXt chunk
    assert read_parameters(path) == params
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), np.asarray(_image()))
        assert read_parameters(im) == params
    assert sorted(p.name for p in path.parent.iterdir()) == ["img.png"]  # no temporary file left behind


def test_save_png_latin1_uses_text_chunk_and_overwrites(tmp_path):
    path = tmp_path / "img.png"
    save_png(_image(), path, {**BASE, "seed": 1})
    save_png(_image(), path, {**BASE, "seed": 2})
    data = path.read_bytes()
    assert b"tEXtparameters\x00" in data
    assert read_parameters(path)["seed"] == 2
    with pytest.raises(ValueError, match="\\.png"):
        save_png(_image(), tmp_path / "img.jpg", BASE)


def test_read_parameters_missing_chunk_names_the_file(tmp_path):
    path = save_png(_image(), tmp_path / "plain.png", None)
    with pytest.raises(ValueError, match="plain.png has no 'parameters'"):
        read_parameters(path)
    text_file = tmp_path / "notes.png"
    text_file.write_text("hello")
    with pytest.raises(ValueError, match="notes.png"):
        read_parameters(text_file)


def test_model_hash_of_a_file(tmp_path):
    data = np.random.default_rng(0).bytes(int(2.5 * 2**20))  # spans several 1 MiB reads
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    assert len(model_hash(path)) == 10


def test_model_hash_of_a_folder(tmp_path):
    files = {
        "vae/diffusion_pytorch_model.safetensors": b"vae weights",
        "unet/diffusion_pytorch_model.safetensors": b"unet weights",
        "text_encoder/model.safetensors": b"clip weights",
        "text_encoder/pytorch_model.bin": b"clip pickle",
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "model_index.json").write_text("{}")  # not weights: ignored
    (tmp_path / "unet" / "config.json").write_text("{}")
    expected = hashlib.sha256(b"clip weights" + b"clip pickle" + b"unet weights" + b"vae weights")
    assert model_hash(tmp_path) == expected.hexdigest()[:10]
    (tmp_path / "unet" / "config.json").write_text('{"changed": true}')
    assert model_hash(tmp_path) == expected.hexdigest()[:10]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no weight files"):
        model_hash(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        model_hash(tmp_path / "nope")
