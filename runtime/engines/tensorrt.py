"""TensorRT engine: runs the plans `build-engine --tensorrt` built (export/tensorrt.py).

Written against the TensorRT 10 and 11 Python API (name-based I/O tensors, the same calls in both;
checked against NVIDIA/TensorRT's python/src/infer/pyCore.cpp at 10.x and 11.1):
`Runtime.deserialize_cuda_engine`, `ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode /
get_tensor_dtype / get_tensor_profile_shape`, `IExecutionContext.set_input_shape /
set_tensor_address / execute_async_v3`. CUDA memory, copies, streams and CUDA graphs go through
cuda-python's runtime bindings (`cuda.bindings.runtime`, or `cuda.cudart` in cuda-python < 12.6),
so the runtime stays torch-free. One `trt.Logger` serves the whole process (`trt_logger`):
TensorRT keeps the first logger it is given. A driver older than the CUDA the installed stack was
built for is reported as such, with the versions found and needed (runtime/engines/cuda.py).

The pure functions both sides share (the build imports them, the runtime must not import
`export/`) are in runtime/engines/trt_plans.py: the optimization profile derived from the
manifest's shape range, and the plan cache key with the decision whether a stored plan may be used
on this machine. A plan whose key names another TensorRT version or GPU compute capability is
refused here before it is deserialized.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines import cuda as cuda_stack
from runtime.engines.base import Engine, EngineInfo
from runtime.engines.trt_plans import ProfileRangeError, ShapeRange, check_profile, key_hash, runtime_mismatch
from runtime.errors import BackendError, EngineLoadError
from runtime.folder.paths import inside, relative_parts
from runtime.folder.manifest import Manifest
from runtime.folder.networks import TensorSpec, float_precision, network_io

BACKEND = "tensorrt"
INSTALL_HINT = ("install TensorRT and cuda-python for this machine's CUDA driver: "
                "pip install 'sd-runtime[tensorrt-cu12]' (NVIDIA driver >= 525) or "
                "'sd-runtime[tensorrt-cu13]' (driver >= 580)")


class TensorRTUnavailable(BackendError):
    """TensorRT, cuda-python or a CUDA device is missing; the message says which and how to install."""


class StalePlanError(EngineLoadError):
    """A stored plan was built for another TensorRT version, GPU or input; it must be rebuilt."""


# --- environment ------------------------------------------------------------------------------------

def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(f"the 'tensorrt' Python module is not installed ({e}); {INSTALL_HINT}") from None
    return tensorrt


_LOGGER_LOCK = threading.Lock()
_LOGGER: Any = None


def trt_logger() -> Any:
    """The process's one `trt.Logger` (warnings and errors). TensorRT keeps the first logger the
    process gives any builder or runtime, so every builder, parser and runtime here shares this one."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            trt = import_tensorrt()
            _LOGGER = trt.Logger(trt.Logger.WARNING)
        return _LOGGER


def tensorrt_cuda_major(found: Mapping[str, str] | None = None) -> int | None:
    """The CUDA major the installed TensorRT wheels were built for (tensorrt-cu12 / tensorrt-cu13
    distributions), or None when that cannot be told (a TensorRT from a tarball or Debian package)."""
    found = cuda_stack.installed() if found is None else found
    majors = {int(name[len("tensorrt-cu"):].split("-")[0]) for name in found if name.startswith("tensorrt-cu")}
    return majors.pop() if len(majors) == 1 else None


def import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise TensorRTUnavailable(f"cuda-python (module 'cuda.bindings.runtime') is not installed ({e}); "
                                      f"{INSTALL_HINT}") from None
    return cudart


@dataclass(frozen=True)
class CudaEnvironment:
    tensorrt_version: str
    compute_capability: str  # "8.9"
    device_name: str
    device_id: int


