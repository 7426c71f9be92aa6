"""AUTOMATIC1111's inpainting (v1.10: modules/processing.py `StableDiffusionProcessingImg2Img.init`
and `.sample`, modules/masking.py, modules/images.py `resize_image`), as an alternative to
diffusers' mask handling. A request takes this path when any of its A1111 inpainting arguments is
given (`masked_content`, `padding_mask_crop`, `mask_blur`, `soft_mask`, `overlay`); without them,
inpainting is diffusers' as before (runtime/stages.py).

What A1111 does, and where it happens here:

    mask      grey levels kept (uint8 steps), Gaussian-blurred by (mask_blur_x, mask_blur_y)  `prepare`
    area      "only masked" (`padding_mask_crop`, A1111 `inpaint_full_res`): the mask's bounding
              box plus padding (`get_crop_region`), grown to the request's aspect ratio
              (`expand_crop_region`); image and mask cropped and resized to the request size
              (`resize_and_fill`, A1111 resize mode 2). Otherwise both are resized to it.
    fill      masked_content "fill" / "latent_noise" / "latent_nothing" pre-fill the masked
              pixels from the surrounding colours before encoding (`fill`, A1111 masking.fill)
    latents   the latent mask: the processed mask resized bicubically to the latent size (PIL's
              default filter), rounded unless `soft_mask`; "latent_noise" replaces the masked init
              latents by the image's seeded noise (A1111's create_random_tensors with the image's
              seed: its first draw), "latent_nothing" zeroes them                     `image_latents`
    blend     the 4-channel blend uses the (modified) init latents and the latent mask, for the
              9-channel U-Net too (A1111 sets p.mask for every model); the 9-channel U-Net's
              conditioning image is image * (1 - mask), the mask rounded unless soft
    overlay   the original composited back over the result with alpha 1 - overlay mask (whole
              picture: clip(2 * mask); only masked: the blurred mask, the result first resized to
              the crop box, A1111 resize mode 1, and pasted at it: `apply_overlay`/`uncrop`)  `composite`

Differences from A1111, on purpose: the blend between steps is this runtime's (the known region
noised to the next level after each step, diffusers' rule) where A1111 blends the denoised
prediction; the final blend (clean latents outside the mask) is the same. Resizes and the overlay
run in float (PIL mode "F" per channel), A1111's in uint8; `fill` runs in uint8 as A1111's does.
A blank mask with `padding_mask_crop` is an error (A1111 falls back to plain img2img). As in A1111,
denoising always starts from the (modified) init latents noised to the first level, at strength 1
too (diffusers' inpainting starts from pure noise there).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from runtime.errors import PipelineError
from runtime.imaging import images as imgs

__all__ = ["MASKED_CONTENT", "Inpainting", "blur_mask", "composite", "expand_crop_region", "fill",
           "get_crop_region", "image_latents", "latent_mask", "prepare", "settings"]

# A1111's inpainting_fill 0..3 (modules/ui.py "Masked content": fill, original, latent noise, latent nothing)
MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")
# masking.fill: (Gaussian radius, times composited), widest first, the sharp original last
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
Box = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class Inpainting:
    """A1111 inpainting settings of a request and, after `prepare`, what the overlay needs per prompt:
    the original images, the overlay masks (alpha = 1 - mask) and the paste boxes (x, y, w, h) of
    "only masked" (None: whole picture)."""

    masked_content: str = "original"
    padding: int | None = None  # padding_mask_crop: only masked, with this many pixels around the mask
    blur: tuple[int, int] = (0, 0)  # (x, y) Gaussian sigmas in pixels
    soft: bool = False  # soft_mask: the latent mask keeps its grey levels (A1111 mask_round=False)
    overlay: bool = True  # composite the original back (A1111 opts.overlay_inpaint, default on)
    originals: tuple[np.ndarray, ...] = ()
    overlay_masks: tuple[np.ndarray, ...] = ()
    paste_to: tuple[Box | None, ...] = ()

    def key(self) -> tuple:
        """What of it decides a batch's shared arrays (Request.batch_key)."""
        return self.masked_content, self.padding, self.blur, self.soft, self.overlay

    def parameters(self) -> dict[str, Any]:
        out: dict[str, Any] = {"masked_content": self.masked_content}
        if self.padding is not None:
            out["padding_mask_crop"] = self.padding
        if self.blur != (0, 0):
            out["mask_blur"] = list(self.blur)
        if self.soft:
            out["soft_mask"] = True
        if not self.overlay:
            out["overlay"] = False
        return out


