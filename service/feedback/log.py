"""The feedback log of the service (``feedback.log``): each ``/feedback`` batch's joined labels, appended.

The ``/feedback`` handler calls :meth:`FeedbackLog.append` with :attr:`IngestResult.labels` in the same worker
thread as :meth:`JoinStore.ingest` (never on the event loop). The records and sinks are
:mod:`mtrank.feedback_log`'s (``kind: jsonl`` -> :class:`JsonlWriter`, ``kind: redis`` -> :class:`RedisStreamWriter`
on the stream ``<feedback.key_prefix>:feedback`` at the join store's Redis URL); ``mtrank calibrate`` reads them.

**A log failure never fails the request:** the labels are already recorded in the join store, so a 5xx
would make the client's retry count them as duplicates. ``append`` never raises: a failed append counts
``mtrank_feedback_log_errors_total{sink}`` and logs (at most once per ``feature_store.log_interval_s``);
after a failure the sink is skipped for ``feedback.retry_after_ms`` (circuit breaker: a Redis that times
out does not add its timeout to every call), each skipped append counted as an error. Written records count
``mtrank_feedback_log_records_total{sink}``. Both series exist at 0 from the start when a log is configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mtrank.config import ConfigError
from mtrank.feedback_log import FeedbackWriter, JsonlWriter, RedisStreamWriter, encode_records
from service.feedback import JoinedLabel, feedback_redis_url
from service.logs import RateLimitedLogger
from service.settings import FeedbackLogJsonl, FeedbackLogRedis

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.settings import Settings

log = logging.getLogger("mtrank.service.feedback")


class FeedbackLog:
    """Appends joined labels to ``writer`` (None: no log, ``append`` does nothing). Thread-safe."""

    def __init__(self, writer: FeedbackWriter | None, metrics: Metrics, retry_after_s: float = 0.5,
                 log_interval_s: float = 10.0) -> None:
        self.writer = writer
        self.sink = writer.sink if writer is not None else "none"
        self.retry_after_s = retry_after_s
        self.ratelog = RateLimitedLogger(log, log_interval_s)
        self._down_until = 0.0  # monotonic: skip the sink until then
        if writer is not None:
            self._records = metrics.feedback_log_records.labels(self.sink)
            self._errors = metrics.feedback_log_errors.labels(self.sink)

    def append(self, labels: Sequence[JoinedLabel]) -> None:
        """Append ``labels`` as one batch stamped with the current time. Never raises (module docstring)."""
        if self.writer is None or not labels:
            return
        if time.monotonic() < self._down_until:
            self._errors.inc()
            return
        try:
            self.writer.write(encode_records(labels, time.time()), len(labels))
        except Exception as err:  # noqa: BLE001 - the labels are recorded; the request must not fail
            self._down_until = time.monotonic() + self.retry_after_s
            self._errors.inc()
            self.ratelog.warning("feedback-log", "feedback log (%s) append of %d labels failed: %s: %s; skipping it "
                                 "for %.0f ms", self.sink, len(labels), type(err).__name__, err,
                                 self.retry_after_s * 1000)
            return
        self._records.inc(len(labels))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def build_feedback_log(settings: Settings, metrics: Metrics) -> FeedbackLog:
    """The configured log (``feedback.log``); ConfigError naming the key when ``kind: redis`` has no Redis URL.
    Opens nothing yet (the first append creates the file or connects)."""
    fb = settings.feedback
    cfg = fb.log
    writer: FeedbackWriter | None = None
    if isinstance(cfg, FeedbackLogJsonl):
        writer = JsonlWriter(cfg.dir, max_bytes=cfg.max_bytes, max_age_s=cfg.max_age_s, fsync=cfg.fsync)
    elif isinstance(cfg, FeedbackLogRedis):
        url = feedback_redis_url(settings)
        if url is None:
            raise ConfigError("feedback.log.kind: redis needs a Redis URL (feedback.redis_url, or "
                              "feature_store.backend: redis, whose URL is the default)")
        writer = RedisStreamWriter(url, key=f"{fb.key_prefix}:feedback", maxlen=cfg.maxlen,
                                   socket_timeout_s=fb.socket_timeout_ms / 1000.0)
    return FeedbackLog(writer, metrics, retry_after_s=fb.retry_after_ms / 1000.0,
                       log_interval_s=settings.feature_store.log_interval_s)
