"""Images on the wire: base64 PNG/JPEG/WebP in, base64 PNG out, and AUTOMATIC1111's mask
preparation (modules/processing.py `create_binary_mask` and the mask blur of
`StableDiffusionProcessingImg2Img.init`, v1.10).

Only data travels: a string that is a URL or anything but base64 image data is refused with a
`WireError` naming the field (A1111 can fetch URLs; this server never reaches out, nor reads a
path a client names). Decoded images are bounded in pixels before PIL decodes them.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from runtime.imaging.inpainting import blur_mask  # A1111's mask blur (cv2.GaussianBlur), re-exported

__all__ = ["WireError", "blur_mask", "decode_image", "encode_png", "prepare_mask"]

MAX_PIXELS = 4096 * 4096  # a decoded image larger than this is refused before decoding


class WireError(ValueError):
    """A request field the server cannot use: `field` names it (dotted, A1111's names), `message`
    says why; the HTTP layer answers 422."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


def decode_image(data: Any, field: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A base64 string (optionally a `data:image/...;base64,` URL) to a loaded PIL image."""
    if not isinstance(data, str) or not data:
        raise WireError(field, "expected a base64-encoded image string")
    text = data.strip()
    if text.startswith(("http://", "https://", "file:", "/")):
        raise WireError(field, "images must be sent as base64 data; this server fetches no URLs and reads no paths")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise WireError(field, "a data URL must be base64 encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise WireError(field, f"invalid base64 ({e})") from None
    try:
        image = Image.open(io.BytesIO(raw))
        w, h = image.size
        if w * h > max_pixels:
            raise WireError(field, f"the image is {w}x{h}, over the limit of {max_pixels} pixels")
        image.load()
    except WireError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data (OSError, SyntaxError, ...)
        raise WireError(field, f"not a decodable image ({type(e).__name__}: {e})") from None
    return image


def encode_png(image: Image.Image, infotext: str | None = None) -> str:
    """Base64 PNG, with A1111's `parameters` text chunk when `infotext` is given."""
    info = None
    if infotext:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def prepare_mask(mask: Image.Image, *, invert: bool, blur_x: int = 0, blur_y: int = 0,
                 round_alpha: bool = True) -> Image.Image:
    """A1111's mask (processing.py `create_binary_mask`): the alpha channel of an RGBA mask that has
    transparency (> 128 = repaint, or its grey levels when not `round_alpha`: A1111's mask_round
    false), else its luminance; inverted if asked; then Gaussian-blurred horizontally by `blur_x` and
    vertically by `blur_y` (cv2.GaussianBlur with kernel size 2 * int(2.5 * sigma + 0.5) + 1; the
    server leaves the blur to the pipeline's `mask_blur`, runtime/imaging/inpainting.py). White repaints."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.split()[-1].convert("L")
        if round_alpha:
            mask = mask.point(lambda x: 255 if x > 128 else 0)
    else:
        mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    arr = np.asarray(mask, dtype=np.float64)
    if blur_x > 0:
        arr = np.round(blur_mask(arr, blur_x, axis=1))
    if blur_y > 0:
        arr = np.round(blur_mask(arr, blur_y, axis=0))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