def settings(mode: str, *, masked_content: Any = None, padding_mask_crop: Any = None, mask_blur: Any = 0,
             soft_mask: Any = False, overlay: Any = None) -> Inpainting | None:
    """The A1111 inpainting settings of a request, validated; None when none was given."""
    given = (masked_content is not None or padding_mask_crop is not None or mask_blur not in (0, (0, 0), [0, 0])
             or soft_mask is not False or overlay is not None)
    if not given:
        return None
    if mode != "inpaint":
        raise PipelineError("masked_content, padding_mask_crop, mask_blur, soft_mask and overlay apply to inpaint "
                            "only", field="masked_content")
    content = "original" if masked_content is None else masked_content
    if content not in MASKED_CONTENT:
        raise PipelineError(f"masked_content must be one of {', '.join(MASKED_CONTENT)}; got {masked_content!r}",
                            field="masked_content")
    if padding_mask_crop is not None and not _nonneg_int(padding_mask_crop):
        raise PipelineError(f"padding_mask_crop must be a non-negative integer (pixels) or None (whole picture); "
                            f"got {padding_mask_crop!r}", field="padding_mask_crop")
    blur = tuple(mask_blur) if isinstance(mask_blur, (tuple, list)) else (mask_blur, mask_blur)
    if len(blur) != 2 or not all(_nonneg_int(b) for b in blur):
        raise PipelineError(f"mask_blur must be a non-negative integer or an (x, y) pair of them; got {mask_blur!r}",
                            field="mask_blur")
    for name, value in (("soft_mask", soft_mask), ("overlay", overlay)):
        if value not in (True, False, None) or (name == "soft_mask" and value is None):
            raise PipelineError(f"{name} must be True or False; got {value!r}", field=name)
    return Inpainting(masked_content=content, padding=None if padding_mask_crop is None else int(padding_mask_crop),
                      blur=(int(blur[0]), int(blur[1])), soft=bool(soft_mask), overlay=overlay is not False)


def _nonneg_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and int(v) == v and v >= 0


# --- request preparation --------------------------------------------------------------------------------

def prepare(plan: Inpainting, images: list, masks: list, height: int, width: int
            ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], Inpainting]:
    """(encoder images [H, W, 3], grey masks [H, W] in uint8 steps, the plan with its overlays), one
    per prompt, at the request size: A1111's Img2Img.init from the mask blur to `fill`."""
    out_images, out_masks, originals, overlays, boxes = [], [], [], [], []
    for k, (image, mask) in enumerate(zip(images, masks)):
        h0, w0 = imgs.image_size(image)
        grey = _blurred(imgs.load_mask(mask, h0, w0, binary=False), plan.blur)
        if plan.padding is not None:
            box = get_crop_region(grey, plan.padding)
            if box is None:
                raise PipelineError(f"mask_image {k} is blank: nothing to inpaint 'only masked' (send a mask with "
                                    "white pixels, padding_mask_crop=None, or use img2img)", field="mask_image")
            x1, y1, x2, y2 = expand_crop_region(box, width, height, w0, h0)
            original = imgs.load_image(image, h0, w0)
            proc_image = resize_and_fill(original[y1:y2, x1:x2], width, height)
            proc_mask = _levels(resize_and_fill(grey[y1:y2, x1:x2, None], width, height)[:, :, 0])
            overlay, paste = grey, (x1, y1, x2 - x1, y2 - y1)
        else:
            original = proc_image = imgs.load_image(image, height, width)
            proc_mask = _levels(_resize(grey[:, :, None], width, height)[:, :, 0])
            overlay, paste = np.minimum(proc_mask * 2.0, 1.0), None  # A1111: clip(mask * 2, 0, 255)
        if plan.masked_content != "original":  # A1111 fills for every inpainting_fill but 1
            proc_image = fill(proc_image, proc_mask)
        out_images.append(_frozen(proc_image))
        out_masks.append(_frozen(proc_mask))
        originals.append(_frozen(original))
        overlays.append(_frozen(overlay.astype(np.float32)))
        boxes.append(paste)
    return tuple(out_images), tuple(out_masks), replace(plan, originals=tuple(originals),
                                                        overlay_masks=tuple(overlays), paste_to=tuple(boxes))


def _blurred(grey: np.ndarray, blur: tuple[int, int]) -> np.ndarray:
    """A1111's mask blur (cv2.GaussianBlur on the uint8 mask, x then y), in uint8 steps."""
    arr = np.round(grey.astype(np.float64) * 255.0)
    for sigma, axis in ((blur[0], 1), (blur[1], 0)):
        if sigma > 0:
            arr = np.round(blur_mask(arr, sigma, axis=axis))
    return (np.clip(arr, 0, 255) / 255.0).astype(np.float32)


