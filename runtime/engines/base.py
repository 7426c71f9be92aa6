"""The engine interface every backend implements, and its lifecycle.

An `Engine` is one network, ready to run: open (the backend's `open_engine`), `run` any number of
times, from any number of threads, then `close()` (or use it as a context manager).

`run(feeds)` is the whole contract a caller sees: NumPy arrays in, float32 NumPy arrays out.
1. Casts: each feed is cast to the dtype the engine declares (float32 -> float16 for fp16 graphs,
   int64 -> int32 ids). Only casts within a kind are made (float to float, integer to integer
   within range); anything else is an `EngineInputError`.
2. Validation of names, ranks, fixed sizes and symbolic axes against the declared inputs
   (`runtime/folder/networks.py`), naming what was expected.
3. The backend's `_run`. A backend exception is re-raised as `EngineRunError` chained from it
   (out of memory stays visible on `__cause__`); `SDRuntimeError`s pass through.
4. Float outputs come back as float32, whatever the graph computes in.

Threads: engines whose class sets `parallel = True` let calls overlap (ONNX Runtime sessions,
OpenVINO with one infer request per call); the others are serialized by a lock here (TensorRT,
whose context, stream and buffers are per engine). `close()` waits for calls in flight, then
releases the backend's resources (`_close`); a later `run` raises `EngineClosedError`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from runtime.errors import EngineClosedError, EngineInputError, EngineRunError, SDRuntimeError
from runtime.folder.networks import TensorSpec, float_precision

__all__ = ["Engine", "EngineInfo", "EngineInputError"]


@dataclass(frozen=True)
class EngineInfo:
    """What an engine is, as it describes itself (no attribute probing by callers).

    weights: the precision of the weights it runs ("fp32", "fp16", or "int8" for a quantized graph).
    compute: the arithmetic precision the backend was asked for ("fp32", "bf16", "fp16", ...).
    parallel: whether `run` calls from several threads execute at the same time (else serialized).
    file: the file it runs, relative to the engine folder where it has one."""

    backend: str
    network: str
    weights: str
    compute: str
    parallel: bool
    file: str = ""


class Engine(ABC):
    """One network, ready to run. Subclasses set `backend` (and `parallel`), call
    `super().__init__(name, inputs, outputs)`, implement `_run` and, if they hold resources,
    `_close`; callers use `run`, `info` and `close`."""

    backend: str = "?"
    parallel: bool = True  # False: run() calls are serialized by the base class

    def __init__(self, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self._state = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._serial = None if self.parallel else threading.Lock()

    # -- description -------------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        """Defaults derived from the declared I/O; backends override what they know better."""
        weights = float_precision(self.inputs)
        return EngineInfo(self.backend, self.name, weights, weights, self.parallel)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- running -----------------------------------------------------------------------------------

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds cast to the declared dtypes (C-contiguous), after checking names and dtype kinds;
        then validated. Never modifies the caller's arrays."""
        self._check_names(feeds)
        cast = {spec.name: _cast(self.name, spec, feeds[spec.name]) for spec in self.inputs}
        self.validate(cast)
        return cast

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Cast, validate, run; every declared output by name, float outputs as float32."""
        prepared = self.prepare(feeds)
        self._enter()
        try:
            if self._serial is None:
                out = self._run(prepared)
            else:
                with self._serial:
                    out = self._run(prepared)
        except SDRuntimeError:
            raise
        except Exception as e:  # any backend's own exception types (pybind, OpenVINO, CUDA, MemoryError)
            shapes = {k: tuple(v.shape) for k, v in prepared.items()}
            raise EngineRunError(f"{self.name} ({self.backend}): inference failed for input shapes {shapes}: "
                                 f"{type(e).__name__}: {e}") from e
        finally:
            self._leave()
        return {spec.name: _as_float32(out[spec.name]) for spec in self.outputs}

    def validate(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes and ranks/fixed sizes of `feeds` against the declared inputs, and
        that each symbolic axis takes one value across all inputs. Returns the axis values."""
        self._check_names(feeds)
        axes: dict[str, int] = {}
        for spec in self.inputs:
            arr = feeds[spec.name]
            if not isinstance(arr, np.ndarray):
                raise EngineInputError(f"{self.name}: input {spec.name!r} must be a numpy array, got {type(arr).__name__}")
            if arr.dtype != np.dtype(spec.dtype):
                raise EngineInputError(f"{self.name}: input {spec.name!r} has dtype {arr.dtype}, expected {spec.dtype}")
            if arr.ndim != len(spec.shape):
                raise EngineInputError(f"{self.name}: input {spec.name!r} has shape {arr.shape}, expected {_fmt(spec.shape)}")
            for size, dim in zip(arr.shape, spec.shape):
                if isinstance(dim, int):
                    if size != dim:
                        raise EngineInputError(f"{self.name}: input {spec.name!r} has shape {arr.shape}, "
                                               f"expected {_fmt(spec.shape)}")
                elif axes.setdefault(dim, size) != size:
                    raise EngineInputError(
                        f"{self.name}: axis {dim!r} is {axes[dim]} in one input and {size} in {spec.name!r}; "
                        f"expected inputs {self._describe()}")
        return axes

    @abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run validated feeds; return every declared output by name."""

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for calls in flight, then release the backend's resources. Idempotent."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            while self._inflight:
                self._state.wait()
        self._close()

    def _close(self) -> None:
        """Release backend resources (sessions, compiled models, device memory). Default: nothing."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _enter(self) -> None:
        with self._state:
            if self._closed:
                raise EngineClosedError(f"{self.name} ({self.backend}): the engine is closed")
            self._inflight += 1

    def _leave(self) -> None:
        with self._state:
            self._inflight -= 1
            if not self._inflight:
                self._state.notify_all()

    # -- helpers -----------------------------------------------------------------------------------

    def _check_names(self, feeds: Mapping[str, np.ndarray]) -> None:
        expected = {t.name for t in self.inputs}
        got = set(feeds)
        if got != expected:
            parts = []
            if expected - got:
                parts.append(f"missing {sorted(expected - got)}")
            if got - expected:
                parts.append(f"unexpected {sorted(got - expected)}")
            raise EngineInputError(f"{self.name} ({self.backend}): {'; '.join(parts)}; expected inputs {self._describe()}")

    def _describe(self) -> str:
        return ", ".join(f"{t.name}: {t.dtype}{_fmt(t.shape)}" for t in self.inputs)

    def __repr__(self) -> str:
        i = self.info
        return f"<{type(self).__name__} {self.name} on {self.backend} ({i.weights} weights, {i.compute} compute)>"


