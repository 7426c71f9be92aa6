"""Smoke tests of the benchmark suite's machinery on the tiny preset. No speed assertions: numbers
are only checked to be present and positive."""

from __future__ import annotations

import json

import pytest

from benchmarks import suite
from benchmarks.report import render_markdown
from benchmarks.timing import measure, peak_rss_mb


def test_measure_reports_median_min_max():
    calls = []
    stats = measure(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7
    assert stats["repeats"] == 5 and stats["warmup"] == 2 and len(stats["times_s"]) == 5
    assert 0 <= stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0, warmup=0)
    assert peak_rss_mb() > 0


def test_quick_settings():
    settings, out = suite.parse_args(["--quick"])
    assert settings.model == "sd15" and settings.resolution == 256
    assert settings.networks == ("unet",) and not settings.e2e and settings.repeats == 1
    settings, out = suite.parse_args(["--model", "tiny-sd1", "--engines", "onnxruntime", "--peers", "--repeats", "4",
                                      "--out", "x.json"])
    assert settings.engines == ("onnxruntime",) and settings.peers == () and settings.repeats == 4
    assert str(out) == "x.json"


def test_unavailable_targets_are_skipped_with_a_reason():
    ok, why = suite.target_availability(suite.Target("nothing", "engine", "none", backend="no_such_backend"))
    assert not ok and "no_such_backend" in why


# The suite's own run, as `python -m benchmarks` makes it, is what the three tests below check, and it
# is the slowest setup of the test suite (87 s on a 2-core Zen 3, issue 23): every target is measured in
# fresh processes (each imports OpenVINO, ONNX Runtime or torch and diffusers again), the default
# engine is measured by the runtime's own calibration, and the cached engine folder is built with the
# int8 U-Net that openvino-int8 measures (NNCF's calibration on 8 prompts x 10 steps, about half of
# the time). Each of those is under test; settings are already the least that exercises them (64 px,
# 2 steps, 2 repeats, 1 warm-up).
@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    pytest.importorskip("export.build", reason="export/build.py (build_engine) is not there yet")
    pytest.importorskip("runtime.engines.onnxruntime", reason="the ONNX Runtime engine is not there yet")
    pytest.importorskip("diffusers")
    tmp = tmp_path_factory.mktemp("bench")
    settings = suite.Settings(model="tiny-sd1", resolution=64, steps=2, repeats=2, warmup=1,
                              engines=("onnxruntime", "openvino-f32", "openvino-int8"), peers=("diffusers-fp32", "diffusers-compile"),
                              cache_dir=str(tmp / "cache"), timeout_s=600, cache_interval=2)
    out = tmp / "tiny.json"
    report = suite.run(settings, out, command="pytest", log=lambda msg: None)
    return report, out


