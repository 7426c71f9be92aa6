"""The "Approx cheap" latent preview (runtime/imaging/preview.py): colours computed by hand from A1111's
coefficients (modules/sd_vae_approx.py) and its uint8 conversion (x * 0.5 + 0.5, x 255, rounded
half to even as torch.round, clamped)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from runtime.imaging.preview import SD_COEFFICIENTS, latents_to_rgb


def _latent(vector, h=2, w=3):
    return np.broadcast_to(np.asarray(vector, np.float32)[:, None, None], (4, h, w)).copy()


@pytest.mark.parametrize("vector, rgb", [
    ([0, 0, 0, 0], [128, 128, 128]),          # 0.5 * 255 = 127.5 rounds to even: 128
    ([1, 0, 0, 0], [165, 154, 154]),          # 127.5 * (1 + [0.298, 0.207, 0.208]) = 165.495, 153.89, 154.02
    ([0, 0, 0, 2], [81, 58, 7]),              # 127.5 * (1 + 2 * [-0.184, -0.271, -0.473]) = 80.58, 58.395, 6.885
    ([0.5, -0.5, 1.0, 0.25], [109, 138, 148]),  # R 127.5 * (1 - 0.1485) = 108.57; G 137.92; B 148.31
    ([10, 0, 0, 0], [255, 255, 255]),         # clamped
    ([0, 0, 0, 10], [0, 0, 0]),
])
def test_hand_computed_colours(vector, rgb):
    out = latents_to_rgb(_latent(vector))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert (out == np.array(rgb, np.uint8)).all(), out[0, 0]


def test_layout_and_batch():
    lat = np.zeros((2, 4, 2, 3), np.float32)
    lat[1, 0, 1, 2] = 1.0  # image 1, row 1, column 2
    before = lat.copy()
    out = latents_to_rgb(lat)
    assert out.shape == (2, 2, 3, 3)
    assert out[1, 1, 2].tolist() == [165, 154, 154]
    assert (np.delete(out.reshape(-1, 3), 1 * 6 + 1 * 3 + 2, axis=0) == 128).all()
    np.testing.assert_array_equal(lat, before)  # the caller's array is not modified


def test_other_coefficients_and_errors():
    swap = np.zeros((4, 3), np.float32)
    swap[2, 0] = 1.0  # channel 2 -> red only
    out = latents_to_rgb(_latent([0, 0, 1, 0]), swap)
    assert out[0, 0].tolist() == [255, 128, 128]
    with pytest.raises(ValueError, match="latents"):
        latents_to_rgb(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="latents"):
        latents_to_rgb(np.zeros((8, 8), np.float32))
    assert SD_COEFFICIENTS.shape == (4, 3)


def test_cost_is_far_below_a_unet_step():
    """1% of the fastest SD 1.5 U-Net step at 256 px on the development machine (0.3 s) is 3 ms;
    the measured median is about 0.05 ms at 128x128 latents (runtime/imaging/preview.py)."""
    x = np.random.default_rng(0).standard_normal((4, 128, 128), dtype=np.float32)
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        latents_to_rgb(x)
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 3e-3
