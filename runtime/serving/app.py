"""The ASGI application (FastAPI): AUTOMATIC1111's `/sdapi/v1` endpoints, OpenAI's
`/v1/images/generations`, `/health`, `/metrics`, the web page at `/`, and our `/sd_runtime/v1/info`.

    app = create_app(Service(runtime.load(engine_dir), ServerConfig()))
    app = create_app(Service(Models.from_folders([dir1, dir2], runtime.load), ServerConfig()))

Errors answer in the shape of the API asked: A1111's `{"error", "detail", "body", "errors"}` (its
api.py `handle_exception`) under `/sdapi`, OpenAI's `{"error": {"message", "type", "param",
"code"}}` under `/v1`, `{"detail"}` elsewhere. Every 4xx names the field or the problem.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from runtime import handover
from runtime.errors import PipelineError
from runtime.imaging import png_info
from runtime.sampling import names as sampler_names

from . import a1111, controlnet, controlnet_routes, extras, openai
from .codec import WireError, encode_png
from .models import Model
from .service import ServeError, Service, now_stamp, wire_error

__all__ = ["create_app"]

PAGE = Path(__file__).with_name("page") / "index.html"
PUBLIC = ("/", "/health")  # paths served without the API key (the page asks for the key itself)
REPLICA_HEADER = "x-sd-runtime-replica"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


class Guard:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the
    routes): the API key (constant-time compare) and the body size limit, checked before the
    application reads anything, and the replica header on every answer."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, replica: str | None = None):
        self.app, self.key, self.max_body = app, api_key.encode() if api_key else None, max_body
        self.replica = replica.encode() if replica else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.key is not None and scope["path"] not in PUBLIC and not self._authorized(headers):
            response = _error(scope["path"], 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                              headers={"WWW-Authenticate": 'Bearer, Basic realm="sd-runtime"'})
            return await response(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _error(scope["path"], 413, str(BodyTooLarge(self.max_body).detail))(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge(self.max_body)
            return message

        async def send_with_replica(message: dict) -> None:
            if message["type"] == "http.response.start" and self.replica is not None:
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]}
            await send(message)

        await self.app(scope, limited, send_with_replica)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip().encode()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip()).partition(b":")[2]
            except ValueError:
                return False
        else:
            given = headers.get("x-api-key", "").encode()
        return hmac.compare_digest(given, self.key)


def _error(path: str, status: int, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    elif path.startswith("/sdapi/"):
        body = {"error": _ERROR_NAMES.get(status, "HTTPException"), "detail": message, "body": "", "errors": message}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


_ERROR_NAMES = {401: "Unauthorized", 404: "NotFound", 413: "RequestTooLarge", 422: "ValidationError",
                503: "ServiceUnavailable", 504: "Timeout"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first invalid field: 'steps: Input should be a valid integer ...'."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    field = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{field or 'body'}: {e.get('msg')}{more}", field


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over a Service; its lifespan closes the service on shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="sd-runtime", version="0.1.0", lifespan=lifespan,
                  description="AUTOMATIC1111- and OpenAI-compatible Stable Diffusion server (docs/serving.md)")
    app.state.service = service
    _handlers(app, service)
    _a1111_routes(app, service)
    _info_routes(app, service)
    _other_routes(app, service)
    extras.add_routes(app, service)  # /upscalers, /latent-upscale-modes, /extra-single-image
    controlnet_routes.add_routes(app, service)  # /controlnet/version, model_list, module_list, detect
    if service.config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(service.config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Guard, api_key=service.config.api_key, max_body=service.config.max_body_bytes,
                       replica=service.config.replica)
    return app


def _handlers(app: FastAPI, svc: Service) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        svc.metrics.record(_endpoint(request), "bad_request")
        return _error(request.url.path, 422 if not request.url.path.startswith("/v1/") else 400, message, field)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        svc.metrics.record(_endpoint(request), exc.outcome)
        return _error(request.url.path, exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(request.url.path, exc.status_code, str(exc.detail), headers=exc.headers)


def _endpoint(request: Request) -> str:
    return request.url.path if request.url.path.startswith(("/sdapi/v1/", "/v1/")) else "other"


def _a1111_routes(app: FastAPI, svc: Service) -> None:
    @app.post("/sdapi/v1/txt2img", response_model=a1111.ImageResponse)
    async def txt2img(body: a1111.Txt2ImgRequest, request: Request):
        return await _generate_a1111(svc, body, request, "/sdapi/v1/txt2img")

    @app.post("/sdapi/v1/img2img", response_model=a1111.ImageResponse)
    async def img2img(body: a1111.Img2ImgRequest, request: Request):
        return await _generate_a1111(svc, body, request, "/sdapi/v1/img2img")

    @app.get("/sdapi/v1/progress", response_model=a1111.ProgressResponse)
    async def progress(skip_current_image: bool = False, sd_runtime_task_id: str | None = None):
        return await asyncio.to_thread(_progress, svc, skip_current_image, sd_runtime_task_id)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        svc.batcher.interrupt()
        return {}

    @app.post("/v1/images/generations", response_model=openai.GenerationsResponse)
    async def generations(body: openai.GenerationsRequest, request: Request):
        t0 = time.monotonic()

        def prepare():
            model = svc.select(body.model, "model", 400)
            try:
                settings = openai.job_settings(body, model.limits, svc.config.max_steps)
            except WireError as e:
                raise wire_error(e) from None
            target, tagged = svc.route(model, settings, openai.FIELDS, 400)
            if target is not model:  # a LoRA tag picked another folder: its limits
                settings = openai.job_settings(body, target.limits, svc.config.max_steps)
            return target, settings, tagged

        model, settings, tagged = await asyncio.to_thread(prepare)
        async with svc.using(model) as pipe:
            requests = await asyncio.to_thread(svc.make_requests, pipe, "txt2img", settings, openai.FIELDS, 400, tagged)
            results, stopped = await svc.run(pipe, requests, request)
        if stopped:
            raise ServeError(409, f"generation {stopped} (POST /sdapi/v1/interrupt)", outcome=stopped)
        data = await asyncio.to_thread(lambda: [{"b64_json": encode_png(im)} for r in results for im in r.images])
        svc.metrics.record("/v1/images/generations", "ok", time.monotonic() - t0)
        return {"created": int(time.time()), "data": data}


def _a1111_prepare(svc: Service, body: a1111.Txt2ImgRequest) -> tuple[Model, str, list, list]:
    """(the folder, mode, job settings, parsed prompts): the checkpoint the request names (or the
    default), then the one its LoRA tags need."""
    field = "override_settings.sd_model_checkpoint"
    model = svc.select((body.override_settings or {}).get("sd_model_checkpoint"), field)

    def settings(m: Model):
        return a1111.job_settings(body, m.limits, max_steps=svc.config.max_steps, max_n_iter=svc.config.max_n_iter,
                                  styles=svc.styles, controlnets=m.limits.controlnets)

    try:
        a1111.check_override_settings(body.override_settings)
        mode, jobs = settings(model)
        target, tagged = svc.route(model, jobs, a1111.FIELDS)
        if target is not model:  # a LoRA tag picked another folder: its limits (default size, samplers)
            mode, jobs = settings(target)
    except WireError as e:
        raise wire_error(e) from None
    return target, mode, jobs, tagged


async def _generate_a1111(svc: Service, body: a1111.Txt2ImgRequest, request: Request, endpoint: str) -> dict:
    t0 = time.monotonic()
    model, mode, settings, tagged = await asyncio.to_thread(_a1111_prepare, svc, body)
    refiner = _a1111_refiner(svc, body)  # the jobs then stop at the switch point (a1111.job_settings)
    async with svc.using(model) as pipe:
        requests = await asyncio.to_thread(svc.make_requests, pipe, mode, settings, a1111.FIELDS, 422, tagged)
        if refiner is not None:  # what the refiner's manifest alone can refuse, before the checkpoint runs
            try:
                for r in requests:
                    handover.check_embeddings(refiner.manifest, refiner.name, r)
            except PipelineError as e:
                raise ServeError(422, f"refiner_checkpoint: {e}", field="refiner_checkpoint") from None
        results, stopped = await svc.run(pipe, requests, request, task_id=body.force_task_id)
        if refiner is None or stopped:
            maps = await asyncio.to_thread(controlnet.detected_maps, body.alwayson_scripts, settings[0])
            response = await asyncio.to_thread(_a1111_response, svc, model, pipe, body, results, stopped, maps)
    if refiner is not None and not stopped:  # the checkpoint's folder is released first: --max-resident 1 serves this
        response, stopped = await _refine_a1111(svc, model, refiner, body, requests, results, request)
    svc.metrics.record(endpoint, stopped or "ok", time.monotonic() - t0)
    return response


def _a1111_refiner(svc: Service, body: a1111.Txt2ImgRequest) -> Model | None:
    """The served refiner folder A1111's `refiner_checkpoint` names (runtime/handover.py), or None
    without one; a refiner that is not served is refused, 422 naming refiner_checkpoint."""
    try:
        wanted = a1111.refiner(body)
    except WireError as e:
        raise wire_error(e) from None
    return None if wanted is None else svc.select(wanted[0], "refiner_checkpoint")


async def _refine_a1111(svc: Service, model: Model, refiner: Model, body: a1111.Txt2ImgRequest, requests: list,
                        results: list, request: Request) -> tuple[dict, str | None]:
    """The refiner's part of a hand-over: one img2img request per base request, from its latents
    (runtime/handover.py), run on the refiner folder; A1111's answer naming the base checkpoint."""
    async with svc.using(refiner) as pipe:
        def prepare() -> list:
            try:
                return [handover.continued(handover.refiner_request(pipe, r, "pil"), res)
                        for r, res in zip(requests, results)]
            except PipelineError as e:
                raise ServeError(422, f"refiner_checkpoint: {e}", field="refiner_checkpoint") from None

        second = await asyncio.to_thread(prepare)
        refined, stopped = await svc.run(pipe, second, request, task_id=body.force_task_id)
        refined = [handover.merged(a, b, pipe, r.denoising_end) for a, b, r in zip(results, refined, requests)]
        return await asyncio.to_thread(_a1111_response, svc, model, pipe, body, refined, stopped, []), stopped


