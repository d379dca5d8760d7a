"""A bounded background queue: work that must not add to a request's latency, and may be dropped.

:class:`BoundedWorker` runs submitted calls in order on one daemon thread. ``submit`` never blocks:
when ``maxsize`` calls are already waiting, the call is dropped and ``on_drop`` is called (a metric),
so a slow consumer (a shadow model, a stalled Redis) costs memory up to the bound and nothing else.
A call that raises is logged (rate-limited) and the worker goes on.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any

from service.logs import RateLimitedLogger
from service.threads import NamedThread

log = logging.getLogger("mtrank.service.background")
_STOP = object()


class BoundedWorker:
    def __init__(self, name: str, maxsize: int, on_drop: Callable[[], None]) -> None:
        self.name = name
        self.on_drop = on_drop
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._ratelog = RateLimitedLogger(log, 30.0)
        self._thread = NamedThread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> bool:
        """Queue ``fn(*args)``; False (and ``on_drop()``) when the queue is full."""
        try:
            self._queue.put_nowait((fn, args))
        except queue.Full:
            self.on_drop()
            return False
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    def join(self) -> None:
        """Wait until every queued call has run (tests, shutdown)."""
        self._queue.join()

    def stop(self, timeout: float = 2.0) -> None:
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return  # daemon thread: dies with the process
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args = item
                fn(*args)
            except Exception as err:  # noqa: BLE001 - background work never stops the worker
                self._ratelog.warning(f"{self.name}:{type(err).__name__}", "%s: %s: %s", self.name, type(err).__name__, err)
            finally:
                self._queue.task_done()
