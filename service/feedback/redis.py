"""The fleet-wide join store (``feedback.backend: redis``): shared by every worker and replica.

Key layout (``prefix`` = ``feedback.key_prefix``, default ``mtrank``; ids UTF-8)::

    <prefix>:pred:<request_id>   string: the encoded prediction (service.feedback.codec), SET ... PX ttl NX
    <prefix>:fb:<request_id>     hash: field "<item_id>\\0<task>" -> label; HSETNX (first value wins),
                                 PEXPIRE ttl NX (the TTL runs from the request's first label; Redis >= 7.0);
                                 orphan_ttl instead when the request had no kept prediction at its first label

``put`` is one ``SET ... NX`` (a request id is single-use: an existing prediction is kept and ``put``
returns ``"reused"``). ``ingest`` is two round trips: one ``MGET`` of the predictions of the batch's
requests, then one pipeline with an ``HSETNX`` per label and a ``PEXPIRE ... NX`` per request (dedup across
workers and replicas is Redis's atomic ``HSETNX``). Memory is bounded by the TTLs (every key expires; a hash
expires ``ttl`` (orphans: ``orphan_ttl``) after its first label however often it is written); size Redis's
``maxmemory`` for ``ttl`` x traffic, with a ``volatile-*`` eviction policy as the backstop.

Faults: socket and connect timeouts of ``socket_timeout_s``, no retries. A failure opens a circuit breaker
for ``retry_after_s``: meanwhile ``put`` is skipped and ``ingest`` fails at once. ``put`` never raises;
``ingest`` raises :class:`JoinStoreUnavailable`. Both count ``mtrank_join_store_errors_total`` and log
(rate-limited).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.feedback import Event, IngestResult, JoinStoreUnavailable, PutResult, count_orphans
from service.feedback.codec import Prediction, utf8
from service.logs import RateLimitedLogger

if TYPE_CHECKING:
    from service.metrics import Metrics

log = logging.getLogger("mtrank.service.feedback")


class RedisJoinStore:
    backend = "redis"

    def __init__(self, url: str, metrics: Metrics, prefix: str = "mtrank", ttl_s: float = 3600.0,
                 socket_timeout_s: float = 0.05, retry_after_s: float = 0.5, log_interval_s: float = 10.0,
                 max_connections: int = 64, orphan_ttl_s: float | None = None) -> None:
        self.url = url
        self.metrics = metrics
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.orphan_ttl_ms = self.ttl_ms if orphan_ttl_s is None else max(1, round(orphan_ttl_s * 1000))
        self.retry_after_s = retry_after_s
        self.ratelog = RateLimitedLogger(log, log_interval_s)
        self._pred = utf8(prefix) + b":pred:"
        self._fb = utf8(prefix) + b":fb:"
        self._down_until = 0.0  # circuit breaker: skip Redis until then (monotonic)
        self.client: Any = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False, health_check_interval=0, max_connections=max_connections)

    def close(self) -> None:
        self.client.close()

    def _open(self, op: str) -> bool:
        """True when the breaker lets a call through; otherwise counts the skipped op as an error."""
        if time.monotonic() >= self._down_until:
            return True
        self.metrics.join_errors.labels(self.backend, op).inc()
        return False

    def _fail(self, op: str, err: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_after_s
        self.metrics.join_errors.labels(self.backend, op).inc()
        self.ratelog.warning(f"redis-{op}", "join store (redis %s) %s failed: %s: %s; skipping Redis for %.0f ms",
                             self.url, op, type(err).__name__, err, self.retry_after_s * 1000)

    def put(self, request_id: str, model_version: str, arm: str | None, item_ids: list[str], task_names: list[str],
            raw: Mapping[str, np.ndarray], calibrated: Mapping[str, np.ndarray]) -> PutResult:
        if not self._open("put"):
            return "failed"
        try:
            data = Prediction.build(model_version, arm, item_ids, task_names, raw, calibrated).encode()
            kept = self.client.set(self._pred + utf8(request_id), data, px=self.ttl_ms, nx=True)
        except Exception as err:  # noqa: BLE001 - a prediction that cannot be kept never fails /rank
            self._fail("put", err)
            return "failed"
        return "kept" if kept else "reused"

    def ingest(self, events: list[Event]) -> IngestResult:
        if not events:
            return IngestResult()
        if not self._open("ingest"):
            raise JoinStoreUnavailable(f"join store (redis {self.url}): unavailable, retrying after a failure")
        try:
            return count_orphans(self.metrics, self._ingest(events))
        except (redis.RedisError, OSError) as err:
            self._fail("ingest", err)
            raise JoinStoreUnavailable(f"join store (redis {self.url}): {type(err).__name__}: {err}") from err

    def _ingest(self, events: list[Event]) -> IngestResult:
        rids = list(dict.fromkeys(rid for rid, _, _ in events))
        # One round trip: the batch's predictions first, so a request's label hash gets the orphan TTL when its
        # first label arrives without a kept prediction. (A hash that exists keeps its TTL: PEXPIRE ... NX.)
        preds = {rid: _decode(data) for rid, data in zip(rids, self.client.mget([self._pred + utf8(r) for r in rids]))}
        pipe = self.client.pipeline(transaction=False)
        fb_keys = {rid: self._fb + utf8(rid) for rid in rids}
        for rid, iid, labels in events:
            key, item = fb_keys[rid], utf8(iid) + b"\0"
            for task, label in labels.items():
                pipe.hsetnx(key, item + utf8(task), repr(float(label)))
        for rid, key in fb_keys.items():
            pipe.pexpire(key, self.ttl_ms if preds[rid] is not None else self.orphan_ttl_ms, nx=True)
        added = iter(pipe.execute())  # one round trip; HSETNX replies (1 = new) in event order, then the PEXPIREs
        res = IngestResult()
        for rid, iid, labels in events:
            new = {task: label for task, label in labels.items() if next(added)}
            pred = preds[rid]
            res.record(rid, iid, new or None, pred, orphan=pred is None)
        return res


def _decode(data: bytes | None) -> Prediction | None:
    if data is None:
        return None
    try:
        return Prediction.decode(data)
    except ValueError:  # a record of another format version: not joinable
        return None
