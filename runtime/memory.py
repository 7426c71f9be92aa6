"""How much memory a request will take, estimated before it runs, so that a request this machine
cannot hold is refused with a PipelineError instead of the process being killed by the OS.

    estimate = MARGIN * (WEIGHTS_FACTOR[backend] * weights + activations)

- weights: the bytes of the graph files the pipeline holds (text encoder, U-Net, VAE decoder; the VAE
  encoder too for img2img / inpaint), times what the backend holds per byte of graph.
- activations of batch b at h x w pixels, n = (h / s) * (w / s) latent positions (s: vae_scale_factor):
    U-Net        b_u * (UNET_LINEAR * n + UNET_ATTENTION * n^2)     b_u = 2b under guidance
    VAE decoder  b * (VAE_LINEAR * n + VAE_ATTENTION * n^2)
  The n^2 terms are self-attention score matrices (the U-Net's at the latent resolution, the VAE
  mid-block's); they dominate from 512 px on. Every CPU backend releases a stage's buffers when it
  ends (ONNX Runtime shrinks its arena after each run), so the largest stage counts.
  For other model sizes both terms scale with `scale`, the square root of the ratio of the folder's
  U-Net parameters to SD 1.5's (activations grow with channel counts, parameters with their square),
  so the tiny test models estimate tiny.

Calibration (docs/security.md, benchmarks/results/memory-sd15.json): peak resident memory of SD 1.5
(fp32 graphs) one network at a time and end to end, ONNX Runtime and OpenVINO (f32) on CPU. The
fitted terms are within 10% of the per-network peaks at 256-640 px; the estimate lies 22-23% above
every end-to-end peak on ONNX Runtime and 18-49% above OpenVINO f32's (OpenVINO's activations grow
less with the size than ONNX Runtime's; at bf16 its weights take half as much again). TensorRT holds its weights and activations on the GPU (bounded by its
plans' profiles): no host estimate. The limit defaults to the machine's memory: physical RAM, or the
cgroup v2 limit (`/sys/fs/cgroup/memory.max`) where that is lower.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import PipelineError

__all__ = ["MemoryModel", "machine_memory", "memory_limit"]

GiB = 1 << 30
# Bytes held per byte of graph weights, measured on SD 1.5 fp32 (4.13 GB of graphs for txt2img): ONNX
# Runtime's resident set after loading 4.13 GB; OpenVINO f32 holds its compiled copy only (the mapped
# source pages are handed back: runtime/engines/mapped_weights.py), 4.55 GB at its 256 px peak; the
# PyTorch reference holds the fp32 weights as ONNX Runtime does. Other registered backends get the
# largest.
WEIGHTS_FACTOR = {"onnxruntime": 1.08, "openvino": 1.08, "torch": 1.08}
STAGES_ADD_UP = {"onnxruntime": False, "openvino": False, "torch": False}
NO_HOST_ESTIMATE = ("tensorrt",)
# Activation bytes per latent position (n) and per pair of positions (n^2), per image in the batch;
# least-squares fits to ONNX Runtime's SD 1.5 peaks at 256, 512 and 640 px (U-Net batch 2, VAE decoder
# batch 1), rounded up.
UNET_LINEAR = 18_000.0
UNET_ATTENTION = 70.0
VAE_LINEAR = 200_000.0
VAE_ATTENTION = 25.0
MARGIN = 1.15  # the fits' spread at 256 px, and allocator slack
# The SD 1.5 U-Net: 859.5 M parameters (3.44 GB of fp32 ONNX weights), the reference of `scale`.
SD15_UNET_PARAMETERS = 859_520_964
BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 4, "fp16": 2}  # bf16 folders hold fp32 graphs
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


@dataclass(frozen=True)
class MemoryModel:
    """What the estimate needs of a folder and a backend."""

    weights: int  # text encoder + U-Net + VAE decoder graphs and their external data
    encoder_weights: int  # the VAE encoder's (held from the first img2img / inpaint on)
    scale: float  # sqrt(U-Net parameters / SD 1.5's)
    vae_scale_factor: int = 8  # pixels per latent position along each axis
    backend: str = "onnxruntime"

    @classmethod
    def from_folder(cls, engine_dir: str | os.PathLike, manifest: Any, backend: str) -> "MemoryModel | None":
        """The model of a folder run by `backend`; None where the host holds little (TensorRT)."""
        if backend in NO_HOST_ESTIMATE:
            return None
        sizes = {}
        for name, entry in manifest.networks.items():
            files = {entry["file"], entry.get("external_data")} - {None}
            sizes[name] = sum(_size(engine_dir, manifest, rel) for rel in files)
        precision = manifest.networks.get("unet", {}).get("precision", manifest.precision)
        parameters = sizes.get("unet", 0) / BYTES_PER_PARAMETER.get(precision, 4)
        return cls(weights=sum(sizes.get(n, 0) for n in ("text_encoder", "unet", "vae_decoder")),
                   encoder_weights=sizes.get("vae_encoder", 0), scale=math.sqrt(parameters / SD15_UNET_PARAMETERS),
                   vae_scale_factor=manifest.dims.vae_scale_factor, backend=backend)

    def estimate(self, batch: int, height: int, width: int, *, guided: bool, encodes: bool) -> int:
        """Peak bytes of a request: `batch` images of height x width pixels, `guided` (classifier-free
        guidance doubles the U-Net batch), `encodes` (img2img / inpaint also run the VAE encoder)."""
        n = (height // self.vae_scale_factor) * (width // self.vae_scale_factor)
        unet = (2 * batch if guided else batch) * (UNET_LINEAR * n + UNET_ATTENTION * n * n)
        vae = batch * (VAE_LINEAR * n + VAE_ATTENTION * n * n)
        activations = self.scale * (unet + vae if STAGES_ADD_UP.get(self.backend, True) else max(unet, vae))
        weights = self.weights + (self.encoder_weights if encodes else 0)
        factor = WEIGHTS_FACTOR.get(self.backend, max(WEIGHTS_FACTOR.values()))
        return int(MARGIN * (factor * weights + activations))


def _size(engine_dir: str | os.PathLike, manifest: Any, rel: str) -> int:
    record = manifest.files.get(rel)
    if isinstance(record, dict) and isinstance(record.get("size"), int):
        return record["size"]
    try:
        return (Path(engine_dir) / rel).stat().st_size
    except OSError:
        return 0


def machine_memory() -> int:
    """Bytes of memory this process may use: physical RAM, or the cgroup v2 limit where lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        text = CGROUP_MEMORY_MAX.read_text().strip()
    except OSError:
        return total
    return min(total, int(text)) if text.isdigit() else total


def memory_limit(max_memory_gb: float | None) -> int | None:
    """The limit in bytes for `max_memory_gb` (GiB): None means this machine's memory, inf no limit."""
    if max_memory_gb is None:
        return machine_memory()
    if isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, (int, float)) or not max_memory_gb > 0:
        raise PipelineError(f"max_memory_gb must be a positive number of GiB (inf: no limit); got {max_memory_gb!r}")
    return None if math.isinf(max_memory_gb) else int(max_memory_gb * GiB)
