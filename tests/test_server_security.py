"""Hardening of the HTTP service: loopback by default, the API key on every route, cross-site requests,
caps on size / steps / images / uploads, decompression bombs, and paths that try to leave the output folder."""

from __future__ import annotations

import argparse
import base64
import io
import socket
import struct
import zlib

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import sfumato  # noqa: E402
from sfumato.server.app import create_app  # noqa: E402
from sfumato.server.main import add_serve_arguments, build_app  # noqa: E402
from sfumato.server.params import Limits  # noqa: E402
from sfumato.server.testing import serve_in_thread  # noqa: E402

KEY = "sk-sfumato-" + "x9" * 16
SIZE = 32


@pytest.fixture(scope="module")
def pipe(tiny_bundle_path):
    return sfumato.load(tiny_bundle_path)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def txt2img(**kw) -> dict:
    return {"prompt": "a cat", "steps": 1, "width": SIZE, "height": SIZE, "seed": 1, **kw}


# ---------------------------------------------------------------------------------------------------------
# Where it listens


def parse(argv):
    return add_serve_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.mark.parametrize(
    "argv, host, warns",
    [
        ([], "127.0.0.1", False),
        (["--listen"], "0.0.0.0", True),
        (["--listen", "--api-key", KEY], "0.0.0.0", False),
        (["--host", "192.0.2.1"], "192.0.2.1", True),
    ],
)
def test_loopback_by_default_and_a_warning_when_open(argv, host, warns, tiny_bundle_path, tmp_path, capsys,
                                                     monkeypatch):  # fmt: skip
    monkeypatch.delenv("SFUMATO_API_KEY", raising=False)
    app, bound = build_app(parse([*argv, "--model", str(tiny_bundle_path), "--outdir", str(tmp_path)]))
    err = capsys.readouterr().err
    assert bound == host
    assert ("WARNING" in err and "--api-key" in err) == warns
    assert KEY not in err
    # listening on loopback also pins the Host header to loopback names (DNS rebinding)
    assert app.allowed_hosts == (("localhost", "127.0.0.1", "::1") if host == "127.0.0.1" else None)


def test_host_header_must_be_loopback_when_listening_on_loopback(pipe, tmp_path):
    app = create_app(pipe, outdir=tmp_path, allowed_hosts=("localhost", "127.0.0.1", "::1"))
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"Host": "localhost:7860"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "[::1]:7860"}).status_code == 200
        r = c.get("/", headers={"Host": "rebound.example:7860"})
        assert r.status_code == 403 and "not a name of this server" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------------------
# The API key


def all_routes(app):
    """Every (method, path) the app serves: the OpenAPI schema's, plus the page's (kept out of the schema)."""
    routes = [("GET", "/"), ("GET", "/static/{name}"), ("GET", "/openapi.json")]
    for path, item in app.app.openapi()["paths"].items():
        routes += [(method.upper(), path) for method in item]
    for method, path in routes:
        yield method, path.replace("{name}", "app.js").replace("{job_id}", "0" * 32)


def test_every_route_needs_the_key_and_none_leaks_it(pipe, tmp_path):
    app = create_app(pipe, outdir=tmp_path, api_key=KEY)
    routes = list(all_routes(app))
    assert len(routes) > 20
    basic = base64.b64encode(f"me:{KEY}".encode()).decode()
    good_headers = [{"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Basic {basic}"}, {"X-API-Key": KEY}]
    wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {KEY[:-1]}"},
             {"Authorization": "Basic " + base64.b64encode(b"me:nope").decode()}, {"X-API-Key": KEY + "x"},
             {"Authorization": "Basic !!notbase64"}]  # fmt: skip
    with TestClient(app) as c:
        for method, path in routes:
            for headers in wrong:
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.headers["www-authenticate"] == 'Basic realm="sfumato"'
                assert KEY not in r.text
            body = txt2img() if method == "POST" else None
            r = c.request(method, path, headers=good_headers[0], json=body)
            assert r.status_code != 401, (method, path)
            assert KEY not in r.text and KEY not in str(r.headers), (method, path)
        for headers in good_headers:
            assert c.get("/api/info", headers=headers).status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Cross-site requests


