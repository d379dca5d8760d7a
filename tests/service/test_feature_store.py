"""Feature stores without a model: embedded snapshots, the Redis layout, one round trip, degradation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pandas as pd
import pytest

from service.feature_store import (
    EMPTY,
    EmbeddedFeatureStore,
    RedisFeatureStore,
    TTLCache,
    push_rows,
    push_snapshot,
    read_snapshot,
)
from service.metrics import Metrics
from service.settings import FeatureStoreSettings, RedisSettings


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_embedded_snapshot_csv_and_parquet(tmp_path: Path) -> None:
    df = pd.DataFrame({"user_id": ["u1", "u2", "u1"], "item_id": ["i1", "i2", "i3"],
                       "user_country": ["de", "fr", "us"], "item_price": [1.5, None, 3.0]})
    df.to_csv(tmp_path / "snap.csv", index=False)
    df.to_parquet(tmp_path / "snap.parquet")
    for name in ("snap.csv", "snap.parquet"):
        users = read_snapshot(tmp_path / name, "user_id")
        assert users["u1"]["user_country"] == "us"  # last row wins
        items = read_snapshot(tmp_path / name, "item_id")
        assert "item_price" not in items["i2"]  # null cells are absent
        assert items["i3"]["item_price"] == 3.0
    with pytest.raises(ValueError, match="no key column 'uid'"):
        read_snapshot(tmp_path / "snap.csv", "uid")
    m = Metrics()
    store = EmbeddedFeatureStore.from_settings(FeatureStoreSettings(snapshot=str(tmp_path / "snap.parquet")), m)
    res = asyncio.run(store.fetch("u2", ["i1", "nope", "i3"], True, True))
    assert res.user["user_country"] == "fr" and not res.degraded
    assert res.items[1] is EMPTY and res.items[2]["item_price"] == 3.0
    assert sample(m, "mtrank_feature_store_hits_total", side="item") == 2
    assert sample(m, "mtrank_feature_store_misses_total", side="item") == 1
    assert sample(m, "mtrank_feature_store_hits_total", side="user") == 1
    none = asyncio.run(store.fetch("u2", ["nope", "nada"], False, True))  # no row for any candidate: no rows at all
    assert none.items == () and sample(m, "mtrank_feature_store_misses_total", side="item") == 3
    empty_m = Metrics()  # a store with no item rows: every candidate a miss, no rows
    empty = asyncio.run(EmbeddedFeatureStore(empty_m, users={"u2": {"x": 1}}).fetch("u2", ["i1", "i2"], True, True))
    assert empty.items == () and empty.user == {"x": 1}
    assert sample(empty_m, "mtrank_feature_store_misses_total", side="item") == 2


def test_ttl_cache_expiry_and_bound() -> None:
    c = TTLCache(ttl_s=1.0, max_entries=2)
    c.put_many([("a", 1), ("b", None), ("c", 3)], now=0.0)
    assert c.get("a", 0.5) is c.MISSING  # evicted (bound)
    assert c.get("b", 0.5) is None  # cached absence
    assert c.get("c", 2.0) is c.MISSING  # expired


def _store(url: str, **kw: object) -> tuple[RedisFeatureStore, Metrics]:
    m = Metrics()
    return RedisFeatureStore(RedisSettings(url=url, **kw), m, log_interval_s=0.0), m


def test_redis_layout_single_round_trip_and_cache(redis_server, tmp_path: Path) -> None:
    r = redis_server.client()
    assert push_rows(redis_server.url, "user", {"u1": {"user_country": "de", "user_age_bucket": 3}}) == 1
    pd.DataFrame({"item_id": ["i1", "i2"], "item_category": ["shoes", "hats"], "item_price": [12.5, None]}).to_parquet(
        tmp_path / "items.parquet")
    assert push_snapshot(redis_server.url, tmp_path / "items.parquet", "item") == 2
    assert r.get("mtrank:user:u1") == '{"user_country": "de", "user_age_bucket": 3}'
    assert r.get("mtrank:item:i2") == '{"item_category": "hats"}'
    r.set("mtrank:item:bad", "not json")

    async def go() -> None:
        store, m = _store(redis_server.url, cache_ttl_s=60.0)
        await store.start()
        before = r.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
        res = await store.fetch("u1", ["i1", "i2", "i3", "bad"], True, True)
        after = r.info("commandstats")["cmdstat_mget"]["calls"]
        assert after - before == 1  # one round trip for user + 4 items
        assert res.user == {"user_country": "de", "user_age_bucket": 3}
        assert res.items[0] == {"item_category": "shoes", "item_price": 12.5}
        assert res.items[2] is EMPTY and res.items[3] is EMPTY  # absent, unparseable
        assert sample(m, "mtrank_feature_store_hits_total", side="item") == 2
        assert sample(m, "mtrank_feature_store_misses_total", side="item") == 2
        # second call: served by the local cache, Redis not asked
        res2 = await store.fetch("u1", ["i1", "i3"], True, True)
        assert r.info("commandstats")["cmdstat_mget"]["calls"] == after
        assert res2.items[0]["item_category"] == "shoes"
        assert sample(m, "mtrank_feature_store_cache_hits_total", side="item") == 2
        assert (await store.fetch(None, ["bad", "absent"], False, True)).items == ()  # no candidate has a row
        await store.close()

    asyncio.run(go())


def test_redis_outage_degrades_within_budget(redis_server) -> None:
    redis_server.client().set("mtrank:item:i1", '{"item_price": 1}')

    async def go() -> None:
        store, m = _store(redis_server.url, cache_ttl_s=0.0, socket_timeout_ms=20, retry_after_ms=0)
        await store.start()
        ok = await store.fetch(None, ["i1"], False, True)
        assert ok.items[0] == {"item_price": 1} and not ok.degraded
        redis_server.kill()
        for _ in range(3):
            t0 = time.perf_counter()
            res = await store.fetch("u1", ["i1", "i2"], True, True)
            assert time.perf_counter() - t0 < 0.5
            assert res.degraded and res.user is EMPTY and not res.items
        assert sample(m, "mtrank_feature_store_errors_total", backend="redis", reason="error") == 3
        await store.close()

    asyncio.run(go())


def test_redis_timeout_counts_and_circuit_breaker() -> None:
    """A server that accepts but never answers: the lookup gives up after the budget."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    async def go() -> None:
        store, m = _store(f"redis://127.0.0.1:{port}/0", cache_ttl_s=0.0, socket_timeout_ms=30, retry_after_ms=10_000)
        await store.start()
        t0 = time.perf_counter()
        res = await store.fetch("u1", ["i1"], True, True)
        assert res.degraded and time.perf_counter() - t0 < 0.5
        assert sample(m, "mtrank_feature_store_timeouts_total", backend="redis") == 1
        res = await store.fetch("u1", ["i1"], True, True)  # circuit open: no wait at all
        assert res.degraded
        assert sample(m, "mtrank_feature_store_errors_total", backend="redis", reason="circuit_open") == 1
        await store.close()

    try:
        asyncio.run(go())
    finally:
        srv.close()