def _cast(network: str, spec: TensorSpec, arr: np.ndarray) -> np.ndarray:
    """`arr` as `spec.dtype`, C-contiguous; only float->float and in-range int->int casts."""
    if not isinstance(arr, np.ndarray):
        raise EngineInputError(f"{network}: input {spec.name!r} must be a numpy array, got {type(arr).__name__}")
    want = np.dtype(spec.dtype)
    if arr.dtype == want:
        return np.ascontiguousarray(arr)
    if want.kind == "f" and arr.dtype.kind == "f":
        return np.ascontiguousarray(arr, dtype=want)
    if want.kind in "iu" and arr.dtype.kind in "iu":
        limits = np.iinfo(want)
        if arr.size and (int(arr.min()) < limits.min or int(arr.max()) > limits.max):
            raise EngineInputError(f"{network}: input {spec.name!r} holds values outside {want} "
                                   f"([{int(arr.min())}, {int(arr.max())}])")
        return np.ascontiguousarray(arr, dtype=want)
    kind = "floating-point" if want.kind == "f" else "integer"
    raise EngineInputError(f"{network}: input {spec.name!r} has dtype {arr.dtype}, expected {spec.dtype} "
                           f"(any {kind} dtype is cast to it)")


def _as_float32(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    return arr.astype(np.float32, copy=False) if arr.dtype.kind == "f" else arr


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
