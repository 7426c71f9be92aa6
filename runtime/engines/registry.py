"""The registry of engine backends: which backends exist, which one runs a folder, and opening them.

A backend is a module with `is_available() -> (bool, why)`, `OPTIONS` (the option names its
`open_engine` takes) and `open_engine(engine_dir, manifest, network, **options) -> Engine`. The
built-in ones live here (`runtime.engines.<name>`); other packages register theirs under the
entry-point group `sd_runtime.engines` (name = backend, value = module). That is how the PyTorch
reference engine, which needs torch and the reference models of `export/`, reaches the torch-free
runtime: `export/torch_engine.py`, registered in pyproject.toml. A backend module is imported only
when asked for, so a missing optional package (tensorrt, openvino, torch) costs nothing until used.

Options reach the engines per network: `options={"unet": {...}, "*": {...}}` (a network's own
entry wins over "*"); plain keyword options are shorthand for "*".
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from importlib import metadata
from types import ModuleType
from typing import Any

from runtime.engines.base import Engine, EngineInfo
from runtime.errors import BackendError, EngineLoadError, SDRuntimeError
from runtime.folder.paths import check_folder
from runtime.folder.manifest import Manifest, ManifestError, load_manifest
from runtime.folder.networks import NETWORKS

__all__ = ["BACKENDS", "BackendError", "Engine", "EngineInfo", "EngineLoadError", "ENTRY_POINT_GROUP",
           "available_backends", "backend_module", "choose_backend", "close_all", "network_options", "open_engines",
           "open_engines_why"]

# Default preference order: the first available backend that can run the folder is used.
BACKENDS = ("tensorrt", "openvino", "onnxruntime", "torch")
BUILTIN = {"tensorrt": "runtime.engines.tensorrt", "openvino": "runtime.engines.openvino",
           "onnxruntime": "runtime.engines.onnxruntime"}
ENTRY_POINT_GROUP = "sd_runtime.engines"
# Backends that run only from their own prebuilt files, recorded under manifest.backends[name].
PREBUILT = ("tensorrt",)
ALL_NETWORKS = "*"
log = logging.getLogger(__name__)


def _registered() -> dict[str, str]:
    """Backend name -> module path, from the `sd_runtime.engines` entry points."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_module(backend: str) -> ModuleType:
    """The module of a backend (built-in or registered). Raises BackendError if none is known and
    ImportError if it does not import."""
    path = BUILTIN.get(backend) or _registered().get(backend)
    if path is None:
        hint = (" (the PyTorch reference engine is registered by this project's pyproject.toml: "
                "pip install -e '.[export]')") if backend == "torch" else ""
        raise BackendError(f"no engine module is registered for backend {backend!r} "
                           f"(entry point group {ENTRY_POINT_GROUP}){hint}")
    return importlib.import_module(path)


def _unavailable(backend: str) -> str | None:
    """None if `backend` can run on this machine, else why not."""
    try:
        ok, why = backend_module(backend).is_available()
    except BackendError as e:
        return str(e)
    except ImportError as e:
        return f"its engine module does not import: {e}"
    return None if ok else (why or "not available")


def available_backends() -> dict[str, str | None]:
    """Every backend name -> None if it can run on this machine, else why not."""
    return {backend: _unavailable(backend) for backend in BACKENDS}


def _folder_problem(backend: str, manifest: Manifest, engine_dir: str | os.PathLike) -> str | None:
    """None if `backend` can run this folder's files, else why not (checked only for available backends)."""
    if backend in PREBUILT and backend not in manifest.backends:
        return f"the engine folder has no {backend} files (build it with build-engine --tensorrt)"
    if backend == "tensorrt":  # plans are keyed to a TensorRT version and GPU: never pick stale ones
        return backend_module(backend).plans_problem(engine_dir, manifest)
    return None


