"""`python -m benchmarks.serve` on the tiny model: it starts the server command, measures each
concurrency level and writes its JSON (the Ray target is measured by hand: docs/serving.md, and Ray
itself is tested in tests/test_serve_ray.py)."""

from __future__ import annotations

import json

from benchmarks.serve import main
from test_serve_support import REQUEST_TIMEOUT_S, call_within

# the command's whole run: start the server (--start-timeout), 2 levels of 6 requests, drain and stop
BENCH_TIMEOUT_S = 2 * REQUEST_TIMEOUT_S + 300.0


def test_serve_benchmark_reports_rate_and_percentiles(tiny_sd1_engine, tmp_path, capsys):
    out = tmp_path / "serve.json"
    args = ["--engine", str(tiny_sd1_engine), "--backend", "onnxruntime", "--concurrency", "1", "4", "--requests", "6",
            "--warmup", "1", "--steps", "2", "--size", "32", "--ray-replicas", "0", "--start-timeout",
            str(REQUEST_TIMEOUT_S), "--out", str(out)]
    # its clients retry a 503 without a deadline of their own
    assert call_within(lambda: main(args), "python -m benchmarks.serve to finish", BENCH_TIMEOUT_S) == 0
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
