"""The feedback join stores (service/feedback/) on real parts: memory, a SQLite file, a real redis-server.

Every backend: put -> ingest joins the exact served scores and arm; a (request, item, task) label counts
once; unknown requests are accepted, not joined, and bounded; TTL expiry. Shared: two OS processes on one
SQLite file, two stores on one Redis. Faults: a dead Redis or an unopenable file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mtrank.config import ConfigError
from service.feedback import IngestResult, JoinedLabel, JoinStore, JoinStoreUnavailable, build_join_store
from service.feedback.codec import Prediction
from service.feedback.redis import RedisJoinStore
from service.feedback.sqlite import SqliteJoinStore
from service.metrics import Metrics
from service.settings import load_settings

TASKS = ["ctr", "cvr", "watch_time"]
BACKENDS = ["memory", "sqlite", "redis"]


def scores(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Served raw / calibrated float32 [n] per task (what service.scorer.Scored holds)."""
    rng = np.random.default_rng(seed)
    raw = {t: rng.random(n, dtype=np.float32) for t in TASKS}
    return raw, {t: (v * np.float32(0.5)).astype(np.float32) for t, v in raw.items()}


def put(store: JoinStore, rid: str, n: int, arm: str | None = "treatment", seed: int = 0) -> tuple[dict, dict]:
    raw, cal = scores(n, seed)
    store.put(rid, "v1", arm, [f"i{k}" for k in range(n)], TASKS, raw, cal)
    return raw, cal


def counts(res: IngestResult) -> tuple[int, int, int]:
    return res.accepted, res.duplicates, res.joined


def settings(tmp_path: Path, **feedback: Any) -> Any:
    return load_settings(None, bundles_dir=tmp_path, feedback=feedback)


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """make_store(**feedback settings) -> (store, metrics) of the parametrised backend, built by build_join_store."""
    backend = request.param
    extra: dict[str, Any] = {}
    if backend == "sqlite":
        extra["sqlite_path"] = str(tmp_path / "join.sqlite3")
    elif backend == "redis":
        extra["redis_url"] = request.getfixturevalue("redis_server").url
    stores: list[JoinStore] = []

    def make(**feedback: Any) -> tuple[JoinStore, Metrics]:
        metrics = Metrics()
        store = build_join_store(settings(tmp_path, backend=backend, **extra, **feedback), metrics)
        assert store.backend == backend
        stores.append(store)
        return store, metrics

    yield make
    for s in stores:
        s.close()


# ------------------------------------------------------------------------------------------ every backend


def test_put_then_ingest_joins_served_scores(make_store: Any) -> None:
    store, metrics = make_store()
    raw, cal = put(store, "r1", 4)
    put(store, "r2", 2, arm=None, seed=1)
    res = store.ingest([("r1", "i2", {"ctr": 1.0, "watch_time": 12.5}), ("r1", "i0", {"cvr": 0.0}),
                        ("r2", "i1", {"ctr": 0.0})])
    assert counts(res) == (3, 0, 3)
    want = [JoinedLabel("r1", "i2", "ctr", 1.0, float(raw["ctr"][2]), float(cal["ctr"][2]), "v1", "treatment"),
            JoinedLabel("r1", "i2", "watch_time", 12.5, float(raw["watch_time"][2]), float(cal["watch_time"][2]), "v1",
                        "treatment"),
            JoinedLabel("r1", "i0", "cvr", 0.0, float(raw["cvr"][0]), float(cal["cvr"][0]), "v1", "treatment")]
    assert res.labels[:3] == want  # exact float32 values, in event order
    raw2, cal2 = scores(2, 1)
    assert res.labels[3] == JoinedLabel("r2", "i1", "ctr", 0.0, float(raw2["ctr"][1]), float(cal2["ctr"][1]), "v1", None)
    # the error series exist at 0
    for op in ("put", "ingest"):
        assert metrics.registry.get_sample_value("mtrank_join_store_errors_total",
                                                 {"backend": store.backend, "op": op}) == 0


