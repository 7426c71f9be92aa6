"""Prometheus metrics of one server (prometheus-client, in a registry of its own so that several
servers in one process, as in the tests, do not collide).

    sdrt_queue_depth                       requests waiting for the engine
    sdrt_running_requests                  requests in the engine's current batches
    sdrt_requests_total{endpoint,outcome}  ok | bad_request | unauthorized | rejected (503) |
                                           timeout | interrupted | disconnected | error
    sdrt_request_seconds{endpoint}         time from arrival to the answer
    sdrt_stage_seconds{stage}              per engine batch: text_encoder, vae_encode, denoise,
                                           vae_decode, total (the pipeline's timings), queue_wait
    sdrt_batch_requests                    requests per engine batch
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self, queue_depth: Any, running: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("sdrt_queue_depth", "requests waiting for the engine", registry=r).set_function(queue_depth)
        Gauge("sdrt_running_requests", "requests in the engine's current batches", registry=r).set_function(running)
        self.requests = Counter("sdrt_requests", "requests by endpoint and outcome", ("endpoint", "outcome"),
                                registry=r)
        self.latency = Histogram("sdrt_request_seconds", "time from arrival to answer", ("endpoint",),
                                 buckets=_SECONDS, registry=r)
        self.stages = Histogram("sdrt_stage_seconds", "seconds per pipeline stage and engine batch", ("stage",),
                                buckets=_SECONDS, registry=r)
        self.batch = Histogram("sdrt_batch_requests", "requests per engine batch", buckets=(1, 2, 3, 4, 6, 8, 16),
                               registry=r)

    def record(self, endpoint: str, outcome: str, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, outcome).inc()
        if seconds is not None:
            self.latency.labels(endpoint).observe(seconds)

    def on_batch(self, jobs: list[Any], outcome: Any, seconds: float) -> None:
        """Batcher hook: stage timings of a finished batch (results share them), queue waits."""
        self.batch.observe(len(jobs))
        for j in jobs:
            if j.started is not None:
                self.stages.labels("queue_wait").observe(j.started - j.submitted)
        if isinstance(outcome, list) and outcome:
            for stage, value in outcome[0].timings.items():
                self.stages.labels(stage).observe(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
