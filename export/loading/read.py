"""Load a Stable Diffusion model (preset, diffusers folder or single-file checkpoint) into the
reference networks.

    load_model("tiny-sd1")                         random weights from a preset (`random_model`)
    load_model("tiny")                             the embedded demo model, export/assets/tiny/
    load_model("path/to/diffusers-folder")         as `save_pretrained` writes it
    load_model("v1-5-pruned-emaonly.safetensors")  CompVis / Stability single file (.ckpt too)

Every component is loaded strictly; a mismatch raises `CheckpointError` naming the missing and
unexpected keys. Weights are upcast to float32 and the networks are in eval mode. A single file's
configs are inferred from its tensor shapes (export/loading/infer.py); saving is
export/loading/save.py.
"""

from __future__ import annotations

import atexit
import json
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from export import convert_ldm
from export.configs import (PRESETS, ModelSpec, UNetConfig, family_base, infer_family, preset,
                            scheduler_config)
from export.convert_ldm import CheckpointError
from export.hashing import file_sha256, tree_sha256
from export.loading.infer import _PAD_TOKEN, StateDict, _key_list, _make_spec, infer_spec, split_single_file
from export.loading.sdxl_file import infer_sdxl_spec, is_sdxl_file, split_sdxl_file
from export.text_encoder import build_text_encoder, write_tokenizer_files
from export.tiny_vae import AutoencoderTiny, build_vae, vae_config
from export.unet import UNet2DConditionModel
from export.vae import AutoencoderKL

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "load_model",
    "random_model",
]

TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_TEXT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "bos_token_id",
    "eos_token_id", "pad_token_id",
)


@dataclass
class LoadedModel:
    """A whole model in float32, eval mode. `source`: kind ("preset" | "diffusers" | "single_file"),
    path (None for random presets) and sha256 (of the file, or of a folder's files; None for random
    presets)."""

    spec: ModelSpec
    unet: UNet2DConditionModel
    vae: AutoencoderKL | AutoencoderTiny  # AutoencoderTiny for a folder whose vae/ is one (export/tiny_vae.py)
    text_encoder: nn.Module | None  # transformers CLIPTextModel; None for the SDXL refiner (text_encoder_2 only)
    tokenizer_dir: Path | None  # None for the SDXL refiner (its one tokenizer is tokenizer_2_dir)
    source: dict[str, Any]
    # ControlNets to export beside the U-Net, by name (export/controlnet.py; build-engine --controlnet)
    controlnets: dict[str, nn.Module] = field(default_factory=dict)
    text_encoder_2: nn.Module | None = None  # SDXL: transformers CLIPTextModelWithProjection
    tokenizer_2_dir: Path | None = None  # SDXL: its tokenizer (the CLIP BPE, padding with spec.pad_token_2)


# ------------------------------------------------------------------------------------------ helpers


def _load_strict(module: nn.Module, state_dict: StateDict, what: str) -> None:
    """`load_state_dict(strict=True)` with an error that names the missing / unexpected keys and
    any shape mismatch. Floating tensors are cast to float32."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = [_key_list(kind, keys) for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{what} weights do not fit the model: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state_dict[k].shape)} (model: {tuple(v.shape)})"
             for k, v in expected.items() if state_dict[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{what} weights have the wrong shape: {_key_list('mismatched', wrong)}")
    # load_state_dict would cast integer or boolean tensors into float parameters without a word
    not_float = [f"{k} is {str(state_dict[k].dtype).removeprefix('torch.')}, not a floating-point weight"
                 for k, v in expected.items() if v.is_floating_point() and not state_dict[k].is_floating_point()]
    if not_float:
        raise CheckpointError(f"{what} weights have the wrong dtype: {_key_list('mistyped', not_float)}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}, strict=True)


def _read_safetensors(path: Path) -> StateDict:
    try:
        return safetensors.torch.load_file(str(path))
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e


def _read_pickle(path: Path) -> StateDict:
    """A torch pickle (.ckpt / .bin), only through `weights_only=True`."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{path}: the pickle contains arbitrary Python objects ({', '.join(sorted(set(found)))}), which "
                "are not loaded for safety (torch.load weights_only=True). Convert it to .safetensors in a "
                "trusted environment, or re-save only its tensors."
            ) from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    except Exception as e:  # noqa: BLE001 - a corrupt file fails anywhere in torch's zip reader and weights-only
        # unpickler: RuntimeError, EOFError, IndexError (an empty stack), KeyError, struct.error, MemoryError...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _read_weights(path: Path) -> StateDict:
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)


