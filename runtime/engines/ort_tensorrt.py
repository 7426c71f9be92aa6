"""ONNX Runtime's TensorRT execution provider as a route to TensorRT: provider options for
`OrtEngine(..., providers=...)`, with ORT's engine and timing caches under
`ENGINE_DIR/tensorrt/ort-cache` and the same optimization profile as our own plans
(`runtime.engines.trt_plans.network_profile`).

Option names and formats are those of the ONNX Runtime TensorRT EP documentation
(onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html): `trt_profile_*_shapes`
take "input1:d1xd2x...,input2:...", the explicit profile must cover every dynamic input, and with
the engine cache enabled ORT compares it with the cached `.profile` to decide on a rebuild.
Pure functions apart from `ort_tensorrt_providers`, which also creates the cache folder, and
`load_tensorrt_libraries`.

What the onnxruntime-gpu wheels on PyPI need, read from the wheels themselves (the provider
library's `readelf -d` NEEDED entries, its option-name strings, `capi/build_and_package_info.py`):
  * 1.22.0 .. 1.26.0 are built for CUDA 12 (`cuda_version` 12.2 / 12.8), 1.27.0 and later (1.31.1
    checked) for CUDA 13; every one links TensorRT 10: `libnvinfer.so.10`, `libnvonnxparser.so.10`
    (1.22 also `libnvinfer_plugin.so.10`). TensorRT 11 libraries do not satisfy them.
  * `trt_bf16_enable` first appears in 1.23.0 (absent from 1.22.0); older versions reject it.
  * there is no strongly typed option: the EP builds weakly typed networks (`trt_fp16_enable`).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.engines.tensorrt import tensorrt_cuda_major
from runtime.engines.trt_plans import DEFAULT_PROMPT_CHUNKS, SUBDIR, ShapeRange, network_profile
from runtime.errors import BackendError
from runtime.folder.manifest import Manifest
from runtime.folder.networks import PRECISIONS, float_dtype

ORT_CACHE_SUBDIR = f"{SUBDIR}/ort-cache"
TENSORRT_EP = "TensorrtExecutionProvider"
# onnxruntime-gpu's TensorRT provider links these (TensorRT 10; see the module docstring).
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")
BF16_MIN_ORT = (1, 23)  # first onnxruntime-gpu whose TensorRT EP takes trt_bf16_enable
ORT_INSTALL = {12: "pip install 'sd-runtime[ort-tensorrt-cu12]'", 13: "pip install 'sd-runtime[ort-tensorrt-cu13]'"}


class TensorRTLibrariesMissing(BackendError):
    """ONNX Runtime's TensorRT provider cannot find TensorRT 10's libraries for its CUDA."""


def version_tuple(version: str) -> tuple[int, ...]:
    """(1, 23, 0) from "1.23.0" (pre-release and local suffixes dropped)."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def ort_cuda_major(ort: Any) -> int | None:
    """The CUDA major an onnxruntime-gpu build links (its `capi/build_and_package_info.cuda_version`)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        info = getattr(getattr(ort, "capi", None), "build_and_package_info", None)
    version = getattr(info, "cuda_version", None)
    return int(version.split(".")[0]) if version else None


def load_tensorrt_libraries(ort: Any) -> None:
    """Make TensorRT 10's libraries loadable for ORT's TensorRT provider before a session asks for it.

    The tensorrt-cu1x-libs wheels keep them in site-packages/tensorrt_libs, off the loader's search
    path; importing `tensorrt_libs` loads every library it ships into the process (NVIDIA/TensorRT
    python/packaging/libs_wheel/tensorrt_libs/__init__.py), and the loader then resolves the
    provider's `libnvinfer.so.10` to the one already loaded. Raises `TensorRTLibrariesMissing`
    naming what is missing and the extra that installs it."""
    try:
        import tensorrt_libs  # noqa: F401  (loading it is the point)
    except ImportError:
        pass  # a system TensorRT (Debian packages, LD_LIBRARY_PATH) is found by the loader itself
    major = ort_cuda_major(ort)
    trt_major = tensorrt_cuda_major()
    missing = []
    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError as e:
            missing.append(f"{name} ({e})")
    install = ORT_INSTALL.get(major, "install TensorRT 10 for onnxruntime-gpu's CUDA")
    if missing:
        raise TensorRTLibrariesMissing(
            f"ONNX Runtime's TensorRT execution provider needs TensorRT 10's libraries for CUDA {major or '?'}, and "
            f"these do not load: {'; '.join(missing)}. TensorRT 11 does not provide them. {install}")
    if major and trt_major and major != trt_major:
        raise TensorRTLibrariesMissing(
            f"onnxruntime-gpu {ort.__version__} is built for CUDA {major}, the installed TensorRT wheels for CUDA "
            f"{trt_major}; they cannot share a process. {install}")


def shapes_option(profile: Mapping[str, ShapeRange], which: str) -> str:
    """One of ORT's `trt_profile_{min,opt,max}_shapes` strings, e.g. "sample:2x4x64x64,timestep:2"."""
    if which not in ("min", "opt", "max"):
        raise ValueError(f"which must be 'min', 'opt' or 'max'; got {which!r}")
    return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(r, which))}" for name, r in profile.items())


