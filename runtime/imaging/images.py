"""Image and mask conversion at the pipeline's edges: PIL images or NumPy arrays in, float arrays in
the layouts the networks take, and back.

Input policy (documented in the README):
- An image is a PIL image of any mode (converted to RGB; an alpha channel is dropped, as diffusers'
  `image.convert("RGB")` does) or an array of shape [H, W] (gray), [H, W, 1], [H, W, 3] or [H, W, 4]
  (alpha dropped), uint8 in [0, 255] or float in [0, 1]. Floats outside [0, 1] are an error.
- A mask is the same, reduced to one channel (PIL mode "L", or ITU-R 601 luma for RGB arrays) and
  binarized at 0.5 (diffusers' `VaeImageProcessor.binarize`): 1 (white) = repaint, 0 (black) = keep.
- A mask must have the same size as its image; anything else is an error, not a silent resize.
- The request size is (height, width) when given; otherwise the image's own size rounded down to a
  multiple of the VAE scale factor (diffusers' `get_default_height_width`). An image (and its mask)
  of another size is resized to the request size with Lanczos resampling (diffusers' default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from runtime.errors import ImageInputError

__all__ = ["ImageInputError", "from_network", "image_size", "latent_mask", "load_image", "load_mask", "to_network",
           "to_pil"]

# PIL's "L" conversion weights (ITU-R 601-2 luma), so an RGB array mask gives what a PIL mask would.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an [H, W, ...] array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"an image must be a PIL image or a numpy array; got {type(image).__name__}")
    arr = image
    if arr.ndim not in (2, 3):
        raise ImageInputError(f"an image array must have shape [H, W] or [H, W, C]; got shape {arr.shape}")
    return int(arr.shape[0]), int(arr.shape[1])


def _as_float_hwc(image, what: str) -> np.ndarray:
    """Any accepted image to float32 [H, W, C] in [0, 1], C in (1, 3, 4)."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image)
        if image.mode not in ("RGB", "RGBA", "L"):
            arr = np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
        if arr.dtype != np.uint8:  # modes I;16, I, F reach here only through RGB conversion above
            raise ImageInputError(f"{what}: unsupported PIL image mode {image.mode!r}")
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise ImageInputError(f"{what} must be a PIL image or a numpy array; got {type(image).__name__}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageInputError(f"{what} array must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; "
                              f"got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageInputError(f"{what} is empty: shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind == "f":
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise ImageInputError(f"{what} contains NaN or infinite values")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageInputError(f"{what}: float arrays must hold values in [0, 1]; got range [{lo:.3g}, {hi:.3g}]")
        return out
    if arr.dtype == bool:
        return arr.astype(np.float32)
    raise ImageInputError(f"{what}: array dtype must be uint8 or float; got {arr.dtype}")


def _resize(hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lanczos-resize a float [H, W, C] array channel by channel (PIL mode "F" keeps float precision)."""
    if hwc.shape[:2] == (height, width):
        return hwc
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(hwc[:, :, c]))
                           .resize((width, height), resample=Image.Resampling.LANCZOS))
                for c in range(hwc.shape[2])]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0)


def _resize_pil(image: Image.Image, height: int, width: int) -> Image.Image:
    if (image.height, image.width) == (height, width):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def load_image(image, height: int, width: int, what: str = "image") -> np.ndarray:
    """An accepted image to float32 RGB [H, W, 3] in [0, 1] at height x width."""
    if isinstance(image, Image.Image):
        # Convert, then resize as uint8, exactly as diffusers' VaeImageProcessor does for PIL input.
        return _as_float_hwc(_resize_pil(image.convert("RGB"), height, width), what)
    arr = _as_float_hwc(image, what)
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return _resize(arr, height, width)


def load_mask(mask, height: int, width: int, what: str = "mask_image", *, binary: bool = True) -> np.ndarray:
    """An accepted mask to a binary float32 [H, W] array at height x width: 1 = repaint, 0 = keep
    (`binary=False`: its grey levels in [0, 1], for A1111's inpainting, runtime/imaging/inpainting.py)."""
    if isinstance(mask, Image.Image):
        arr = _as_float_hwc(_resize_pil(mask.convert("L"), height, width), what)[:, :, 0]
    else:
        hwc = _as_float_hwc(mask, what)
        if hwc.shape[2] >= 3:
            hwc = (hwc[:, :, :3] @ _LUMA)[:, :, None]
        arr = _resize(hwc[:, :, :1], height, width)[:, :, 0]
    return (arr >= 0.5).astype(np.float32) if binary else arr.astype(np.float32)


def to_network(images_hwc: Sequence[np.ndarray]) -> np.ndarray:
    """[H, W, 3] arrays in [0, 1] to one float32 NCHW batch in [-1, 1] (the VAE encoder's input)."""
    batch = np.stack([np.asarray(im, dtype=np.float32) for im in images_hwc])
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2)) * 2.0 - 1.0


def from_network(images_nchw: np.ndarray) -> np.ndarray:
    """The VAE decoder's NCHW output in [-1, 1] to NHWC float32 in [0, 1] (diffusers' postprocess:
    `(x / 2 + 0.5).clamp(0, 1)`). NaN stays NaN: the caller reports it."""
    x = np.asarray(images_nchw, dtype=np.float32).transpose(0, 2, 3, 1)
    return np.clip(x / 2.0 + 0.5, 0.0, 1.0)


def to_pil(images_nhwc: np.ndarray) -> list[Image.Image]:
    """NHWC float in [0, 1] to RGB PIL images, rounding as diffusers' `numpy_to_pil` does. NaN
    becomes 0 (the pipeline warns before this)."""
    arr = np.nan_to_num(np.asarray(images_nhwc, dtype=np.float32), nan=0.0)
    arr = (arr * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def latent_mask(mask_hw: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """A [H, W] mask down to [1, 1, lh, lw] by nearest-neighbour sampling, as
    `torch.nn.functional.interpolate(mask, size=...)` (mode "nearest": source index floor(i * H / lh))."""
    h, w = mask_hw.shape
    rows = np.floor(np.arange(latent_height) * (h / latent_height)).astype(np.int64)
    cols = np.floor(np.arange(latent_width) * (w / latent_width)).astype(np.int64)
    return np.ascontiguousarray(mask_hw[np.ix_(rows, cols)][None, None].astype(np.float32))
