"""Plumbing of the peers that run in their own venvs (benchmarks/peers: optimum-intel,
stable-diffusion.cpp). CI has neither venv, so these tests never import optimum or
stable_diffusion_cpp: they check the argument parsing and skip reasons, and run the suite end to end
on the tiny preset with stand-in interpreters whose `optimum.intel` and `stable_diffusion_cpp` are
small stubs that record how they were called. Speed and image quality of the real peers are measured
by `python -m benchmarks` (docs/benchmarks.md), not here."""

from __future__ import annotations

import json
import math
import stat
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from benchmarks import peers, suite
from benchmarks.report import render_markdown

ROOT = Path(__file__).resolve().parents[1]

# The stand-in optimum pipelines' static-reshape, compile and progress-bar methods (here and in
# tests/test_benchmark_sdxl.py's OVStableDiffusionXLPipeline): each logs to `_log`.
PIPE_METHODS = '''
    def reshape(self, **shape):
        _log(self.path, call="reshape", **shape)

    def compile(self):
        _log(self.path, call="compile")

    def set_progress_bar_config(self, **kwargs):
        pass
'''

OPTIMUM_STUB = '''
"""Stand-in for optimum.intel: records every call to ov_dir's parent / optimum-calls.jsonl."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def _log(where, **record):
    with open(Path(where).parent / "optimum-calls.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")


class PNDMScheduler:
    config = {"skip_prk_steps": True, "_class_name": "PNDMScheduler"}


class _Port:
    def __init__(self, name):
        self.name = name

    def get_any_name(self):
        return self.name

    def get_element_type(self):
        return "f32"

    def get_partial_shape(self):
        return "[?]"


class _Part:
    def __init__(self, fn, config=None):
        self.fn, self.config = fn, config or {}
        self.request = SimpleNamespace(get_property=lambda name: "stub-" + name)
        self.model = SimpleNamespace(inputs=[_Port("sample"), _Port("timestep")])

    def __call__(self, *args, **kwargs):
        return (self.fn(*args, **kwargs),)


class OVStableDiffusionPipeline:
    @classmethod
    def from_pretrained(cls, path, export=False, compile=True, local_files_only=False, ov_config=None):
        return cls(path, export, ov_config)

    def __init__(self, path, export, ov_config):
        self.path, self.scheduler = Path(path), PNDMScheduler()
        _log(path, call="from_pretrained", path=str(path), export=export, ov_config=ov_config)
        self.unet = _Part(lambda sample, timestep, hidden: sample * 0.5)
        self.vae_decoder = _Part(lambda latent_sample: torch.zeros(latent_sample.shape[0], 3, 64, 64),
                                 {"scaling_factor": 0.18215})
        self.vae_encoder = _Part(lambda sample: SimpleNamespace(mean=sample[:, :1] * 0, std=sample[:, :1] * 0 + 1))

    def save_pretrained(self, out):
        Path(out).mkdir(parents=True)
        (Path(out) / "model_index.json").write_text("{}")

''' + PIPE_METHODS + '''
    def __call__(self, prompt, *, latents, height, width, **kwargs):
        _log(self.path, call="pipe", prompt=prompt, height=height, width=width, latents_shape=list(latents.shape),
             latents_sum=float(latents.double().sum()), **kwargs)
        return SimpleNamespace(images=np.full((latents.shape[0], height, width, 3), 0.5, np.float32))
'''

SDCPP_STUB = '''
"""Stand-in for stable_diffusion_cpp: records every call beside the checkpoint."""
import json
from pathlib import Path

from PIL import Image


class StableDiffusion:
    def __init__(self, model_path, **kwargs):
        assert Path(model_path).is_file(), model_path
        self.log = Path(model_path).parent / "sdcpp-calls.jsonl"
        self._write(call="init", model_path=model_path, **kwargs)

    def _write(self, **record):
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\\n")

    def generate_image(self, **kwargs):
        self._write(call="generate_image", **kwargs)
        return [Image.new("RGB", (kwargs["width"], kwargs["height"]), (128, 128, 128))]
'''


