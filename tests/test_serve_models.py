"""Serving several engine folders (issue 26, runtime/serving/models.py) and A1111 LoRA tags in
prompts (runtime/text/lora_tags.py), with real servers over two tiny folders: tiny-sd1 as built by
conftest, and tiny-sd1 built with a LoRA ("ink", weight 0.8) fused. Every image is compared bit for
bit with what the Python API gives on the folder it should have run on; the unchanged `webuiapi`
client switches models as A1111 users do."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import runtime
from export.build import build_engine
from export.loading.read import random_model
from runtime.cli import main as cli_main
from runtime.errors import PipelineError
from runtime.serving import server as serve_cli
from runtime.serving.models import ModelBusy, Models, describe
from runtime.serving.queue import Batcher
from runtime.text.lora_tags import LoraTag, parse_prompts
from test_serve_support import QUICK_TIMEOUT_S, REQUEST_TIMEOUT_S, LiveServer, as_array, join, pixels

STEPS = 3
SETTINGS = dict(num_inference_steps=STEPS, guidance_scale=7.0, height=64, width=64, progress=False)
WEIGHT = 0.8
TAG = f"<lora:ink:{WEIGHT}>"


def make_lora(path: Path, seed: int = 11) -> Path:
    """A kohya-layout LoRA (rank 2, alpha 2) on tiny-sd1's attention q/v projections, in the U-Net
    and the text encoder, large enough to change the image."""
    model = random_model("tiny-sd1", seed=0)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, net in (("lora_unet_", model.unet), ("lora_te_text_model_", model.text_encoder)):
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_v", "q_proj", "v_proj")):
                stem = prefix + name.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = torch.randn(2, module.in_features, generator=g) * 0.5
                tensors[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.5
                tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def folders(tiny_sd1_engine, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multi")
    lora = make_lora(root / "ink.safetensors")
    ink = build_engine("tiny-sd1", root / "tiny-sd1-ink", seed=0, loras=[f"{lora}:{WEIGHT}"],
                       progress=lambda line: None)
    return tiny_sd1_engine, ink


@pytest.fixture(scope="module")
def pipes(folders):
    """The Python API's pipelines over both folders: the reference of every image."""
    with runtime.load(folders[0], backend="onnxruntime") as base, runtime.load(folders[1], backend="onnxruntime") as ink:
        yield base, ink


def _open(folder: Path):
    return runtime.load(folder, backend="onnxruntime")


def _server(folders, max_resident: int = 1) -> LiveServer:
    return LiveServer(Models.from_folders(list(folders), _open, max_resident=max_resident))


@pytest.fixture(scope="module")
def live(folders):
    server = _server(folders)
    yield server
    server.stop()


def _txt2img(live: LiveServer, prompt: str, seed: int, model: str | None = None, **extra):
    body = dict(prompt=prompt, seed=seed, steps=STEPS, cfg_scale=7.0, width=64, height=64, sampler_name="Euler",
                **extra)
    if model is not None:
        body["override_settings"] = {"sd_model_checkpoint": model}
    return live.post("/sdapi/v1/txt2img", body)


def _image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return pixels(response.json()["images"][0])


def _names(titles) -> list[str]:
    """Model names of A1111 titles ("name [hash]")."""
    return [t.split(" [")[0] for t in titles]


def _title(live: LiveServer, name: str) -> str:
    return next(m["title"] for m in live.get("/sdapi/v1/sd-models").json() if m["model_name"] == name)


def _want(pipe, prompt: str, seed: int) -> np.ndarray:
    return as_array(pipe.txt2img(prompt, seed=seed, scheduler="euler", karras=False, **SETTINGS).images[0])


# --- listing, picking, the default ------------------------------------------------------------------------

