"""`python -m benchmarks.serve` on the tiny model: it starts the server command, measures each
concurrency level and writes its JSON (the Ray target is measured by hand: docs/serving.md, and Ray
itself is tested in tests/test_serve_ray.py)."""

from __future__ import annotations

import json

from benchmarks.serve import main


def test_serve_benchmark_reports_rate_and_percentiles(tiny_sd1_engine, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["--engine", str(tiny_sd1_engine), "--backend", "onnxruntime", "--concurrency", "1", "4",
                 "--requests", "6", "--warmup", "1", "--steps", "2", "--size", "32", "--ray-replicas", "0",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (target,) = report["targets"]
    assert target["target"] == "one process" and target["exit_code"] == 0  # drained and exited 0 on SIGTERM
    assert [lv["clients"] for lv in target["levels"]] == [1, 4]
    for lv in target["levels"]:
        assert lv["ok"] == 6 and lv["errors"] == 0
        assert 0 < lv["p50_s"] <= lv["p95_s"] <= lv["p99_s"] < 60
        assert lv["requests_per_minute"] > 0
    assert report["machine"] and report["settings"]["steps"] == 2
    assert "one process    1 clients:" in capsys.readouterr().out
