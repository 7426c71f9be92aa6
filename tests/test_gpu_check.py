"""The GPU check's plumbing (benchmarks/gpu.py) on a CPU machine: what it says without a GPU, which
routes a machine's packages allow, the time budget, the report, and one real run of its child
processes with the torch routes on the CPU (tiny-sd1). No GPU claim comes out of any of these: the
plumbing run's report says `"device": "cpu"`."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import gpu

pytest.importorskip("torch")

H200_SET = {  # what the GPU machine we know of has: torch CUDA, diffusers, CPU onnxruntime, no TensorRT
    "torch_cuda": True, "torch_engine": True, "gpu": "NVIDIA H200", "diffusers": True, "ort_cuda": False,
    "ort_tensorrt": False,
    "tensorrt": False, "reasons": {}, "reasons_ort_cuda": "onnxruntime 1.32.0 has no CUDAExecutionProvider",
    "reasons_ort_tensorrt": "onnxruntime 1.32.0 has no TensorrtExecutionProvider",
    "reasons_tensorrt": "the 'tensorrt' Python module is not installed",
}


def test_without_a_gpu_nothing_is_measured_and_every_skip_says_why(tmp_path):
    report = gpu.run(gpu.Settings(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache")), log=lambda s: None)
    if report["device"] == "cuda":
        pytest.skip("this machine has a CUDA GPU")
    assert report["verdict"] == "no CUDA GPU here: nothing measured (every route skipped)"
    assert set(report["routes"]) == set(gpu.ROUTES) and report["build"] is None
    for name, r in report["routes"].items():
        assert r["status"] == "skipped" and r["reason"], name
        assert "unet" not in r and "e2e" not in r
    assert "torch_cuda: torch" in report["routes"]["torch-fp32"]["reason"]
    assert "TensorrtExecutionProvider" in report["routes"]["onnxruntime-tensorrt"]["reason"]
    saved = json.loads((tmp_path / "out" / "gpu-check-sd15-512-cpu.json").read_text())
    assert saved["verdict"] == report["verdict"]
    md = (tmp_path / "out" / "gpu-check-sd15-512-cpu.md").read_text()
    assert "plumbing run: no GPU claims" in md and md.count("| skipped |") == len(gpu.ROUTES)


def test_routes_follow_what_is_installed():
    plan = gpu.route_plan(H200_SET, gpu.Settings())
    runnable = [name for name, why in plan.items() if why is None]
    assert runnable == ["torch-fp32", "torch-fp16", "diffusers-fp16", "diffusers-fp16-compile", "torch-bf16"]
    assert plan["onnxruntime-cuda"] == "ort_cuda: onnxruntime 1.32.0 has no CUDAExecutionProvider"
    assert plan["tensorrt"] == "tensorrt: the 'tensorrt' Python module is not installed"
    cpu = gpu.route_plan({**H200_SET, "torch_cuda": False, "reasons": {"torch_cuda": "CPU build"}},
                         gpu.Settings(allow_cpu=True))
    assert [n for n, why in cpu.items() if why is None] == ["torch-fp32", "torch-fp16", "diffusers-fp16",
                                                           "torch-bf16"]
    assert cpu["diffusers-fp16-compile"] == "torch_cuda: CPU build"
    unregistered = gpu.route_plan({**H200_SET, "torch_engine": False, "reasons_torch_engine": "pip install -e ."},
                                  gpu.Settings())
    assert unregistered["torch-fp32"] == "torch_engine: pip install -e ." and unregistered["diffusers-fp16"] is None


def test_the_time_budget_skips_routes_it_cannot_fit(tmp_path, monkeypatch):
    ran = []

    def child(task, settings, timeout_s, log):
        ran.append((task.get("route", task["kind"]), timeout_s))
        return {"status": "ok", "engine_dir": str(tmp_path)} if task["kind"] == "build" else {"status": "ok"}

    monkeypatch.setattr(gpu, "probe", lambda: dict(H200_SET))
    monkeypatch.setattr(gpu, "_child", child)
    settings = gpu.Settings(budget_s=42.0, out_dir=str(tmp_path), cache_dir=str(tmp_path),
                            routes=("torch-fp32", "torch-fp16", "tensorrt"))
    report = gpu.run(settings, log=lambda s: None)
    assert [name for name, _ in ran] == ["build", "torch-fp16"]
    assert report["routes"]["torch-fp32"]["reason"].startswith("time budget: ")
    assert "the route takes about 45 s" in report["routes"]["torch-fp32"]["reason"]
    assert report["routes"]["torch-fp16"] == {"status": "ok"}
    assert report["routes"]["tensorrt"]["reason"] == "tensorrt: the 'tensorrt' Python module is not installed"
    assert 30 <= ran[1][1] <= 42  # a route is stopped at the budget's end
    assert (tmp_path / "gpu-check-sd15-512-nvidia-h200.md").is_file()


def test_markdown_names_failures_and_numbers():
    report = {"probe": {"gpu": "NVIDIA H200", "compute_capability": "9.0", "driver": "580.65.06"}, "device": "cuda",
              "settings": {"model": "sd15", "resolution": 512, "steps": 20}, "created": "now", "command": "x",
              "routes": {
                  "torch-fp16": {"status": "ok", "unet": {"median_s": 0.0123, "min_s": 0.012, "max_s": 0.013},
                                 "e2e": {"it_s": 31.25, "total_s": 0.9}, "parity": {"unet/noise_pred": 2e-3},
                                 "psnr_db": 41.5},
                  "tensorrt": {"status": "failed", "reason": "TensorRTBuildError: unet | parser"}}}
    md = gpu.render_markdown(report)
    assert "| torch-fp16 | ok | 12.3 (12.0-13.0) | 31.25 | 0.90 | 2.00e-03 (unet/noise_pred) | 41.5 |" in md
    assert "| tensorrt | failed |" in md and "TensorRTBuildError: unet / parser" in md
    assert "NVIDIA H200, compute capability 9.0" in md


def test_plumbing_run_of_the_child_processes_on_cpu(tmp_path):
    """The real build and route processes, torch routes on the CPU at 64 px (tiny-sd1): the
    reference matches itself exactly and bf16 differs from it by a bf16-sized error."""
    settings = gpu.Settings(model="tiny-sd1", resolution=64, steps=2, repeats=1, warmup=0, allow_cpu=True,
                            cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "out"),
                            routes=("torch-fp32", "torch-bf16", "diffusers-fp16", "onnxruntime-cuda"), budget_s=900.0)
    report = gpu.run(settings, log=lambda s: None)
    if report["device"] == "cuda":
        pytest.skip("this machine has a CUDA GPU: the CPU plumbing run does not apply")
    assert report["build"]["status"] == "ok", report["build"]
    ref, bf16 = report["routes"]["torch-fp32"], report["routes"]["torch-bf16"]
    assert ref["status"] == "ok" and bf16["status"] == "ok", (ref.get("reason"), bf16.get("reason"))
    assert ref["device"] == "cpu" and ref["engines"]["unet"]["compute"] == "fp32"
    assert bf16["engines"]["unet"]["compute"] == "bf16"
    assert set(ref["parity"]) == {"text_encoder/last_hidden_state", "unet/noise_pred", "vae_decoder/image",
                                  "vae_encoder/latent_mean", "vae_encoder/latent_std"}
    assert all(v == 0.0 for v in ref["parity"].values()) and ref["psnr_db"] == math.inf
    assert 1e-4 < bf16["parity"]["unet/noise_pred"] < 0.1 and math.isfinite(bf16["psnr_db"])
    assert ref["e2e"]["steps"] == 2 and ref["e2e"]["it_s"] > 0 and ref["unet"]["repeats"] == 1
    # diffusers in float32 on the CPU: the same weights; the reference's output is the fp16 folder's
    # float16 (about 5e-4 relative rounding), diffusers' is not, hence not 0
    peer = report["routes"]["diffusers-fp16"]
    assert peer["status"] == "ok", peer.get("reason")
    assert set(peer["parity"]) == {"unet/noise_pred"} and 1e-5 < peer["parity"]["unet/noise_pred"] < 1e-3
    assert peer["e2e"]["steps"] == 2 and peer["e2e"]["it_s"] > 0
    assert report["routes"]["onnxruntime-cuda"]["status"] == "skipped"
    md = (tmp_path / "out" / "gpu-check-tiny-sd1-64-cpu.md").read_text()
    assert "plumbing run: no GPU claims" in md and "| torch-bf16 | ok |" in md
