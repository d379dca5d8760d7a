"""The per-process join store (``feedback.backend: memory``): bounded LRU + TTL dicts under one lock.

* predictions: ``request_id -> Prediction`` (float32 [T, n] raw + calibrated), at most
  ``prediction_requests`` requests and ``prediction_items`` candidates over all of them (oldest evicted),
  each kept ``ttl_s``;
* labels: ``(request_id, item_id) -> {task: label}``, at most ``max_events`` keys (oldest evicted), each
  kept ``ttl_s`` from its first label;
* orphan labels (keys whose request had no kept prediction at their first label): the same, in a dict of
  their own, at most ``max_orphans`` keys, each kept ``orphan_ttl_s``.

A request id is single-use while its prediction is kept: ``put`` checks and writes under one lock.

Per process: with several workers a label joins only on the worker that ranked the request and dedup is per
worker; use the sqlite or redis backend there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from service.feedback import Event, IngestResult, PutResult, count_orphans
from service.feedback.codec import Prediction

if TYPE_CHECKING:
    from service.metrics import Metrics


class MemoryJoinStore:
    backend = "memory"

    def __init__(self, ttl_s: float, max_requests: int, max_items: int, max_events: int,
                 orphan_ttl_s: float | None = None, max_orphans: int | None = None,
                 metrics: Metrics | None = None) -> None:
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.max_requests, self.max_items, self.max_events = max_requests, max_items, max_events
        self.orphan_ttl_s = ttl_s if orphan_ttl_s is None else orphan_ttl_s
        self.max_orphans = max_events if max_orphans is None else max_orphans
        self._preds: OrderedDict[str, tuple[float, Prediction]] = OrderedDict()  # oldest first
        self._items = 0  # candidates over all kept predictions
        self._labels: OrderedDict[tuple[str, str], tuple[float, dict[str, float]]] = OrderedDict()
        self._orphans: OrderedDict[tuple[str, str], tuple[float, dict[str, float]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, model_version: str, arm: str | None, item_ids: list[str], task_names: list[str],
            raw: Mapping[str, np.ndarray], calibrated: Mapping[str, np.ndarray]) -> PutResult:
        pred = Prediction.build(model_version, arm, item_ids, task_names, raw, calibrated)
        now = time.monotonic()
        with self._lock:
            if self._prediction(request_id, now) is not None:
                return "reused"
            old = self._preds.pop(request_id, None)  # expired, not yet evicted
            if old is not None:
                self._items -= len(old[1].item_ids)
            self._preds[request_id] = (now, pred)
            self._items += len(item_ids)
            data = self._preds
            while data and (len(data) > self.max_requests or (self._items > self.max_items and len(data) > 1)
                            or next(iter(data.values()))[0] < now - self.ttl_s):
                _, (_, gone) = data.popitem(last=False)
                self._items -= len(gone.item_ids)
        return "kept"

    def _prediction(self, request_id: str, now: float) -> Prediction | None:
        hit = self._preds.get(request_id)
        if hit is None or hit[0] < now - self.ttl_s:
            return None
        return hit[1]

    def ingest(self, events: list[Event]) -> IngestResult:
        res = IngestResult()
        now = time.monotonic()
        with self._lock:
            labels, orphans = self._labels, self._orphans
            for kept, ttl in ((labels, self.ttl_s), (orphans, self.orphan_ttl_s)):
                while kept and next(iter(kept.values()))[0] < now - ttl:
                    kept.popitem(last=False)
            for rid, iid, event_labels in events:
                key = (rid, iid)
                pred = self._prediction(rid, now)
                hit = labels.get(key) or orphans.get(key)
                if hit is None:  # a new key: an orphan when its request has no kept prediction
                    kept, cap = (orphans, self.max_orphans) if pred is None else (labels, self.max_events)
                    hit = kept[key] = (now, {})
                    if len(kept) > cap:
                        kept.popitem(last=False)
                known = hit[1]
                new = {t: v for t, v in event_labels.items() if t not in known}
                known.update(new)
                res.record(rid, iid, new, pred if new else None, orphan=pred is None)
        return count_orphans(self.metrics, res)

    def close(self) -> None:
        with self._lock:
            self._preds.clear()
            self._labels.clear()
            self._orphans.clear()
            self._items = 0

    def __len__(self) -> int:
        """Labelled (request, item) keys kept, orphans included."""
        return len(self._labels) + len(self._orphans)

    def orphan_keys(self) -> int:
        """Orphan (request, item) keys kept."""
        return len(self._orphans)
