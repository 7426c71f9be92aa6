"""Model families as data: how a request's conditioning becomes the U-Net's inputs.

What differs between Stable Diffusion families is (1) which U-Net inputs the text encoders fill,
named as the U-Net's contract names them (runtime/folder/networks.py), (2) what is stacked onto the
latents along the channel axis before the U-Net sees them, and (3) whether classifier-free guidance
runs an unconditional batch. A `Family` record says all three; the denoise stage
(runtime/stages.py) passes whatever the record gives, so adding a family is a record here, its
contract and tests, never a branch in `Pipeline` or the denoise loop.

    SD 1.x / 2.x   the CLIP hidden states -> encoder_hidden_states; SD 2.x differs only in data the
                   folder carries (v-prediction in its scheduler config, "!" padding, 1024 channels)
    inpaint-9ch    the same, and the latents carry the mask and the masked image's latents
                   (diffusers' StableDiffusionInpaintPipeline, num_channels_unet == 9)
    SDXL           two text encoders (`text_encoders`): each one's penultimate hidden states, concatenated
                   along the channels, are encoder_hidden_states; the second's pooled projection is
                   `text_embeds`; `time_ids` are the size conditioning (Podell et al. arXiv:2307.01952
                   §2.2: original size, crop top-left, target size)
    SDXL refiner   text_encoder_2 alone: its penultimate hidden states are encoder_hidden_states, its
                   pooled projection `text_embeds`; `time_ids` = original size, crop top-left and an
                   aesthetic score (§2.5; diffusers' StableDiffusionXLImg2ImgPipeline with
                   requires_aesthetics_score)
    LCM            an LCM-distilled U-Net (Luo et al. arXiv:2310.04378 §4.2; diffusers'
                   LatentConsistencyModelPipeline): no guidance batch and no negative prompt; the
                   guidance scale enters the U-Net as `timestep_cond`, an embedding of w = scale - 1

A family is chosen by the manifest's `family` field (runtime/folder/manifest.py FAMILIES).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from runtime.errors import ManifestError
from runtime.folder.networks import ModelDims

UnetInputs = Mapping[str, np.ndarray]  # U-Net contract input name -> [batch, ...]


@dataclass(frozen=True)
class Conditioning:
    """Text embeddings, one row per image: cond [batch, tokens, hidden] (the text encoders' hidden
    states, concatenated along the channels where there are several); uncond likewise, or None when
    guidance is off; pooled / uncond_pooled [batch, width]: the pooled output a family's U-Net takes
    (SDXL's text_embeds), None where it takes none."""

    cond: np.ndarray
    uncond: np.ndarray | None
    pooled: np.ndarray | None = None
    uncond_pooled: np.ndarray | None = None


@dataclass(frozen=True)
class TextEncoding:
    """One text encoder a family runs: the folder's `network`; `second`: it reads the second
    tokenizer's ids (the request's prompt_2 / negative_prompt_2: runtime/stages.py PromptTokens.second);
    `pooled`: the name of its pooled output the U-Net takes (Conditioning.pooled), None for none. Its
    hidden-state output is the contract's (runtime/folder/networks.py ModelDims.hidden_output)."""

    network: str
    second: bool = False
    pooled: str | None = None
# The guidance-scale embedding's scale and period: diffusers 0.42 LatentConsistencyModelPipeline
# .get_guidance_scale_embedding (after google-research/vdm model_vdm.py: w * 1000, max period 10000)
GUIDANCE_EMBEDDING_SCALE = 1000.0
GUIDANCE_EMBEDDING_PERIOD = 10000.0


@dataclass(frozen=True)
class Family:
    """One model family. `unet_inputs(text, guidance_scale=, dims=, size=)` -> (the conditional
    inputs, the unconditional ones or None when guidance is off), keyed by U-Net input name; `text` is
    a `Conditioning`, `dims` the folder's (runtime/folder/networks.py), `size` the image's (height,
    width) in pixels. `text_encoders`: the encoders that make `text`, in order. `sample_extras`: the image-latent
    fields (runtime/stages.py ImageLatents: "mask", "masked") concatenated after the latents along
    the channel axis, in order. `guidance_batch`: classifier-free guidance runs an unconditional
    batch (guidance_scale > 1); False: one U-Net batch per step whatever the scale, no negative
    prompt, the scale reaching the U-Net through `unet_inputs` only. `strength_in_schedule`: img2img
    strength narrows the skeleton the lcm / tcd samplers pick their timesteps from, all steps running
    (diffusers' LatentConsistencyModelImg2ImgPipeline: `LCMScheduler.set_timesteps(n, strength=)`),
    instead of skipping the first steps (StableDiffusionImg2ImgPipeline.get_timesteps)."""

    name: str
    unet_inputs: Callable[..., tuple[UnetInputs, UnetInputs | None]]
    sample_extras: tuple[str, ...] = ()
    guidance_batch: bool = True
    strength_in_schedule: bool = False
    text_encoders: tuple[TextEncoding, ...] = (TextEncoding("text_encoder"),)
    # The U-Net's first resolution level with self-attention (diffusers' down_block_types: the first
    # CrossAttnDownBlock2D): 0 for SD 1.x/2.x, at the latent resolution; 1 for SDXL base and refiner, whose
    # first level has none. runtime/memory.py sizes the attention score matrices from it.
    unet_attention_level: int = 0


def _clip_hidden_states(text: Conditioning, *, guidance_scale: float, dims: ModelDims,
                        size: tuple[int, int]) -> tuple[UnetInputs, UnetInputs | None]:
    """SD 1.x / 2.x: the text encoder's last hidden states are the cross-attention context."""
    uncond = None if text.uncond is None else {"encoder_hidden_states": text.uncond}
    return {"encoder_hidden_states": text.cond}, uncond


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """[batch] guidance weights -> [batch, dim] float32 sinusoidal embedding: sin then cos of
    (1000 w) * 10000^(-i / (dim / 2 - 1)), i < dim / 2, zero-padded to an odd dim (diffusers 0.42
    LatentConsistencyModelPipeline.get_guidance_scale_embedding). Computed in float64 and rounded
    once: diffusers' float32 arguments reach thousands of radians, where its own rounding moves a
    sine by about 1e-4, so no float32 recipe reproduces another library's bits."""
    half = dim // 2
    if half < 2:
        raise ManifestError(f"a guidance embedding of width {dim} is too narrow (at least 4)")
    freqs = np.exp(-np.log(GUIDANCE_EMBEDDING_PERIOD) * np.arange(half, dtype=np.float64) / (half - 1))
    args = (np.asarray(w, dtype=np.float64) * GUIDANCE_EMBEDDING_SCALE)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


def _lcm_inputs(text: Conditioning, *, guidance_scale: float, dims: ModelDims,
                size: tuple[int, int]) -> tuple[UnetInputs, None]:
    """LCM-distilled U-Net: the hidden states, and `timestep_cond`, the embedding of w = guidance_scale
    - 1 for every row (diffusers' LatentConsistencyModelPipeline: its LCM guidance is w + 1 in the
    StableDiffusionPipeline convention). No unconditional inputs."""
    w = np.full((text.cond.shape[0],), np.float32(guidance_scale - 1.0), dtype=np.float32)
    return {"encoder_hidden_states": text.cond, "timestep_cond": guidance_embedding(w, dims.time_cond_proj_dim)}, None


# SDXL base's size conditioning: original size, crop top-left, target size (6 values; the refiner's 5
# carry an aesthetic score instead of the target size)
SDXL_TIME_IDS = 6
SDXL_REFINER_TIME_IDS = 5
# The refiner's aesthetic scores, conditional and unconditional rows: diffusers 0.42
# StableDiffusionXLImg2ImgPipeline.__call__ defaults aesthetic_score=6.0, negative_aesthetic_score=2.5
# (Podell et al. arXiv:2307.01952 §2.5 conditions the refiner on the LAION aesthetic score)
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def _sdxl_inputs(text: Conditioning, *, guidance_scale: float, dims: ModelDims,
                 size: tuple[int, int]) -> tuple[UnetInputs, UnetInputs | None]:
    """SDXL: both encoders' hidden states (concatenated by the text stage), the pooled `text_embeds`
    and `time_ids` = original size (H, W), crop top-left (0, 0), target size (H, W), the request's
    size for both, and the same for the unconditional rows (diffusers 0.42 StableDiffusionXLPipeline
    `_get_add_time_ids` with its defaults: original_size = target_size = (height, width),
    crops_coords_top_left = (0, 0); negative_original_size etc. default to the same)."""
    h, w = size
    ids = np.array([h, w, 0, 0, h, w], dtype=np.float32)
    return _text_time(text, dims, ids, ids, SDXL_TIME_IDS, "the base model's (an SDXL refiner folder is family "
                                                           "'sdxl-refiner')")


def _sdxl_refiner_inputs(text: Conditioning, *, guidance_scale: float, dims: ModelDims,
                         size: tuple[int, int]) -> tuple[UnetInputs, UnetInputs | None]:
    """The SDXL refiner: text_encoder_2's hidden states and pooled `text_embeds`, and `time_ids` =
    original size (H, W), crop top-left (0, 0), aesthetic score: 6.0 on the conditional rows, 2.5 on
    the unconditional ones (diffusers 0.42 StableDiffusionXLImg2ImgPipeline `_get_add_time_ids` with
    requires_aesthetics_score and its defaults; original_size = the image's size)."""
    h, w = size
    cond = np.array([h, w, 0, 0, AESTHETIC_SCORE], dtype=np.float32)
    uncond = np.array([h, w, 0, 0, NEGATIVE_AESTHETIC_SCORE], dtype=np.float32)
    return _text_time(text, dims, cond, uncond, SDXL_REFINER_TIME_IDS, "the refiner's")


def _text_time(text: Conditioning, dims: ModelDims, cond_ids: np.ndarray, uncond_ids: np.ndarray, n_ids: int,
               whose: str) -> tuple[UnetInputs, UnetInputs | None]:
    """SDXL's text_time inputs: hidden states, pooled text_embeds and one row of time ids per image."""
    if dims.time_ids != n_ids or text.pooled is None:
        raise ManifestError(f"this SDXL U-Net takes {dims.time_ids} time ids ({whose}: {n_ids}) and a pooled text "
                            "embedding: the folder's family does not fit its U-Net")

    def inputs(hidden: np.ndarray, pooled: np.ndarray, ids: np.ndarray) -> UnetInputs:
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": np.tile(ids, (hidden.shape[0], 1))}

    uncond = None if text.uncond is None else inputs(text.uncond, text.uncond_pooled, uncond_ids)
    return inputs(text.cond, text.pooled, cond_ids), uncond


SD = Family("sd", _clip_hidden_states)
SD_INPAINT = Family("sd-inpaint", _clip_hidden_states, sample_extras=("mask", "masked"))
SD_LCM = Family("sd-lcm", _lcm_inputs, guidance_batch=False, strength_in_schedule=True)
# diffusers StableDiffusionXLPipeline.encode_prompt: text_encoder on `prompt`, text_encoder_2 on `prompt_2`;
# the pooled output is text_encoder_2's
_SDXL_ENCODERS = (TextEncoding("text_encoder"), TextEncoding("text_encoder_2", second=True, pooled="text_embeds"))
SDXL = Family("sdxl", _sdxl_inputs, text_encoders=_SDXL_ENCODERS, unet_attention_level=1)
SDXL_INPAINT = Family("sdxl-inpaint", _sdxl_inputs, sample_extras=("mask", "masked"), text_encoders=_SDXL_ENCODERS,
                      unet_attention_level=1)
# diffusers StableDiffusionXLImg2ImgPipeline.encode_prompt without text_encoder: tokenizer_2 / text_encoder_2
# read `prompt` (prompt_2 is zipped away), so the refiner folder's one tokenizer is its first
SDXL_REFINER = Family("sdxl-refiner", _sdxl_refiner_inputs,
                      text_encoders=(TextEncoding("text_encoder_2", pooled="text_embeds"),), unet_attention_level=1)
FAMILIES: Mapping[str, Family] = {"sd1": SD, "sd2": SD, "sd1-inpaint": SD_INPAINT, "sd2-inpaint": SD_INPAINT,
                                  "sd1-lcm": SD_LCM, "sd2-lcm": SD_LCM, "sdxl": SDXL, "sdxl-inpaint": SDXL_INPAINT,
                                  "sdxl-refiner": SDXL_REFINER}


def family_of(manifest_family: str) -> Family:
    """The record of a manifest's `family`."""
    try:
        return FAMILIES[manifest_family]
    except KeyError:
        raise ManifestError(f"model family {manifest_family!r} has no record in runtime/families.py; known: "
                            f"{', '.join(FAMILIES)}") from None
