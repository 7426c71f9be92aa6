"""What the HTTP routes share: the served engine folders (runtime/serving/models.py: one or several,
a bounded number open), the job queue, the metrics and the settings, and the request flow common to
every generating endpoint (pick the folder, validate at the door, queue, await with timeout and
disconnect watch, answer). The routes themselves are in runtime/serving/app.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from runtime.imaging import images as imgs
from runtime.errors import PipelineError, SDRuntimeError
from runtime.pipeline import GenerationResult, Pipeline
from runtime.request import Request
from runtime.text import lora_tags
from runtime.text.styles import StyleBook

from .codec import WireError
from .metrics import Metrics
from .models import Model, ModelBusy, Models, UnknownModel
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
    """`models`: the served folders (`Models`), or one open Pipeline. `close_pipe`: whether closing
    the service closes that pipeline too (False when the caller shares it with other users and
    closes it itself)."""

    def __init__(self, models: Models | Pipeline, config: ServerConfig = ServerConfig(), *, close_pipe: bool = True):
        self.models = models if isinstance(models, Models) else Models.single(models, owned=close_pipe)
        self.config = config
        self.styles = StyleBook.load(config.styles) if config.styles else None  # ValueError: unreadable
        self.metrics = Metrics(lambda: self.batcher.depth, lambda: len(self.batcher.running))
        self.batcher = Batcher(max_queue=config.max_queue, workers=config.workers,
                               batch_wait=config.batch_wait, on_batch=self.metrics.on_batch)

    def close(self) -> None:
        """Finish what is queued, then release the engines."""
        self.batcher.close()
        self.models.close()

    # -- which folder ------------------------------------------------------------------------------

    def select(self, name: str | None, field: str, status: int = 422) -> Model:
        """The served folder `name` picks (None: the default), or ServeError `status` naming `field`."""
        try:
            return self.models.find(name)
        except UnknownModel as e:
            raise ServeError(status, f"{field}: {e}", field=field) from None

    def route(self, selected: Model, settings: list[dict[str, Any]], fields: Mapping[str, str],
              status: int = 422) -> tuple[Model, list[lora_tags.TaggedPrompts]]:
        """(the folder that honours the jobs' LoRA tags, each job's parsed prompts): the tags are
        read here, once, and handed to Pipeline.request."""
        try:
            tagged = [lora_tags.parse_prompts(_texts(s["prompt"]), _texts(s.get("negative_prompt")))
                      for s in settings]
            return self.models.route(selected, tagged[0]), tagged
        except PipelineError as e:
            raise _field_error(e, fields, status) from None

    @asynccontextmanager
    async def using(self, model: Model) -> AsyncIterator[Pipeline]:
        """The open pipeline of `model` for one HTTP request; the folder stays open until it ends."""
        try:
            pipe = await asyncio.to_thread(self.models.acquire, model, self.config.timeout)
        except ModelBusy as e:
            raise ServeError(503, str(e), headers={"Retry-After": "5"}, outcome="rejected") from None
        except SDRuntimeError as e:
            raise ServeError(500, f"cannot open {model.title}: {e}", outcome="error") from None
        try:
            yield pipe
        finally:
            self.models.release(model)

    # -- the door ------------------------------------------------------------------------------------

    def make_requests(self, pipe: Pipeline, mode: str, settings: list[dict[str, Any]], fields: Mapping[str, str],
                      status: int = 422, tagged: list[lora_tags.TaggedPrompts] | None = None) -> list[Request]:
        """Validate each job's settings into a prepared Request (`pipe.request`: the one validation
        layer; `tagged`: the jobs' prompts as `route` parsed them), or raise ServeError `status`
        naming the wire field at fault: the error's `field` under its wire name in `fields` (a
        schedule the sampler refuses names the sampler's field)."""
        out = []
        for k, s in enumerate(settings):
            s = dict(s)
            prompt = s.pop("prompt")
            try:
                r = pipe.request(mode, prompt, prompt_tags=tagged[k] if tagged else None, **s)
            except PipelineError as e:
                raise _field_error(e, fields, status) from None
            out.append(r)
        return out

    # -- the queue -----------------------------------------------------------------------------------

    async def run(self, pipe: Pipeline, requests: list[Request], http_request: Any, task_id: str | None = None
                  ) -> tuple[list[GenerationResult], str | None]:
        """Queue the requests and wait for them: (results, None), or (partial results, "interrupted")
        when /interrupt stopped them. Raises ServeError for a full queue (503), a timeout (504)."""
        jobs: list[Job] = []
        try:
            for r in requests:
                jobs.append(self.batcher.submit(r, timeout=self.config.timeout, task_id=task_id, pipe=pipe))
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
        r, pipe = job.request, job.pipe
        images = []
        if error.latents is not None:
            images = imgs.to_pil(pipe.decode(r, error.latents))
        params = {**r.parameters(), "engine": str(pipe.engine_dir), "backend": pipe.backend,
                  "interrupted_at_step": job.step}
        return GenerationResult(images=images, seeds=list(r.seeds)[:len(images)], timings={},
                                backend=pipe.backend, parameters=params)

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


def _texts(value: Any) -> tuple[str, ...]:
    """A job's prompt or negative prompt as a tuple of strings (the request layer checks types)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(v for v in value if isinstance(v, str))


def _field_error(e: PipelineError, fields: Mapping[str, str], status: int) -> ServeError:
    field = fields.get(e.field or "")
    return ServeError(status, f"{field}: {e}" if field else str(e), field=field)


def wire_error(e: WireError) -> ServeError:
    return ServeError(e.status, f"{e.field}: {e.message}", field=e.field)


def now_stamp() -> str:
    return time.strftime("%Y%m%d%H%M%S")