def _a1111_response(svc: Service, model: Model, pipe: Any, body: a1111.Txt2ImgRequest, results: list,
                    stopped: str | None, maps: list[str] | None = None) -> dict:
    """A1111's answer; `maps`: the ControlNet units' detected maps (base64 PNG), after the images as the
    extension appends them."""
    pnginfo = (body.override_settings or {}).get("enable_pnginfo", True)
    karras = [bool(r.parameters.get("karras")) for r in results]
    infotexts = [png_info.infotext_from_parameters({**r.parameters, "seeds": r.seeds}, seed=s, karras=k,
                                                    model_hash=model.hash, model_name=model.name, subseed=sub)
                 for r, k in zip(results, karras)
                 for s, sub in zip(r.seeds, r.parameters.get("subseeds") or [None] * len(r.seeds))]
    images = [im for r in results for im in r.images]
    encoded = [encode_png(im, text if pnginfo else None) for im, text in zip(images, infotexts)]
    encoded += maps or []
    extra = {"job_timestamp": now_stamp(), "backend": pipe.backend, "scheduler": results[0].parameters["scheduler"],
             "timings": results[0].timings, "replica": svc.config.replica}
    if stopped:
        extra["stopped"] = stopped
    info = a1111.processed_info(body, results, infotexts, model_name=model.name, model_hash=model.hash,
                                inpainting=pipe.limits.inpainting_unet, extra=extra)
    params = body.model_dump()
    if isinstance(body, a1111.Img2ImgRequest) and not body.include_init_images:
        params["init_images"], params["mask"] = None, None
    return {"images": encoded if body.send_images else [], "parameters": params, "info": json.dumps(info)}


