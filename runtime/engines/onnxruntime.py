"""ONNX Runtime engine over one ONNX graph of an engine folder.

Execution providers: by default CUDA when onnxruntime-gpu has it, else CPU. Ask for others with
`providers=[...]`: names ("cpu", "cuda", "tensorrt" or ORT's full "...ExecutionProvider" names) or
(name, options) pairs passed through to ORT (see runtime/engines/ort_tensorrt.py for the TensorRT
EP's options); CPU is always appended as the fallback. The session's own input/output metadata is
checked against runtime/networks.py at load, so a graph that does not follow the contract fails
there rather than mid-denoising. On CUDA, outputs are bound with IO binding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines import EngineLoadError
from runtime.engines.base import Engine
from runtime.manifest import Manifest
from runtime.networks import TensorSpec, network_io

BACKEND = "onnxruntime"
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "dml": "DmlExecutionProvider",
                    "coreml": "CoreMLExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bfloat16)": "bfloat16"}


def is_available() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return False, f"onnxruntime is not installed ({e}); pip install onnxruntime (or onnxruntime-gpu)"
    return True, f"onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())}"


def resolve_providers(providers: Sequence[str | tuple[str, dict[str, Any]]] | None) -> list[tuple[str, dict[str, Any]]]:
    """ORT (name, options) pairs for a request; None = CUDA if installed, then CPU."""
    import onnxruntime as ort

    installed = ort.get_available_providers()
    if providers is None:
        providers = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in installed else []
    resolved = []
    for p in providers:
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        name = PROVIDER_ALIASES.get(name.lower(), name)
        if name not in installed:
            raise EngineLoadError(f"ONNX Runtime execution provider {name!r} is not available in this onnxruntime "
                                  f"build; installed: {', '.join(installed)}")
        resolved.append((name, opts))
    if all(name != "CPUExecutionProvider" for name, _ in resolved):
        resolved.append(("CPUExecutionProvider", {}))
    return resolved


class OrtEngine(Engine):
    backend = BACKEND

    def __init__(self, path: str | os.PathLike, name: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], *, providers: Sequence[Any] | None = None,
                 threads: int | None = None, optimization_level: str = "all", cache_dir: str | os.PathLike | None = None,
                 device_id: int = 0):
        """`cache_dir`: keep the optimized graph there and load it next time instead of
        re-optimizing (keyed by the graph file's size and mtime, the level, providers and ORT
        version). `device_id`: the CUDA device for IO binding."""
        super().__init__(name, inputs, outputs)
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise EngineLoadError(f"{name}: ONNX file {self.path} is missing")
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization_level must be one of {', '.join(OPTIMIZATION_LEVELS)}; "
                             f"got {optimization_level!r}")
        self.providers = resolve_providers(providers)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                 "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                 "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization_level]
        model_path = self.path
        if cache_dir is not None:
            cached = self._cache_file(Path(cache_dir), optimization_level, ort.__version__)
            if cached.is_file():
                model_path, level = cached, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                cached.parent.mkdir(parents=True, exist_ok=True)
                options.optimized_model_filepath = str(cached)
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 cached.name + ".data")
        options.graph_optimization_level = level
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=[p for p, _ in self.providers],
                                                provider_options=[o for _, o in self.providers])
        except Exception as e:  # ORT raises several pybind types (InvalidProtobuf, Fail, NoSuchFile, ...)
            raise EngineLoadError(f"{name}: cannot load ONNX file {model_path}: it is corrupt, truncated or "
                                  f"missing its external data ({type(e).__name__}: {e})") from e
        self._check_metadata()
        used = self.session.get_providers()
        self.io_binding = "CUDAExecutionProvider" in used
        self.device_id = device_id
        self.active_provider = used[0]

    def _cache_file(self, cache_dir: Path, level: str, version: str) -> Path:
        st = self.path.stat()
        key = f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{level}:{version}:{self.providers}"
        return cache_dir / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"

    def _check_metadata(self) -> None:
        problems = []
        for kind, declared, actual in (("input", self.inputs, self.session.get_inputs()),
                                       ("output", self.outputs, self.session.get_outputs())):
            got = {a.name: a for a in actual}
            names = [t.name for t in declared]
            if sorted(got) != sorted(names):
                problems.append(f"{kind}s are {sorted(got)}, expected {sorted(names)}")
                continue
            for spec in declared:
                a = got[spec.name]
                dtype = _ORT_TYPES.get(a.type, a.type)
                if dtype != spec.dtype:
                    problems.append(f"{kind} {spec.name!r} has type {dtype}, expected {spec.dtype}")
                if len(a.shape) != len(spec.shape):
                    problems.append(f"{kind} {spec.name!r} has shape {a.shape}, expected {list(spec.shape)}")
                    continue
                for i, (have, want) in enumerate(zip(a.shape, spec.shape)):
                    if isinstance(have, int) and have != want:
                        fixed = "is fixed to" if isinstance(want, str) else "is"
                        problems.append(f"{kind} {spec.name!r} axis {i} ({want}) {fixed} {have} in the graph")
        if problems:
            raise EngineLoadError(f"{self.name}: {self.path} does not match the network contract "
                                  f"(runtime/networks.py): {'; '.join(problems)}")

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in self.outputs]
        if not self.io_binding:
            return dict(zip(names, self.session.run(names, dict(feeds))))
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))


# keyword options open_engine takes (checked by runtime.engines.open_engines before opening anything)
OPTIONS = ("providers", "threads", "optimization_level", "cache_dir", "device_id")


def open_engine(engine_dir: str | os.PathLike, manifest: Manifest, network: str, **options: Any) -> OrtEngine:
    """The ONNX Runtime engine of `network` in an engine folder. Options: providers, threads,
    optimization_level ("disable" | "basic" | "extended" | "all"), cache_dir, device_id."""
    engine_dir = Path(engine_dir)
    entry = manifest.networks.get(network)
    if entry is None:
        raise EngineLoadError(f"{engine_dir}: the manifest has no network {network!r} "
                              f"(it has {', '.join(manifest.networks) or 'none'})")
    inputs, outputs = network_io(network, manifest.dims, entry.get("precision", manifest.precision))
    return OrtEngine(engine_dir / entry["file"], network, inputs, outputs, **options)
