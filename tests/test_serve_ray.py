"""Ray Serve scale-out (runtime/serving/ray.py): a local Ray cluster (2 CPUs) with 2 replicas of the
tiny model, each holding its own pipeline (one ONNX Runtime thread, half a CPU). Concurrent
requests reach both replicas; one replica is killed mid-run and Ray Serve replaces it while requests
go on; every request gets exactly one answer with its own image. A client retries a request that
failed with a 5xx (the requests the dying replica held), as HTTP clients of a cluster do."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

import runtime
from test_serve_support import REQUEST_TIMEOUT_S, as_array, call_within, free_port, join, pixels

ray = pytest.importorskip("ray", reason="the cluster extra: pip install -e '.[cluster]'")

REPLICA = "x-sd-runtime-replica"
# Ray's own start-up (a local cluster, Serve's controller and proxy, two replicas loading the pipeline)
# and the whole run, which bounds every retry and wait below
RAY_START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 240.0


def _request(url: str, seed: int, deadline: float) -> tuple[int, str, list[int], str, int]:
    """POST until answered 200 (retrying 5xx and refused connections): (seed, replica, seeds, image, tries)."""
    body = {"prompt": f"request {seed}", "steps": 2, "seed": seed, "width": 32, "height": 32}
    tries = 0
    while True:
        tries += 1
        try:
            r = requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=REQUEST_TIMEOUT_S)
            if r.status_code == 200:
                data = r.json()
                return seed, r.headers[REPLICA], json.loads(data["info"])["all_seeds"], data["images"][0], tries
            assert r.status_code >= 500, r.text[:300]
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"request {seed} never succeeded ({tries} tries)"
        time.sleep(0.5)


def _replica_ids() -> set[str]:
    return {a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::")}


def _replicas(app: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[app].deployments["SDRuntimeReplica"].replica_states)


def test_two_replicas_serve_and_a_killed_one_is_replaced(tiny_sd1_engine):
    from ray import serve

    from runtime.serving.ray import APP_NAME, deployment
    from runtime.serving.service import ServerConfig

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(str(tiny_sd1_engine), ServerConfig(max_queue=8), backend="onnxruntime", options={"threads": 1},
                         replicas=2, replica_cpus=0.5)
        # serve.run waits for the replicas without a deadline of its own
        call_within(lambda: serve.run(app, name=APP_NAME, route_prefix="/"), "Ray Serve to run 2 replicas",
                    RAY_START_TIMEOUT_S)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(lambda s: _request(url, s, deadline), range(100, 112)))
        served = {replica for _, replica, _, _, _ in first}
        assert len(served) == 2, served

        victim = first[0][1]
        answers: list[tuple] = []
        killed = threading.Event()

        def client(seeds):
            for s in seeds:
                answers.append(_request(url, s, deadline))
                if len(answers) >= 4 and not killed.is_set():
                    killed.set()
                    actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#SDRuntimeReplica#{victim}", namespace="serve")
                    ray.kill(actor, no_restart=True)

        seeds = list(range(200, 224))
        threads = [threading.Thread(target=client, args=(seeds[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            join(t, "a client's requests while a replica is killed", RUN_TIMEOUT_S)
        assert killed.is_set()
        assert sorted(s for s, *_ in answers) == seeds  # every request answered, once
        assert all(all_seeds == [s] for s, _, all_seeds, _, _ in answers)

        # Serve's status still says 2 RUNNING until the controller's health check sees the death;
        # wait for a replica with a new id, then for both to run
        while not (_replica_ids() - served) or _replicas(APP_NAME) != {"RUNNING": 2}:
            assert time.monotonic() < deadline, f"a new replica and 2 RUNNING: {_replica_ids()}, {_replicas(APP_NAME)}"
            time.sleep(0.5)
        after: list[tuple] = []  # until both replicas answered (the proxy learns of the new one shortly)
        while len({replica for _, replica, _, _, _ in after}) < 2 and len(after) < 64:
            with ThreadPoolExecutor(4) as pool:
                after += pool.map(lambda s: _request(url, s, deadline), range(300 + len(after), 308 + len(after)))
        replicas_after = {replica for _, replica, _, _, _ in after}
        assert victim not in replicas_after and len(replicas_after) == 2, (victim, replicas_after)

        with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
            for s, _, _, image, _ in (answers[0], after[-1]):
                want = pipe.txt2img(f"request {s}", num_inference_steps=2, seed=s, height=32, width=32,
                                    scheduler="euler", karras=False, guidance_scale=7.0, progress=False).images[0]
                np.testing.assert_array_equal(pixels(image), as_array(want))
        retried = sum(tries > 1 for *_, tries in answers)
        print(f"\nray: 2 replicas, {len(first) + len(answers) + len(after)} requests, replica {victim} killed; "
              f"{retried} requests retried after a 5xx; replaced by {sorted(replicas_after - served)}; "
              f"{time.monotonic() - t0:.0f} s")
    finally:
        serve.shutdown()
        ray.shutdown()