def test_sd_models_lists_every_folder_with_a1111s_fields(live):
    models = live.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny-sd1", "tiny-sd1-ink"]  # same source: named by folder
    for m in models:
        assert set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert m["filename"] == m["model_name"] and m["title"] == f"{m['model_name']} [{m['hash']}]"
        assert m["sha256"].startswith(m["hash"]) and len(m["hash"]) == 10
    assert live.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]
    info = live.get("/sd_runtime/v1/info").json()
    assert info["models"] == [m["title"] for m in models] and info["max_resident"] == 1


@pytest.mark.parametrize("spelling", ["{title}", "{name}", "{name} [0123456789]", "{name}.safetensors"])
def test_override_picks_the_folder_bit_for_bit(live, pipes, spelling):
    base, ink = pipes
    name = "tiny-sd1-ink"
    got = _image(_txt2img(live, "a red circle", 5, spelling.format(title=_title(live, name), name=name)))
    np.testing.assert_array_equal(got, _want(ink, "a red circle", 5))
    plain = _image(_txt2img(live, "a red circle", 5, "tiny-sd1"))
    np.testing.assert_array_equal(plain, _want(base, "a red circle", 5))
    assert not np.array_equal(got, plain), "the LoRA folder gave the base folder's image"


def test_options_set_the_default_model(live, pipes):
    try:
        assert live.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1-ink"}).status_code == 200
        assert live.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == _title(live, "tiny-sd1-ink")
        np.testing.assert_array_equal(_image(_txt2img(live, "a fox", 2)), _want(pipes[1], "a fox", 2))
        r = live.post("/sdapi/v1/options", {"sd_model_checkpoint": "sdxl-turbo"})
        assert r.status_code == 422 and r.json()["detail"].startswith("sd_model_checkpoint: model 'sdxl-turbo' is "
                                                                      "not served here")
        assert live.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == _title(live, "tiny-sd1-ink")
    finally:
        live.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1"})
    np.testing.assert_array_equal(_image(_txt2img(live, "a fox", 2)), _want(pipes[0], "a fox", 2))


def test_unknown_model_is_a_4xx_naming_it(live):
    r = _txt2img(live, "a cat", 1, "dreamshaper_8")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("override_settings.sd_model_checkpoint: model 'dreamshaper_8' is not served here")
    assert f"{_title(live, 'tiny-sd1')!r}, {_title(live, 'tiny-sd1-ink')!r}" in detail
    r = live.post("/v1/images/generations", {"prompt": "a cat", "model": "dreamshaper_8"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "'dreamshaper_8' is not served here" in r.json()["error"]["message"]


def test_openai_model_field_picks_the_folder(live, pipes):
    body = {"prompt": "a blue square", "model": "tiny-sd1-ink", "size": "64x64",
            "sd_runtime": {"seed": 9, "steps": STEPS, "sampler": "ddim"}}
    r = live.post("/v1/images/generations", body)
    assert r.status_code == 200, r.text
    want = pipes[1].txt2img("a blue square", seed=9, scheduler="ddim", num_inference_steps=STEPS, guidance_scale=7.5,
                            height=64, width=64, progress=False).images[0]
    np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), as_array(want))


# --- bounded memory: least recently used folders close --------------------------------------------------

def test_least_recently_used_folder_closes_and_reopens(folders, pipes):
    live = _server(folders, max_resident=1)
    try:
        models = live.service.models
        base, ink = models.models
        first = models.pipe_if_open(base)
        assert _names(models.resident()) == ["tiny-sd1"] and first is not None
        np.testing.assert_array_equal(_image(_txt2img(live, "a tree", 3, "tiny-sd1-ink")), _want(pipes[1], "a tree", 3))
        assert _names(models.resident()) == ["tiny-sd1-ink"]
        assert first.engines["unet"].closed, "the least recently used folder stayed open"
        assert _names(live.get("/health").json()["resident"]) == ["tiny-sd1-ink"]
        np.testing.assert_array_equal(_image(_txt2img(live, "a tree", 3)), _want(pipes[0], "a tree", 3))
        assert _names(models.resident()) == ["tiny-sd1"]
        assert {_names([t])[0]: n for t, n in models.opened.items()} == {"tiny-sd1": 2, "tiny-sd1-ink": 1}
    finally:
        live.stop()
    two = _server(folders, max_resident=2)
    try:
        _image(_txt2img(two, "a tree", 3, "tiny-sd1-ink"))
        _image(_txt2img(two, "a tree", 3))
        assert _names(two.service.models.resident()) == ["tiny-sd1-ink", "tiny-sd1"]  # least recently used first
        assert sorted(two.service.models.opened.values()) == [1, 1]
    finally:
        two.stop()


