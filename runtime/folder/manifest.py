"""The engine folder's `manifest.json`: what the runtime needs to run a model with no torch and no
source checkpoint. Written by `build-engine` (export/build.py), read by the runtime.

Schema (format version 1):
{
  "format_version": 1,
  "family": "sd1" | "sd2" | "sd1-inpaint" | "sd2-inpaint" | "sd1-lcm" | "sd2-lcm" | "sdxl" | "sdxl-inpaint"
            | "sdxl-refiner",
  "dims": {"latent_channels", "unet_in_channels", "vae_scale_factor", "text_hidden_size", "text_max_length",
           "time_cond_proj_dim",         # only in LCM folders (their U-Net takes timestep_cond)
           "text_hidden_size_2", "text_embeds_size", "time_ids"},   # only in SDXL folders
                                       # (the refiner: text_hidden_size 0, no text_encoder; time_ids 5)
  "pipeline": {"force_zeros_for_empty_prompt": true},   # SDXL folders only (model_index.json's)
  "scaling_factor": 0.18215,
  "prediction_type": "epsilon" | "v_prediction" | "sample",
  "scheduler": {...},                  # the diffusers scheduler_config.json dict
  "tokenizer": {"dir": "tokenizer", "pad_token": "<|endoftext|>" | "!",
                "tokenizer_2": {"dir": "tokenizer_2", "pad_token": "!", "files": {...}}},  # SDXL only
                                       # (the refiner's one tokenizer: {"dir": "tokenizer_2", ...} at the top)
  "default_size": [height, width],     # pixels: U-Net sample_size * vae_scale_factor
  "shapes": {"min_batch", "opt_batch", "max_batch", "min_image", "opt_image", "max_image"},
  "precision": "fp32" | "fp16" | "bf16",
  "networks": {name: {"file": "unet.onnx", "external_data": "unet.onnx.data" | null,
                      "precision": "fp32", "sha256": "...", "parity": {...}},
               # build-engine --tiny-vae: vae_decoder_tiny / vae_encoder_tiny entries also hold "vae": "tiny",
               # their own "scaling_factor", "latent_magnitude", "latent_shift" and "source"
              },
  "backends": {"tensorrt": {...},         # engine files of other backends, per backend
               "openvino": {"unet_int8": {"file", "weights", "sha256", "weights_sha256", "calibration",
                                          "parity", ...},      # build-engine --quantize int8
                            "weights_int8": {"scheme", "networks": {network: {"file", "weights", ...}},
                                             "parity", ...}}},    # build-engine --quantize int8-weights
  "source": {"kind": "preset" | "diffusers" | "single_file", "path": "...", "sha256": "..."},
  "tools": {"torch": "...", "onnx": "...", ...},
  "created": "ISO 8601 time",
  "defaults": {"steps": 4, "guidance_scale": 8.5, "sampler": "lcm"},   # optional: recommended settings
                                       # (runtime/sampling/defaults.py; build-engine --default-*)
  "files": {"unet.onnx": {"size": 1794141, "sha256": "...", "fingerprint": "..."}, ...}
}                                      # every file the runtime opens (runtime/folder/paths.py); absent in
                                       # folders built before it, which load as "legacy" folders
Image sizes in "shapes" bound both height and width, in pixels; batch counts images (the U-Net's
engine batch is doubled under classifier-free guidance).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime.errors import ManifestError
from runtime.folder.paths import file_records, inside, opened_files
from runtime.folder.networks import (NETWORKS, OPTIONAL_NETWORKS, PRECISIONS, TINY_VAE_NETWORKS, ModelDims,
                                      known_network)
from runtime.sampling.samplers import PREDICTION_TYPES

__all__ = ["FAMILIES", "FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "ManifestError", "PREDICTION_TYPES",
           "load_manifest", "write_manifest"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Model families an engine folder can hold (export/configs.py builds them; the runtime reads them)
FAMILIES = ("sd1", "sd2", "sd1-inpaint", "sd2-inpaint", "sd1-lcm", "sd2-lcm", "sdxl", "sdxl-inpaint", "sdxl-refiner")
# The family whose folder has no first text encoder (dims.text_hidden_size 0): the SDXL refiner
REFINER_FAMILY = "sdxl-refiner"
SHAPE_KEYS = ("min_batch", "opt_batch", "max_batch", "min_image", "opt_image", "max_image")
# Sanity bounds on a manifest's numbers, far above any real folder (SD: 512-1024 px images, batches of a
# few images, 4-9 channels, hidden sizes 768/1024): a stranger's huge value is refused at load instead
# of becoming a terabyte allocation later.
MAX_IMAGE = 16384
MAX_BATCH = 1024
MAX_DIM = 65536
# manifest.json of an SD 1.5 folder is about 6 KB; a larger file than this is not a manifest
MANIFEST_MAX_BYTES = 16 << 20


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
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # runtime/folder/paths.py `file_records`
    # recommended steps / guidance_scale / sampler where the caller gives none (runtime/sampling/defaults.py)
    defaults: dict[str, Any] = field(default_factory=dict)
    # pipeline settings of the source's model_index.json the runtime honours (SDXL:
    # force_zeros_for_empty_prompt); empty, and not written, for other folders
    pipeline: dict[str, Any] = field(default_factory=dict)

    @property
    def int8_unet(self) -> dict[str, Any] | None:
        """The entry of the folder's int8 U-Net for OpenVINO (`build-engine --quantize int8`), or None."""
        return self.backends.get("openvino", {}).get("unet_int8")

    @property
    def weights_int8(self) -> dict[str, Any] | None:
        """The entry of the folder's int8-weight networks for OpenVINO (`build-engine --quantize
        int8-weights`: {"scheme", "networks": {network: {file, weights, ...}}, ...}), or None."""
        return self.backends.get("openvino", {}).get("weights_int8")

    @property
    def quantization(self) -> str | None:
        """The folder's OpenVINO quantization scheme ("int8", "int8-weights"), or None."""
        entry = self.int8_unet or self.weights_int8
        return entry.get("scheme") if entry else None

    @property
    def tiny_vae(self) -> str | None:
        """How the folder runs a request's vae="tiny": "added" (its TINY_VAE_NETWORKS, `build-engine
        --tiny-vae`), "own" (its VAE is itself an AutoencoderTiny), or None (it cannot)."""
        if all(n in self.networks for n in TINY_VAE_NETWORKS):
            return "added"
        return "own" if self.networks.get("vae_decoder", {}).get("vae") == "tiny" else None

    def vae_graph(self, network: str, vae: str = "full", tiling: bool = False) -> str:
        """The graph that runs VAE `network` ("vae_decoder" / "vae_encoder") for a request's `vae` and
        `tiling`: its tiny variant for "tiny" where the folder has one, else the folder's own VAE (or
        its circular-padded variant; a folder whose own VAE is an AutoencoderTiny runs it for both)."""
        if vae == "tiny" and f"{network}_tiny" in self.networks:
            return f"{network}_tiny"
        return f"{network}_tiled" if tiling else network

    def vae_scaling_factor(self, graph: str) -> float:
        """The latent scaling of VAE graph `graph`: its entry's own (a tiny VAE's, from its config), else
        the folder's `scaling_factor`."""
        return float(self.networks.get(graph, {}).get("scaling_factor", self.scaling_factor))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "family": self.family,
            "dims": _dims_dict(self.dims),
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
            "files": self.files,
            **({"defaults": self.defaults} if self.defaults else {}),  # other folders' manifests as they were
            **({"pipeline": self.pipeline} if self.pipeline else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "Manifest":
        """Validate every field the runtime reads (types, known names, sane bounds); ManifestError
        names the first problem. Unknown extra keys are ignored."""
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if not _is_int(version) or version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: unknown format_version {_short(version)}; this runtime reads version {FORMAT_VERSION}. "
                "Rebuild the engine folder with this version's build-engine."
            )
        required = ("family", "dims", "scaling_factor", "prediction_type", "scheduler", "tokenizer",
                    "default_size", "shapes", "precision", "networks")
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing keys {', '.join(missing)}")
        for key, allowed in (("family", FAMILIES), ("prediction_type", PREDICTION_TYPES), ("precision", PRECISIONS)):
            if not isinstance(d[key], str) or d[key] not in allowed:
                raise ManifestError(f"{where}: unknown {key} {_short(d[key])}; expected one of {', '.join(allowed)}")
        extras = {k: _object(d.get(k, {}), k, where) for k in ("backends", "source", "tools", "files", "pipeline")}
        if not isinstance(d.get("created", ""), str):
            raise ManifestError(f"{where}: 'created' must be a string; got {_short(d['created'])}")
        manifest = cls(
            family=d["family"], dims=_dims(d["dims"], where),
            scaling_factor=_number(d["scaling_factor"], "scaling_factor", where),
            prediction_type=d["prediction_type"], scheduler=_scheduler(d["scheduler"], where),
            tokenizer=_tokenizer(d["tokenizer"], where), default_size=_default_size(d["default_size"], where),
            shapes=_shapes(d["shapes"], where), precision=d["precision"], networks=_networks(d["networks"], where),
            created=d.get("created", ""), defaults=_defaults(d.get("defaults", {}), where), **extras,
        )
        if manifest.family.endswith("-lcm") != bool(manifest.dims.time_cond_proj_dim):
            raise ManifestError(f"{where}: family {manifest.family!r} with dims.time_cond_proj_dim "
                                f"{manifest.dims.time_cond_proj_dim}: the LCM families' U-Nets, and only they, take "
                                "a guidance embedding (time_cond_proj_dim > 0)")
        if manifest.family.startswith("sdxl") != bool(manifest.dims.time_ids and manifest.dims.text_hidden_size_2):
            raise ManifestError(f"{where}: family {manifest.family!r} with dims.time_ids {manifest.dims.time_ids} and "
                                f"text_hidden_size_2 {manifest.dims.text_hidden_size_2}: the SDXL families' U-Nets, and "
                                "only they, take two encoders' text and time_ids")
        if (manifest.family == REFINER_FAMILY) != (manifest.dims.text_hidden_size == 0):
            raise ManifestError(f"{where}: family {manifest.family!r} with dims.text_hidden_size "
                                f"{manifest.dims.text_hidden_size}: the SDXL refiner, and only it, has no first text "
                                "encoder (text_hidden_size 0)")
        opened_files(manifest)  # the entries that name files (backends' included) have the right types
        return manifest


