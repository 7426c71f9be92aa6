"""The engine interface every backend implements: declared inputs and outputs, input validation
against them, and `run(feeds) -> outputs` on NumPy arrays."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from runtime.networks import TensorSpec


class EngineInputError(ValueError):
    """A feed does not match the engine's declared inputs (name, dtype or shape)."""


class Engine(ABC):
    """One network, ready to run. Subclasses set `name`, `inputs` and `outputs` and implement
    `_run`; callers use `run`, which validates first."""

    backend: str = "?"

    def __init__(self, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs

    def validate(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes and ranks/fixed sizes of `feeds` against the declared inputs, and
        that each symbolic axis takes one value across all inputs. Returns the axis values."""
        expected = {t.name for t in self.inputs}
        got = set(feeds)
        if got != expected:
            parts = []
            if expected - got:
                parts.append(f"missing {sorted(expected - got)}")
            if got - expected:
                parts.append(f"unexpected {sorted(got - expected)}")
            raise EngineInputError(f"{self.name} ({self.backend}): {'; '.join(parts)}; expected inputs {self._describe()}")
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
                        raise EngineInputError(f"{self.name}: input {spec.name!r} has shape {arr.shape}, expected {_fmt(spec.shape)}")
                elif axes.setdefault(dim, size) != size:
                    raise EngineInputError(
                        f"{self.name}: axis {dim!r} is {axes[dim]} in one input and {size} in {spec.name!r}; "
                        f"expected inputs {self._describe()}")
        return axes

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.validate(feeds)
        return self._run(feeds)

    @abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run validated feeds; return every declared output by name."""

    def _describe(self) -> str:
        return ", ".join(f"{t.name}: {t.dtype}{_fmt(t.shape)}" for t in self.inputs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.backend}>"


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
