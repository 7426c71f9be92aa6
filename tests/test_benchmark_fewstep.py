"""Plumbing of `python -m benchmarks --fewstep` (benchmarks/fewstep.py): the folders it builds are
what diffusers itself reads as a Turbo-style, an LCM and a tiny-VAE model; the goals are computed
from a run's own ratios; the stage clock and the timing loop count what they say. Speeds are measured
by the benchmark (docs/benchmarks.md), never here."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks import fewstep
from benchmarks.protocol import StageClock, per_call, time_runs


def test_folders_are_what_diffusers_reads(tmp_path):
    """turbo: Euler with trailing timesteps; lcm: LatentConsistencyModelPipeline, LCMScheduler, a
    U-Net with time_cond_proj_dim 256; tiny: an AutoencoderTiny at TAESD's config (scaling 1.0)."""
    diffusers = pytest.importorskip("diffusers")
    from benchmarks.fewstep_folders import LCM_COND_DIM, make_folders

    made = make_folders(tmp_path, "tiny-sd1", seed=0)
    assert set(made) == {"turbo-full", "turbo-tiny", "lcm-full", "lcm-tiny"}
    assert make_folders(tmp_path, "tiny-sd1", seed=0) == {k: 0.0 for k in made}  # reused
    turbo = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "turbo-full"), local_files_only=True)
    assert type(turbo).__name__ == "StableDiffusionPipeline"
    assert type(turbo.scheduler).__name__ == "EulerDiscreteScheduler"
    turbo.scheduler.set_timesteps(1)
    assert turbo.scheduler.timesteps.tolist() == [999.0]  # trailing: the last training timestep
    lcm = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "lcm-tiny"), local_files_only=True)
    assert type(lcm).__name__ == "LatentConsistencyModelPipeline"
    assert type(lcm.scheduler).__name__ == "LCMScheduler"
    assert lcm.unet.config.time_cond_proj_dim == LCM_COND_DIM
    assert type(lcm.vae).__name__ == "AutoencoderTiny" and lcm.vae.config.scaling_factor == 1.0
    assert list(lcm.vae.config.decoder_block_out_channels) == [64, 64, 64, 64]  # madebyollin/taesd
    # the tiny folders share the full folders' other files (hard links), not copies
    a, b = tmp_path / "lcm-full" / "unet", tmp_path / "lcm-tiny" / "unet"
    for f in a.iterdir():
        assert (b / f.name).stat().st_ino == f.stat().st_ino


def _ok(e2e: float, rss: float, vae_decode: float = 0.1, psnr: float | None = None) -> dict:
    stats = {"median_s": e2e, "min_s": e2e, "max_s": e2e, "stages": {"vae_decode": vae_decode, "unet": e2e / 2}}
    if psnr is not None:
        stats["psnr_vs_ours_f32_db"] = psnr
    return {"status": "ok", "e2e": stats, "peak_rss_mb": rss, "precision": "", "load_s": 1.0}


