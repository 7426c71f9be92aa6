"""The sd-webui-controlnet extension's `/controlnet/*` routes (its scripts/api.py), over the wire
format of controlnet.py."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from runtime.errors import PipelineError

from . import controlnet as cn
from .codec import WireError
from .service import Service, wire_error

__all__ = ["add_routes"]


def add_routes(app: FastAPI, svc: Service) -> None:
    @app.get("/controlnet/version")
    async def version():
        return {"version": cn.API_VERSION}

    @app.get("/controlnet/model_list")
    async def model_list(update: bool = True):
        return {"model_list": list(svc.models.default.limits.controlnets)}

    @app.get("/controlnet/module_list")
    async def modules(alias_names: bool = False):
        return cn.module_list(alias_names)

    @app.post("/controlnet/detect")
    async def detect_route(body: cn.DetectRequest):
        try:
            images = await asyncio.to_thread(cn.detect, body)
        except WireError as e:
            raise wire_error(e) from None
        except PipelineError as e:  # OpenCV missing
            raise wire_error(WireError(e.field or "controlnet_module", str(e), status=500)) from None
        svc.metrics.record("/controlnet/detect", "ok")
        return {"info": "Success", "images": images}
