"""PyTorch reference engine: runs the reference networks (export/) behind the `Engine` interface,
with the same signature wrappers the ONNX export uses, for parity checks of the other backends.

The model comes from the manifest's source: a preset with its seed (random weights), or the source
path, whose sha256 must still match the one recorded at build time. torch is imported lazily; the
loaded model is shared by the four networks of a folder (the last folder opened is kept).
Computation is float32 (on `device`, default CPU); inputs and outputs keep the graph's dtypes.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines import EngineLoadError
from runtime.engines.base import Engine
from runtime.manifest import Manifest
from runtime.networks import TensorSpec, network_io

BACKEND = "torch"


def is_available() -> tuple[bool, str]:
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed; pip install 'sd-runtime[export]'"
    if importlib.util.find_spec("export") is None:
        return False, "the export package (reference models) is not importable"
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
    return load_source({**identity, "seed": source.get("seed", 0)}, prediction_type)


class TorchEngine(Engine):
    backend = BACKEND

    def __init__(self, module: Any, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 *, device: str = "cpu", threads: int | None = None):
        super().__init__(name, inputs, outputs)
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.module = module.to(self.device)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = []
        for spec in self.inputs:
            arr = feeds[spec.name]
            arr = arr.astype(np.float32) if arr.dtype == np.float16 else arr
            args.append(torch.from_numpy(np.ascontiguousarray(arr)).to(self.device))
        with torch.no_grad():
            out = self.module(*args)
        out = (out,) if isinstance(out, torch.Tensor) else out
        return {spec.name: t.float().cpu().numpy().astype(spec.dtype, copy=False) for spec, t in zip(self.outputs, out)}


# keyword options open_engine takes (checked by runtime.engines.open_engines before opening anything)
OPTIONS = ("device", "threads")


def open_engine(engine_dir: str | os.PathLike, manifest: Manifest, network: str, **options: Any) -> TorchEngine:
    """The reference `network` for an engine folder. Options: device ("cpu", "cuda", ...), threads."""
    from export.onnx_export import wrap

    if network not in manifest.networks:
        raise EngineLoadError(f"{engine_dir}: the manifest has no network {network!r}")
    model = _reference_model(json.dumps(manifest.source, sort_keys=True), manifest.prediction_type)
    inputs, outputs = network_io(network, manifest.dims, manifest.networks[network].get("precision", manifest.precision))
    return TorchEngine(wrap(network, model), network, inputs, outputs, **options)
