"""The benchmark suite: every available engine and every peer, on the same random weights, in one run.

    python -m benchmarks [--quick] [--model sd15|sd21|tiny-sd1] [--resolution 256] [--batch 1]
                         [--steps 20] [--cache-interval 3] [--engines ...] [--peers ...] [--repeats N] [--warmup N]
                         [--optimum-python PATH] [--sdcpp-python PATH] [--out benchmarks/results/NAME.json]

Measured per target (docs/benchmarks.md has the details and the recorded results):
  - per network: text encoder and U-Net at the guidance batch (2 x batch), VAE decode and encode at
    the image batch: median of `repeats` timed calls after `warmup` untimed ones, with min and max;
  - end to end: txt2img at `steps` steps, guidance 7.5 (our pipeline, or diffusers' for peers);
    with `--cache-interval N` each engine also end to end with step caching (DeepCache, a full U-Net
    every N calls; the engine folder gets the step-cache graphs) in a process of its own that
    alternates uncached and cached runs (at least 2 each): the speed-up is the ratio of their
    medians, beside the PSNR of the cached image against the uncached one (same seed);
  - peak memory: the RSS high-water mark of the target's end-to-end process (load + generate), and
    of its per-network process;
  - parity: each target's network outputs against the fp32 PyTorch reference (diffusers fp32 eager),
    max|out - ref| / max|ref|, on the same seeded inputs;
and once per run the NumPy scheduler's overhead per step.

Targets run one after another, each in a fresh process (benchmarks/worker.py; the optimum-intel and
stable-diffusion.cpp peers with their own venv's Python, benchmarks/peers/). Weights: the preset's
random weights (seed 0) written once as a diffusers folder, from which the engine folder is built;
both are cached under --cache-dir and reused.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine as mach
from benchmarks import peers
from benchmarks.report import render_markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_CACHE = Path(os.environ.get("SDRT_BENCH_CACHE", "~/.cache/sd-runtime/benchmarks")).expanduser()
SCHEMA_VERSION = 1
MODELS = ("sd15", "sd21", "tiny-sd1", "tiny-sd2")
NETWORKS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
GUIDANCE_SCALE = 7.5  # diffusers' default
REFERENCE = "diffusers-fp32"  # parity reference: PyTorch fp32 eager


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "engine" | "peer"
    label: str
    backend: str = ""  # engines: runtime.engines.<backend>
    options: dict[str, Any] = field(default_factory=dict)  # engines: open_engine options
    dtype: str = "float32"  # peers: torch dtype
    compile: bool = False  # peers: torch.compile the U-Net (CUDA only)
    # peers outside the project env (benchmarks/peers RUNNERS: "optimum", "sdcpp"), run with their
    # venv's Python; `dtype` is then the runner's precision ("default" / "f32") or weight type
    runner: str = ""
    e2e_only: bool = False  # no per-network call to time (stable-diffusion.cpp)


ENGINES = {
    "openvino-bf16": Target("openvino-bf16", "engine", "OpenVINO bf16", "openvino",
                            {"inference_precision": "bf16", "quantized": False}),
    # opt-in: the engine folder built with `build-engine --quantize int8` (the rest of the graph bf16 where the
    # CPU has it); the benchmark cache gets its int8 U-Net the first time this target is asked for
    "openvino-int8": Target("openvino-int8", "engine", "OpenVINO int8 U-Net (build-engine --quantize int8)", "openvino",
                            {"quantized": True}),
    "openvino-f32": Target("openvino-f32", "engine", "OpenVINO fp32", "openvino",
                           {"inference_precision": "f32", "quantized": False}),
    "onnxruntime": Target("onnxruntime", "engine", "ONNX Runtime fp32", "onnxruntime"),
    "torch": Target("torch", "engine", "our PyTorch reference engine", "torch"),
    "tensorrt": Target("tensorrt", "engine", "TensorRT", "tensorrt"),
}
PEERS = {
    "diffusers-fp32": Target("diffusers-fp32", "peer", "diffusers PyTorch fp32 eager", dtype="float32"),
    "diffusers-bf16": Target("diffusers-bf16", "peer", "diffusers PyTorch bf16 eager", dtype="bfloat16"),
    "diffusers-compile": Target("diffusers-compile", "peer", "diffusers PyTorch fp16 torch.compile (CUDA)",
                                dtype="float16", compile=True),
    # benchmarks/peers: each in its own venv (benchmarks/peers/setup-*.sh), skipped with the reason without it
    "optimum": Target("optimum", "peer", "optimum-intel OVStableDiffusionPipeline, static shapes, OpenVINO's "
                      "default precision", dtype="default", runner="optimum"),
    "optimum-f32": Target("optimum-f32", "peer", "optimum-intel OVStableDiffusionPipeline, static shapes, f32",
                          dtype="f32", runner="optimum"),
    "sdcpp": Target("sdcpp", "peer", "stable-diffusion.cpp (stable-diffusion-cpp-python), f32 weights",
                    dtype="f32", runner="sdcpp", e2e_only=True),
}


@dataclass
class Settings:
    model: str = "sd15"
    resolution: int = 256
    batch: int = 1
    steps: int = 20
    guidance_scale: float = GUIDANCE_SCALE
    engines: tuple[str, ...] = tuple(ENGINES)
    peers: tuple[str, ...] = tuple(PEERS)
    networks: tuple[str, ...] = NETWORKS
    e2e: bool = True
    repeats: int = 3
    warmup: int = 1
    process_repeats: int = 1  # fresh processes per target for the per-network calls
    e2e_repeats: int = 1
    e2e_warmup: int = 1
    seed: int = 0
    weights_seed: int = 0
    quick: bool = False
    cache_dir: str = str(DEFAULT_CACHE)
    cache_interval: int = 1  # > 1: engines also end to end with step caching at this interval
    timeout_s: float = 3600.0
    peer_python: dict[str, str] = field(default_factory=dict)  # runner -> interpreter (--optimum-python ...)


# --------------------------------------------------------------------------------- availability


def target_availability(target: Target, settings: Settings | None = None) -> tuple[bool, str]:
    """(True, "") when `target` can run here (with `settings`: and has something to measure in
    this run); else (False, the reason it is skipped)."""
    if target.runner:
        return _external_peer_availability(target, settings)
    if target.kind == "engine":
        try:
            module = importlib.import_module(f"runtime.engines.{target.backend}")
        except ImportError as e:
            return False, f"runtime.engines.{target.backend} does not import: {e}"
        if hasattr(module, "is_available"):
            ok, why = module.is_available()
            if not ok:
                return False, why
        if target.options.get("quantized"):
            from export.quantize import is_available as quantize_available

            ok, why = quantize_available()
            if not ok:
                return False, f"the int8 U-Net is built with nncf: {why}"
        if target.backend == "openvino" and target.options.get("inference_precision") == "bf16":
            caps = module.cpu_capabilities()
            if "BF16" not in caps:
                return False, f"this CPU has no bf16 hardware (OpenVINO CPU capabilities: {', '.join(caps)})"
        return True, ""
    for package in ("torch", "diffusers"):
        try:
            importlib.import_module(package)
        except ImportError as e:
            return False, f"{package} is not installed ({e})"
    if target.compile:
        import torch

        if not torch.cuda.is_available():
            return False, ("torch.compile peer is GPU-only: on CPU, compiling the full U-Net takes minutes "
                           "and is not how diffusers is run there")
    return True, ""


def _external_peer_availability(target: Target, settings: Settings | None) -> tuple[bool, str]:
    if target.e2e_only and settings is not None and not settings.e2e:
        return False, f"{target.name} is measured end to end only, and this run has no end to end (--quick / --no-e2e)"
    override = settings.peer_python.get(target.runner) if settings is not None else None
    return peers.availability(target.runner, override)


def measured_default(engine_dir: Path, workdir: Path, settings: Settings) -> tuple[str | None, str]:
    """The target `runtime.load(engine_dir)` picks on this machine with no backend given (its
    calibration, runtime/engines/calibration.py, in a fresh process: measured once per folder and
    machine, then remembered), with the runtime's reason; else the registry order's."""
    result = _run_worker({"kind": "choose", "target": "choose", "engine_dir": str(engine_dir)}, workdir,
                         settings.timeout_s)
    if result.get("status") != "ok":
        target, why = default_engine_target(engine_dir)
        return target, f"calibration failed ({result.get('reason')}); registry order: {why}"
    backend, reason = result["choice"]["backend"], result["choice"]["reason"]
    if backend == "openvino":
        from runtime.engines import openvino

        return f"openvino-{openvino.default_precision()}", reason
    return backend, reason


def default_engine_target(engine_dir: Path | None = None) -> tuple[str | None, str]:
    """The target the runtime picks with no backend given and no calibration: the registry's
    preference order (runtime/engines/__init__.py BACKENDS), each backend's default options."""
    try:
        from runtime.engines import PREBUILT, available_backends
    except ImportError as e:
        return None, f"runtime.engines has no registry: {e}"
    prebuilt: dict[str, Any] = {}
    if engine_dir is not None and (engine_dir / "manifest.json").is_file():
        from runtime.folder.manifest import load_manifest

        prebuilt = load_manifest(engine_dir).backends
    usable = [b for b, why in available_backends().items()
              if why is None and (b not in PREBUILT or b in prebuilt)]
    if not usable:
        return None, "no engine backend is available"
    if usable[0] == "openvino":
        from runtime.engines import openvino

        return f"openvino-{openvino.default_precision()}", ""
    return usable[0], ""


