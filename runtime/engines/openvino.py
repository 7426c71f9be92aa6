"""OpenVINO engine: reads the engine folder's ONNX graphs directly (no conversion step) and runs
them on the CPU plugin.

Inference precision: bf16 where the CPU reports BF16 in OPTIMIZATION_CAPABILITIES (AVX512_BF16 or
AMX), f32 otherwise; the graph and its I/O stay fp32 (or fp16 for fp16 graphs), OpenVINO converts
weights and activations inside. Override with `inference_precision="f32" | "bf16" | "f16"`.

Shapes: by default each distinct set of input shapes gets its own statically reshaped compiled
model (static shapes let the CPU plugin pick its best kernels; a denoising loop calls the U-Net with
one shape throughout), kept in a small LRU. `static_shapes=False` compiles the graph once with its
dynamic axes instead. The source model is read (weights by mmap) only to compile and dropped
afterwards; its pages are handed back to the kernel while the compile reads them
(runtime/engines/mapped_weights.py), so a compiled network's weights are held once, in the compiled
precision (the SD 1.5 U-Net at bf16: compile peak 2.5 GB instead of 5.6 GB).

Cache: compiled variants go to `ENGINE_DIR/openvino-cache`, bounded by default to 29% of the
folder's graphs, least recently used first out, written atomically (runtime/engines/ov_cache.py).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines import mapped_weights, ov_cache
from runtime.engines.base import Engine, EngineInfo
from runtime.engines.ov_group_norm import layout_free_group_norms
from runtime.errors import BackendError, EngineLoadError
from runtime.folder.paths import inside
from runtime.folder.manifest import Manifest
from runtime.folder.networks import TensorSpec, float_precision, network_io

BACKEND = "openvino"
CACHE_SUBDIR = "openvino-cache"
DEVICE = "CPU"
# user-facing precision names -> OpenVINO INFERENCE_PRECISION_HINT values and capability names
PRECISIONS = {"f32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "f16": ("f16", "FP16")}
PRECISION_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}
# compiled static-shape variants kept per engine (a few resolutions / batch sizes)
MAX_SHAPE_VARIANTS = 4
# idle infer requests kept per compiled variant (each holds its own activation buffers)
MAX_IDLE_REQUESTS = 2
# Networks whose GroupNorms are rewritten before compiling so that they need no layout change
# (runtime/engines/ov_group_norm.py). Measured on SD 1.5 (2-vCPU Xeon with AMX, OpenVINO 2026.4;
# benchmarks/results/vae-decode-xeon-amx-2cpu-2026-12-01.json): decoder f32 -3% at 256 px and -5%
# at 512, bf16 -4% / -8%; encoder f32 -3% / -6%, bf16 -1% / -6%. The U-Net's call time does not
# change (bf16, 256 px: 0.359 vs 0.361 s), so it is compiled as exported.
LAYOUT_FREE_GROUP_NORM = ("vae_decoder", "vae_encoder")
# Part of the compile cache's key, so a blob compiled before the rewrite is not reused after it.
GROUP_NORM_FORM = "layout-free-1"


def is_available() -> tuple[bool, str]:
    """(True, "") when the openvino package imports and has a CPU device; else (False, why)."""
    try:
        import openvino as ov
    except ImportError as e:
        return False, f"openvino is not installed ({e}); pip install 'sd-runtime[openvino]'"
    try:
        devices = ov.Core().available_devices
    except RuntimeError as e:
        return False, f"openvino could not enumerate devices: {e}"
    if DEVICE not in devices:
        return False, f"openvino has no {DEVICE} device (available: {', '.join(devices) or 'none'})"
    return True, ""


def cpu_capabilities() -> tuple[str, ...]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. ('BF16', 'FP32', 'INT8', ...)), less BF16 and
    FP16 where runtime/cpu.py says the kernels may not use them: OpenVINO reports BF16 from the CPU's
    flags even under an ONEDNN_MAX_CPU_ISA cap whose kernels then have no bf16 implementations."""
    import openvino as ov

    from runtime import cpu

    caps = tuple(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    feats = cpu.features()
    if cpu.hardware_features() and "bf16" not in feats:  # an x86 CPU (or cap) without AVX512_BF16
        caps = tuple(c for c in caps if c not in ("BF16", "FP16"))
    return caps


def default_precision(capabilities: tuple[str, ...] | None = None) -> str:
    """bf16 where the CPU has bf16 hardware (AVX512_BF16 or AMX), f32 otherwise."""
    caps = cpu_capabilities() if capabilities is None else capabilities
    return "bf16" if "BF16" in caps else "f32"


def resolve_precision(requested: str | None, capabilities: tuple[str, ...] | None = None) -> str:
    """Map a user option (None = default for this CPU) to "f32" | "bf16" | "f16", checking that the
    CPU supports it."""
    caps = cpu_capabilities() if capabilities is None else capabilities
    if requested is None:
        return default_precision(caps)
    name = PRECISION_ALIASES.get(requested, requested)
    if name not in PRECISIONS:
        raise BackendError(f"unknown inference_precision {requested!r}; expected one of {', '.join(PRECISIONS)}")
    capability = PRECISIONS[name][1]
    if capability not in caps:
        raise BackendError(f"inference_precision {name!r} is not supported by this CPU "
                           f"(OpenVINO CPU capabilities: {', '.join(caps)})")
    return name


# The OpenVINO frontend of each graph file type an engine folder holds: ONNX graphs, and OpenVINO IR for
# the int8 U-Net. Nothing else is read, so no other frontend (TensorFlow, PaddlePaddle, ...) ever
# parses a folder's file: `Core.read_model` would try each in turn on a file the ONNX parser refuses.
FRONTENDS = {".onnx": "onnx", ".xml": "ir"}


def read_model(path: Path, name: str) -> Any:
    """The ov.Model of an ONNX graph or IR file, read by the one frontend its extension names (an IR
    .xml reads the .bin beside it). Any failure is an EngineLoadError naming the file."""
    from openvino.frontend import FrontEndManager

    framework = FRONTENDS.get(path.suffix.lower())
    if framework is None:
        raise EngineLoadError(f"{name}: {path} is neither an ONNX graph (.onnx) nor OpenVINO IR (.xml); the OpenVINO "
                              "engine reads only those")
    try:
        frontend = FrontEndManager().load_by_framework(framework)
        model = frontend.convert(frontend.load(str(path)))
        for port in (*model.inputs, *model.outputs):
            port.get_names()  # names are decoded when asked: a corrupt file fails here, not later
        return model
    except Exception as e:  # OpenVINO raises RuntimeError, GeneralFailure, OpConversionFailure... (all Exception)
        raise EngineLoadError(f"{name}: OpenVINO ({framework} frontend) cannot read {path}: it is corrupt, truncated "
                              f"or missing its weights ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e


class _Variant:
    """One compiled model and a pool of idle infer requests: a call takes one (or creates it) and
    gives it back, so calls from several threads never share a request. The first call runs with
    the source weights' pages released (mapped_weights): the plugin may still prepare weights then."""

    def __init__(self, compiled: Any, weight_files: tuple[Path, ...] = ()):
        self.compiled = compiled
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._release_first = weight_files  # emptied by the first call

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            request = self._idle.pop() if self._idle else self.compiled.create_infer_request()
            release, self._release_first = self._release_first, ()
        try:
            with mapped_weights.released(release):
                results = request.infer(feeds)
            return {port.get_any_name(): np.asarray(value) for port, value in results.items()}
        finally:
            with self._lock:
                if len(self._idle) < MAX_IDLE_REQUESTS:
                    self._idle.append(request)


class OpenVinoEngine(Engine):
    """One graph (ONNX, or OpenVINO IR for the int8 U-Net) compiled by OpenVINO for the CPU.

    Thread-safe: the LRU of compiled shape variants and the reshape of the shared model are guarded
    by one lock (held while a new variant compiles); each call runs on its own infer request."""

    backend = BACKEND
    parallel = True

    def __init__(self, path: str | os.PathLike, name: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], *, inference_precision: str | None = None,
                 threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                 cache_limit_bytes: int | None = None, static_shapes: bool = True, quantized: bool = False):
        super().__init__(name, inputs, outputs)
        import openvino as ov

        self.path = Path(path)
        self.quantized = quantized  # an int8 IR from `build-engine --quantize int8` (export/quantize.py)
        if not self.path.is_file():
            raise EngineLoadError(f"{name}: graph {self.path} does not exist")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BackendError(f"threads must be a positive integer or None, got {threads!r}")
        self._core = ov.Core()
        self.inference_precision = resolve_precision(inference_precision)
        self.threads = threads
        self.static_shapes = static_shapes
        self._config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": PRECISIONS[self.inference_precision][0],
        }
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._graph_bytes = _file_bytes(self.path)
        limit = int(ov_cache.DEFAULT_FRACTION * self._graph_bytes) if cache_limit_bytes is None else cache_limit_bytes
        self._cache = ov_cache.CompileCache(self.cache_dir, limit) if self.cache_dir is not None else None
        self._model = read_model(self.path, name)  # kept until the first compile, then read again per new shape
        self._check_ports()
        self._lock = threading.Lock()
        # key: tuple of input shapes in declared order (or None for the one dynamic model)
        self._compiled: OrderedDict[Any, _Variant] = OrderedDict()

    def _check_ports(self) -> None:
        graph_inputs = {port.get_any_name() for port in self._model.inputs}
        graph_outputs = {port.get_any_name() for port in self._model.outputs}
        declared_in, declared_out = {t.name for t in self.inputs}, {t.name for t in self.outputs}
        if graph_inputs != declared_in or not declared_out <= graph_outputs:
            raise EngineLoadError(f"{self.name}: graph {self.path} has inputs {sorted(graph_inputs)} and outputs "
                                  f"{sorted(graph_outputs)}; the network contract declares inputs "
                                  f"{sorted(declared_in)} and outputs {sorted(declared_out)}")

    @property
    def info(self) -> EngineInfo:
        weights = "int8" if self.quantized else float_precision(self.inputs)
        compute = {"f32": "fp32", "f16": "fp16"}.get(self.inference_precision, self.inference_precision)
        return EngineInfo(BACKEND, self.name, weights, compute, True, self.path.name)

    def _variant(self, feeds: Mapping[str, np.ndarray]) -> _Variant:
        key = tuple(feeds[t.name].shape for t in self.inputs) if self.static_shapes else None
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            files = self._weight_files()
            with mapped_weights.released(files):
                compiled = self._compile(key)
            variant = self._compiled[key] = _Variant(compiled, files)
            while len(self._compiled) > MAX_SHAPE_VARIANTS:
                self._compiled.popitem(last=False)
            return variant

    def _compile(self, key: tuple[tuple[int, ...], ...] | None) -> Any:
        """Compile the graph (statically reshaped to `key`), through the folder's compile cache.
        The source model is dropped afterwards: its weights (3.4 GB for the SD 1.5 U-Net, read by
        mmap) are not kept beside the compiled copy; another shape reads the file again."""
        import openvino as ov

        model = self._model if self._model is not None else read_model(self.path, self.name)
        self._model = None
        if key is not None:
            model.reshape({t.name: list(shape) for t, shape in zip(self.inputs, key)})
        rewrite = self.name in LAYOUT_FREE_GROUP_NORM
        if rewrite:
            layout_free_group_norms(model)
        if self._cache is None:
            return self._core.compile_model(model, DEVICE, self._config)
        stat = self.path.stat()
        ident = {"file": self.path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "shapes": key,
                 "config": self._config, "openvino": ov.get_version(), "static": self.static_shapes}
        if rewrite:
            ident["group_norm"] = GROUP_NORM_FORM
        return self._cache.compile(self._core, model, DEVICE, self._config, ident, self._graph_bytes)

    def _weight_files(self) -> tuple[Path, ...]:
        """What a compile reads by mmap: the graph and its weights file, and the compile cache."""
        cache = (self.cache_dir,) if self.cache_dir is not None else ()
        return _graph_files(self.path) + cache

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        by_name = self._variant(feeds).infer({t.name: feeds[t.name] for t in self.inputs})
        return {spec.name: by_name[spec.name] for spec in self.outputs}

    def _close(self) -> None:
        with self._lock:
            self._compiled.clear()
            self._model = None


