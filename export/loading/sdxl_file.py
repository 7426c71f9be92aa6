"""Original single-file SDXL checkpoints (Stability-AI/generative-models, `sgm`): split into our four
networks and their configs told from the tensor shapes.

Layout (sgm/models/diffusion.py DiffusionEngine; sgm/modules/encoders/modules.py GeneralConditioner):
  model.diffusion_model.*                 the U-Net in the LDM layout, plus `label_emb.0.{0,2}` (ours:
                                          add_embedding.linear_1/2; export/convert_ldm.py)
  first_stage_model.*                     the VAE, as SD 1.x/2.x's
  conditioner.embedders.0.transformer.*   CLIP ViT-L/14 in Hugging Face keys (text_model.*)
  conditioner.embedders.1.model.*         OpenCLIP ViT-bigG/14 text tower in OpenCLIP keys (in_proj
                                          split into q/k/v, text_projection transposed:
                                          convert_ldm.openclip_g_from_ldm)
The refiner's file (sgm configs/inference/sd_xl_refiner.yaml) has one embedder, the OpenCLIP tower, as
conditioner.embedders.0.model.*, and 5 time ids (original size, crop top-left, aesthetic score:
`adm_in_channels: 2560` = 1280 + 5 * 256); it loads as family "sdxl-refiner" (text_encoder_2 only).

What the shapes cannot tell is SDXL's rule or preset: 64-channel attention heads (sgm
configs/inference/sd_xl_base.yaml `num_head_channels: 64`; both CLIP towers too), 32 norm groups,
CLIP-L's quick_gelu and bigG's gelu, the VAE's scaling factor 0.13025 (sd_xl_base.yaml
`scale_factor`), the scheduler (stable-diffusion-xl-base-1.0's EulerDiscreteScheduler config), the
padding of both tokenizers (<|endoftext|>, "!"). The time-id embedding width is what add_embedding's
input leaves after the pooled projection, over 6 time ids (sd_xl_base.yaml `adm_in_channels: 2816` =
1280 + 6 * 256).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from export import convert_ldm
from export.configs import preset
from export.convert_ldm import CheckpointError
from export.loading.infer import (StateDict, _count, _dim, _make_spec, infer_text_fields, infer_unet_fields,
                                  infer_vae_fields, split_by_prefix)

# SDXL's 6 time ids: original size, crop top-left, target size (Podell et al. arXiv:2307.01952 §2.2); the
# refiner's 5: original size, crop top-left, aesthetic score (§2.5)
TIME_IDS = 6
REFINER_TIME_IDS = 5
# The refiner's OpenCLIP tower: its only embedder (sd_xl_refiner.yaml conditioner emb_models[0])
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
HEAD_WIDTH = 64  # sd_xl_base.yaml num_head_channels; CLIP ViT-L/14 and ViT-bigG/14 heads are 64 wide too
_IGNORED = ("model_ema.", "first_stage_model.loss.", "denoiser.", "conditioner.embedders.1.model.logit_scale",
            "conditioner.embedders.0.model.logit_scale")


def is_sdxl_file(state_dict: StateDict) -> bool:
    return any(k.startswith("conditioner.embedders.") for k in state_dict)


def is_refiner_file(state_dict: StateDict) -> bool:
    """An SDXL refiner's single file: its one embedder is the OpenCLIP tower (module doc)."""
    return any(k.startswith(REFINER_OPENCLIP_PREFIX) for k in state_dict)


def split_sdxl_file(state_dict: StateDict, path: Path | str = "checkpoint") -> tuple[StateDict, ...]:
    """(U-Net, VAE, text encoder, text encoder 2) state dicts in our layout, (U-Net, VAE, text encoder 2)
    for the refiner's; unknown keys are an error naming them."""
    prefixes = {"unet": convert_ldm.UNET_PREFIX, "vae": convert_ldm.VAE_PREFIX,
                "clip": convert_ldm.SDXL_CLIP_PREFIX, "openclip": convert_ldm.SDXL_OPENCLIP_PREFIX}
    if is_refiner_file(state_dict):
        prefixes = {"unet": convert_ldm.UNET_PREFIX, "vae": convert_ldm.VAE_PREFIX, "openclip": REFINER_OPENCLIP_PREFIX}
    parts, unknown = split_by_prefix(state_dict, prefixes, _IGNORED)
    empty = [prefixes[name] for name, sd in parts.items() if not sd]
    if unknown or empty:
        shown = ", ".join(sorted(unknown)[:5]) + (f", ... ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CheckpointError(f"{path}: not an SDXL checkpoint of the sgm layout"
                              + (f"; unexpected keys: {shown}" if unknown else "")
                              + (f"; no {', '.join(empty)}* keys" if empty else ""))
    try:  # the layout rules reshape, split and join tensors: shapes a checkpoint lies about fail here
        text = (convert_ldm.clip_from_file(parts["clip"]),) if "clip" in parts else ()
        return (convert_ldm.unet_from_ldm(parts["unet"]), convert_ldm.vae_from_ldm(parts["vae"]), *text,
                convert_ldm.openclip_g_from_ldm(parts["openclip"]))
    except (RuntimeError, IndexError, ValueError) as e:
        raise CheckpointError(f"{path}: tensors of unexpected shapes for the SDXL layout: {e}") from e


