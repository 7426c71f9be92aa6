"""ControlNet control images: the preprocessors that need no weights, and the control map fitted
to the request size, as the AUTOMATIC1111 extension sd-webui-controlnet computes them
(Mikubill/sd-webui-controlnet at 56cec5b, 2024-07-25; "the extension" below):

    input     the unit's image as RGB uint8: grey and RGBA images as annotator/util.py `HWC3`
              (RGBA composited over white)                                            `as_rgb`
    map       a preprocessor (scripts/preprocessor/model_free_preprocessors.py and the
              legacy scripts/preprocessor/legacy/processor.py): the image resized so its short
              side is `processor_res` (scripts/utils.py `resize_image_with_pad`), then
              none / canny / invert / threshold / scribble_xdog                     `preprocess`
    fit       the map resized to the request size by the unit's resize mode: "Just Resize",
              "Crop and Resize", "Resize and Fill" (scripts/controlnet.py `detectmap_proc`
              with its `high_quality_resize`: binary maps are re-thresholded and one-pixel
              edges thinned, scripts/lvminthin.py)                                   `fit`

`pixel_perfect_resolution` is internal_controlnet/external_code.py's. Preprocessors that need model
weights (depth, pose, HED, ...) are not here: send their map as the image with module "none".

OpenCV (`opencv-python-headless`) is imported on first use, so the rest of the runtime runs
without it; a missing OpenCV is a PipelineError saying what to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from runtime.errors import PipelineError

__all__ = ["PREPROCESSORS", "RESIZE_MODES", "Preprocessor", "Slider", "as_rgb", "crop_and_resize", "find_preprocessor",
           "fit", "pixel_perfect_resolution", "preprocess", "resize_and_fill", "resize_mode"]

# scripts/enums.py ResizeMode, in the order of its int_value() (0, 1, 2)
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# internal_controlnet/external_code.py resize_mode_aliases (older UI names)
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                  "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
# The largest intermediate map: a thin input scaled by its short side (processor_res, pixel perfect,
# "Crop and Resize") would otherwise grow without bound; the server's decode limit (serving/codec.py)
MAX_MAP_PIXELS = 4096 * 4096
JUST_RESIZE_LATENT = 3  # external_code.resize_mode_from_value: A1111's 'Just Resize (Latent upscale)' -> Just Resize


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise PipelineError("ControlNet preprocessing needs OpenCV: pip install opencv-python-headless",
                            field="module") from e
    return cv2


@dataclass(frozen=True)
class Slider:
    """A preprocessor parameter (scripts/supported_preprocessor.py PreprocessorParameter)."""

    label: str
    minimum: float
    maximum: float
    value: float
    step: float = 0.01  # PreprocessorParameter's default step

    def clamp(self, value: float) -> float:
        """ControlNetUnit.bound_check_params: a value outside [minimum, maximum] (-1 among them)
        becomes the default."""
        return self.value if not self.minimum <= value <= self.maximum else value

    def api_json(self) -> dict[str, Any]:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


# Preprocessor.slider_resolution's default, and the hidden parameter (PreprocessorParameter(visible=False))
RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)
HIDDEN = Slider("EMPTY_LABEL", 0.0, 1.0, 0.5)


@dataclass(frozen=True)
class Preprocessor:
    """One of the extension's preprocessors: `run(rgb, resolution, a, b) -> map` and its sliders
    (None: hidden in the extension's UI and absent from /controlnet/module_list's details)."""

    name: str
    label: str
    run: Callable[[np.ndarray, int, float, float], np.ndarray]
    priority: int  # sorting_priority: the module list's order
    resolution: Slider | None = RESOLUTION
    slider_1: Slider | None = None
    slider_2: Slider | None = None

    def sliders(self) -> list[Slider]:
        return [s for s in (self.resolution, self.slider_1, self.slider_2) if s is not None]


def as_rgb(image: Any) -> np.ndarray:
    """A PIL image or a [H, W], [H, W, 1|3|4] uint8 array as RGB uint8 [H, W, 3] (annotator/util.py
    HWC3: grey repeated, RGBA composited over white). A new array; the caller's is untouched."""
    if isinstance(image, Image.Image):
        image = image if image.mode in ("L", "RGB", "RGBA") else image.convert("RGBA")
        image = np.asarray(image)
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise PipelineError(f"a control image must be uint8, got {x.dtype}", field="control_image")
    x = x[:, :, None] if x.ndim == 2 else x
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise PipelineError(f"a control image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got {x.shape}",
                            field="control_image")
    if x.shape[2] == 1:
        return np.repeat(x, 3, axis=2)
    if x.shape[2] == 4:
        color, alpha = x[:, :, :3].astype(np.float32), x[:, :, 3:].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x.copy()