def test_label_counts_once_first_value_wins(make_store: Any) -> None:
    store, _ = make_store()
    raw, _ = put(store, "r1", 3)
    assert counts(store.ingest([("r1", "i0", {"ctr": 1.0}), ("r1", "i0", {"ctr": 0.0})])) == (1, 1, 1)  # in a batch
    res = store.ingest([("r1", "i0", {"ctr": 1.0})])
    assert counts(res) == (0, 1, 0) and res.labels == []
    res = store.ingest([("r1", "i0", {"ctr": 0.0, "cvr": 1.0})])  # a new task label for the same item
    assert counts(res) == (1, 0, 1)
    assert [(lab.task, lab.label, lab.raw) for lab in res.labels] == [("cvr", 1.0, float(raw["cvr"][0]))]
    assert counts(store.ingest([("r1", "i1", {"ctr": 1.0})])) == (1, 0, 1)  # another item of the request


def test_unknown_predictions_accepted_not_joined(make_store: Any) -> None:
    store, _ = make_store()
    put(store, "r1", 2)
    res = store.ingest([("nope", "x", {"ctr": 1.0}), ("r1", "not-ranked", {"ctr": 1.0})])
    assert counts(res) == (2, 0, 0) and res.labels == []
    assert counts(store.ingest([("nope", "x", {"ctr": 1.0})])) == (0, 1, 0)  # still deduplicated


def test_ttl_expiry(make_store: Any) -> None:
    store, _ = make_store(prediction_ttl_s=0.3)
    put(store, "r1", 2)
    assert counts(store.ingest([("r1", "i0", {"ctr": 1.0})])) == (1, 0, 1)
    time.sleep(0.4)
    assert counts(store.ingest([("r1", "i1", {"ctr": 1.0})])) == (1, 0, 0)  # prediction expired
    assert counts(store.ingest([("r1", "i0", {"ctr": 1.0})])) == (1, 0, 0)  # its labels too: bounded by the TTL


def test_ids_with_odd_characters(make_store: Any) -> None:
    store, _ = make_store()
    ids = ["a\0b", "é\ud800", "plain"]
    raw, cal = scores(3)
    store.put("rid\0\ud800", "v\0", "arm", ids, TASKS, raw, cal)
    res = store.ingest([("rid\0\ud800", "é\ud800", {"ctr": 1.0}), ("rid\0\ud800", "a\0b", {"cvr": 0.0})])
    assert counts(res) == (2, 0, 2)
    assert res.labels[0].raw == float(raw["ctr"][1]) and res.labels[1].calibrated == float(cal["cvr"][0])


def test_concurrent_threads_count_each_label_once(make_store: Any) -> None:
    store, _ = make_store()
    put(store, "r1", 10)
    batch = [("r1", f"i{k % 10}", {"ctr": 1.0, "cvr": float(k % 2)}) for k in range(20)] + \
            [("nope", f"x{k}", {"ctr": 1.0}) for k in range(20)]
    out: list[IngestResult] = []
    barrier = threading.Barrier(4)

    def work(k: int) -> None:
        barrier.wait()
        put(store, f"other{k}", 50, seed=k)  # puts interleave with the ingests
        out.append(store.ingest(batch))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.accepted for r in out) == 30 and sum(r.duplicates for r in out) == 4 * len(batch) - 30
    assert sum(r.joined for r in out) == 10 and sum(len(r.labels) for r in out) == 20


def test_request_id_is_single_use(make_store: Any) -> None:
    """Was: a second put under the same request id replaced the first answer."""
    store, _ = make_store()
    raw, cal = scores(3)
    assert store.put("r1", "v1", "a", ["i0", "i1", "i2"], TASKS, raw, cal) == "kept"
    raw2, cal2 = scores(2, seed=5)
    assert store.put("r1", "v2", "b", ["j0", "j1"], TASKS, raw2, cal2) == "reused"  # nothing written
    res = store.ingest([("r1", "i1", {"ctr": 1.0}), ("r1", "j0", {"ctr": 1.0})])
    assert counts(res) == (2, 0, 1)
    assert res.labels == [JoinedLabel("r1", "i1", "ctr", 1.0, float(raw["ctr"][1]), float(cal["ctr"][1]), "v1", "a")]


def test_request_id_is_free_again_once_its_prediction_expired(make_store: Any) -> None:
    store, _ = make_store(prediction_ttl_s=0.2)
    raw, cal = scores(2)
    assert store.put("r1", "v1", None, ["i0", "i1"], TASKS, raw, cal) == "kept"
    time.sleep(0.3)
    assert store.put("r1", "v1", None, ["i0", "i1"], TASKS, raw, cal) == "kept"


