"""The feedback log (mtrank.feedback_log + service.feedback.log) on real parts: files, OS processes, a real
redis-server, and the service over real HTTP (uvicorn).

Records round-trip exactly (odd ids included); JSONL files rotate by size and age; several processes (and
threads) append without interleaving; a torn last line is skipped and counted; the Redis stream is written and
read in chunks; /feedback appends exactly the joined labels with the served scores; a failing log still
answers 200 and counts the error.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from mtrank.bundle import read_manifest
from mtrank.config import ConfigError
from mtrank.feedback_log import FIELDS, JsonlWriter, RedisStreamWriter, encode_records, read_feedback
from tests.service.conftest import clone_bundle, rank_body
from tests.service.test_api import metric


class Rec(NamedTuple):
    request_id: str
    item_id: str
    task: str
    label: float
    raw: float
    calibrated: float
    model_version: str
    arm: str | None


def recs(n: int, prefix: str = "r", version: str = "v1") -> list[Rec]:
    return [Rec(f"{prefix}{k // 3}", f"i{k % 3}", ("ctr", "like")[k % 2], float(k % 2), k / (n + 1), k / (n + 2),
                version, None if k % 4 == 0 else "arm-a") for k in range(n)]


def rows(cols: Any) -> list[tuple[Any, ...]]:
    """The records of read_feedback's columns as tuples (Rec's fields, no ts)."""
    return list(zip(*(getattr(cols, f).tolist() for f in FIELDS[1:])))


def write(writer: Any, batch: list[Rec], ts: float = 1.5) -> None:
    writer.write(encode_records(batch, ts), len(batch))


# ------------------------------------------------------------------------------------------- records


def test_records_round_trip_odd_strings(tmp_path: Path) -> None:
    odd = ['a"b', '},{"ts":1}', "line\nbreak", "é中😀", "lone\ud800surrogate", "back\\slash", ""]
    batch = [Rec(s, s[::-1], "ctr", 1.0, 0.25, 0.5, s or "v", s or None) for s in odd]
    data = encode_records(batch, 123.25)
    assert data.isascii() and data.count(b"\n") == len(batch) and data.endswith(b"\n")
    (tmp_path / "one.jsonl").write_bytes(data)
    cols = read_feedback(tmp_path / "one.jsonl")
    assert rows(cols) == [tuple(r) for r in batch]
    assert cols.ts.tolist() == [123.25] * len(batch) and cols.torn == cols.invalid == 0
    assert encode_records([], 1.0) == b""
    nums = [Rec("r", "i", "t", np.float32(1.0), float("nan"), 1e-300, "v", None),  # type: ignore[arg-type]
            Rec("r", "i", "t", 0.0, float("inf"), 0.1 + 0.2, "v", None)]
    (tmp_path / "nums.jsonl").write_bytes(encode_records(nums, 5))
    cols = read_feedback(tmp_path / "nums.jsonl")
    assert cols.label.tolist() == [1.0, 0.0] and np.isnan(cols.raw[0]) and cols.raw[1] == np.inf
    assert cols.calibrated.tolist() == [1e-300, 0.1 + 0.2] and cols.ts.tolist() == [5.0, 5.0]  # exact round trip


def test_sources_are_described_without_credentials() -> None:
    from mtrank.feedback_log import describe_source

    assert describe_source("redis://:s3cret@cache:6379/0") == "redis://cache:6379/0"
    assert describe_source("rediss://user:pw@cache/1") == "rediss://cache/1"
    assert describe_source(Path("/var/log/fb")) == "/var/log/fb"


# ----------------------------------------------------------------------------------------------- jsonl


def test_jsonl_rotates_by_size_and_age(tmp_path: Path) -> None:
    w = JsonlWriter(tmp_path, max_bytes=2000, max_age_s=None)
    batches = [recs(4, prefix=f"b{b}-") for b in range(40)]
    for b in batches:
        write(w, b)
    w.close()
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) > 5
    assert all(f.stat().st_size <= 2000 for f in files)
    assert [int(f.stem.rsplit("-", 1)[1]) for f in files] == list(range(1, len(files) + 1))  # seq in the name
    assert rows(read_feedback(tmp_path)) == [tuple(r) for b in batches for r in b]  # name order = write order

    aged = tmp_path / "aged"
    w = JsonlWriter(aged, max_age_s=0.05)
    write(w, recs(2))
    write(w, recs(2))
    time.sleep(0.06)
    write(w, recs(2))
    w.close()
    assert sorted(len(f.read_text().splitlines()) for f in aged.glob("*.jsonl")) == [2, 4]


def _append_worker(directory: str, proc: int, threads: int, batches: int) -> None:
    w = JsonlWriter(directory, max_bytes=8192)

    def run(t: int) -> None:
        for b in range(batches):
            write(w, [Rec(f"p{proc}-t{t}", f"{b}:{j}", "ctr", 1.0, 0.5, 0.5, "v", "x" * (b % 50)) for j in range(3)])

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    w.close()


def test_processes_and_threads_append_without_interleaving(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs, threads, batches = 4, 3, 150
    ps = [ctx.Process(target=_append_worker, args=(str(tmp_path), p, threads, batches)) for p in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    files = list(tmp_path.glob("*.jsonl"))
    pids = {f.name.split("-")[2] for f in files}
    assert len(pids) == procs and len(files) > procs  # one writer per process, rotated
    for f in files:  # every line is a whole record; a file holds one process's records
        lines = f.read_bytes().split(b"\n")
        assert lines[-1] == b""
        assert len({json.loads(ln)["request_id"].split("-")[0] for ln in lines[:-1]}) == 1
    cols = read_feedback(tmp_path)
    assert cols.torn == cols.invalid == 0 and len(cols) == procs * threads * batches * 3
    for key in {(p, t) for p in range(procs) for t in range(threads)}:
        mine = cols.item_id[cols.request_id == f"p{key[0]}-t{key[1]}"]
        assert sorted(mine.tolist()) == sorted(f"{b}:{j}" for b in range(batches) for j in range(3))


def test_torn_last_line_and_bad_lines_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    w = JsonlWriter(tmp_path)
    write(w, recs(6))
    w.close()
    assert w.path is not None
    with open(w.path, "ab") as fh:
        fh.write(b'{"ts": 2.0, "request_id": "torn", "item_')  # a write cut short
    other = tmp_path / "other.jsonl"
    other.write_bytes(encode_records(recs(2, prefix="o"), 1.0) + b"not json\n" + b'{"ts": 1}\n' +
                      b'{"ts": 1, "request_id": "x", "item_id": "i", "task": "t", "label": "1", "raw": 0.1, '
                      b'"calibrated": 0.1, "model_version": "v", "arm": null}\n' + encode_records(recs(1, "p"), 1.0))
    with caplog.at_level(logging.WARNING, logger="mtrank.feedback_log"):
        cols = read_feedback(tmp_path)
    assert len(cols) == 6 + 2 + 1 and cols.torn == 1 and cols.invalid == 3
    assert "torn last line" in caplog.text and "torn" not in cols.request_id.tolist()
    with pytest.raises(FileNotFoundError, match="no such feedback log"):
        read_feedback(tmp_path / "missing")


def test_redis_stream_write_and_chunked_read(redis_server: Any) -> None:
    w = RedisStreamWriter(redis_server.url, key="t:feedback", maxlen=100_000)
    batches = [recs(k % 5 + 1, prefix=f"b{k}-") for k in range(23)]
    for b in batches:
        write(w, b)
    cols = read_feedback(redis_server.url, stream="t:feedback", chunk=4)
    assert rows(cols) == [tuple(r) for b in batches for r in b]
    assert len(read_feedback(redis_server.url, stream="absent")) == 0
    small = RedisStreamWriter(redis_server.url, key="t:small", maxlen=100)
    for _ in range(1000):
        write(small, recs(1))
    assert 100 <= redis_server.client().xlen("t:small") < 1000  # MAXLEN ~ trims whole macro nodes
    w.close()
    small.close()


# ------------------------------------------------------------------------------------------- settings


def test_log_settings(tmp_path: Path) -> None:
    from service.app import create_app
    from service.settings import load_settings

    assert load_settings(None, bundles_dir=tmp_path).feedback.log.kind == "none"
    assert load_settings(None, bundles_dir=tmp_path, feedback={"log": {"dir": "x"}}).feedback.log.kind == "jsonl"
    with pytest.raises(ConfigError, match=r"feedback\.log\.max_bytes: Input should be greater than 0"):
        load_settings(None, bundles_dir=tmp_path, feedback={"log": {"kind": "jsonl", "dir": "x", "max_bytes": 0}})
    with pytest.raises(ConfigError, match="feedback.log.kind: redis needs a Redis URL"):
        create_app(load_settings(None, bundles_dir=tmp_path, feedback={"log": {"kind": "redis"}}))


# ---------------------------------------------------------------------------------------------- HTTP


def _served(c: Any, request_id: str, n: int) -> dict[str, dict[str, float]]:
    body = c.post("/rank", json=rank_body(n, request_id=request_id, raw_scores=True)).json()
    return {it["item_id"]: it["task_scores"] for it in body["items"]}


def test_feedback_appends_exactly_the_joined_labels(tmp_path: Path, base_bundle: Path, start_server) -> None:
    bundles = tmp_path / "bundles"
    clone_bundle(base_bundle, bundles, "logv1", activate=True)
    manifest = read_manifest(bundles / "logv1")
    log_dir = tmp_path / "log"
    srv = start_server(bundles, feedback={"log": {"kind": "jsonl", "dir": str(log_dir)}})
    t0 = time.time()
    with srv.client() as c:
        raw_a, raw_b = _served(c, "req-a", 4), _served(c, "req-b", 3)
        events = [{"request_id": "req-a", "item_id": "i1", "labels": {"ctr": 1, "cvr": 0}},
                  {"request_id": "req-a", "item_id": "i3", "labels": {"like": 0, "watch_time": 7.5}},
                  {"request_id": "req-b", "item_id": "i0", "labels": {"ctcvr": 1}},
                  {"request_id": "req-b", "item_id": "not-ranked", "labels": {"ctr": 1}},
                  {"request_id": "unknown", "item_id": "i0", "labels": {"ctr": 1}}]
        assert c.post("/feedback", json={"events": events}).json() == {"accepted": 5, "duplicates": 0, "joined": 3}
        again = [events[0], {"request_id": "req-a", "item_id": "i1", "labels": {"ctr": 0, "like": 1}}]
        assert c.post("/feedback", json={"events": again}).json() == {"accepted": 1, "duplicates": 1, "joined": 1}
        text = c.get("/metrics").text
    cols = read_feedback(log_dir)

    def want(rid: str, iid: str, task: str, label: float, raw: dict[str, dict[str, float]]) -> tuple[Any, ...]:
        r = np.asarray([raw[iid][task]], dtype=np.float32)
        cal = manifest.calibration[task].apply(r) if task in manifest.calibration else r
        return (rid, iid, task, label, float(r[0]), float(cal[0]), "logv1", "default")

    expected = [want("req-a", "i1", "ctr", 1.0, raw_a), want("req-a", "i1", "cvr", 0.0, raw_a),
                want("req-a", "i3", "like", 0.0, raw_a), want("req-a", "i3", "watch_time", 7.5, raw_a),
                want("req-b", "i0", "ctcvr", 1.0, raw_b), want("req-a", "i1", "like", 1.0, raw_a)]
    assert rows(cols) == expected  # exactly the joined labels, the served float32 scores, in order
    assert cols.torn == cols.invalid == 0 and np.all((cols.ts >= t0 - 1) & (cols.ts <= time.time() + 1))
    assert metric(text, "mtrank_feedback_log_records_total", sink="jsonl") == len(expected)
    assert metric(text, "mtrank_feedback_log_errors_total", sink="jsonl") == 0
    assert "mtrank_feedback_log_errors_total{" in text  # the series exists at 0


def test_failing_log_still_answers_200_and_counts_the_error(tmp_path: Path, base_bundle: Path, start_server,
                                                            caplog) -> None:
    bundles = tmp_path / "bundles"
    clone_bundle(base_bundle, bundles, "failv1", activate=True)
    (tmp_path / "a-file").write_text("not a directory")
    srv = start_server(bundles, feedback={"log": {"kind": "jsonl", "dir": str(tmp_path / "a-file" / "log")},
                                          "retry_after_ms": 0})
    with srv.client() as c, caplog.at_level(logging.WARNING, logger="mtrank.service.feedback"):
        _served(c, "req-f", 3)
        for k in range(2):
            r = c.post("/feedback", json={"events": [{"request_id": "req-f", "item_id": f"i{k}", "labels": {"ctr": 1}}]})
            assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0, "joined": 1}
        text = c.get("/metrics").text
    assert metric(text, "mtrank_feedback_log_errors_total", sink="jsonl") == 2
    assert metric(text, "mtrank_feedback_log_records_total", sink="jsonl") == 0
    assert metric(text, "mtrank_feedback_events_total", result="joined") == 2  # the labels were recorded
    assert "feedback log (jsonl) append of 1 labels failed" in caplog.text


def test_redis_log_through_http(tmp_path: Path, base_bundle: Path, start_server, redis_server: Any) -> None:
    bundles = tmp_path / "bundles"
    clone_bundle(base_bundle, bundles, "redisv1", activate=True)
    srv = start_server(bundles, feedback={"redis_url": redis_server.url, "key_prefix": "fbt", "log": {"kind": "redis"}})
    with srv.client() as c:
        raw = _served(c, "req-r", 2)
        c.post("/feedback", json={"events": [{"request_id": "req-r", "item_id": "i1", "labels": {"ctr": 0, "like": 1}}]})
        text = c.get("/metrics").text
    cols = read_feedback(redis_server.url, stream="fbt:feedback")
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows(cols)] == [
        ("req-r", "i1", "ctr", 0.0, float(np.float32(raw["i1"]["ctr"]))),
        ("req-r", "i1", "like", 1.0, float(np.float32(raw["i1"]["like"])))]
    assert metric(text, "mtrank_feedback_log_records_total", sink="redis") == 2

