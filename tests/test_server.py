"""The HTTP service driven by clients nobody here wrote: `webuiapi` (A1111's API) and the official `openai`
client, each checked pixel for pixel against the pipeline called directly with the settings the request
means; plus progress, interruption, the bounded queue and failed jobs.

Hardening (API key, cross-site requests, caps, paths) is in test_server_security.py, the page in
test_server_browser.py, the load test and two replicas in test_server_load.py.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

import sfumato  # noqa: E402
from sfumato.server.app import create_app  # noqa: E402
from sfumato.server.testing import serve_in_thread  # noqa: E402

SIZE = 32  # the tiny bundle's native size: ~0.05 s a step


@pytest.fixture(scope="module")
def pipe(tiny_bundle_path):
    return sfumato.load(tiny_bundle_path)


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    """One live server (uvicorn on a free loopback port) for the client tests of this module."""
    app = create_app(pipe, outdir=tmp_path_factory.mktemp("out"), preview_interval=0)
    with serve_in_thread(app) as url:
        yield url, app


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sample_image(seed: int = 0, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def half_mask(size: int = SIZE) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[:, size // 2 :] = 255  # repaint the right half
    return Image.fromarray(m)


# ---------------------------------------------------------------------------------------------------------
# A1111's API through webuiapi


def test_webuiapi_txt2img_matches_the_pipeline(server, pipe):
    url, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port_of(url))  # its constructor already calls /scripts
    result = api.txt2img(prompt="a photo of a cat", negative_prompt="a dog", seed=5, steps=4, width=SIZE,
                         height=SIZE, sampler_name="Euler a", batch_size=2, cfg_scale=6.5)  # fmt: skip
    assert len(result.images) == 2
    assert result.info["all_seeds"] == [5, 6]
    assert result.info["sampler_name"] == "Euler a"
    assert result.info["cfg_scale"] == 6.5 and result.info["steps"] == 4
    assert result.info["sd_model_hash"] == pipe.model_hash
    assert result.parameters["prompt"] == "a photo of a cat"
    # the PNGs carry A1111's parameters text, which our reader (and the webui's PNG Info) understands
    assert "Seed: 6" in result.images[1].info["parameters"]
    assert result.info["infotexts"][0] == result.images[0].info["parameters"]
    # webuiapi sends eta=1.0, which Euler a (eta 1 by default) honours; same pixels as the pipeline itself
    direct = pipe.generate("a photo of a cat", "a dog", steps=4, guidance=6.5, sampler="euler_ancestral",
                           karras=False, eta=1.0, seed=5, width=SIZE, height=SIZE, batch=2)  # fmt: skip
    assert all(same_pixels(a, b) for a, b in zip(result.images, direct))


def test_webuiapi_batch_count_continues_the_seeds(server, pipe):
    url, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port_of(url))
    result = api.txt2img(prompt="a cat", seed=11, steps=3, width=SIZE, height=SIZE, sampler_name="DPM++ 2M",
                         scheduler="Karras", n_iter=2, batch_size=1, cfg_scale=7)  # fmt: skip
    assert result.info["all_seeds"] == [11, 12]
    direct = pipe.generate("a cat", steps=3, guidance=7.0, sampler="dpmpp_2m", karras=True, seed=12,
                           width=SIZE, height=SIZE)  # fmt: skip
    assert same_pixels(result.images[1], direct[0])


def test_webuiapi_img2img_and_inpaint_match_the_pipeline(server, pipe):
    from sfumato.server.params import prepare_mask

    url, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port_of(url))
    init = sample_image(1)
    out = api.img2img(images=[init], prompt="a dog", seed=3, steps=6, denoising_strength=0.5, width=SIZE,
                      height=SIZE, sampler_name="DDIM", cfg_scale=5, eta=0.0)  # fmt: skip
    direct = pipe.image_to_image(init, "a dog", strength=0.5, steps=6, guidance=5.0, sampler="ddim", eta=0.0,
                                 seed=3)  # fmt: skip
    assert same_pixels(out.image, direct[0])
    assert out.parameters["init_images"] is None  # not echoed back, as the webui does

    mask = half_mask()
    out = api.img2img(images=[init], mask_image=mask, prompt="a dog", seed=4, steps=4, denoising_strength=1.0,
                      width=SIZE, height=SIZE, sampler_name="Euler", cfg_scale=7, mask_blur=0)  # fmt: skip
    direct = pipe.inpaint(init, prepare_mask(mask, SIZE, SIZE), "a dog", steps=4, guidance=7.0, sampler="euler",
                          karras=False, seed=4, strength=1.0)  # fmt: skip
    assert same_pixels(out.image, direct[0])
    assert "Denoising strength: 1.0" in out.image.info["parameters"]


def test_webuiapi_lists_and_options(server, pipe):
    url, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port_of(url))
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "Euler", "Heun", "DDIM", "DPM++ 2M", "DPM++ 2M Karras"} <= set(names)
    models = api.get_sd_models()
    assert len(models) == 1 and models[0]["hash"] == pipe.model_hash
    assert api.util_get_model_names() == [models[0]["title"]]
    assert api.util_get_current_model() == models[0]["title"]  # reads options.sd_model_checkpoint
    assert api.get_options()["samples_format"] == "png"
    api.util_set_model(models[0]["model_name"])  # "selecting" the loaded model is fine ...
    assert api.set_options({"sd_model_checkpoint": models[0]["title"]}) == {}
    # ... changing an option is refused (webuiapi hands back the body of the 422)
    assert "read-only" in api.set_options({"CLIP_stop_at_last_layers": 2})["detail"]
    r = httpx.post(url + "sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned"})
    assert r.status_code == 422 and "read-only" in r.json()["detail"]
    progress = api.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["current_image"] is None


def test_webuiapi_refuses_what_sfumato_cannot_do(server):
    url, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port_of(url))
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", steps=2, width=SIZE, height=SIZE, enable_hr=True)
    assert e.value.args[0] == 422 and "hires fix" in e.value.args[1]
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", steps=2, width=SIZE, height=SIZE, sampler_name="UniPC")
    assert e.value.args[0] == 422 and "unknown sampler 'UniPC'" in e.value.args[1]
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", steps=2, width=SIZE + 3, height=SIZE)
    assert e.value.args[0] == 422 and "multiple of" in e.value.args[1]


def test_progress_previews_and_interrupt(server):
    """A long job shows steps and a preview on /progress; /interrupt stops it and, as in the webui, the
    request still answers with the image sampling had reached."""
    url, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port_of(url))
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", api.txt2img(
        prompt="a cat", seed=1, steps=150, width=SIZE, height=SIZE, sampler_name="Euler")))  # fmt: skip
    worker.start()
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress with a preview was reported"
    assert seen["state"]["sampling_steps"] == 150 and 0 < seen["progress"] < 1
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size == (SIZE, SIZE)
    api.interrupt()
    worker.join(30)
    r = result["r"]
    assert r.info["interrupted"] is True
    assert len(r.images) == 1 and r.images[0].size == (SIZE, SIZE)
    assert "Interrupted at step" in r.images[0].info["parameters"]
    assert api.get_progress()["state"]["job_count"] == 0


# ---------------------------------------------------------------------------------------------------------
# OpenAI's API through the official client


def test_openai_client_generations(server, pipe):
    url, _ = server
    client = openai.OpenAI(base_url=url + "v1", api_key="unused-locally", max_retries=0)
    r = client.images.generate(model="sfumato", prompt="an astronaut on the moon", n=2, size=f"{SIZE}x{SIZE}",
                               response_format="b64_json", extra_body={"seed": 7, "steps": 4})  # fmt: skip
    assert len(r.data) == 2 and r.size == f"{SIZE}x{SIZE}" and r.output_format == "png"
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    # no guidance asked for: the model's own (7.5 for this one)
    direct = pipe.generate("an astronaut on the moon", steps=4, guidance=pipe.default_guidance, sampler="dpmpp_2m",
                           karras=True, seed=7, width=SIZE, height=SIZE, batch=2)  # fmt: skip
    assert all(same_pixels(a, b) for a, b in zip(images, direct))
    assert "Seed: 8" in images[1].info["parameters"]

    # response_format="url": the PNG is saved in the output folder and served by the server
    r = client.images.generate(prompt="a cat", size=f"{SIZE}x{SIZE}", response_format="url",
                               extra_body={"seed": 7, "steps": 2})  # fmt: skip
    got = httpx.get(r.data[0].url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert "Steps: 2" in Image.open(io.BytesIO(got.content)).info["parameters"]


def test_openai_client_edit_repaints_the_transparent_part(server, pipe):
    url, _ = server
    client = openai.OpenAI(base_url=url + "v1", api_key="unused-locally", max_retries=0)
    image = sample_image(2)
    rgba = np.full((SIZE, SIZE, 4), 255, np.uint8)
    rgba[:, SIZE // 2 :, 3] = 0  # transparent right half = edit there (OpenAI's rule)
    mask_png = io.BytesIO()
    Image.fromarray(rgba).save(mask_png, format="PNG")
    image_png = io.BytesIO()
    image.save(image_png, format="PNG")
    r = client.images.edit(image=("in.png", image_png.getvalue(), "image/png"),
                           mask=("mask.png", mask_png.getvalue(), "image/png"), prompt="a dog",
                           response_format="b64_json", extra_body={"seed": 9, "steps": 4})  # fmt: skip
    out = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    direct = pipe.inpaint(image, half_mask(), "a dog", steps=4, guidance=pipe.default_guidance, sampler="dpmpp_2m",
                          karras=True, seed=9)  # fmt: skip
    assert same_pixels(out, direct[0])


def test_openai_client_errors(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "v1", api_key="unused-locally", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="a cat", size="33x32")
    assert "width must be a multiple of 2" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", size="huge")
    assert "WIDTHxHEIGHT" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("x.png", b"not an image", "image/png"), prompt="a dog")
    assert "not a PNG, JPEG or WebP" in e.value.message


def test_api_key_with_real_clients(pipe, tmp_path):
    key = "k-" + "7" * 30
    app = create_app(pipe, outdir=tmp_path, api_key=key)
    with serve_in_thread(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
        good = openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0)
        r = good.images.generate(prompt="x", size=f"{SIZE}x{SIZE}", extra_body={"steps": 1})
        assert len(r.data) == 1
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port_of(url))
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="x", steps=1, width=SIZE, height=SIZE)
        assert e.value.args[0] == 401 and key not in e.value.args[1]
        api.set_auth("anyone", key)  # HTTP basic auth, as webuiapi sends it to a webui run with --api-auth
        assert len(api.txt2img(prompt="x", steps=1, width=SIZE, height=SIZE).images) == 1


# ---------------------------------------------------------------------------------------------------------
# The worker: a bounded queue, and failed jobs that leave nothing behind


class GatedPipe:
    """The real pipeline whose generate() first waits for `gate` (so a test controls when a job runs)."""

    def __init__(self, pipe):
        self.pipe, self.gate, self.entered = pipe, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(30)
        return self.pipe.generate(*args, **kwargs)


def test_full_queue_answers_429_and_accepted_jobs_complete(pipe, tmp_path):
    gated = GatedPipe(pipe)
    app = create_app(gated, outdir=tmp_path, max_queue=1)
    body = {"prompt": "a cat", "steps": 1, "width": SIZE, "height": SIZE, "seed": 1}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        results = []
        first = threading.Thread(target=lambda: results.append(c.post("sdapi/v1/txt2img", json=body)))
        first.start()
        assert gated.entered.wait(10)  # job 1 runs (held at the gate)
        second = threading.Thread(target=lambda: results.append(c.post("sdapi/v1/txt2img", json=body)))
        second.start()
        deadline = time.monotonic() + 10
        while app.state.sfumato.worker.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = c.post("sdapi/v1/txt2img", json=body)  # job 3: the one queue slot is taken
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "already waiting" in refused.json()["detail"]
        r = c.post("v1/images/generations", json={"prompt": "a cat"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
        gated.gate.set()
        first.join(30)
        second.join(30)
        assert [r.status_code for r in results] == [200, 200]


class FailingPipe:
    """The real pipeline, except that some prompts fail: at once, out of memory, or halfway through sampling."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, prompt, *args, callback=None, **kwargs):
        if prompt == "raise":
            raise RuntimeError("simulated bug")
        if prompt == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        def cb(info):
            if prompt == "midway" and info["i"] == 1:
                raise RuntimeError("simulated failure at step 2")
            callback(info)

        return self.pipe.generate(prompt, *args, callback=cb, **kwargs)


