"""TensorRT plans without TensorRT: the pure functions the build (export/tensorrt.py) and the
runtime (runtime/engines/tensorrt.py, runtime/engines/ort_tensorrt.py) share, here because the
runtime must not import `export/`: the optimization profile derived from the manifest's shape range
and the network contract, and the plan cache key with the decision whether a stored plan may be
used on this machine. A plan is tied to the exact TensorRT version and the GPU's compute capability
that built it; a plan that does not match is rebuilt, never deserialized blindly.

Imports neither tensorrt nor cuda-python (nor torch): it runs, and is tested, on any machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime.errors import EngineInputError
from runtime.folder.networks import GUIDED_NETWORKS, ModelDims, base_network, network_io

SUBDIR = "tensorrt"  # under the engine folder: plans, their keys, the timing cache, ORT's cache
KEY_FORMAT = 1
# Long prompts are encoded in 77-token chunks and concatenated; plans accept up to this many
# chunks (231 tokens) unless built with another `max_prompt_chunks`.
DEFAULT_PROMPT_CHUNKS = 3


class ProfileRangeError(EngineInputError):
    """An input shape is outside the plan's optimization profile."""


# --- optimization profiles (pure) ---------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ShapeRange":
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max))


def axis_ranges(network: str, dims: ModelDims, shapes: Mapping[str, int], *, guidance: bool = True,
                max_prompt_chunks: int = DEFAULT_PROMPT_CHUNKS) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic axis of `network` for the manifest's shape range.

    `shapes` holds min/opt/max batch (images) and image size (pixels, bounding height and width).
    Under classifier-free guidance the U-Net runs [uncond, cond] in one batch, so its batch spans
    min_batch (guidance off) to 2 * max_batch, optimal 2 * opt_batch. The text encoder runs one
    77-token chunk position of the prompts (or of the negative prompts) at a time
    (runtime/text/tokens.py), so its batch is the image batch. The U-Net's `tokens` runs from one chunk
    (77) to `max_prompt_chunks` chunks. The step-cache U-Nets (unet_deep, unet_shallow) take the
    U-Net's batch, and their cached feature's size is the latent size halved `dims.cache_level`
    times, rounded up (runtime/folder/networks.py)."""
    s = dims.vae_scale_factor
    lo_img, opt_img, hi_img = shapes["min_image"], shapes["opt_image"], shapes["max_image"]
    lo_b, opt_b, hi_b = shapes["min_batch"], shapes["opt_batch"], shapes["max_batch"]
    if not (1 <= lo_b <= opt_b <= hi_b):
        raise ValueError(f"batch range must satisfy 1 <= min <= opt <= max; got {lo_b}, {opt_b}, {hi_b}")
    if not (s <= lo_img <= opt_img <= hi_img):
        raise ValueError(f"image range must satisfy {s} <= min <= opt <= max; got {lo_img}, {opt_img}, {hi_img}")
    if max_prompt_chunks < 1:
        raise ValueError(f"max_prompt_chunks must be >= 1; got {max_prompt_chunks}")
    batch = (lo_b, 2 * opt_b, 2 * hi_b) if base_network(network) in GUIDED_NETWORKS and guidance else (lo_b, opt_b, hi_b)
    # latent sizes: round the lower bound up and the upper bound down to whole latents
    latent = (-(-lo_img // s), max(opt_img // s, -(-lo_img // s)), hi_img // s)
    image = tuple(v * s for v in latent)
    down = 2 ** dims.cache_level
    cache = tuple(-(-v // down) for v in latent)
    tokens = dims.text_max_length
    return {
        "batch": batch,
        "height": image, "width": image,
        "latent_height": latent, "latent_width": latent,
        "cache_height": cache, "cache_width": cache,
        "tokens": (tokens, tokens, tokens * max_prompt_chunks),
        # ControlNet residuals below the first level (runtime/folder/networks.py control_residual_specs)
        **{f"res_{a}_{level}": tuple(-(-v // 2 ** level) for v in latent)
           for level in range(1, len(dims.block_out_channels)) for a in ("height", "width")},
    }


def network_profile(network: str, dims: ModelDims, shapes: Mapping[str, int], precision: str = "fp32", *,
                    guidance: bool = True, max_prompt_chunks: int = DEFAULT_PROMPT_CHUNKS) -> dict[str, ShapeRange]:
    """The optimization profile of `network`: a (min, opt, max) shape per input, from the network
    contract's symbolic axes and `axis_ranges`."""
    ranges = axis_ranges(network, dims, shapes, guidance=guidance, max_prompt_chunks=max_prompt_chunks)
    inputs, _ = network_io(network, dims, precision)
    profile = {}
    for spec in inputs:
        pick = [tuple(d if isinstance(d, int) else ranges[d][i] for d in spec.shape) for i in range(3)]
        profile[spec.name] = ShapeRange(*pick)
    return profile