def _graph_files(path: Path) -> tuple[Path, ...]:
    """A graph and its weights: an ONNX file and its `<name>.data`, or an IR .xml and .bin."""
    extra = (path.with_name(path.name + ".data"), path.with_suffix(".bin"))
    return (path, *(p for p in extra if p.is_file()))


def _file_bytes(path: Path) -> int:
    """Bytes of a graph with its weights (`_graph_files`)."""
    return sum(p.stat().st_size for p in _graph_files(path))


def _default_cache_dir(engine_dir: Path) -> Path | None:
    """ENGINE_DIR/openvino-cache, or None (no cache, with a warning) where it cannot be written,
    e.g. a read-only engine folder: the engine still runs, compiling each shape in every process."""
    cache = engine_dir / CACHE_SUBDIR
    try:
        cache.mkdir(exist_ok=True)
    except OSError as e:
        warnings.warn(f"openvino: cannot use the compile cache {cache} ({e}); running without it, so every "
                      "process compiles its shapes again. Pass cache_dir=... to choose a writable folder.",
                      RuntimeWarning, stacklevel=3)
        return None
    if not os.access(cache, os.W_OK):
        warnings.warn(f"openvino: the compile cache {cache} is not writable; running without it. "
                      "Pass cache_dir=... to choose a writable folder.", RuntimeWarning, stacklevel=3)
        return None
    return cache


