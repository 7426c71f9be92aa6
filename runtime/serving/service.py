"""What the HTTP routes share: the loaded pipeline, the job queue, the metrics and the settings, and
the request flow common to every generating endpoint (validate at the door, queue, await with
timeout and disconnect watch, answer). The routes themselves are in runtime/serving/app.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.imaging import images as imgs
from runtime.errors import PipelineError, SDRuntimeError
from runtime.pipeline import GenerationResult, Pipeline
from runtime.request import Request
from runtime.text.styles import StyleBook

from .codec import WireError
from .metrics import Metrics
from .queue import Batcher, Job, JobCancelled, QueueFull

__all__ = ["ServerConfig", "Service", "ServeError"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Server settings (the `serve` command's options; docs/serving.md)."""

    api_key: str | None = None  # required as "Authorization: Bearer KEY" (or Basic, any user) when set
    max_queue: int = 32  # waiting requests; past it 503 with Retry-After
    workers: int = 1  # engine threads; each runs one batch at a time
    timeout: float = 600.0  # seconds from arrival to answer; then 504 and the job is cancelled
    max_body_bytes: int = 32 * 2**20
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are given
    max_steps: int = 150
    max_n_iter: int = 16
    batch_wait: float = 0.0  # seconds a lone queued request waits for a compatible one
    replica: str | None = None  # set by the Ray Serve deployment: answered in x-sd-runtime-replica
    styles: str | None = None  # A1111's styles.csv for the requests' `styles` (runtime/text/styles.py); None: none


