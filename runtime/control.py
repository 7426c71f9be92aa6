"""ControlNet at run time (Zhang, Rao and Agrawala 2023, arXiv:2302.05543): the control settings of
a request, validated once (`make_control`, called by runtime/request.py make_request), and the U-Net
callable of one run that feeds the ControlNets' summed residuals to `unet_control`
(`controlled_unet`), as DeepCache's `cached_unet` routes calls (runtime/sampling/deepcache.py).

Names and semantics are diffusers 0.42's StableDiffusionControlNetPipeline (and its Img2Img and
Inpaint variants): `control_image`, `controlnet_conditioning_scale`, `control_guidance_start`,
`control_guidance_end`, `guess_mode`; several ControlNets at once (MultiControlNetModel: residuals
summed in order); per network call i of N, ControlNet k runs with scale
`scale_k * keep_k[i]`, keep_k[i] = 1 - (i / N < start_k or (i + 1) / N > end_k) (diffusers'
`controlnet_keep`; N counts network calls, as Schedule.timesteps does); guess mode runs the
ControlNets on the conditional half of the guidance batch only, the unconditional residuals zero,
each residual scaled by logspace(-1, 0, residuals) (diffusers ControlNetModel.forward). A call
where every ControlNet's scale is 0 runs the plain `unet` graph: residuals of zero add nothing.

Control images are RGB in [0, 1] at the request size (diffusers' control image processor:
no normalization, Lanczos resize of PIL input); `control_resize_mode` picks how an image of
another size gets there: RESIZE_MODES ("just_resize": stretched to the size, A1111's "Just Resize";
"crop_and_resize" and "resize_and_fill": the sd-webui-controlnet extension's, runtime/imaging/control.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import PipelineError
from runtime.imaging import control as control_maps
from runtime.imaging import images as imgs


def just_resize(image: Any, height: int, width: int, what: str) -> np.ndarray:
    """A1111's "Just Resize": the image stretched to height x width (Lanczos; diffusers' resize)."""
    return imgs.load_image(image, height, width, what)


# How a control image of another size reaches the request size: float32 RGB in [0, 1] at height x width
RESIZE_MODES: Mapping[str, Callable[[Any, int, int, str], np.ndarray]] = {
    "just_resize": just_resize, "crop_and_resize": control_maps.crop_and_resize,
    "resize_and_fill": control_maps.resize_and_fill}


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet of a request: the folder's ControlNet `name`, its control image (float32 [H, W,
    3] in [0, 1] at the request size, read-only), its scale and the fraction of the run it acts on."""

    name: str
    image: np.ndarray
    scale: float
    start: float
    end: float

    def key(self) -> tuple:
        return (self.name, self.scale, self.start, self.end)

    def keep(self, n_calls: int) -> np.ndarray:
        """diffusers' controlnet_keep for this unit: 1.0 where call i of n_calls acts, else 0.0."""
        i = np.arange(n_calls)
        return 1.0 - ((i / n_calls < self.start) | ((i + 1) / n_calls > self.end)).astype(np.float64)


@dataclass(frozen=True, eq=False)
class Control:
    """A request's ControlNets, in the order their residuals are summed."""

    units: tuple[ControlUnit, ...]
    guess_mode: bool = False

    def key(self) -> tuple:
        """What requests of one engine batch must share (the images may differ)."""
        return tuple(u.key() for u in self.units) + (self.guess_mode,)

    def parameters(self) -> dict[str, Any]:
        return {"controlnet": [{"model": u.name, "weight": u.scale, "guidance_start": u.start,
                                "guidance_end": u.end} for u in self.units], "guess_mode": self.guess_mode}


def _listed(value: Any, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise PipelineError(f"{what} has {len(values)} entries for {n} control images", field=what)
    return values


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(value)):
        raise PipelineError(f"{what} must be a finite number; got {value!r}", field=what)
    return float(value)


def _names(available: Sequence[str], controlnet: Any, n: int) -> list[str]:
    """The ControlNet of each control image: as named, or (None) the folder's only one."""
    names = _listed(controlnet, n, "controlnet")
    if None in names:
        if len(available) != 1:
            raise PipelineError(f"this engine folder has {len(available)} ControlNets ({', '.join(available)}): "
                                "name one per control image with controlnet=", field="controlnet")
        names = [available[0] if x is None else x for x in names]
    unknown = [x for x in names if x not in available]
    if unknown:
        raise PipelineError(f"unknown ControlNet {unknown[0]!r}; this engine folder has "
                            f"{', '.join(available) or 'none'}", field="controlnet")
    return names