def _resize_with_pad(img: np.ndarray, resolution: float) -> tuple[np.ndarray, tuple[int, int]]:
    """scripts/utils.py resize_image_with_pad: scaled so the short side is `resolution` (cubic up,
    area down), sides rounded, then edge-padded up to multiples of 64; returns the padded image and
    the unpadded (height, width) that `remove_pad` crops back to."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    _check_size(th, tw)
    img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    return np.pad(img, [[0, _pad64(th)], [0, _pad64(tw)], [0, 0]], mode="edge"), (th, tw)


def _check_size(height: int, width: int) -> None:
    if height * width > MAX_MAP_PIXELS:
        raise PipelineError(f"the control map would be {width}x{height} pixels, over the limit of {MAX_MAP_PIXELS}: "
                            "send an image closer to the request's aspect ratio or a smaller processor_res",
                            field="control_image")


def _pad64(n: int) -> int:
    """utils.pad64: the padding up to the next multiple of 64."""
    return int(np.ceil(float(n) / 64.0) * 64 - n)


def _none(img: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    return img


def _invert(img: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    return 255 - img  # PreprocessorInvert: 255 - HWC3(input), at the input's size


def _canny(img: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    """PreprocessorCanny: cv2.Canny(image, int(low), int(high)) on the resized, padded image."""
    padded, (h, w) = _resize_with_pad(img, resolution)
    return _cv2().Canny(padded, int(a), int(b))[:h, :w]


def _threshold(img: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    """legacy processor.py threshold: white where every channel is above the threshold."""
    padded, (h, w) = _resize_with_pad(img, resolution)
    out = np.zeros_like(padded)
    out[np.min(padded, axis=2) > a] = 255
    return out[:h, :w]


def _scribble_xdog(img: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    """PreprocessorScribbleXdog: a difference of Gaussians (sigma 0.5 and 5.0, float32), its channel
    minimum turned into lines: white where 2 * (255 - dog) exceeds the threshold."""
    cv2 = _cv2()
    padded, (h, w) = _resize_with_pad(img, resolution)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(padded)
    out[2 * (255 - dog) > a] = 255
    return out[:h, :w]


# The extension's weight-free preprocessors, in /controlnet/module_list's order (Preprocessor
# .get_sorted_preprocessors: "none" first, then by sorting_priority and label, descending).
# Sliders and defaults: model_free_preprocessors.py and legacy/preprocessor_compiled.py.
_ALL = (
    Preprocessor("none", "none", _none, 10),
    Preprocessor("canny", "canny", _canny, 100, slider_1=Slider("Low Threshold", 1, 255, 100, 1),
                 slider_2=Slider("High Threshold", 1, 255, 200, 1)),
    Preprocessor("invert", "invert (from white bg & black line)", _invert, 20, resolution=None),
    Preprocessor("threshold", "threshold", _threshold, 0, slider_1=Slider("Binarization Threshold", 0, 255, 127)),
    Preprocessor("scribble_xdog", "scribble_xdog", _scribble_xdog, 0,
                 slider_1=Slider("XDoG Threshold", 1, 64, 32)),
)
PREPROCESSORS = {p.name: p for p in
                 [_ALL[0]] + sorted(_ALL[1:], key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)}


def find_preprocessor(name: str) -> Preprocessor | None:
    """By label or name, as Preprocessor.get_preprocessor."""
    by_label = {p.label: p for p in PREPROCESSORS.values()}
    return by_label.get(name, PREPROCESSORS.get(name))


def preprocess(image: Any, module: str = "none", resolution: float = -1, threshold_a: float = -1,
               threshold_b: float = -1) -> np.ndarray:
    """The control map (RGB uint8) of `module` on `image`. `resolution` (processor_res) and the
    thresholds outside a slider's range (-1 among them) take its default, as the extension's
    ControlNetUnit.bound_check_params; a hidden slider's value is unused."""
    p = find_preprocessor(module)
    if p is None:
        raise PipelineError(f"unknown ControlNet preprocessor {module!r}; known: {', '.join(PREPROCESSORS)}",
                            field="module")
    res = (p.resolution or HIDDEN).clamp(resolution)
    a, b = (p.slider_1 or HIDDEN).clamp(threshold_a), (p.slider_2 or HIDDEN).clamp(threshold_b)
    return as_rgb(np.ascontiguousarray(p.run(as_rgb(image), res, a, b)))