class _FakePipe:
    def __init__(self, folder):
        self.folder, self.closed = folder, False

    def close(self):
        self.closed = True


def test_a_folder_in_use_is_never_closed_the_next_waits(folders):
    """max_resident 1: while a request uses folder A, folder B cannot open (ModelBusy after the wait);
    once A is released B opens, closing A."""
    models = Models([describe(f) for f in folders], lambda m: _FakePipe(m.engine_dir), max_resident=1)
    a, b = models.models
    pipe_a = models.acquire(a, timeout=0.0)
    with pytest.raises(ModelBusy, match="--max-resident 1"):
        models.acquire(b, timeout=0.05)
    assert not pipe_a.closed
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("b", models.acquire(b, timeout=QUICK_TIMEOUT_S)))
    waiter.start()
    models.release(a)
    join(waiter, "folder B to open once A was released", QUICK_TIMEOUT_S)
    assert pipe_a.closed and got["b"].folder == folders[1] and _names(models.resident()) == ["tiny-sd1-ink"]
    models.release(b)
    models.close()
    assert got["b"].closed


def test_the_batcher_never_batches_two_folders_together(pipes):
    base, ink = pipes
    batches: list[list[str]] = []
    batcher = Batcher(on_batch=lambda jobs, out, s: batches.append([j.task_id for j in jobs]))
    settings = dict(num_inference_steps=STEPS, output_type="np", height=64, width=64)
    try:
        blocker = batcher.submit(base.request("txt2img", "slow", num_inference_steps=20, seed=0), pipe=base,
                                 task_id="A0")
        jobs = [batcher.submit(p.request("txt2img", "a cat", seed=s, **settings), pipe=p, task_id=t)
                for p, s, t in ((base, 1, "A1"), (ink, 2, "B1"), (base, 3, "A2"), (ink, 4, "B2"))]
        results = [j.future.result(REQUEST_TIMEOUT_S) for j in jobs]
        blocker.future.result(REQUEST_TIMEOUT_S)
    finally:
        batcher.close()
    assert batches == [["A0"], ["A1", "A2"], ["B1", "B2"]]
    for (p, s), got in zip(((base, 1), (ink, 2), (base, 3), (ink, 4)), results):
        np.testing.assert_array_equal(got.images, p.txt2img("a cat", seed=s, **settings, progress=False).images)


# --- LoRA tags ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [f"a cat, {TAG}", f"{TAG} a cat", f"a cat, <lyco:ink:{WEIGHT}>",
                                    f"a cat <lora:ink:te={WEIGHT}:unet={WEIGHT}>"])
def test_a_lora_tag_routes_to_the_folder_built_with_it(live, pipes, prompt):
    base, ink = pipes
    r = _txt2img(live, prompt, 4)  # the default folder, tiny-sd1, has no LoRA
    np.testing.assert_array_equal(_image(r), _want(ink, "a cat", 4))
    np.testing.assert_array_equal(_image(r), _want(ink, prompt, 4))  # the Python API strips it alike
    info = json.loads(r.json()["info"])
    assert info["prompt"] == prompt and info["sd_model_name"] == "tiny-sd1-ink"  # kept in the infotext, as A1111
    assert not np.array_equal(_image(r), _want(base, "a cat", 4))