def make_control(available: Sequence[str], height: int, width: int, *, control_image: Any = None,
                 controlnet: Any = None, controlnet_conditioning_scale: Any = 1.0, control_guidance_start: Any = 0.0,
                 control_guidance_end: Any = 1.0, guess_mode: Any = False,
                 control_resize_mode: Any = "just_resize") -> Control | None:
    """Validate a request's control settings against the folder's ControlNets (`available` names);
    None without a control image. `control_image`: one image (PIL or [H, W, 3] uint8 / float array)
    or a list, one per ControlNet; the other settings: one value for all, or a list (diffusers'
    names). Raises PipelineError with the setting's name as `field`."""
    if control_image is None:
        if controlnet is not None:
            raise PipelineError("controlnet names a ControlNet but no control_image is given", field="control_image")
        return None
    if not available:
        raise PipelineError("this engine folder has no ControlNet: build it with build-engine --controlnet PATH[:NAME]",
                            field="control_image")
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    n = len(images)
    if n == 0:
        raise PipelineError("control_image is an empty list", field="control_image")
    names = _names(available, controlnet, n)
    scales = [_number(v, "controlnet_conditioning_scale") for v in _listed(controlnet_conditioning_scale, n,
                                                                            "controlnet_conditioning_scale")]
    starts = [_number(v, "control_guidance_start") for v in _listed(control_guidance_start, n, "control_guidance_start")]
    ends = [_number(v, "control_guidance_end") for v in _listed(control_guidance_end, n, "control_guidance_end")]
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:  # diffusers' check_inputs
            raise PipelineError(f"control guidance must satisfy 0 <= start < end <= 1; got start {s}, end {e}",
                                field="control_guidance_start" if not 0.0 <= s < e else "control_guidance_end")
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise PipelineError(f"guess_mode must be True or False; got {guess_mode!r}", field="guess_mode")
    modes = _listed(control_resize_mode, n, "control_resize_mode")
    bad = [m for m in modes if m not in RESIZE_MODES]
    if bad:
        raise PipelineError(f"unknown control_resize_mode {bad[0]!r}; expected one of {', '.join(RESIZE_MODES)}",
                            field="control_resize_mode")
    units = []
    for k, (image, name, scale, s, e, mode) in enumerate(zip(images, names, scales, starts, ends, modes)):
        what = "control_image" if n == 1 else f"control_image[{k}]"
        arr = np.array(RESIZE_MODES[mode](image, height, width, what), dtype=np.float32)  # a private copy
        arr.flags.writeable = False
        units.append(ControlUnit(name, arr, scale, s, e))
    return Control(tuple(units), bool(guess_mode))


# --- the U-Net callable of one run -----------------------------------------------------------------------

Inputs = Mapping[str, np.ndarray]
UnetFn = Callable[[np.ndarray, np.ndarray, Inputs], np.ndarray]
CONTROLNET_INPUTS = ("encoder_hidden_states",)  # the conditioning inputs a ControlNet takes (its contract)


def guess_scales(n_residuals: int) -> np.ndarray:
    """Guess mode's per-residual factors: logspace(-1, 0, n) (diffusers ControlNetModel.forward: 0.1
    for the shallowest residual up to 1.0 for the mid block's)."""
    return np.logspace(-1.0, 0.0, n_residuals, dtype=np.float32)


def controlled_unet(unet: Any, unet_control: Any, controlnets: Sequence[Any], images: Sequence[np.ndarray],
                    control: Control, *, n_calls: int, guided: bool, latent_channels: int,
                    residual_names: Sequence[str]) -> UnetFn:
    """A `unet(sample, timestep, inputs) -> noise` callable for ONE denoising run (it counts calls):
    each call runs the ControlNet engines (`controlnets[k]` for `control.units[k]`, fed `images[k]`,
    [batch, 3, H, W] in [0, 1], one row per image of the batch) on the latents (the sample's first
    `latent_channels` channels: an inpainting U-Net's mask and masked latents are the U-Net's only),
    sums their residuals (`residual_names`, the contract's order) and runs `unet_control` with them;
    `unet` (the plain graph) where no ControlNet acts at that call. `guided`: the sample is the
    guidance batch [uncond, cond]."""
    keeps = [u.keep(n_calls) for u in control.units]
    factors = guess_scales(len(residual_names)) if control.guess_mode else np.ones(len(residual_names), np.float32)
    calls = 0

    def run(sample: np.ndarray, timestep: np.ndarray, inputs: Inputs) -> np.ndarray:
        nonlocal calls
        i, calls = calls, calls + 1
        if i >= n_calls:
            raise PipelineError(f"U-Net call {i} is past the ControlNet plan of {n_calls} calls")
        total = None
        for unit, net, image, keep in zip(control.units, controlnets, images, keeps):
            scale = unit.scale * keep[i]
            if scale == 0.0:
                continue
            res = _residuals(net, sample[:, :latent_channels], timestep, inputs, image, factors * np.float32(scale),
                             residual_names, guided=guided, cond_only=control.guess_mode and guided)
            total = res if total is None else [a + b for a, b in zip(total, res)]
        if total is None:
            return unet.run({"sample": sample, "timestep": timestep, **inputs})["noise_pred"]
        return unet_control.run({"sample": sample, "timestep": timestep, **inputs,
                                 **dict(zip(residual_names, total))})["noise_pred"]

    return run


def _residuals(net: Any, latents: np.ndarray, timestep: np.ndarray, inputs: Inputs, image: np.ndarray,
               scales: np.ndarray, names: Sequence[str], *, guided: bool, cond_only: bool) -> list[np.ndarray]:
    """One ControlNet's residuals for the whole batch: on the conditional half only with zeros for
    the unconditional half (`cond_only`, guess mode under guidance), else on every row (the
    control image repeated for both halves of a guidance batch)."""
    n = latents.shape[0]
    rows = slice(n // 2, n) if cond_only else slice(0, n)
    cond_image = image if not guided or cond_only else np.concatenate([image, image])
    count = rows.stop - rows.start
    feeds = {"sample": latents[rows], "timestep": timestep[rows], "controlnet_cond": cond_image,
             "conditioning_scale": np.broadcast_to(scales, (count, len(scales))).astype(np.float32),
             **{k: inputs[k][rows] for k in CONTROLNET_INPUTS}}
    out = net.run(feeds)
    res = [out[name] for name in names]
    if cond_only:
        res = [np.concatenate([np.zeros_like(r), r]) for r in res]
    return res
