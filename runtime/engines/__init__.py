"""Engines: one network each, behind the interface in `base.py`.

Each backend module `runtime.engines.<module>` exposes `is_available() -> (bool, why)` and
`open_engine(engine_dir, manifest, network, **options) -> Engine` and `OPTIONS` (the option names
open_engine takes), and is imported only when asked for, so a missing optional package (tensorrt,
openvino, torch) costs nothing until used.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from runtime.engines.base import Engine
from runtime.manifest import Manifest, ManifestError, load_manifest
from runtime.networks import NETWORKS

# Default preference order: the first available backend that can run the folder is used.
BACKENDS = ("tensorrt", "openvino", "onnxruntime", "torch")
# Backends that run only from their own prebuilt files, recorded under manifest.backends[name].
PREBUILT = ("tensorrt",)


class EngineLoadError(RuntimeError):
    """An engine file cannot be loaded: missing, corrupt, or not matching the network contract."""


class BackendError(ValueError):
    """An unknown backend, or one that cannot run on this machine or this engine folder."""


def _module(backend: str):
    return importlib.import_module(f"runtime.engines.{backend}")


def _unavailable(backend: str) -> str | None:
    """None if `backend` can run on this machine, else why not."""
    try:
        ok, why = _module(backend).is_available()
    except ImportError as e:
        return f"runtime.engines.{backend} does not import: {e}"
    return None if ok else (why or "not available")


def available_backends() -> dict[str, str | None]:
    """Every backend name -> None if it can run on this machine, else why not."""
    return {backend: _unavailable(backend) for backend in BACKENDS}


def _folder_problem(backend: str, manifest: Manifest, engine_dir: str | os.PathLike) -> str | None:
    """None if `backend` can run this folder's files, else why not (checked only for available backends)."""
    if backend in PREBUILT and backend not in manifest.backends:
        return f"the engine folder has no {backend} files (build it with --backend {backend})"
    if backend == "tensorrt":  # plans are keyed to a TensorRT version and GPU: never pick stale ones
        return _module(backend).plans_problem(engine_dir, manifest)
    return None


def open_engines(engine_dir: str | os.PathLike, manifest: Manifest | None = None, backend: str | None = None,
                 **options: Any) -> tuple[str, dict[str, Engine]]:
    """Open all four networks of an engine folder with one backend; return (backend, engines).

    `backend=None` picks the first of `BACKENDS` that is available here and can run this folder.
    `options` go to the backend's `open_engine` (e.g. providers/threads for onnxruntime)."""
    manifest = manifest if manifest is not None else load_manifest(engine_dir)
    missing = [n for n in NETWORKS if n not in manifest.networks]
    if missing:
        raise ManifestError(f"{engine_dir}: the manifest lacks networks {', '.join(missing)}")
    chosen = backend is None
    if backend is None:
        reasons = {b: _unavailable(b) or _folder_problem(b, manifest, engine_dir) for b in BACKENDS}
        usable = [b for b in BACKENDS if reasons[b] is None]
        if not usable:
            raise BackendError("no backend can run this engine folder: "
                               + "; ".join(f"{b}: {why}" for b, why in reasons.items()))
        backend = usable[0]
    elif backend not in BACKENDS:
        usable = [b for b, why in available_backends().items() if why is None]
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} "
                           f"(available here: {', '.join(usable) or 'none'})")
    else:
        why = _unavailable(backend) or _folder_problem(backend, manifest, engine_dir)
        if why:
            usable = [b for b, w in available_backends().items() if w is None and _folder_problem(b, manifest, engine_dir) is None]
            raise BackendError(f"backend {backend!r} cannot run {engine_dir}: {why}. "
                               f"Usable here: {', '.join(usable) or 'none'}")
    module = _module(backend)
    unknown = sorted(set(options) - set(module.OPTIONS))
    if unknown:
        how = f"picked as the first usable of {', '.join(BACKENDS)}" if chosen else "requested"
        raise BackendError(f"backend {backend!r} ({how}) does not take the option(s) {', '.join(unknown)}; it takes "
                           f"{', '.join(module.OPTIONS)}. Pass backend=... to name the backend those options are for.")
    return backend, {n: module.open_engine(engine_dir, manifest, n, **options) for n in NETWORKS}
