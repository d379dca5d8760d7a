"""The per-process join store (``feedback.backend: memory``): bounded LRU + TTL dicts under one lock.

* predictions: ``request_id -> Prediction`` (float32 [T, n] raw + calibrated), at most
  ``prediction_requests`` requests and ``prediction_items`` candidates over all of them (oldest evicted),
  each kept ``ttl_s``;
* labels: ``(request_id, item_id) -> {task: label}``, at most ``max_events`` keys (oldest evicted), each
  kept ``ttl_s`` from its first label.

Per process: with several workers a label joins only on the worker that ranked the request and dedup is per
worker; use the sqlite or redis backend there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from service.feedback import Event, IngestResult
from service.feedback.codec import Prediction


class MemoryJoinStore:
    backend = "memory"

    def __init__(self, ttl_s: float, max_requests: int, max_items: int, max_events: int) -> None:
        self.ttl_s = ttl_s
        self.max_requests, self.max_items, self.max_events = max_requests, max_items, max_events
        self._preds: OrderedDict[str, tuple[float, Prediction]] = OrderedDict()  # oldest first
        self._items = 0  # candidates over all kept predictions
        self._labels: OrderedDict[tuple[str, str], tuple[float, dict[str, float]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, model_version: str, arm: str | None, item_ids: list[str], task_names: list[str],
            raw: Mapping[str, np.ndarray], calibrated: Mapping[str, np.ndarray]) -> None:
        pred = Prediction.build(model_version, arm, item_ids, task_names, raw, calibrated)
        now = time.monotonic()
        with self._lock:
            old = self._preds.pop(request_id, None)
            if old is not None:
                self._items -= len(old[1].item_ids)
            self._preds[request_id] = (now, pred)
            self._items += len(item_ids)
            data = self._preds
            while data and (len(data) > self.max_requests or (self._items > self.max_items and len(data) > 1)
                            or next(iter(data.values()))[0] < now - self.ttl_s):
                _, (_, gone) = data.popitem(last=False)
                self._items -= len(gone.item_ids)

    def _prediction(self, request_id: str, now: float) -> Prediction | None:
        hit = self._preds.get(request_id)
        if hit is None or hit[0] < now - self.ttl_s:
            return None
        return hit[1]

    def ingest(self, events: list[Event]) -> IngestResult:
        res = IngestResult()
        now = time.monotonic()
        with self._lock:
            labels = self._labels
            while labels and next(iter(labels.values()))[0] < now - self.ttl_s:
                labels.popitem(last=False)
            for rid, iid, event_labels in events:
                key = (rid, iid)
                hit = labels.get(key)
                if hit is None:
                    hit = labels[key] = (now, {})
                    if len(labels) > self.max_events:
                        labels.popitem(last=False)
                known = hit[1]
                new = {t: v for t, v in event_labels.items() if t not in known}
                known.update(new)
                res.record(iid, new, self._prediction(rid, now) if new else None)
        return res

    def close(self) -> None:
        with self._lock:
            self._preds.clear()
            self._labels.clear()
            self._items = 0

    def __len__(self) -> int:
        """Labelled (request, item) keys kept."""
        return len(self._labels)
