"""The scheduler on its own thread, fed from asyncio: submit a request, iterate its tokens, abort it.

The engine thread owns the Scheduler: it applies queued submits and aborts between steps, steps while there is
work and sleeps on a condition otherwise. Each step's tokens are handed to the request's asyncio.Queue on the
server's event loop. A bound on unfinished requests (running + waiting) turns overload into `Overloaded`.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from dsv2_jax.serve.metrics import ServeMetrics
from dsv2_jax.serve.request import Request, SamplingParams
from dsv2_jax.serve.scheduler import Scheduler


class Overloaded(Exception):
    """The bounded request queue is full."""


@dataclass
class Handle:
    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # int tokens, then None when finished

    async def tokens(self):
        while (tok := await self.queue.get()) is not None:
            yield tok


class AsyncEngine:
    def __init__(self, scheduler: Scheduler, max_waiting: int = 64, metrics: ServeMetrics | None = None):
        self.scheduler = scheduler
        self.max_unfinished = scheduler.max_running + max_waiting
        self.metrics = metrics or ServeMetrics()
        self._handles: dict[str, Handle] = {}
        self._inbox: deque = deque()   # ("add" | "abort", Handle)
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="dsv2-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop -------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        """Validates (ValueError) and queues a request (Overloaded when the bound is reached)."""
        if self.error is not None:
            raise RuntimeError(f"engine stopped: {self.error}")
        self.scheduler.validate(prompt, params.max_tokens)
        with self._cv:
            if len(self._handles) >= self.max_unfinished:
                raise Overloaded(f"{len(self._handles)} requests in flight (limit {self.max_unfinished})")
            handle = Handle(Request(f"req-{next(self._ids)}", list(prompt), params), asyncio.get_running_loop())
            self._handles[handle.request.id] = handle
            self._inbox.append(("add", handle))
            self._cv.notify()
        return handle

    def abort(self, handle: Handle) -> None:
        """Frees the request's pages at the next step boundary (no-op once finished)."""
        with self._cv:
            if handle.request.id in self._handles:
                self._inbox.append(("abort", handle))
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @property
    def num_unfinished(self) -> int:
        return len(self._handles)

    # ---- the engine thread ----------------------------------------------------------------------------
    def _finish(self, handle: Handle) -> None:
        self._handles.pop(handle.request.id, None)
        self.metrics.request_finished(handle.request.finish_reason or "abort", handle.request.id)
        handle.loop.call_soon_threadsafe(handle.queue.put_nowait, None)

    def _loop(self) -> None:
        sched = self.scheduler
        try:
            while True:
                with self._cv:
                    while not (self._stop or self._inbox or sched.has_work):
                        self._cv.wait()
                    if self._stop:
                        break
                    inbox, self._inbox = self._inbox, deque()
                for kind, handle in inbox:
                    if kind == "add":
                        sched.add(handle.request)
                    else:
                        sched.abort(handle.request)
                        with self._cv:
                            self._finish(handle)
                t0 = time.monotonic()
                outputs = sched.step()
                now = time.monotonic()
                self.metrics.observe_step(sched, outputs, now, now - t0)
                with self._cv:
                    for out in outputs:
                        handle = self._handles.get(out.request.id)
                        if handle is None:
                            continue
                        handle.loop.call_soon_threadsafe(handle.queue.put_nowait, out.token)
                        if out.finished:
                            self._finish(handle)
        except BaseException as e:  # a device failure: fail every request rather than hang them
            self.error = e
            with self._cv:
                for handle in list(self._handles.values()):
                    handle.request.finish_reason = "error"
                    self._finish(handle)
            raise