def test_cross_site_requests_are_refused_but_navigation_to_the_page_works(pipe, tmp_path):
    app = create_app(pipe, outdir=tmp_path)
    (tmp_path / "a.png").write_bytes(png_bytes(Image.new("RGB", (8, 8))))
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        refused = [
            ("POST", "/sdapi/v1/txt2img", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}),
            ("POST", "/sdapi/v1/txt2img", {"Sec-Fetch-Site": "same-site"}),
            ("POST", "/sdapi/v1/txt2img", {"Origin": "null"}),
            ("POST", "/sdapi/v1/txt2img", {"Origin": "http://evil.example"}),
            ("POST", "/sdapi/v1/txt2img", {"Origin": "http://127.0.0.1:8080"}),  # another port, another origin
            ("POST", "/v1/images/generations", {"Origin": "https://127.0.0.1:7860"}),  # another scheme
            ("POST", "/api/jobs", {"Origin": "http://127.0.0.1:7860.evil.example"}),
            ("GET", "/outputs/a.png", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "image"}),
            ("GET", "/api/outputs", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}),
            ("POST", "/sdapi/v1/interrupt", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}),
            ("GET", "/sdapi/v1/options", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}),
        ]
        for method, path, headers in refused:
            r = c.request(method, path, headers=headers, json=txt2img() if method == "POST" else None)
            assert r.status_code == 403, (method, path, headers, r.text)
        openai_error = c.post("/v1/images/generations", headers={"Origin": "null"}, json={"prompt": "x"}).json()
        assert openai_error["error"]["type"] == "permission_error"
        # a link from another site opens the page (top-level navigation)
        nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
        r = c.get("/", headers=nav)
        assert r.status_code == 200 and "<title>sfumato</title>" in r.text
        assert r.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in r.headers["content-security-policy"]
        # the page's own requests, and programs that send no such headers, pass
        same = {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:7860"}
        assert c.post("/sdapi/v1/txt2img", headers=same, json=txt2img()).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json=txt2img()).status_code == 200
        assert c.get("/outputs/a.png", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert c.get("/", headers={"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}).status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Caps


def tiny_limits() -> Limits:
    return Limits(max_pixels=64 * 64, max_steps=10, max_images=3, max_upload_bytes=200_000,
                  max_input_pixels=512 * 512)  # fmt: skip


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height gray pixels, with a few bytes of (compressed) data: a
    decompression bomb's shape, refused from its header before anything is inflated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_caps_on_size_steps_images_and_uploads(pipe, tmp_path):
    app = create_app(pipe, outdir=tmp_path, limits=tiny_limits())
    with TestClient(app) as c:
        cases = [
            (txt2img(width=128, height=64), "more than this server's cap of 4096"),
            (txt2img(steps=11), "steps must be an integer from 1 to 10"),
            (txt2img(batch_size=2, n_iter=2), "from 1 to 3 images"),
            (txt2img(prompt="x" * 10_001), "more than the 10000 accepted"),
            (txt2img(cfg_scale=0.5), "cfg_scale must be a number from 1"),
            (txt2img(seed=-5), "seed must be -1"),
        ]
        for body, needle in cases:
            r = c.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 422 and needle in r.json()["detail"], (body, r.text)
        r = c.post("/v1/images/generations", json={"prompt": "x", "n": 4})
        assert r.status_code == 422 and "n must be from 1 to 3" in r.json()["error"]["message"]
        r = c.post("/api/jobs", json={"prompt": "x", "width": 256, "height": 256})
        assert r.status_code == 422

        # a body over the cap: refused from Content-Length, and from a streamed (chunked) body alike
        big = {"prompt": "x", "init_images": ["A" * 300_000]}
        r = c.post("/sdapi/v1/img2img", json=big)
        assert r.status_code == 413 and "200000 bytes" in r.json()["detail"]

        def chunks():
            for _ in range(30):
                yield b"x" * 10_000

        r = c.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        files = {"image": ("a.png", b"\0" * 250_000, "image/png")}
        r = c.post("/v1/images/edits", files=files, data={"prompt": "x"})
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body larger")

        # decompression bombs: refused from the header (413), A1111 and OpenAI routes alike
        bomb = bomb_png(100_000, 100_000)
        assert len(bomb) < 200
        r = c.post("/sdapi/v1/img2img", json=txt2img(steps=4, init_images=[base64.b64encode(bomb).decode()]))
        assert r.status_code == 413 and "decompression bomb" in r.json()["detail"]  # PIL's own check
        r = c.post("/sdapi/v1/img2img", json=txt2img(steps=4, init_images=[base64.b64encode(bomb_png(5000, 5000)).decode()]))
        assert r.status_code == 413 and "5000x5000 = 25000000 pixels" in r.json()["detail"]  # our cap
        r = c.post("/v1/images/edits", files={"image": ("b.png", bomb, "image/png")}, data={"prompt": "x"})
        assert r.status_code == 413, r.text
        # within the pixel cap but not a real image: a clear 400
        r = c.post("/sdapi/v1/img2img", json=txt2img(steps=4, init_images=[base64.b64encode(bomb_png(64, 64)).decode()]))
        assert r.status_code == 400 and "could not be decoded" in r.json()["detail"]
        # a URL instead of image data is never fetched
        r = c.post("/sdapi/v1/img2img", json=txt2img(steps=4, init_images=["http://169.254.169.254/latest"]))
        assert r.status_code == 422 and "does not fetch URLs" in r.json()["detail"]
        # and a decent upload still works after all that
        ok = base64.b64encode(png_bytes(Image.new("RGB", (SIZE, SIZE), (200, 10, 10)))).decode()
        assert c.post("/sdapi/v1/img2img", json=txt2img(init_images=[ok], steps=2)).status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Paths


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET a path byte for byte as given (HTTP clients normalise ../ and %2e before sending)."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def test_file_routes_do_not_leave_the_output_folder(pipe, tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    secret = b"TOP-SECRET-" + b"7" * 20
    (tmp_path / "secret.png").write_bytes(secret)
    (tmp_path / "secret.txt").write_bytes(secret)
    (outdir / "link.png").symlink_to(tmp_path / "secret.png")
    (outdir / ".hidden.png").write_bytes(secret)
    (outdir / "fine.png").write_bytes(png_bytes(Image.new("RGB", (8, 8))))
    app = create_app(pipe, outdir=outdir)
    attempts = [
        "/outputs/../secret.png", "/outputs/..%2Fsecret.png", "/outputs/%2e%2e%2fsecret.png",
        "/outputs/%2E%2E/secret.png", "/outputs/..%5Csecret.png", "/outputs/%252e%252e%252fsecret.png",
        f"/outputs/{tmp_path}/secret.png", f"/outputs/%2F{str(tmp_path)[1:].replace('/', '%2F')}%2Fsecret.png",
        "/outputs//etc/passwd", "/outputs/link.png", "/outputs/.hidden.png", "/outputs/secret.png%00.png",
        "/outputs/..", "/outputs/.%2e/secret.png", "/static/..%2F..%2F..%2Fsecret.txt", "/static/../app.py",
        "/static/%2e%2e%2fapp.py", "/api/jobs/..%2F..%2Fsecret", "/api/jobs/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/../secret.png", "/%2e%2e/secret.png",
    ]  # fmt: skip
    with serve_in_thread(app) as url:
        for path in attempts:
            status, data = raw_get(url, path)
            assert status in (400, 404), (path, status)
            assert b"TOP-SECRET" not in data, path
            assert b"root:" not in data, path
        status, data = raw_get(url, "/outputs/fine.png")
        assert status == 200 and b"\x89PNG" in data


def test_a_missing_model_is_one_line_and_exit_2(tmp_path, capsys):
    from sfumato.server.main import main

    assert main(["--model", str(tmp_path / "nope"), "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfumato serve: error:") and "nope" in err and err.count("\n") == 1


def test_websockets_are_refused(pipe, tmp_path):
    from starlette.websockets import WebSocketDisconnect

    app = create_app(pipe, outdir=tmp_path, api_key=KEY)
    with TestClient(app) as c, pytest.raises(WebSocketDisconnect) as e:
        with c.websocket_connect("/", headers={"Authorization": f"Bearer {KEY}"}):
            pass
    assert e.value.code == 1008


def test_serve_passes_the_speed_options_to_the_pipeline(tiny_bundle_path, tmp_path, monkeypatch):
    """`--vae-tiling`, `--int8` and `--compile` reach `StableDiffusion.optimize` (compile recorded, not run)."""
    from sfumato.models.quant import Int8Linear

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))
    base = ["--model", str(tiny_bundle_path), "--outdir", str(tmp_path)]
    pipe = build_app(parse(base))[0].state.sfumato.pipe
    assert pipe.vae_tile is None and not compiled
    assert not any(isinstance(m, Int8Linear) for m in pipe.unet.modules())
    pipe = build_app(parse([*base, "--vae-tiling", "--int8", "--compile"]))[0].state.sfumato.pipe
    assert pipe.vae_tile == 64 and compiled == [pipe.unet]
    assert any(isinstance(m, Int8Linear) for m in pipe.unet.modules())