def test_a_tag_the_selected_folder_has_is_just_stripped(live, pipes):
    r = _txt2img(live, f"a cat {TAG}", 6, "tiny-sd1-ink")
    np.testing.assert_array_equal(_image(r), _want(pipes[1], "a cat", 6))


@pytest.mark.parametrize("prompt, message", [
    ("a cat <lora:ink:0.5>", "prompt: LoRA tag(s) <lora:ink:0.5>: no served folder was built with that LoRA at "
                             "that weight"),
    ("a cat <lora:watercolor:1>", "prompt: LoRA tag(s) <lora:watercolor:1>: no served folder"),
    ("a cat <lora:ink>", "prompt: LoRA tag(s) <lora:ink>:"),
])
def test_a_tag_no_folder_has_is_refused_naming_it_and_the_offers(live, prompt, message):
    r = _txt2img(live, prompt, 1)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(message), detail
    assert f"served: {_title(live, 'tiny-sd1')}: no LoRA; {_title(live, 'tiny-sd1-ink')}: <lora:ink:0.8>" in detail


@pytest.mark.parametrize("body, message", [
    ({"prompt": "a cat <lora:ink:strong>"}, "prompt: LoRA tag <lora:ink:strong>: weight 'strong' is not a number"),
    ({"prompt": "a cat <lora::1>"}, "prompt: LoRA tag <lora::1>: no LoRA name"),
    ({"prompt": "a cat <lora:ink:0.8"}, "prompt: unclosed LoRA tag at '<lora:ink:0.8'"),
    ({"prompt": "a cat <lora:ink:0.8:0.4>"}, "prompt: LoRA tag <lora:ink:0.8:0.4>: text-encoder weight 0.8 and "
                                             "U-Net weight 0.4 differ"),
    ({"prompt": "a cat <lora:ink:0.8:0.8:4>"}, "prompt: LoRA tag <lora:ink:0.8:0.8:4>: dyn"),
    ({"prompt": "a <lora:ink:0.8> <lora:ink:1>"}, "prompt: LoRA tags <lora:ink:0.8> and <lora:ink:1>: one LoRA at"),
    ({"prompt": "a cat", "negative_prompt": "ugly <lora:ink:0.8>"}, "negative_prompt: LoRA tag <lora:ink:0.8> in "
                                                                    "the negative prompt"),
    ({"prompt": f"a cat {TAG}", "disable_extra_networks": True}, "disable_extra_networks: LoRA tags are honoured"),
])
def test_bad_tag_syntax_is_a_422_naming_the_field(live, body, message):
    r = live.post("/sdapi/v1/txt2img", {"steps": STEPS, "width": 64, "height": 64, **body})
    assert r.status_code == 422 and r.json()["detail"].startswith(message), r.text