def fake_venv(root: Path, runner: str, stubs: dict[str, str]) -> Path:
    """A venv-shaped folder whose bin/python runs this interpreter with `stubs` (module path ->
    source) first on its path, standing in for the peer's real venv."""
    site = root / runner / "stubs"
    for module, source in stubs.items():
        path = site / Path(*module.split(".")) / "__init__.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    python = root / runner / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_peer_python_options():
    settings, _ = suite.parse_args(["--peers", "optimum", "optimum-f32", "sdcpp"])
    assert settings.peers == ("optimum", "optimum-f32", "sdcpp") and settings.peer_python == {}
    settings, _ = suite.parse_args(["--optimum-python", "/opt/o/bin/python", "--sdcpp-python", "/opt/s/bin/python"])
    assert settings.peer_python == {"optimum": "/opt/o/bin/python", "sdcpp": "/opt/s/bin/python"}
    assert {"optimum", "optimum-f32", "sdcpp"} <= set(settings.peers)  # in the default run, skipped without a venv
    assert peers.interpreter("optimum", "/opt/o/bin/python") == Path("/opt/o/bin/python")
    assert peers.interpreter("sdcpp", root=Path("/r")) == Path("/r/.venv-sdcpp/bin/python")
    with pytest.raises(ValueError, match="unknown peer runner 'nope'"):
        peers.interpreter("nope")
    assert suite.PEERS["sdcpp"].e2e_only and suite.PEERS["optimum-f32"].dtype == "f32"


def test_absent_venv_is_a_skip_with_its_reason(tmp_path):
    ok, why = peers.availability("optimum", root=tmp_path)
    assert not ok
    assert str(tmp_path / ".venv-optimum" / "bin" / "python") in why
    assert "bash benchmarks/peers/setup-optimum.sh" in why and "--optimum-python PATH" in why
    settings = suite.Settings(peer_python={"sdcpp": str(tmp_path / "missing" / "python")})
    ok, why = suite.target_availability(suite.PEERS["sdcpp"], settings)
    assert not ok and "no sdcpp venv" in why and "setup-sdcpp.sh" in why
    # an interpreter without the peer's packages: this one has numpy but (checked) no stable_diffusion_cpp
    import importlib.util

    assert importlib.util.find_spec("stable_diffusion_cpp") is None
    ok, why = peers.availability("sdcpp", sys.executable)
    assert not ok
    assert why.endswith("lacks stable_diffusion_cpp (install them with `bash benchmarks/peers/setup-sdcpp.sh`)")
    # stable-diffusion.cpp has no per-network call: a run without end to end has nothing of it to measure
    ok, why = suite.target_availability(suite.PEERS["sdcpp"], suite.Settings(e2e=False))
    assert not ok and "end to end only" in why


# What a fresh interpreter loads for an import, beyond what it started with: (module names, file of the
# first argument's module). Run from the repository root so this checkout's benchmarks/ is the one found.
_NEW_MODULES = ("import importlib, json, sys\n"
                "before = set(sys.modules)\n"
                "for name in sys.argv[1:]:\n"
                "    importlib.import_module(name)\n"
                "print(json.dumps([sorted(set(sys.modules) - before), sys.modules[sys.argv[1]].__file__]))\n")
# benchmarks/ modules a peer's venv may load: the protocol, the timing it uses, the packages' __init__s
# (a docstring, and benchmarks/peers/__init__.py's standard-library runner table) and the workers.
PEER_SAFE = {"benchmarks", "benchmarks.protocol", "benchmarks.timing", "benchmarks.peers",
             "benchmarks.peers.optimum_worker", "benchmarks.peers.sdcpp_worker", "benchmarks.peers.genai_worker",
             "benchmarks.peers.optimum_fewstep", "benchmarks.peers.optimum_sdxl"}