def _levels(mask: np.ndarray) -> np.ndarray:
    """A resized mask back in uint8 steps, as A1111's PIL "L" masks are."""
    return (np.round(np.clip(mask, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float32, copy=True)
    a.flags.writeable = False
    return a


# --- A1111's image functions ------------------------------------------------------------------------------

def blur_mask(arr: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """1-D Gaussian along `axis` as OpenCV's GaussianBlur that A1111 runs on the mask: kernel size
    2 * int(2.5 * sigma + 0.5) + 1, weights exp(-x^2 / (2 sigma^2)) normalized to 1, border
    reflected without repeating the edge (BORDER_REFLECT_101, numpy's "reflect")."""
    radius = int(2.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x * x) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    n = arr.shape[axis]
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(arr, pad, mode="reflect" if n > 1 else "edge")
    out = np.zeros_like(arr, dtype=np.float64)
    for k, w in enumerate(kernel):
        out += w * np.take(padded, np.arange(k, k + n), axis=axis)
    return out


def get_crop_region(mask: np.ndarray, pad: int = 0) -> Box | None:
    """(x1, y1, x2, y2): the bounding box of the mask's non-zero pixels grown by `pad` on every side,
    within the mask; None for a blank mask (A1111 masking.get_crop_region_v2)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w),
            min(int(rows[-1]) + 1 + pad, h))


def expand_crop_region(box: Box, processing_width: int, processing_height: int, image_width: int,
                       image_height: int) -> Box:
    """Grow `box` along one axis to the processing size's aspect ratio, centred, shifted back inside
    the image where it leaves it (A1111 masking.expand_crop_region)."""
    x1, y1, x2, y2 = box
    ratio = processing_width / processing_height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, size: int) -> tuple[int, int]:
    """One axis of expand_crop_region: half the growth before, the rest after, then moved inside [0, size]."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def _resize(hwc: np.ndarray, width: int, height: int, box: tuple[float, float, float, float] | None = None
            ) -> np.ndarray:
    """Lanczos resize of a float [H, W, C] array (A1111's resize without an upscaler), per channel in
    PIL mode "F"; `box` is PIL's source box."""
    if hwc.shape[:2] == (height, width) and box is None:
        return hwc.astype(np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(hwc[:, :, c], dtype=np.float32))
                        .resize((width, height), resample=Image.Resampling.LANCZOS, box=box))
             for c in range(hwc.shape[2])]
    return np.clip(np.stack(chans, axis=2), 0.0, 1.0)


def _paste(canvas: np.ndarray, part: np.ndarray, x: int, y: int) -> None:
    """PIL's paste at (x, y), clipped to the canvas (canvas is this module's own array)."""
    h, w = canvas.shape[:2]
    ph, pw = part.shape[:2]
    cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
    if cx1 > cx0 and cy1 > cy0:
        canvas[cy0:cy1, cx0:cx1] = part[cy0 - y:cy1 - y, cx0 - x:cx1 - x]


