"""Load a Stable Diffusion model (preset, diffusers folder or single-file checkpoint) into the
reference networks, and save one in either layout.

    load_model("tiny-sd1")                         random weights from a preset (`random_model`)
    load_model("tiny")                             the embedded demo model, export/assets/tiny/
    load_model("path/to/diffusers-folder")         as `save_pretrained` writes it
    load_model("v1-5-pruned-emaonly.safetensors")  CompVis / Stability single file (.ckpt too)

Every component is loaded strictly; a mismatch raises `CheckpointError` naming the missing and
unexpected keys. Weights are upcast to float32 and the networks are in eval mode.
"""

from __future__ import annotations

import atexit
import json
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from export import convert_ldm
from export.configs import PRESETS, ModelSpec, UNetConfig, VAEConfig, infer_family, preset, scheduler_config
from export.convert_ldm import CheckpointError
from export.hashing import file_sha256, tree_sha256
from export.text_encoder import EOS_TOKEN, build_text_encoder, write_tokenizer_files
from export.unet import UNet2DConditionModel
from export.vae import AutoencoderKL

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "load_model",
    "random_model",
    "save_diffusers",
    "save_single_file",
]

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
DIFFUSERS_VERSION = "0.42.1"  # written into configs; the layout is that of diffusers 0.42
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# Padding tokens: CompVis FrozenCLIPEmbedder pads with <|endoftext|>, OpenCLIP's tokenizer with 0 ("!").
_PAD_TOKEN = {"sd1": EOS_TOKEN, "sd2": "!"}
# Non-network entries of LDM single files: EMA copies, the autoencoder's training loss
# (discriminator, logvar) and the DDPM schedule buffers (ldm/models/diffusion/ddpm.py
# `register_schedule`). Skipped when loading.
_LDM_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
_LDM_SCHEDULE_BUFFERS = frozenset((
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
))
_TEXT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "bos_token_id",
    "eos_token_id", "pad_token_id",
)

StateDict = dict[str, torch.Tensor]


@dataclass
class LoadedModel:
    """A whole model in float32, eval mode. `source`: kind ("preset" | "diffusers" | "single_file"),
    path (None for random presets) and sha256 (of the file, or of a folder's files; None for random
    presets)."""

    spec: ModelSpec
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module  # transformers CLIPTextModel
    tokenizer_dir: Path
    source: dict[str, Any]


# ------------------------------------------------------------------------------------------ helpers


def _key_list(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:10])
    more = f", ... ({len(keys) - 10} more)" if len(keys) > 10 else ""
    return f"{len(keys)} {kind} key(s): {shown}{more}"


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


def _build(spec: ModelSpec, weights: tuple[StateDict, StateDict, StateDict] | None, tokenizer_dir: Path,
           source: dict[str, Any]) -> LoadedModel:
    unet = UNet2DConditionModel(spec.unet)
    vae = AutoencoderKL(spec.vae)
    text_encoder = build_text_encoder(spec.text_encoder)
    if weights is not None:
        for module, sd, what in zip((unet, vae, text_encoder), weights, ("U-Net", "VAE", "text encoder")):
            _load_strict(module, sd, what)
    for module in (unet, vae, text_encoder):
        module.float().eval().requires_grad_(False)
    return LoadedModel(spec, unet, vae, text_encoder, tokenizer_dir, source)


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


