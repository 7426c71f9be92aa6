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
# The guidance-scale embedding's scale and period: diffusers 0.42 LatentConsistencyModelPipeline
# .get_guidance_scale_embedding (after google-research/vdm model_vdm.py: w * 1000, max period 10000)
GUIDANCE_EMBEDDING_SCALE = 1000.0
GUIDANCE_EMBEDDING_PERIOD = 10000.0


@dataclass(frozen=True)
class Family:
    """One model family. `unet_inputs(cond_hidden, uncond_hidden, guidance_scale=, dims=)` -> (the
    conditional inputs, the unconditional ones or None when guidance is off), keyed by U-Net input
    name; `dims` are the folder's (runtime/folder/networks.py). `sample_extras`: the image-latent
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


def _clip_hidden_states(cond: np.ndarray, uncond: np.ndarray | None, *, guidance_scale: float,
                        dims: ModelDims) -> tuple[UnetInputs, UnetInputs | None]:
    """SD 1.x / 2.x: the text encoder's last hidden states are the cross-attention context."""
    return {"encoder_hidden_states": cond}, None if uncond is None else {"encoder_hidden_states": uncond}


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


def _lcm_inputs(cond: np.ndarray, uncond: np.ndarray | None, *, guidance_scale: float,
                dims: ModelDims) -> tuple[UnetInputs, None]:
    """LCM-distilled U-Net: the hidden states, and `timestep_cond`, the embedding of w = guidance_scale
    - 1 for every row (diffusers' LatentConsistencyModelPipeline: its LCM guidance is w + 1 in the
    StableDiffusionPipeline convention). No unconditional inputs."""
    w = np.full((cond.shape[0],), np.float32(guidance_scale - 1.0), dtype=np.float32)
    return {"encoder_hidden_states": cond, "timestep_cond": guidance_embedding(w, dims.time_cond_proj_dim)}, None


SD = Family("sd", _clip_hidden_states)
SD_INPAINT = Family("sd-inpaint", _clip_hidden_states, sample_extras=("mask", "masked"))
SD_LCM = Family("sd-lcm", _lcm_inputs, guidance_batch=False, strength_in_schedule=True)
FAMILIES: Mapping[str, Family] = {"sd1": SD, "sd2": SD, "sd1-inpaint": SD_INPAINT, "sd2-inpaint": SD_INPAINT,
                                  "sd1-lcm": SD_LCM, "sd2-lcm": SD_LCM}


def family_of(manifest_family: str) -> Family:
    """The record of a manifest's `family`."""
    try:
        return FAMILIES[manifest_family]
    except KeyError:
        raise ManifestError(f"model family {manifest_family!r} has no record in runtime/families.py; known: "
                            f"{', '.join(FAMILIES)}") from None
