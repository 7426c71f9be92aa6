"""The server's bounded job queue: admission, batching of compatible requests, cancellation,
timeouts and progress. No HTTP here; runtime/serving/app.py puts jobs in and awaits their futures.

A `Job` wraps one validated `runtime.Request`. `Batcher.submit` admits it or raises `QueueFull`
(the queue holds at most `max_queue` waiting jobs; the HTTP layer answers 503 with Retry-After).
Worker threads (one by default: on a CPU the engines already use every core) take the oldest job
and every queued job for the same pipeline (engine folder: a server may serve several,
runtime/serving/models.py) with the same `Request.batch_key()` behind it, up to the engine's max
batch, and run them as one `Pipeline.generate` call on that pipeline; jobs of different folders
never share a batch; each image is what its request gives alone
(runtime/pipeline.py). A batch that fails is retried one job at a time, so one request that the
engines refuse never fails the requests it was batched with.

Cancelling: `Job.cancel(reason)` (the client went away, /interrupt, the timeout) makes the job's
`should_stop` answer True before the next network call; a batch whose jobs all asked to stop ends
with `GenerationCancelled`, and each job then fails with `JobCancelled` carrying the latents of
its last finished step (A1111 returns an interrupted job's current image). A cancelled job in a
batch whose other jobs go on still occupies its rows until the batch ends (the pipeline cannot drop
rows mid-run), and its result is discarded.

Threads: the queue, the running set and the service-time estimate are owned by `Batcher` and
guarded by its condition; a job's progress fields are written by the worker running it and read
(whole values, no compound invariants) by the progress endpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.errors import SDRuntimeError
from runtime.pipeline import GenerationCancelled, GenerationResult, Pipeline
from runtime.request import Request

__all__ = ["Batcher", "Job", "JobCancelled", "QueueFull"]

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already; `retry_after` is a whole number of seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the server is busy: {depth} requests are queued; retry in {retry_after} s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """A job stopped before its last step: reason is "interrupted", "disconnected" or "timeout".
    `latents` are its rows after the last finished step (None if no step finished)."""

    def __init__(self, reason: str, latents: np.ndarray | None = None):
        super().__init__(f"generation {reason}")
        self.reason = reason
        self.latents = latents


@dataclass(eq=False)
class Job:
    """One request in the queue. `future` resolves to a GenerationResult or fails with JobCancelled
    or the pipeline's error."""

    request: Request
    task_id: str
    deadline: float | None  # time.monotonic() after which the job is cancelled ("timeout")
    pipe: Pipeline | None = None  # the pipeline that prepared the request and runs it
    submitted: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancel_reason: str | None = None
    started: float | None = None
    step: int = 0  # sampler steps finished
    latents: np.ndarray | None = None  # this job's latents after the last finished step

    @property
    def images(self) -> int:
        return self.request.batch

    @property
    def total_steps(self) -> int:
        """Sampler steps the job runs (img2img and inpaint skip the first steps by strength)."""
        r = self.request
        return r.steps if r.mode == "txt2img" else max(1, min(r.steps, int(r.steps * r.strength)))

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def should_stop(self) -> bool:
        if self.cancel_reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel_reason = "timeout"
        return self.cancel_reason is not None

    def on_step(self, step: int, t: float, latents: np.ndarray) -> None:
        self.step = step + 1
        self.latents = latents

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Batcher:
    """Admits jobs into a bounded queue and runs them on `workers` threads in compatible batches.
    `pipe`: the pipeline of jobs submitted without one. `on_batch(jobs, results_or_error, seconds)`
    is called after each engine batch (metrics)."""

    def __init__(self, pipe: Pipeline | None = None, *, max_queue: int = 32, workers: int = 1, batch_wait: float = 0.0,
                 on_batch: Callable[[list[Job], Any, float], None] | None = None):
        if max_queue < 1 or workers < 1:
            raise ValueError(f"max_queue and workers must be >= 1; got {max_queue}, {workers}")
        self.pipe = pipe
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self._on_batch = on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._seconds_per_image = 1.0  # running estimate, for Retry-After and eta
        self._threads = [threading.Thread(target=self._work, name=f"sdrt-batcher-{k}", daemon=True)
                         for k in range(workers)]
        for t in self._threads:
            t.start()

    # -- admission -----------------------------------------------------------------------------------

    def submit(self, request: Request, *, timeout: float | None = None, task_id: str | None = None,
               pipe: Pipeline | None = None) -> Job:
        """Queue a validated request to run on `pipe` (the one that prepared it; default: the
        batcher's); raises QueueFull past `max_queue` waiting jobs, RuntimeError once closed."""
        pipe = pipe if pipe is not None else self.pipe
        if pipe is None:
            raise ValueError("submit needs the pipeline that prepared the request")
        job = Job(request, task_id or f"task({uuid.uuid4().hex[:12]})",
                  None if timeout is None else time.monotonic() + timeout, pipe=pipe)
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self.retry_after())
            self._queue.append(job)
            self._cond.notify()
        return job

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the running batches' images at the measured
        rate per image (at least 1, at most 120)."""
        running = max(1, sum(j.images for j in self._running))
        return int(min(120, max(1, math.ceil(running * self._seconds_per_image / len(self._threads)))))

    # -- state ---------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[Job]:
        with self._cond:
            return list(self._running)

    def find(self, task_id: str) -> tuple[str, Job] | None:
        """("queued" | "running", job) for a task id still in the queue or running."""
        with self._cond:
            for j in self._running:
                if j.task_id == task_id:
                    return "running", j
            for j in self._queue:
                if j.task_id == task_id:
                    return "queued", j
        return None

    def interrupt(self) -> int:
        """Cancel the running jobs (A1111's /interrupt stops the current job); returns how many."""
        with self._cond:
            for j in self._running:
                j.cancel("interrupted")
            return len(self._running)

    def estimate_seconds(self, job: Job) -> float:
        return self._seconds_per_image * job.images

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting; workers finish what is queued, then exit. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    # -- workers -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._cond:
                    for j in batch:
                        if j in self._running:
                            self._running.remove(j)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._queue:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            if self.batch_wait > 0 and len(self._queue) == 1 and not self._closed:
                self._cond.wait(self.batch_wait)  # let a compatible request arrive
                self._drop_cancelled()
                if not self._queue:
                    return []
            batch = self._take_compatible()
            self._running.extend(batch)
            for j in batch:
                j.started = time.monotonic()
            return batch

    def _drop_cancelled(self) -> None:
        for j in [j for j in self._queue if j.should_stop()]:
            self._queue.remove(j)
            j.fail(JobCancelled(j.cancel_reason or "cancelled"))

    def _take_compatible(self) -> list[Job]:
        head = self._queue.popleft()
        batch, images = [head], head.images
        key = head.request.batch_key()
        for j in list(self._queue):
            same_folder = j.pipe is head.pipe
            if same_folder and j.request.batch_key() == key and images + j.images <= head.pipe.limits.max_batch:
                self._queue.remove(j)
                batch.append(j)
                images += j.images
        return batch

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        t0 = time.monotonic()
        try:
            results = batch[0].pipe.generate([j.request for j in batch], callbacks=[j.on_step for j in batch],
                                         should_stop=[j.should_stop for j in batch], progress=False)
        except GenerationCancelled as e:
            self._report(batch, e, t0)
            for j in batch:
                j.fail(JobCancelled(j.cancel_reason or "cancelled", j.latents))
            return
        except SDRuntimeError as e:
            self._report(batch, e, t0)
            if len(batch) > 1:  # one job's failure must not fail the others: run each alone
                log.warning("a batch of %d requests failed (%s); retrying them one by one", len(batch), e)
                for j in batch:
                    self._run([j])
                return
            batch[0].fail(e)
            return
        except Exception as e:  # an unexpected bug: fail these jobs, keep the worker alive
            log.exception("batch of %d requests failed", len(batch))
            self._report(batch, e, t0)
            for j in batch:
                j.fail(e)
            return
        self._finish(batch, results, t0)

    def _finish(self, batch: list[Job], results: list[GenerationResult], t0: float) -> None:
        seconds = time.monotonic() - t0
        with self._cond:
            per_image = seconds / max(1, sum(j.images for j in batch))
            self._seconds_per_image = 0.7 * self._seconds_per_image + 0.3 * per_image
        self._report(batch, results, t0)
        for j, r in zip(batch, results):
            if j.cancel_reason is not None:  # its batch-mates kept the batch going
                j.fail(JobCancelled(j.cancel_reason, j.latents))
            elif not j.future.done():
                j.future.set_result(r)

    def _report(self, batch: list[Job], outcome: Any, t0: float) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(batch, outcome, time.monotonic() - t0)
            except Exception:  # metrics must never fail a request
                log.exception("on_batch hook failed")