def test_goals_from_the_runs_own_ratios():
    s = fewstep.FewSettings(scenarios=("turbo-1",))
    results = {
        "turbo-1/tiny/ours-f32": _ok(1.0, 3000, vae_decode=0.05),
        "turbo-1/full/ours-f32": _ok(2.0, 3500, vae_decode=1.0),
        "turbo-1/tiny/ours-bf16": _ok(0.9, 2500, vae_decode=0.2),
        "turbo-1/full/ours-bf16": _ok(1.5, 2500, vae_decode=1.0),
        "turbo-1/tiny/ours-int8": _ok(0.5, 2000, psnr=31.5),
        "turbo-1/tiny/diffusers-fp32": _ok(4.0, 3200),
        "turbo-1/full/diffusers-fp32": _ok(6.0, 3400),
        "turbo-1/tiny/optimum-f32": _ok(1.3, 2500),
        "turbo-1/tiny/genai-f32": _ok(1.1, 2400),
        "turbo-1/tiny/optimum": _ok(1.0, 2500),
        "turbo-1/tiny/genai": {"status": "failed", "reason": "boom"},
    }
    by_goal = {g["goal"]: g for g in fewstep.goals(results, s)}
    f32 = by_goal["turbo-1, tiny VAE: ours-f32 >= 1.2x the fastest peer at its precision"]
    assert f32["value"] == pytest.approx(1.1) and f32["pass"] is False and "genai-f32" in f32["detail"]
    bf16 = by_goal["turbo-1, tiny VAE: ours-bf16 >= 1.2x the fastest peer at its precision"]
    assert bf16["value"] == pytest.approx(1.0 / 0.9) and bf16["pass"] is False and "optimum 1.000 s" in bf16["detail"]
    int8 = by_goal["turbo-1, tiny VAE: ours-int8 >= 1.5x the fastest peer"]
    assert int8["value"] == pytest.approx(2.0) and int8["pass"] is True and "31.5 dB" in int8["detail"]
    assert by_goal["turbo-1: ours-f32 tiny decode <= 10% of the full VAE decode"]["pass"] is True
    assert by_goal["turbo-1: ours-bf16 tiny decode <= 10% of the full VAE decode"]["value"] == pytest.approx(0.2)
    assert by_goal["turbo-1, tiny VAE: ours-f32 peak RSS <= diffusers fp32's"]["value"] == pytest.approx(3000 / 3200)
    assert by_goal["turbo-1, full VAE: ours-f32 peak RSS <= diffusers fp32's"]["pass"] is False
    report = {"created": "now", "machine": {"cpu": {"model": "X", "flags": {"avx2": True, "amx_bf16": False}},
                                            "memory_gib": 1}, "settings": {**fewstep.asdict(s)},
              "results": results, "goals": list(by_goal.values()), "skipped": {"ours-int8": "no nncf"}}
    md = fewstep.render_markdown(report)
    assert "flags: avx2;" in md and "| FAIL |" in md and "| pass |" in md and "failed: boom" in md
    assert "ours-int8: no nncf" in md


def test_missing_targets_are_not_measured_not_failed():
    g = fewstep.goals({}, fewstep.FewSettings(scenarios=("lcm-4",)))
    assert g and all(x["pass"] is None for x in g)


def test_parse_args():
    s, out = fewstep.parse_args(["--scenarios", "turbo-1", "--vaes", "tiny", "--repeats", "5",
                                 "--targets", "ours-f32", "genai", "--genai-python", "/v/bin/python"])
    assert (s.scenarios, s.vaes, s.repeats, s.targets) == (("turbo-1",), ("tiny",), 5, ("ours-f32", "genai"))
    assert s.resolution == 512 and s.peer_python == {"genai": "/v/bin/python"} and out is None
    with pytest.raises(SystemExit):
        fewstep.parse_args(["--repeats", "0"])
    task = fewstep.target_task(fewstep.TARGETS["genai-f32"], fewstep.SCENARIOS["lcm-4"], "tiny", s,
                               fewstep.Path("/w"))
    assert task["kind"] == "fewstep" and task["precision"] == "f32" and task["steps"] == 4
    assert task["ov_dir"].endswith("fewstep-sd15-seed0/optimum/lcm-tiny")
    assert task["worker_module"] == "benchmarks.peers.genai_worker"
    json.dumps(task)  # the task file is JSON


def test_folder_building_has_its_own_timeout(monkeypatch, tmp_path):
    """Building the folders (exports, then an int8 U-Net per tiny folder: 19 min each at 512 px on 2
    vCPUs) runs under --prepare-timeout, not the per-target --timeout (one hour killed it)."""
    seen = []
    monkeypatch.setattr(fewstep, "_run_worker", lambda task, workdir, timeout: seen.append(timeout) or {"status": "ok"})
    s, _ = fewstep.parse_args(["--timeout", "60", "--prepare-timeout", "9000"])
    assert (s.timeout_s, s.prepare_timeout_s) == (60.0, 9000.0)
    fewstep.prepare(s, tmp_path, {"ours-int8": fewstep.TARGETS["ours-int8"]}, lambda msg: None)
    assert seen == [9000.0]
    assert fewstep.parse_args([])[0].prepare_timeout_s == 4 * 3600.0