@pytest.mark.parametrize("modules", [("benchmarks.protocol",),
                                     ("benchmarks.peers.optimum_worker", "benchmarks.peers.sdcpp_worker"),
                                     ("benchmarks.peers.genai_worker", "benchmarks.peers.optimum_fewstep"),
                                     ("benchmarks.peers.optimum_sdxl",)])
def test_worker_protocol_imports_only_stdlib_and_numpy(modules):
    """The peers' venvs have NumPy and the peer's own packages, not runtime/, export/, torch or this
    env's other packages: the protocol and the peer workers load nothing else at import time."""
    proc = subprocess.run([sys.executable, "-c", _NEW_MODULES, *modules], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded, where = json.loads(proc.stdout)
    assert Path(where).resolve().is_relative_to(ROOT)  # this checkout's benchmarks/, not an installed one
    assert set(modules) <= set(loaded) and "benchmarks.protocol" in loaded  # the walk sees the imports
    outside = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "numpy"
               and m not in PEER_SAFE]
    assert outside == []


def test_serve_writes_ok_and_failed_results(tmp_path, capsys):
    from benchmarks import protocol

    task = tmp_path / "task.json"
    task.write_text(json.dumps({"target": "t", "n": 3}))
    result = tmp_path / "result.json"
    assert protocol.serve(lambda t: {"status": "ok", "n": np.int64(t["n"]), "x": np.float32(0.5)},
                          "m", [str(task), str(result)]) == 0
    assert json.loads(result.read_text()) == {"status": "ok", "n": 3, "x": 0.5}  # NumPy scalars as numbers

    def fail(t):
        raise RuntimeError("no engine")

    assert protocol.serve(fail, "m", [str(task), str(result)]) == 1
    failed = json.loads(result.read_text())
    assert (failed["target"], failed["status"], failed["reason"]) == ("t", "failed", "RuntimeError: no engine")
    assert "raise RuntimeError" in failed["traceback"] and failed["peak_rss_mb"] > 0
    assert protocol.serve(fail, "benchmarks.x", []) == 2
    assert "usage: python -m benchmarks.x TASK.json RESULT.json" in capsys.readouterr().err


def test_skipped_peer_row_in_the_report(tmp_path):
    why = peers.availability("optimum", root=tmp_path)[1]
    report = {"settings": asdict(suite.Settings()),
              "machine": {"cpu": {"model": "cpu", "usable_cpus": 2, "flags": {}}, "memory_gib": 1.0},
              "versions": {}, "results": {"optimum": {"target": "optimum", "status": "skipped", "reason": why}}}
    row = next(line for line in render_markdown(report).splitlines() if line.startswith("| optimum |"))
    assert row.startswith("| optimum | skipped: no optimum venv: ")


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def stub_report(tmp_path_factory):
    pytest.importorskip("diffusers")
    tmp = tmp_path_factory.mktemp("peers")
    settings = suite.Settings(
        model="tiny-sd1", resolution=64, steps=2, repeats=1, warmup=0, engines=(), networks=("unet", "vae_decoder"),
        peers=("diffusers-fp32", "optimum", "sdcpp"), cache_dir=str(tmp / "cache"), timeout_s=600,
        peer_python={"optimum": str(fake_venv(tmp, "optimum", {"optimum": "", "optimum.intel": OPTIMUM_STUB})),
                     "sdcpp": str(fake_venv(tmp, "sdcpp", {"stable_diffusion_cpp": SDCPP_STUB}))})
    out = tmp / "peers.json"
    return suite.run(settings, out, command="pytest", log=lambda msg: None), out, settings