def choose_backend(engine_dir: str | os.PathLike, manifest: Manifest, backend: str | None, *,
                   calibrate: bool = False) -> tuple[str, str]:
    """(backend, why it was chosen): `backend` if it can run the folder here, else BackendError.
    None: TensorRT where its plans match this GPU; else, among the usable CPU backends, the one
    measured fastest for this folder on this machine when `calibrate` (runtime/engines/calibration.py:
    measured once, then remembered); else the first of BACKENDS that can run the folder."""
    if backend is not None:
        _check_named(engine_dir, manifest, backend)
        return backend, "requested"
    reasons = {b: _unavailable(b) or _folder_problem(b, manifest, engine_dir) for b in BACKENDS}
    usable = [b for b in BACKENDS if reasons[b] is None]
    if not usable:
        raise BackendError("no backend can run this engine folder: "
                           + "; ".join(f"{b}: {why}" for b, why in reasons.items()))
    if usable[0] == "tensorrt":
        return "tensorrt", "TensorRT plans built for this GPU and TensorRT version"
    from runtime.engines import calibration

    cpu_backends = tuple(b for b in calibration.CANDIDATES if b in usable)
    if calibrate and len(cpu_backends) > 1:
        try:
            return _measured(engine_dir, manifest, cpu_backends)
        except SDRuntimeError as e:  # a backend that cannot open a network here: fall back to the order
            log.warning("backend calibration failed (%s); taking the first usable backend", e)
    why = "the only usable CPU backend" if len(cpu_backends) == 1 and usable[0] in cpu_backends else \
        f"the first usable of {', '.join(BACKENDS)}" + ("" if calibrate else " (not measured: calibrate=False)")
    return usable[0], why


def _measured(engine_dir: str | os.PathLike, manifest: Manifest, candidates: tuple[str, ...]) -> tuple[str, str]:
    from runtime.engines import calibration

    record = calibration.recorded(manifest, candidates)
    if record is None:
        log.info("measuring %s on this machine for %s (once; remembered in %s)", " and ".join(candidates),
                 engine_dir, calibration.cache_dir())

        def open_one(backend: str, network: str) -> Engine:
            return open_network(backend_module(backend), backend, engine_dir, manifest, network, {})

        record = calibration.measure(engine_dir, manifest, candidates, open_one)
    return record["backend"], calibration.reason(record)


def _check_named(engine_dir: str | os.PathLike, manifest: Manifest, backend: str) -> None:
    if backend not in BACKENDS and backend not in _registered():
        usable = [b for b, why in available_backends().items() if why is None]
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} "
                           f"(available here: {', '.join(usable) or 'none'})")
    why = _unavailable(backend) or _folder_problem(backend, manifest, engine_dir)
    if why:
        usable = [b for b, w in available_backends().items()
                  if w is None and _folder_problem(b, manifest, engine_dir) is None]
        raise BackendError(f"backend {backend!r} cannot run {engine_dir}: {why}. Usable here: {', '.join(usable) or 'none'}")


def network_options(options: Mapping[str, Any] | None, flat: Mapping[str, Any], network: str) -> dict[str, Any]:
    """The options of one network: `options["*"]`, then the flat keyword options, then `options[network]`."""
    options = dict(options or {})
    return {**dict(options.get(ALL_NETWORKS, {})), **dict(flat), **dict(options.get(network, {}))}


def _check_options(backend: str, module: ModuleType, options: Mapping[str, Any] | None, flat: Mapping[str, Any],
                   networks: tuple[str, ...], chosen: bool) -> None:
    """Refuse, before anything opens, option names the backend does not take and unknown network keys."""
    bad_keys = sorted(set(options or {}) - set(networks) - set(NETWORKS) - {ALL_NETWORKS})
    if bad_keys:
        raise BackendError(f"options: unknown network(s) {', '.join(bad_keys)}; the keys are network names "
                           f"({', '.join(networks)}) or {ALL_NETWORKS!r}")
    for network in networks:
        unknown = sorted(set(network_options(options, flat, network)) - set(module.OPTIONS))
        if unknown:
            how = f"picked as the first usable of {', '.join(BACKENDS)}" if chosen else "requested"
            raise BackendError(f"backend {backend!r} ({how}) does not take the option(s) {', '.join(unknown)}; it takes "
                               f"{', '.join(module.OPTIONS)}. Pass backend=... to name the backend those options are for.")