def test_openai_prompts_route_by_tag_too(live, pipes):
    body = {"prompt": f"a blue square {TAG}", "size": "64x64", "sd_runtime": {"seed": 9, "steps": STEPS}}
    r = live.post("/v1/images/generations", body)
    assert r.status_code == 200, r.text
    want = pipes[1].txt2img("a blue square", seed=9, num_inference_steps=STEPS, guidance_scale=7.5, height=64,
                            width=64, progress=False).images[0]
    np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), as_array(want))
    r = live.post("/v1/images/generations", {**body, "prompt": "a <lora:ink:2>"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_python_api_honours_or_refuses_tags_on_its_folder(pipes):
    base, ink = pipes
    with pytest.raises(PipelineError, match=r"LoRA tag <lora:ink:0.8> cannot be honoured: engine folder tiny-sd1 "
                                            r"was built with no LoRA") as e:
        base.txt2img(f"a cat {TAG}", seed=1, **SETTINGS)
    assert e.value.field == "prompt"
    with pytest.raises(PipelineError, match=r"<lora:ink:1> cannot be honoured.*built with <lora:ink:0.8>"):
        ink.txt2img("a cat <lora:ink:1>", seed=1, **SETTINGS)
    with pytest.raises(PipelineError, match="hires prompt"):
        from runtime.hires import HiresFix

        ink.txt2img("a cat", seed=1, hires=HiresFix(scale=1.5, prompt="a cat <lora:ink:1>"), **SETTINGS)
    tagged = ink.txt2img(f"a cat, {TAG}", seed=1, output_type="np", **SETTINGS)
    plain = ink.txt2img("a cat", seed=1, output_type="np", **SETTINGS)
    np.testing.assert_array_equal(tagged.images, plain.images)
    assert tagged.parameters["prompt"] == f"a cat, {TAG}"  # what reproduces it


def test_cli_reads_tags_the_same_way(folders, tmp_path, capsys):
    args = ["txt2img", str(folders[0]), f"a cat {TAG}", "--steps", "2", "--backend", "onnxruntime", "--no-progress",
            "-o", str(tmp_path / "x.png")]
    assert cli_main(args) == 2
    assert "LoRA tag <lora:ink:0.8> cannot be honoured" in capsys.readouterr().err
    args[1] = str(folders[1])
    assert cli_main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "x.png").is_file()


def test_tags_parse_as_a1111_reads_them():
    t = parse_prompts([f"masterpiece, {TAG}, a cat <lyco:paper> BREAK (red:1.2) <hypernet:x:1> <3"])
    assert t.text == ("masterpiece, a cat BREAK (red:1.2) <hypernet:x:1> <3",)
    assert t.tags == (LoraTag("ink", 0.8, TAG), LoraTag("paper", 1.0, "<lyco:paper>"))
    assert parse_prompts(["a <lora:ink:unet=0.5:te=0.5>"]).tags[0].weight == 0.5
    assert parse_prompts(["no tags,  here "]).text == ("no tags,  here ",)  # untouched without tags


# --- the unchanged A1111 client ---------------------------------------------------------------------------

def test_webuiapi_lists_and_switches_models(live, pipes):
    webuiapi = pytest.importorskip("webuiapi", reason="the dev extra installs webuiapi")
    import functools

    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler", steps=STEPS)
    api.session.request = functools.partial(api.session.request, timeout=REQUEST_TIMEOUT_S)
    titles = [_title(live, "tiny-sd1"), _title(live, "tiny-sd1-ink")]
    assert [m["title"] for m in api.get_sd_models()] == titles and api.util_get_model_names() == titles
    try:
        api.util_set_model("tiny-sd1-ink")  # webuiapi picks the closest title and POSTs it to /options
        assert api.util_get_current_model() == titles[1]
        r = api.txt2img(prompt="a lighthouse", seed=12, width=64, height=64, cfg_scale=7.0)
        np.testing.assert_array_equal(as_array(r.image), _want(pipes[1], "a lighthouse", 12))
        assert r.info["sd_model_name"] == "tiny-sd1-ink"
    finally:
        api.util_set_model(titles[0], find_closest=False)
    assert api.util_get_current_model() == titles[0]
    r = api.txt2img(prompt=f"a lighthouse {TAG}", seed=12, width=64, height=64, cfg_scale=7.0)
    np.testing.assert_array_equal(as_array(r.image), _want(pipes[1], "a lighthouse", 12))


# --- the command line ---------------------------------------------------------------------------------------

def test_serve_takes_several_folders(tmp_path, capsys):
    args = serve_cli.build_parser().parse_args(["a", "b", "--model", "c", "--max-resident", "2"])
    assert serve_cli.folders_from_args(args) == ["a", "b", "c"] and args.max_resident == 2
    assert serve_cli.build_parser().parse_args(["a"]).max_resident == 1
    assert serve_cli.main([]) == 2 and "at least one engine folder" in capsys.readouterr().err
    assert serve_cli.main(["a", "--max-resident", "0"]) == 2 and "--max-resident" in capsys.readouterr().err
    assert serve_cli.main([str(tmp_path / "missing"), "--model", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
