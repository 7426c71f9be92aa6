"""Shared fixtures: tiny fp32 engine folders built once per session from random presets (seed 0),
and the opt-in markers: `full` (full-size architectures, SDRT_FULL=1) and `gpu` (CUDA present)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

FULL_REASON = "full-size: set SDRT_FULL=1"


def cuda_present() -> bool:
    """A CUDA driver with at least one device (asked of libcuda directly: the CPU build of torch
    cannot tell)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    full = os.environ.get("SDRT_FULL") == "1"
    gpu = None
    for item in items:
        if "full" in item.keywords and not full:
            item.add_marker(pytest.mark.skip(reason=FULL_REASON))
        if "gpu" in item.keywords:
            gpu = cuda_present() if gpu is None else gpu
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (no CUDA driver or device found)"))


@pytest.fixture(scope="session", autouse=True)
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """The runtime's per-user cache (backend measurements, runtime/engines/calibration.py) in a
    session folder, not the user's home."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def _build(tmp_path_factory: pytest.TempPathFactory, preset: str) -> Path:
    from export.build import build_engine

    return build_engine(preset, tmp_path_factory.mktemp("engines") / preset, seed=0, progress=lambda line: None)


@pytest.fixture(scope="session")
def tiny_sd1_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 engine folder of the tiny-sd1 preset (random weights, seed 0; 64 px native, 32-128 px)."""
    return _build(tmp_path_factory, "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sd2_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 engine folder of the tiny-sd2 preset (v-prediction, linear projections, "!" padding)."""
    return _build(tmp_path_factory, "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_inpaint_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 engine folder of the tiny-inpaint preset (9-channel U-Net)."""
    return _build(tmp_path_factory, "tiny-inpaint")


@pytest.fixture(scope="session")
def tiny_sdxl_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 engine folder of the tiny-sdxl preset (two text encoders, a text_time U-Net)."""
    return _build(tmp_path_factory, "tiny-sdxl")
