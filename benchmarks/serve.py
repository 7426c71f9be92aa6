"""`python -m benchmarks.serve`: the generation server under load. Requests per minute and p50 /
p95 / p99 latency at 1, 4 and 16 concurrent clients, against one server process
(`python -m runtime serve`) and against Ray Serve with 2 replicas (`--ray --replicas 2`), both on
loopback. Each level sends `--requests` txt2img requests (distinct seeds, one image each) after
`--warmup` requests; a client sends its next request when the last one is answered. A 503 (the
bounded queue is full) is counted as rejected and retried after its Retry-After; latencies are of
the answered requests, from the first try. Results go to stdout and, with --out, to JSON with the
machine, versions and settings.

    python -m benchmarks.serve --engine engines/tiny --requests 32 --out benchmarks/results/serve-tiny.json
    python -m benchmarks.serve --engine engines/sd15 --steps 20 --size 256 --concurrency 1 4 16 --requests 48

Without --engine the embedded `tiny` demo model is built into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, str], bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def start_server(engine: Path, args: argparse.Namespace, ray_replicas: int = 0) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "runtime", "serve", str(engine), "--port", str(port), "--log-level", "warning",
           "--max-queue", str(args.max_queue)]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.threads:
        cmd += ["--engine-option", f"threads={args.threads}"]
    if ray_replicas:
        cmd += ["--ray", "--replicas", str(ray_replicas), "--replica-cpus", str(args.replica_cpus)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + args.start_timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            import urllib.request

            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {args.start_timeout} s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(180)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def run_level(url: str, clients: int, n: int, args: argparse.Namespace, seed0: int) -> dict[str, Any]:
    """n requests from `clients` threads; each retries a 503 after its Retry-After."""
    seeds = iter(range(seed0, seed0 + n))
    lock = threading.Lock()
    latencies: list[float] = []
    rejected = errors = 0

    def client() -> None:
        nonlocal rejected, errors
        while True:
            with lock:
                seed = next(seeds, None)
            if seed is None:
                return
            body = {"prompt": f"a red circle, request {seed}", "steps": args.steps, "seed": seed,
                    "width": args.size, "height": args.size, "sampler_name": args.sampler}
            t0 = time.perf_counter()
            while True:
                status, headers, _ = _post(url + "/sdapi/v1/txt2img", body, timeout=600)
                if status != 503:
                    break
                with lock:
                    rejected += 1
                time.sleep(float(headers.get("Retry-After", "1")))
            with lock:
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"clients": clients, "requests": n, "ok": len(latencies), "errors": errors, "rejected_503": rejected,
            "wall_s": wall, "requests_per_minute": len(latencies) / wall * 60.0,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "p99_s": float(np.percentile(lat, 99)), "mean_s": float(lat.mean())}


def bench_target(name: str, engine: Path, args: argparse.Namespace, ray_replicas: int = 0) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc, url = start_server(engine, args, ray_replicas)
    started = time.perf_counter() - t0
    try:
        run_level(url, 1, args.warmup, args, seed0=10**6)
        levels = [run_level(url, c, args.requests, args, seed0=1000 * c) for c in args.concurrency]
    finally:
        code = stop_server(proc)
    for lv in levels:
        print(f"{name:>12}  {lv['clients']:>3} clients: {lv['requests_per_minute']:8.1f} req/min  "
              f"p50 {lv['p50_s']:.3f} s  p95 {lv['p95_s']:.3f} s  p99 {lv['p99_s']:.3f} s  "
              f"({lv['ok']} ok, {lv['rejected_503']} x 503, {lv['errors']} errors)")
    return {"target": name, "ray_replicas": ray_replicas, "start_s": started, "exit_code": code, "levels": levels}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, default=None, help="engine folder (default: build the tiny demo model)")
    p.add_argument("--backend", default=None, help="engine backend (default: best available)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="engine threads per server process or replica (0: the backend's default)")
    p.add_argument("--ray-replicas", type=int, default=2, help="replicas of the Ray target (0: no Ray target)")
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=None, help="write JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = args.engine
        if engine is None:
            from export.build import build_engine

            engine = build_engine("tiny", Path(tmp) / "tiny", progress=lambda s: None)
        targets = [bench_target("one process", engine, args)]
        if args.ray_replicas:
            targets.append(bench_target(f"ray x{args.ray_replicas}", engine, args, args.ray_replicas))
    from benchmarks.machine import machine

    report = {"benchmark": "serve", "engine": str(args.engine or "tiny (built)"),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine(), "targets": targets, "cpu_count": os.cpu_count()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
