"""Helpers for the server tests (tests/test_serve*.py): a live uvicorn server in a thread on a free
loopback port, HTTP helpers, deadlines for every wait, base64 PNG decoding. No tests here."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import requests
from PIL import Image

import runtime
from runtime.serving.app import create_app
from runtime.serving.service import ServerConfig, Service

T = TypeVar("T")
# Deadlines of the waits: guards against a hang, far above what each takes, never timing assertions
START_TIMEOUT_S = 30.0  # a live server to start or stop (it loads nothing: the pipeline is handed to it)
QUICK_TIMEOUT_S = 30.0  # a request that generates nothing (progress, metrics, health, options)
REQUEST_TIMEOUT_S = 120.0  # a generation on the tiny models


def wait_until(condition: Callable[[], T], what: str, timeout: float, interval: float = 0.05) -> T:
    """Poll `condition()` until it gives a true value, and return that; after `timeout` seconds fail,
    saying what was awaited."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)
    return value


def join(thread: threading.Thread, what: str, timeout: float) -> None:
    """Join `thread`, failing (saying what it was doing) if it still runs after `timeout` seconds."""
    thread.join(timeout)
    assert not thread.is_alive(), f"waited {timeout:g} s for {what}"


def call_within(fn: Callable[[], T], what: str, timeout: float) -> T:
    """fn() in a thread, for a call that has no deadline of its own: its value, or its exception raised
    again here; after `timeout` seconds fail, saying what was awaited (the thread is left behind)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    join(thread, what, timeout)
    if "error" in out:
        raise out["error"]
    return out["value"]


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
        wait_until(lambda: self.server.started or not self.thread.is_alive(), f"the test server on {self.url} to start",
                   START_TIMEOUT_S, interval=0.02)
        assert self.server.started, f"the test server on {self.url} stopped while starting"

    def post(self, path: str, body=None, *, data: bytes | None = None, headers=None,
             timeout: float = REQUEST_TIMEOUT_S):
        return requests.post(self.url + path, json=body if data is None else None, data=data, headers=headers,
                             timeout=timeout)

    def get(self, path: str, headers=None, timeout: float = QUICK_TIMEOUT_S):
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
        join(self.thread, f"the test server on {self.url} to stop", 2 * START_TIMEOUT_S)


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