def test_a_plain_build_keeps_the_folders_int8_unet(monkeypatch, tmp_path):
    """A run without ours-int8 builds its folders without --quantize, which removes a folder's int8
    U-Net (build-engine's rule); the worker passes the folder's own scheme so it stays (a run on
    2026-12-07 lost one that way and spent 19 min quantizing it again)."""
    import benchmarks.fewstep_folders
    import export.build
    from benchmarks import fewstep_worker

    calls = []
    monkeypatch.setattr(benchmarks.fewstep_folders, "make_folders", lambda *a: {})
    monkeypatch.setattr(export.build, "build_engine", lambda src, out, **kw: calls.append((out.name, kw["quantize"])))
    monkeypatch.setattr(fewstep_worker, "kept_quantization", lambda d: "int8" if d.name == "lcm-tiny" else None)
    task = {"diffusers_root": str(tmp_path / "d"), "engine_root": str(tmp_path / "e"), "model": "sd15", "seed": 0,
            "resolution": 512, "folders": ["lcm-full", "lcm-tiny"], "int8_folders": []}
    fewstep_worker.prepare(task)
    assert calls == [("lcm-full", None), ("lcm-tiny", "int8")]


def test_kept_quantization_reads_the_manifest(tiny_sd1_engine, tmp_path):
    from benchmarks.fewstep_worker import kept_quantization

    assert kept_quantization(tmp_path / "missing") is None
    assert kept_quantization(tiny_sd1_engine) is None  # a plain build: no int8 U-Net
    folder = tmp_path / "int8"
    shutil.copytree(tiny_sd1_engine, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data.setdefault("backends", {}).setdefault("openvino", {})["unet_int8"] = {
        "scheme": "int8", "file": "openvino/unet-int8.xml", "weights": "openvino/unet-int8.bin"}
    (folder / "manifest.json").write_text(json.dumps(data))
    assert kept_quantization(folder) == "int8"
    (folder / "manifest.json").write_text("{not json")
    assert kept_quantization(folder) is None  # a broken folder: build-engine rebuilds it


def test_stage_clock_and_time_runs():
    class Part:
        def forward(self, x):
            return x + 1

    part, clock = Part(), StageClock()
    clock.wrap(part, "forward", "unet")

    def run():
        clock.start()
        out = [part.forward(i) for i in range(4)]
        return out, per_call(clock.take(), "unet")

    out, stats = time_runs(run, {"warmup": 1, "repeats": 2})
    assert out == [1, 2, 3, 4] and stats["repeats"] == 2 and len(stats["stage_runs"]) == 2
    assert stats["stages"]["unet_calls"] == 4
    assert all(r["unet"] >= 0 for r in stats["stage_runs"])
    assert per_call({"unet": 8.0, "unet_calls": 4}, "unet")["unet"] == 2.0
    assert per_call({"vae_decode": 1.0}, "unet") == {"vae_decode": 1.0}


def test_latents_follow_the_vae_scale():
    s = fewstep.FewSettings(model="tiny-sd1", resolution=64)
    tiny, full = fewstep.latents(s, "tiny"), fewstep.latents(s, "full")
    assert tiny.shape == (1, 4, 8, 8) and tiny.dtype == np.float32
    from export.configs import preset

    f = preset("tiny-sd1").vae_scale_factor
    assert full.shape == (1, 4, 64 // f, 64 // f)
    ref = np.random.Generator(np.random.PCG64(0)).standard_normal((1, 4, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(tiny, ref)
