"""The web page end to end in a real browser: headless Chromium (Debian's, found on PATH) driven by
Playwright. Generate with live progress and previews, see the gallery with parameters, download a PNG that
carries its parameters, cancel a long job; no errors in the console (CSP violations would show there).

Set SFUMATO_SCREENSHOT=path.png to keep the screenshot; CI (CI=true) fails instead of skipping when Chromium
is missing."""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip("playwright.sync_api")

import sfumato  # noqa: E402
from sfumato.pipelines.metadata import read_parameters  # noqa: E402
from sfumato.server.app import create_app  # noqa: E402
from sfumato.server.testing import serve_in_thread  # noqa: E402


def chromium_path() -> str | None:
    for name in (os.environ.get("SFUMATO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def wait_until(page, predicate: str, timeout: float = 120.0) -> None:
    """Poll a JS arrow function with page.evaluate: Playwright's wait_for_function evaluates its predicate
    with eval, which the page's Content-Security-Policy (rightly) forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}; status: "
                                 f"{page.text_content('#status')!r}, error: {page.text_content('#error')!r}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH; .ci/run installs Debian's (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True)
        yield browser
        browser.close()


def test_page_generates_shows_progress_gallery_and_downloads(browser, tiny_bundle_path, tmp_path):
    app = create_app(sfumato.load(tiny_bundle_path), outdir=tmp_path / "out", preview_interval=0)
    errors = []
    with serve_in_thread(app) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900}, accept_downloads=True)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#sampler option[value='Euler a']", state="attached")
        assert page.input_value("#width") == "32"  # the model's native size, from /api/info

        page.fill("#prompt", "a painting of a dog riding a horse")
        page.fill("#negative_prompt", "blurry")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.fill("#steps", "16")
        page.select_option("#sampler", "Euler a")
        page.fill("#guidance", "6")
        page.fill("#seed", "42")
        page.fill("#batch", "2")
        page.click("#generate")
        # live: the progress bar moves and a preview of the sample appears while the job runs
        wait_until(page, "() => document.querySelector('#progress').value > 0"
                   " && document.querySelector('#progress').value < 1"
                   " && document.querySelector('#preview').src.startsWith('data:image/png')")
        assert page.text_content("#status").startswith(("running: step", "done"))  # it may just have ended
        wait_until(page, "() => document.querySelector('#status').textContent.startsWith('done')", 240)
        assert page.text_content("#status") == "done: 2 image(s), seed 42"
        figures = page.locator("#gallery figure")
        assert figures.count() == 2
        captions = sorted(figures.nth(i).locator("figcaption").text_content() for i in range(2))
        assert "Seed: 42" in captions[0] and "Seed: 43" in captions[1]
        assert all("Sampler: Euler a, CFG scale: 6.0" in c and "Size: 64x64" in c for c in captions)
        assert all("Negative prompt: blurry" in c for c in captions)
        # every gallery image actually loaded (an image's bytes arrive after its <img> is in the page)
        wait_until(page, "() => [...document.querySelectorAll('#gallery img')].every(i => i.complete)")
        assert page.evaluate("[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth === 64)")

        with page.expect_download() as download:
            figures.first.locator("a").click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        params = read_parameters(saved)
        assert params["prompt"] == "a painting of a dog riding a horse" and params["seed"] in (42, 43)
        assert (params["steps"], params["sampler"], params["width"]) == (16, "euler_ancestral", 64)

        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("SFUMATO_SCREENSHOT"):
            shutil.copy(shot, os.environ["SFUMATO_SCREENSHOT"])

        # a long job can be cancelled from the page
        page.fill("#steps", "150")
        page.fill("#batch", "1")
        page.click("#generate")
        wait_until(page, "() => document.querySelector('#status').textContent.startsWith('running: step')")
        page.click("#cancel")
        wait_until(page, "() => document.querySelector('#status').textContent.startsWith('interrupted')")
        assert page.is_enabled("#generate") and not page.is_enabled("#cancel")

        # a request the server refuses shows its message (the form's own min/max catch steps and batch first)
        page.fill("#width", "2048")
        page.fill("#height", "2048")
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])")
        assert "422: width x height = 2048x2048" in page.text_content("#error")
        page.close()
    # the one error is the browser logging the 422 above; nothing else (no CSP violation, no 404, no exception)
    assert len(errors) == 1 and "422" in errors[0], errors


def test_page_behind_an_api_key_uses_the_browsers_login(browser, tiny_bundle_path, tmp_path):
    """With --api-key the page answers 401 with a basic-auth challenge; the browser's login (any user name,
    the key as password) then carries every request the page makes."""
    key = "page-key-" + "5" * 24
    app = create_app(sfumato.load(tiny_bundle_path), outdir=tmp_path / "out", api_key=key, preview_interval=0)
    with serve_in_thread(app) as url:
        anonymous = browser.new_page()
        with pytest.raises(playwright_api.Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
            anonymous.goto(url)  # headless Chromium has no one to ask for the login the 401 requests
        anonymous.close()
        context = browser.new_context(http_credentials={"username": "me", "password": key})
        page = context.new_page()
        assert page.goto(url).status == 200
        page.wait_for_selector("#sampler option[value='Euler a']", state="attached")
        page.fill("#prompt", "a cat")
        page.fill("#steps", "2")
        page.click("#generate")
        wait_until(page, "() => document.querySelector('#status').textContent.startsWith('done')", 240)
        assert page.locator("#gallery figure").count() == 1
        wait_until(page, "() => document.querySelector('#gallery img').complete")  # loaded, or failed to
        assert page.evaluate("document.querySelector('#gallery img').naturalWidth") == 32
        context.close()