def cuda_environment(device_id: int = 0) -> CudaEnvironment:
    """TensorRT's version and the CUDA device's compute capability; raises `TensorRTUnavailable`
    naming what is missing (the tensorrt module, cuda-python, or a CUDA device)."""
    trt = import_tensorrt()
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    old_driver = _driver_problem(cudart)  # cudaErrorInsufficientDriver, or TensorRT wheels newer than the driver
    if old_driver:
        raise TensorRTUnavailable(old_driver)
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        why = _cuda_error_text(cudart, err) if err != cudart.cudaError_t.cudaSuccess else "no devices"
        raise TensorRTUnavailable(f"no CUDA device is available ({why}); TensorRT needs an NVIDIA GPU with its driver. "
                                  f"{INSTALL_HINT}")
    if not 0 <= device_id < count:
        raise TensorRTUnavailable(f"CUDA device {device_id} does not exist; this machine has {count}")
    cuda = _Cuda(cudart)
    attr = cudart.cudaDeviceAttr
    major = cuda.check(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device_id))
    minor = cuda.check(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device_id))
    props = cuda.check(cudart.cudaGetDeviceProperties(device_id))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return CudaEnvironment(trt.__version__, f"{major}.{minor}", name, device_id)


def _driver_problem(cudart: Any) -> str | None:
    """Why the driver cannot run cuda-python's CUDA or the TensorRT wheels' CUDA (None: it can)."""
    driver, runtime = cuda_stack.versions(cudart)
    if not driver:  # no driver at all: reported as "no CUDA device" with CUDA's own error text
        return None
    release = cuda_stack.driver_release()
    why = cuda_stack.driver_problem(driver, runtime, release) if runtime else None
    trt_major = tensorrt_cuda_major()
    if why is None and trt_major and driver:
        why = cuda_stack.driver_problem(driver, trt_major * 1000, release)
        why = why and why.replace("the installed CUDA Python stack", f"TensorRT (tensorrt-cu{trt_major})")
    return why


def is_available(device_id: int = 0) -> tuple[bool, str]:
    """(True, "") when tensorrt and cuda-python import and a CUDA device exists; else (False, why)."""
    try:
        cuda_environment(device_id)
    except TensorRTUnavailable as e:
        return False, str(e)
    return True, ""


# --- CUDA -----------------------------------------------------------------------------------------------

def _cuda_error_text(cudart: Any, err: Any) -> str:
    name = getattr(err, "name", str(err))
    try:
        _, text = cudart.cudaGetErrorString(err)
        return f"{name}: {text.decode() if isinstance(text, bytes) else text}"
    except Exception:  # noqa: BLE001 - best effort message
        return name


class _Cuda:
    """Thin error-checked wrapper over cuda-python's runtime API, which returns (error, *values)."""

    def __init__(self, cudart: Any):
        self.rt = cudart

    def check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA call failed: {_cuda_error_text(self.rt, err)}")
        return values[0] if len(values) == 1 else tuple(values) if values else None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr))

    def to_device(self, ptr: int, array: np.ndarray, stream: Any) -> None:
        self.check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, array: np.ndarray, ptr: int, stream: Any) -> None:
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))