def _tokenizer_dir(pad_token: str) -> Path:
    """A temporary tokenizer folder, removed when the process exits (models may outlive any scope)."""
    folder = tempfile.mkdtemp(prefix="sdrt-tokenizer-")
    atexit.register(shutil.rmtree, folder, True)
    return write_tokenizer_files(folder, pad_token)


def _with_prediction_type(scheduler: dict[str, Any], prediction_type: str | None) -> dict[str, Any]:
    if prediction_type is None:
        return dict(scheduler)
    scheduler_config(prediction_type)  # validates the value
    return {**scheduler, "prediction_type": prediction_type}


def _build(spec: ModelSpec, weights: tuple[StateDict, ...] | None, tokenizer_dir: Path,
           source: dict[str, Any], tokenizer_2_dir: Path | None = None) -> LoadedModel:
    """The networks of `spec`, loaded strictly from `weights` (U-Net, VAE, text encoder, and for SDXL
    the second text encoder), or random (None)."""
    unet = UNet2DConditionModel(spec.unet)
    vae = build_vae(spec.vae)
    modules = [(unet, "U-Net"), (vae, "VAE")]
    text_encoder = None
    if spec.text_encoder is not None:  # the SDXL refiner has none
        text_encoder = build_text_encoder(spec.text_encoder)
        modules.append((text_encoder, "text encoder"))
    else:
        tokenizer_dir = None
    text_encoder_2 = None
    if spec.text_encoder_2 is not None:
        text_encoder_2 = build_text_encoder(spec.text_encoder_2, projection=True)
        modules.append((text_encoder_2, "text encoder 2"))
        tokenizer_2_dir = tokenizer_2_dir or _tokenizer_dir(spec.pad_token_2)
    if weights is not None:
        for (module, what), sd in zip(modules, weights, strict=True):
            _load_strict(module, sd, what)
    for module, _ in modules:
        module.float().eval().requires_grad_(False)
    return LoadedModel(spec, unet, vae, text_encoder, tokenizer_dir, source, text_encoder_2=text_encoder_2,
                       tokenizer_2_dir=tokenizer_2_dir)


# ---------------------------------------------------------------------------------------- public API


def random_model(preset_name: str, seed: int = 0) -> LoadedModel:
    """Random weights for a preset config, deterministic for a given seed (the global torch RNG is
    left untouched). The tokenizer folder holds the packaged CLIP vocabulary."""
    if preset_name not in PRESETS:
        hint = " (the trained demo model: load_model('tiny'))" if preset_name == "tiny" else ""
        raise CheckpointError(f"unknown preset {preset_name!r}; expected one of: {', '.join(PRESETS)}{hint}")
    spec = preset(preset_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(spec, None, _tokenizer_dir(spec.pad_token),
                       {"kind": "preset", "path": None, "sha256": None, "preset": preset_name, "seed": seed})
    return model


def load_model(source: str | Path, *, prediction_type: str | None = None) -> LoadedModel:
    """Load `source`: a preset name (random weights; `tiny` is the embedded demo model), a diffusers
    folder, or a single-file `.safetensors` / `.ckpt` checkpoint.

    For single files the family (sd1, sd2, sd1-inpaint, sd2-inpaint) and the configs are inferred
    from the tensor shapes. What the weights cannot tell is taken from the matching preset: the
    scheduler is the family default with `prediction_type` "epsilon" unless given. SD 2.x 768-px
    models (stable-diffusion-2-1, 2-0 768-v) predict v: load them with
    `prediction_type="v_prediction"`. For presets and diffusers folders, `prediction_type` overrides
    the one in the scheduler config.
    """
    name = str(source)
    if name == "tiny" and not Path(name).exists():
        if not (TINY_DIR / "model_index.json").is_file():
            raise CheckpointError(
                f"the embedded demo model is not built yet ({TINY_DIR} has no model_index.json); "
                "train it with tools/train_demo.py, or use a random preset: " + ", ".join(PRESETS)
            )
        model = _load_diffusers(TINY_DIR, prediction_type)
        model.source["kind"] = "preset"
        model.source["preset"] = "tiny"
        return model
    if name in PRESETS and not Path(name).exists():
        model = random_model(name)
        if prediction_type is not None:
            model.spec = replace(model.spec, scheduler=_with_prediction_type(model.spec.scheduler, prediction_type))
        return model
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist, and {name!r} is not a preset (presets: {', '.join(PRESETS)}, tiny)"
        )
    if path.is_dir():
        return _load_diffusers(path, prediction_type)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported file type {path.suffix!r}; expected a diffusers folder or a single file "
            f"({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    return _load_single_file(path, prediction_type)


