"""Prediction log bounds/TTL, feedback dedup and the calibration-bucket API (no server)."""

from __future__ import annotations

import time

import numpy as np

from service.feedback import FeedbackStore, PredictionLog

TASKS = ["ctr", "cvr"]


def put(log: PredictionLog, rid: str, n: int, p: float = 0.25) -> None:
    ids = [f"i{k}" for k in range(n)]
    raw = {t: np.full(n, p, dtype=np.float32) for t in TASKS}
    log.put(rid, "v1", ids, TASKS, raw, {t: v + 0.5 for t, v in raw.items()})


def test_prediction_log_bounds_and_ttl() -> None:
    log = PredictionLog(max_requests=3, ttl_s=60, max_items=10)
    for k in range(4):
        put(log, f"r{k}", 2)
    assert log.get("r0", "i0") is None and log.get("r3", "i1") is not None  # request bound
    put(log, "big", 9)  # item bound: evicts the oldest requests until <= 10 candidates
    assert len(log) == 1 and log.get("big", "i8")[1] == 8
    assert log.get("big", "nope") is None
    short = PredictionLog(10, ttl_s=0.01)
    put(short, "r", 1)
    time.sleep(0.02)
    assert short.get("r", "i0") is None


def test_dedup_first_label_wins_and_buckets() -> None:
    log = PredictionLog(100, 60)
    put(log, "r1", 3, p=0.05)
    fb = FeedbackStore(max_events=100, predictions=log)
    res = fb.ingest([("r1", "i0", {"ctr": 1.0}), ("r1", "i0", {"ctr": 0.0}), ("r1", "i1", {"ctr": 0.0, "cvr": 1.0}),
                     ("r9", "x", {"ctr": 1.0})])
    assert (res.accepted, res.duplicates, res.joined) == (3, 1, 2)
    res = fb.ingest([("r1", "i0", {"cvr": 0.0})])  # a new label for a known key
    assert (res.accepted, res.duplicates) == (1, 0)
    p, y = fb.joined("ctr")
    assert sorted(y.tolist()) == [0.0, 1.0] and np.allclose(p, 0.55)  # calibrated scores of the join
    p_raw, _ = fb.joined("ctr", calibrated=False)
    assert np.allclose(p_raw, 0.05)
    b = fb.calibration_buckets("ctr", bins=10)
    assert b[5]["count"] == 2 and b[5]["mean_label"] == 0.5 and b[0]["count"] == 0 and b[0]["mean_score"] is None
    assert fb.joined("ctr", version="v2")[0].size == 0
