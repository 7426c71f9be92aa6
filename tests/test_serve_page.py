"""The web page at `/`, driven in real headless Chromium (Debian's /usr/bin/chromium, through the
Python `playwright` package; .ci/run installs both): it generates an image from a prompt, then
inpaints an uploaded image with a mask painted by mouse, and the pixels it shows are the pipeline's.
Set SDRT_SCREENSHOT_DIR to keep the screenshots (docs/serving-page.png is one)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime
from runtime.serving.codec import decode_image
from runtime.serving.models import Models
from test_serve_support import QUICK_TIMEOUT_S, LiveServer, as_array, pixels

sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs playwright")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# the flags that work on this project's machines (no sandbox as root, no background network calls)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle on a blue background"
# the page's generations: 12 steps at 64 px, through the page's own progress polling
GENERATION_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    from export.build import build_engine

    return build_engine("tiny", tmp_path_factory.mktemp("engines") / "tiny", progress=lambda s: None)


@pytest.fixture(scope="module")
def demo_pipe(demo_folder):
    with runtime.load(demo_folder, backend="onnxruntime") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def playwright():
    """One Playwright driver for the module (its sync API refuses a second one while the first runs)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: install Debian's chromium (.ci/run does)")
    with sync_api.sync_playwright() as p:
        yield p


@contextlib.contextmanager
def _browser(p, live: LiveServer):
    """Headless Chromium on the live server's page, its sampler list loaded."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
    try:
        # bypass_csp: playwright's own wait_for_function evaluates strings, which the page's
        # Content-Security-Policy (no eval) forbids; the page itself runs under its CSP
        page = browser.new_page(viewport={"width": 1180, "height": 900}, bypass_csp=True)
        page.set_default_timeout(QUICK_TIMEOUT_S * 1000)  # every click, fill and navigation: ms
        page.goto(live.url + "/")
        _wait_for(page, "document.getElementById('sampler').options.length > 0", "the sampler list to load",
                  QUICK_TIMEOUT_S)
        yield page
    finally:
        browser.close()


@pytest.fixture(scope="module")
def browser_page(playwright, demo_pipe):
    live = LiveServer(demo_pipe)
    with _browser(playwright, live) as page:
        yield live, page
    live.stop()


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("SDRT_SCREENSHOT_DIR")
    if keep:
        shutil.copy(path, Path(keep) / name)
    return path


def _wait_for(page, expression: str, what: str, timeout: float) -> None:
    """Wait until the page's `expression` is true; after `timeout` seconds fail, saying what was awaited
    and the page's status line."""
    try:
        page.wait_for_function(expression, timeout=timeout * 1000)
    except sync_api.TimeoutError:
        status = page.text_content("#status", timeout=1000)
        raise AssertionError(f"waited {timeout:g} s for {what} ({expression}); the page's status: {status!r}") from None


def _wait_done(page) -> None:
    _wait_for(page, "document.getElementById('status').textContent.startsWith('done')", "the generation to finish",
              GENERATION_TIMEOUT_S)


def test_page_generates_an_image_from_a_prompt(browser_page, demo_pipe, tmp_path):
    live, page = browser_page
    assert "tiny" in page.text_content("#model")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "12")
    page.fill("#cfg", "5")
    page.fill("#seed", "42")
    page.select_option("#sampler", "DPM++ 2M")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.click("#generate")
    _wait_done(page)
    got = pixels(page.get_attribute("#result", "src").split(",", 1)[1])
    want = demo_pipe.txt2img(PROMPT, num_inference_steps=12, guidance_scale=5.0, seed=42, scheduler="dpmpp_2m",
                             karras=False, height=64, width=64, progress=False).images[0]
    np.testing.assert_array_equal(got, as_array(want))
    # the demo model draws what it is asked: red in the middle, blue in the corners
    r, g, b = got[28:36, 28:36].reshape(-1, 3).mean(0)
    assert r > 150 and r > g + 60 and r > b + 60, (r, g, b)
    r, g, b = got[:6, :6].reshape(-1, 3).mean(0)
    assert b > r + 60, (r, g, b)
    params = page.text_content("#params")
    assert "Seed: 42" in params and "Steps: 12" in params and "Sampler: DPM++ 2M" in params
    assert float(page.get_attribute("#progress", "value")) == 1.0
    assert _shot(page, tmp_path, "serving-page-txt2img.png").stat().st_size > 10_000


