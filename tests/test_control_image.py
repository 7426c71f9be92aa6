"""ControlNet control images (runtime/imaging/control.py): the weight-free preprocessors and the
control map's fit to the request size, as sd-webui-controlnet computes them. References are OpenCV
called directly on cases where the extension's resize-with-pad is the identity (the short side at
processor_res, sides multiples of 64), and hand-checkable pictures whose answers follow from the
extension's rules on paper."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from runtime.errors import PipelineError
from runtime.imaging import control


def square(size: int = 64, lo: int = 16, hi: int = 32) -> np.ndarray:
    """A white square [lo, hi) on black, RGB."""
    img = np.zeros((size, size, 3), np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def bands(h: int = 64, w: int = 128) -> np.ndarray:
    """Red left quarter, green middle half, blue right quarter: three colours (the extension resizes
    maps of 3..199 colours with nearest neighbour)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 4, 0] = 255
    img[:, w // 4: 3 * w // 4, 1] = 255
    img[:, 3 * w // 4:, 2] = 255
    return img


def textured(h: int = 64, w: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth random colours (noise at 1/8 size, upscaled with PIL's bicubic): gradients of every
    strength, thousands of colours."""
    noise = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((w, h), Image.BICUBIC))


RED, GREEN, BLUE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)


# --- the preprocessors ---------------------------------------------------------------------------------------

def test_module_list_order_names_and_labels_are_the_extensions():
    # get_sorted_preprocessors: "none" first, then sorting_priority (canny 100, invert 20, others 0), label desc
    assert list(control.PREPROCESSORS) == ["none", "canny", "invert", "threshold", "scribble_xdog"]
    assert control.find_preprocessor("invert (from white bg & black line)").name == "invert"
    assert control.find_preprocessor("canny").name == "canny"
    assert control.find_preprocessor("depth_midas") is None
    canny = control.PREPROCESSORS["canny"]
    assert [(s.label, s.minimum, s.maximum, s.value) for s in canny.sliders()] == [
        ("Resolution", 64, 2048, 512), ("Low Threshold", 1, 255, 100), ("High Threshold", 1, 255, 200)]
    assert control.PREPROCESSORS["invert"].sliders() == []  # its resolution slider is hidden


def test_canny_is_opencv_canny_with_the_units_thresholds():
    img = textured(64, 128)
    ref = cv2.Canny(img, 50, 120)  # short side 64 = processor_res, sides multiples of 64: no resize, no pad
    out = control.preprocess(img, "canny", 64, 50, 120)
    assert out.shape == (64, 128, 3) and (out == ref[:, :, None]).all()
    # -1 (and any value outside a slider's range) takes the default, as ControlNetUnit.bound_check_params
    default = cv2.Canny(img, 100, 200)[:, :, None]
    assert (control.preprocess(img, "canny", 64) == default).all()
    assert (control.preprocess(img, "canny", 64, 300, 0) == default).all()
    assert not (out == default).all()


def test_canny_of_a_square_is_its_outline():
    out = control.preprocess(square(), "canny", 64)[:, :, 0]
    ys, xs = np.nonzero(out)
    assert len(ys) > 0
    on_boundary = np.minimum(np.minimum(abs(ys - 16), abs(ys - 31)), np.minimum(abs(xs - 16), abs(xs - 31))) <= 1
    assert on_boundary.all()
    assert out[20:28, 20:28].max() == 0 and out[:12].max() == 0


def test_canny_resizes_the_short_side_to_processor_res_with_cubic_and_edge_padding():
    img = textured(48, 72, seed=1)
    out = control.preprocess(img, "canny", 64)
    # scripts/utils.py resize_image_with_pad: 48x72 -> 64x96 (k = 4/3 > 1: cubic), edge-padded to 64x128
    big = cv2.resize(img, (96, 64), interpolation=cv2.INTER_CUBIC)
    padded = np.pad(big, [[0, 0], [0, 32], [0, 0]], mode="edge")
    assert out.shape == (64, 96, 3) and (out[:, :, 0] == cv2.Canny(padded, 100, 200)[:, :96]).all()


def test_invert_threshold_and_none_by_hand():
    img = np.array([[[0, 0, 0], [200, 130, 128], [200, 127, 255]]], np.uint8).repeat(64, 0).repeat(22, 1)[:, :64]
    assert (control.preprocess(img, "invert") == 255 - img).all()
    assert (control.preprocess(img, "none") == img).all()
    out = control.preprocess(img, "threshold", 64, 127)
    # white where every channel is above the threshold: only the middle colour (min 128 > 127)
    expected = (np.min(img, axis=2) > 127)
    assert (out[:, :, 0] == np.where(expected, 255, 0)).all() and expected.any() and not expected.all()


def test_scribble_xdog_draws_nothing_on_flat_colour_and_lines_at_edges():
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert control.preprocess(flat, "scribble_xdog", 64).max() == 0
    lines = control.preprocess(square(), "scribble_xdog", 64)[:, :, 0]
    ys, xs = np.nonzero(lines)
    assert len(ys) > 0 and lines[0:8].max() == 0 and lines[22:26, 22:26].max() == 0


def test_inputs_are_hwc3_and_never_modified():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (100, 50, 0)
    rgba[..., 3] = 128
    # annotator/util.py HWC3: colour * a + 255 * (1 - a), a = 128 / 255, truncated to uint8
    a = np.float32(128) / np.float32(255)
    want = [int(np.float32(v) * a + np.float32(255) * (np.float32(1) - a)) for v in (100, 50, 0)]
    assert control.as_rgb(rgba)[0, 0].tolist() == want
    grey = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    assert (control.as_rgb(Image.fromarray(grey)) == grey[:, :, None]).all()
    before = rgba.copy()
    control.preprocess(rgba, "invert")
    control.fit(rgba, 32, 32, "Crop and Resize")
    assert (rgba == before).all()
    with pytest.raises(PipelineError, match="uint8"):
        control.as_rgb(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(PipelineError, match="unknown ControlNet preprocessor"):
        control.preprocess(rgba, "openpose")


# --- resize modes and the fit ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, name", [
    (0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"), (3, "Just Resize"),
    ("Just Resize", "Just Resize"), ("Inner Fit (Scale to Fit)", "Crop and Resize"),
    ("Scale to Fit (Inner Fit)", "Crop and Resize"), ("Envelope (Outer Fit)", "Resize and Fill"),
    ("Outer Fit (Shrink to Fit)", "Resize and Fill")])
def test_resize_mode_names_aliases_and_ints(value, name):
    assert control.resize_mode(value) == name


@pytest.mark.parametrize("value", [-1, 4, "Stretch", True, 1.0])
def test_unknown_resize_modes_are_refused(value):
    with pytest.raises(ValueError, match="resize mode"):
        control.resize_mode(value)


def test_pixel_perfect_resolution_by_hand():
    # 100x150 into 512x512: crop takes the larger scale (5.12 -> short side 512), fill the smaller (3.41 -> 341)
    assert control.pixel_perfect_resolution(100, 150, 512, 512, "Crop and Resize") == 512
    assert control.pixel_perfect_resolution(100, 150, 512, 512, "Just Resize") == 512
    assert control.pixel_perfect_resolution(100, 150, 512, 512, "Resize and Fill") == 341
    assert control.pixel_perfect_resolution(512, 512, 512, 768, 1) == 768


def _runs(row: np.ndarray) -> list[tuple[tuple[int, ...], int]]:
    """(colour, length) runs along a row of pixels."""
    out: list[tuple[tuple[int, ...], int]] = []
    for px in map(tuple, row.tolist()):
        if out and out[-1][0] == px:
            out[-1] = (px, out[-1][1] + 1)
        else:
            out.append((px, 1))
    return out


def test_just_resize_stretches():
    out = control.fit(bands(), 32, 32, "Just Resize")  # 128 -> 32 wide: quarters of 8, 16, 8
    assert out.shape == (32, 32, 3)
    for row in out:
        assert _runs(row) == [(RED, 8), (GREEN, 16), (BLUE, 8)]


def test_crop_and_resize_covers_then_crops_the_centre():
    out = control.fit(bands(), 32, 32, "Crop and Resize")  # k = max(0.5, 0.25): 32x64, centre 32 columns
    assert (out == GREEN).all()
    out = control.fit(bands(), 64, 16, 1)  # k = max(0.25, 0.5): 32x64, rows 8..24
    assert out.shape == (16, 64, 3) and _runs(out[0]) == [(RED, 16), (GREEN, 32), (BLUE, 16)]


def test_resize_and_fill_fits_inside_on_the_border_median():
    out = control.fit(bands(), 32, 32, "Resize and Fill")  # k = min(0.5, 0.25): 16x32 at rows 8..24
    # border median per channel: each channel is 255 on a third of the border pixels or less -> 0 (black)
    assert (out[:8] == BLACK).all() and (out[24:] == BLACK).all()
    for row in out[8:24]:
        assert _runs(row) == [(RED, 8), (GREEN, 16), (BLUE, 8)]
    grey = np.full((64, 128, 3), 90, np.uint8)
    grey[20:40, 50:70] = 200
    filled = control.fit(grey, 64, 64, 2)  # a grey border: the padding takes it
    assert (filled[:16] == 90).all() and (filled[48:] == 90).all()


def test_segmentation_like_maps_resize_with_nearest():
    img = bands(8, 16)
    out = control.fit(img, 48, 24, "Just Resize")
    assert (out == img.repeat(3, axis=0).repeat(3, axis=1)).all()


def test_binary_maps_stay_binary_and_one_pixel_edges_stay_thin():
    filled = control.fit(square(), 128, 128, "Just Resize")
    assert (filled == square(128, 32, 64)).all()  # cubic, then Otsu on the channel mean: the square, doubled
    edges = control.preprocess(square(), "canny", 64)
    for size in (128, 40):
        out = control.fit(edges, size, size, "Just Resize")[:, :, 0]
        assert set(np.unique(out)) <= {0, 255}
        white = out > 0
        # one pixel wide: no 2x2 block is all white (an edge resized without thinning is 2-3 px wide at 2x)
        assert not (white[:-1, :-1] & white[1:, :-1] & white[:-1, 1:] & white[1:, 1:]).any()
        assert 0.7 * size / 64 < white.sum() / (edges[:, :, 0] > 0).sum() < 1.3 * size / 64


def test_a_map_at_the_request_size_is_returned_as_is():
    img = textured(48, 80)
    for mode in control.RESIZE_MODES:
        assert (control.fit(img, 80, 48, mode) == img).all()


def test_fit_of_an_ordinary_picture_is_opencvs_resize_and_crop():
    img = textured(64, 128, seed=3)  # thousands of colours: area when shrinking, cubic when enlarging
    out = control.fit(img, 48, 48, "Crop and Resize")  # k = 0.75: 48x96, columns 24..72
    ref = cv2.resize(img, (96, 48), interpolation=cv2.INTER_AREA)[:, 24:72]
    assert (out == ref).all()
    out = control.fit(img, 96, 96, "Crop and Resize")  # k = 1.5: 96x192, columns 48..144
    ref = cv2.resize(img, (192, 96), interpolation=cv2.INTER_CUBIC)[:, 48:144]
    assert (out == ref).all()


def test_the_pipelines_resize_mode_hooks_give_float_maps():
    out = control.crop_and_resize(Image.fromarray(bands()), 32, 32)
    assert out.dtype == np.float32 and out.shape == (32, 32, 3) and (out == (0.0, 1.0, 0.0)).all()
    fill = control.resize_and_fill(bands().astype(np.float32) / 255.0, 32, 32)
    assert (fill[:8] == 0).all() and (fill[8:24, 8:24] == (0.0, 1.0, 0.0)).all()
    with pytest.raises(PipelineError, match="control_image\\[1\\]"):
        control.crop_and_resize(np.zeros((4, 4, 2), np.uint8), 32, 32, "control_image[1]")


def test_thin_inputs_cannot_grow_maps_without_bound():
    thin = np.zeros((1, 4096, 3), np.uint8)  # short side 1: scaled to 512 it would be 512 x 2M pixels
    with pytest.raises(PipelineError, match="over the limit"):
        control.preprocess(thin, "canny", 512)
    with pytest.raises(PipelineError, match="over the limit"):
        control.fit(thin, 128, 128, "Crop and Resize")
    assert control.fit(thin, 128, 128, "Resize and Fill").shape == (128, 128, 3)