def _text_config(d: dict[str, Any], where: Path) -> dict[str, Any]:
    architectures = d.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"] or d.get("model_type", "clip_text_model") != "clip_text_model":
        raise CheckpointError(
            f"{where}: unsupported text encoder {architectures} (model_type {d.get('model_type')!r}); "
            "expected a CLIPTextModel (Stable Diffusion 1.x / 2.x)"
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
    files = {c: _component_weights(folder, c, stems) for c, stems in (
        ("unet", ("diffusion_pytorch_model",)),
        ("vae", ("diffusion_pytorch_model",)),
        ("text_encoder", ("model", "pytorch_model")),
    )}
    try:
        unet_cfg = UNetConfig.from_dict(_read_json(folder / "unet" / "config.json"))
        vae_cfg = VAEConfig.from_dict(_read_json(folder / "vae" / "config.json"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
    text_cfg = _text_config(_read_json(folder / "text_encoder" / "config.json"), folder / "text_encoder")
    family = infer_family(unet_cfg)
    base = family.removesuffix("-inpaint")

    tokenizer_dir, pad = _folder_tokenizer(folder / "tokenizer", _PAD_TOKEN[base])
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else scheduler_config()
    scheduler.pop("_diffusers_version", None)
    spec = _make_spec(family, unet_cfg, vae_cfg, text_cfg, _with_prediction_type(scheduler, prediction_type), pad,
                      folder)
    weights = (
        _read_weights(files["unet"]),
        _read_weights(files["vae"]),
        convert_ldm.clip_from_file(_read_weights(files["text_encoder"])),
    )
    source = {"kind": "diffusers", "path": str(folder), "sha256": tree_sha256(folder)}
    return _build(spec, weights, tokenizer_dir, source)


def _make_spec(family: str, unet: UNetConfig, vae: VAEConfig, text: dict[str, Any], scheduler: dict[str, Any],
               pad_token: str, where: Path) -> ModelSpec:
    if text.get("hidden_size") != unet.cross_attention_dim:
        raise CheckpointError(
            f"{where}: text encoder width {text.get('hidden_size')} does not match the U-Net "
            f"cross_attention_dim {unet.cross_attention_dim}"
        )
    if unet.in_channels not in (4, 9):
        raise CheckpointError(
            f"{where}: unsupported U-Net with {unet.in_channels} input channels; supported: 4 (text-to-image) "
            "and 9 (inpainting)"
        )
    return ModelSpec(family, unet, vae, text, scheduler, pad_token)


# ---------------------------------------------------------------------------------------- single file


def split_single_file(state_dict: StateDict,
                      path: Path | str = "checkpoint") -> tuple[StateDict, StateDict, StateDict, str]:
    """Split an LDM checkpoint into U-Net, VAE and text-encoder dicts in our layout; returns the
    text-encoder kind too ("clip" for SD 1.x, "openclip" for SD 2.x)."""
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        raise CheckpointError(
            f"{path}: this is an SDXL checkpoint (conditioner.embedders.* keys); only Stable Diffusion 1.x "
            "and 2.x are supported"
        )
    prefixes = {
        "unet": convert_ldm.UNET_PREFIX,
        "vae": convert_ldm.VAE_PREFIX,
        "clip": convert_ldm.CLIP_PREFIX,
        "openclip": convert_ldm.OPENCLIP_PREFIX,
    }
    parts: dict[str, StateDict] = {name: {} for name in prefixes}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(_LDM_IGNORED_PREFIXES) or key in _LDM_SCHEDULE_BUFFERS:
            continue
        part = next((name for name, p in prefixes.items() if key.startswith(p)), None)
        if part is None:
            unknown.append(key)
        else:
            parts[part][key[len(prefixes[part]):]] = value
    if not parts["unet"]:
        found = sorted({".".join(k.split(".")[:2]) for k in state_dict})
        raise CheckpointError(
            f"{path}: no Stable Diffusion U-Net found (no {convert_ldm.UNET_PREFIX}* keys); "
            f"{len(state_dict)} tensors with prefixes: {', '.join(found[:15]) or 'none'}"
            + (f" ... ({len(found) - 15} more)" if len(found) > 15 else "")
        )
    if unknown:
        raise CheckpointError(f"{path}: {_key_list('unexpected', sorted(unknown))}")
    if not parts["vae"]:
        raise CheckpointError(f"{path}: the checkpoint has no VAE ({convert_ldm.VAE_PREFIX}* keys)")
    if parts["clip"] and parts["openclip"]:
        raise CheckpointError(f"{path}: the checkpoint has both a CLIP and an OpenCLIP text encoder")
    kind = "clip" if parts["clip"] else "openclip" if parts["openclip"] else None
    if kind is None:
        raise CheckpointError(
            f"{path}: the checkpoint has no text encoder ({convert_ldm.CLIP_PREFIX}* or {convert_ldm.OPENCLIP_PREFIX}*)"
        )
    try:  # the layout rules reshape, split and join tensors: shapes a checkpoint lies about fail here
        if kind == "clip":
            text = convert_ldm.clip_from_file(parts["clip"])
        else:
            text = convert_ldm.openclip_from_ldm(parts["openclip"])
        return convert_ldm.unet_from_ldm(parts["unet"]), convert_ldm.vae_from_ldm(parts["vae"]), text, kind
    except (RuntimeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: tensors of unexpected shapes for the Stable Diffusion layout: {e}") from e


def _count(keys, pattern: str) -> int | None:
    return len(convert_ldm.block_indices(keys, pattern)) or None


def _dim(sd: StateDict, key: str, axis: int) -> int | None:
    return sd[key].shape[axis] if key in sd and sd[key].ndim > axis else None


def _known(d: dict[str, Any]) -> dict[str, Any]:
    """Fields whose tensors were present. A missing tensor leaves its field to the preset; the
    strict load afterwards names every missing key."""
    return {k: v for k, v in d.items() if v is not None and not (isinstance(v, tuple) and None in v)}


def infer_unet_fields(sd: StateDict) -> dict[str, Any]:
    """The `UNetConfig` fields that the tensor shapes determine (our key layout)."""
    layout = convert_ldm.unet_layout_from_ours(sd)
    n = len(layout.down_attention)
    attn = "mid_block.attentions.0."
    proj_in = sd.get(attn + "proj_in.weight")
    return _known({
        "block_out_channels": tuple(_dim(sd, f"down_blocks.{b}.resnets.0.conv1.weight", 0) for b in range(n)),
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention),
        "cross_attention_dim": _dim(sd, attn + "transformer_blocks.0.attn2.to_k.weight", 1),
        "in_channels": _dim(sd, "conv_in.weight", 1),
        "out_channels": _dim(sd, "conv_out.weight", 0),
        "layers_per_block": layout.layers_per_block,
        "transformer_layers_per_block": _count(sd, re.escape(attn) + r"transformer_blocks\.(\d+)\."),
        "use_linear_projection": None if proj_in is None else proj_in.ndim == 2,
    })


def infer_vae_fields(sd: StateDict) -> dict[str, Any]:
    n = _count(sd, r"encoder\.down_blocks\.(\d+)\.") or 0
    return _known({
        "block_out_channels": tuple(_dim(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0) for i in range(n))
        or None,
        "in_channels": _dim(sd, "encoder.conv_in.weight", 1),
        "out_channels": _dim(sd, "decoder.conv_out.weight", 0),
        "latent_channels": _dim(sd, "decoder.conv_in.weight", 1),
        "layers_per_block": _count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
    })


def infer_text_fields(sd: StateDict) -> dict[str, Any]:
    return _known({
        "vocab_size": _dim(sd, "embeddings.token_embedding.weight", 0),
        "hidden_size": _dim(sd, "embeddings.token_embedding.weight", 1),
        "max_position_embeddings": _dim(sd, "embeddings.position_embedding.weight", 0),
        "num_hidden_layers": _count(sd, r"encoder\.layers\.(\d+)\."),
        "intermediate_size": _dim(sd, "encoder.layers.0.mlp.fc1.weight", 0),
    })


def _matches(candidate: dict[str, Any], inferred: dict[str, Any], ignore: tuple[str, ...] = ()) -> bool:
    return all(candidate.get(k) == v for k, v in inferred.items() if k not in ignore)


def _as_fields(config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def infer_spec(unet_sd: StateDict, vae_sd: StateDict, text_sd: StateDict, text_kind: str,
               prediction_type: str | None = None, where: Path | str = "checkpoint") -> ModelSpec:
    """The `ModelSpec` of a single-file checkpoint (state dicts already in our layout).

    Shapes give channels, block structure, context width, input channels and layer counts; the
    text-encoder layout gives the family (CLIP: SD 1.x, OpenCLIP: SD 2.x) and 9 input channels mean
    inpainting. The rest (attention heads, norm groups, activation, scaling factor) comes from a
    preset of the family whose shapes agree, else from the family's full-size preset with the
    family rule for heads: SD 1.x has 8 heads per block, SD 2.x and both CLIP towers 64-dim heads.
    """
    base = "sd1" if text_kind == "clip" else "sd2"
    unet_fields = infer_unet_fields(unet_sd)
    family = base + ("-inpaint" if unet_fields.get("in_channels") == 9 else "")
    candidates = [preset(n) for n in PRESETS if preset(n).family.removesuffix("-inpaint") == base]
    full = next(s for s in candidates if s.unet.block_out_channels == UNetConfig().block_out_channels)

    try:
        unet_base = next((s.unet for s in candidates if _matches(_as_fields(s.unet), unet_fields, ("in_channels",))),
                         None)
        if unet_base is None:
            channels = unet_fields.get("block_out_channels", full.unet.block_out_channels)
            if base == "sd2" and any(c % 64 for c in channels):
                raise ValueError(f"block channels {channels} match no preset and are not multiples of the "
                                 "SD 2.x head width 64")
            heads = 8 if base == "sd1" else tuple(c // 64 for c in channels)
            unet_base = replace(full.unet, attention_head_dim=heads)
        unet = replace(unet_base, **unet_fields)

        vae_fields = infer_vae_fields(vae_sd)
        vae_base = next((s.vae for s in candidates if _matches(_as_fields(s.vae), vae_fields)), full.vae)
        vae = replace(vae_base, **vae_fields)

        text_fields = infer_text_fields(text_sd)
        text = next((dict(s.text_encoder) for s in candidates if _matches(s.text_encoder, text_fields)), None)
        if text is None:
            hidden = text_fields.get("hidden_size", full.text_encoder["hidden_size"])
            if hidden % 64:
                raise ValueError(f"text encoder width {hidden} matches no preset and is not a multiple of the "
                                 "CLIP head width 64")
            text = {**full.text_encoder, "num_attention_heads": hidden // 64}
    except ValueError as e:
        raise CheckpointError(f"{where}: cannot infer a supported {family} config: {e}") from e
    scheduler = scheduler_config(prediction_type or "epsilon")
    return _make_spec(family, unet, vae, {**text, **text_fields}, scheduler, _PAD_TOKEN[base], Path(where))


def _load_single_file(path: Path, prediction_type: str | None) -> LoadedModel:
    unet_sd, vae_sd, text_sd, kind = split_single_file(_read_weights(path), path)
    spec = infer_spec(unet_sd, vae_sd, text_sd, kind, prediction_type, path)
    source = {"kind": "single_file", "path": str(path), "sha256": file_sha256(path)}
    return _build(spec, (unet_sd, vae_sd, text_sd), _tokenizer_dir(spec.pad_token), source)


# --------------------------------------------------------------------------------------------- saving


def _tensors(state_dict: StateDict, fp16: bool) -> StateDict:
    dtype = torch.float16 if fp16 else torch.float32
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_diffusers(model: LoadedModel, out_dir: str | Path, fp16: bool = False) -> Path:
    """Write `model` as a diffusers folder (`StableDiffusionPipeline.from_pretrained` reads it):
    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/. `fp16` stores float16
    weights (loading upcasts them again). The folder is assembled next to `out_dir` and moved into
    place at the end; an existing `out_dir` must be empty or a diffusers folder, which is replaced."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise CheckpointError(f"{out}: exists and is not a diffusers folder; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        _write_diffusers(model, stage, fp16)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return out


def _write_diffusers(model: LoadedModel, out: Path, fp16: bool) -> None:
    spec = model.spec
    scheduler = {"_class_name": "PNDMScheduler", **spec.scheduler, "_diffusers_version": DIFFUSERS_VERSION}
    pipeline = "StableDiffusionInpaintPipeline" if spec.family.endswith("-inpaint") else "StableDiffusionPipeline"
    _write_json(out / "model_index.json", {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    meta = {"format": "pt"}  # transformers refuses safetensors without it
    for name, module, config in (("unet", model.unet, spec.unet), ("vae", model.vae, spec.vae)):
        _write_json(out / name / "config.json", {**config.to_dict(), "_diffusers_version": DIFFUSERS_VERSION})
        weights = out / name / "diffusion_pytorch_model.safetensors"
        safetensors.torch.save_file(_tensors(module.state_dict(), fp16), str(weights), metadata=meta)
    text_config = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **spec.text_encoder,
        "torch_dtype": "float16" if fp16 else "float32",
    }
    _write_json(out / "text_encoder" / "config.json", text_config)
    text_sd = convert_ldm.clip_to_file(model.text_encoder.state_dict())
    safetensors.torch.save_file(_tensors(text_sd, fp16), str(out / "text_encoder" / "model.safetensors"), metadata=meta)
    (out / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(model.tokenizer_dir) / name, out / "tokenizer" / name)
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler)


def to_single_file_state_dict(model: LoadedModel) -> StateDict:
    """The model's weights in the original LDM layout (what `save_single_file` writes)."""
    out: StateDict = {}
    out.update({convert_ldm.UNET_PREFIX + k: v for k, v in convert_ldm.unet_to_ldm(model.unet.state_dict()).items()})
    out.update({convert_ldm.VAE_PREFIX + k: v for k, v in convert_ldm.vae_to_ldm(model.vae.state_dict()).items()})
    text = model.text_encoder.state_dict()
    if model.spec.family.startswith("sd1"):
        out.update({convert_ldm.CLIP_PREFIX + k: v for k, v in convert_ldm.clip_to_file(text).items()})
    else:
        out.update({convert_ldm.OPENCLIP_PREFIX + k: v for k, v in convert_ldm.openclip_to_ldm(text).items()})
    return out


def save_single_file(model: LoadedModel, path: str | Path) -> Path:
    """Write one `.safetensors` file in the original CompVis / Stability layout (SD 1.x text encoder
    under cond_stage_model.transformer., SD 2.x in the OpenCLIP layout under cond_stage_model.model.)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save_single_file writes .safetensors only")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        safetensors.torch.save_file(_tensors(to_single_file_state_dict(model), fp16=False), str(partial),
                                    metadata={"format": "pt"})
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path