def resize_and_fill(hwc: np.ndarray, width: int, height: int) -> np.ndarray:
    """A1111 images.resize_image mode 2: fit inside width x height keeping the aspect ratio, centred,
    the empty bands filled by stretching the resized image's edge rows or columns."""
    ih, iw = hwc.shape[:2]
    ratio, src_ratio = width / height, iw / ih
    src_w = width if ratio < src_ratio else iw * height // ih
    src_h = height if ratio >= src_ratio else ih * width // iw
    resized = _resize(hwc, src_w, src_h)
    out = np.zeros((height, width, hwc.shape[2]), np.float32)
    _paste(out, resized, width // 2 - src_w // 2, height // 2 - src_h // 2)
    if ratio < src_ratio and height // 2 - src_h // 2 > 0:
        band = height // 2 - src_h // 2
        _paste(out, _resize(resized, width, band, box=(0, 0, width, 0)), 0, 0)
        _paste(out, _resize(resized, width, band, box=(0, src_h, width, src_h)), 0, band + src_h)
    elif ratio > src_ratio and width // 2 - src_w // 2 > 0:
        band = width // 2 - src_w // 2
        _paste(out, _resize(resized, band, height, box=(0, 0, 0, height)), 0, 0)
        _paste(out, _resize(resized, band, height, box=(src_w, 0, src_w, height)), band + src_w, 0)
    return out


def crop_and_resize(hwc: np.ndarray, width: int, height: int) -> np.ndarray:
    """A1111 images.resize_image mode 1: cover width x height keeping the aspect ratio, centred, the
    excess cropped."""
    ih, iw = hwc.shape[:2]
    ratio, src_ratio = width / height, iw / ih
    src_w = width if ratio > src_ratio else iw * height // ih
    src_h = height if ratio <= src_ratio else ih * width // iw
    out = np.zeros((height, width, hwc.shape[2]), np.float32)
    _paste(out, _resize(hwc, src_w, src_h), width // 2 - src_w // 2, height // 2 - src_h // 2)
    return out


def _u8(arr: np.ndarray) -> np.ndarray:
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111 masking.fill in uint8, as A1111 runs it: the image premultiplied by alpha 1 - mask is
    blurred at falling radii (FILL_PASSES), each blur un-premultiplied and alpha-composited over the
    previous ones, the sharp original last; the alpha is dropped. Where mask is 0 the image stays."""
    rgb, keep = Image.fromarray(_u8(image), "RGB"), ImageOps.invert(Image.fromarray(_u8(mask), "L"))
    layer = Image.new("RGBa", rgb.size)
    layer.paste(rgb.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", rgb.size)
    for radius, repeats in FILL_PASSES:
        blurred = layer.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return np.asarray(out.convert("RGB"), dtype=np.float32) / 255.0


# --- latents and the result ---------------------------------------------------------------------------------

def latent_mask(mask: np.ndarray, latent_height: int, latent_width: int, soft: bool) -> np.ndarray:
    """[1, 1, lh, lw]: the grey mask resized to the latent size with PIL's default (bicubic) filter,
    rounded half to even unless soft (A1111 Img2Img.init `latmask`)."""
    small = Image.fromarray(_u8(mask), "L").resize((latent_width, latent_height), resample=Image.Resampling.BICUBIC)
    lat = np.asarray(small, dtype=np.float32) / 255.0
    return (lat if soft else np.around(lat))[None, None].astype(np.float32)


def image_latents(request: Any, noise: np.ndarray, encode: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  encode_noise: np.ndarray, masked_encode_noise: np.ndarray | None, scale: int, nine: bool) -> dict:
    """The ImageLatents fields (runtime/stages.py) of an A1111 inpainting request. `encode(pixels,
    eps)` VAE-encodes [P, 3, H, W] pixels to one latent per image with that sample noise; `noise` is
    the images' seeded initial noise (A1111's create_random_tensors for "latent_noise")."""
    plan: Inpainting = request.inpainting
    src = [i // request.images_per_prompt for i in range(request.batch)]
    pixels = imgs.to_network(request.images)
    lh, lw = request.height // scale, request.width // scale
    latmask = np.concatenate([latent_mask(m, lh, lw, plan.soft) for m in request.masks])[src]
    init = encode(pixels, encode_noise)
    if plan.masked_content == "latent_noise":
        init = init * (1.0 - latmask) + noise * latmask
    elif plan.masked_content == "latent_nothing":
        init = init * (1.0 - latmask)
    init = init.astype(np.float32)
    if not nine:
        return dict(init=init, keep=init, mask=latmask)
    cond = np.stack(request.masks) if plan.soft else np.around(np.stack(request.masks))  # [P, H, W]
    masked = encode(pixels * (1.0 - cond[:, None]).astype(np.float32), masked_encode_noise)
    unet_mask = np.concatenate([imgs.latent_mask(m, lh, lw) for m in cond])[src]  # nearest, as torch interpolate
    return dict(init=init, keep=init, mask=unet_mask, masked=masked, keep_mask=latmask)


def composite(request: Any, images: np.ndarray) -> np.ndarray:
    """Decoded images [N, H, W, 3] to the request's results: "only masked" resized back to its crop
    box and pasted into the original, and (overlay on) the original composited over with alpha
    1 - overlay mask (A1111 processing.apply_overlay / uncrop)."""
    plan: Inpainting = request.inpainting
    out = []
    for i, image in enumerate(images):
        p = i // request.images_per_prompt
        original, box = plan.originals[p], plan.paste_to[p]
        result = np.asarray(image, dtype=np.float32)
        if box is not None:
            x, y, w, h = box
            canvas = np.array(original, dtype=np.float32)
            _paste(canvas, crop_and_resize(result, w, h), x, y)
            result = canvas
        if plan.overlay:
            alpha = (1.0 - plan.overlay_masks[p])[:, :, None]
            result = original * alpha + result * (1.0 - alpha)
        out.append(result.astype(np.float32))
    return np.stack(out)
