"""The engine folder's `manifest.json`: what the runtime needs to run a model with no torch and no
source checkpoint. Written by `build-engine` (export/build.py), read by the runtime.

Schema (format version 1):
{
  "format_version": 1,
  "family": "sd1" | "sd2" | "sd1-inpaint" | "sd2-inpaint",
  "dims": {"latent_channels", "unet_in_channels", "vae_scale_factor", "text_hidden_size", "text_max_length"},
  "scaling_factor": 0.18215,
  "prediction_type": "epsilon" | "v_prediction" | "sample",
  "scheduler": {...},                  # the diffusers scheduler_config.json dict
  "tokenizer": {"dir": "tokenizer", "pad_token": "<|endoftext|>" | "!"},
  "default_size": [height, width],     # pixels: U-Net sample_size * vae_scale_factor
  "shapes": {"min_batch", "opt_batch", "max_batch", "min_image", "opt_image", "max_image"},
  "precision": "fp32" | "fp16" | "bf16",
  "networks": {name: {"file": "unet.onnx", "external_data": "unet.onnx.data" | null,
                      "precision": "fp32", "sha256": "...", "parity": {...}}},
  "backends": {"tensorrt": {...},         # engine files of other backends, per backend
               "openvino": {"unet_int8": {"file", "weights", "sha256", "weights_sha256", "calibration",
                                          "parity", ...}}},   # build-engine --quantize int8
  "source": {"kind": "preset" | "diffusers" | "single_file", "path": "...", "sha256": "..."},
  "tools": {"torch": "...", "onnx": "...", ...},
  "created": "ISO 8601 time"
}
Image sizes in "shapes" bound both height and width, in pixels; batch counts images (the U-Net's
engine batch is doubled under classifier-free guidance).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.networks import NETWORKS, PRECISIONS, ModelDims

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAMILIES = ("sd1", "sd2", "sd1-inpaint", "sd2-inpaint")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SHAPE_KEYS = ("min_batch", "opt_batch", "max_batch", "min_image", "opt_image", "max_image")


class ManifestError(ValueError):
    """An engine folder or its manifest is missing, malformed or of an unknown version."""


@dataclass(frozen=True)
class Manifest:
    family: str
    dims: ModelDims
    scaling_factor: float
    prediction_type: str
    scheduler: dict[str, Any]
    tokenizer: dict[str, Any]
    default_size: tuple[int, int]
    shapes: dict[str, int]
    precision: str
    networks: dict[str, dict[str, Any]]
    backends: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "family": self.family,
            "dims": vars(self.dims).copy(),
            "scaling_factor": self.scaling_factor,
            "prediction_type": self.prediction_type,
            "scheduler": self.scheduler,
            "tokenizer": self.tokenizer,
            "default_size": list(self.default_size),
            "shapes": self.shapes,
            "precision": self.precision,
            "networks": self.networks,
            "backends": self.backends,
            "source": self.source,
            "tools": self.tools,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: unknown format_version {version!r}; this runtime reads version {FORMAT_VERSION}. "
                "Rebuild the engine folder with this version's build-engine."
            )
        required = ("family", "dims", "scaling_factor", "prediction_type", "scheduler", "tokenizer",
                    "default_size", "shapes", "precision", "networks")
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing keys {', '.join(missing)}")
        if d["family"] not in FAMILIES:
            raise ManifestError(f"{where}: unknown family {d['family']!r}; expected one of {', '.join(FAMILIES)}")
        if d["prediction_type"] not in PREDICTION_TYPES:
            raise ManifestError(f"{where}: unknown prediction_type {d['prediction_type']!r}; "
                                f"expected one of {', '.join(PREDICTION_TYPES)}")
        if d["precision"] not in PRECISIONS:
            raise ManifestError(f"{where}: unknown precision {d['precision']!r}; expected one of {', '.join(PRECISIONS)}")
        try:
            dims = ModelDims(**d["dims"])
        except TypeError as e:
            raise ManifestError(f"{where}: bad 'dims' {d['dims']!r}: {e}") from None
        missing_shapes = [k for k in SHAPE_KEYS if k not in d["shapes"]]
        if missing_shapes:
            raise ManifestError(f"{where}: 'shapes' lacks {', '.join(missing_shapes)}")
        unknown = [n for n in d["networks"] if n not in NETWORKS]
        if unknown:
            raise ManifestError(f"{where}: unknown networks {', '.join(unknown)}; expected {', '.join(NETWORKS)}")
        return cls(
            family=d["family"], dims=dims, scaling_factor=float(d["scaling_factor"]),
            prediction_type=d["prediction_type"], scheduler=dict(d["scheduler"]), tokenizer=dict(d["tokenizer"]),
            default_size=tuple(d["default_size"]), shapes={k: int(d["shapes"][k]) for k in SHAPE_KEYS},
            precision=d["precision"], networks=dict(d["networks"]), backends=dict(d.get("backends", {})),
            source=dict(d.get("source", {})), tools=dict(d.get("tools", {})), created=d.get("created", ""),
        )


def load_manifest(engine_dir: str | os.PathLike) -> Manifest:
    """Read and validate `engine_dir/manifest.json`, and check that every network file it names exists."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise ManifestError(f"engine folder {engine_dir} does not exist")
    path = engine_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{engine_dir} is not an engine folder: it has no {MANIFEST_NAME}. "
                            "Build one with `build-engine SOURCE --out DIR`.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    manifest = Manifest.from_dict(data, where=str(path))
    for name, entry in manifest.networks.items():
        for key in ("file", "external_data"):
            rel = entry.get(key)
            if rel and not (engine_dir / rel).is_file():
                raise ManifestError(f"{engine_dir}: network {name!r} names {key} {rel!r}, which is missing")
    return manifest


def write_manifest(engine_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the manifest atomically (temporary file, then rename)."""
    engine_dir = Path(engine_dir)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    # open(..., "x") honours the umask (mkstemp would make the manifest private, 0600)
    tmp = engine_dir / f".manifest.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, engine_dir / MANIFEST_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return engine_dir / MANIFEST_NAME