def test_orphan_labels_have_a_bound_of_their_own(make_store: Any) -> None:
    """Was: feedback for unknown request ids took the space of the labels that join."""
    store, metrics = make_store(max_events=100, orphan_max_events=5, orphan_ttl_s=30)
    put(store, "r1", 3)
    res = store.ingest([(f"u{k}", "x", {"ctr": 1.0}) for k in range(50)] + [("r1", "i0", {"ctr": 1.0})])
    assert counts(res) == (51, 0, 1) and res.orphans == 50
    assert metrics.registry.get_sample_value("mtrank_feedback_events_total", {"result": "orphan"}) == 50
    assert counts(store.ingest([("r1", "i0", {"ctr": 0.0})])) == (0, 1, 0)  # the joinable label is kept
    if store.backend == "redis":  # bounded by a shorter TTL
        assert 0 < store.client.pttl(b"mtrank:fb:u0") <= 30_000 < store.client.pttl(b"mtrank:fb:r1")
    else:  # bounded by count: the oldest orphans are evicted
        assert store.orphan_keys() == 5 and len(store) == 6
        assert counts(store.ingest([("u49", "x", {"ctr": 1.0}), ("u0", "x", {"ctr": 1.0})])) == (1, 1, 0)


def test_orphan_labels_expire_sooner(make_store: Any) -> None:
    store, _ = make_store(orphan_ttl_s=0.3)
    put(store, "r1", 2)
    store.ingest([("u", "x", {"ctr": 1.0}), ("r1", "i0", {"ctr": 1.0})])
    time.sleep(0.45)
    assert counts(store.ingest([("u", "x", {"ctr": 1.0})])) == (1, 0, 0)  # the orphan expired: new again
    assert counts(store.ingest([("r1", "i0", {"ctr": 1.0})])) == (0, 1, 0)  # the joined label did not


# ------------------------------------------------------------------------------------------------ bounds


def test_sqlite_file_of_an_older_schema_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE labels (request_id BLOB, item_id BLOB, at REAL, labels TEXT, "
                       "PRIMARY KEY (request_id, item_id)); PRAGMA user_version = 1;")
    conn.close()
    store = SqliteJoinStore(path, Metrics(), ttl_s=60, max_requests=10, max_items=100, max_events=10)
    assert put(store, "r1", 2) and counts(store.ingest([("r1", "i0", {"ctr": 1.0})])) == (1, 0, 1)
    store.close()


def test_sqlite_bounds_hold_at_every_commit(tmp_path: Path) -> None:
    store = SqliteJoinStore(tmp_path / "j.sqlite3", Metrics(), ttl_s=60, max_requests=5, max_items=12, max_events=10)
    conn = sqlite3.connect(tmp_path / "j.sqlite3")
    ids = lambda: [r for (r,) in conn.execute("SELECT request_id FROM predictions ORDER BY at")]
    for k in range(20):
        put(store, f"r{k}", 2)
    assert ids() == [f"r{k}".encode() for k in range(15, 20)]  # requests bound
    put(store, "big", 9)
    assert ids() == [b"r19", b"big"]  # items bound: 2 + 9 <= 12
    for k in range(3):
        put(store, f"s{k}", 1)
    assert ids() == [b"big", b"s0", b"s1", b"s2"]
    put(store, "huge", 30)  # the newest prediction stays whatever its size
    assert ids() == [b"huge"]
    for b in range(10):
        store.ingest([(f"u{b}", f"x{k}", {"ctr": 1.0}) for k in range(50)])  # unknown feedback: capped
    assert len(store) == 10 == conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
    assert conn.execute("SELECT predictions, items FROM totals").fetchone() == (1, 30)  # the triggers' totals are exact
    conn.close()
    store.close()


def test_redis_keys_expire_and_ttl_is_not_extended(redis_server: Any) -> None:
    store = RedisJoinStore(redis_server.url, Metrics(), prefix="t", ttl_s=30)
    put(store, "r1", 3)
    store.ingest([("unknown", f"x{k}", {"ctr": 1.0}) for k in range(20)])
    c = redis_server.client()
    assert sorted(c.keys("t:*")) == ["t:fb:unknown", "t:pred:r1"]
    assert all(0 < c.pttl(k) <= 30_000 for k in c.keys("t:*"))  # every key expires
    c.pexpire("t:fb:unknown", 1000)
    store.ingest([("unknown", "y", {"ctr": 1.0})])  # more labels do not push the hash's expiry out
    assert 0 < c.pttl("t:fb:unknown") <= 1000
    assert c.hget("t:fb:unknown", "x3\0ctr") == "1.0"
    store.close()


