"""The prediction log and the feedback join: what ``/rank`` answered, joined with the labels ``/feedback`` brings.

``/rank`` calls :meth:`JoinStore.put` with the request's scores (one entry per request); ``/feedback``
calls :meth:`JoinStore.ingest` with validated events.

**Request ids are single-use:** while a prediction is kept under a request id, ``put`` with that id
keeps the first answer, writes nothing and returns ``"reused"`` (``/rank`` answers 409); the check and
the write are one atomic step in every backend (dict check under the lock, ``INSERT OR IGNORE``,
``SET NX``). Once the prediction has expired or been evicted the id is free again.

**Dedup rule:** per ``(request_id, item_id)`` the first value of each task label wins; an event that
adds no new label is a duplicate. Labels for a key with no kept prediction (unknown request or item,
expired prediction) are still recorded, so their duplicates are counted too, and are accepted but not
joined. Each new label of a key that matches a kept prediction comes back as a :class:`JoinedLabel`
with the scores served for it.

**Orphans:** a label key whose request has no kept prediction when its first label arrives (an unknown
or expired request id) is an *orphan*. Orphans have a bound of their own, so feedback for unknown
requests cannot crowd out the labels that join: they expire after ``feedback.orphan_ttl_s`` (all
backends; Redis: the request's label hash gets that TTL) and memory/sqlite keep at most
``feedback.orphan_max_events`` orphan keys (oldest evicted). A key keeps its class for its lifetime.
Accepted events whose request has no kept prediction are counted in :attr:`IngestResult.orphans`
(``mtrank_feedback_events_total{result="orphan"}``).

Backends (``feedback.backend``; one module each):

* ``memory`` (:mod:`.memory`): per process, bounded LRU + TTL. With several workers a label joins only
  on the worker that ranked the request, and dedup is per worker.
* ``sqlite`` (:mod:`.sqlite`): one SQLite file (WAL) shared by the worker processes of one host.
* ``redis`` (:mod:`.redis`): shared by every worker and replica; keys expire (``SET EX``, ``EXPIRE``).

``auto`` (default) picks redis when a Redis URL resolves (:func:`feedback_redis_url`), else sqlite when
``feedback.sqlite_path`` is set, else memory. ``service.main.serve`` sets a shared SQLite file for
``workers > 1`` when neither is configured.

The feedback log (:mod:`.log`, ``feedback.log``) appends each batch's joined labels (:class:`JoinedLabel`) to
a durable log for ``mtrank calibrate``; it is not a join store backend.

Every backend is thread-safe: ``put`` and ``ingest`` run in worker threads, concurrently. ``put`` never
raises for backend faults (it counts ``mtrank_join_store_errors_total{op="put"}`` and logs, rate-limited):
a /rank answer must not fail because its prediction could not be kept. ``ingest`` raises
:class:`JoinStoreUnavailable` (counted as ``op="ingest"``) when the backend cannot be reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from mtrank.config import ConfigError

if TYPE_CHECKING:
    from service.feedback.codec import Prediction
    from service.metrics import Metrics
    from service.settings import Settings

__all__ = ["IngestResult", "JoinStore", "JoinStoreUnavailable", "JoinedLabel", "PutResult", "build_join_store",
           "feedback_redis_url", "resolve_backend"]

Event = tuple[str, str, dict[str, float]]  # (request_id, item_id, {task: label}), validated by the caller
# What ``put`` did: "kept" (the prediction is in the log), "reused" (the id already had a kept prediction:
# nothing written), "failed" (a backend fault, counted and logged: the request is served as usual).
PutResult = Literal["kept", "reused", "failed"]


@dataclass(frozen=True)
class JoinedLabel:
    """One NEW ``(request, item, task)`` label that matched a kept prediction (a record of the feedback log,
    :mod:`mtrank.feedback_log`, once the log adds the time)."""

    request_id: str
    item_id: str
    task: str
    label: float
    raw: float  # the served raw score of that task for that item
    calibrated: float  # the served calibrated score
    model_version: str
    arm: str | None  # experiment arm the request was served under (None: the request named its fusion)


@dataclass
class IngestResult:
    accepted: int = 0  # events that added at least one new label
    duplicates: int = 0  # events whose labels were all recorded already (first value wins)
    joined: int = 0  # accepted events matched to a kept prediction
    orphans: int = 0  # accepted events whose request has no kept prediction (module docstring, "Orphans")
    labels: list[JoinedLabel] = field(default_factory=list)  # one per new label of a joined event

    def record(self, request_id: str, item_id: str, new: Mapping[str, float] | None, prediction: Prediction | None,
               orphan: bool = False) -> None:
        """Count one event of ``request_id``: a duplicate when it brought no new label; else accepted (and an
        orphan when its request has no kept prediction), and joined (its new labels with the served scores) when
        ``prediction`` (the request's) ranked ``item_id``."""
        if not new:
            self.duplicates += 1
            return
        self.accepted += 1
        self.orphans += orphan
        joined = prediction.join(request_id, item_id, new) if prediction is not None else None
        if joined is not None:
            self.joined += 1
            self.labels.extend(joined)


def count_orphans(metrics: Metrics | None, res: IngestResult) -> IngestResult:
    """Every backend's ``ingest`` ends here: the accepted orphan events into
    ``mtrank_feedback_events_total{result="orphan"}`` (the other results are counted by ``/feedback``)."""
    if metrics is not None and res.orphans:
        metrics.feedback.labels("orphan").inc(res.orphans)
    return res


class JoinStoreUnavailable(Exception):
    """The backend cannot be reached (``/feedback`` answers 503)."""


class JoinStore(Protocol):
    backend: str  # "memory" | "sqlite" | "redis"

    def put(self, request_id: str, model_version: str, arm: str | None, item_ids: list[str], task_names: list[str],
            raw: Mapping[str, np.ndarray], calibrated: Mapping[str, np.ndarray]) -> PutResult:
        """Keep one /rank answer: ``item_ids`` [n]; ``raw[t]`` / ``calibrated[t]`` float [n] for every t in
        ``task_names`` [T]. ``"reused"`` (nothing written) when a prediction is already kept under ``request_id``
        (single-use rule above). Never raises for backend faults (``"failed"``)."""
        ...

    def ingest(self, events: list[Event]) -> IngestResult:
        """Record ``(request_id, item_id, {task: label})`` events (in order; dedup rule above) and join the new
        labels. Raises :class:`JoinStoreUnavailable` on backend faults."""
        ...

    def close(self) -> None: ...


def feedback_redis_url(settings: Settings) -> str | None:
    """``feedback.redis_url``, else the feature store's Redis URL when ``feature_store.backend`` is redis."""
    if settings.feedback.redis_url:
        return settings.feedback.redis_url
    return settings.feature_store.redis.url if settings.feature_store.backend == "redis" else None


def resolve_backend(settings: Settings) -> str:
    """The backend ``feedback.backend`` stands for (``auto`` resolved). ConfigError naming the key when the
    chosen backend lacks what it needs."""
    fb = settings.feedback
    url = feedback_redis_url(settings)
    backend = fb.backend
    if backend == "auto":
        backend = "redis" if url else "sqlite" if fb.sqlite_path else "memory"
    if backend == "redis" and not url:
        raise ConfigError("feedback.redis_url: required when feedback.backend is redis "
                          "(or use feature_store.backend: redis, whose URL is the default)")
    if backend == "sqlite" and not fb.sqlite_path:  # FeedbackSettings checks this too
        raise ConfigError("feedback.sqlite_path: required when feedback.backend is sqlite")
    return backend


def build_join_store(settings: Settings, metrics: Metrics) -> JoinStore:
    """The configured backend; its error series (``op`` = put, ingest) are created at 0. Connects lazily."""
    fb = settings.feedback
    backend = resolve_backend(settings)
    store: JoinStore
    if backend == "redis":
        from service.feedback.redis import RedisJoinStore

        url = feedback_redis_url(settings)
        assert url is not None
        store = RedisJoinStore(url, metrics, prefix=fb.key_prefix, ttl_s=fb.prediction_ttl_s,
                               orphan_ttl_s=fb.orphan_ttl_s,
                               socket_timeout_s=fb.socket_timeout_ms / 1000.0, retry_after_s=fb.retry_after_ms / 1000.0,
                               log_interval_s=settings.feature_store.log_interval_s)
    elif backend == "sqlite":
        from service.feedback.sqlite import SqliteJoinStore

        assert fb.sqlite_path is not None
        store = SqliteJoinStore(fb.sqlite_path, metrics, ttl_s=fb.prediction_ttl_s,
                                max_requests=fb.prediction_requests, max_items=fb.prediction_items,
                                max_events=fb.max_events, orphan_ttl_s=fb.orphan_ttl_s,
                                max_orphans=fb.orphan_max_events, busy_timeout_ms=fb.sqlite_busy_timeout_ms,
                                log_interval_s=settings.feature_store.log_interval_s)
    else:
        from service.feedback.memory import MemoryJoinStore

        store = MemoryJoinStore(ttl_s=fb.prediction_ttl_s, max_requests=fb.prediction_requests,
                                max_items=fb.prediction_items, max_events=fb.max_events,
                                orphan_ttl_s=fb.orphan_ttl_s, max_orphans=fb.orphan_max_events, metrics=metrics)
    for op in ("put", "ingest"):
        metrics.join_errors.labels(store.backend, op)
    return store
