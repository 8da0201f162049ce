"""The generation commands of the `sfumato` CLI, run in-process on the tiny random-weight bundles.

What matters most: a PNG written by `sfumato generate` regenerates to the same pixels with `--from-png`,
options given on the command line win over the PNG's, and bad input is a one-line error with exit code 2.
"""

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.checkpoints.native import save_model
from sfumato.cli import main
from sfumato.models.clip import CLIP, PRESETS
from sfumato.pipelines.metadata import read_parameters, save_png
from sfumato.pipelines.stable_diffusion import StableDiffusion

STEPS = "4"  # few steps: the tests check bookkeeping, not image quality


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `sfumato ARGV`; argparse's own errors exit through SystemExit."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one level in a few pixels: what the last float bits of CPU kernels can move."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return diff.max() <= 1 and diff.mean() < 0.01


def written(out: str) -> list[str]:
    return out.split()


def defaults(method) -> dict:
    params = inspect.signature(method).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty}


def test_generate_writes_pngs_whose_parameters_are_what_was_asked(capsys, tiny_bundle_path, tmp_path):
    rc, out, err = run(
        capsys, "generate", "A red fox, in the snow!", "--model", tiny_bundle_path, "--steps", STEPS,
        "--seed", 7, "--batch", 2, "--guidance", 5, "--negative", "blurry", "--sampler", "euler",
        "--no-karras", "--clip-skip", 1, "--width", 32, "--height", 40, "--out", tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    paths = written(out)
    assert [p.rsplit("/", 1)[-1] for p in paths] == [
        "7-a-red-fox-in-the-snow.png",
        "8-a-red-fox-in-the-snow.png",
    ]
    for seed, path in zip((7, 8), paths):
        params = read_parameters(path)
        asked = {
            "prompt": "A red fox, in the snow!", "negative_prompt": "blurry", "steps": 4, "sampler": "euler",
            "karras": False, "guidance": 5.0, "seed": seed, "width": 32, "height": 40, "clip_skip": 1,
        }  # fmt: skip
        assert {k: params[k] for k in asked} == asked
        assert params["model_hash"] and params["model"] == "bundle"
        assert Image.open(path).size == (32, 40)


def test_generate_defaults_are_the_python_apis(capsys, tiny_bundle_path, tmp_path):
    rc, out, err = run(
        capsys, "generate", "a cat", "--model", tiny_bundle_path, "--seed", 1, "--out", tmp_path
    )
    assert rc == 0, err
    (path,) = written(out)
    api = sfumato.load(tiny_bundle_path).generate("a cat", seed=1)[0]
    with Image.open(path) as im:
        assert im.text["parameters"] == api.info["parameters"]
    assert np.array_equal(pixels(path), np.asarray(api))


def test_outputs_are_never_overwritten(capsys, tiny_bundle_path, tmp_path):
    argv = ("generate", "a cat", "--model", tiny_bundle_path, "--steps", 2, "--seed", 3, "--out", tmp_path)
    first = written(run(capsys, *argv)[1])[0]
    before = pixels(first)
    second = written(run(capsys, *argv, "--steps", 3)[1])[0]
    assert second != first and second.endswith("3-a-cat-2.png")
    assert np.array_equal(pixels(first), before)
    file_out = tmp_path / "mine.png"
    rc, out, _ = run(capsys, *argv, "--out", file_out, "--batch", 2)
    assert rc == 0 and written(out) == [str(file_out), str(tmp_path / "mine-2.png")]


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_from_png_regenerates_the_image_even_from_a_batch(capsys, tiny_bundle_path, tmp_path, sampler):
    rc, out, err = run(
        capsys, "generate", "an astronaut on the moon", "--model", tiny_bundle_path, "--steps", STEPS,
        "--sampler", sampler, "--seed", 11, "--batch", 2, "--out", tmp_path / "batch",
    )  # fmt: skip
    assert rc == 0, err
    first, second = written(out)
    for original in (second, first):  # image 2 of the batch (seed 12) alone, then image 1
        rc, out, err = run(
            capsys,
            "generate",
            "--from-png",
            original,
            "--model",
            tiny_bundle_path,
            "--out",
            tmp_path / "again",
        )
        assert rc == 0, err
        (again,) = written(out)
        # the same seed alone or in a batch of two: CPU kernels chosen per batch (and per allocation) may
        # differ in the last float bits, which can move a pixel by one level (as in test_pipelines' seeds)
        assert same_image(pixels(again), pixels(original))
        assert read_parameters(again) == read_parameters(original)


def test_from_png_options_given_explicitly_override_the_pngs(capsys, tiny_bundle_path, tmp_path):
    rc, out, _ = run(
        capsys, "generate", "a cat", "--model", tiny_bundle_path, "--steps", STEPS, "--seed", 5,
        "--sampler", "ddim", "--eta", 0.5, "--out", tmp_path,
    )  # fmt: skip
    (original,) = written(out)
    rc, out, err = run(
        capsys,
        "generate",
        "--from-png",
        original,
        "--steps",
        6,
        "--model",
        tiny_bundle_path,
        "--out",
        tmp_path,
    )
    assert rc == 0, err
    (changed,) = written(out)
    a, b = read_parameters(original), read_parameters(changed)
    assert b["steps"] == 6 and {k: v for k, v in b.items() if k != "steps"} == {
        k: v for k, v in a.items() if k != "steps"
    }
    assert not np.array_equal(pixels(changed), pixels(original))

    # a new sampler takes neither the PNG's eta (it belongs to ddim) nor a Karras spacing it lacks
    rc, out, err = run(
        capsys, "generate", "--from-png", original, "--sampler", "euler", "--model", tiny_bundle_path,
        "--out", tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    params = read_parameters(written(out)[0])
    assert params["sampler"] == "euler" and not params["karras"] and "eta" not in params
    assert params["seed"] == 5 and params["steps"] == 4


def test_from_png_warns_when_the_model_differs(capsys, tiny_bundle_path, tmp_path):
    rc, out, _ = run(capsys, "generate", "a cat", "--model", tiny_bundle_path, "--steps", 2, "--seed", 1,
                     "--out", tmp_path)  # fmt: skip
    (path,) = written(out)
    params = read_parameters(path)
    other = tmp_path / "other.png"
    save_png(Image.open(path), other, {**params, "model_hash": "0123456789"})
    rc, out, err = run(
        capsys, "generate", "--from-png", other, "--model", tiny_bundle_path, "--out", tmp_path
    )
    assert rc == 0
    assert "warning" in err and "0123456789" in err and params["model_hash"] in err
    assert np.array_equal(pixels(written(out)[0]), pixels(path))


def test_from_png_of_an_img2img_result_needs_the_source_image(capsys, tiny_bundle_path, tmp_path):
    rc, out, _ = run(capsys, "generate", "a cat", "--model", tiny_bundle_path, "--steps", 2, "--seed", 1,
                     "--out", tmp_path)  # fmt: skip
    (source,) = written(out)
    rc, out, err = run(
        capsys, "img2img", source, "a dog", "--strength", 0.5, "--steps", STEPS, "--seed", 2,
        "--model", tiny_bundle_path, "--out", tmp_path / "i2i",
    )  # fmt: skip
    assert rc == 0, err
    (result,) = written(out)
    assert read_parameters(result)["strength"] == 0.5
    rc, out, err = run(
        capsys, "generate", "--from-png", result, "--model", tiny_bundle_path, "--out", tmp_path
    )
    assert rc == 2 and out == ""
    assert err.startswith("sfumato: error:") and "sfumato img2img" in err and len(err.splitlines()) == 1
    # ... which img2img --from-png takes, to the same pixels
    rc, out, err = run(capsys, "img2img", source, "--from-png", result, "--model", tiny_bundle_path,
                       "--out", tmp_path / "again")  # fmt: skip
    assert rc == 0, err
    assert np.array_equal(pixels(written(out)[0]), pixels(result))


def test_inpaint_records_the_strength(capsys, tiny_inpaint_bundle_path, tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255  # white = repaint
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rc, out, err = run(
        capsys, "inpaint", image, tmp_path / "mask.png", "a cat", "--steps", STEPS, "--seed", 3,
        "--model", tiny_inpaint_bundle_path, "--out", tmp_path / "out",
    )  # fmt: skip
    assert rc == 0, err
    params = read_parameters(written(out)[0])
    assert params["strength"] == defaults(StableDiffusion.inpaint)["strength"]
    assert params["prompt"] == "a cat" and params["seed"] == 3


def test_invert_check_and_generate_from_the_noise(capsys, tiny_bundle_path, tmp_path):
    rc, out, _ = run(capsys, "generate", "a cat", "--model", tiny_bundle_path, "--steps", 2, "--seed", 1,
                     "--out", tmp_path)  # fmt: skip
    (image,) = written(out)
    noise_path = tmp_path / "noise.safetensors"
    rc, out, err = run(
        capsys, "invert", image, "--prompt", "a cat", "--steps", 6, "--check", "--model", tiny_bundle_path,
        "--out", noise_path,
    )  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == str(noise_path) and lines[1] == str(tmp_path / "noise-check.png")
    error = float(lines[2].split(":")[1].split()[0])
    assert 0 <= error < 255
    from safetensors import safe_open

    with safe_open(str(noise_path), "pt") as f:
        meta, noise = f.metadata(), f.get_tensor("noise")
    assert noise.shape == (1, 4, 16, 16) and bool(noise.isfinite().all())  # random weights: not unit variance
    assert meta["prompt"] == "a cat" and meta["steps"] == "6" and float(meta["guidance"]) == 1.0
    assert meta["model_hash"] == read_parameters(image)["model_hash"]

    # the noise file's settings are generate's defaults: it redraws the check image exactly
    rc, out, err = run(capsys, "generate", "--latents", noise_path, "--model", tiny_bundle_path,
                       "--out", tmp_path / "gen")  # fmt: skip
    assert rc == 0, err
    (again,) = written(out)
    assert np.array_equal(pixels(again), pixels(lines[1]))
    assert read_parameters(again)["extra"] == {"Init noise": "noise.safetensors"}
    # such a PNG cannot be regenerated from its seed alone, but can with the noise
    rc, out, err = run(
        capsys, "generate", "--from-png", again, "--model", tiny_bundle_path, "--out", tmp_path
    )
    assert rc == 2 and "--latents" in err
    rc, out, err = run(capsys, "generate", "--from-png", again, "--latents", noise_path,
                       "--model", tiny_bundle_path, "--out", tmp_path)  # fmt: skip
    assert rc == 0 and np.array_equal(pixels(written(out)[0]), pixels(again))


def test_interpolate_writes_frames_and_a_gif(capsys, tiny_bundle_path, tmp_path):
    rc, out, err = run(
        capsys, "interpolate", "--prompt", "a cat", "--prompt", "a dog", "--seed", 1, "--seed", 2,
        "--frames", 3, "--fps", 4, "--steps", 3, "--model", tiny_bundle_path, "--out", tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    folder, gif = written(out)
    frames = sorted(p.name for p in (tmp_path / folder).glob("frame-*.png"))
    assert frames == [f"frame-{i:03d}.png" for i in range(4)]  # (2 keyframes - 1) * 3 + 1
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.info["loop"] == 0 and im.info["duration"] == 250


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A tiny random CLIP over OpenAI's vocabulary (the tokenizer a bare file gets), as a native file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_model(CLIP(PRESETS["tiny"]).eval(), path)
    return path


def test_classify_prints_ranked_probabilities_and_json(capsys, clip_path, tmp_path):
    rng = np.random.default_rng(1)
    images = []
    for i, size in enumerate([(40, 30), (32, 32)]):
        images.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(images[-1])
    labels = ["cat", "dog", "car"]
    rc, out, err = run(capsys, "classify", *images, "--labels", *labels, "--model", clip_path)
    assert rc == 0, err
    blocks = out.strip().split("\n")
    assert len(blocks) == 2 * (1 + len(labels)) and blocks[0].startswith(f"{images[0]}: ")
    probs = [float(line.split()[-1]) for line in blocks[1:4]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 2e-4

    rc, out, err = run(capsys, "classify", *images, "--labels", *labels, "--templates", "ensemble",
                       "--json", "--model", clip_path)  # fmt: skip
    assert rc == 0, err
    report = json.loads(out)
    assert [r["image"] for r in report] == [str(p) for p in images]
    for r in report:
        assert set(r["probs"]) == set(labels) and abs(sum(r["probs"].values()) - 1) < 1e-5
        assert r["top"] == max(r["probs"], key=r["probs"].get)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["generate", "x", "--width", 33], ["32", "40"]),
        (["generate", "x", "--guidance", 0.5], ["guidance", "0.5"]),
        (["generate", "x", "--sampler", "ddim", "--karras"], ["karras", "ddim"]),
        (["img2img", "missing.png", "x"], ["missing.png"]),
        (["generate", "--from-png", "missing.png"], ["missing.png"]),
        (["generate"], ["prompt"]),
        (["generate", "x", "--out", "x.jpg"], ["x.jpg", ".png"]),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_code_2(capsys, tiny_bundle_path, tmp_path, argv, needles):
    out_dir = [] if "--out" in argv else ["--out", tmp_path]
    rc, out, err = run(capsys, *argv, "--steps", 2, "--model", tiny_bundle_path, *out_dir)
    assert rc == 2 and out == ""
    assert err.startswith("sfumato: error: ") and len(err.splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_model_errors(capsys, tmp_path, clip_path, monkeypatch):
    import sfumato.pipelines

    rc, _, err = run(capsys, "generate", "x", "--model", tmp_path / "nope.safetensors")
    assert rc == 2 and "nope.safetensors" in err
    # an installation whose shipped model went missing: one line that says to pass --model
    monkeypatch.setattr(sfumato.pipelines, "SHIPPED_MODEL", tmp_path / "assets" / "shapes")
    rc, _, err = run(capsys, "generate", "x")
    assert rc == 2 and "--model" in err and "reinstall" in err and len(err.splitlines()) == 1
    rc, _, err = run(capsys, "generate", "x", "--model", clip_path)
    assert rc == 2 and "CLIP" in err


def test_unknown_sampler_lists_the_valid_ones(capsys, tiny_bundle_path):
    rc, _, err = run(capsys, "generate", "x", "--sampler", "dpmpp_3m", "--model", tiny_bundle_path)
    assert rc == 2
    assert all(name in err for name in ("ddim", "euler_ancestral", "dpmpp_2m", "heun"))


def test_best_of_k_is_recorded_and_regenerates(capsys, tiny_bundle_path, tmp_path):
    """--candidates K is written as "Candidates: K" and read back by --from-png; a PNG without the key (any
    other program's, or sfumato's without ranking) regenerates with one draw even for a model whose default
    is more."""
    rc, out, err = run(capsys, "generate", "a cat", "--model", tiny_bundle_path, "--steps", STEPS,
                       "--seed", 5, "--candidates", 3, "--out", tmp_path / "k3")  # fmt: skip
    assert rc == 0, err
    (ranked,) = written(out)
    assert read_parameters(ranked)["extra"] == {"Candidates": "3"}
    api = sfumato.load(tiny_bundle_path).generate("a cat", seed=5, steps=4, candidates=3)[0]
    assert same_image(pixels(ranked), np.asarray(api))
    rc, out, err = run(capsys, "generate", "--from-png", ranked, "--model", tiny_bundle_path,
                       "--out", tmp_path / "again")  # fmt: skip
    assert rc == 0, err and "ignored" not in err
    (again,) = written(out)
    assert same_image(pixels(again), pixels(ranked))
    assert read_parameters(again) == read_parameters(ranked)
    # a plain PNG read back by the same command stays plain
    rc, out, err = run(capsys, "generate", "a cat", "--model", tiny_bundle_path, "--steps", STEPS,
                       "--seed", 5, "--out", tmp_path / "plain")  # fmt: skip
    (plain,) = written(out)
    assert "Candidates" not in Image.open(plain).text["parameters"]
    rc, out, err = run(capsys, "generate", "--from-png", plain, "--model", tiny_bundle_path, "--candidates", 1,
                       "--out", tmp_path / "plain2")  # fmt: skip
    assert rc == 0, err
    assert same_image(pixels(written(out)[0]), pixels(plain))
    rc, out, err = run(capsys, "generate", "a cat", "--model", tiny_bundle_path, "--candidates", 0)
    assert rc == 2 and "candidates must be an int >= 1" in err
