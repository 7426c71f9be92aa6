"""The PSNR bounds of the fp32 image parity tests on the tiny random models, defined once (no tests here).

PSNR is over float images in [0, 1]: 10 log10(1 / MSE). tests/test_pipeline_parity.py's module doc
says why two bounds: 60 dB (an RMS error of 1e-3, a tenth of one 8-bit level) is the requirement,
but on these tiny random models two different samplers already agree to ~69 dB, while fp32 parity
measures 120-135 dB; so fp32 parity must reach PARITY_PSNR_DB, which a wrong sampler fails
(test_pipeline_parity.py::test_threshold_tells_samplers_apart). `assert_psnr` is the parity
assertion the diffusers-parity tests share."""

import logging

import numpy as np

from runtime.compare import psnr

log = logging.getLogger(__name__)

MIN_PSNR_DB = 60.0  # the requirement; also what a change (a LoRA, embeddings, caching) must move an image below
PARITY_PSNR_DB = 90.0  # what fp32 tiny-model parity must reach (above)
assert PARITY_PSNR_DB >= MIN_PSNR_DB  # the parity bound is the requirement and more


def assert_psnr(ours: np.ndarray, ref: np.ndarray, what: str) -> float:
    """Assert `ours` matches `ref` (same shape, PSNR >= PARITY_PSNR_DB); log and return the PSNR."""
    assert ours.shape == ref.shape, f"{what}: shapes {ours.shape} vs {ref.shape}"
    value = psnr(ours, ref)
    log.info("PSNR %s: %.1f dB", what, value)
    assert value >= PARITY_PSNR_DB, f"{what}: PSNR {value:.1f} dB < {PARITY_PSNR_DB} dB"
    return value