# ------------------------------------------------------------------------------------------------ shared


def _sqlite_worker(path: str, conn: Any) -> None:
    """A separate OS process: runs ("put", rid, n, seed) / ("ingest", events) commands on its own store."""
    store = SqliteJoinStore(path, Metrics(), ttl_s=60, max_requests=100, max_items=10_000, max_events=1000)
    conn.send("ready")
    while (cmd := conn.recv()) != "stop":
        if cmd[0] == "put":
            put(store, cmd[1], cmd[2], seed=cmd[3])
            conn.send(None)
        else:
            conn.send(counts(store.ingest(cmd[1])))
    store.close()


def test_sqlite_shared_by_two_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "join.sqlite3")
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_sqlite_worker, args=(path, there), daemon=True)
    child.start()
    store = SqliteJoinStore(path, Metrics(), ttl_s=60, max_requests=100, max_items=10_000, max_events=1000)
    try:
        assert here.recv() == "ready"
        here.send(("put", "from-child", 3, 7))  # the child ranked ...
        here.recv()
        raw, cal = scores(3, 7)
        res = store.ingest([("from-child", "i1", {"ctr": 1.0})])  # ... this process gets the feedback
        assert counts(res) == (1, 0, 1) and res.labels[0].raw == float(raw["ctr"][1])
        put(store, "from-parent", 3, seed=8)
        here.send(("ingest", [("from-parent", "i2", {"cvr": 1.0}), ("from-child", "i1", {"ctr": 0.0})]))
        assert here.recv() == (1, 1, 1)  # joined in the child; the child sees the parent's label as a duplicate
        batch = [("from-child", f"i{k % 3}", {"watch_time": float(k)}) for k in range(3)] + \
                [("nope", f"x{k}", {"ctr": 1.0}) for k in range(50)]
        here.send(("ingest", batch))  # both processes ingest the same batch at the same time
        mine = counts(store.ingest(batch))
        theirs = here.recv()
        assert mine[0] + theirs[0] == len(batch) and mine[1] + theirs[1] == len(batch)  # each label counted once
        here.send("stop")
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        store.close()


def test_redis_shared_by_two_stores(redis_server: Any) -> None:
    a = RedisJoinStore(redis_server.url, Metrics())
    b = RedisJoinStore(redis_server.url, Metrics())
    raw, cal = put(a, "r1", 4)
    res = b.ingest([("r1", "i3", {"ctr": 1.0})])
    assert counts(res) == (1, 0, 1) and res.labels[0] == JoinedLabel("r1", "i3", "ctr", 1.0, float(raw["ctr"][3]),
                                                                      float(cal["ctr"][3]), "v1", "treatment")
    assert counts(a.ingest([("r1", "i3", {"ctr": 0.0})])) == (0, 1, 0)
    batch = [("r1", f"i{k % 4}", {"cvr": 1.0}) for k in range(8)] + [("u", f"x{k}", {"ctr": 1.0}) for k in range(50)]
    out: list[IngestResult] = []
    threads = [threading.Thread(target=lambda s=s: out.append(s.ingest(batch))) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.accepted for r in out) == 54 and sum(r.duplicates for r in out) == 2 * len(batch) - 54
    assert sum(r.joined for r in out) == 4
    a.close()
    b.close()


# ------------------------------------------------------------------------------------------------ faults


def test_redis_down_put_counts_ingest_raises(redis_server: Any, tmp_path: Path) -> None:
    metrics = Metrics()
    store = build_join_store(settings(tmp_path, redis_url=redis_server.url, retry_after_ms=0), metrics)
    put(store, "r1", 2)
    redis_server.kill()
    put(store, "r2", 2)  # does not raise
    errors = metrics.join_errors.labels("redis", "put")._value.get()
    assert errors == 1
    with pytest.raises(JoinStoreUnavailable):
        store.ingest([("r1", "i0", {"ctr": 1.0})])
    assert metrics.registry.get_sample_value("mtrank_join_store_errors_total", {"backend": "redis", "op": "ingest"}) == 1
    store.close()