def test_page_inpaints_with_a_painted_mask(browser_page, demo_pipe, tmp_path):
    live, page = browser_page
    init = demo_pipe.txt2img(PROMPT, num_inference_steps=12, guidance_scale=5.0, seed=42, height=64, width=64,
                             progress=False).images[0]
    init_path = tmp_path / "init.png"
    init.save(init_path)
    page.click("label:has(input[value=inpaint])")  # the radio itself is hidden behind its label
    page.set_input_files("#init-file", str(init_path))
    _wait_for(page, "!document.getElementById('init-frame').classList.contains('hidden')",
              "the uploaded image to show", QUICK_TIMEOUT_S)
    page.fill("#prompt", "a yellow square on a blue background")
    page.fill("#seed", "7")
    page.fill("#brush", "14")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.7, steps=12)
    page.mouse.up()
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        page.click("#generate")
    _wait_done(page)
    body = json.loads(sent.value.post_data)
    mask = np.asarray(decode_image(body["mask"], "mask").convert("L"))
    assert mask.shape == (64, 64) and mask[32, 32] == 255 and mask[2, 2] == 0 and mask[60, 4] == 0
    assert 0.05 < (mask > 127).mean() < 0.5  # a painted diagonal stroke, not everything
    image = decode_image(body["init_images"][0], "init").convert("RGB")
    np.testing.assert_array_equal(as_array(image), as_array(init))  # the page sent the uploaded image as is
    got = pixels(page.get_attribute("#result", "src").split(",", 1)[1])
    want = demo_pipe.inpaint("a yellow square on a blue background", image=image,
                             mask_image=Image.fromarray(mask), strength=0.75, seed=7, num_inference_steps=12,
                             guidance_scale=5.0, scheduler="dpmpp_2m", karras=False, height=64, width=64,
                             progress=False, masked_content="original", mask_blur=0).images[0]
    # the page sends A1111's inpainting_fill 1 (original), mask_blur 0, whole picture: the server takes
    # A1111's inpainting path for every masked request (docs/serving.md)
    np.testing.assert_array_equal(got, as_array(want))
    assert not np.array_equal(got, as_array(init))
    assert _shot(page, tmp_path, "serving-page.png").stat().st_size > 10_000


def test_page_switches_to_an_sdxl_folder(playwright, demo_folder, tmp_path):
    """Two folders served side by side (SD 1.x and SDXL): the page lists both with their families, takes
    the picked one's sizes, and its request goes to that folder (override_settings.sd_model_checkpoint):
    the image is the SDXL pipeline's, bit for bit."""
    from export.build import build_engine

    sdxl = build_engine("tiny-sdxl", tmp_path / "tiny-sdxl", progress=lambda s: None)
    models = Models.from_folders([demo_folder, sdxl], lambda f: runtime.load(f, backend="onnxruntime"), max_resident=1)
    live = LiveServer(models)
    try:
        with _browser(playwright, live) as page:
            options = page.locator("#model-select option").all_text_contents()
            assert len(options) == 2 and "(sd1)" in options[0] and "(sdxl)" in options[1], options
            title = page.locator("#model-select option").nth(1).get_attribute("value")
            page.select_option("#model-select", title)
            assert "sdxl" in page.text_content("#model")
            with runtime.load(sdxl, backend="onnxruntime") as pipe:
                assert page.input_value("#width") == str(pipe.manifest.default_size[1])
                page.fill("#prompt", PROMPT)
                page.fill("#steps", "4")
                page.fill("#cfg", "5")
                page.fill("#seed", "3")
                page.select_option("#sampler", "Euler")
                page.fill("#width", "64")
                page.fill("#height", "64")
                with page.expect_request("**/sdapi/v1/txt2img") as sent:
                    page.click("#generate")
                _wait_done(page)
                assert json.loads(sent.value.post_data)["override_settings"] == {"sd_model_checkpoint": title}
                got = pixels(page.get_attribute("#result", "src").split(",", 1)[1])
                want = pipe.txt2img(PROMPT, num_inference_steps=4, guidance_scale=5.0, seed=3, scheduler="euler",
                                    karras=False, height=64, width=64, progress=False).images[0]
            np.testing.assert_array_equal(got, as_array(want))
            _shot(page, tmp_path, "serving-page-sdxl.png")
    finally:
        live.stop()
