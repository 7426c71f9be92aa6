"""Which CPU backend is fastest for this folder on this machine: measured once, then remembered.

The fastest CPU backend depends on the CPU (on an AVX-512-BF16 or AMX CPU OpenVINO's bf16 kernels
run the SD 1.5 U-Net at about twice ONNX Runtime's fp32 speed; on an AVX2-only EPYC, ONNX Runtime
was faster end to end than OpenVINO f32), so no fixed order is right everywhere. When
`runtime.load(dir)` has to choose between several usable CPU backends, it looks for a record of
this folder on this machine; without one it measures: for each candidate, the U-Net at the
folder's optimal size (guidance batch) and the VAE decoder, one warm-up and `REPEATS` timed calls
each, scored as a typical run of `RUN_STEPS` U-Net calls plus one decode. The winner and the figures
are written to the user's cache (`$XDG_CACHE_HOME/sd-runtime/backend-choice/`, never into the
engine folder, which may be read-only or shared) under a key of the folder's graphs and the
machine: CPU model, the features of runtime/cpu.py (the ISA cap included), core count and the
backends' versions. Any change there measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from runtime import cpu
from runtime.folder.manifest import Manifest
from runtime.folder.networks import axis_values, concrete_shape, network_io

log = logging.getLogger(__name__)

CANDIDATES = ("openvino", "onnxruntime")  # the CPU backends worth serving with (torch is a reference)
RUN_STEPS = 20  # U-Net calls of the typical run the score stands for
REPEATS = 2
FORMAT = 1


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sd-runtime" / "backend-choice"


def machine_key() -> dict[str, Any]:
    versions = {}
    for dist in ("openvino", "onnxruntime", "sd-runtime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpu": cpu.model_name(), "features": sorted(cpu.features()), "cap": cpu.isa_cap(),
            "cores": os.cpu_count(), "versions": versions}


def folder_key(manifest: Manifest) -> dict[str, Any]:
    nets = {n: manifest.networks[n].get("sha256") for n in ("unet", "vae_decoder")}
    int8 = manifest.int8_unet
    return {"networks": nets, "int8": int8.get("sha256") if int8 else None, "shapes": manifest.shapes}


def _record_path(manifest: Manifest, candidates: tuple[str, ...]) -> Path:
    key = json.dumps({"folder": folder_key(manifest), "machine": machine_key(), "candidates": candidates,
                      "format": FORMAT}, sort_keys=True)
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def recorded(manifest: Manifest, candidates: tuple[str, ...]) -> dict[str, Any] | None:
    path = _record_path(manifest, candidates)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("backend") in candidates else None


def reason(record: dict[str, Any]) -> str:
    figures = ", ".join(f"{b} {s:.3g} s" for b, s in sorted(record["scores"].items(), key=lambda kv: kv[1]))
    return (f"fastest measured on this machine ({record['machine']}) on {record['date']}: a {RUN_STEPS}-step "
            f"run's U-Net calls and decode take {figures}")


def _feeds(manifest: Manifest, network: str) -> dict[str, np.ndarray]:
    size = manifest.shapes["opt_image"]
    batch = 2 * manifest.shapes["opt_batch"] if network == "unet" else manifest.shapes["opt_batch"]
    axes = axis_values(manifest.dims, batch, size, size)
    inputs, _ = network_io(network, manifest.dims, manifest.networks[network].get("precision", manifest.precision))
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal(concrete_shape(t, axes)).astype(np.float32) for t in inputs}
    if "timestep" in feeds:
        feeds["timestep"] = np.full(feeds["timestep"].shape, 500.0, np.float32)
    return feeds


def _time(engine: Any, feeds: dict[str, np.ndarray]) -> float:
    engine.run(feeds)  # warm-up (OpenVINO compiles the shape here)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        engine.run(feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(engine_dir: str | os.PathLike, manifest: Manifest, candidates: tuple[str, ...],
            open_one) -> dict[str, Any]:
    """Time each candidate (`open_one(backend, network) -> Engine`), record the winner, return the record."""
    scores, detail = {}, {}
    for backend in candidates:
        times = {}
        for network in ("unet", "vae_decoder"):
            with open_one(backend, network) as engine:
                times[network] = _time(engine, _feeds(manifest, network))
        scores[backend] = RUN_STEPS * times["unet"] + times["vae_decoder"]
        detail[backend] = times
    record = {"backend": min(scores, key=scores.get), "scores": scores, "seconds": detail,
              "machine": cpu.describe(), "date": datetime.now(timezone.utc).date().isoformat(),
              "engine_dir": str(Path(engine_dir).resolve()), "size": manifest.shapes["opt_image"]}
    _write(_record_path(manifest, candidates), record)
    return record


def _write(path: Path, record: dict[str, Any]) -> None:
    """Atomically (temporary file, then rename); a cache that cannot be written only costs a re-measure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not record the backend choice in %s: %s", path, e)
