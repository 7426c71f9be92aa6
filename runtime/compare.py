"""The numeric comparisons every parity check, test and benchmark in this project uses. NumPy only.

- `max_errors(out, ref)`: (max|out - ref|, that divided by max|ref|): export parity, the int8 check,
  the benchmark suite's per-network parity.
- `rel_err(out, ref)`: the second of those alone, max|out - ref| / max|ref|: the tests' parity bounds.
- `psnr(image, reference)`: PSNR in dB, of images in [0, 1] (peak 1.0) by default; the VAE tiling
  checks pass `data_range=2.0, clip=(-1.0, 1.0)` for decoder outputs in [-1, 1].

Arguments are anything `np.asarray` takes (a CPU torch tensor that needs no grad included) and are
compared in float64.
"""

from __future__ import annotations

import math

import numpy as np

# Floor of max|ref| in the relative error, so an all-zero reference gives a finite (huge) ratio
# instead of a division by zero.
REL_FLOOR = 1e-12


def max_errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max|out - ref|, that divided by max|ref|). A non-finite difference gives an infinite
    relative error."""
    ref = np.asarray(ref, np.float64)
    err = float(np.max(np.abs(np.asarray(out, np.float64) - ref)))
    rel = err / max(float(np.max(np.abs(ref))), REL_FLOOR) if math.isfinite(err) else math.inf
    return err, rel


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """max|out - ref| / max|ref| in float64: `max_errors(out, ref)[1]`.

    The tests' own copies it replaces divided without the REL_FLOOR, some in the inputs' float32,
    and gave NaN for a NaN difference. Against any bound `rel_err(...) <= tol` they agree except
    where max|ref| < 1e-12: identical all-zero arrays give 0 here (NaN there, a failure), a nonzero
    error over such a reference gives err / 1e-12 (inf there), still far past any bound. A NaN
    anywhere gives inf here: an upper bound fails as it did; a lower bound (`> x`) must check
    `math.isfinite` itself."""
    return max_errors(out, ref)[1]


def psnr(image: np.ndarray, reference: np.ndarray, *, data_range: float = 1.0,
         clip: tuple[float, float] | None = None) -> float:
    """PSNR in dB, 10 log10(data_range^2 / MSE), in float64; infinite when the images are equal.

    `data_range` is the peak-to-peak range of the images: 1.0 for [0, 1] (output_type "np"), 2.0
    for VAE outputs in [-1, 1]. `clip` = (lo, hi) clips both images first, as converting them to
    8 bits would (the tiling checks compare decoder outputs that overshoot [-1, 1])."""
    a, b = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    if clip is not None:
        a, b = np.clip(a, *clip), np.clip(b, *clip)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)
