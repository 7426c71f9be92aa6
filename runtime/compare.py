"""The two numeric comparisons every parity check and benchmark in this project uses. NumPy only.

- `max_errors(out, ref)`: (max|out - ref|, that divided by max|ref|): export parity, the int8 check,
  the benchmark suite's per-network parity.
- `psnr(image, reference)`: PSNR in dB of images in [0, 1] (peak 1.0): image-level comparisons.
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


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1]; infinite when they are equal."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
