"""Batching: requests from the event loop wait in a bounded queue; one thread admits them into the engine's batch
and decodes, so concurrent requests share G's prompt writing and M's decoding steps.

When the engine is idle, the first request waits `batch_window_ms` for others, and they are admitted together. While
it decodes, waiting requests join between two steps, once the oldest has waited `join_wait_ms` (joining pauses the
other rows while G writes the newcomers' prompts, so it is worth doing for several at once), up to `max_batch` rows.
Rows leave the moment they finish. The model runs on this thread only; torch releases the GIL in its kernels, so
the event loop keeps answering HTTP meanwhile.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from .engine import Engine, Failed, Job
from .metrics import ServeMetrics
from .protocol import RequestError
from .settings import ServeSettings

log = logging.getLogger("metatuner.serve")


class Scheduler:
    def __init__(self, engine: Engine, settings: ServeSettings, metrics: ServeMetrics):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metatuner-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; 429 when the queue is full, 503 once the server is shutting down."""
        with self._cond:
            if self._stopping:
                raise RequestError("the server is shutting down", status=503, type="server_error",
                                   code="shutting_down")
            if len(self._waiting) >= self.settings.max_queue:
                raise RequestError(f"the queue is full ({self.settings.max_queue} requests waiting); retry later",
                                   status=429, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            job.enqueued = time.monotonic()
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued and running ones, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _due(self, now: float) -> list[Job]:
        """The jobs to admit now (called with the lock held)."""
        free = self.settings.max_batch - len(self.engine.rows)
        if not self._waiting or free <= 0 or not self.engine.can_join:
            return []
        wait = self.settings.join_wait_ms if self.engine.rows else self.settings.batch_window_ms
        waited = (now - self._waiting[0].enqueued) * 1000
        if not (self._stopping or waited >= wait or len(self._waiting) >= self.settings.max_batch):
            return []
        jobs = []
        while self._waiting and len(jobs) < free:
            job = self._waiting.popleft()
            if not job.cancelled:
                jobs.append(job)
        self.metrics.waiting.set(len(self._waiting))
        return jobs

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.engine.rows:
                    if self._waiting:
                        jobs = self._due(time.monotonic())
                        if jobs:
                            break
                        # idle: wait out the admission window of the oldest request, or for more requests
                        left = self.settings.batch_window_ms / 1000 - (time.monotonic() - self._waiting[0].enqueued)
                        self._cond.wait(max(left, 0.001))
                    elif self._stopping:
                        return
                    else:
                        self._cond.wait()
                else:
                    jobs = self._due(time.monotonic())
            try:
                if jobs:
                    self._admit(jobs)
                if self.engine.rows:
                    rows = self.engine.step()
                    self.metrics.decode_batch.observe(rows)
                self.metrics.running.set(len(self.engine.rows))
            except Exception:  # a bug or an out-of-memory error must not take the server down
                log.exception("decoding failed; the requests in the batch get a server error")
                error = RequestError("internal error while generating", status=500, type="server_error")
                for job in jobs:
                    job.emit(Failed(error))
                self.engine.fail_all(error)

    def _admit(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            self.metrics.queue_wait.observe(now - job.enqueued)
        self.metrics.admit_batch.observe(len(jobs))
        self.engine.admit(jobs)
