"""Helpers for the server tests (tests/test_serve*.py): a live uvicorn server in a thread on a free
loopback port, HTTP helpers, base64 PNG decoding. No tests here."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

import runtime
from runtime.serving.app import create_app
from runtime.serving.service import ServerConfig, Service


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """create_app(Service(pipe, config)) under uvicorn in a background thread, on 127.0.0.1."""

    def __init__(self, pipe, **config):
        import uvicorn

        self.pipe = pipe
        self.service = Service(pipe, ServerConfig(**config), close_pipe=False)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(create_app(self.service), host="127.0.0.1", port=self.port, log_level="warning",
                             lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def post(self, path: str, body=None, *, data: bytes | None = None, headers=None, timeout: float = 120):
        return requests.post(self.url + path, json=body if data is None else None, data=data, headers=headers,
                             timeout=timeout)

    def get(self, path: str, headers=None, timeout: float = 30):
        return requests.get(self.url + path, headers=headers, timeout=timeout)

    def metric(self, name: str, **labels) -> float:
        """A sample's value from /metrics (0 if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        key = f"{name}{{{want}}}" if want else name
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def sd1_pipe(tiny_sd1_engine: Path):
    with runtime.load(tiny_sd1_engine, backend="onnxruntime") as pipe:
        yield pipe


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_b64(image: Image.Image | np.ndarray) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def picture(seed: int = 0, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A deterministic RGB test picture: a gradient with a bright square."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 60 + seed * 40)], axis=2)
    img[h // 4:h // 2, w // 4:w // 2] = (250, 240, 30)
    return img.astype(np.uint8)