def test_peers_run_in_their_own_interpreter(stub_report):
    report, out, settings = stub_report
    results = json.loads(out.read_text())["results"]
    for name in ("diffusers-fp32", "optimum", "sdcpp"):
        assert results[name]["status"] == "ok", (name, results[name].get("reason"), results[name].get("traceback"))
        assert results[name]["e2e"]["median_s"] > 0 and results[name]["peak_rss_mb"] > 0
    paths = suite.peer_paths(settings)
    # optimum: exported once from the diffusers folder, then loaded, static-reshaped and compiled
    calls = _calls(paths["ov_dir"].parent / "optimum-calls.jsonl")
    assert calls[0] == {"call": "from_pretrained", "path": str(suite.cache_paths(settings)[0]), "export": True,
                        "ov_config": None}
    assert results["optimum"]["prepare"]["status"] == "ok" and not results["optimum"]["prepare"]["reused"]
    loads = [c for c in calls if c["call"] == "from_pretrained" and not c["export"]]
    assert len(loads) == 2 and all(c["path"] == str(paths["ov_dir"]) and c["ov_config"] == {} for c in loads)
    assert {"call": "reshape", "batch_size": 1, "height": 64, "width": 64, "num_images_per_prompt": 1} in calls
    # end to end from the suite's latents: image 0 is PCG64(seed)'s standard normal, as the runtime draws it
    pipe = [c for c in calls if c["call"] == "pipe"]
    expected = np.random.Generator(np.random.PCG64(0)).standard_normal((4, 32, 32), dtype=np.float32)
    assert pipe[-1]["latents_shape"] == [1, 4, 32, 32]
    assert pipe[-1]["latents_sum"] == pytest.approx(float(expected.astype(np.float64).sum()), rel=1e-6)
    assert [c["num_inference_steps"] for c in pipe] == [2, 2] and pipe[-1]["guidance_scale"] == 7.5
    assert pipe[-1]["negative_prompt"] == "" and pipe[-1]["output_type"] == "np"
    # per-network calls go through parity against the fp32 reference; the text encoder is not timed
    nets = results["optimum"]["networks"]
    assert set(nets) == {"unet", "vae_decoder"} and "parity" in nets["unet"]
    assert results["optimum"]["info"]["unet_compiled"]["INFERENCE_PRECISION_HINT"] == "stub-INFERENCE_PRECISION_HINT"
    assert math.isfinite(results["optimum"]["e2e"]["image_psnr"]["db"])
    assert results["optimum"]["e2e"]["image_psnr"]["reference"] == "diffusers-fp32"


def test_sdcpp_gets_the_single_file_checkpoint(stub_report):
    report, out, settings = stub_report
    results = json.loads(out.read_text())["results"]
    single = suite.peer_paths(settings)["single_file"]
    assert single.is_file() and results["sdcpp"]["prepare"]["prepare"]["bytes"] == single.stat().st_size
    calls = _calls(single.parent / "sdcpp-calls.jsonl")
    assert calls[0]["call"] == "init" and calls[0]["model_path"] == str(single) and calls[0]["wtype"] == "f32"
    assert calls[0]["n_threads"] == results["sdcpp"]["info"]["threads"] >= 1
    gen = [c for c in calls if c["call"] == "generate_image"]
    assert [c["sample_steps"] for c in gen] == [2, 2]
    assert gen[-1]["cfg_scale"] == 7.5 and gen[-1]["sample_method"] == "ipndm" and gen[-1]["width"] == 64
    assert "networks" not in results["sdcpp"] or not results["sdcpp"]["networks"]  # end to end only
    psnr = results["sdcpp"]["e2e"]["image_psnr"]
    assert psnr["db"] is None and "own initial noise" in psnr["reason"]


def test_peer_rows_and_summary(stub_report):
    report, out, _ = stub_report
    on_disk = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    assert md == render_markdown(on_disk)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert {"optimum", "sdcpp", "diffusers-fp32"} <= set(rows)
    e2e = on_disk["results"]["sdcpp"]["e2e"]["median_s"]
    assert f"| {e2e:.3g} |" in rows["sdcpp"]
    assert on_disk["summary"]["e2e_speedup_vs_optimum"] is None  # no engine measured in this run
