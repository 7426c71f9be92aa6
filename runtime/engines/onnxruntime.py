"""ONNX Runtime engine over one ONNX graph of an engine folder.

Execution providers: by default CUDA when onnxruntime-gpu has it, else CPU. Ask for others with
`providers=[...]`: names ("cpu", "cuda", "tensorrt" or ORT's full "...ExecutionProvider" names) or
(name, options) pairs passed through to ORT (see runtime/engines/ort_tensorrt.py for the TensorRT
EP's options); CPU is always appended as the fallback. The session's own input/output metadata is
checked against runtime/folder/networks.py at load, so a graph that does not follow the contract fails
there rather than mid-denoising.

GPU providers (onnxruntime-gpu; checked against the 1.22, 1.23 and 1.31.1 wheels' Python API):
  * The provider asked for first must be the one the session runs on. ORT skips a provider whose
    library does not load (the TensorRT EP without `libnvinfer.so.10`) and carries on with the
    next; that is refused here (`ProviderFallbackError`) rather than recorded as used.
  * On the CUDA and TensorRT EPs inputs and outputs are bound to device `OrtValue`s that are kept
    across calls (a denoising loop's steps) and refilled in place (`OrtValue.update_inplace`);
    they are reallocated only when the shapes change. Calls are then serialized (the buffers are
    the engine's).
  * `cuda_graph=True` (or the providers' own `enable_cuda_graph` / `trt_cuda_graph_enable`): ORT
    captures the run into a CUDA graph, which needs fixed input and output addresses (the bound
    device buffers above) and fixed shapes: a second shape is refused (`EngineInputError`), and so
    is a CUDA graph on any provider but CUDA or TensorRT first. The TensorRT EP's graph also needs
    every node on TensorRT (ORT refuses the session otherwise).
  * `cache_dir` is skipped with the TensorRT EP: ORT cannot save a graph holding compiled TensorRT
    nodes ("Unable to serialize model as it contains compiled nodes"); the EP caches its own
    engines (runtime/engines/ort_tensorrt.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines.base import Engine, EngineInfo
from runtime.errors import BackendError, EngineInputError, EngineLoadError
from runtime.folder.paths import inside
from runtime.folder.manifest import Manifest
from runtime.folder.networks import TensorSpec, float_precision, network_io

BACKEND = "onnxruntime"
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "dml": "DmlExecutionProvider",
                    "coreml": "CoreMLExecutionProvider", "openvino": "OpenVINOExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bfloat16)": "bfloat16"}
CUDA_EP, TENSORRT_EP = "CUDAExecutionProvider", "TensorrtExecutionProvider"
DEVICE_PROVIDERS = (CUDA_EP, TENSORRT_EP)  # run with inputs and outputs bound to device buffers
# each GPU provider's own option that turns its CUDA graph on (ORT's CUDA and TensorRT EP options)
CUDA_GRAPH_OPTION = {CUDA_EP: ("enable_cuda_graph", "1"), TENSORRT_EP: ("trt_cuda_graph_enable", True)}
# On the CPU provider every run hands the memory arena's free chunks back at its end (ORT's run option
# "memory.enable_memory_arena_shrinkage"), so a session does not keep its largest run's activations
# while the next network runs. Measured (SD 1.5, 256 px, 20 steps, Xeon): end-to-end peak RSS
# 4927 -> 4423 MiB at the same speed (32.7 / 32.0 s).
ARENA_SHRINKAGE = ("memory.enable_memory_arena_shrinkage", "cpu:0")
log = logging.getLogger(__name__)


class ProviderFallbackError(BackendError):
    """ONNX Runtime's session does not run on the execution provider that was asked for first."""


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


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def with_cuda_graph(providers: list[tuple[str, dict[str, Any]]], cuda_graph: bool) -> list[tuple[str, dict[str, Any]]]:
    """`providers` with the first one's CUDA graph option set when `cuda_graph`; refuses a CUDA graph
    that no device-bound first provider could capture."""
    first = providers[0][0]
    asked = cuda_graph or any(_truthy(opts.get(CUDA_GRAPH_OPTION[name][0], False))
                              for name, opts in providers if name in CUDA_GRAPH_OPTION)
    if not asked:
        return providers
    if first not in CUDA_GRAPH_OPTION:
        raise BackendError(f"a CUDA graph needs the CUDA or TensorRT execution provider first, with inputs and "
                           f"outputs bound to fixed device buffers; the first provider here is {first}, which "
                           "runs from host memory. Drop cuda_graph or put CUDAExecutionProvider / "
                           "TensorrtExecutionProvider first")
    late = [name for name, opts in providers[1:] if name in CUDA_GRAPH_OPTION
            and _truthy(opts.get(CUDA_GRAPH_OPTION[name][0], False))]
    if late:
        raise BackendError(f"a CUDA graph is captured by the first provider ({first}) only; {', '.join(late)} "
                           "asks for one too")
    key, value = CUDA_GRAPH_OPTION[first]
    return [(first, {**providers[0][1], key: value})] + providers[1:]