# ----------------------------------------------------------------------------------------- runs


def _run_worker(task: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    name = task.get("target") or task["kind"]
    task_path, result_path = workdir / f"{name}.task.json", workdir / f"{name}.result.json"
    task_path.write_text(json.dumps(task, indent=1))
    result_path.unlink(missing_ok=True)
    # a peer outside the project env names its own interpreter and worker module (benchmarks/peers)
    cmd = [task.get("worker_python", sys.executable), "-m", task.get("worker_module", "benchmarks.worker"),
           str(task_path), str(result_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"target": name, "status": "failed", "reason": f"timed out after {timeout_s:.0f} s"}
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = (proc.stderr or proc.stdout or "")[-2000:]
        how = (f"was killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        result = {"target": name, "status": "failed",
                  "reason": f"worker {how} and no result (killed for memory?): {tail}"}
    result["process_s"] = time.perf_counter() - t0
    return result


def cache_paths(settings: Settings) -> tuple[Path, Path]:
    """(diffusers folder, engine folder) for the model under the cache dir."""
    base = Path(settings.cache_dir) / f"{settings.model}-seed{settings.weights_seed}"
    return base / "diffusers", base / "engine-fp32"


def wants_int8(settings: Settings) -> bool:
    """Whether this run measures the int8 U-Net and can build it."""
    return "openvino-int8" in settings.engines and target_availability(ENGINES["openvino-int8"])[0]


def build_options(settings: Settings) -> dict[str, Any]:
    """build_engine keyword arguments: an fp32 graph with build_engine's default image bounds (half
    to twice the native size) widened to cover the benchmarked resolution, which is also the
    optimal size (the export's parity check and the int8 calibration run there, cheaper than at the
    native size); the int8 U-Net when the run measures it."""
    from export.configs import preset

    spec = preset(settings.model)
    native = spec.unet.sample_size * spec.vae_scale_factor
    res = settings.resolution
    return {"precision": "fp32", "min_image": min(res, native // 2), "opt_image": res,
            "max_image": max(res, 2 * native), "max_batch": max(4, settings.batch), "seed": settings.weights_seed,
            "quantize": "int8" if wants_int8(settings) else None, "step_cache": settings.cache_interval > 1}


def prepare_cache(settings: Settings, workdir: Path, log) -> dict[str, Any]:
    """Build the cached diffusers and engine folders where they are missing, do not cover the run's
    shapes, or lack the int8 U-Net or the step-cache graphs the run measures. A folder that covers
    the run is left as it is, int8 U-Net and step-cache graphs included, when the run does not
    measure them."""
    diffusers_dir, engine_dir = cache_paths(settings)
    diffusers_dir.parent.mkdir(parents=True, exist_ok=True)
    if (diffusers_dir / "model_index.json").is_file() and (engine_dir / "manifest.json").is_file():
        from runtime.folder.manifest import load_manifest

        manifest = load_manifest(engine_dir)
        shapes = manifest.shapes
        covered = shapes["min_image"] <= settings.resolution <= shapes["max_image"] and settings.batch <= shapes["max_batch"]
        step_cache = "unet_deep" in manifest.networks or settings.cache_interval <= 1
        if covered and step_cache and (manifest.int8_unet is not None or not wants_int8(settings)):
            return {"status": "ok", "reused": True}
    log(f"building the benchmark cache for {settings.model} under {diffusers_dir.parent} (once)")
    task = {"kind": "prepare", "target": "prepare", "model": settings.model, "weights_seed": settings.weights_seed,
            "diffusers_dir": str(diffusers_dir), "engine_dir": str(engine_dir), "build_options": build_options(settings)}
    result = _run_worker(task, workdir, settings.timeout_s)
    if result["status"] != "ok":
        raise RuntimeError(f"could not build the benchmark cache: {result.get('reason')}\n{result.get('traceback', '')}")
    result["reused"] = False
    return result


def run_target(target: Target, settings: Settings, workdir: Path) -> dict[str, Any]:
    """Measure `target` in two fresh processes: the per-network calls, then end to end (so the
    end-to-end peak RSS is that of loading the pipeline and generating, nothing else)."""
    diffusers_dir, engine_dir = cache_paths(settings)
    task = {
        "kind": target.kind, "target": target.name, "backend": target.backend, "options": target.options,
        "dtype": target.dtype, "compile": target.compile, "device": "cuda" if target.compile else "cpu",
        "engine_dir": str(engine_dir), "diffusers_dir": str(diffusers_dir),
        "networks": list(settings.networks), "e2e": False, "batch": settings.batch,
        "resolution": settings.resolution, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
        "repeats": settings.repeats, "warmup": settings.warmup, "e2e_repeats": settings.e2e_repeats,
        "e2e_warmup": settings.e2e_warmup, "seed": settings.seed,
        "outputs_path": str(workdir / f"{target.name}.outputs.npz"),
    }
    # every target saves its end-to-end image (image_psnr); peers start from the suite's latents, which
    # are the noise our pipeline draws for the same seed
    e2e_extra: dict[str, Any] = {"image_path": str(workdir / f"{target.name}.image.npy")}
    if target.kind == "peer":
        inputs = peer_inputs(settings, workdir)
        e2e_extra["latents_path"] = inputs["latents_path"]
        if target.runner:
            task.update(external_peer_fields(target, settings), feeds_path=inputs["feeds_path"])
    merged: dict[str, Any] = {"target": target.name, "status": "ok", "process_s": 0.0}
    phases = []
    if settings.networks and not target.e2e_only:
        phases.append(("networks", task))
    if settings.e2e:
        phases.append(("e2e", {**task, "target": f"{target.name}-e2e", "networks": [], "e2e": True,
                               "outputs_path": None, **e2e_extra}))
        if settings.cache_interval > 1 and target.kind == "engine":
            phases.append(("e2e_cached", {**task, "target": f"{target.name}-e2e-cached", "networks": [], "e2e": True,
                                          "outputs_path": None, "cache_interval": settings.cache_interval,
                                          "e2e_repeats": max(2, settings.e2e_repeats),
                                          "image_path": str(workdir / f"{target.name}.cached.image.npy"),
                                          "paired_image_path": str(workdir / f"{target.name}.paired.image.npy")}))
    for phase, phase_task in phases:
        if phase == "networks" and settings.process_repeats > 1:
            r = _networks_in_processes(phase_task, workdir, settings)
        else:
            r = _run_worker(phase_task, workdir, settings.timeout_s)
        merged["process_s"] += r.get("process_s", 0.0)
        if r.get("status") != "ok":
            merged["status"] = "failed"
            merged["reason"] = f"{phase}: {r.get('reason')}"
            merged["traceback"] = r.get("traceback")
        if phase == "networks":
            merged.update(networks=r.get("networks", {}), info=r.get("info", {}))
        else:
            merged[phase] = r.get("e2e")
            merged.setdefault("info", r.get("info", {}))
        if "peak_rss_mb" in r:
            merged[f"peak_rss_mb_{phase}"] = r["peak_rss_mb"]
    merged["peak_rss_mb"] = merged.get("peak_rss_mb_e2e", merged.get("peak_rss_mb_networks", 0.0))
    return merged


# ------------------------------------------------------------------------- peers outside the env


def peer_paths(settings: Settings) -> dict[str, Path]:
    """Cached inputs of the benchmarks/peers runners, beside the diffusers folder they come from:
    optimum's OpenVINO IR export and the single-file checkpoint stable-diffusion.cpp loads."""
    base = cache_paths(settings)[0].parent
    return {"ov_dir": base / "optimum-openvino", "single_file": base / "single-file" / f"{settings.model}.safetensors"}


def external_peer_fields(target: Target, settings: Settings) -> dict[str, Any]:
    """Task fields of a benchmarks/peers target: its interpreter and worker module, prompt, precision
    or weight type, and the cached inputs it reads."""
    from benchmarks.worker import PROMPT

    runner = peers.runner(target.runner)
    paths = peer_paths(settings)
    fields = {"worker_python": str(peers.interpreter(target.runner, settings.peer_python.get(target.runner))),
              "worker_module": runner.module, "prompt": PROMPT}
    if target.runner == "optimum":
        fields.update(precision=target.dtype, ov_dir=str(paths["ov_dir"]))
    else:
        fields.update(wtype=target.dtype, single_file=str(paths["single_file"]))
    return fields


def peer_inputs(settings: Settings, workdir: Path) -> dict[str, str]:
    """Write once per run, and return the paths of, the peers' shared inputs: `latents.npy`, the
    initial noise [batch, latent channels, res / 8, res / 8] drawn as the runtime draws a seed's
    (image i from np.random.Generator(PCG64(seed + i)), runtime/stages.py), so peers that accept
    latents start from the same noise; `feeds.npz`, every network's seeded feeds
    (benchmarks.worker.network_feeds, keys NETWORK/INPUT) for peers that cannot import runtime/."""
    from benchmarks.worker import network_batch, network_feeds
    from runtime.folder.manifest import load_manifest

    latents_path, feeds_path = workdir / "latents.npy", workdir / "feeds.npz"
    if not (latents_path.is_file() and feeds_path.is_file()):
        dims = load_manifest(cache_paths(settings)[1]).dims
        lh = settings.resolution // dims.vae_scale_factor
        latents = np.stack([np.random.Generator(np.random.PCG64(settings.seed + i)).standard_normal(
            (dims.latent_channels, lh, lh), dtype=np.float32) for i in range(settings.batch)])
        np.save(latents_path, latents)
        feeds = {}
        for network in NETWORKS:
            b = network_batch(network, settings.batch, settings.guidance_scale > 1)
            feeds.update({f"{network}/{k}": v for k, v in
                          network_feeds(network, dims, b, settings.resolution, settings.seed).items()})
        np.savez(feeds_path, **feeds)
    return {"latents_path": str(latents_path), "feeds_path": str(feeds_path)}


def prepare_peer(target: Target, settings: Settings, workdir: Path, log) -> dict[str, Any]:
    """Make a benchmarks/peers target's cached input where it is missing: optimum's OpenVINO export
    of the diffusers folder (in the optimum venv), or the single-file checkpoint (in this env,
    export.loading.save.save_single_file). {"status": "ok", "reused": bool, ...} or a failed result."""
    diffusers_dir = cache_paths(settings)[0]
    paths = peer_paths(settings)
    if target.runner == "optimum":
        if (paths["ov_dir"] / "model_index.json").is_file():
            return {"status": "ok", "reused": True}
        log(f"{target.name}: exporting the diffusers folder to OpenVINO IR with optimum into {paths['ov_dir']} (once)")
        task = {"kind": "prepare", "target": f"{target.runner}-prepare", "diffusers_dir": str(diffusers_dir),
                "ov_dir": str(paths["ov_dir"]), **{k: v for k, v in external_peer_fields(target, settings).items()
                                                   if k.startswith("worker_")}}
    elif target.runner == "sdcpp":
        if paths["single_file"].is_file():
            return {"status": "ok", "reused": True}
        log(f"{target.name}: saving the weights as a single-file checkpoint {paths['single_file']} (once)")
        task = {"kind": "single_file", "target": f"{target.runner}-prepare", "diffusers_dir": str(diffusers_dir),
                "single_file": str(paths["single_file"])}
    else:
        raise ValueError(f"{target.name}: unknown peer runner {target.runner!r}")
    result = _run_worker(task, workdir, settings.timeout_s)
    result["reused"] = False
    return result


def image_psnr(workdir: Path, results: dict[str, Any], reference: str) -> None:
    """Add to each peer's end-to-end result the PSNR (runtime.compare.psnr, dB) of its image against
    `reference`'s, where both started from the suite's latents (peer_inputs)."""
    from runtime.compare import psnr

    ref_path = workdir / f"{reference}.image.npy"
    if not ref_path.is_file():
        return
    ref = np.load(ref_path)
    for name, result in results.items():
        path = workdir / f"{name}.image.npy"
        e2e = result.get("e2e") or {}
        if name == reference or result.get("status") != "ok" or not e2e or not path.is_file():
            continue
        if name in PEERS and PEERS[name].runner == "sdcpp":
            e2e["image_psnr"] = {"reference": reference, "db": None,
                                 "reason": "stable-diffusion.cpp draws its own initial noise (no latents input)"}
            continue
        image = np.load(path)
        e2e["image_psnr"] = {"reference": reference,
                             "db": psnr(image, ref) if image.shape == ref.shape else None}


def cached_vs_uncached(workdir: Path, results: dict[str, Any]) -> None:
    """Add to each engine's `e2e_cached` its speed-up over the uncached runs paired with it in the
    same process (benchmarks/worker.py `_engine_e2e`) and the PSNR (dB) of its image against the
    uncached image of the same seed."""
    from runtime.compare import psnr

    for name, result in results.items():
        cached = result.get("e2e_cached")
        plain = (cached or {}).get("paired_uncached")
        if result.get("status") != "ok" or not cached or not plain:
            continue
        cached["speedup_vs_uncached"] = plain["median_s"] / cached["median_s"]
        a, b = workdir / f"{name}.cached.image.npy", workdir / f"{name}.paired.image.npy"
        if a.is_file() and b.is_file():
            cached["psnr_vs_uncached_db"] = psnr(np.load(a), np.load(b))


def _networks_in_processes(task: dict[str, Any], workdir: Path, settings: Settings) -> dict[str, Any]:
    """The per-network phase in `settings.process_repeats` fresh processes, merged per network:
    `median_s` is the median of the processes' medians, `min_s`/`max_s`/`times_s` span every call,
    `process_medians_s` lists each process's median. Only the first process saves outputs for parity.

    Why: PyTorch fp32 eager on the 2-vCPU development machine settles into a different speed per
    process (U-Net medians 1.52-2.02 s over five fresh processes, each steady within itself), so one
    process can flatter or penalize a peer by a third."""
    runs = []
    for i in range(settings.process_repeats):
        r = _run_worker(task if i == 0 else {**task, "outputs_path": None}, workdir, settings.timeout_s)
        if r.get("status") != "ok":
            return r
        runs.append(r)
    merged = {**runs[0], "process_s": sum(r.get("process_s", 0.0) for r in runs),
              "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in runs), "networks": {}}
    for name, first in runs[0].get("networks", {}).items():
        per = [r["networks"][name] for r in runs]
        times = [t for stats in per for t in stats["times_s"]]
        node = {**first, "median_s": statistics.median(p["median_s"] for p in per), "min_s": min(times),
                "max_s": max(times), "times_s": times, "process_medians_s": [p["median_s"] for p in per],
                "processes": len(per)}
        if all("cpu_median_s" in p for p in per):
            node["cpu_median_s"] = statistics.median(p["cpu_median_s"] for p in per)
        merged["networks"][name] = node
    return merged


def parity(workdir: Path, results: dict[str, Any], reference: str) -> None:
    """Add, per target and network, max|out - ref| / max|ref| (runtime.compare.rel_err) against
    `reference`'s outputs."""
    from runtime.compare import rel_err

    ref_path = workdir / f"{reference}.outputs.npz"
    if not ref_path.is_file():
        return
    ref = dict(np.load(ref_path))
    for name, result in results.items():
        path = workdir / f"{name}.outputs.npz"
        if result.get("status") != "ok" or not path.is_file():
            continue
        outs = dict(np.load(path))
        for network, stats in result.get("networks", {}).items():
            errs = {}
            for key, value in outs.items():
                if key.split("/")[0] == network and key in ref and ref[key].shape == value.shape:
                    errs[key.split("/")[1]] = rel_err(value, ref[key])
            if errs:
                stats["parity"] = {"reference": reference, "max_rel_err": max(errs.values()), "per_output": errs}


def scheduler_overhead(settings: Settings, sampler: str) -> dict[str, Any]:
    try:
        from benchmarks.scheduler_overhead import measure_scheduler_overhead
    except ImportError as e:
        return {"status": "skipped", "reason": f"benchmarks.scheduler_overhead is not available: {e}"}
    from runtime.folder.manifest import load_manifest

    manifest = load_manifest(cache_paths(settings)[1])
    lh = settings.resolution // manifest.dims.vae_scale_factor
    shape = (settings.batch, manifest.dims.latent_channels, lh, lh)  # the latents the sampler steps
    result = measure_scheduler_overhead(sampler, settings.steps, shape=shape, repeats=max(settings.repeats, 5),
                                        config=manifest.scheduler)
    return {"status": "ok", "sampler": sampler, **result, "shape": list(shape)}


def summarize_run(report: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios: the default engine against the PyTorch peers."""
    results = report["results"]
    default = report.get("default_engine")

    def median(target: str | None, what: str) -> float | None:
        r = results.get(target or "", {})
        if r.get("status") != "ok":
            return None
        node = r.get("e2e") if what == "e2e" else r.get("networks", {}).get(what)
        return node["median_s"] if node else None

    summary: dict[str, Any] = {"default_engine": default}
    for what in ("unet", "e2e"):
        ours = median(default, what)
        summary[f"{what}_s"] = ours
        for peer in ("diffusers-fp32", "diffusers-bf16", "optimum"):
            theirs = median(peer, what)
            summary[f"{what}_speedup_vs_{peer}"] = theirs / ours if ours and theirs else None
    best = {}
    for what in ("unet", "e2e"):
        timed = {n: median(n, what) for n in results}
        timed = {n: t for n, t in timed.items() if t}
        best[what] = min(timed, key=timed.get) if timed else None
    summary["fastest"] = best
    unet = results.get(default or "", {}).get("networks", {}).get("unet", {})
    summary["default_engine_unet_parity"] = unet.get("parity", {}).get("max_rel_err")
    int8 = "openvino-int8"  # opt-in at build time, so never the default engine; its own headline
    if median(int8, "unet"):
        summary[int8] = {f"{what}_speedup_vs_{peer}": (median(peer, what) / median(int8, what)
                                                       if median(peer, what) and median(int8, what) else None)
                         for what in ("unet", "e2e") for peer in ("diffusers-fp32", "diffusers-bf16")}
        summary[int8]["unet_parity"] = results[int8]["networks"]["unet"].get("parity", {}).get("max_rel_err")
    cached = results.get(default or "", {}).get("e2e_cached")
    if cached:  # the default engine with step caching, against itself and the peers
        summary["cached"] = {"cache_interval": report["settings"].get("cache_interval"), "e2e_s": cached["median_s"],
                             "speedup_vs_uncached": cached.get("speedup_vs_uncached"),
                             "psnr_vs_uncached_db": cached.get("psnr_vs_uncached_db"),
                             **{f"e2e_speedup_vs_{peer}": (median(peer, "e2e") / cached["median_s"]
                                                           if median(peer, "e2e") else None)
                                for peer in ("diffusers-fp32", "diffusers-bf16", "optimum", "optimum-f32", "sdcpp")}}
    so = report.get("scheduler_overhead", {})
    summary["scheduler_overhead_ms_per_step"] = so.get("per_step_ms") if so.get("status") == "ok" else None
    return summary


# ----------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None]:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="U-Net only (SD 1.5 at 256x256 unless --model/--resolution say otherwise), 1 timed call "
                        "after 1 warm-up, no end to end, no torch engine (a few minutes once the cache is built)")
    p.add_argument("--model", choices=MODELS, default="sd15")
    p.add_argument("--resolution", type=int, default=256, help="image height and width in pixels")
    p.add_argument("--batch", type=int, default=1, help="images per call (the U-Net sees 2x under guidance)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="also run each engine end to end with step caching (DeepCache) at interval N; reports its "
                        "speed-up and the PSNR of the cached image against the uncached one (default 1: off)")
    p.add_argument("--engines", nargs="*", choices=tuple(ENGINES), default=None, help="default: all of them")
    p.add_argument("--peers", nargs="*", choices=tuple(PEERS), default=None, help="default: all of them")
    p.add_argument("--networks", nargs="*", choices=NETWORKS, default=None, help="default: all four")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end txt2img measurement")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per network (default 3, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before them (default 1)")
    p.add_argument("--process-repeats", type=int, default=1,
                   help="fresh processes per target for the per-network calls; the report takes the median of "
                        "their medians (default 1)")
    p.add_argument("--e2e-repeats", type=int, default=1)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="diffusers + engine folders, reused between runs")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per target process")
    for name, runner in peers.RUNNERS.items():
        p.add_argument(f"--{name}-python", metavar="PATH", default=None,
                       help=f"Python of the {name} peer's venv (default {runner.venv}/bin/python, made by "
                            f"`bash {runner.setup}`; its targets are skipped when it is absent)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result path (a .md table is written beside it); default benchmarks/results/<model>-<res>-<date>.json")
    a = p.parse_args(argv)
    s = Settings(model=a.model, resolution=a.resolution, batch=a.batch, steps=a.steps, cache_dir=a.cache_dir,
                 timeout_s=a.timeout, e2e_repeats=a.e2e_repeats, quick=a.quick, process_repeats=a.process_repeats,
                 cache_interval=a.cache_interval)
    s.peer_python = {name: path for name in peers.RUNNERS
                     if (path := getattr(a, f"{name}_python")) is not None}
    if a.process_repeats < 1:
        p.error(f"--process-repeats must be >= 1, got {a.process_repeats}")
    if a.quick:
        # the headline only: one U-Net call per engine and PyTorch peer (our torch engine runs the
        # same PyTorch fp32 eager as diffusers-fp32, so it is left to the full run)
        s.networks, s.e2e, s.repeats, s.warmup = ("unet",), False, 1, 1
        s.engines = tuple(e for e in ENGINES if e != "torch")
    if a.networks is not None:
        s.networks = tuple(a.networks)
    if a.no_e2e:
        s.e2e = False
    if a.repeats is not None:
        s.repeats = a.repeats
    if a.warmup is not None:
        s.warmup = a.warmup
    if a.engines is not None:
        s.engines = tuple(a.engines)
    if a.peers is not None:
        s.peers = tuple(a.peers)
    if s.repeats < 1 or s.warmup < 0 or s.batch < 1 or s.steps < 1 or s.cache_interval < 1:
        p.error("--repeats, --batch, --steps and --cache-interval must be >= 1, --warmup >= 0")
    return s, a.out


def run(settings: Settings, out: Path | None = None, command: str | None = None, log=None) -> dict[str, Any]:
    """Run the suite; write JSON to `out` and markdown beside it; return the report."""
    log = log or (lambda msg: print(f"[benchmarks] {msg}", file=sys.stderr, flush=True))
    started = datetime.now(timezone.utc)
    if out is None:
        out = RESULTS_DIR / f"{settings.model}-{settings.resolution}-{started:%Y%m%d-%H%M}.json"
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "command": command,
        "created": started.isoformat(timespec="seconds"),
        "machine": mach.machine(),
        "versions": mach.versions(),
        "git": mach.git_commit(ROOT),
        "settings": asdict(settings),
        "load_average_start": mach.load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="sd-bench-") as tmp:
        workdir = Path(tmp)
        report["cache"] = prepare_cache(settings, workdir, log)
        default, why = measured_default(cache_paths(settings)[1], workdir, settings)
        report["default_engine"], report["default_engine_reason"] = default, why
        log(f"default engine: {default} ({why})")
        results: dict[str, Any] = {}
        for name in (*settings.engines, *settings.peers):
            target = ENGINES.get(name) or PEERS[name]
            ok, why = target_availability(target, settings)
            if not ok:
                log(f"{name}: skipped ({why})")
                results[name] = {"target": name, "status": "skipped", "reason": why}
                continue
            prepared = prepare_peer(target, settings, workdir, log) if target.runner else None
            if prepared is not None and prepared["status"] != "ok":
                log(f"{name}: failed preparing its input ({prepared.get('reason')})")
                results[name] = {"target": name, "status": "failed", "reason": f"prepare: {prepared.get('reason')}",
                                 "traceback": prepared.get("traceback"), "prepare": prepared,
                                 "kind": target.kind, "label": target.label}
                continue
            log(f"{name}: running")
            results[name] = run_target(target, settings, workdir)
            if prepared is not None:
                results[name]["prepare"] = prepared
            results[name].update(kind=target.kind, label=target.label)
            r = results[name]
            log(f"{name}: {r['status']}" + (f" ({r.get('reason')})" if r["status"] != "ok" else
                                           f" in {r.get('process_s', 0):.0f} s, peak RSS {r.get('peak_rss_mb', 0):.0f} MiB"))
        parity(workdir, results, REFERENCE if REFERENCE in results else next(iter(results), ""))
        image_psnr(workdir, results, REFERENCE)
        cached_vs_uncached(workdir, results)
    report["results"] = results
    sampler = _default_sampler(settings)
    report["scheduler_overhead"] = scheduler_overhead(settings, sampler)
    report["load_average_end"] = mach.load_average()
    report["summary"] = summarize_run(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(render_markdown(report))
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return report


def _default_sampler(settings: Settings) -> str:
    from runtime.folder.manifest import load_manifest
    from runtime.pipeline import default_sampler

    _, engine_dir = cache_paths(settings)
    return default_sampler(load_manifest(engine_dir).scheduler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings, out = parse_args(argv)
    report = run(settings, out, command=" ".join(["python -m benchmarks", *argv]))
    print(render_markdown(report))
    failed = [n for n, r in report["results"].items() if r["status"] == "failed"]
    return 1 if failed else 0