def profile_to_json(profile: Mapping[str, ShapeRange]) -> dict[str, dict[str, list[int]]]:
    return {name: r.to_json() for name, r in profile.items()}


def check_profile(network: str, feeds_shapes: Mapping[str, tuple[int, ...]], profile: Mapping[str, ShapeRange]) -> None:
    """Raise `ProfileRangeError` naming the input, its shape and the plan's range if any input
    lies outside the optimization profile."""
    for name, shape in feeds_shapes.items():
        r = profile.get(name)
        if r is not None and not r.contains(tuple(shape)):
            raise ProfileRangeError(
                f"{network} (tensorrt): input {name!r} has shape {tuple(shape)}, outside the plan's optimization "
                f"profile min {r.min} .. max {r.max} (optimal {r.opt}); rebuild the plans with a wider shape range "
                "(build-engine --tensorrt with larger --max-batch / --max-image) or use another backend")


# --- plan cache keys (pure) ---------------------------------------------------------------------------

def plan_key(network: str, *, onnx_sha256: str, tensorrt_version: str, compute_capability: str, precision: str,
             profile: Mapping[str, ShapeRange], strongly_typed: bool, optimization_level: int) -> dict[str, Any]:
    """Everything a plan depends on. Plans are cached under a hash of this dict."""
    return {
        "format": KEY_FORMAT,
        "network": network,
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": tensorrt_version,
        "compute_capability": compute_capability,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "optimization_level": optimization_level,
        "profile": profile_to_json(profile),
    }


def key_hash(key: Mapping[str, Any]) -> str:
    """Short stable hash of a key (canonical JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def plan_paths(network: str, key: Mapping[str, Any]) -> tuple[str, str]:
    """(plan, key JSON) file paths relative to the engine folder."""
    h = key_hash(key)
    return f"{SUBDIR}/{network}.{h}.plan", f"{SUBDIR}/{network}.{h}.json"


def stale_reasons(stored: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> list[str]:
    """Why a plan built under key `stored` may not stand in for one built under `wanted` (empty:
    reuse it). The build decides on this; see `runtime_mismatch` for the load-time check."""
    if stored is None:
        return ["no plan has been built"]
    labels = {
        "format": "key format", "network": "network", "onnx_sha256": "ONNX graph (sha256)",
        "tensorrt_version": "TensorRT version", "compute_capability": "GPU compute capability",
        "precision": "precision", "strongly_typed": "typing mode", "optimization_level": "builder optimization level",
        "profile": "optimization profile",
    }
    reasons = []
    for field, label in labels.items():
        if stored.get(field) != wanted.get(field):
            reasons.append(f"{label}: plan has {_short(stored.get(field))}, wanted {_short(wanted.get(field))}")
    return reasons


def runtime_mismatch(stored: Mapping[str, Any], tensorrt_version: str, compute_capability: str) -> list[str]:
    """Why a plan built under key `stored` cannot be deserialized here (empty: it can). Plans are
    neither portable across TensorRT versions nor across GPU architectures."""
    reasons = []
    if stored.get("tensorrt_version") != tensorrt_version:
        reasons.append(f"it was built with TensorRT {stored.get('tensorrt_version')}, "
                       f"this machine runs {tensorrt_version}")
    if stored.get("compute_capability") != compute_capability:
        reasons.append(f"it was built for compute capability {stored.get('compute_capability')}, "
                       f"this GPU has {compute_capability}")
    return reasons


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