def resize_mode(value: str | int) -> str:
    """The extension's resize mode by name, older alias or int (external_code.resize_mode_from_value:
    0 Just Resize, 1 Crop and Resize, 2 Resize and Fill, 3 A1111's latent 'Just Resize')."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"resize mode {value!r}: send a name or 0-2")
    if isinstance(value, int):
        if value == JUST_RESIZE_LATENT:
            return RESIZE_MODES[0]
        if not 0 <= value < len(RESIZE_MODES):
            raise ValueError(f"resize mode {value}: send 0 (Just Resize), 1 (Crop and Resize) or 2 (Resize and Fill)")
        return RESIZE_MODES[value]
    name = RESIZE_ALIASES.get(value, value)
    if name not in RESIZE_MODES:
        raise ValueError(f"resize mode {value!r}: send one of {', '.join(map(repr, RESIZE_MODES))}")
    return name


def pixel_perfect_resolution(height: int, width: int, target_h: int, target_w: int, mode: str) -> int:
    """external_code.pixel_perfect_resolution: the processor resolution at which the map's short
    side lands on the request size: the smaller scale for "Resize and Fill", else the larger."""
    k0, k1 = float(target_h) / float(height), float(target_w) / float(width)
    k = min(k0, k1) if resize_mode(mode) == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * float(min(height, width))))


def fit(control_map: Any, width: int, height: int, mode: str | int = "Crop and Resize") -> np.ndarray:
    """controlnet.py Script.detectmap_proc: the map (RGB uint8 after HWC3) at width x height.
    Just Resize: resized to it. Crop and Resize: scaled to cover it (sides rounded), centre-cropped.
    Resize and Fill: scaled to fit inside it, centred on the median colour of the map's border."""
    x, mode = as_rgb(control_map), resize_mode(mode)
    if mode == "Just Resize":
        return _high_quality_resize(x, width, height)
    old_h, old_w = float(x.shape[0]), float(x.shape[1])
    k0, k1 = float(height) / old_h, float(width) / old_w
    k = min(k0, k1) if mode == "Resize and Fill" else max(k0, k1)
    # at least a pixel a side (the extension's 0 is an OpenCV error)
    size = (max(1, int(np.round(old_w * k))), max(1, int(np.round(old_h * k))))
    _check_size(size[1], size[0])
    if mode == "Resize and Fill":
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        out = np.tile(np.median(borders, axis=0).astype(np.uint8)[None, None], [height, width, 1])
        y = _high_quality_resize(x, *size)
        top, left = max(0, (height - y.shape[0]) // 2), max(0, (width - y.shape[1]) // 2)
        out[top:top + y.shape[0], left:left + y.shape[1]] = y
        return out
    y = _high_quality_resize(x, *size)
    top, left = max(0, (y.shape[0] - height) // 2), max(0, (y.shape[1] - width) // 2)
    return np.ascontiguousarray(y[top:top + height, left:left + width])


def _fitted(image: Any, height: int, width: int, what: str, mode: str) -> np.ndarray:
    """`fit` for the pipeline's `control_resize_mode` (runtime/control.py RESIZE_MODES): float32 RGB
    [height, width, 3] in [0, 1]. A float image in [0, 1] is taken to uint8 first (rounded), as the
    extension's maps are uint8."""
    if isinstance(image, np.ndarray) and image.dtype.kind == "f":
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    try:
        return fit(image, width, height, mode).astype(np.float32) / 255.0
    except PipelineError as e:
        raise PipelineError(f"{what}: {e}", field="control_image") from None


def crop_and_resize(image: Any, height: int, width: int, what: str = "control_image") -> np.ndarray:
    """The extension's "Crop and Resize" for the Python API's control_resize_mode="crop_and_resize"."""
    return _fitted(image, height, width, what, "Crop and Resize")


def resize_and_fill(image: Any, height: int, width: int, what: str = "control_image") -> np.ndarray:
    """The extension's "Resize and Fill" for the Python API's control_resize_mode="resize_and_fill"."""
    return _fitted(image, height, width, what, "Resize and Fill")


def _high_quality_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """detectmap_proc's high_quality_resize: nearest for maps of 3..199 colours (segmentations),
    area down, cubic up; a binary map (two colours, one below 16 and one above 240) comes back
    binary by Otsu's threshold on its channel mean, its one-pixel edges thinned first (nake_nms)
    and after (lvmin_thin)."""
    if x.shape[:2] == (height, width):
        return x.copy()
    cv2 = _cv2()
    smaller, bigger = width * height < x.shape[0] * x.shape[1], width * height > x.shape[0] * x.shape[1]
    colours = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    binary = colours == 2 and int(x.min()) < 16 and int(x.max()) > 240
    one_pixel_edge = False
    if binary:
        opened = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
        one_pixel_edge = np.count_nonzero(opened < x) * 2 > np.count_nonzero(x > 127)
    interpolation = (cv2.INTER_NEAREST if 2 < colours < 200 else cv2.INTER_AREA if smaller else cv2.INTER_CUBIC)
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if not binary:
        return y
    y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_edge:
        y = _nake_nms(y)
        y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
        y = _thin(y, prune=bigger)
    else:
        y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
    return np.stack([y] * 3, axis=2)


def _nake_nms(x: np.ndarray) -> np.ndarray:
    """utils.nake_nms: keep a pixel where it is a maximum along any of the four directions."""
    cv2 = _cv2()
    out = np.zeros_like(x)
    lines = (np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8),
             np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
             np.eye(3, dtype=np.uint8), np.fliplr(np.eye(3, dtype=np.uint8)).copy())
    for kernel in lines:
        np.putmask(out, cv2.dilate(x, kernel=kernel) == x, x)
    return out


def _rotations(*kernels: list[list[int]]) -> list[np.ndarray]:
    """Each kernel and its rotations by 90, 180 and 270 degrees, in lvminthin.py's order."""
    return [np.rot90(np.array(k, np.int32), k=r, axes=(0, 1)) for r in range(4) for k in kernels]


# scripts/lvminthin.py: hit-or-miss kernels (1 foreground, -1 background, 0 either)
THIN_KERNELS = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
PRUNE_KERNELS = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])
THIN_PASSES = 32  # lvmin_thin: at most 32 thinning passes


def _strip(x: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """lvminthin.thin_one_time over `x` (modified: the caller's own copy): each kernel's hit-or-miss
    matches removed in turn; True if any pixel was removed."""
    cv2 = _cv2()
    changed = False
    for kernel in kernels:
        hits = cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127
        changed |= bool(hits.any())
        x[hits] = 0
    return changed


def _thin(x: np.ndarray, prune: bool) -> np.ndarray:
    """lvminthin.lvmin_thin: thinning until nothing changes (at most 32 passes), then one pruning
    pass when the map was enlarged."""
    y = x.copy()
    for _ in range(THIN_PASSES):
        if not _strip(y, THIN_KERNELS):
            break
    if prune:
        _strip(y, PRUNE_KERNELS)
    return y