# ---------------------------------------------------------------------------------- diffusers folder


def _component_weights(folder: Path, component: str, stems: tuple[str, ...]) -> Path:
    sub = folder / component
    if not sub.is_dir():
        raise CheckpointError(f"{folder}: the diffusers folder has no {component}/ component")
    if not (sub / "config.json").is_file():
        raise CheckpointError(f"{folder}: {component}/config.json is missing")
    for stem in stems:
        for name in (f"{stem}.safetensors", f"{stem}.bin", f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"):
            if (sub / name).is_file():
                return sub / name
    present = ", ".join(sorted(p.name for p in sub.iterdir())) or "nothing"
    raise CheckpointError(
        f"{folder}: {component}/ has no weights ({stems[0]}.safetensors or .bin); found: {present}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON: {e}") from e


def _text_config(d: dict[str, Any], where: Path, architecture: str = "CLIPTextModel") -> dict[str, Any]:
    """The CLIPTextConfig keyword arguments of a text encoder's config.json, refused unless it is an
    `architecture` (CLIPTextModel; SDXL's text_encoder_2: CLIPTextModelWithProjection)."""
    architectures = d.get("architectures") or [architecture]
    if architectures != [architecture] or d.get("model_type", "clip_text_model") != "clip_text_model":
        raise CheckpointError(
            f"{where}: unsupported text encoder {architectures} (model_type {d.get('model_type')!r}); "
            f"expected a {architecture}"
        )
    return {k: d[k] for k in _TEXT_CONFIG_KEYS if k in d}


def _folder_tokenizer(tokenizer: Path, default_pad: str) -> tuple[Path, str]:
    """The folder's tokenizer as our four files, and its pad token. A complete folder is used as it
    is; transformers 5 writes tokenizer.json instead of vocab.json / merges.txt, which are then
    extracted from it; without any tokenizer files the packaged CLIP vocabulary is used."""
    pad = default_pad
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        value = _read_json(tokenizer / name).get("pad_token") if (tokenizer / name).is_file() else None
        if value:
            pad = value["content"] if isinstance(value, dict) else value
            break
    if all((tokenizer / f).is_file() for f in TOKENIZER_FILES):
        return tokenizer, pad
    out = _tokenizer_dir(pad)
    if (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tokenizer / name, out / name)
    elif (tokenizer / "tokenizer.json").is_file():
        bpe = _read_json(tokenizer / "tokenizer.json").get("model") or {}
        if bpe.get("type") != "BPE" or not bpe.get("vocab") or not bpe.get("merges"):
            raise CheckpointError(f"{tokenizer}/tokenizer.json: expected a BPE model with vocab and merges")
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (out / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out, pad


def _load_diffusers(folder: Path, prediction_type: str | None) -> LoadedModel:
    if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
        raise CheckpointError(f"{folder}: not a diffusers folder (no model_index.json, no unet/); found: {present}")
    first = _has_first_encoder(folder)
    files = {c: _component_weights(folder, c, stems) for c, stems in (
        ("unet", ("diffusion_pytorch_model",)),
        ("vae", ("diffusion_pytorch_model",)),
    ) + ((("text_encoder", ("model", "pytorch_model")),) if first else ())}
    try:
        unet_cfg = UNetConfig.from_dict(_read_json(folder / "unet" / "config.json"))
        vae_cfg = vae_config(_read_json(folder / "vae" / "config.json"))
        family = infer_family(unet_cfg, first_encoder=first)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
    base = family_base(family)
    text_cfg, tokenizer_dir, pad = None, None, _PAD_TOKEN[base]
    if first:
        text_cfg = _text_config(_read_json(folder / "text_encoder" / "config.json"), folder / "text_encoder")
        tokenizer_dir, pad = _folder_tokenizer(folder / "tokenizer", _PAD_TOKEN[base])
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else scheduler_config()
    scheduler.pop("_diffusers_version", None)
    second, tokenizer_2_dir, weights_2 = _second_encoder(folder) if base == "sdxl" else ({}, None, None)
    spec = _make_spec(family, unet_cfg, vae_cfg, text_cfg, _with_prediction_type(scheduler, prediction_type), pad,
                      folder, **second)
    weights = [_read_weights(files["unet"]), _read_weights(files["vae"])]
    if first:
        weights.append(convert_ldm.clip_from_file(_read_weights(files["text_encoder"])))
    if weights_2 is not None:
        weights.append(weights_2)
    source = {"kind": "diffusers", "path": str(folder), "sha256": tree_sha256(folder)}
    return _build(spec, tuple(weights), tokenizer_dir, source, tokenizer_2_dir)


def _has_first_encoder(folder: Path) -> bool:
    """Whether a diffusers folder has its first text encoder: not the SDXL refiner's, whose
    model_index.json names none (`"text_encoder": [null, null]`, stabilityai/stable-diffusion-xl-refiner-1.0)
    and which has no text_encoder/ component."""
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    named = index.get("text_encoder", ["transformers", "CLIPTextModel"])
    if isinstance(named, list) and named and named[0] is None:
        return False
    return (folder / "text_encoder").is_dir() or not (folder / "text_encoder_2").is_dir()


def _second_encoder(folder: Path) -> tuple[dict[str, Any], Path, StateDict]:
    """SDXL's text_encoder_2 (CLIPTextModelWithProjection) and tokenizer_2 of a diffusers folder, and
    model_index.json's force_zeros_for_empty_prompt (diffusers StableDiffusionXLPipeline's default: True):
    (ModelSpec keyword arguments, the tokenizer folder, the encoder's weights)."""
    config = _text_config(_read_json(folder / "text_encoder_2" / "config.json"), folder / "text_encoder_2",
                          "CLIPTextModelWithProjection")
    weights = _read_weights(_component_weights(folder, "text_encoder_2", ("model", "pytorch_model")))
    tokenizer_2_dir, pad_2 = _folder_tokenizer(folder / "tokenizer_2", "!")
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    second = {"text_encoder_2": config, "pad_token_2": pad_2,
              "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
    # CLIPTextModelWithProjection keeps transformers' file keys (text_model.*, text_projection.weight); only
    # the non-persistent position_ids buffer that old files carry goes
    return second, tokenizer_2_dir, {k: v for k, v in weights.items() if not k.endswith("embeddings.position_ids")}


# ---------------------------------------------------------------------------------------- single file


def _load_single_file(path: Path, prediction_type: str | None) -> LoadedModel:
    state_dict = _read_weights(path)
    if is_sdxl_file(state_dict):  # conditioner.embedders.*: export/loading/sdxl_file.py
        weights = split_sdxl_file(state_dict, path)
        spec = infer_sdxl_spec(*weights, prediction_type=prediction_type, where=path)
        source = {"kind": "single_file", "path": str(path), "sha256": file_sha256(path)}
        return _build(spec, weights, _tokenizer_dir(spec.pad_token), source)
    unet_sd, vae_sd, text_sd, kind = split_single_file(state_dict, path)
    spec = infer_spec(unet_sd, vae_sd, text_sd, kind, prediction_type, path)
    source = {"kind": "single_file", "path": str(path), "sha256": file_sha256(path)}
    return _build(spec, (unet_sd, vae_sd, text_sd), _tokenizer_dir(spec.pad_token), source)
