"""Build TensorRT plans (TensorRT 10 or 11) from an engine folder's ONNX graphs (`build-engine --tensorrt`).

Per network: check the graph offline against TensorRT's documented operator support
(`export/trt_compat.py`), parse it with `trt.OnnxParser.parse_from_file` (which reads external
weight files beside the graph), add one optimization profile derived from the manifest's shape
range (`runtime.engines.trt_plans.network_profile`), set the builder optimization level, the
workspace limit and a persistent timing cache (`ENGINE_DIR/tensorrt/timing.cache`), and
`build_serialized_network`.

Precision (weak typing is deprecated since TensorRT 10.12 and removed in 11.0, where every network
is strongly typed and `BuilderFlag.FP16/BF16` no longer exist; NVIDIA/TensorRT 11.1
python/src/infer/pyCore.cpp and .agents/skills/trt-strong-typing-migration):
  * plans are built at their graph's own precision from a strongly typed network
    (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`), every type as the ONNX graph has it: fp16
    plans from fp16 graphs, whose normalizations the export keeps in float32 (export/fp16.py), as
    NVIDIA's demo/Diffusion builds every engine `--strongly-typed`;
  * an fp16 folder's fp32 graphs (the VAE kept fp32 by `force_upcast`) give fp32 plans;
  * fp16 plans over an fp32 folder are refused (no weakly typed fp16 over fp32 graphs): export
    fp16 graphs (build-engine --precision fp16);
  * "bf16" over fp32 graphs (bf16 folders hold fp32 graphs) is the one weakly typed mode left,
    `BuilderFlag.BF16`, on TensorRT 10 only; TensorRT 11 refuses it before parsing.
Before parsing, each graph is checked: its I/O types against the manifest's precision, its
operators, and, for fp16 graphs, that the normalizations compute in float32 (export/trt_compat.py).

Plans are cached as `tensorrt/<network>.<hash>.plan` with the key (`.json`) beside; the key holds
the graph's sha256, the TensorRT version, the GPU's compute capability, precision, typing mode,
optimization level and profile. A plan whose key differs from the wanted one is rebuilt (and the
stale one removed); `runtime/engines/tensorrt.py` refuses to load a plan whose TensorRT version or
compute capability differ from the running ones.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx

from export.hashing import files_sha256
from export.trt_compat import check_graph, is_fp16_graph
from runtime.engines.tensorrt import INSTALL_HINT, TensorRTUnavailable, cuda_environment, import_tensorrt, trt_logger
from runtime.engines.trt_plans import (
    DEFAULT_PROMPT_CHUNKS,
    SUBDIR,
    key_hash,
    network_profile,
    plan_key,
    plan_paths,
    profile_to_json,
    stale_reasons,
)
from runtime.folder.manifest import Manifest
from runtime.folder.networks import PRECISIONS, float_dtype

__all__ = ["TensorRTBuildError", "TensorRTUnavailable", "build_mode", "build_tensorrt_engines", "INSTALL_HINT"]

TIMING_CACHE = f"{SUBDIR}/timing.cache"
ENTRY_FORMAT = 1


class TensorRTBuildError(RuntimeError):
    """Parsing or building a plan failed; the message names the network and TensorRT's errors."""


