"""Predictions kept for the feedback join, feedback events, and the join itself.

* :class:`PredictionLog`: a bounded LRU with TTL of what ``/rank`` answered, one entry per request
  (``request_id -> item ids, raw + calibrated task scores [T, n], model version``); looking up
  ``(request_id, item_id)`` builds the request's item index on first use, so ``/rank`` pays one
  dict insert, not one per candidate.
* :class:`FeedbackStore`: labelled events keyed by ``(request_id, item_id)``, bounded (oldest
  evicted). Dedup rule: per key, the first value of each label wins; an event adding no new label
  is a duplicate (counted). Each stored event is joined with its prediction when one is kept.
* The internal API for observability: :meth:`FeedbackStore.joined` (prediction/label arrays per task)
  and :meth:`FeedbackStore.calibration_buckets` (reliability-diagram rows).

In-memory and per process: with several workers, feedback joins only when it reaches the worker
that ranked the request (``mtrank_feedback_events_total{result="unjoined"}`` shows the rate).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Prediction:
    model_version: str
    item_ids: list[str]  # [n]
    task_names: list[str]  # [T]
    raw: np.ndarray  # float32 [T, n]
    calibrated: np.ndarray  # float32 [T, n]
    at: float  # monotonic seconds
    _index: dict[str, int] | None = None

    def position(self, item_id: str) -> int | None:
        if self._index is None:
            self._index = {i: k for k, i in enumerate(self.item_ids)}
        return self._index.get(item_id)


class PredictionLog:
    """Bounded by requests and by candidates over all requests (memory ~ 60 bytes per candidate + scores)."""

    def __init__(self, max_requests: int, ttl_s: float, max_items: int = 1_000_000) -> None:
        self.max_requests = max_requests
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, Prediction] = OrderedDict()
        self._items = 0
        self._lock = threading.Lock()

    def put(self, request_id: str, model_version: str, item_ids: list[str], task_names: list[str],
            raw: Mapping[str, np.ndarray], calibrated: Mapping[str, np.ndarray]) -> None:
        pred = Prediction(model_version, item_ids, task_names, np.stack([raw[t] for t in task_names]),
                          np.stack([calibrated[t] for t in task_names]), time.monotonic())
        with self._lock:
            old = self._data.pop(request_id, None)
            if old is not None:
                self._items -= len(old.item_ids)
            self._data[request_id] = pred
            self._items += len(item_ids)
            while len(self._data) > self.max_requests or (self._items > self.max_items and len(self._data) > 1):
                _, gone = self._data.popitem(last=False)
                self._items -= len(gone.item_ids)

    def get(self, request_id: str, item_id: str) -> tuple[Prediction, int] | None:
        with self._lock:
            pred = self._data.get(request_id)
            if pred is None:
                return None
            if time.monotonic() - pred.at > self.ttl_s:
                del self._data[request_id]
                self._items -= len(pred.item_ids)
                return None
            pos = pred.position(item_id)
        return None if pos is None else (pred, pos)

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class StoredEvent:
    labels: dict[str, float]
    model_version: str | None = None  # set when joined
    raw: dict[str, float] = field(default_factory=dict)  # task -> raw score of the joined prediction
    calibrated: dict[str, float] = field(default_factory=dict)
    at: float = 0.0


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    joined: int = 0


class FeedbackStore:
    def __init__(self, max_events: int, predictions: PredictionLog) -> None:
        self.max_events = max_events
        self.predictions = predictions
        self._events: OrderedDict[tuple[str, str], StoredEvent] = OrderedDict()
        self._lock = threading.Lock()
        self.duplicates_total = 0

    def ingest(self, events: list[tuple[str, str, dict[str, float]]]) -> IngestResult:
        """(request_id, item_id, labels) per event, validated by the caller."""
        res = IngestResult()
        with self._lock:
            for rid, iid, labels in events:
                key = (rid, iid)
                ev = self._events.get(key)
                if ev is None:
                    ev = StoredEvent(labels={}, at=time.time())
                    hit = self.predictions.get(rid, iid)
                    if hit is not None:
                        pred, pos = hit
                        ev.model_version = pred.model_version
                        ev.raw = dict(zip(pred.task_names, pred.raw[:, pos].tolist()))
                        ev.calibrated = dict(zip(pred.task_names, pred.calibrated[:, pos].tolist()))
                    self._events[key] = ev
                    while len(self._events) > self.max_events:
                        self._events.popitem(last=False)
                new = {t: v for t, v in labels.items() if t not in ev.labels}
                if not new:
                    res.duplicates += 1
                    continue
                ev.labels.update(new)
                res.accepted += 1
                res.joined += ev.model_version is not None
            self.duplicates_total += res.duplicates
        return res

    def __len__(self) -> int:
        return len(self._events)

    # ------------------------------------------------------------------ observability API
    def joined(self, task: str, version: str | None = None, calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(scores float64 [m], labels float64 [m]) of joined events labelled for ``task``."""
        with self._lock:
            pairs = [((e.calibrated if calibrated else e.raw)[task], e.labels[task]) for e in self._events.values()
                     if e.model_version is not None and task in e.labels and task in e.raw
                     and (version is None or e.model_version == version)]
        if not pairs:
            return np.zeros(0), np.zeros(0)
        arr = np.asarray(pairs, dtype=np.float64)
        return arr[:, 0], arr[:, 1]

    def calibration_buckets(self, task: str, bins: int = 10, version: str | None = None,
                            calibrated: bool = True) -> list[dict[str, Any]]:
        """Equal-width score buckets on [0, 1]: count, mean score, mean label (a reliability diagram)."""
        p, y = self.joined(task, version, calibrated)
        edges = np.linspace(0.0, 1.0, bins + 1)
        idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
        count = np.bincount(idx, minlength=bins)
        sum_p = np.bincount(idx, weights=p, minlength=bins)
        sum_y = np.bincount(idx, weights=y, minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_p, mean_y = sum_p / count, sum_y / count
        return [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(count[b]),
                 "mean_score": float(mean_p[b]) if count[b] else None,
                 "mean_label": float(mean_y[b]) if count[b] else None} for b in range(bins)]