# keyword options open_engine takes (checked by runtime.engines.open_engines before opening anything)
OPTIONS = ("inference_precision", "threads", "cache_dir", "cache_limit_gb", "static_shapes", "quantized")


def _cache_limit(limit_gb: Any, engine_dir: Path, manifest: Manifest) -> int:
    """The folder-wide cache bound in bytes: `limit_gb`, or ov_cache.default_limit (folder + cache
    within 1.3x the graphs)."""
    if limit_gb is None:
        return ov_cache.default_limit(engine_dir, manifest)
    if isinstance(limit_gb, bool) or not isinstance(limit_gb, (int, float)) or limit_gb < 0:
        raise BackendError(f"cache_limit_gb must be a number >= 0 (GB), got {limit_gb!r}")
    return int(limit_gb * 2**30)


def int8_safe_here(entry: dict[str, Any]) -> bool:
    """Whether an int8 U-Net (manifest entry) computes right on this CPU: always with NNCF's overflow
    fix on every layer (export/quantize.py OVERFLOW_FIX); without it only with VNNI (or off x86)."""
    from runtime import cpu

    return entry.get("overflow_fix") == "enable" or "vnni" in cpu.features() or not cpu.hardware_features()


def open_engine(engine_dir: str | os.PathLike, manifest: Manifest, network: str, **options: Any) -> OpenVinoEngine:
    """The OpenVINO engine for `network` of an engine folder.

    Options: inference_precision ("bf16" | "f32" | "f16"; default bf16 where the CPU has it, else
    f32, whatever the graph's precision), threads, static_shapes (default True), cache_dir (default
    ENGINE_DIR/openvino-cache; None turns caching off), cache_limit_gb (the cache's bound, default
    29% of the folder's graphs: runtime/engines/ov_cache.py), quantized (None (default) runs the
    folder's quantized IRs where it has them: the int8 U-Net, or the int8-weight U-Net and text
    encoder; True requires a quantized U-Net; False runs the graphs).
    """
    engine_dir = Path(engine_dir)
    if network not in manifest.networks:
        raise EngineLoadError(f"{engine_dir}: the manifest has no network {network!r} "
                         f"(it has {', '.join(manifest.networks)})")
    entry = manifest.networks[network]
    precision = entry.get("precision", manifest.precision)
    inputs, outputs = network_io(network, manifest.dims, precision)
    options = dict(options)
    # An fp16 graph (float16 weights and I/O) runs at the CPU's default precision like an fp32 one:
    # the CPU plugin converts its weights on compile; f16 arithmetic is opt-in where the CPU has it.
    if "cache_dir" not in options:
        options["cache_dir"] = _default_cache_dir(engine_dir)
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise BackendError(f"openvino engine: unknown options {', '.join(sorted(unknown))}; it takes {', '.join(OPTIONS)}")
    quantized = options.pop("quantized", None)
    if quantized not in (None, True, False):
        raise BackendError(f"quantized must be None, True or False, got {quantized!r}")
    options["cache_limit_bytes"] = _cache_limit(options.pop("cache_limit_gb", None), engine_dir, manifest)
    path = inside(engine_dir, entry["file"], f"network {network!r} names file")
    variant = _quantized_variant(engine_dir, manifest, network, quantized)
    if variant is not None:
        # the quantized IRs are made from the fp32 graphs and take fp32 inputs
        inputs, outputs = network_io(network, manifest.dims, "fp32")
        return OpenVinoEngine(variant, network, inputs, outputs, quantized=True, **options)
    return OpenVinoEngine(path, network, inputs, outputs, **options)


