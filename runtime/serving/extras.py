"""AUTOMATIC1111's upscaler endpoints, with the upscalers that need no weights
(runtime/imaging/upscale.py):

    GET  /sdapi/v1/upscalers              modules/api/api.py get_upscalers (shared.sd_upscalers)
    GET  /sdapi/v1/latent-upscale-modes   get_latent_upscale_modes (shared.latent_upscale_modes)
    POST /sdapi/v1/extra-single-image     extras_single_image_api -> postprocessing.run_extras with
                                          scripts/postprocessing_upscale.py ScriptPostprocessingUpscale

The request model is A1111's ExtrasSingleImageRequest (modules/api/models.py ExtrasBaseRequest),
field for field. Face restoration (GFPGAN, CodeFormer) needs weights: its fields are accepted at
their no-op value 0 and refused otherwise; an upscaler outside the list is refused naming its field.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from runtime.imaging import upscale as up

from .codec import WireError, decode_image, encode_png
from .service import Service, wire_error

__all__ = ["ExtrasSingleImageRequest", "add_routes", "run_extras", "upscaler_items"]

UPSCALER_SCALE = 4  # A1111 modules/upscaler.py UpscalerData: scale defaults to 4 (what /upscalers reports)


class ExtrasSingleImageRequest(BaseModel):
    """POST /sdapi/v1/extra-single-image (A1111 ExtrasSingleImageRequest)."""

    model_config = ConfigDict(extra="forbid")

    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_weight: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = False
    image: str = ""


def upscaler_items() -> list[dict[str, Any]]:
    """A1111 get_upscalers over the upscalers served here (no model file, path or URL)."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": UPSCALER_SCALE}
            for name in up.IMAGE_UPSCALERS]


def _upscaler(req: ExtrasSingleImageRequest, field: str) -> str | None:
    name = getattr(req, field)
    if name in up.IMAGE_UPSCALERS:
        return None if name == "None" else name
    raise WireError(field, f"upscaler {name!r} is not available here (upscalers with weights, such as ESRGAN, "
                           f"SwinIR, LDSR or ScuNET, are not served); send one of {', '.join(up.IMAGE_UPSCALERS)}")


def _upscale(image: Image.Image, name: str, req: ExtrasSingleImageRequest) -> Image.Image:
    """ScriptPostprocessingUpscale.upscale: scale by `upscaling_resize` (mode 0), or to cover
    upscaling_resize_w x _h (mode 1), then with `upscaling_crop` paste centred on a black canvas of
    exactly that size."""
    w, h = req.upscaling_resize_w, req.upscaling_resize_h
    scale = req.upscaling_resize if req.resize_mode == 0 else max(w / image.width, h / image.height)
    out = up.upscale(image, scale, name)
    if req.resize_mode == 1 and req.upscaling_crop:
        canvas = Image.new("RGB", (w, h))
        canvas.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
        out = canvas
    return out


def run_extras(req: ExtrasSingleImageRequest) -> tuple[Image.Image, str]:
    """(image, html_info) of A1111 run_extras for one image: upscaler_1 ("None": the image as it is),
    blended with upscaler_2 at extras_upscaler_2_visibility (PIL Image.blend) when that is > 0."""
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, field):
            raise WireError(field, "face restoration needs model weights this server does not have; send 0")
    first, second = _upscaler(req, "upscaler_1"), _upscaler(req, "upscaler_2")
    image = decode_image(req.image, "image")
    image = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    if first is None:
        return image, ""
    out = _upscale(image, first, req)
    if second is not None and req.extras_upscaler_2_visibility > 0:
        other = _upscale(image, second, req)
        out = Image.blend(out, other.convert(out.mode), req.extras_upscaler_2_visibility)
    return out, f"<p>Postprocess upscaler: {first}</p>"


def add_routes(app: FastAPI, svc: Service) -> None:
    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return upscaler_items()

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": name} for name in up.LATENT_MODES]

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(body: ExtrasSingleImageRequest):
        try:
            image, info = await asyncio.to_thread(run_extras, body)
        except WireError as e:
            raise wire_error(e) from None
        encoded = await asyncio.to_thread(encode_png, image) if body.show_extras_results else None
        svc.metrics.record("/sdapi/v1/extra-single-image", "ok")
        return {"html_info": info, "image": encoded}