# --- field validation (Manifest.from_dict) -----------------------------------------------------------------

def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(value: Any, lo: int, hi: int, what: str, where: str) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise ManifestError(f"{where}: {what} must be an integer in [{lo}, {hi}]; got {_short(value)}")
    return value


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ManifestError(f"{where}: {what} must be a positive finite number; got {_short(value)}")
    return float(value)


def _path_string(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _object(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: '{what}' must be a JSON object; got {_short(value)}")
    return dict(value)


def _dims_dict(dims: ModelDims) -> dict[str, Any]:
    """The manifest's dims: time_cond_proj_dim only where the U-Net has a guidance embedding, SDXL's
    second-encoder sizes and time_ids only in SDXL folders, so other folders' manifests stay as they were."""
    d = vars(dims).copy()
    for key in ("time_cond_proj_dim", "text_hidden_size_2", "text_embeds_size", "time_ids"):
        if not d[key]:
            del d[key]
    if not d["block_out_channels"]:  # recorded only in folders with ControlNets
        del d["block_out_channels"], d["layers_per_block"]
    else:
        d["block_out_channels"] = list(d["block_out_channels"])
    return d


def _dims(value: Any, where: str) -> ModelDims:
    d = _object(value, "dims", where)
    channels = d.get("block_out_channels", [])
    if not isinstance(channels, list) or len(channels) > 16:
        raise ManifestError(f"{where}: dims.block_out_channels must be a list of at most 16 integers; got "
                            f"{_short(channels)}")
    d["block_out_channels"] = tuple(_int_in(c, 1, MAX_DIM, "dims.block_out_channels", where) for c in channels)
    try:
        dims = ModelDims(**d)
    except TypeError as e:
        raise ManifestError(f"{where}: bad 'dims' {_short(value)}: {e}") from None
    lows = {"cache_channels": 0, "cache_level": 0, "text_max_length": 3,  # 3: BOS + one token + EOS
            "text_hidden_size": 0,  # the SDXL refiner has no first text encoder (Manifest.from_dict checks the family)
            "time_cond_proj_dim": 0, "layers_per_block": 0, "text_hidden_size_2": 0, "text_embeds_size": 0,
            "time_ids": 0}
    for name, v in vars(dims).items():
        if name != "block_out_channels":
            _int_in(v, lows.get(name, 1), MAX_DIM, f"dims.{name}", where)
    # the U-Net takes the latents, or latents + mask + masked-image latents (the inpainting U-Net)
    if dims.unet_in_channels not in (dims.latent_channels, 2 * dims.latent_channels + 1):
        raise ManifestError(f"{where}: dims.unet_in_channels {dims.unet_in_channels} fits neither a plain U-Net "
                            f"({dims.latent_channels}, the latent channels) nor an inpainting one "
                            f"({2 * dims.latent_channels + 1})")
    return dims


def _shapes(value: Any, where: str) -> dict[str, int]:
    shapes = _object(value, "shapes", where)
    missing = [k for k in SHAPE_KEYS if k not in shapes]
    if missing:
        raise ManifestError(f"{where}: 'shapes' lacks {', '.join(missing)}")
    out = {k: _int_in(shapes[k], 1, MAX_BATCH if "batch" in k else MAX_IMAGE, f"shapes.{k}", where)
           for k in SHAPE_KEYS}
    if "vae_max_image" in shapes:  # optional: the largest side the VAE graphs take whole (runtime/imaging/tiling.py)
        out["vae_max_image"] = _int_in(shapes["vae_max_image"], 1, MAX_IMAGE, "shapes.vae_max_image", where)
    for kind in ("batch", "image"):
        lo, opt, hi = (out[f"{b}_{kind}"] for b in ("min", "opt", "max"))
        if not lo <= opt <= hi:
            raise ManifestError(f"{where}: shapes must satisfy min_{kind} <= opt_{kind} <= max_{kind}; "
                                f"got {lo}, {opt}, {hi}")
    return out


def _default_size(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ManifestError(f"{where}: default_size must be [height, width]; got {_short(value)}")
    return tuple(_int_in(v, 1, MAX_IMAGE, "default_size", where) for v in value)


def _scheduler(value: Any, where: str) -> dict[str, Any]:
    from runtime.scheduler import SchedulerError, check_config

    config = _object(value, "scheduler", where)
    try:
        check_config(config)
    except SchedulerError as e:
        raise ManifestError(f"{where}: scheduler: {e}") from None
    return config


def _defaults(value: Any, where: str) -> dict[str, Any]:
    from runtime.sampling.defaults import check_defaults
    from runtime.scheduler import SchedulerError

    try:
        return check_defaults(value)
    except SchedulerError as e:
        raise ManifestError(f"{where}: {e}") from None


def _tokenizer(value: Any, where: str) -> dict[str, Any]:
    tok = _object(value, "tokenizer", where)
    if "tokenizer_2" in tok:  # SDXL's second tokenizer: an entry of the same kind
        tok["tokenizer_2"] = _tokenizer(tok["tokenizer_2"], f"{where} tokenizer_2")
    if not _path_string(tok.get("dir", "tokenizer")) or not (tok.get("pad_token") is None or
                                                             isinstance(tok["pad_token"], str)):
        raise ManifestError(f"{where}: the tokenizer's dir must be a path string and pad_token a string or null; "
                            f"got {_short(tok)}")
    files = _object(tok.get("files", {}), "tokenizer.files", where)
    embeddings = _object(tok.get("embeddings", {}), "tokenizer.embeddings", where)
    if not all(isinstance(v, str) for v in files.values()) or not all(
            isinstance(v, list) and all(isinstance(t, str) for t in v) for v in embeddings.values()):
        raise ManifestError(f"{where}: tokenizer files must map names to sha256 strings and embeddings names to "
                            "lists of token strings")
    return tok


def _networks(value: Any, where: str) -> dict[str, dict[str, Any]]:
    networks = _object(value, "networks", where)
    unknown = [n for n in networks if not known_network(n)]
    if unknown:
        raise ManifestError(f"{where}: unknown networks {', '.join(map(_short, unknown))}; expected "
                            f"{', '.join(NETWORKS)} (optional: {', '.join(OPTIONAL_NETWORKS)}, controlnet.NAME)")
    for name, entry in networks.items():
        entry = _object(entry, f"networks.{name}", where)
        if not _path_string(entry.get("file")) or not (entry.get("external_data") is None or
                                                       _path_string(entry["external_data"])):
            raise ManifestError(f"{where}: networks.{name} needs a 'file' path string (and 'external_data' a path "
                                f"string or null); got {_short(entry)}")
        if entry.get("precision", "fp32") not in PRECISIONS:
            raise ManifestError(f"{where}: networks.{name}.precision {_short(entry['precision'])} is not one of "
                                f"{', '.join(PRECISIONS)}")
        if name in TINY_VAE_NETWORKS or "scaling_factor" in entry:  # a tiny VAE's own, never assumed
            _number(entry.get("scaling_factor"), f"networks.{name}.scaling_factor", where)
    return networks


def load_manifest(engine_dir: str | os.PathLike) -> Manifest:
    """Read and validate `engine_dir/manifest.json`, and check that every network file it names is a
    regular file inside the folder (runtime/folder/paths.py `inside`: no absolute paths, `..` or symlinks out).
    The files' contents are checked by `runtime.folder.paths.check_folder`, which `open_engines` runs."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise ManifestError(f"engine folder {engine_dir} does not exist")
    if not os.path.lexists(engine_dir / MANIFEST_NAME):
        raise ManifestError(f"{engine_dir} is not an engine folder: it has no {MANIFEST_NAME}. "
                            "Build one with `build-engine SOURCE --out DIR`.")
    path = inside(engine_dir, MANIFEST_NAME, "the folder's manifest")
    if path.stat().st_size > MANIFEST_MAX_BYTES:
        raise ManifestError(f"{path} has {path.stat().st_size} bytes; a manifest has a few KB (at most "
                            f"{MANIFEST_MAX_BYTES})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints; deep nesting
        raise ManifestError(f"{path} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    manifest = Manifest.from_dict(data, where=str(path))
    for name, entry in manifest.networks.items():
        for key in ("file", "external_data"):
            if entry.get(key):
                inside(engine_dir, entry[key], f"network {name!r} names {key}")
    return manifest


def write_manifest(engine_dir: str | os.PathLike, manifest: Manifest, *, record_files: bool = False) -> Path:
    """Write the manifest atomically (temporary file, then rename). `record_files=True` (what
    build-engine does) first records the `files` table, the size, sha256 and fingerprint of every file
    the runtime opens, from the folder as it is now (runtime/folder/paths.py `file_records`)."""
    engine_dir = Path(engine_dir)
    if record_files:
        manifest = replace(manifest, files=file_records(engine_dir, manifest))
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