def _quantized_variant(engine_dir: Path, manifest: Manifest, network: str, quantized: bool | None) -> Path | None:
    """The folder's quantized IR for `network` (`build-engine --quantize int8 | int8-weights`) when
    `quantized` is not False and one exists; None runs the graph. quantized=True requires one."""
    int8, weights = manifest.int8_unet, (manifest.weights_int8 or {}).get("networks", {}).get(network)
    entry = int8 if network == "unet" and int8 is not None else weights
    if quantized and entry is None and network == "unet":
        raise BackendError(f"{engine_dir}: quantized=True, but the folder has no quantized U-Net (build it with "
                           "build-engine --quantize int8 or int8-weights)")
    if entry is None or quantized is False:
        return None
    if entry is int8 and quantized is None and not int8_safe_here(int8):
        warnings.warn(f"{engine_dir}: the int8 U-Net was quantized without NNCF's overflow fix, which this "
                      "CPU (no VNNI) needs: int8 products would saturate. Running the fp32 graph; rebuild with "
                      "build-engine --quantize int8 (or pass quantized=True to run it anyway).",
                      RuntimeWarning, stacklevel=4)
        return None
    where = "the int8 U-Net names graph" if entry is int8 else f"the int8-weight {network} names graph"
    return inside(engine_dir, entry["file"], where)