def test_suite_writes_json_and_markdown(tiny_report):
    report, out = tiny_report
    on_disk = json.loads(out.read_text())
    for key in ("schema", "command", "created", "machine", "versions", "settings", "results",
                "scheduler_overhead", "summary", "default_engine"):
        assert key in on_disk, key
    assert on_disk["machine"]["cpu"]["logical_cpus"] > 0
    assert on_disk["versions"]["numpy"]
    results = on_disk["results"]
    assert results["diffusers-compile"]["status"] in ("skipped", "ok")
    for name in ("onnxruntime", "diffusers-fp32"):
        r = results[name]
        assert r["status"] == "ok", r.get("reason")
        assert r["peak_rss_mb"] > 0
        for network in suite.NETWORKS:
            stats = r["networks"][network]
            assert 0 < stats["min_s"] <= stats["median_s"] <= stats["max_s"]
            assert stats["repeats"] == 2
        assert r["e2e"]["median_s"] > 0
    # parity against the fp32 PyTorch reference: the reference is exact against itself, ORT close
    assert results["diffusers-fp32"]["networks"]["unet"]["parity"]["max_rel_err"] == 0
    assert results["onnxruntime"]["networks"]["unet"]["parity"]["max_rel_err"] < 1e-3
    # the opt-in int8 U-Net: built into the cache for this run, measured, with its own headline
    # (not the default engine: a default build has no int8 U-Net)
    r = results["openvino-int8"]
    if r["status"] == "skipped":  # only where nncf is missing, and then the reason says so
        assert "nncf" in r["reason"]
    else:
        assert r["status"] == "ok", r.get("reason")
        assert 0 < r["networks"]["unet"]["parity"]["max_rel_err"] < 0.5
        summary = on_disk["summary"]["openvino-int8"]
        assert summary["unet_speedup_vs_diffusers-fp32"] > 0
        assert summary["unet_parity"] == r["networks"]["unet"]["parity"]["max_rel_err"]
    assert on_disk["default_engine"] != "openvino-int8"
    assert on_disk["default_engine"] in ("onnxruntime", "openvino-f32", "openvino-bf16")
    assert "fastest measured on this machine" in on_disk["default_engine_reason"]
    # step caching (--cache-interval 2): every engine also cached, against itself, same seed
    for name in ("onnxruntime", "openvino-f32"):
        cached = results[name]["e2e_cached"]
        paired = cached["paired_uncached"]  # uncached runs alternating with the cached ones, same process
        assert cached["cache_interval"] == 2 and results[name]["e2e"]["cache_interval"] == 1
        assert cached["repeats"] == paired["repeats"] == 2
        assert cached["speedup_vs_uncached"] == pytest.approx(paired["median_s"] / cached["median_s"])
        assert 5 < cached["psnr_vs_uncached_db"] < 100  # a different image of the same noise
    assert "e2e_cached" not in results["diffusers-fp32"]
    # our engines' images against diffusers' from the same noise (the pipeline parity, fp32)
    assert results["onnxruntime"]["e2e"]["image_psnr"]["db"] > 40
    md = out.with_suffix(".md").read_text()
    assert md == render_markdown(on_disk)
    assert "| onnxruntime |" in md and "| diffusers-fp32 |" in md and "U-Net parity" in md
    assert "Step caching (DeepCache, a full U-Net every 2 calls)" in md


def test_cache_is_reused(tiny_report, tmp_path):
    report, _ = tiny_report
    settings = suite.Settings(**{**report["settings"], "engines": (), "peers": (), "e2e": False})
    again = suite.run(settings, tmp_path / "again.json", log=lambda msg: None)
    assert again["cache"]["reused"] is True
    # a run that does not measure int8 leaves the cached int8 U-Net in place for the next one that does
    from runtime.folder.manifest import load_manifest

    had_int8 = report["results"]["openvino-int8"]["status"] == "ok"
    assert (load_manifest(suite.cache_paths(settings)[1]).int8_unet is not None) == had_int8


def test_networks_in_several_processes_take_the_median_of_medians(tiny_report, tmp_path):
    import statistics

    report, _ = tiny_report
    settings = suite.Settings(**{**report["settings"], "engines": ("onnxruntime",), "peers": (), "e2e": False,
                                 "networks": ("unet",), "repeats": 2, "process_repeats": 3})
    again = suite.run(settings, tmp_path / "procs.json", log=lambda msg: None)
    unet = again["results"]["onnxruntime"]["networks"]["unet"]
    assert unet["processes"] == 3 and len(unet["process_medians_s"]) == 3 and len(unet["times_s"]) == 6
    assert unet["median_s"] == statistics.median(unet["process_medians_s"])
    assert unet["min_s"] == min(unet["times_s"]) <= unet["median_s"] <= unet["max_s"] == max(unet["times_s"])
    md = (tmp_path / "procs.md").read_text()
    assert "median of 3 fresh processes' medians" in md and "U-Net median per fresh process, s: onnxruntime" in md
    with pytest.raises(SystemExit):
        suite.parse_args(["--process-repeats", "0"])


# SD 1.5's U-Net (CompVis v1-inference.yaml: model_channels 320, channel_mult [1, 2, 4, 4],
# num_res_blocks 2, attention_resolutions [4, 2, 1] i.e. a transformer at the first three levels,
# in/out channels 4; the transformers' proj_in / proj_out are 1x1 convolutions in SD 1.x)
SD15_CHANNELS = (320, 640, 1280, 1280)
SD15_ATTENTION = (True, True, True, False)
SD15_LAYERS = 2
SD15_LATENT_CHANNELS = 4


