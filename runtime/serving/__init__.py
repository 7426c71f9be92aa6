"""The generation server (the `serve` extra: FastAPI, uvicorn, pydantic, prometheus-client; Ray Serve
for scale-out in the `cluster` extra). Guide: docs/serving.md.

    python -m runtime serve ENGINE_DIR [--host 127.0.0.1] [--port 7860] [--backend ...]
    python -m runtime serve ENGINE_DIR --ray --replicas 2

Modules: `app` (the ASGI application and its routes), `service` (what routes share, the request
flow), `queue` (bounded queue, batching, cancellation), `a1111` and `openai` (wire models and their
translation into pipeline settings), `controlnet` and `controlnet_routes` (the sd-webui-controlnet
extension's units and `/controlnet/*` routes), `codec` (images and masks on the wire), `metrics`
(Prometheus), `server` (the command), `ray` (the Ray Serve deployment), `page/` (the web UI).
"""