def test_a_failed_job_is_reported_and_the_next_runs_clean(pipe, tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(FailingPipe(pipe), outdir=tmp_path, preview_interval=0)
    good = {"prompt": "a photo of a cat", "steps": 3, "width": SIZE, "height": SIZE, "seed": 21,
            "sampler_name": "Euler a"}  # fmt: skip
    direct = pipe.generate("a photo of a cat", steps=3, guidance=7.0, sampler="euler_ancestral", karras=False,
                           seed=21, width=SIZE, height=SIZE)[0]  # fmt: skip
    with TestClient(app) as c:
        for prompt, needle in (("raise", "simulated bug"), ("oom", "out of memory"), ("midway", "step 2")):
            r = c.post("/sdapi/v1/txt2img", json={**good, "prompt": prompt})
            assert r.status_code == 500, r.text
            assert needle in r.json()["detail"]
            r = c.post("/sdapi/v1/txt2img", json=good)  # the next job: same pixels as a fresh pipeline's
            assert r.status_code == 200
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            assert same_pixels(image, direct)
            assert json.loads(r.json()["info"])["interrupted"] is False
            assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        health = c.get("/healthz").json()
        assert health["failed"] == 3 and health["completed"] == 3 and not health["running"]
        # a pipeline refusal is the client's mistake: 400 with the pipeline's own message
        r = c.post("/sdapi/v1/img2img", json={**good, "init_images": [png_b64(sample_image())],
                                              "denoising_strength": 0.1, "steps": 5})  # fmt: skip
        assert r.status_code == 422 and "runs no step" in r.json()["detail"]


def test_page_job_api_progress_cancel_and_gallery(pipe, tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(pipe, outdir=tmp_path, preview_interval=0)
    with TestClient(app) as c:
        page = c.get("/")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        assert c.get("/static/app.js").status_code == 200
        info = c.get("/api/info").json()
        assert info["default_size"] == SIZE and "Euler a" in info["samplers"]
        assert info["default_guidance"] == pipe.default_guidance == 7.5  # the page's initial guidance
        job = c.post("/api/jobs", json={"prompt": "a cat", "steps": 3, "width": SIZE, "height": SIZE, "seed": 4,
                                        "batch": 2, "sampler": "Euler a"}).json()  # fmt: skip
        state = job
        for _ in range(200):
            state = c.get(f"/api/jobs/{job['id']}").json()
            if state["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        assert state["status"] == "done" and len(state["images"]) == 2 and state["preview"]
        png = c.get("/" + state["images"][1]["url"])
        assert png.status_code == 200 and "Seed: 5" in Image.open(io.BytesIO(png.content)).info["parameters"]
        gallery = c.get("/api/outputs").json()
        assert {g["file"] for g in gallery} == {i["file"] for i in state["images"]}

        long = c.post("/api/jobs", json={"prompt": "a cat", "steps": 150, "width": SIZE, "height": SIZE}).json()
        assert c.post(f"/api/jobs/{long['id']}/cancel").status_code == 200
        for _ in range(200):
            state = c.get(f"/api/jobs/{long['id']}").json()
            if state["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        assert state["status"] == "interrupted" and state["step"] < 150
        assert c.get("/api/jobs/" + "0" * 32).status_code == 404
        r = c.post("/api/jobs", json={"prompt": "a cat", "steps": 1000})
        assert r.status_code == 422 and "steps must be an integer from 1 to 150" in r.json()["detail"]


def test_a_client_that_goes_away_cancels_its_job(server):
    url, app = server
    worker = app.state.sfumato.worker
    before = worker.completed
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "sdapi/v1/txt2img", timeout=1.0,
                   json={"prompt": "a cat", "steps": 150, "width": SIZE, "height": SIZE})  # fmt: skip
    deadline = time.monotonic() + 10
    while (worker.current is not None or worker.completed == before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.current is None and worker.completed == before + 1
    health = httpx.get(url + "healthz").json()
    assert not health["running"] and health["queued"] == 0


def test_interrupting_a_best_of_k_model_returns_one_image_per_image_asked(server, pipe):
    """A model that draws best of K by default samples N * K rows; interrupted, it answers with N images
    (each image's first draw), seeds as asked, not with every draw."""
    from dataclasses import replace

    url, _ = server
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port_of(url))
    before = pipe.schedule
    pipe.schedule = replace(before, candidates=3)
    try:
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", api.txt2img(
            prompt="a cat", seed=5, steps=150, batch_size=2, width=SIZE, height=SIZE, sampler_name="Euler")))  # fmt: skip
        worker.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and api.get_progress()["state"]["sampling_step"] < 2:
            time.sleep(0.05)
        api.interrupt()
        worker.join(30)
    finally:
        pipe.schedule = before
    r = result["r"]
    assert r.info["interrupted"] is True and len(r.images) == 2
    seeds = [int(im.info["parameters"].split("Seed: ")[1].split(",")[0]) for im in r.images]
    assert seeds == [5, 6]