class _DeviceIO:
    """Inputs and outputs bound to device OrtValues that stay put across calls (as a CUDA graph needs
    and a denoising loop profits from): refilled in place while the shapes repeat, reallocated when
    they change. Outputs are allocated by ORT on the first call at a shape, then kept and bound."""

    def __init__(self, ort: Any, session: Any, device_id: int, cuda_graph: bool, network: str):
        self.ort, self.session, self.device_id, self.cuda_graph, self.network = ort, session, device_id, cuda_graph, network
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.inputs: dict[str, Any] = {}
        self.outputs_bound = False
        self.binding: Any = None

    def run(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        if shapes != self.shapes:
            if self.cuda_graph and self.shapes is not None:
                raise EngineInputError(
                    f"{self.network} (onnxruntime): this engine runs a CUDA graph captured at input shapes "
                    f"{self.shapes}; a CUDA graph replays one fixed shape, so {shapes} is refused. Open another engine "
                    "for this shape, or open this one with cuda_graph=False")
            self._allocate(feeds, names)
        else:
            for name, array in feeds.items():
                self.inputs[name].update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(self.binding)
        if not self.outputs_bound:  # keep ORT's output buffers and write into them from now on
            for name, value in zip(names, self.binding.get_outputs()):
                self.binding.bind_ortvalue_output(name, value)
            self.outputs_bound = True
        return dict(zip(names, self.binding.copy_outputs_to_cpu()))

    def _allocate(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> None:
        value = self.ort.OrtValue
        self.inputs = {k: value.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", self.device_id)
                       for k, v in feeds.items()}
        self.binding = self.session.io_binding()
        for name, v in self.inputs.items():
            self.binding.bind_ortvalue_input(name, v)
        for name in names:
            self.binding.bind_output(name, "cuda", self.device_id)
        self.shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        self.outputs_bound = False


class OrtEngine(Engine):
    """One ONNX graph in an ONNX Runtime InferenceSession. On the CPU (and other host-memory
    providers) `InferenceSession.run` is thread-safe, so calls from several threads run
    concurrently; on the CUDA and TensorRT EPs the engine's device buffers are reused across calls,
    which are then serialized (`parallel` is False for those engines)."""

    backend = BACKEND
    parallel = True

    def __init__(self, path: str | os.PathLike, name: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], *, providers: Sequence[Any] | None = None,
                 threads: int | None = None, optimization_level: str = "all", cache_dir: str | os.PathLike | None = None,
                 device_id: int = 0, cuda_graph: bool = False):
        """`cache_dir`: keep the optimized graph there and load it next time instead of
        re-optimizing (keyed by the graph file's size and mtime, the level, providers and ORT
        version; skipped with the TensorRT EP). `device_id`: the CUDA device of the device buffers.
        `cuda_graph`: capture the run in a CUDA graph (CUDA or TensorRT EP first; one fixed shape)."""
        import onnxruntime as ort

        self.providers = with_cuda_graph(resolve_providers(providers), cuda_graph)
        first, first_options = self.providers[0]
        self.cuda_graph = first in CUDA_GRAPH_OPTION and _truthy(first_options.get(CUDA_GRAPH_OPTION[first][0], False))
        self.parallel = self.providers[0][0] not in DEVICE_PROVIDERS  # device buffers are the engine's
        super().__init__(name, inputs, outputs)
        cache_dir = self._tensorrt_preflight(ort, cache_dir)
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineLoadError(f"{name}: ONNX file {self.path} is missing")
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise BackendError(f"optimization_level must be one of {', '.join(OPTIMIZATION_LEVELS)}; "
                             f"got {optimization_level!r}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                 "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                 "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization_level]
        model_path, level, pending = self._use_cache(ort, options, cache_dir, optimization_level, level)
        options.graph_optimization_level = level
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=[p for p, _ in self.providers],
                                                provider_options=[o for _, o in self.providers])
            _publish_cache(pending)
        except Exception as e:  # ORT raises several pybind types (InvalidProtobuf, Fail, NoSuchFile, ...)
            _discard_cache(pending)
            if self.cuda_graph and any(k in str(e).lower() for k in ("graph capture", "cuda graph")):
                raise BackendError(f"{name}: ONNX Runtime refuses the CUDA graph on {self.providers[0][0]}: it needs "
                                   f"every node of the graph on that provider ({type(e).__name__}: {e}); open the "
                                   "engine with cuda_graph=False") from e
            raise EngineLoadError(f"{name}: cannot load ONNX file {model_path}: it is corrupt, truncated or "
                                  f"missing its external data ({type(e).__name__}: {e})") from e
        try:
            self._check_metadata()
        except UnicodeDecodeError as e:  # ORT decodes input/output names and symbolic dims when asked
            raise EngineLoadError(f"{name}: {self.path} names its inputs or outputs in bytes that are not UTF-8: "
                                  f"it is corrupt ({e})") from e
        self.active_provider = self._provider_taken(explicit=providers is not None)
        self.device_id = device_id
        self._device_io = (_DeviceIO(ort, self.session, device_id, self.cuda_graph, name)
                           if self.active_provider in DEVICE_PROVIDERS else None)
        self._run_options = None
        if self._device_io is None:  # device runs bind their buffers (runtime/engines/cuda.py's _DeviceIO)
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry(*ARENA_SHRINKAGE)
        self.io_binding = self._device_io is not None

    def _tensorrt_preflight(self, ort: Any, cache_dir: str | os.PathLike | None) -> str | os.PathLike | None:
        """Before a GPU session: load the CUDA and cuDNN libraries of the nvidia-* wheels
        (`onnxruntime.preload_dlls`, onnxruntime-gpu >= 1.21; only where those wheels are installed,
        a system CUDA being on the loader's path already), and, with the TensorRT EP, TensorRT 10's
        libraries. Returns the `cache_dir` to use (None with the TensorRT EP: ORT cannot save a
        graph with compiled TensorRT nodes)."""
        if any(p in DEVICE_PROVIDERS for p, _ in self.providers) and hasattr(ort, "preload_dlls") and \
                any(_installed(d) for d in ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime")):
            ort.preload_dlls()
        if all(p != TENSORRT_EP for p, _ in self.providers):
            return cache_dir
        from runtime.engines.ort_tensorrt import load_tensorrt_libraries

        load_tensorrt_libraries(ort)  # before ORT looks for libnvinfer.so.10
        if cache_dir is not None:
            log.warning("%s: cache_dir is skipped with the TensorRT EP: ONNX Runtime cannot save a graph with "
                        "compiled TensorRT nodes (the EP's own engine cache is set in its provider options)", self.name)
        return None

    def _provider_taken(self, explicit: bool) -> str:
        """The provider the session runs on; refuses one that is not the provider asked for first
        (ORT goes on without a provider whose library does not load)."""
        used = self.session.get_providers()
        wanted = self.providers[0][0]
        if used and used[0] == wanted:
            return used[0]
        if explicit:
            why = ("its provider library or TensorRT 10's libnvinfer.so.10 / libnvonnxparser.so.10 did not load for "
                   "this CUDA, or the TensorRT EP failed to initialize; ORT's own log above says which"
                   if wanted == TENSORRT_EP else "its provider library did not load or initialize (CUDA or cuDNN "
                   "libraries missing for this onnxruntime-gpu's CUDA, or an old driver); ORT's log above says which")
            raise ProviderFallbackError(f"{self.name}: {wanted} was asked for first, but the ONNX Runtime session runs "
                                        f"on {', '.join(used) or 'nothing'}: {why}. Refusing to run on "
                                        f"{used[0] if used else 'it'} in its place")
        log.warning("%s: ONNX Runtime runs on %s, not %s", self.name, used[0] if used else "?", wanted)
        return used[0] if used else wanted

    @property
    def info(self) -> EngineInfo:
        weights = float_precision(self.inputs)
        return EngineInfo(BACKEND, self.name, weights, weights, self.parallel, self.path.name)

    def _close(self) -> None:
        self._device_io = None  # the device buffers go with their OrtValues
        self.session = None  # ORT frees the session's memory when the last reference goes

    def _use_cache(self, ort: Any, options: Any, cache_dir: str | os.PathLike | None, optimization_level: str,
                   level: Any) -> tuple[Path, Any, tuple[Path, Path, Path] | None]:
        """(graph to load, optimization level, pending cache write or None). A cached optimized graph
        loads as it is. A missing one is written by ORT under a temporary name and published by
        `_publish_cache` (fsync, then rename) only once the session loaded, so a crash mid-write never
        leaves a partial graph under the name the next process loads. Its weights file has a name of its
        own per write (the graph names it), never overwritten in place."""
        if cache_dir is None:
            return self.path, level, None
        cached = self._cache_file(Path(cache_dir), optimization_level, ort.__version__)
        if cached.is_file():
            return cached, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None
        cached.parent.mkdir(parents=True, exist_ok=True)
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        tmp, data = cached.with_name(f".{cached.name}.{token}.tmp"), cached.with_name(f"{cached.stem}-{token}.onnx.data")
        options.optimized_model_filepath = str(tmp)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
        return self.path, level, (tmp, data, cached)

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
                                  f"(runtime/folder/networks.py): {'; '.join(problems)}")

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in self.outputs]
        if self._device_io is None:
            return dict(zip(names, self.session.run(names, dict(feeds), self._run_options)))
        return self._device_io.run(feeds, names)


