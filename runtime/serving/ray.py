"""Scale-out on Ray Serve (the `cluster` extra): N replicas, each holding its own loaded pipeline and
job queue, serve the same HTTP API (runtime/serving/app.py) behind Ray's HTTP proxy.

    python -m runtime serve ENGINE_DIR [ENGINE_DIR ...] --ray --replicas 2 [--replica-cpus 1] [--ray-address auto]
        [--autoscaling '{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}']

Several folders: each replica serves all of them, with its own `--max-resident` bound
(runtime/serving/models.py); the default model set by POST /sdapi/v1/options is per replica, so
clients behind several replicas pick the model per request (override_settings.sd_model_checkpoint).

Each replica answers with an `x-sd-runtime-replica` header naming itself. Ray's router sends a
replica at most `max_queue + workers` requests at a time (`max_ongoing_requests`) and queues at most
`max_queue` more per replica (`max_queued_requests`; past it Ray's proxy answers 503), so the
bounded queue holds across the cluster too. A replica that dies is replaced by Ray Serve's
controller; requests it was running fail (500/503) and can be retried. Multi-node set-up:
docs/serving.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
from typing import Any

from ray import serve

from .models import DEFAULT_MAX_RESIDENT
from .service import ServerConfig

__all__ = ["APP_NAME", "SDRuntimeReplica", "deployment", "run_ray"]

APP_NAME = "sd-runtime"
log = logging.getLogger(__name__)


@serve.ingress()
class SDRuntimeReplica:
    """One replica: opens the engine folder(s) (`engine_dir`: one path or a list), then serves the app
    over its own Service."""

    def __init__(self, engine_dir: str | list[str], backend: str | None, options: dict[str, Any], config: ServerConfig,
                 max_resident: int = DEFAULT_MAX_RESIDENT):
        from .server import open_models
        from .service import Service

        replica = serve.get_replica_context().replica_tag
        folders = [engine_dir] if isinstance(engine_dir, str) else list(engine_dir)
        self.service = Service(open_models(folders, backend, options, max_resident),
                               dataclasses.replace(config, replica=replica))

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.service)


def deployment(engine_dir: str | list[str], config: ServerConfig, *, backend: str | None = None,
               options: dict[str, Any] | None = None, replicas: int = 1, replica_cpus: float = 1.0,
               autoscaling: dict[str, Any] | None = None, max_resident: int = DEFAULT_MAX_RESIDENT) -> Any:
    """The bound Ray Serve application (for `serve.run`). `autoscaling` is Ray Serve's
    autoscaling_config, passed through (it replaces the fixed replica count)."""
    settings: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=config.max_queue + config.workers,
        max_queued_requests=config.max_queue,
        graceful_shutdown_timeout_s=config.timeout + 10,
    )
    if autoscaling:
        settings["autoscaling_config"] = autoscaling
    else:
        settings["num_replicas"] = replicas
    dep = serve.deployment(SDRuntimeReplica, name="SDRuntimeReplica").options(**settings)
    folders = str(engine_dir) if isinstance(engine_dir, (str, os.PathLike)) else [str(d) for d in engine_dir]
    return dep.bind(folders, backend, dict(options or {}), config, max_resident)


def run_ray(args: argparse.Namespace, config: ServerConfig, options: dict[str, Any]) -> int:
    """`serve --ray`: join (or start) a Ray cluster, deploy, serve until SIGTERM/SIGINT, then shut
    Serve down (replicas finish their requests within graceful_shutdown_timeout_s) and exit 0."""
    import json

    import ray

    autoscaling = json.loads(args.autoscaling) if args.autoscaling else None
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=args.log_level.upper())
    serve.start(http_options={"host": args.host, "port": args.port})
    folders = [*args.engine_dir, *args.model]
    app = deployment(folders[0] if len(folders) == 1 else folders, config, backend=args.backend, options=options,
                     replicas=args.replicas, replica_cpus=args.replica_cpus, autoscaling=autoscaling,
                     max_resident=args.max_resident)
    serve.run(app, name=APP_NAME, route_prefix="/")
    log.info("serving %s through Ray Serve on http://%s:%d", ", ".join(folders), args.host, args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
