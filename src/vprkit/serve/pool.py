"""A bounded pool of worker threads: at most `workers` jobs run and `queue_size` wait; one
more is refused at once (`QueueFull`, answered 503 with a Retry-After), never left to hang.

A slot is taken (`admit`) before the request body is read, so the memory held by uploads is
bounded too: (workers + queue_size) x the upload limit. The slot is given back when the job
ends, even if the client has gone away meanwhile (a cancelled job still waiting is skipped).
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"busy: every worker and queue slot is taken; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Ticket:
    """An admitted request's slot; `release` is idempotent, and `submit` hands the release to
    the worker."""

    def __init__(self, pool: WorkerPool):
        self._pool = pool
        self._held = True
        self._submitted = False

    def release(self) -> None:
        if self._held:
            self._held = False
            self._pool._slots.release()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        if not self._submitted:
            self.release()


class WorkerPool:
    def __init__(self, workers: int = 1, queue_size: int = 8, name: str = "vprkit-worker"):
        if workers < 1 or queue_size < 0:
            raise ValueError(f"workers >= 1 and queue_size >= 0, got {workers}, {queue_size}")
        self.workers = workers
        self.queue_size = queue_size
        self._slots = threading.BoundedSemaphore(workers + queue_size)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._mean_s = 1.0  # a running mean of job durations, for Retry-After
        self._stats_lock = threading.Lock()
        self.completed = 0
        self.refused = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def admit(self) -> Ticket:
        """A slot now, or `QueueFull`."""
        if not self._slots.acquire(blocking=False):
            with self._stats_lock:
                self.refused += 1
            raise QueueFull(self.retry_after_s())
        return Ticket(self)

    def retry_after_s(self) -> int:
        # The time for the whole backlog to drain, at the mean job duration seen so far.
        backlog = (self.workers + self.queue_size) / self.workers
        return max(1, min(60, math.ceil(self._mean_s * backlog)))

    async def submit(self, ticket: Ticket, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on a worker and await its result (or exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        ticket._submitted = True
        self._jobs.put((ticket, fn, args, loop, future))
        return await future

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            ticket, fn, args, loop, future = job
            try:
                if future.cancelled():  # the client went away while it waited
                    continue
                start = time.perf_counter()
                try:
                    result, error = fn(*args), None
                except BaseException as e:  # handed to the request, which decides
                    result, error = None, e
                with self._stats_lock:
                    self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - start)
                    self.completed += 1
                try:
                    loop.call_soon_threadsafe(_settle, future, result, error)
                except RuntimeError:  # the event loop has closed: nobody waits any more
                    pass
            finally:
                ticket.release()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