class _GrowingBuffer:
    """A device allocation reused across calls and reallocated only when a larger one is needed."""

    def __init__(self, cuda: _Cuda):
        self.cuda, self.ptr, self.nbytes = cuda, 0, 0

    def ensure(self, nbytes: int) -> bool:
        """Make room for `nbytes`; True if the address changed."""
        if nbytes <= self.nbytes:
            return False
        self.release()
        self.ptr, self.nbytes = self.cuda.malloc(nbytes), nbytes
        return True

    def release(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
        self.ptr, self.nbytes = 0, 0


# --- engine ---------------------------------------------------------------------------------------------

class TensorRTEngine(Engine):
    """One TensorRT plan behind the `Engine` interface: NumPy in, NumPy out.

    Per call: validate the feeds (names, dtypes, ranks, and the plan's profile range), set the input
    shapes, copy inputs into device buffers that are kept and grown as needed, `execute_async_v3`
    on the engine's stream, copy the outputs back. With `cuda_graph=True` a call whose shapes match
    the previous one replays a captured CUDA graph of the execution instead (captured on the second
    call at a shape, after TensorRT has applied the shape change once uncaptured; captured in
    thread-local mode, so another thread's CUDA calls during the capture are not affected).

    Calls are serialized (`parallel = False`): the execution context, stream, device buffers and
    CUDA graph belong to the engine, so two threads' calls run one after the other. The CUDA device
    is current per thread, so every call sets it (`cudaSetDevice`) in the thread that makes it."""

    backend = BACKEND
    parallel = False

    def __init__(self, plan_path: str | os.PathLike, name: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], *, key: Mapping[str, Any] | None = None, device_id: int = 0,
                 cuda_graph: bool = False):
        super().__init__(name, inputs, outputs)
        self.plan_path = Path(plan_path)
        self.precision = str((key or {}).get("precision", float_precision(inputs)))
        env = cuda_environment(device_id)
        if key is not None:
            reasons = runtime_mismatch(key, env.tensorrt_version, env.compute_capability)
            if reasons:
                raise StalePlanError(f"{name}: the TensorRT plan {plan_path} cannot be used here: "
                                     f"{'; '.join(reasons)}. Rebuild it with `build-engine ... --tensorrt` "
                                     "on this machine.")
        trt = import_tensorrt()
        self._trt = trt
        self.device_id = device_id
        self._cuda = _Cuda(import_cudart())
        self._cuda.check(self._cuda.rt.cudaSetDevice(device_id))
        self._runtime = trt.Runtime(trt_logger())
        # No code from the folder: a plan with embedded host code (a version-compatible plan's lean
        # runtime, serialized plugins) is refused (TensorRT 10 IRuntime::setEngineHostCodeAllowed;
        # false is its default, made explicit), and no plugin library is ever loaded.
        self._runtime.engine_host_code_allowed = False
        self._engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self._engine is None:
            raise StalePlanError(f"{name}: TensorRT {env.tensorrt_version} could not deserialize {plan_path}; "
                                 "rebuild it with `build-engine ... --tensorrt`")
        self._context = self._engine.create_execution_context()
        self._stream = self._cuda.check(self._cuda.rt.cudaStreamCreate())
        self._check_io()
        self.profile = {t.name: ShapeRange(*(tuple(s) for s in self._engine.get_tensor_profile_shape(t.name, 0)))
                        for t in inputs}
        self._buffers = {t.name: _GrowingBuffer(self._cuda) for t in inputs + outputs}
        self._cuda_graph = cuda_graph
        self._graph_exec: Any = None
        self._graph: Any = None
        self._last_shapes: dict[str, tuple[int, ...]] | None = None
        self._addresses_set = False

    def _check_io(self) -> None:
        trt, e = self._trt, self._engine
        names = {e.get_tensor_name(i) for i in range(e.num_io_tensors)}
        declared = {t.name for t in self.inputs + self.outputs}
        if names != declared:
            raise StalePlanError(f"{self.name}: the plan's tensors {sorted(names)} differ from the network contract's "
                                 f"{sorted(declared)}; rebuild the plans")
        for spec, mode in [(t, trt.TensorIOMode.INPUT) for t in self.inputs] + \
                          [(t, trt.TensorIOMode.OUTPUT) for t in self.outputs]:
            if e.get_tensor_mode(spec.name) != mode:
                raise StalePlanError(f"{self.name}: plan tensor {spec.name!r} is not an {mode.name.lower()}; "
                                     "rebuild the plans")
            dtype = np.dtype(trt.nptype(e.get_tensor_dtype(spec.name)))
            if dtype != np.dtype(spec.dtype):
                raise StalePlanError(f"{self.name}: plan tensor {spec.name!r} is {dtype}, the contract says "
                                     f"{spec.dtype}; rebuild the plans for this engine folder's precision")

    def validate(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        axes = super().validate(feeds)
        check_profile(self.name, {k: v.shape for k, v in feeds.items()}, self.profile)
        return axes

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, ctx = self._cuda, self._context
        cuda.check(cuda.rt.cudaSetDevice(self.device_id))  # the current device is per thread
        shapes = {t.name: tuple(feeds[t.name].shape) for t in self.inputs}
        reshaped = shapes != self._last_shapes
        if reshaped:
            for name, shape in shapes.items():
                if not ctx.set_input_shape(name, shape):
                    raise ProfileRangeError(f"{self.name} (tensorrt): TensorRT rejected shape {shape} "
                                            f"for input {name!r}")
            unresolved = ctx.infer_shapes()
            if unresolved:
                raise RuntimeError(f"{self.name} (tensorrt): could not infer the shapes of {unresolved}")
        out_shapes = {t.name: tuple(ctx.get_tensor_shape(t.name)) for t in self.outputs}
        moved = False
        for spec in self.inputs:
            moved |= self._buffers[spec.name].ensure(feeds[spec.name].nbytes)
        for spec in self.outputs:
            nbytes = int(np.prod(out_shapes[spec.name])) * np.dtype(spec.dtype).itemsize
            moved |= self._buffers[spec.name].ensure(nbytes)
        if moved or not self._addresses_set:
            for tname, buf in self._buffers.items():
                ctx.set_tensor_address(tname, buf.ptr)
            self._addresses_set = True
        if reshaped or moved:
            self._drop_graph()
        for spec in self.inputs:
            cuda.to_device(self._buffers[spec.name].ptr, np.ascontiguousarray(feeds[spec.name]), self._stream)
        self._execute(first_at_shape=reshaped or moved)
        self._last_shapes = shapes
        results = {}
        for spec in self.outputs:
            arr = np.empty(out_shapes[spec.name], dtype=spec.dtype)
            cuda.to_host(arr, self._buffers[spec.name].ptr, self._stream)
            results[spec.name] = arr
        cuda.check(cuda.rt.cudaStreamSynchronize(self._stream))
        return results

    def _execute(self, first_at_shape: bool) -> None:
        rt = self._cuda.rt
        if not self._cuda_graph or first_at_shape:
            # An uncaptured run applies TensorRT's deferred shape-dependent setup, which must not
            # happen inside a capture.
            if not self._context.execute_async_v3(int(self._stream)):
                raise RuntimeError(f"{self.name} (tensorrt): execute_async_v3 failed (see the TensorRT log above)")
            return
        if self._graph_exec is None:
            # thread-local: CUDA calls other threads make meanwhile (another engine's cudaMalloc)
            # neither fail nor invalidate this capture, as they would in global mode
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            self._cuda.check(rt.cudaStreamBeginCapture(self._stream, mode))
            ok = self._context.execute_async_v3(int(self._stream))
            graph = self._cuda.check(rt.cudaStreamEndCapture(self._stream))
            if not ok:
                self._cuda.check(rt.cudaGraphDestroy(graph))
                raise RuntimeError(f"{self.name} (tensorrt): execute_async_v3 failed during CUDA graph capture")
            self._graph = graph
            self._graph_exec = self._cuda.check(rt.cudaGraphInstantiate(graph, 0))
        self._cuda.check(rt.cudaGraphLaunch(self._graph_exec, self._stream))

    def _drop_graph(self) -> None:
        rt = self._cuda.rt
        if self._graph_exec is not None:
            self._cuda.check(rt.cudaGraphExecDestroy(self._graph_exec))
            self._graph_exec = None
        if self._graph is not None:
            self._cuda.check(rt.cudaGraphDestroy(self._graph))
            self._graph = None

    @property
    def info(self) -> EngineInfo:
        weights = float_precision(self.inputs)
        return EngineInfo(BACKEND, self.name, weights, self.precision, False, self.plan_path.name)

    def _close(self) -> None:
        """Release device memory, the CUDA graph, the stream and the TensorRT objects."""
        if getattr(self, "_context", None) is None:
            return
        self._cuda.check(self._cuda.rt.cudaSetDevice(self.device_id))
        self._cuda.check(self._cuda.rt.cudaStreamSynchronize(self._stream))
        self._drop_graph()
        for buf in self._buffers.values():
            buf.release()
        self._context = None
        self._engine = None
        self._cuda.check(self._cuda.rt.cudaStreamDestroy(self._stream))

    def __del__(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn CUDA down already
            pass


# --- opening from an engine folder ------------------------------------------------------------------

def backend_entry(manifest: Manifest) -> dict[str, Any]:
    entry = manifest.backends.get(BACKEND)
    if not entry:
        raise StalePlanError("this engine folder has no TensorRT plans; build them with "
                             "`build-engine SOURCE --out DIR --tensorrt` on a machine with TensorRT and a GPU")
    return entry


def _plan_and_key(engine_dir: Path, manifest: Manifest, network: str) -> tuple[Path, dict[str, Any]]:
    entry = backend_entry(manifest)
    net = entry.get("networks", {}).get(network)
    if net is None:
        have = ", ".join(entry.get("networks", {})) or "none"
        raise StalePlanError(f"this engine folder has no TensorRT plan for {network!r} (it has {have}); "
                             "rebuild with --tensorrt")
    for k in ("plan", "key"):  # an unsafe path is a ManifestError (runtime/folder/paths.py), a missing one a stale plan
        relative_parts(net.get(k), f"the TensorRT {network} entry names {k}", str(engine_dir))
    if not all(os.path.lexists(engine_dir / net[k]) for k in ("plan", "key")):
        raise StalePlanError(f"{network}: TensorRT plan {net.get('plan')!r} or its key {net.get('key')!r} is missing; "
                             "rebuild with `build-engine ... --tensorrt`")
    plan = inside(engine_dir, net["plan"], f"the TensorRT {network} entry names plan")
    key_file = inside(engine_dir, net["key"], f"the TensorRT {network} entry names key")
    try:
        key = json.loads(key_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise StalePlanError(f"{network}: the plan key {key_file} is not valid JSON ({e}); rebuild the plans") from None
    if not isinstance(key, dict) or ("key_hash" in net and key_hash(key) != net["key_hash"]):
        raise StalePlanError(f"{network}: the plan key {key_file} is not the one the manifest records (key_hash "
                             f"{net.get('key_hash')!r}); rebuild the plans")
    return plan, key


def plans_problem(engine_dir: str | os.PathLike, manifest: Manifest, networks: tuple[str, ...] | None = None, *,
                  device_id: int = 0) -> str | None:
    """Why this folder's TensorRT plans cannot run on this machine (None: they can), from the
    manifest and the plans' keys alone (nothing is deserialized)."""
    try:
        env = cuda_environment(device_id)
        for network in networks or tuple(manifest.networks):
            _, key = _plan_and_key(Path(engine_dir), manifest, network)
            reasons = runtime_mismatch(key, env.tensorrt_version, env.compute_capability)
            if reasons:
                return f"the {network} plan cannot be used here: {'; '.join(reasons)}; rebuild with --tensorrt"
    except (TensorRTUnavailable, StalePlanError) as e:
        return str(e)
    return None


# keyword options open_engine takes (checked by runtime.engines.open_engines before opening anything)
OPTIONS = ("device_id", "cuda_graph")


def open_engine(engine_dir: str | os.PathLike, manifest: Manifest, network: str, *, device_id: int = 0,
                cuda_graph: bool = False) -> TensorRTEngine:
    """The TensorRT engine of `network` in `engine_dir`. Checks, before deserializing, that the
    plan's key matches this machine's TensorRT version and GPU compute capability."""
    plan, key = _plan_and_key(Path(engine_dir), manifest, network)
    graph_precision = manifest.networks.get(network, {}).get("precision", manifest.precision)
    inputs, outputs = network_io(network, manifest.dims, graph_precision)
    return TensorRTEngine(plan, network, inputs, outputs, key=key, device_id=device_id, cuda_graph=cuda_graph)