def test_redis_breaker_skips_calls(redis_server: Any) -> None:
    metrics = Metrics()
    store = RedisJoinStore(redis_server.url, metrics, retry_after_s=60)
    redis_server.kill()
    put(store, "r1", 2)
    t0 = time.perf_counter()
    for k in range(20):
        put(store, f"r{k}", 2)  # skipped while the breaker is open: no connection attempts
    assert time.perf_counter() - t0 < 0.5
    assert metrics.join_errors.labels("redis", "put")._value.get() == 21
    with pytest.raises(JoinStoreUnavailable):
        store.ingest([("r1", "i0", {"ctr": 1.0})])


def test_sqlite_unopenable_file(tmp_path: Path) -> None:
    metrics = Metrics()
    store = build_join_store(settings(tmp_path, sqlite_path=str(tmp_path)), metrics)  # a directory: cannot open
    put(store, "r1", 2)
    assert metrics.join_errors.labels("sqlite", "put")._value.get() == 1
    with pytest.raises(JoinStoreUnavailable):
        store.ingest([("r1", "i0", {"ctr": 1.0})])
    assert metrics.join_errors.labels("sqlite", "ingest")._value.get() == 1
    store.close()


# ---------------------------------------------------------------------------------------- config, codec


def test_backend_choice_and_config_errors(tmp_path: Path) -> None:
    m = Metrics()
    assert build_join_store(settings(tmp_path), m).backend == "memory"
    assert build_join_store(settings(tmp_path, sqlite_path=str(tmp_path / "f.db")), m).backend == "sqlite"
    fs_redis = load_settings(None, bundles_dir=tmp_path, feature_store={"backend": "redis"})
    store = build_join_store(fs_redis, m)  # auto: the feature store's Redis (connects lazily)
    assert store.backend == "redis" and store.url == fs_redis.feature_store.redis.url  # type: ignore[attr-defined]
    store.close()
    with pytest.raises(ConfigError, match=r"feedback\.redis_url"):
        build_join_store(settings(tmp_path, backend="redis"), m)
    with pytest.raises(ConfigError, match=r"feedback\.sqlite_path"):
        settings(tmp_path, backend="sqlite")


def test_serve_shares_a_sqlite_file_between_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.main import _shared_feedback_file

    monkeypatch.setenv("MTRANK_FEEDBACK__SQLITE_PATH", "")  # so that monkeypatch restores the variable afterwards
    monkeypatch.delenv("MTRANK_FEEDBACK__SQLITE_PATH")
    _shared_feedback_file(settings(tmp_path, backend="memory"))  # asked for: left alone
    _shared_feedback_file(settings(tmp_path, redis_url="redis://127.0.0.1:1/0"))
    _shared_feedback_file(settings(tmp_path, sqlite_path=str(tmp_path / "mine.db")))
    assert "MTRANK_FEEDBACK__SQLITE_PATH" not in os.environ
    _shared_feedback_file(settings(tmp_path))
    path = Path(os.environ["MTRANK_FEEDBACK__SQLITE_PATH"])
    try:
        assert path.parent.is_dir() and path.name == "join.sqlite3"
        assert build_join_store(load_settings(None, bundles_dir=tmp_path), Metrics()).backend == "sqlite"  # workers
    finally:
        shutil.rmtree(path.parent)


def test_codec_round_trip() -> None:
    raw, cal = scores(5)
    ids = ["a", "b\0c", "", "\ud800x", "e"]
    p = Prediction.build("v1", None, ids, TASKS, raw, cal)
    q = Prediction.decode(p.encode())
    assert (q.model_version, q.arm, q.task_names, q.item_ids) == ("v1", None, TASKS, ids)
    assert np.array_equal(q.raw, p.raw) and np.array_equal(q.calibrated, p.calibrated)
    assert Prediction.decode(Prediction.build("v1", "", ["x"], TASKS, scores(1)[0], scores(1)[1]).encode()).arm == ""
    with pytest.raises(ValueError):
        Prediction.decode(p.encode()[:-1])
    with pytest.raises(ValueError):
        Prediction.decode(b"\x09" + p.encode()[1:])