class ServeError(Exception):
    """An answer other than 200: status, message, the field it concerns, extra headers."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
                 outcome: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.headers = headers or {}
        self.outcome = outcome


class Service:
    """`close_pipe`: whether closing the service closes the pipeline too (False when the caller
    shares the pipeline with other users and closes it itself)."""

    def __init__(self, pipe: Pipeline, config: ServerConfig = ServerConfig(), *, close_pipe: bool = True):
        self.pipe = pipe
        self.config = config
        self.styles = StyleBook.load(config.styles) if config.styles else None  # ValueError: unreadable
        self._close_pipe = close_pipe
        self.metrics = Metrics(lambda: self.batcher.depth, lambda: len(self.batcher.running))
        self.batcher = Batcher(pipe, max_queue=config.max_queue, workers=config.workers,
                               batch_wait=config.batch_wait, on_batch=self.metrics.on_batch)
        source = pipe.manifest.source or {}
        self.model_name = (Path(source["path"]).stem if source.get("path") else source.get("preset")
                           or pipe.engine_dir.name)
        self.model_hash = source.get("sha256")
        short = f" [{self.model_hash[:10]}]" if self.model_hash else ""
        self.model_title = f"{self.model_name}{short}"

    @property
    def model_titles(self) -> tuple[str, ...]:
        return (self.model_title, self.model_name)

    def close(self) -> None:
        """Finish what is queued, then release the engines."""
        self.batcher.close()
        if self._close_pipe:
            self.pipe.close()

    # -- the door ------------------------------------------------------------------------------------

    def make_requests(self, mode: str, settings: list[dict[str, Any]], fields: Mapping[str, str],
                      status: int = 422) -> list[Request]:
        """Validate each job's settings into a prepared Request (`Pipeline.request`: the one validation
        layer), or raise ServeError `status` naming the wire field at fault: the error's `field` under
        its wire name in `fields` (a schedule the sampler refuses names the sampler's field)."""
        out = []
        for s in settings:
            s = dict(s)
            prompt = s.pop("prompt")
            try:
                r = self.pipe.request(mode, prompt, **s)
            except PipelineError as e:
                field = fields.get(e.field or "")
                raise ServeError(status, f"{field}: {e}" if field else str(e), field=field) from None
            out.append(r)
        return out

    # -- the queue -----------------------------------------------------------------------------------

    async def run(self, requests: list[Request], http_request: Any, task_id: str | None = None
                  ) -> tuple[list[GenerationResult], str | None]:
        """Queue the requests and wait for them: (results, None), or (partial results, "interrupted")
        when /interrupt stopped them. Raises ServeError for a full queue (503), a timeout (504)."""
        jobs: list[Job] = []
        try:
            for r in requests:
                jobs.append(self.batcher.submit(r, timeout=self.config.timeout, task_id=task_id))
        except QueueFull as e:
            for j in jobs:
                j.cancel("rejected")
            raise ServeError(503, str(e), headers={"Retry-After": str(e.retry_after)}, outcome="rejected") from None
        except RuntimeError as e:
            raise ServeError(503, str(e), headers={"Retry-After": "5"}, outcome="rejected") from None
        futures = [asyncio.wrap_future(j.future) for j in jobs]
        watcher = asyncio.create_task(_watch_disconnect(http_request, jobs))
        try:
            done, pending = await asyncio.wait(futures, timeout=self.config.timeout + 5.0)
        except asyncio.CancelledError:  # the ASGI server (or Ray's proxy) dropped the request
            for j in jobs:
                j.cancel("disconnected")
            raise
        finally:
            watcher.cancel()
        if pending:
            for j in jobs:
                j.cancel("timeout")
            raise ServeError(504, f"the request did not finish within {self.config.timeout:g} s", outcome="timeout")
        return await asyncio.to_thread(self._collect, jobs)

    def _collect(self, jobs: list[Job]) -> tuple[list[GenerationResult], str | None]:
        results, stopped = [], None
        for j in jobs:
            error = j.future.exception()
            if error is None:
                results.append(j.future.result())
            elif isinstance(error, JobCancelled):
                if error.reason == "timeout":
                    raise ServeError(504, f"the request did not finish within {self.config.timeout:g} s",
                                     outcome="timeout")
                stopped = error.reason
                results.append(self._partial(j, error))
            elif isinstance(error, PipelineError):
                raise ServeError(422, str(error))
            elif isinstance(error, SDRuntimeError):
                raise ServeError(500, f"generation failed: {error}", outcome="error")
            else:
                raise ServeError(500, f"generation failed: {type(error).__name__}: {error}", outcome="error")
        return results, stopped

    def _partial(self, job: Job, error: JobCancelled) -> GenerationResult:
        """A stopped job's result: its latents after the last finished step, decoded (A1111 returns the
        current image of an interrupted job); no images if no step finished."""
        r = job.request
        images = []
        if error.latents is not None:
            images = imgs.to_pil(self.pipe.decode(r, error.latents))
        params = {**r.parameters(), "engine": str(self.pipe.engine_dir), "backend": self.pipe.backend,
                  "interrupted_at_step": job.step}
        return GenerationResult(images=images, seeds=list(r.seeds)[:len(images)], timings={},
                                backend=self.pipe.backend, parameters=params)

    # -- progress ------------------------------------------------------------------------------------

    def current(self, task_id: str | None) -> tuple[str, Job | None]:
        """("running" | "queued" | "idle" | "unknown", job) for a task id, or for the oldest running job."""
        if task_id:
            found = self.batcher.find(task_id)
            return found if found else ("unknown", None)
        running = self.batcher.running
        if running:
            return "running", min(running, key=lambda j: j.started or 0.0)
        return "idle", None


async def _watch_disconnect(http_request: Any, jobs: list[Job], every: float = 0.2) -> None:
    """Cancel the jobs once the client has gone (Starlette reports http.disconnect)."""
    if http_request is None:
        return
    while True:
        if await http_request.is_disconnected():
            for j in jobs:
                j.cancel("disconnected")
            return
        await asyncio.sleep(every)


def wire_error(e: WireError) -> ServeError:
    return ServeError(e.status, f"{e.field}: {e.message}", field=e.field)


def now_stamp() -> str:
    return time.strftime("%Y%m%d%H%M%S")
