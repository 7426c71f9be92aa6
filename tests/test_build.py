"""build-engine: every source layout builds a loadable folder, a matching folder is reused, and a
build that fails or is killed midway leaves the old folder untouched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.build import _reuse_problem, build_engine, tool_versions
from export.cli import main
from export.loading.read import random_model
from export.loading.save import save_diffusers, save_single_file
from export.onnx_export import Shape, sample_inputs
from runtime.engines import open_engines
from runtime.folder.manifest import load_manifest
from runtime.folder.networks import NETWORKS

REPO = Path(__file__).resolve().parents[1]
SMALL = {"min_image": 32, "opt_image": 32, "max_image": 64, "max_batch": 2}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _temp_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.*"))


@pytest.fixture
def engine_copy(tiny_sd1_engine, tmp_path):
    return shutil.copytree(tiny_sd1_engine, tmp_path / "engine", copy_function=shutil.copy2)


def test_diffusers_folder_and_single_file_build_and_run(tmp_path):
    model = random_model("tiny-sd1", seed=3)
    folder = save_diffusers(model, tmp_path / "diffusers")
    single = save_single_file(model, tmp_path / "model.safetensors")
    outputs = {}
    for kind, source in (("diffusers", folder), ("single_file", single)):
        out = build_engine(source, tmp_path / f"engine-{kind}", progress=lambda line: None, **SMALL)
        manifest = load_manifest(out)
        assert manifest.source["kind"] == kind and len(manifest.source["sha256"]) == 64
        assert manifest.family == "sd1" and manifest.shapes["opt_image"] == 32
        assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(manifest.tokenizer["files"])
        _, engines = open_engines(out, backend="onnxruntime")
        rng = np.random.default_rng(0)
        outputs[kind] = {n: engines[n].run(sample_inputs(n, manifest.dims, Shape(1, 32, 48), vocab_size=49408,
                                                         rng=rng)) for n in NETWORKS}
    for name in NETWORKS:  # same weights in both layouts
        for key, value in outputs["diffusers"][name].items():
            np.testing.assert_allclose(outputs["single_file"][name][key], value, rtol=1e-4, atol=1e-5)


def test_rebuild_does_nothing(tiny_sd1_engine):
    before = _snapshot(tiny_sd1_engine)
    lines: list[str] = []
    assert build_engine("tiny-sd1", tiny_sd1_engine, seed=0, progress=lines.append) == tiny_sd1_engine
    assert any(line.startswith("up to date:") and "nothing to do" in line for line in lines)
    assert not any(line.startswith(("loading", "exporting")) for line in lines)
    assert _snapshot(tiny_sd1_engine) == before


def test_reuse_check_names_the_difference(engine_copy):
    manifest = load_manifest(engine_copy)
    args = (manifest.source, manifest.precision, manifest.shapes, tool_versions(), False)
    assert _reuse_problem(engine_copy, *args) is None
    assert _reuse_problem(engine_copy, manifest.source, "fp16", *args[2:]) == \
        "precision: the folder has 'fp32', the request 'fp16'"
    shapes = {**manifest.shapes, "max_batch": 8}
    assert "shapes: the folder has" in _reuse_problem(engine_copy, manifest.source, "fp32", shapes, *args[3:])
    assert "source differs" in _reuse_problem(engine_copy, {**manifest.source, "seed": 1}, *args[1:])
    assert "no TensorRT plans" in _reuse_problem(engine_copy, *args[:4], True)
    (engine_copy / "tokenizer" / "vocab.json").write_text("{}")
    assert _reuse_problem(engine_copy, *args) == "tokenizer/vocab.json does not match its sha256 in the manifest"


def test_failed_stage_keeps_old_folder(engine_copy):
    before = _snapshot(engine_copy)

    def progress(line: str) -> None:
        if line.startswith("exporting vae_decoder"):
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected failure"):
        build_engine("tiny-sd1", engine_copy, force=True, progress=progress)
    assert _snapshot(engine_copy) == before
    assert _temp_siblings(engine_copy) == []


def test_killed_build_keeps_old_folder(engine_copy):
    before = _snapshot(engine_copy)
    proc = subprocess.Popen([sys.executable, "-m", "export.cli", "tiny-sd1", "--out", str(engine_copy), "--force"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in proc.stdout:
            if line.startswith("exporting unet"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(engine_copy) == before
    assert len(_temp_siblings(engine_copy)) == 1  # the killed build's half-written folder

    lines: list[str] = []
    build_engine("tiny-sd1", engine_copy, progress=lines.append)
    assert any(line.startswith("removed stale temporary folder") for line in lines)
    assert any(line.startswith("up to date:") for line in lines)
    assert _temp_siblings(engine_copy) == []
    assert _snapshot(engine_copy) == before


def test_cli_errors(tmp_path, capsys):
    assert main(["no-such-model", "--out", str(tmp_path / "a")]) == 1
    assert "is not a preset" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert main(["tiny-sd1", "--out", str(tmp_path / "notes")]) == 1
    assert "is not an engine folder" in capsys.readouterr().err
    assert main(["tiny-sd1", "--out", str(tmp_path / "b"), "--opt-image", "62"]) == 1
    assert "opt_image=62: image sizes of this model must be multiples of 4" in capsys.readouterr().err
    assert main(["tiny-sd1", "--out", str(tmp_path / "c"), "--min-batch", "3", "--max-batch", "2"]) == 1
    assert "batch range must satisfy" in capsys.readouterr().err
    assert _temp_siblings(tmp_path / "b") == [] and not (tmp_path / "b").exists()


def test_tensorrt_without_tensorrt_fails_before_exporting(tmp_path, capsys):
    from runtime.engines.tensorrt import is_available

    usable, _ = is_available()
    if usable:
        pytest.skip("TensorRT and a CUDA device are present: the refusal cannot be observed here")
    assert main(["tiny-sd1", "--out", str(tmp_path / "trt"), "--tensorrt"]) == 1
    err = capsys.readouterr().err
    assert "--tensorrt is not usable on this machine" in err
    assert "tensorrt" in err.split("machine:", 1)[1]  # the reason names what is missing
    assert "exporting" not in err and not (tmp_path / "trt").exists() and _temp_siblings(tmp_path / "trt") == []
    # the deprecated spelling still works, says it is deprecated, and does the same
    assert main(["tiny-sd1", "--out", str(tmp_path / "trt"), "--backend", "tensorrt"]) == 1
    out, err = capsys.readouterr()
    assert "--backend tensorrt is deprecated; use --tensorrt" in out and "--tensorrt is not usable" in err


def test_deprecated_cpu_backend_flags_say_they_change_nothing(engine_copy, capsys):
    before = (engine_copy / "manifest.json").read_bytes()
    for backend in ("onnxruntime", "openvino", "torch"):
        assert main(["tiny-sd1", "--out", str(engine_copy), "--backend", backend]) == 0
        out = capsys.readouterr().out
        assert f"--backend {backend} is deprecated and has no effect: every engine folder runs on every CPU " \
               "backend" in out
        assert "up to date" in out
    assert (engine_copy / "manifest.json").read_bytes() == before
    assert main(["tiny-sd1", "--out", str(engine_copy), "--backend", "cuda"]) == 1
    assert "unknown backend 'cuda'" in capsys.readouterr().err