def close_all(engines: Mapping[str, Engine]) -> None:
    """Close every engine; the first error (if any) is raised after all were tried."""
    first: BaseException | None = None
    for engine in engines.values():
        try:
            engine.close()
        except Exception as e:  # keep closing the others; report the first failure
            first = first or e
    if first is not None:
        raise first


def open_network(module: ModuleType, backend: str, engine_dir: str | os.PathLike, manifest: Manifest, network: str,
                 options: Mapping[str, Any]) -> Engine:
    """One engine; any failure that is not already ours becomes an EngineLoadError chained from it."""
    try:
        return module.open_engine(engine_dir, manifest, network, **options)
    except SDRuntimeError:
        raise
    except Exception as e:  # the backend's own exception types (pybind errors, RuntimeError, OSError...)
        raise EngineLoadError(f"{network} ({backend}): cannot open it from {engine_dir}: {type(e).__name__}: {e}") from e


def open_engines(engine_dir: str | os.PathLike, manifest: Manifest | None = None, backend: str | None = None,
                 options: Mapping[str, Mapping[str, Any]] | None = None, *, networks: tuple[str, ...] = NETWORKS,
                 calibrate: bool = False, verify: bool = False, **flat_options: Any) -> tuple[str, dict[str, Engine]]:
    """Open `networks` (default: the four required ones) of an engine folder with one backend;
    return (backend, engines). See `open_engines_why`."""
    name, _, engines = open_engines_why(engine_dir, manifest, backend, options, networks=networks, calibrate=calibrate,
                                        verify=verify, **flat_options)
    return name, engines


def open_engines_why(engine_dir: str | os.PathLike, manifest: Manifest | None = None, backend: str | None = None,
                     options: Mapping[str, Mapping[str, Any]] | None = None, *, networks: tuple[str, ...] = NETWORKS,
                     calibrate: bool = False, verify: bool = False,
                     **flat_options: Any) -> tuple[str, str, dict[str, Engine]]:
    """Open `networks` with one backend; return (backend, why it was chosen, engines).

    Before any backend opens a file, the folder is checked (runtime/folder/paths.py `check_folder`: every
    path inside it, every file's size and fingerprint, or its sha256 with `verify=True`); the
    prebuilt files of the chosen backend (TensorRT plans) once it is chosen.

    `backend=None` picks one (`choose_backend`; `calibrate` measures the CPU backends once per folder
    and machine). `options` maps a network name (or "*", every network) to its backend options;
    `flat_options` are shorthand for "*". If opening a network fails, the ones already opened are
    closed."""
    manifest = manifest if manifest is not None else load_manifest(engine_dir)
    missing = [n for n in networks if n not in manifest.networks]
    if missing:
        raise ManifestError(f"{engine_dir}: the manifest lacks networks {', '.join(missing)}")
    check_folder(engine_dir, manifest, verify=verify, backends=[b for b in BACKENDS if b not in PREBUILT])
    chosen = backend is None
    backend, why = choose_backend(engine_dir, manifest, backend, calibrate=calibrate)
    if backend in PREBUILT:
        check_folder(engine_dir, manifest, verify=verify, backends=[backend], common=False)
    module = backend_module(backend)
    _check_options(backend, module, options, flat_options, networks, chosen)
    engines: dict[str, Engine] = {}
    try:
        for network in networks:
            engines[network] = open_network(module, backend, engine_dir, manifest, network,
                                            network_options(options, flat_options, network))
    except BaseException:
        close_all(engines)
        raise
    return backend, why, engines