def build_mode(graph_precision: str, precision: str,
               folder_precision: str | None = None) -> tuple[str, bool, str | None]:
    """(plan precision, strongly_typed, builder flag name or None) for plans of `precision` over a
    graph exported at `graph_precision`, in a folder of `folder_precision` (the manifest's; bf16
    folders hold fp32 graphs). See the module docstring for the rules."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    graph = "fp16" if float_dtype(graph_precision) == "float16" else "fp32"
    if graph == precision:
        return precision, True, None
    if graph == "fp16":
        raise ValueError(f"the graphs are fp16, so a {precision} TensorRT plan cannot be built from them; "
                         f"export {precision} graphs (build-engine --precision {precision}) or build fp16 plans")
    if precision == "fp16":
        if folder_precision == "fp16":  # a network the fp16 export keeps in fp32 (the force_upcast VAE)
            return "fp32", True, None
        raise ValueError("fp16 TensorRT plans are built from fp16 graphs, strongly typed (weak typing over fp32 "
                         "graphs is deprecated since TensorRT 10.12 and gone in 11); this folder's graphs are fp32: "
                         "build the folder with --precision fp16 --tensorrt")
    return precision, False, precision.upper()


def check_before_parsing(trt: Any, graph: Path, name: str, graph_precision: str, flag: str | None,
                         tensorrt_version: str) -> None:
    """Refuse, before TensorRT parses anything, a graph whose I/O types are not the manifest's
    precision, a weakly typed mode this TensorRT no longer has, and what export/trt_compat.py
    finds (unsupported operators; fp16 normalizations)."""
    model = onnx.load(str(graph), load_external_data=False)
    fp16 = is_fp16_graph(model)
    if fp16 != (float_dtype(graph_precision) == "float16"):
        raise TensorRTBuildError(f"{name}: the manifest says the graph is {graph_precision}, but {graph.name} has "
                                 f"{'float16' if fp16 else 'float32'} inputs/outputs; rebuild the engine folder")
    if flag is not None and getattr(trt.BuilderFlag, flag, None) is None:
        raise TensorRTBuildError(f"TensorRT {tensorrt_version} has no BuilderFlag.{flag}: weakly typed "
                                 f"{flag.lower()} plans were removed in TensorRT 11; build fp16 plans from an fp16 "
                                 "folder, fp32 plans, or use TensorRT 10")
    errors = [p for p in check_graph(model) if p.severity == "error"]
    if errors:
        raise TensorRTBuildError(f"{name}: {graph.name} has what a TensorRT build cannot take:\n  " +
                                 "\n  ".join(str(p) for p in errors))


def build_tensorrt_engines(engine_dir: str | os.PathLike, manifest: Manifest, *, precision: str = "fp16",
                           optimization_level: int = 3, workspace_gib: float | None = None, guidance: bool = True,
                           max_prompt_chunks: int = DEFAULT_PROMPT_CHUNKS, networks: Iterable[str] | None = None,
                           device_id: int = 0, progress: Callable[[str], Any] = print) -> dict[str, Any]:
    """Build (or reuse) a TensorRT plan for every network of the engine folder; return the
    manifest entry for `manifest.backends["tensorrt"]`.

    `workspace_gib` caps the builder's scratch memory (None: TensorRT's default, the device's
    memory). `optimization_level` is TensorRT's builder optimization level 0..5 (3 is its default).
    Raises `TensorRTUnavailable` where tensorrt, cuda-python or a CUDA device is missing."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"optimization_level must be in 0..5; got {optimization_level}")
    names = list(networks) if networks is not None else list(manifest.networks)
    modes = _modes(manifest, names, precision)  # refuse a precision the graphs cannot give, before any GPU work
    env = cuda_environment(device_id)  # raises TensorRTUnavailable naming what is missing
    trt = import_tensorrt()
    engine_dir = Path(engine_dir)
    (engine_dir / SUBDIR).mkdir(exist_ok=True)
    timing_path = engine_dir / TIMING_CACHE
    timing_bytes = timing_path.read_bytes() if timing_path.is_file() else b""
    entry: dict[str, Any] = {
        "format": ENTRY_FORMAT, "tensorrt_version": env.tensorrt_version, "compute_capability": env.compute_capability,
        "device": env.device_name, "precision": precision, "optimization_level": optimization_level,
        "workspace_gib": workspace_gib, "max_prompt_chunks": max_prompt_chunks, "guidance": guidance,
        "timing_cache": TIMING_CACHE, "networks": {},
    }
    for name in names:
        net = manifest.networks[name]
        graph_precision = net.get("precision", manifest.precision)
        plan_precision, strongly_typed, flag = modes[name]
        graph = engine_dir / net["file"]
        files = [graph] + ([engine_dir / net["external_data"]] if net.get("external_data") else [])
        profile = network_profile(name, manifest.dims, manifest.shapes, graph_precision,
                                  guidance=guidance, max_prompt_chunks=max_prompt_chunks)
        key = plan_key(name, onnx_sha256=files_sha256(files), tensorrt_version=env.tensorrt_version,
                       compute_capability=env.compute_capability, precision=plan_precision, profile=profile,
                       strongly_typed=strongly_typed, optimization_level=optimization_level)
        plan_rel, key_rel = plan_paths(name, key)
        stored = _read_key(engine_dir / key_rel) if (engine_dir / plan_rel).is_file() else None
        reasons = stale_reasons(stored, key)
        if not reasons:
            progress(f"tensorrt: {name}: reusing {plan_rel}")
        else:
            progress(f"tensorrt: {name}: building {plan_precision} plan ({'; '.join(reasons)})")
            check_before_parsing(trt, graph, name, graph_precision, flag, env.tensorrt_version)
            start = time.perf_counter()
            timing_bytes = _build_plan(trt, graph, name, profile, strongly_typed, flag, optimization_level,
                                       workspace_gib, timing_bytes, engine_dir / plan_rel)
            _atomic_write(engine_dir / key_rel, (json.dumps(key, indent=2, sort_keys=True) + "\n").encode())
            _atomic_write(timing_path, timing_bytes)
            progress(f"tensorrt: {name}: built {plan_rel} in {time.perf_counter() - start:.1f} s")
        _remove_stale(engine_dir, name, keep=key_hash(key))
        entry["networks"][name] = {"plan": plan_rel, "key": key_rel, "key_hash": key_hash(key),
                                   "precision": plan_precision, "strongly_typed": strongly_typed,
                                   "profile": profile_to_json(profile)}
    return entry