def _conv_gflop(n: int, cin: int, cout: int, side: int, k: int) -> float:
    """A k x k convolution to a side x side output: 2 FLOP per multiply-add, no bias."""
    return 2 * n * cout * side * side * cin * k * k / 1e9


def _resnet_gflop(n: int, cin: int, cout: int, side: int) -> float:
    """Two 3x3 convolutions, and a 1x1 shortcut where the channels change."""
    shortcut = _conv_gflop(n, cin, cout, side, 1) if cin != cout else 0.0
    return _conv_gflop(n, cin, cout, side, 3) + _conv_gflop(n, cout, cout, side, 3) + shortcut


def _proj_gflop(n: int, ch: int, side: int, attention: bool) -> float:
    """A transformer's proj_in and proj_out (1x1), where the level has one."""
    return 2 * _conv_gflop(n, ch, ch, side, 1) if attention else 0.0


def sd15_unet_conv_gflop(n: int, latent: int) -> float:
    """Convolution GFLOP of one SD 1.5 U-Net call on n latents of latent x latent, in closed form from
    the layer shapes: conv_in, the down path (resnets, transformer projections, stride-2 downsamplers),
    the mid block, the up path over the skip connections (resnets, projections, upsamplers' convs) and
    conv_out."""
    total = _conv_gflop(n, SD15_LATENT_CHANNELS, SD15_CHANNELS[0], latent, 3)
    side, prev, skips = latent, SD15_CHANNELS[0], [SD15_CHANNELS[0]]
    for level, ch in enumerate(SD15_CHANNELS):
        for _ in range(SD15_LAYERS):
            total += _resnet_gflop(n, prev, ch, side) + _proj_gflop(n, ch, side, SD15_ATTENTION[level])
            prev = ch
            skips.append(ch)
        if level < len(SD15_CHANNELS) - 1:
            side //= 2
            total += _conv_gflop(n, ch, ch, side, 3)
            skips.append(ch)
    total += 2 * _resnet_gflop(n, prev, prev, side) + _proj_gflop(n, prev, side, True)  # mid block
    for level, ch in reversed(list(enumerate(SD15_CHANNELS))):
        for _ in range(SD15_LAYERS + 1):  # each resnet takes one skip connection, last in first out
            total += _resnet_gflop(n, prev + skips.pop(), ch, side)
            total += _proj_gflop(n, ch, side, SD15_ATTENTION[level])
            prev = ch
        if level > 0:
            side *= 2
            total += _conv_gflop(n, ch, ch, side, 3)
    return total + _conv_gflop(n, SD15_CHANNELS[0], SD15_LATENT_CHANNELS, latent, 3)


def test_ceiling_counts_the_unet_arithmetic():
    pytest.importorskip("torch")
    from benchmarks.ceiling import gemm_tflops, unet_gflop

    flops = unet_gflop("sd15", 256, 1)  # meta device: no weights allocated
    # SD 1.5 U-Net, 256x256 (latent 32, VAE factor 8), guidance batch 2: the convolutions of the layer
    # shapes above (221.97 GFLOP)
    assert flops["convolution"] == pytest.approx(sd15_unet_conv_gflop(2, 256 // 8), rel=1e-9)
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))
    assert 330 < flops["total"] < 400
    # batch and resolution scale it: twice the batch, twice the work
    assert unet_gflop("sd15", 256, 2)["convolution"] == pytest.approx(2 * flops["convolution"])
    assert gemm_tflops("f32", size=256, repeats=2) > 0


def test_a_workers_peak_rss_is_its_own():
    """A worker's peak RSS is its own address space's: Linux carries ru_maxrss over fork and exec, so
    with it a worker of a parent that once held a large buffer reported the parent's peak."""
    import subprocess
    import sys

    held = bytearray(512 * 1024 * 1024)
    held[::4096] = b"\x01" * len(held[::4096])  # touched: resident in this (the parent) process
    assert peak_rss_mb() > 512
    code = "from benchmarks.timing import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                 timeout=120).stdout)
    del held
    assert 0 < child < 256  # an interpreter and one small module: tens of MiB