def _progress(svc: Service, skip_image: bool, task_id: str | None) -> dict:
    status, job = svc.current(task_id)
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": now_stamp(), "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
             "sd_runtime": {"status": status, "queued": svc.batcher.depth, "running": len(svc.batcher.running)}}
    state["job_count"] = state["sd_runtime"]["queued"] + state["sd_runtime"]["running"]
    if job is None or status != "running":
        if job is not None:
            state["job"] = job.task_id
        return {"progress": 0.0, "eta_relative": svc.batcher.estimate_seconds(job) if job else 0.0, "state": state,
                "current_image": None, "textinfo": None}
    total = job.total_steps
    done = min(job.step, total)
    state.update(job=job.task_id, sampling_step=done, sampling_steps=total,
                 interrupted=job.cancel_reason == "interrupted")
    progress = min(1.0, 0.01 + done / total)
    elapsed = time.monotonic() - (job.started or time.monotonic())
    eta = elapsed / progress - elapsed if done else svc.batcher.estimate_seconds(job)
    image = None
    if not skip_image and job.latents is not None:
        image = _preview(job.pipe or svc.batcher.pipe, job.latents)
    return {"progress": progress, "eta_relative": max(0.0, eta), "state": state, "current_image": image,
            "textinfo": f"step {done}/{total}"}


def _preview(pipe: Any, latents: Any) -> str | None:
    """The first image's live preview on the job's folder: its tiny VAE's decode where it has one,
    else the cheap linear one (Pipeline.preview)."""
    from PIL import Image

    if pipe is None:
        return None
    try:
        rgb = pipe.preview(latents[:1])[0]
    except ValueError:  # a latent space the SD coefficients do not fit
        return None
    return encode_png(Image.fromarray(rgb))