def ort_tensorrt_provider_options(engine_dir: str | os.PathLike, manifest: Manifest, network: str, *,
                                  precision: str | None = None, device_id: int = 0, optimization_level: int = 3,
                                  workspace_gib: float | None = None, guidance: bool = True,
                                  max_prompt_chunks: int = DEFAULT_PROMPT_CHUNKS,
                                  cuda_graph: bool = False, ort_version: str | None = None) -> dict[str, Any]:
    """TensorRT EP options for `network` of the engine folder. `precision` defaults to the
    manifest's: "fp16" enables TensorRT's fp16 kernels (with LayerNorm kept in fp32), "bf16" its
    bf16 kernels (`trt_bf16_enable`: onnxruntime-gpu >= 1.23 only; `ort_version`, by default the
    installed one, is checked and an older one refused), "fp32" neither. The graph's I/O dtypes are
    whatever the engine folder's graphs have. `cuda_graph` needs every node on TensorRT and fixed
    shapes (OrtEngine binds device buffers and refuses a second shape)."""
    graph_precision = manifest.networks.get(network, {}).get("precision", manifest.precision)
    if precision is None:  # the folder's, but fp32 for the graphs an fp16 folder keeps in fp32 (the VAE)
        precision = "fp32" if manifest.precision == "fp16" and graph_precision == "fp32" else manifest.precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        have = ort_version or installed_ort_version()
        if version_tuple(have) < BF16_MIN_ORT:
            raise BackendError(f"TensorRT EP bf16 (trt_bf16_enable) needs onnxruntime-gpu >= "
                               f"{'.'.join(map(str, BF16_MIN_ORT))}; this is onnxruntime {have}, whose TensorRT EP "
                               "rejects the option. Upgrade onnxruntime-gpu, or use precision='fp16' or 'fp32'")
    if float_dtype(graph_precision) == "float16" and precision != "fp16":
        raise ValueError(f"the graphs are fp16; TensorRT EP precision {precision!r} needs fp32 graphs")
    cache = str(Path(engine_dir) / ORT_CACHE_SUBDIR)
    profile = network_profile(network, manifest.dims, manifest.shapes, graph_precision,
                              guidance=guidance, max_prompt_chunks=max_prompt_chunks)
    options: dict[str, Any] = {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_engine_cache_prefix": network,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_builder_optimization_level": optimization_level,
        "trt_fp16_enable": precision == "fp16",
        "trt_profile_min_shapes": shapes_option(profile, "min"),
        "trt_profile_opt_shapes": shapes_option(profile, "opt"),
        "trt_profile_max_shapes": shapes_option(profile, "max"),
    }
    if precision == "fp16":
        options["trt_layer_norm_fp32_fallback"] = True
    if precision == "bf16":
        options["trt_bf16_enable"] = True
    if workspace_gib is not None:
        options["trt_max_workspace_size"] = int(workspace_gib * (1 << 30))
    if cuda_graph:
        options["trt_cuda_graph_enable"] = True
    return options


def ort_tensorrt_providers(engine_dir: str | os.PathLike, manifest: Manifest, network: str,
                           **options: Any) -> list[Any]:
    """The providers list for `OrtEngine`: TensorRT EP first, then CUDA for the nodes TensorRT
    does not take, then CPU. Creates the cache folder."""
    trt_options = ort_tensorrt_provider_options(engine_dir, manifest, network, **options)
    (Path(engine_dir) / ORT_CACHE_SUBDIR).mkdir(parents=True, exist_ok=True)
    return [
        (TENSORRT_EP, trt_options),
        ("CUDAExecutionProvider", {"device_id": trt_options["device_id"]}),
        "CPUExecutionProvider",
    ]
