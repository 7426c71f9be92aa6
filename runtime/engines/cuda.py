"""The CUDA stack under the NVIDIA backends, told apart before anything runs: which CUDA major the
installed cuda-python / TensorRT / onnxruntime-gpu were built for, which CUDA the NVIDIA driver
supports, and, where they do not fit, a message naming the driver found and the driver needed.

Torch-free, and pure apart from the probes at the bottom (`driver_release`, `installed`), so the
rules are tested without a GPU.

Driver requirements (NVIDIA, "CUDA Compatibility", Minor Version Compatibility, Table 1,
docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html): an application built
with CUDA 12.x needs a driver of branch >= 525, one built with CUDA 13.x a driver >= 580. The CUDA
runtime reports a driver that is too old as `cudaErrorInsufficientDriver` on every call;
`cudaDriverGetVersion` still answers, with the newest CUDA the driver supports (1000 * major + 10 *
minor, 0 without a driver), and `cudaRuntimeGetVersion` gives the CUDA the bindings were built with
(cuda-python 12.9 / 13.0 `cuda.bindings.runtime` docstrings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# CUDA major -> minimum NVIDIA driver branch (source in the module docstring).
MIN_DRIVER_BRANCH = {12: 525, 13: 580}
# pyproject.toml extras per CUDA major: the pip command that installs a consistent set.
EXTRAS = {12: "tensorrt-cu12", 13: "tensorrt-cu13"}
# Distributions whose versions say which CUDA and TensorRT the Python side brings (reported as found).
STACK_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-libs", "tensorrt-cu13-libs",
                       "tensorrt-cu12-bindings", "tensorrt-cu13-bindings", "cuda-python", "cuda-bindings",
                       "onnxruntime", "onnxruntime-gpu", "torch", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime")
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class CudaVersion:
    """A CUDA version as the runtime API encodes it (1000 * major + 10 * minor)."""

    code: int

    @property
    def major(self) -> int:
        return self.code // 1000

    @property
    def minor(self) -> int:
        return (self.code % 1000) // 10

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" if self.code else "none"


def driver_problem(driver: int, runtime: int, driver_release: str | None = None) -> str | None:
    """Why a driver that supports CUDA `driver` cannot run code built with CUDA `runtime` (both as
    cudaDriverGetVersion / cudaRuntimeGetVersion return them), or None when it can. The message
    names the driver found (its release, e.g. "550.54.15", where known) and the one needed."""
    have, want = CudaVersion(driver), CudaVersion(runtime)
    if have.code == 0:
        return "no NVIDIA driver is installed (cudaDriverGetVersion reports 0)"
    if have.major >= want.major:
        return None
    need = MIN_DRIVER_BRANCH.get(want.major)
    found = f"driver {driver_release} " if driver_release else "the driver "
    needed = f"a driver >= {need}" if need else f"a driver for CUDA {want.major}"
    fit = EXTRAS.get(have.major)
    hint = (f"update the NVIDIA driver to >= {need}, or install the CUDA {have.major} set instead: "
            f"pip install 'sd-runtime[{fit}]'") if fit else f"update the NVIDIA driver to >= {need}"
    return (f"the NVIDIA driver is too old: {found}supports CUDA up to {have}, but the installed CUDA Python "
            f"stack is built for CUDA {want} and needs {needed} (NVIDIA CUDA Compatibility, minor version "
            f"compatibility); {hint}")


def versions(cudart: Any) -> tuple[int, int]:
    """(driver, runtime) CUDA versions from cuda-python; 0 where the call fails."""
    ok = cudart.cudaError_t.cudaSuccess
    err, driver = cudart.cudaDriverGetVersion()
    rerr, runtime = cudart.cudaRuntimeGetVersion()
    return (int(driver) if err == ok and driver else 0), (int(runtime) if rerr == ok and runtime else 0)


def parse_driver_release(text: str) -> str | None:
    """The driver release ("550.54.15") from /proc/driver/nvidia/version's first line."""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


# --- probes ---------------------------------------------------------------------------------------

def driver_release(path: Path | None = None) -> str | None:
    """This machine's NVIDIA driver release, read from the kernel module's version file (Linux)."""
    try:
        return parse_driver_release((path or DRIVER_VERSION_FILE).read_text())
    except OSError:
        return None


def installed() -> dict[str, str]:
    """Version of each of STACK_DISTRIBUTIONS that is installed."""
    found = {}
    for name in STACK_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
