"""PyTorch reference engine: runs the reference networks (export/) behind the runtime's `Engine`
interface, with the same signature wrappers the ONNX export uses, for parity checks of the other
backends. It lives in export/ because it needs torch and the reference models; the torch-free
runtime discovers it as backend "torch" through the `sd_runtime.engines` entry point
(pyproject.toml), and never imports it by name.

The model comes from the manifest's source: a preset with its seed (random weights), or the source
path, whose sha256 must still match the one recorded at build time. torch is imported lazily; the
loaded model is shared by the four networks of a folder (the last folder opened is kept); an
engine on another device or dtype works on its own copy of its network.

Options: `device` ("cpu", "cuda", "cuda:1", ...) and `dtype`: "fp32" (the reference; on CUDA with
TF32 off in cuDNN convolutions, and torch's matmul TF32 default, off), "fp16" or "bf16", computed
as the project's fp16 graphs are (export/fp16.py: the network in that dtype, its GroupNorm and
LayerNorm in float32, the timestep embedding in float32), so a GPU machine can check exported graphs
and engines against a GPU reference. Inputs and outputs keep the graph's dtypes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines.base import Engine, EngineInfo
from runtime.errors import BackendError, EngineLoadError
from runtime.folder.manifest import Manifest
from runtime.folder.networks import TINY_VAE_NETWORKS, TensorSpec, float_precision, network_io

BACKEND = "torch"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def is_available() -> tuple[bool, str]:
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed; pip install 'sd-runtime[export]'"
    return True, ""


@functools.lru_cache(maxsize=1)
def _reference_model(source_json: str, prediction_type: str) -> Any:
    from export.build import load_source, source_identity

    source = json.loads(source_json)
    if source.get("kind") == "preset" and source.get("preset") != "tiny":
        identity = source
    else:
        if not source.get("path") or not Path(source["path"]).exists():
            raise EngineLoadError(f"the torch backend needs the model source, but {source.get('path')!r} is gone")
        identity = source_identity(source["path"])
        if identity["sha256"] != source.get("sha256"):
            raise EngineLoadError(f"{source['path']} changed since the engine folder was built (sha256 "
                                  f"{identity['sha256'][:12]}..., manifest {str(source.get('sha256'))[:12]}...)")
    model = load_source({**identity, "seed": source.get("seed", 0)}, prediction_type)
    from export.adapters import apply_recorded
    from export.build import load_controlnets
    from export.loading.vae_source import apply_recorded_vae

    model = apply_recorded_vae(apply_recorded(model, source), source)  # LoRAs, embeddings, --vae as built
    return load_controlnets(model, source.get("controlnets", ()), progress=lambda line: None)  # its ControlNets


class TorchEngine(Engine):
    """A reference module in inference mode; forward passes under no_grad are thread-safe."""

    backend = BACKEND
    parallel = True

    def __init__(self, module: Any, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 *, device: str = "cpu", threads: int | None = None, dtype: str = "fp32"):
        super().__init__(name, inputs, outputs)
        import torch

        if dtype not in DTYPES:
            raise BackendError(f"torch engine dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"device {device!r}: torch {torch.__version__} sees no CUDA device here (a CPU build, "
                               "no NVIDIA driver, or a driver older than this torch's CUDA "
                               f"{torch.version.cuda or 'none'})")
        if threads:
            torch.set_num_threads(threads)
        self.dtype = dtype
        self.compute_dtype = getattr(torch, DTYPES[dtype])
        if dtype != "fp32" or self.device.type != "cpu":
            module = copy.deepcopy(module)  # the cached reference model stays float32 on the CPU for others
        if dtype != "fp32":
            from export.fp16 import reduced_precision

            reduced_precision(module, self.compute_dtype)
        self.module = module.to(self.device).eval()

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(BACKEND, self.name, float_precision(self.inputs), self.dtype, True)

    def _close(self) -> None:
        self.module = None

    def _math(self) -> Any:
        """float32 on CUDA as float32: cuDNN's TF32 convolutions off during the call (torch's
        default leaves them on; matmul TF32 is off by default)."""
        import torch

        if self.dtype != "fp32" or self.device.type != "cuda":
            return contextlib.nullcontext()
        b = torch.backends.cudnn
        return b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic, allow_tf32=False)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = []
        for spec in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to(self.device)
            if t.is_floating_point():  # the timestep stays float32, as in every graph
                t = t.float() if spec.name == "timestep" else t.to(self.compute_dtype)
            args.append(t)
        with torch.no_grad(), self._math():
            out = self.module(*args)
        out = (out,) if isinstance(out, torch.Tensor) else out
        return {spec.name: t.float().cpu().numpy().astype(spec.dtype, copy=False) for spec, t in zip(self.outputs, out)}


# keyword options open_engine takes (checked by runtime.engines.open_engines before opening anything)
OPTIONS = ("device", "threads", "dtype")


def open_engine(engine_dir: str | os.PathLike, manifest: Manifest, network: str, **options: Any) -> TorchEngine:
    """The reference `network` for an engine folder. Options: device ("cpu", "cuda", ...), threads,
    dtype ("fp32" | "fp16" | "bf16")."""
    from export.onnx_export import wrap

    if network not in manifest.networks:
        raise EngineLoadError(f"{engine_dir}: the manifest has no network {network!r}")
    model = _reference_model(json.dumps(manifest.source, sort_keys=True), manifest.prediction_type)
    if "source" in manifest.networks[network] and network in TINY_VAE_NETWORKS:  # build-engine --tiny-vae
        from export.loading.taesd import load_tiny_vae, with_tiny_vae

        recorded = manifest.networks[network]["source"]
        tiny = load_tiny_vae(recorded["path"])
        if tiny.identity["sha256"] != recorded["sha256"]:
            raise EngineLoadError(f"{recorded['path']}: the tiny VAE changed since {engine_dir} was built")
        model = with_tiny_vae(model, tiny)
    inputs, outputs = network_io(network, manifest.dims, manifest.networks[network].get("precision", manifest.precision))
    module = wrap(network, model, branch=manifest.networks[network].get("branch"))
    return TorchEngine(module, network, inputs, outputs, **options)