def _text_config(sd: StateDict, act: str, pad_id: int, base: dict[str, Any]) -> dict[str, Any]:
    fields = infer_text_fields({k.removeprefix("text_model."): v for k, v in sd.items()})
    hidden = fields["hidden_size"]
    if hidden % HEAD_WIDTH:
        raise ValueError(f"text encoder width {hidden} is not a multiple of the CLIP head width {HEAD_WIDTH}")
    projection = _dim(sd, "text_projection.weight", 0)
    return {**base, **fields, "num_attention_heads": hidden // HEAD_WIDTH, "hidden_act": act, "pad_token_id": pad_id,
            **({"projection_dim": projection} if projection else {})}


def infer_sdxl_spec(*weights: StateDict, prediction_type: str | None = None, where: Path | str = "checkpoint"):
    """The `ModelSpec` of an SDXL single file from its state dicts in our layout (`split_sdxl_file`'s:
    U-Net, VAE, [text encoder,] text encoder 2): the shapes' fields over the full-size `sdxl` (or
    `sdxl-refiner`, without the first text encoder) preset, with SDXL's rules (module doc) for the rest."""
    refiner = len(weights) == 3
    unet_sd, vae_sd, text_2_sd = weights[0], weights[1], weights[-1]
    full, n_ids = (preset("sdxl-refiner"), REFINER_TIME_IDS) if refiner else (preset("sdxl"), TIME_IDS)
    try:
        text_2 = _text_config(text_2_sd, "gelu", 0, full.text_encoder_2)
        unet = _unet_config(unet_sd, full.unet, text_2["projection_dim"], n_ids)
        vae = replace(full.vae, **infer_vae_fields(vae_sd))
        text = None if refiner else _text_config(weights[2], "quick_gelu", 49407, full.text_encoder)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: cannot infer a supported SDXL config: {e}") from e
    scheduler = dict(full.scheduler) if prediction_type is None else {**full.scheduler,
                                                                      "prediction_type": prediction_type}
    family = "sdxl-refiner" if refiner else "sdxl-inpaint" if unet.in_channels == 9 else "sdxl"
    return _make_spec(family, unet, vae, text, scheduler, full.pad_token, Path(where), text_encoder_2=text_2,
                      pad_token_2=full.pad_token_2, force_zeros_for_empty_prompt=full.force_zeros_for_empty_prompt)


def _unet_config(unet_sd: StateDict, full: Any, projection: int, n_ids: int) -> Any:
    """The U-Net config of an SDXL file: heads 64 wide, transformer depths counted per block (a block
    without attention: 1, or the mid block's where it is the last, whose depth diffusers' mid block
    reads: the refiner's), the time-id width from add_embedding's input after the pooled projection."""
    fields = infer_unet_fields(unet_sd)
    channels = fields["block_out_channels"]
    if any(c % HEAD_WIDTH for c in channels):
        raise ValueError(f"block channels {channels} are not multiples of the SDXL head width {HEAD_WIDTH}")
    n = len(channels)
    attention = fields.pop("transformer_layers_per_block", None)  # the mid block's depth
    depths = tuple(_count(unet_sd, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")
                   or (attention if b == n - 1 and attention else 1) for b in range(n))
    pooled_in = _dim(unet_sd, "add_embedding.linear_1.weight", 1)
    if pooled_in is None or (pooled_in - projection) % n_ids:
        raise ValueError(f"add_embedding takes {pooled_in} channels, not the pooled projection "
                         f"({projection}) and {n_ids} time-id embeddings")
    if attention is not None and attention != depths[-1]:
        raise ValueError(f"the mid block's depth {attention} differs from the last down block's {depths[-1]}")
    return replace(full, **fields, transformer_layers_per_block=depths,
                   attention_head_dim=tuple(c // HEAD_WIDTH for c in channels),
                   addition_time_embed_dim=(pooled_in - projection) // n_ids,
                   projection_class_embeddings_input_dim=pooled_in)

