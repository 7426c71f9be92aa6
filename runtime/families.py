"""Model families as data: how a request's conditioning becomes the U-Net's inputs.

What differs between Stable Diffusion families is (1) which U-Net inputs the text encoders fill,
named as the U-Net's contract names them (runtime/folder/networks.py), (2) what is stacked onto the
latents along the channel axis before the U-Net sees them, and (3) whether classifier-free guidance
runs an unconditional batch. A `Family` record says the first two (every family so far runs the
guidance batch; an LCM-distilled U-Net, which embeds the guidance scale instead, adds the third); the denoise stage
(runtime/stages.py) passes whatever the record gives, so adding a family is a record here, its
contract and tests, never a branch in `Pipeline` or the denoise loop.

    SD 1.x / 2.x   the CLIP hidden states -> encoder_hidden_states; SD 2.x differs only in data the
                   folder carries (v-prediction in its scheduler config, "!" padding, 1024 channels)
    inpaint-9ch    the same, and the latents carry the mask and the masked image's latents
                   (diffusers' StableDiffusionInpaintPipeline, num_channels_unet == 9)

A family is chosen by the manifest's `family` field (runtime/folder/manifest.py FAMILIES).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from runtime.errors import ManifestError

UnetInputs = Mapping[str, np.ndarray]  # U-Net contract input name -> [batch, ...]


@dataclass(frozen=True)
class Family:
    """One model family. `unet_inputs(cond_hidden, uncond_hidden)` -> (the conditional inputs, the
    unconditional ones or None when guidance is off), keyed by U-Net input name. `sample_extras`:
    the image-latent fields (runtime/stages.py ImageLatents: "mask", "masked") concatenated after the
    latents along the channel axis, in order."""

    name: str
    unet_inputs: Callable[[np.ndarray, np.ndarray | None], tuple[UnetInputs, UnetInputs | None]]
    sample_extras: tuple[str, ...] = ()


def _clip_hidden_states(cond: np.ndarray, uncond: np.ndarray | None) -> tuple[UnetInputs, UnetInputs | None]:
    """SD 1.x / 2.x: the text encoder's last hidden states are the cross-attention context."""
    return {"encoder_hidden_states": cond}, None if uncond is None else {"encoder_hidden_states": uncond}


SD = Family("sd", _clip_hidden_states)
SD_INPAINT = Family("sd-inpaint", _clip_hidden_states, sample_extras=("mask", "masked"))
FAMILIES: Mapping[str, Family] = {"sd1": SD, "sd2": SD, "sd1-inpaint": SD_INPAINT, "sd2-inpaint": SD_INPAINT}


def family_of(manifest_family: str) -> Family:
    """The record of a manifest's `family`."""
    try:
        return FAMILIES[manifest_family]
    except KeyError:
        raise ManifestError(f"model family {manifest_family!r} has no record in runtime/families.py; known: "
                            f"{', '.join(FAMILIES)}") from None
