"""OpenVINO engine: reads the engine folder's ONNX graphs directly (no conversion step) and runs
them on the CPU plugin.

Inference precision: bf16 where the CPU reports BF16 in OPTIMIZATION_CAPABILITIES (AVX512_BF16 or
AMX), f32 otherwise; the graph and its I/O stay fp32 (or fp16 for fp16 graphs), OpenVINO converts
weights and activations inside. Override with `inference_precision="f32" | "bf16" | "f16"`.

Shapes: by default each distinct set of input shapes gets its own statically reshaped compiled
model (static shapes let the CPU plugin pick its best kernels; a denoising loop calls the U-Net with
one shape throughout), kept in a small LRU. `static_shapes=False` compiles the graph once with its
dynamic axes instead. With a cache dir (default `ENGINE_DIR/openvino-cache`) each static variant is
saved there once as OpenVINO IR and compiled from that file with OpenVINO's CACHE_DIR, so a shape
compiled once, in any process, is a load rather than a compile the next time. The cache grows by
the IR plus the compiled blob per shape (about 1.7 + 3.4 GB for an SD 1.5 U-Net in bf16); delete the
folder to reclaim it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines.base import Engine, EngineInputError
from runtime.manifest import Manifest
from runtime.networks import TensorSpec, network_io

BACKEND = "openvino"
CACHE_SUBDIR = "openvino-cache"
DEVICE = "CPU"
# user-facing precision names -> OpenVINO INFERENCE_PRECISION_HINT values and capability names
PRECISIONS = {"f32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "f16": ("f16", "FP16")}
PRECISION_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}
# compiled static-shape variants kept per engine (a few resolutions / batch sizes)
MAX_SHAPE_VARIANTS = 4


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
    """The CPU plugin's OPTIMIZATION_CAPABILITIES, e.g. ('BF16', 'FP32', 'INT8', ...)."""
    import openvino as ov

    return tuple(ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def default_precision(capabilities: tuple[str, ...] | None = None) -> str:
    """bf16 where the CPU has bf16 hardware, f32 otherwise."""
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
        raise ValueError(f"unknown inference_precision {requested!r}; expected one of {', '.join(PRECISIONS)}")
    capability = PRECISIONS[name][1]
    if capability not in caps:
        raise ValueError(f"inference_precision {name!r} is not supported by this CPU "
                         f"(OpenVINO CPU capabilities: {', '.join(caps)})")
    return name


class OpenVinoEngine(Engine):
    """One ONNX graph compiled by OpenVINO for the CPU."""

    backend = BACKEND

    def __init__(self, path: str | os.PathLike, name: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], *, inference_precision: str | None = None,
                 threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                 static_shapes: bool = True, quantized: bool = False):
        super().__init__(name, inputs, outputs)
        import openvino as ov

        self.path = Path(path)
        self.quantized = quantized  # an int8 IR from `build-engine --quantize int8` (export/quantize.py)
        if not self.path.is_file():
            raise FileNotFoundError(f"{name}: graph {self.path} does not exist")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self._core = ov.Core()
        self.inference_precision = resolve_precision(
            inference_precision, tuple(self._core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")))
        self.threads = threads
        self.static_shapes = static_shapes
        self._config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": PRECISIONS[self.inference_precision][0],
        }
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._config["CACHE_DIR"] = str(self.cache_dir)
        self._model = self._core.read_model(str(self.path))
        graph_inputs = {port.get_any_name() for port in self._model.inputs}
        graph_outputs = {port.get_any_name() for port in self._model.outputs}
        declared_in, declared_out = {t.name for t in inputs}, {t.name for t in outputs}
        if graph_inputs != declared_in or not declared_out <= graph_outputs:
            raise ValueError(f"{name}: graph {self.path} has inputs {sorted(graph_inputs)} and outputs "
                             f"{sorted(graph_outputs)}; the network contract declares inputs "
                             f"{sorted(declared_in)} and outputs {sorted(declared_out)}")
        # key: tuple of input shapes in declared order (or None for the one dynamic model)
        self._compiled: OrderedDict[Any, Any] = OrderedDict()

    def __repr__(self) -> str:
        int8 = ", int8 weights and activations" if self.quantized else ""
        return f"<OpenVinoEngine {self.name} on openvino ({self.inference_precision}{int8}) from {self.path.name}>"

    def _request(self, feeds: Mapping[str, np.ndarray]):
        key = tuple(feeds[t.name].shape for t in self.inputs) if self.static_shapes else None
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        if key is not None and self.cache_dir is not None:
            compiled = self._core.compile_model(str(self._static_ir(key)), DEVICE, self._config)
        else:
            if key is not None:
                self._reshape(key)
            compiled = self._core.compile_model(self._model, DEVICE, self._config)
        request = compiled.create_infer_request()
        self._compiled[key] = request
        while len(self._compiled) > MAX_SHAPE_VARIANTS:
            self._compiled.popitem(last=False)
        return request

    def _reshape(self, key: tuple[tuple[int, ...], ...]) -> None:
        self._model.reshape({t.name: list(shape) for t, shape in zip(self.inputs, key)})

    def _static_ir(self, key: tuple[tuple[int, ...], ...]) -> Path:
        """The graph reshaped to `key`, saved once as OpenVINO IR in the cache dir.

        Compiling from a file lets OpenVINO's CACHE_DIR key the compiled blob on the file instead of
        hashing the in-memory weights: measured on the SD 1.5 U-Net (bf16, 2 busy cores) a cache
        hit then takes ~5-6 s at a 3.5-5.6 GB peak RSS, against ~12 s and 8.9 GB for a hit keyed on
        the in-memory model (a fresh compile: 11-25 s, 5.6 GB). Reduced precisions store fp16
        weights, half the disk and memory (fp16 keeps 3 more mantissa bits than bf16: the bf16 U-Net's
        relative error against fp32 moves from 2.6e-2 to 3.0e-2)."""
        import openvino as ov

        stat = self.path.stat()
        compress = self.inference_precision != "f32"
        ident = f"{self.path.name}:{stat.st_size}:{stat.st_mtime_ns}:{key}:{'fp16' if compress else 'fp32'}"
        stem = f"{self.path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
        xml = self.cache_dir / f"{stem}.xml"
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            return xml
        tmp = self.cache_dir / f".{stem}.{os.getpid()}.tmp.xml"
        try:
            self._reshape(key)
            ov.save_model(self._model, str(tmp), compress_to_fp16=compress)
            os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(tmp, xml)
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".bin").unlink(missing_ok=True)
        return xml

    def compile_for(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Compile (or load from the cache) the variant for these feeds' shapes ahead of the first run."""
        self.validate(feeds)
        self._request(feeds)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._request(feeds)
        try:
            results = request.infer({t.name: np.ascontiguousarray(feeds[t.name]) for t in self.inputs})
        except RuntimeError as e:
            shapes = {k: v.shape for k, v in feeds.items()}
            raise EngineInputError(f"{self.name} (openvino): inference failed for input shapes {shapes}: {e}") from None
        by_name = {port.get_any_name(): value for port, value in results.items()}
        out: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            value = by_name[spec.name]
            # explicit cast at the boundary: OpenVINO may hand back its internal precision
            out[spec.name] = value if value.dtype == np.dtype(spec.dtype) else value.astype(spec.dtype)
        return out


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
OPTIONS = ("inference_precision", "threads", "cache_dir", "static_shapes", "quantized")


def int8_unet(manifest: Manifest) -> dict[str, Any] | None:
    """The manifest entry of the folder's int8 U-Net (`build-engine --quantize int8`), or None."""
    return manifest.backends.get(BACKEND, {}).get("unet_int8")


def open_engine(engine_dir: str | os.PathLike, manifest: Manifest, network: str, **options: Any) -> OpenVinoEngine:
    """The OpenVINO engine for `network` of an engine folder.

    Options: inference_precision ("bf16" | "f32" | "f16"; default bf16 where the CPU has it, else
    f32, whatever the graph's precision), threads, static_shapes (default True), cache_dir (default
    ENGINE_DIR/openvino-cache; None turns caching off), quantized (U-Net only: None (default) runs
    the folder's int8 U-Net where it has one, True requires it, False runs the fp32/fp16 graph; the
    other networks ignore it).
    """
    engine_dir = Path(engine_dir)
    if network not in manifest.networks:
        raise ValueError(f"{engine_dir}: the manifest has no network {network!r} "
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
        raise TypeError(f"openvino engine: unknown options {', '.join(sorted(unknown))}")
    quantized = options.pop("quantized", None)
    if quantized not in (None, True, False):
        raise ValueError(f"quantized must be None, True or False, got {quantized!r}")
    path = engine_dir / entry["file"]
    if network == "unet":
        int8 = int8_unet(manifest)
        if quantized and int8 is None:
            raise ValueError(f"{engine_dir}: quantized=True, but the folder has no int8 U-Net "
                             "(build it with build-engine --quantize int8)")
        if int8 is not None and quantized is not False:
            path = engine_dir / int8["file"]
            # the int8 IR takes fp32 inputs whatever the folder's graph precision
            inputs, outputs = network_io(network, manifest.dims, "fp32")
            return OpenVinoEngine(path, network, inputs, outputs, quantized=True, **options)
    return OpenVinoEngine(path, network, inputs, outputs, **options)
