"""Logging helpers: a rate-limited warning for errors that can repeat on every request."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("mtrank.service")


class RateLimitedLogger:
    """Logs a key's message at most once per ``interval_s``; says how many were suppressed meanwhile."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += f" ({suppressed} similar messages suppressed)"
        self.logger.warning(msg, *args)
        return True
