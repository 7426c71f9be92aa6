"""ONNX Runtime's TensorRT execution provider as a route to TensorRT: provider options for
`OrtEngine(..., providers=...)`, with ORT's engine and timing caches under
`ENGINE_DIR/tensorrt/ort-cache` and the same optimization profile as our own plans
(`runtime.engines.tensorrt.network_profile`).

Option names and formats are those of the ONNX Runtime TensorRT EP documentation
(onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html): `trt_profile_*_shapes`
take "input1:d1xd2x...,input2:...", the explicit profile must cover every dynamic input, and with
the engine cache enabled ORT compares it with the cached `.profile` to decide on a rebuild.
Pure functions apart from `ort_tensorrt_providers`, which also creates the cache folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.engines.tensorrt import DEFAULT_PROMPT_CHUNKS, SUBDIR, ShapeRange, network_profile
from runtime.manifest import Manifest
from runtime.networks import PRECISIONS, float_dtype

ORT_CACHE_SUBDIR = f"{SUBDIR}/ort-cache"


def shapes_option(profile: Mapping[str, ShapeRange], which: str) -> str:
    """One of ORT's `trt_profile_{min,opt,max}_shapes` strings, e.g. "sample:2x4x64x64,timestep:2"."""
    if which not in ("min", "opt", "max"):
        raise ValueError(f"which must be 'min', 'opt' or 'max'; got {which!r}")
    return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(r, which))}" for name, r in profile.items())


def ort_tensorrt_provider_options(engine_dir: str | os.PathLike, manifest: Manifest, network: str, *,
                                  precision: str | None = None, device_id: int = 0, optimization_level: int = 3,
                                  workspace_gib: float | None = None, guidance: bool = True,
                                  max_prompt_chunks: int = DEFAULT_PROMPT_CHUNKS,
                                  cuda_graph: bool = False) -> dict[str, Any]:
    """TensorRT EP options for `network` of the engine folder. `precision` defaults to the
    manifest's: "fp16" enables TensorRT's fp16 kernels (with LayerNorm kept in fp32), "bf16" its
    bf16 kernels (ORT >= 1.20 with TensorRT >= 10), "fp32" neither. The graph's I/O dtypes are
    whatever the engine folder's graphs have."""
    precision = precision or manifest.precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    graph_precision = manifest.networks.get(network, {}).get("precision", manifest.precision)
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
    (Path(engine_dir) / ORT_CACHE_SUBDIR).mkdir(parents=True, exist_ok=True)
    trt_options = ort_tensorrt_provider_options(engine_dir, manifest, network, **options)
    return [
        ("TensorrtExecutionProvider", trt_options),
        ("CUDAExecutionProvider", {"device_id": trt_options["device_id"]}),
        "CPUExecutionProvider",
    ]
