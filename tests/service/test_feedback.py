"""The per-process join store (feedback.backend: memory): prediction-log bounds/TTL, dedup and the join (no server).

The behaviour every backend shares (and the shared backends) is tested in test_join_store.py.
"""

from __future__ import annotations

import time

import numpy as np

from service.feedback.memory import MemoryJoinStore

TASKS = ["ctr", "cvr"]


def put(store: MemoryJoinStore, rid: str, n: int, p: float = 0.25) -> None:
    ids = [f"i{k}" for k in range(n)]
    raw = {t: np.full(n, p, dtype=np.float32) for t in TASKS}
    store.put(rid, "v1", "default", ids, TASKS, raw, {t: v + np.float32(0.5) for t, v in raw.items()})


def joined(store: MemoryJoinStore, rid: str, iid: str, task: str = "ctr") -> bool:
    """Ingests a fresh label for (rid, iid): was it joined?"""
    return store.ingest([(rid, iid, {task: 1.0})]).joined == 1


def test_prediction_log_bounds_and_ttl() -> None:
    store = MemoryJoinStore(ttl_s=60, max_requests=3, max_items=10, max_events=100)
    for k in range(4):
        put(store, f"r{k}", 2)
    assert not joined(store, "r0", "i0") and joined(store, "r3", "i1")  # request bound
    put(store, "big", 9)  # item bound: evicts the oldest requests until <= 10 candidates
    assert not joined(store, "r3", "i0") and joined(store, "big", "i8") and not joined(store, "big", "nope")
    short = MemoryJoinStore(ttl_s=0.01, max_requests=10, max_items=100, max_events=100)
    put(short, "r", 1)
    time.sleep(0.02)
    assert not joined(short, "r", "i0")


def test_dedup_first_label_wins_and_join() -> None:
    store = MemoryJoinStore(ttl_s=60, max_requests=100, max_items=1000, max_events=100)
    put(store, "r1", 3, p=0.05)
    res = store.ingest([("r1", "i0", {"ctr": 1.0}), ("r1", "i0", {"ctr": 0.0}), ("r1", "i1", {"ctr": 0.0, "cvr": 1.0}),
                        ("r9", "x", {"ctr": 1.0})])
    assert (res.accepted, res.duplicates, res.joined) == (3, 1, 2)
    assert [(j.task, j.label) for j in res.labels] == [("ctr", 1.0), ("ctr", 0.0), ("cvr", 1.0)]
    assert all(j.raw == np.float32(0.05) and j.calibrated == np.float32(0.55) and j.model_version == "v1"
               and j.arm == "default" for j in res.labels)  # the served scores, as float32 served them
    res = store.ingest([("r1", "i0", {"cvr": 0.0, "ctr": 0.0})])  # a new label for a known key; ctr stays 1
    assert (res.accepted, res.duplicates, [j.task for j in res.labels]) == (1, 0, ["cvr"])


def test_labels_capped() -> None:
    store = MemoryJoinStore(ttl_s=60, max_requests=10, max_items=100, max_events=5)
    res = store.ingest([("unknown", f"x{k}", {"ctr": 1.0}) for k in range(100)])
    assert (res.accepted, res.joined) == (100, 0) and len(store) == 5  # oldest evicted
