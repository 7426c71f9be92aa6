"""How much memory a request will take, estimated before it runs, so that a request this machine
cannot hold is refused with a PipelineError instead of the process being killed by the OS.

    estimate = MARGIN * (WEIGHTS_FACTOR[backend] * weights + activations)

- weights: the bytes of the graph files the pipeline holds (every text encoder of the folder's family,
  the U-Net, the VAE decoder; the VAE encoder too for img2img / inpaint), times what the backend holds
  per byte of graph.
- activations of batch b at h x w pixels, n = (h / s) * (w / s) latent positions (s: vae_scale_factor):
    U-Net        b_u * scale * (UNET_LINEAR * n + UNET_ATTENTION * (n / 4^l)^2)    b_u = 2b under guidance
    VAE decoder  b * vae_scale * (VAE_LINEAR * t + VAE_ATTENTION * t^2)
  The squared terms are self-attention score matrices: the U-Net's at its first level with attention, l
  (runtime/families.py `unet_attention_level`: 0 for SD 1.x/2.x, the latent resolution; 1 for SDXL, a
  quarter of the positions), and the VAE mid-block's. They dominate from 512 px on. t = n for a whole
  decode, the positions of one tile for a tiled one (runtime/imaging/tiling.py: tiles run one at a
  time). Every CPU backend releases a stage's buffers when it ends (ONNX Runtime shrinks its arena
  after each run), so the largest stage counts.
  For other model sizes the terms scale with the square root of the ratio of parameters to SD 1.5's
  (activations grow with channel counts, parameters with their square): `scale` the U-Net's,
  `vae_scale` the VAE decoder's (SDXL's VAE is SD 1.5's architecture: 1.0), so the tiny test models
  estimate tiny.

Calibration (docs/security.md, benchmarks/results/memory-sd15.json): peak resident memory of SD 1.5
(fp32 graphs) one network at a time and end to end, ONNX Runtime and OpenVINO (f32) on CPU. The U-Net's
fitted terms are within 10% of its peaks at 256-640 px, the VAE decoder's from 1% under (640 px) to 67%
over (1024 px) its peaks; the estimate lies 23-24% above every end-to-end peak on ONNX Runtime and
21-49% above OpenVINO f32's (OpenVINO's activations grow less with the size than ONNX Runtime's).
Checked on full-size SDXL (benchmarks/results/memory-sdxl.json, one guided image): 4-35% above the peaks
of ONNX Runtime and OpenVINO f32 at 512 and 1024 px (ONNX Runtime's 1024 px peak, 23.4 GB, is the
closest). OpenVINO bf16 peaked at 0.62x of f32's there; the estimate does not know the precision and
counts f32's weights. TensorRT holds its weights and activations on the GPU (bounded by its plans'
profiles): no host estimate. The limit defaults to the machine's memory: physical RAM, or the cgroup v2
limit (`/sys/fs/cgroup/memory.max`) where that is lower.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import PipelineError
from runtime.families import family_of

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
# the U-Net's: a least-squares fit to ONNX Runtime's SD 1.5 peaks at 256, 512 and 640 px (batch 2), rounded
# up. The VAE decoder's (batch 1): above ONNX Runtime's SD 1.5 activations at 256, 512 and 640 px
# (memory-sd15.json: 0.26, 1.08, 2.10 GB) and 1024 px (vae-tiling-sd15-xeon-2cpu.txt: 3.59 GB, of which
# the mid-block's 16384 x 16384 float32 scores are 1.07 GB) within 1% at 640 px, 1.7x above at 1024 px: an
# earlier fit to 256-640 px alone (200 000 and 25) put 10 GB there and refused SDXL's 1024 px image.
UNET_LINEAR = 18_000.0
UNET_ATTENTION = 70.0
VAE_LINEAR = 300_000.0
VAE_ATTENTION = 4.0
MARGIN = 1.15  # the fits' spread at 256 px, and allocator slack
# The SD 1.5 U-Net: 859.5 M parameters (3.44 GB of fp32 ONNX weights), the reference of `scale`; its
# VAE decoder (diffusers AutoencoderKL decoder + post_quant_conv): 49.5 M, the reference of `vae_scale`.
SD15_UNET_PARAMETERS = 859_520_964
SD15_VAE_DECODER_PARAMETERS = 49_490_199
BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 4, "fp16": 2}  # bf16 folders hold fp32 graphs
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


@dataclass(frozen=True)
class MemoryModel:
    """What the estimate needs of a folder and a backend."""

    weights: int  # the text encoders + U-Net + VAE decoder graphs and their external data
    encoder_weights: int  # the VAE encoder's (held from the first img2img / inpaint on)
    scale: float  # sqrt(U-Net parameters / SD 1.5's)
    vae_scale_factor: int = 8  # pixels per latent position along each axis
    backend: str = "onnxruntime"
    vae_scale: float = 1.0  # sqrt(VAE decoder parameters / SD 1.5's)
    attention_level: int = 0  # the U-Net's first level with self-attention (runtime/families.py)

    @classmethod
    def from_folder(cls, engine_dir: str | os.PathLike, manifest: Any, backend: str) -> "MemoryModel | None":
        """The model of a folder run by `backend`; None where the host holds little (TensorRT)."""
        if backend in NO_HOST_ESTIMATE:
            return None
        family = family_of(manifest.family)
        sizes = {}
        for name, entry in manifest.networks.items():
            files = {entry["file"], entry.get("external_data")} - {None}
            sizes[name] = sum(_size(engine_dir, manifest, rel) for rel in files)

        def parameters(network: str) -> float:
            precision = manifest.networks.get(network, {}).get("precision", manifest.precision)
            return sizes.get(network, 0) / BYTES_PER_PARAMETER.get(precision, 4)

        held = {e.network for e in family.text_encoders} | {"unet", "vae_decoder"}
        return cls(weights=sum(sizes.get(n, 0) for n in held), encoder_weights=sizes.get("vae_encoder", 0),
                   scale=math.sqrt(parameters("unet") / SD15_UNET_PARAMETERS),
                   vae_scale_factor=manifest.dims.vae_scale_factor, backend=backend,
                   vae_scale=math.sqrt(parameters("vae_decoder") / SD15_VAE_DECODER_PARAMETERS),
                   attention_level=family.unet_attention_level)

    def estimate(self, batch: int, height: int, width: int, *, guided: bool, encodes: bool,
                 vae_tile: int | None = None) -> int:
        """Peak bytes of a request: `batch` images of height x width pixels, `guided` (classifier-free
        guidance doubles the U-Net batch), `encodes` (img2img / inpaint also run the VAE encoder),
        `vae_tile` (the VAE runs tiles of that many latent pixels a side; None: the whole image)."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        n = h * w
        t = n if vae_tile is None else min(h, vae_tile) * min(w, vae_tile)
        attended = n / 4 ** self.attention_level
        unet = self.scale * (2 * batch if guided else batch) * (UNET_LINEAR * n + UNET_ATTENTION * attended ** 2)
        vae = self.vae_scale * batch * (VAE_LINEAR * t + VAE_ATTENTION * t * t)
        activations = unet + vae if STAGES_ADD_UP.get(self.backend, True) else max(unet, vae)
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
