"""The upscalers that need no weights, as AUTOMATIC1111 v1.10 runs them (hires fix, the extras tab).

Latent upscalers (A1111 modules/shared.py `latent_upscale_modes`) resize the latents with
`torch.nn.functional.interpolate(samples, size, mode, antialias)` (processing.py
StableDiffusionProcessingTxt2Img.sample_hr_pass). `interpolate` below is that call re-derived in
NumPy, float32 operation for operation as PyTorch's CPU kernels compute it (aten/src/ATen/native/
UpSample.h `area_pixel_compute_source_index`, `guard_index_and_lambda`, `nearest_idx`,
`get_cubic_upsample_coefficients`; cpu/UpSampleKernel.cpp `compute_indices_weights_*`, the generic
`Interpolate` sum and, for antialias, `_compute_indices_min_size_weights_aa` applied width first,
then height), with the multiply-adds fused where the compiled kernels fuse them (`_fma`). The result
equals torch 2.13's CPU output bit for bit for the nearest modes, antialiased bilinear upscaling and
bilinear through torch's generic 2-D kernel (output height + width > 128, i.e. latents of 1024 px
and up); elsewhere (bicubic, and torch's separable kernel for small bilinear outputs) it is within
float32 rounding of it (tests/test_a1111_hires.py checks every mode against torch, exactly or at
4e-6).

Image upscalers (A1111 modules/upscaler.py `UpscalerNone`, `UpscalerLanczos`, `UpscalerNearest`)
resize a PIL image; `upscale` is `Upscaler.upscale` and `resize_to` is images.py `resize_image`
with resize mode 0 ("just resize"), which hires fix calls with the target size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = ["IMAGE_UPSCALERS", "LATENT_MODES", "UPSCALERS", "interpolate", "is_latent", "resize_to", "upscale"]

# A1111 modules/shared.py latent_upscale_modes: name -> (torch interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111 modules/upscaler.py: the upscalers that ship without weights, in shared.sd_upscalers' order
IMAGE_UPSCALERS: dict[str, Image.Resampling | None] = {
    "None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
UPSCALERS = (*IMAGE_UPSCALERS, *LATENT_MODES)  # every name hires fix accepts here
CUBIC_A = -0.75  # UpSample.h get_cubic_upsample_coefficients (Keys' a; PyTorch's bicubic)
CUBIC_A_AA = -0.5  # UpSampleKernel.cpp HelperInterpCubic::aa_filter (Pillow's a, with antialias)
_F = np.float32


def is_latent(name: str) -> bool:
    return name in LATENT_MODES


# --- latents ----------------------------------------------------------------------------------------------

def interpolate(x: np.ndarray, size: tuple[int, int], mode: str, antialias: bool = False) -> np.ndarray:
    """`torch.nn.functional.interpolate(x, size=size, mode=mode, antialias=antialias)` with
    align_corners False, for float32 [N, C, H, W]: a new array, `x` untouched."""
    x = np.asarray(x, dtype=np.float32)
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], size
    if mode in ("nearest", "nearest-exact"):
        rows = _nearest_index(h_in, h_out, exact=mode == "nearest-exact")
        cols = _nearest_index(w_in, w_out, exact=mode == "nearest-exact")
        return np.ascontiguousarray(x[..., rows[:, None], cols[None, :]])
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolate mode must be nearest, nearest-exact, bilinear or bicubic; got {mode!r}")
    if antialias:  # separable: width first, then height, each a normalized 1-D filter
        if (h_in, w_in) == (h_out, w_out):
            return x.copy()
        out = x
        if w_out != w_in:
            out = _apply_1d(out, *_aa_weights(w_in, w_out, mode), axis=-1)
        if h_out != h_in:
            out = _apply_1d(out, *_aa_weights(h_in, h_out, mode), axis=-2)
        return out
    if mode == "bilinear":  # two taps per side, width then height: fma(x0, w0, x1 * w1)
        (ih, wh), (iw, ww) = _linear_weights(h_in, h_out), _linear_weights(w_in, w_out)
        t = _fma(x[..., iw[0]], ww[0], x[..., iw[1]] * ww[1])
        return _fma(t[..., ih[0], :], wh[0][:, None], t[..., ih[1], :] * wh[1][:, None])
    (ih, wh), (iw, ww) = _cubic_weights(h_in, h_out), _cubic_weights(w_in, w_out)
    out = None
    for a in range(4):  # torch's Interpolate: sum over rows of (sum over columns) * row weight
        t = None
        for b in range(4):
            term = x[..., ih[a][:, None], iw[b][None, :]] * ww[b][None, :]
            t = term if t is None else t + term
        term = t * wh[a][:, None]
        out = term if out is None else out + term
    return out.astype(np.float32, copy=False)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once, as the fused multiply-add PyTorch's CPU kernels are compiled
    to (the product of two float32 is exact in float64)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(_F)


def _scale(n_in: int, n_out: int) -> np.float32:
    """UpSample.h compute_scales_value without a scale factor: float(input) / output."""
    return _F(n_in) / _F(n_out)


def _nearest_index(n_in: int, n_out: int, *, exact: bool) -> np.ndarray:
    """UpSample.h nearest_idx / nearest_exact_idx (same size copies; twice the size is i >> 1)."""
    i = np.arange(n_out)
    if not exact and n_out == n_in:
        return i
    if not exact and n_out == 2 * n_in:
        return i >> 1
    src = (i.astype(_F) + (_F(0.5) if exact else _F(0))) * _scale(n_in, n_out)
    return np.minimum(np.floor(src).astype(np.int64), n_in - 1)


def _source(n_in: int, n_out: int, cubic: bool) -> tuple[np.ndarray, np.ndarray]:
    """(index, lambda): area_pixel_compute_source_index then guard_index_and_lambda, in float32."""
    src = _fma(_scale(n_in, n_out), np.arange(n_out).astype(_F) + _F(0.5), _F(-0.5))
    if not cubic:
        src = np.where(src < 0, _F(0), src).astype(_F)
    index = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.minimum(np.maximum(src - index.astype(_F), _F(0)), _F(1)).astype(_F)
    return index, lam


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    index, lam = _source(n_in, n_out, cubic=False)
    index1 = index + (index < n_in - 1)
    return np.stack([index, index1]), np.stack([(_F(1) - lam).astype(_F), lam])


def _cubic1(x: np.ndarray, a: float) -> np.ndarray:
    """UpSample.h cubic_convolution1 (|x| <= 1), in float32, its first multiply-add fused as the
    compiled kernel has it (tests/test_a1111_hires.py finds the bits equal)."""
    a = _F(a)
    return (_fma(a + _F(2), x, -(a + _F(3))) * x * x + _F(1)).astype(_F)


def _cubic2(x: np.ndarray, a: float) -> np.ndarray:
    """UpSample.h cubic_convolution2 (1 < |x| < 2), in float32, its first two multiply-adds fused."""
    a = _F(a)
    return (_fma(_fma(a, x, -(_F(5) * a)), x, _F(8) * a) * x - _F(4) * a).astype(_F)


def _cubic_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    index, t = _source(n_in, n_out, cubic=True)
    x2 = (_F(1) - t).astype(_F)
    coeffs = [_cubic2(t + _F(1), CUBIC_A), _cubic1(t, CUBIC_A), _cubic1(x2, CUBIC_A), _cubic2(x2 + _F(1), CUBIC_A)]
    indices = [np.clip(index - 1 + j, 0, n_in - 1) for j in range(4)]
    return np.stack(indices), np.stack(coeffs)


def _aa_filter(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    def linear(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        return np.where(x < 1, (_F(1) - x).astype(_F), _F(0)).astype(_F)

    def cubic(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        return np.where(x < 1, _cubic1(x, CUBIC_A_AA), np.where(x < 2, _cubic2(x, CUBIC_A_AA), _F(0))).astype(_F)

    return linear if mode == "bilinear" else cubic


def _aa_weights(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """([taps, n_out] indices, [taps, n_out] weights): UpSampleKernel.cpp
    _compute_indices_min_size_weights_aa (float32 state; the `+ 0.5` terms are double in C++)."""
    scale = _scale(n_in, n_out)
    interp = 2 if mode == "bilinear" else 4
    support = _F(interp * 0.5 * float(scale)) if scale >= 1 else _F(interp * 0.5)
    invscale = _F(1.0 / float(scale)) if scale >= 1 else _F(1)
    taps = int(np.ceil(support)) * 2 + 1
    index, weight = np.zeros((taps, n_out), np.int64), np.zeros((taps, n_out), _F)
    filt = _aa_filter(mode)
    for i in range(n_out):
        center = _F(float(scale) * (i + 0.5))
        lo = max(int(float(center - support) + 0.5), 0)
        size = min(max(min(int(float(center + support) + 0.5), n_in) - lo, 0), taps)
        j = np.arange(size)
        arg = ((((j + lo).astype(_F) - center).astype(np.float64) + 0.5) * float(invscale)).astype(_F)
        w = filt(arg)
        total = _F(0)
        for v in w:  # sequential float32 sum, as the kernel's loop
            total = _F(total + v)
        if total != 0:
            w = (w / total).astype(_F)
        index[:size, i], weight[:size, i] = j + lo, w
    return index, weight


def _apply_1d(x: np.ndarray, index: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """out[..., i] = sum_j x[..., index[j, i]] * weight[j, i] along `axis`, in tap order, each
    term fused into the running sum (float32)."""
    def w(j: int) -> np.ndarray:
        return weight[j] if axis == -1 else weight[j][:, None]

    out = (np.take(x, index[0], axis=axis) * w(0)).astype(_F)
    for j in range(1, index.shape[0]):
        out = _fma(np.take(x, index[j], axis=axis), w(j), out)
    return out


# --- images -----------------------------------------------------------------------------------------------

def upscale(image: Image.Image, scale: float, name: str) -> Image.Image:
    """A1111 Upscaler.upscale: up to three passes of the upscaler's `do_upscale` (Lanczos and Nearest
    resize by `scale`; None returns the image) until both sides reach the destination, which is the
    scaled size rounded down to a multiple of 8; then a Lanczos resize to exactly that size."""
    resample = IMAGE_UPSCALERS[name]
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for _ in range(3):
        shape = image.size
        if resample is not None:
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if shape == image.size or (image.width >= dest_w and image.height >= dest_h):
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
    return image


def resize_to(image: Image.Image, width: int, height: int, name: str) -> Image.Image:
    """A1111 images.resize_image(0, image, width, height, upscaler_name): "None" is a plain Lanczos
    resize; another upscaler first upscales by max(width / w, height / h) when that exceeds 1, then
    a Lanczos resize makes the size exact."""
    if name == "None":
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale(image, scale, name)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image