def _info_routes(app: FastAPI, svc: Service) -> None:
    @app.get("/sdapi/v1/samplers")
    async def samplers():
        ours = set(svc.models.default.limits.samplers)
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}}
                for s in sampler_names.A1111_SAMPLERS if s.ours in ours]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": key, "label": label, "aliases": None, "default_rho": 7.0 if key == "karras" else None,
                 "need_inner_model": False} for label, key in sampler_names.A1111_SCHEDULES.items()
                if label in ("Automatic", "Uniform", "Karras", *sampler_names.SPACING_SCHEDULES)]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [m.item() for m in svc.models.models]

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():  # A1111's list of {model_name, filename}: the default folder's tiny VAE, where it has one
        model = svc.models.default
        m = model.manifest
        return [{"model_name": a1111.TINY_VAE_NAMES[0], "filename": m.networks[m.vae_graph("vae_decoder", "tiny")]["file"]}
                ] if model.limits.tiny_vae else []

    @app.get("/sdapi/v1/options")
    async def get_options():
        return _options(svc)

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]):
        """Only `sd_model_checkpoint` changes (the default folder, as A1111 clients switch models);
        every other option must be sent at the value it has."""
        model = svc.select(body["sd_model_checkpoint"], "sd_model_checkpoint") if "sd_model_checkpoint" in body \
            else None
        current = _options(svc)
        for key, value in body.items():
            if key != "sd_model_checkpoint" and current.get(key, object()) != value:
                raise ServeError(422, f"{key}: options cannot be changed on this server", field=key)
        if model is not None:
            svc.models.set_default(model.title)
        return None

    @app.get("/sdapi/v1/prompt-styles")
    async def prompt_styles():  # A1111's PromptStyleItem list; [] without a styles file (serve --styles)
        return [style.item() for style in svc.styles.styles.values()] if svc.styles else []

    @app.get("/sdapi/v1/scripts")
    async def scripts():  # A1111 lists alwayson scripts by lowercased title: the ControlNet extension's "controlnet"
        served = ["controlnet"] if svc.models.default.limits.controlnets else []
        return {"txt2img": served, "img2img": list(served)}


def _options(svc: Service) -> dict[str, Any]:
    """The A1111 options that describe this server (read-only)."""
    model = svc.models.default
    default = sampler_names.to_a1111(model.limits.default_sampler, False)[0]
    return {"sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.hash, "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "eta_ddim": 0.0, "eta_ancestral": 1.0,
            "s_churn": 0.0, "s_tmin": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0, "samples_format": "png",
            "enable_pnginfo": True, "live_previews_enable": True, "show_progress_every_n_steps": 1,
            "sd_runtime_default_sampler": default}


def _other_routes(app: FastAPI, svc: Service) -> None:
    @app.get("/health")
    async def health():
        default = svc.models.default
        pipe = svc.models.pipe_if_open(default)
        return {"status": "ok", "model": default.title, "backend": pipe.backend if pipe else None,
                "resident": svc.models.resident(), "queue_depth": svc.batcher.depth,
                "running": len(svc.batcher.running), "replica": svc.config.replica}

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/sd_runtime/v1/info")
    async def info():
        default = svc.models.default
        lim, pipe = default.limits, svc.models.pipe_if_open(default)
        return {"model": default.title, "backend": pipe.backend if pipe else None, "replica": svc.config.replica,
                "models": [m.title for m in svc.models.models], "resident": svc.models.resident(),
                "max_resident": svc.models.max_resident,
                "min_image": lim.min_image, "max_image": lim.max_image, "step": lim.vae_scale_factor,
                "max_batch": lim.max_batch, "default_size": list(lim.default_size), "max_steps": svc.config.max_steps,
                "inpainting_unet": lim.inpainting_unet, "api_key_required": svc.config.api_key is not None,
                "recommended": default.manifest.defaults, "tiny_vae": lim.tiny_vae is not None,
                "family": default.manifest.family, "model_details": [_details(m) for m in svc.models.models]}

    def _details(model: Any) -> dict[str, Any]:
        """What the page needs to switch to `model` (sent as override_settings.sd_model_checkpoint)."""
        lim = model.limits
        return {"title": model.title, "family": model.manifest.family, "default_size": list(lim.default_size),
                "min_image": lim.min_image, "max_image": lim.max_image, "step": lim.vae_scale_factor,
                "inpainting_unet": lim.inpainting_unet, "tiny_vae": lim.tiny_vae is not None,
                "recommended": model.manifest.defaults}

    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self' data: blob: "
                                                                      "'unsafe-inline'"})