def _modes(manifest: Manifest, names: list[str], precision: str) -> dict[str, tuple[str, bool, str | None]]:
    """`build_mode` of every network asked for (ValueError for an unknown network or precision)."""
    modes = {}
    for name in names:
        if name not in manifest.networks:
            raise ValueError(f"network {name!r} is not in this engine folder (it has {', '.join(manifest.networks)})")
        graph_precision = manifest.networks[name].get("precision", manifest.precision)
        modes[name] = build_mode(graph_precision, precision, manifest.precision)
    return modes


def _build_plan(trt: Any, graph: Path, name: str, profile: Mapping[str, Any], strongly_typed: bool,
                flag: str | None, optimization_level: int, workspace_gib: float | None, timing_bytes: bytes,
                dest: Path) -> bytes:
    """Parse `graph`, build and write its plan to `dest`; return the updated timing cache."""
    logger = trt_logger()  # TensorRT keeps the first logger it sees: one for the whole process
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        raise TensorRTBuildError(f"{name}: TensorRT's ONNX parser rejected {graph}:\n  " +
                                 "\n  ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if flag is not None:  # present: check_before_parsing refused its absence
        config.set_flag(getattr(trt.BuilderFlag, flag))
    opt_profile = builder.create_optimization_profile()
    network_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = sorted(set(network_inputs) - set(profile))
    if missing:
        raise TensorRTBuildError(f"{name}: graph inputs {missing} are not in the network contract "
                                 f"(expected {sorted(profile)}); re-export the graph")
    for input_name in network_inputs:
        r = profile[input_name]
        opt_profile.set_shape(input_name, r.min, r.opt, r.max)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_bytes)
    if timing_bytes and (cache is None or not config.set_timing_cache(cache, False)):
        # a cache from another TensorRT version or GPU: start a fresh one rather than mix them
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    elif not timing_bytes:
        config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"{name}: TensorRT failed to build a plan from {graph} (see the TensorRT log above)")
    _atomic_write(dest, memoryview(serialized))
    return bytes(memoryview(config.get_timing_cache().serialize()))


def _parser_error(err: Any) -> str:
    parts = [err.desc()]
    for label, getter in (("node", "node_name"), ("operator", "node_operator")):
        value = getattr(err, getter, None)
        if callable(value) and value():
            parts.append(f"{label} {value()!r}")
    return "; ".join(parts)


def _read_key(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _remove_stale(engine_dir: Path, network: str, keep: str) -> None:
    """Delete this network's plans and keys of other hashes (plans are large)."""
    for path in (engine_dir / SUBDIR).glob(f"{network}.*"):
        if path.suffix in (".plan", ".json") and path.stem.split(".")[-1] != keep:
            path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write under a temporary name, make it durable, then rename: a crash mid-write leaves the old
    file (or none) under `path`, never a partial plan the next load would deserialize."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
