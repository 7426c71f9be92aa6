"""The architecture of a Stable Diffusion checkpoint, told from its tensors: split a single-file
(LDM) checkpoint into U-Net, VAE and text-encoder state dicts in our layout (`split_single_file`),
read each network's config fields off the tensor shapes (`infer_unet_fields`, `infer_vae_fields`,
`infer_text_fields`) and complete them into a `ModelSpec` (`infer_spec`). Nothing here reads a
file; export/loading/read.py does, and builds the networks.
"""

from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from export import convert_ldm
from export.configs import PRESETS, ModelSpec, UNetConfig, VAEConfig, preset, scheduler_config
from export.convert_ldm import CheckpointError
from export.text_encoder import EOS_TOKEN

# Padding tokens: CompVis FrozenCLIPEmbedder pads with <|endoftext|>, OpenCLIP's tokenizer with 0 ("!").
# SDXL's first tokenizer pads as SD 1.x's (stabilityai/stable-diffusion-xl-base-1.0 tokenizer/)
_PAD_TOKEN = {"sd1": EOS_TOKEN, "sd2": "!", "sdxl": EOS_TOKEN}
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

StateDict = dict[str, torch.Tensor]


def _key_list(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:10])
    more = f", ... ({len(keys) - 10} more)" if len(keys) > 10 else ""
    return f"{len(keys)} {kind} key(s): {shown}{more}"


def _make_spec(family: str, unet: UNetConfig, vae: VAEConfig, text: dict[str, Any], scheduler: dict[str, Any],
               pad_token: str, where: Path, **second: Any) -> ModelSpec:
    """The spec, its sizes checked against each other; `second`: SDXL's text_encoder_2, pad_token_2 and
    force_zeros_for_empty_prompt (ModelSpec checks both encoders' widths against the U-Net)."""
    if not second and text.get("hidden_size") != unet.cross_attention_dim:
        raise CheckpointError(
            f"{where}: text encoder width {text.get('hidden_size')} does not match the U-Net "
            f"cross_attention_dim {unet.cross_attention_dim}"
        )
    if unet.in_channels not in (4, 9):
        raise CheckpointError(
            f"{where}: unsupported U-Net with {unet.in_channels} input channels; supported: 4 (text-to-image) "
            "and 9 (inpainting)"
        )
    try:
        return ModelSpec(family, unet, vae, text, scheduler, pad_token, **second)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------------------- single file


def split_by_prefix(state_dict: StateDict, prefixes: dict[str, str], ignored: tuple[str, ...] = (),
                    ignored_keys: frozenset[str] = frozenset()) -> tuple[dict[str, StateDict], list[str]]:
    """({part: its tensors with the part's prefix removed}, the keys no prefix claims), skipping keys
    that start with `ignored` or are in `ignored_keys`. Prefixes are tried in order."""
    parts: dict[str, StateDict] = {name: {} for name in prefixes}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(ignored) or key in ignored_keys:
            continue
        part = next((name for name, p in prefixes.items() if key.startswith(p)), None)
        if part is None:
            unknown.append(key)
        else:
            parts[part][key[len(prefixes[part]):]] = value
    return parts, unknown


def split_single_file(state_dict: StateDict,
                      path: Path | str = "checkpoint") -> tuple[StateDict, StateDict, StateDict, str]:
    """Split an LDM checkpoint into U-Net, VAE and text-encoder dicts in our layout; returns the
    text-encoder kind too ("clip" for SD 1.x, "openclip" for SD 2.x)."""
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        raise CheckpointError(
            f"{path}: this is an SDXL checkpoint (conditioner.embedders.* keys): split it with "
            "export/loading/sdxl_file.py split_sdxl_file (load_model does)"
        )
    prefixes = {
        "unet": convert_ldm.UNET_PREFIX,
        "vae": convert_ldm.VAE_PREFIX,
        "clip": convert_ldm.CLIP_PREFIX,
        "openclip": convert_ldm.OPENCLIP_PREFIX,
    }
    parts, unknown = split_by_prefix(state_dict, prefixes, _LDM_IGNORED_PREFIXES, _LDM_SCHEDULE_BUFFERS)
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
        # an LCM-distilled U-Net's guidance embedding: cond_proj maps it [time_cond_proj_dim] -> [channels]
        "time_cond_proj_dim": _dim(sd, "time_embedding.cond_proj.weight", 1),
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
    family = base + ("-inpaint" if unet_fields.get("in_channels") == 9 else
                     "-lcm" if unet_fields.get("time_cond_proj_dim") else "")
    candidates = [preset(n) for n in PRESETS if preset(n).family.removesuffix("-inpaint") == base]
    full = next(s for s in candidates if s.unet.block_out_channels == UNetConfig().block_out_channels)

    try:
        unet_base = next((s.unet for s in candidates if _matches(_as_fields(s.unet), unet_fields,
                                                                       ("in_channels", "time_cond_proj_dim"))),
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
