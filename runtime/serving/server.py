"""`python -m runtime serve ENGINE_DIR [ENGINE_DIR ...] [--model DIR] [--max-resident N] [--host 127.0.0.1]
[--port 7860] [--backend ...]`: serve one engine folder, or several (A1111's checkpoints: the first is
the default; at most N open at once, runtime/serving/models.py), over HTTP (uvicorn) until stopped. SIGTERM or SIGINT stop
accepting connections, let the requests in flight finish (their queued jobs run to the end), close
the engines and exit with status 0. `--ray --replicas N` serves through Ray Serve instead
(runtime/serving/ray.py). Options: docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

from .models import DEFAULT_MAX_RESIDENT
from .service import ServerConfig

__all__ = ["build_parser", "main", "serve_forever"]

API_KEY_ENV = "SDRT_API_KEY"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:  # long: one line per documented option
    p = _Parser(prog="python -m runtime serve", description="Serve an engine folder over HTTP "
                "(AUTOMATIC1111 /sdapi/v1, OpenAI /v1/images/generations, a web page at /).")
    p.add_argument("engine_dir", metavar="ENGINE_DIR", nargs="*",
                   help="engine folder(s) (built by build-engine); the first is the default model")
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="another engine folder to serve (repeatable; A1111 clients pick one by "
                        "override_settings.sd_model_checkpoint)")
    p.add_argument("--max-resident", type=int, default=DEFAULT_MAX_RESIDENT, metavar="N",
                   help=f"engine folders open at once; the least recently used idle one closes for another "
                        f"(default {DEFAULT_MAX_RESIDENT}, A1111's sd_checkpoints_limit)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    p.add_argument("--backend", default=None, help="engine backend (default: best available)")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option for every network, e.g. threads=2 (JSON values)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; none: open)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin requests from ORIGIN (repeatable; default: CORS off)")
    p.add_argument("--max-queue", type=int, default=32, help="waiting requests before 503 (default 32)")
    p.add_argument("--workers", type=int, default=1, help="engine threads (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request before 504 (default 600)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit in MiB (default 32)")
    p.add_argument("--max-steps", type=int, default=150, help="most sampler steps per request (default 150)")
    p.add_argument("--max-n-iter", type=int, default=16, help="most A1111 n_iter per request (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long a lone queued request waits for a compatible one to batch with (default 0)")
    p.add_argument("--styles", default=None, metavar="FILE",
                   help="A1111 styles.csv (name, prompt, negative_prompt) for the requests' styles (default: none)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ray = p.add_argument_group("Ray Serve (the cluster extra)")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas")
    ray.add_argument("--replicas", type=int, default=1, help="replicas, each with its own loaded pipeline")
    ray.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one; "
                     "'auto' joins the cluster `ray start` runs here)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    ray.add_argument("--autoscaling", default=None, metavar="JSON",
                     help="Ray Serve autoscaling_config, passed through, e.g. "
                          "'{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 2}'")
    return p


def folders_from_args(args: argparse.Namespace) -> list[str]:
    """The served folders: the positional ones, then each --model; at least one."""
    folders = [*args.engine_dir, *args.model]
    if not folders:
        raise ValueError("name at least one engine folder (ENGINE_DIR or --model DIR)")
    if args.max_resident < 1:
        raise ValueError(f"--max-resident must be at least 1; got {args.max_resident}")
    return folders


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.styles:  # a bad styles file fails here, before the model loads (ValueError naming it)
        from runtime.text.styles import StyleBook

        StyleBook.load(args.styles)
    return ServerConfig(api_key=args.api_key or None, max_queue=args.max_queue, workers=args.workers,
                        timeout=args.timeout, max_body_bytes=int(args.max_body_mb * 2**20),
                        cors_origins=tuple(args.cors_origin), max_steps=args.max_steps, max_n_iter=args.max_n_iter,
                        batch_wait=args.batch_wait_ms / 1000.0, styles=args.styles)


def open_models(folders: list[str], backend: str | None, options: dict[str, Any], max_resident: int) -> Any:
    """`Models` over `folders` (the first opened now), each opened by runtime.load with `backend`
    and `options`; a folder that cannot be read is a ValueError naming it."""
    from runtime.errors import SDRuntimeError
    from runtime.pipeline import load

    from .models import Models

    try:
        return Models.from_folders(folders, lambda d: load(d, backend=backend, **options), max_resident=max_resident)
    except SDRuntimeError as e:
        raise ValueError(str(e)) from e


def engine_options(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-option expects KEY=VALUE; got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def serve_forever(app: Any, host: str, port: int, *, log_level: str = "info", drain_timeout: float | None = None,
                  on_started: Any = None) -> int:
    """Run uvicorn until SIGTERM/SIGINT; in-flight requests finish, then the app's lifespan closes
    the service. Returns 0."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=None if drain_timeout is None else int(drain_timeout))
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down gracefully; with these handlers
    # in place that re-raise is a no-op and the process exits 0 after draining.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: None)
    if on_started is not None:
        on_started(server)
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        folders = folders_from_args(args)
        config = config_from_args(args)
        options = engine_options(args.engine_option)
        if args.ray:
            from .ray import run_ray

            return run_ray(args, config, options)
        from .app import create_app
        from .service import Service

        models = open_models(folders, args.backend, options, args.max_resident)
        app = create_app(Service(models, config))
    except (ValueError, ImportError) as e:
        print(f"python -m runtime serve: error: {e}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("serving %s on http://%s:%d (max %d open)", ", ".join(folders), args.host,
                                     args.port, args.max_resident)
    return serve_forever(app, args.host, args.port, log_level=args.log_level, drain_timeout=config.timeout + 10)
