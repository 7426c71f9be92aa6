"""The generation server (issue 14): A1111 and OpenAI endpoints against the pipeline's own results,
bad input, the bounded queue under load, batching, cancellation, timeouts, security, metrics and
the `serve` command's drain on SIGTERM. Live uvicorn servers on loopback, tiny random-weight models
(tests/conftest.py), ONNX Runtime."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

import runtime
from runtime.serving.queue import Batcher
from test_serve_support import LiveServer, as_array, free_port, picture, pixels, png_b64, sd1_pipe  # noqa: F401

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")

STEPS = 3


@pytest.fixture(scope="module")
def server(sd1_pipe):
    live = LiveServer(sd1_pipe, max_queue=16)
    yield live
    live.stop()


def _alone(pipe, prompt, seed, **kw):
    settings = dict(num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64, progress=False)
    settings.update(kw)
    return as_array(pipe.txt2img(prompt, seed=seed, **settings).images[0])


# --- A1111 and OpenAI: the images are the pipeline's -------------------------------------------------------

def test_txt2img_batch_and_iterations_match_the_pipeline(server, sd1_pipe):
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "steps": STEPS, "seed": 11, "batch_size": 2,
            "n_iter": 2, "sampler_name": "Euler a", "width": 64, "height": 64, "cfg_scale": 7}
    r = server.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert info["sampler_name"] == "Euler a" and info["steps"] == STEPS and info["batch_size"] == 2
    assert len(data["images"]) == 4 and data["parameters"]["prompt"] == "a red circle"
    for k, b64 in enumerate(data["images"]):
        want = _alone(sd1_pipe, "a red circle", 11 + k, negative_prompt="blurry", scheduler="euler_a", karras=False)
        np.testing.assert_array_equal(pixels(b64), want, err_msg=f"image {k}")
    from PIL import Image
    import io
    png = Image.open(io.BytesIO(base64.b64decode(data["images"][1])))
    assert png.info["parameters"] == info["infotexts"][1]
    assert "Seed: 12, Size: 64x64" in png.info["parameters"] and "Sampler: Euler a" in png.info["parameters"]


def test_random_seed_is_reported_and_reproduces(server, sd1_pipe):
    data = server.post("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": STEPS, "seed": -1, "width": 64,
                                             "height": 64, "sampler_name": "DPM++ 2M Karras"}).json()
    seed = json.loads(data["info"])["seed"]
    assert seed >= 0
    want = _alone(sd1_pipe, "a cat", seed, scheduler="dpmpp_2m", karras=True)
    np.testing.assert_array_equal(pixels(data["images"][0]), want)


def test_openai_generations_match_the_pipeline(server, sd1_pipe):
    r = server.post("/v1/images/generations", {"prompt": "a blue square", "n": 5, "size": "64x48",
                                               "response_format": "b64_json",
                                               "sd_runtime": {"seed": 3, "steps": STEPS, "sampler": "ddim"}})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 5  # 5 images over max batch 4: two engine jobs
    for k, item in enumerate(data):
        want = _alone(sd1_pipe, "a blue square", 3 + k, scheduler="ddim", guidance_scale=7.5, height=48, width=64)
        np.testing.assert_array_equal(pixels(item["b64_json"]), want, err_msg=f"image {k}")


def test_info_endpoints(server):
    samplers = server.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M", "DDIM", "PLMS", "UniPC", "LCM"} <= {s["name"] for s in samplers}
    assert next(s for s in samplers if s["name"] == "Euler a")["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    models = server.get("/sdapi/v1/sd-models").json()
    assert len(models) == 1 and models[0]["model_name"] == "tiny-sd1" and models[0]["title"].startswith("tiny-sd1")
    options = server.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"] and options["CLIP_stop_at_last_layers"] == 1
    assert server.post("/sdapi/v1/options", {"sd_model_checkpoint": models[0]["title"]}).status_code == 200
    r = server.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2})
    assert r.status_code == 422 and "CLIP_stop_at_last_layers" in r.json()["detail"]
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "onnxruntime"
    assert server.get("/").text.startswith("<!doctype html>")


# --- bad input: a 4xx naming the problem, then a good request succeeds --------------------------------------

BIG = base64.b64encode(b"x" * 600_000).decode()
BAD = [
    ("txt2img", b'{"prompt": "a cat", "steps": ', 422, "malformed JSON"),
    ("txt2img", {"prompt": "a cat", "steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {"prompt": ["a", "b"]}, 422, "prompt: Input should be a valid string"),
    ("txt2img", {"prompt": "a cat", "cfg_scale": {"x": 1}}, 422, "cfg_scale: Input should be a valid number"),
    ("txt2img", {"prompt": "a cat", "width": 100000}, 422, "width: height and width must be within the engine's image range [32, 128] pixels; got 64x100000"),
    ("txt2img", {"prompt": "a cat", "height": 16}, 422, "height: height and width must be within the engine's image range [32, 128] pixels; got 16x64"),
    ("txt2img", {"prompt": "a cat", "height": 65}, 422, "height: height and width must be multiples of the VAE scale factor 2; got 65x64"),
    ("txt2img", {"prompt": "a cat", "steps": 100000}, 422, "steps: 100000 is outside [1, 150]"),
    ("txt2img", {"prompt": "a cat", "steps": 0}, 422, "steps: 0 is outside [1, 150]"),
    ("txt2img", {"prompt": "a cat", "batch_size": 64}, 422, "batch_size: 64 images in one call exceed the engine's max batch 4"),
    ("txt2img", {"prompt": "a cat", "n_iter": 1000}, 422, "n_iter: 1000 is outside [1, 16]"),
    ("txt2img", {"prompt": "a cat", "sampler_name": "Euler Magic"}, 422, "sampler_name: A1111 sampler 'Euler Magic' has no counterpart"),
    ("txt2img", {"prompt": "a cat", "sampler_name": "Euler", "scheduler": "Exponential"}, 422, "schedule type 'Exponential'"),
    ("txt2img", {"prompt": "a cat", "sampler_name": "LCM", "scheduler": "Karras"}, 422, "sampler_name: scheduler 'lcm': karras sigmas do not apply to 'lcm'"),
    ("txt2img", {"prompt": "a cat", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 422,
     "hr_upscaler: upscaler 'R-ESRGAN 4x+' needs weights"),
    ("txt2img", {"prompt": "a cat", "restore_faces": True}, 422, "restore_faces: face restoration is not implemented"),
    ("txt2img", {"prompt": "a cat", "subseed_strength": 1.5}, 422, "subseed_strength: 1.5 is outside [0, 1]"),
    ("txt2img", {"prompt": "a cat", "sampler_name": "Euler a", "eta": 0.5}, 422, "eta: the ancestral sampler runs with eta 1"),
    ("txt2img", {"prompt": "a cat", "alwayson_scripts": {"ControlNet": {"args": []}}}, 422, "alwayson_scripts.ControlNet"),
    ("txt2img", {"prompt": "a cat", "override_settings": {"sd_model_checkpoint": "sdxl"}}, 422, "override_settings.sd_model_checkpoint: model 'sdxl' is not served here"),
    ("txt2img", {"prompt": "a cat", "save_images": True}, 422, "save_images: this server writes no files"),
    ("txt2img", {"prompt": "a cat", "lora_scale": 1}, 422, "lora_scale: Extra inputs are not permitted"),
    ("txt2img", {"prompt": "a cat", "sd_runtime": {"cache_interval": 3}}, 422, "sd_runtime.cache_interval"),
    ("img2img", {"prompt": "a cat"}, 422, "init_images: img2img needs at least one init image"),
    ("img2img", {"prompt": "a cat", "init_images": ["not base64 at all!"]}, 422, "init_images[0]: invalid base64"),
    ("img2img", {"prompt": "a cat", "init_images": [base64.b64encode(b"GIF89a broken").decode()]}, 422,
     "init_images[0]: not a decodable image"),
    ("img2img", {"prompt": "a cat", "init_images": ["/etc/passwd"]}, 422, "fetches no URLs and reads no paths"),
    ("img2img", {"prompt": "a cat", "init_images": ["https://example.com/a.png"]}, 422, "fetches no URLs"),
    ("img2img", {"prompt": "a cat", "init_images": [png_b64(picture(0))], "mask": png_b64(picture(0, (32, 48))),
                 "inpainting_fill": 1, "inpaint_full_res": False}, 422,
     "mask: the mask is 48x32 but init_images[0] is 64x64; they must have the same size"),
    ("img2img", {"prompt": "a cat", "init_images": [png_b64(picture(0))], "mask": png_b64(picture(0)),
                 "inpainting_fill": 5}, 422, "inpainting_fill: 5: send 0 (fill), 1 (original)"),
    ("img2img", {"prompt": "a cat", "init_images": [png_b64(picture(0))], "denoising_strength": 1.5}, 422,
     "strength must be in (0, 1]"),
    ("generations", {"prompt": "a cat", "size": "1024x1024"}, 400, "size: height and width must be within the engine's image range [32, 128] pixels; got 1024x1024"),
    ("generations", {"prompt": "a cat", "response_format": "url"}, 400, "'url' is not supported"),
    ("generations", {"prompt": "a cat", "n": 50}, 400, "n: Input should be less than or equal to 10"),
    ("generations", {"prompt": "a cat", "quality": "hd"}, 400, "quality: 'hd' is not supported"),
    ("txt2img", {"prompt": "a cat", "negative_prompt": BIG * 4}, 413, "request body over the limit of 2097152 bytes"),
]


@pytest.fixture(scope="module")
def small_server(sd1_pipe):
    live = LiveServer(sd1_pipe, max_body_bytes=2 * 2**20)
    yield live
    live.stop()


@pytest.mark.parametrize("endpoint, body, status, message", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_named_and_the_server_keeps_serving(small_server, endpoint, body, status, message):
    path = "/v1/images/generations" if endpoint == "generations" else f"/sdapi/v1/{endpoint}"
    if isinstance(body, bytes):
        r = small_server.post(path, data=body, headers={"content-type": "application/json"})
    else:
        r = small_server.post(path, body)
    assert r.status_code == status, r.text[:500]
    payload = r.json()
    text = payload["error"]["message"] if endpoint == "generations" else payload["detail"]
    assert message in text
    good = small_server.post("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 1, "seed": 1, "width": 32,
                                                    "height": 32})
    assert good.status_code == 200 and len(good.json()["images"]) == 1


def test_a_chunked_body_over_the_limit_is_refused(small_server):
    def chunks():
        for _ in range(5):
            yield b" " * 2**20
    r = requests.post(small_server.url + "/sdapi/v1/txt2img", data=chunks(), headers={"content-type": "application/json"},
                      timeout=60)
    assert r.status_code == 413 and "over the limit of 2097152 bytes" in r.json()["detail"]


# --- load: bounded queue, 503 with Retry-After, none lost or duplicated --------------------------------------

def test_load_64_requests_from_16_clients(sd1_pipe):
    live = LiveServer(sd1_pipe, max_queue=6)
    try:
        def one(k: int):
            body = {"prompt": f"request {k}", "steps": 2, "seed": 1000 + k, "width": 32 + 4 * (k % 3), "height": 32,
                    "sampler_name": ["Euler", "DDIM"][k % 2]}
            t0 = time.monotonic()
            r = live.post("/sdapi/v1/txt2img", body, timeout=180)
            return k, r, time.monotonic() - t0

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(64)))
        elapsed = time.monotonic() - t0
        ok = [(k, r) for k, r, _ in answers if r.status_code == 200]
        busy = [(k, r) for k, r, _ in answers if r.status_code == 503]
        assert len(ok) + len(busy) == 64, sorted({r.status_code for _, r, _ in answers})
        for k, r in busy:
            assert int(r.headers["Retry-After"]) >= 1 and "the server is busy" in r.json()["detail"]
        seeds = [json.loads(r.json()["info"])["all_seeds"] for _, r in ok]
        assert sorted(s for (s,) in seeds) == sorted(1000 + k for k, _ in ok)  # each its own, once
        assert all(len(r.json()["images"]) == 1 for _, r in ok)
        assert len(ok) >= 6 and elapsed < 240
        assert live.metric("sdrt_requests_total", endpoint="/sdapi/v1/txt2img", outcome="ok") == len(ok)
        assert live.metric("sdrt_requests_total", endpoint="/sdapi/v1/txt2img", outcome="rejected") == len(busy)
        latencies = sorted(t for _, r, t in answers if r.status_code == 200)
        print(f"\nload: 64 requests, 16 clients: {len(ok)} ok, {len(busy)} x 503 in {elapsed:.1f} s; "
              f"ok latency p50 {latencies[len(latencies) // 2]:.2f} s, max {latencies[-1]:.2f} s")
        # the server still serves, and what it served is right
        k, r = ok[0]
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), _alone(
            sd1_pipe, f"request {k}", 1000 + k, num_inference_steps=2, width=32 + 4 * (k % 3), height=32,
            scheduler=["euler", "ddim"][k % 2], karras=False if k % 2 == 0 else None))
    finally:
        live.stop()


# --- batching ------------------------------------------------------------------------------------------------

def test_compatible_queued_requests_run_as_one_batch(sd1_pipe):
    batches: list[list[str]] = []
    batcher = Batcher(sd1_pipe, on_batch=lambda jobs, out, s: batches.append([j.task_id for j in jobs]))
    try:
        blocker = batcher.submit(sd1_pipe.request("txt2img", "slow", num_inference_steps=20, seed=0), task_id="A")
        compatible = [sd1_pipe.request("txt2img", p, num_inference_steps=STEPS, seed=s, guidance_scale=6.0,
                                       output_type="np")
                      for p, s in (("a red circle", 1), ("two blue squares on green", 2), ("a star", 3))]
        other = sd1_pipe.request("txt2img", "a star", num_inference_steps=STEPS + 1, seed=3, output_type="np")
        jobs = [batcher.submit(r, task_id=t) for r, t in zip(compatible + [other], "BCDE")]
        results = [j.future.result(120) for j in jobs]
        blocker.future.result(120)
    finally:
        batcher.close()
    assert batches == [["A"], ["B", "C", "D"], ["E"]]
    for r, got in zip(compatible, results[:3]):
        alone = sd1_pipe.generate([r], progress=False)[0].images
        np.testing.assert_array_equal(got.images, alone)


# --- cancellation, interrupt, timeout -----------------------------------------------------------------------

def _wait_running(live, task_id, min_step=1, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = live.get(f"/sdapi/v1/progress?sd_runtime_task_id={task_id}").json()
        if p["state"]["sd_runtime"]["status"] == "running" and p["state"]["sampling_step"] >= min_step:
            return p
        time.sleep(0.05)
    raise AssertionError(f"{task_id} never ran")


def test_progress_and_interrupt_return_the_current_image(server):
    body = {"prompt": "a long one", "steps": 150, "seed": 4, "width": 64, "height": 64, "force_task_id": "long-1"}
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", server.post("/sdapi/v1/txt2img", body)))
    t.start()
    p = _wait_running(server, "long-1", min_step=2)
    assert p["state"]["sampling_steps"] == 150 and 0 < p["progress"] < 1 and p["eta_relative"] > 0
    s = server.pipe.limits.vae_scale_factor
    assert p["current_image"] is not None and pixels(p["current_image"]).shape == (64 // s, 64 // s, 3)  # latents
    assert server.post("/sdapi/v1/interrupt").json() == {}
    t.join(60)
    r = out["r"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sd_runtime"]["stopped"] == "interrupted"
    assert len(r.json()["images"]) == 1 and pixels(r.json()["images"][0]).shape == (64, 64, 3)
    assert server.metric("sdrt_requests_total", endpoint="/sdapi/v1/txt2img", outcome="interrupted") == 1


def test_a_client_that_disconnects_cancels_its_steps(server):
    body = {"prompt": "abandoned", "steps": 150, "seed": 5, "width": 64, "height": 64, "force_task_id": "gone-1"}
    with pytest.raises(requests.exceptions.ReadTimeout):
        server.post("/sdapi/v1/txt2img", body, timeout=1.5)
    deadline = time.monotonic() + 30
    while server.service.batcher.find("gone-1") is not None:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.05)
    assert server.service.batcher.depth == 0 and not server.service.batcher.running
    r = server.post("/sdapi/v1/txt2img", {"prompt": "next", "steps": 1, "seed": 1, "width": 32, "height": 32})
    assert r.status_code == 200


def test_timeout_answers_504_and_frees_the_engine(sd1_pipe):
    live = LiveServer(sd1_pipe, timeout=1.0)
    try:
        t0 = time.monotonic()
        r = live.post("/sdapi/v1/txt2img", {"prompt": "slow", "steps": 150, "seed": 1, "width": 128, "height": 128})
        assert r.status_code == 504 and "did not finish within 1 s" in r.json()["detail"]
        assert time.monotonic() - t0 < 30
        good = live.post("/sdapi/v1/txt2img", {"prompt": "quick", "steps": 1, "seed": 1, "width": 32, "height": 32})
        assert good.status_code == 200
    finally:
        live.stop()


# --- security ------------------------------------------------------------------------------------------------

def test_api_key_and_cors(sd1_pipe):
    live = LiveServer(sd1_pipe, api_key="s3cret", cors_origins=("http://allowed.example",))
    try:
        body = {"prompt": "a cat", "steps": 1, "seed": 1, "width": 32, "height": 32}
        assert live.post("/sdapi/v1/txt2img", body).status_code == 401
        r = live.post("/sdapi/v1/txt2img", body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "API key" in r.json()["detail"] and "Bearer" in r.headers["WWW-Authenticate"]
        assert live.post("/sdapi/v1/txt2img", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        basic = base64.b64encode(b"anyone:s3cret").decode()
        assert live.get("/sdapi/v1/samplers", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert live.get("/metrics").status_code == 401
        assert live.get("/health").status_code == 200 and live.get("/").status_code == 200
        r = live.get("/health", headers={"Origin": "http://allowed.example"})
        assert r.headers["access-control-allow-origin"] == "http://allowed.example"
    finally:
        live.stop()


def test_cors_is_off_by_default(server):
    r = server.get("/health", headers={"Origin": "http://elsewhere.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_metrics_count_outcomes_and_stage_latency(server):
    before = server.metric("sdrt_requests_total", endpoint="/sdapi/v1/txt2img", outcome="bad_request")
    server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": "x"})
    server.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "seed": 1, "width": 32, "height": 32})
    assert server.metric("sdrt_requests_total", endpoint="/sdapi/v1/txt2img", outcome="bad_request") == before + 1
    assert server.metric("sdrt_stage_seconds_count", stage="denoise") >= 1
    assert server.metric("sdrt_stage_seconds_count", stage="queue_wait") >= 1
    assert server.metric("sdrt_queue_depth") == 0


# --- the command: serve, drain on SIGTERM, exit 0 ---------------------------------------------------------------

def test_serve_command_drains_on_sigterm_and_exits_0(tiny_sd1_engine):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", str(tiny_sd1_engine), "--port", str(port),
                             "--backend", "onnxruntime", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        out = {}
        body = {"prompt": "in flight", "steps": 40, "seed": 2, "width": 64, "height": 64, "force_task_id": "drain"}
        t = threading.Thread(target=lambda: out.setdefault("r", requests.post(url + "/sdapi/v1/txt2img", json=body,
                                                                                timeout=300)))
        t.start()
        while requests.get(url + "/sdapi/v1/progress?sd_runtime_task_id=drain").json()["state"]["sampling_step"] < 1:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t.join(300)
        assert out["r"].status_code == 200 and len(out["r"].json()["images"]) == 1
        assert "stopped" not in json.loads(out["r"].json()["info"])["sd_runtime"]
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_reports_a_bad_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime", "serve", str(tmp_path / "missing")], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "SDRT_API_KEY": ""})
    assert r.returncode == 2 and "python -m runtime serve: error:" in r.stderr


def test_runtime_load_results_equal_server_for_plain_pipeline(sd1_pipe):
    """The equality above is not vacuous: another seed gives another image."""
    assert not np.array_equal(_alone(sd1_pipe, "a cat", 1), _alone(sd1_pipe, "a cat", 2))
    assert isinstance(sd1_pipe, runtime.Pipeline)
