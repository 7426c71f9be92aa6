"""A cheap live preview of latents: each latent pixel's 4 channels projected linearly to RGB, as
AUTOMATIC1111's "Approx cheap" preview (modules/sd_vae_approx.py `cheap_approximation`, then
modules/sd_samplers_common.py `single_sample_to_image`: x * 0.5 + 0.5, x 255, rounded, clamped to
uint8). The image has the latents' size (64x64 for a 512x512 generation).

Cost, median of 2000 calls with time.perf_counter on the project's 2-core development machine
(numpy 2.4, one [4, h, w] float32 latent, two runs): 64x64 latents 0.018-0.019 ms, 128x128 latents
0.041-0.048 ms. An SD 1.5 U-Net step at 256 px (32x32 latents) takes 0.3-0.9 s there, so a preview
every step costs under 0.01% of a step; encoding the preview for a client (PNG/JPEG) is not counted.
`python -m runtime.imaging.preview` repeats the measurement.

The coefficients fit the Stable Diffusion 1.x/2.x VAE's latent space (2.x uses the same
autoencoder), applied to the latents as the denoising loop holds them (scaled by 0.18215). They
mean nothing for other VAEs (the embedded `tiny` demo model has its own): pass `coefficients`.
A sampler's x0 estimate previews better than its noisy x_t; with x_t of a sigma-space sampler
(euler, lms, heun, dpmpp_2m...) early steps show mostly noise.

A folder with a tiny autoencoder (TAESD: `build-engine --tiny-vae`, or a folder whose VAE is one)
previews with it instead (`decoded_preview`, which `Pipeline.preview` picks): a real image at the
image's size, as A1111's "TAESD" live preview method (modules/sd_samplers_common.py
`samples_to_images_tensor` with approximation 3 decodes with sd_vae_taesd), post-processed as the
final image is (runtime/imaging/images.py `from_network`, `to_pil`'s rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["SD_COEFFICIENTS", "decoded_preview", "latents_to_rgb"]

# [latent channel, RGB], A1111 modules/sd_vae_approx.py `cheap_approximation` (SD 1.x/2.x), from
# https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2
SD_COEFFICIENTS = np.array([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
], dtype=np.float32)


def latents_to_rgb(latents: np.ndarray, coefficients: np.ndarray = SD_COEFFICIENTS) -> np.ndarray:
    """uint8 RGB preview: latents [C, h, w] -> [h, w, 3], or [batch, C, h, w] -> [batch, h, w, 3];
    `coefficients` is [C, 3]."""
    latents = np.asarray(latents)
    if latents.ndim not in (3, 4) or latents.shape[-3] != coefficients.shape[0] or coefficients.shape[1:] != (3,):
        raise ValueError(f"expected latents [{coefficients.shape[0]}, h, w] or [batch, {coefficients.shape[0]}, h, w] "
                         f"for coefficients {list(coefficients.shape)} ([channels, 3]); got {list(latents.shape)}")
    *lead, c, h, w = latents.shape
    # (x @ coefficients) * 0.5 + 0.5, times 255, folded into one product and one sum
    scaled = np.asarray(coefficients, dtype=np.float32).T * np.float32(127.5)  # [3, C]
    rgb = scaled @ latents.astype(np.float32, copy=False).reshape(*lead, c, h * w)  # [..., 3, h*w]
    rgb += np.float32(127.5)
    np.rint(rgb, out=rgb)
    np.clip(rgb, 0, 255, out=rgb)
    return np.swapaxes(rgb.astype(np.uint8), -1, -2).reshape(*lead, h, w, 3)


def decoded_preview(decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray) -> np.ndarray:
    """uint8 RGB previews [batch, H, W, 3] of latents [batch, C, h, w] through `decode` (latents as
    the loop holds them -> float NHWC images in [0, 1]: runtime/stages.py `decode` over the tiny VAE's
    decoder), rounded as the final images are."""
    images = np.nan_to_num(np.asarray(decode(latents), dtype=np.float32), nan=0.0)
    return (images * np.float32(255.0)).round().astype(np.uint8)


def _measure(repeats: int = 2000) -> dict[str, float]:
    """Median seconds per call at 64x64 and 128x128 latents."""
    import time

    rng = np.random.default_rng(0)
    out = {}
    for side in (64, 128):
        x = rng.standard_normal((4, side, side), dtype=np.float32)
        for _ in range(20):
            latents_to_rgb(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            latents_to_rgb(x)
            times.append(time.perf_counter() - t0)
        out[f"{side}x{side}"] = float(np.median(times))
    return out


if __name__ == "__main__":
    for size, seconds in _measure().items():
        print(f"latents {size}: {seconds * 1e3:.3f} ms per preview (median)")