def _publish_cache(pending: tuple[Path, Path, Path] | None) -> None:
    """Make the optimized graph ORT wrote under its temporary name durable, then rename it into place."""
    if pending is None:
        return
    tmp, data, cached = pending
    for path in (data, tmp):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    if tmp.is_file():
        os.replace(tmp, cached)


def _discard_cache(pending: tuple[Path, Path, Path] | None) -> None:
    if pending is not None:
        pending[0].unlink(missing_ok=True)
        pending[1].unlink(missing_ok=True)


# keyword options open_engine takes (checked by runtime.engines.open_engines before opening anything)
OPTIONS = ("providers", "threads", "optimization_level", "cache_dir", "device_id", "cuda_graph")


def open_engine(engine_dir: str | os.PathLike, manifest: Manifest, network: str, **options: Any) -> OrtEngine:
    """The ONNX Runtime engine of `network` in an engine folder. Options: providers, threads,
    optimization_level ("disable" | "basic" | "extended" | "all"), cache_dir, device_id, cuda_graph."""
    engine_dir = Path(engine_dir)
    entry = manifest.networks.get(network)
    if entry is None:
        raise EngineLoadError(f"{engine_dir}: the manifest has no network {network!r} "
                              f"(it has {', '.join(manifest.networks) or 'none'})")
    inputs, outputs = network_io(network, manifest.dims, entry.get("precision", manifest.precision))
    path = inside(engine_dir, entry["file"], f"network {network!r} names file")
    return OrtEngine(path, network, inputs, outputs, **options)
