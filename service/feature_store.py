"""Feature stores: user/item feature rows looked up by id, filling features a request left out.

Precedence (applied in ``service.scorer``): request value > feature-store value > schema default.

Backends (``feature_store.backend``):

* ``embedded`` (default): in-process dicts, optionally filled at start from Parquet/CSV snapshots
  (``snapshot`` keyed by both ``user_id`` and ``item_id`` columns, or ``user_snapshot`` /
  ``item_snapshot``). A row's columns are feature names; null cells are absent.
* ``redis``: ``<prefix>:user:<user_id>`` and ``<prefix>:item:<item_id>`` hold a JSON object
  ``{"feature name": value, ...}`` (``prefix`` = ``feature_store.redis.key_prefix``, default
  ``mtrank``). One ``MGET`` per request fetches the user key and every candidate key (ONE round
  trip), skipping keys served by a small local TTL cache (absent keys are cached too). The whole
  lookup runs under a time budget (socket timeouts + an overall deadline); on timeout or outage
  the request is scored with request features + defaults, the failure is counted
  (``mtrank_feature_store_errors_total`` / ``..._timeouts_total``) and logged (rate-limited),
  and Redis is skipped for ``retry_after_ms`` (a circuit breaker) so a dead Redis costs nothing.
* ``none``: no lookups.

``push_snapshot`` writes a snapshot into Redis in that layout (``python -m service.feature_store``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from service.logs import RateLimitedLogger
from service.metrics import Metrics
from service.settings import FeatureStoreSettings, RedisSettings

log = logging.getLogger("mtrank.service.feature_store")

Row = Mapping[str, Any]  # feature name -> raw value
EMPTY: Row = MappingProxyType({})  # shared read-only empty row


@dataclass
class StoreResult:
    user: Row = field(default_factory=lambda: EMPTY)
    items: Sequence[Row] = ()  # one row per candidate, aligned with the request (EMPTY when absent); () when none has one
    degraded: bool = False  # the store failed; only request features + defaults were used


class FeatureStore(Protocol):
    backend: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def fetch(self, user_id: str | None, item_ids: Sequence[str], need_user: bool, need_items: bool) -> StoreResult:
        ...


# ------------------------------------------------------------------------------------ snapshots


def _clean(row: Mapping[str, Any], key_column: str) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if k == key_column or v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        if hasattr(v, "tolist"):  # numpy arrays / scalars (list cells of a Parquet file)
            v = v.tolist()
        out[k] = v
    return out


def read_snapshot(path: str | Path, key_column: str) -> dict[str, dict[str, Any]]:
    """A Parquet/CSV file -> {key: {column: value}} (last row wins, null cells dropped). pyarrow, no pandas."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    path = Path(path)
    table = pq.read_table(path) if path.suffix in (".parquet", ".pq") else pa_csv.read_csv(path)
    if key_column not in table.column_names:
        raise ValueError(f"{path}: no key column {key_column!r} (columns: {table.column_names})")
    return {str(r[key_column]): _clean(r, key_column) for r in table.to_pylist()}


class EmbeddedFeatureStore:
    backend = "embedded"

    def __init__(self, metrics: Metrics, users: dict[str, Row] | None = None, items: dict[str, Row] | None = None):
        self.metrics = metrics
        self.users: dict[str, Row] = dict(users or {})
        self.items: dict[str, Row] = dict(items or {})

    @classmethod
    def from_settings(cls, s: FeatureStoreSettings, metrics: Metrics) -> EmbeddedFeatureStore:
        users: dict[str, Row] = {}
        items: dict[str, Row] = {}
        if s.snapshot:
            users.update(read_snapshot(s.snapshot, s.user_key_column))
            items.update(read_snapshot(s.snapshot, s.item_key_column))
        if s.user_snapshot:
            users.update(read_snapshot(s.user_snapshot, s.user_key_column))
        if s.item_snapshot:
            items.update(read_snapshot(s.item_snapshot, s.item_key_column))
        log.info("embedded feature store: %d users, %d items", len(users), len(items))
        return cls(metrics, users, items)

    def put_user(self, user_id: str, row: Row) -> None:
        self.users[user_id] = dict(row)

    def put_item(self, item_id: str, row: Row) -> None:
        self.items[item_id] = dict(row)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def fetch(self, user_id: str | None, item_ids: Sequence[str], need_user: bool, need_items: bool) -> StoreResult:
        user = EMPTY
        if need_user and user_id is not None:
            user = self.users.get(user_id, EMPTY)
            (self.metrics.fs_hits if user is not EMPTY else self.metrics.fs_misses).labels("user").inc()
        items: Sequence[Row] = ()
        if need_items and item_ids:
            hits = 0
            if self.items:  # no item rows at all (none loaded): no lookups
                get = self.items.get
                rows = [get(i, EMPTY) for i in item_ids]  # [n]
                hits = len(rows) - rows.count(EMPTY)  # list.count tries identity first: cheap
            if hits:
                self.metrics.fs_hits.labels("item").inc(hits)
                items = rows
            if len(item_ids) - hits:
                self.metrics.fs_misses.labels("item").inc(len(item_ids) - hits)
        return StoreResult(user, items)


class NullFeatureStore:
    backend = "none"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def fetch(self, user_id: str | None, item_ids: Sequence[str], need_user: bool, need_items: bool) -> StoreResult:
        return StoreResult()


# ----------------------------------------------------------------------------------------- redis


class TTLCache:
    """A bounded LRU whose entries expire after ``ttl_s`` (monotonic clock). Event-loop only."""

    MISSING = object()

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0

    def get(self, key: str, now: float) -> Any:
        hit = self._data.get(key)
        if hit is None:
            return self.MISSING
        if hit[0] < now:
            del self._data[key]
            return self.MISSING
        return hit[1]

    def put_many(self, pairs: Iterable[tuple[str, Any]], now: float) -> None:
        expires = now + self.ttl_s
        data = self._data
        for k, v in pairs:
            data[k] = (expires, v)
            data.move_to_end(k)
        while len(data) > self.max_entries:
            data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


def user_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:user:{user_id}"


def item_key(prefix: str, item_id: str) -> str:
    return f"{prefix}:item:{item_id}"


def _parse_row(raw: bytes | str | None) -> Row | None:
    if raw is None:
        return None
    try:
        row = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


@dataclass
class _Circuit:
    down_until: float = 0.0
    failures: int = field(default=0)


class RedisFeatureStore:
    backend = "redis"

    def __init__(self, s: RedisSettings, metrics: Metrics, log_interval_s: float = 10.0) -> None:
        self.s = s
        self.metrics = metrics
        self.cache = TTLCache(s.cache_ttl_s, s.cache_max_entries)
        self.client: Any = None
        self.circuit = _Circuit()
        self.ratelog = RateLimitedLogger(log, log_interval_s)

    async def start(self) -> None:
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.client = aioredis.Redis.from_url(
            self.s.url, socket_timeout=self.s.socket_timeout_ms / 1000.0,
            socket_connect_timeout=self.s.connect_timeout_ms / 1000.0, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False, max_connections=self.s.max_connections, health_check_interval=0)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def _fail(self, reason: str, err: BaseException | None) -> None:
        self.circuit.down_until = time.monotonic() + self.s.retry_after_ms / 1000.0
        self.circuit.failures += 1
        if reason == "timeout":
            self.metrics.fs_timeouts.labels("redis").inc()
        self.metrics.fs_errors.labels("redis", reason).inc()
        self.ratelog.warning(f"redis-{reason}", "feature store (redis %s): %s; serving request features + defaults",
                             self.s.url, reason if err is None else f"{reason}: {type(err).__name__}: {err}")

    async def fetch(self, user_id: str | None, item_ids: Sequence[str], need_user: bool, need_items: bool) -> StoreResult:
        p = self.s.key_prefix
        ukey = user_key(p, user_id) if need_user and user_id is not None else None
        ikeys = [item_key(p, i) for i in item_ids] if need_items else []
        keys = ([ukey] if ukey else []) + ikeys
        if not keys:
            return StoreResult()
        now = time.monotonic()
        found: dict[str, Row | None] = {}
        if self.cache.enabled:
            get, miss = self.cache.get, self.cache.MISSING
            cached = [(k, get(k, now)) for k in keys]
            found = {k: v for k, v in cached if v is not miss}
            todo = [k for k, v in cached if v is miss]
            if found:
                user_cached = int(ukey is not None and ukey in found)
                if user_cached:
                    self.metrics.fs_cache_hits.labels("user").inc()
                if len(found) - user_cached:
                    self.metrics.fs_cache_hits.labels("item").inc(len(found) - user_cached)
        else:
            todo = keys
        degraded = False
        if todo:
            if self.client is None or now < self.circuit.down_until:
                self.metrics.fs_errors.labels("redis", "circuit_open").inc()
                degraded = True
            else:
                try:
                    async with asyncio.timeout(self.s.budget_s):
                        raw = await self.client.mget(todo)  # ONE round trip: user key + item keys
                except TimeoutError as err:
                    self._fail("timeout", err)
                    degraded = True
                except Exception as err:  # noqa: BLE001 - any Redis/OS failure degrades, never a 500
                    import redis

                    self._fail("timeout" if isinstance(err, redis.TimeoutError) else "error", err)
                    degraded = True
                else:
                    fetched = {k: _parse_row(v) for k, v in zip(todo, raw)}
                    found.update(fetched)
                    if self.cache.enabled:
                        self.cache.put_many(fetched.items(), now)
        user: Row = EMPTY
        if ukey is not None and ukey in found:
            user = found[ukey] or EMPTY
            if not degraded:
                (self.metrics.fs_hits if user is not EMPTY else self.metrics.fs_misses).labels("user").inc()
        items: Sequence[Row] = ()
        if ikeys and found:
            rows = [found.get(k) for k in ikeys]  # [n] row or None
            hits = len(rows) - rows.count(None)
            if hits:
                items = [r or EMPTY for r in rows]
            if not degraded:
                if hits:
                    self.metrics.fs_hits.labels("item").inc(hits)
                if len(rows) - hits:
                    self.metrics.fs_misses.labels("item").inc(len(rows) - hits)
        return StoreResult(user, items, degraded)


def build_feature_store(s: FeatureStoreSettings, metrics: Metrics) -> FeatureStore:
    if s.backend == "redis":
        return RedisFeatureStore(s.redis, metrics, s.log_interval_s)
    if s.backend == "none":
        return NullFeatureStore()
    return EmbeddedFeatureStore.from_settings(s, metrics)


# ----------------------------------------------------------------------------------- loader


def push_rows(redis_url: str, side: str, rows: Mapping[str, Row], prefix: str = "mtrank",
              ttl_s: int | None = None, batch: int = 1000) -> int:
    """Write {id: {feature: value}} as ``<prefix>:<side>:<id>`` JSON strings; returns rows written."""
    import redis

    if side not in ("user", "item"):
        raise ValueError("side: 'user' or 'item'")
    client = redis.Redis.from_url(redis_url)
    keyf = user_key if side == "user" else item_key
    items = list(rows.items())
    try:
        for start in range(0, len(items), batch):
            pipe = client.pipeline(transaction=False)
            for k, row in items[start : start + batch]:
                pipe.set(keyf(prefix, str(k)), json.dumps(_clean(row, ""), allow_nan=False), ex=ttl_s)
            pipe.execute()
    finally:
        client.close()
    return len(items)


def push_snapshot(redis_url: str, path: str | Path, side: str, key_column: str | None = None, prefix: str = "mtrank",
                  ttl_s: int | None = None) -> int:
    """Load a Parquet/CSV snapshot keyed by ``key_column`` (default ``<side>_id``) into Redis."""
    return push_rows(redis_url, side, read_snapshot(path, key_column or f"{side}_id"), prefix, ttl_s)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m service.feature_store",
                                description="push a Parquet/CSV snapshot into Redis (mtrank key layout)")
    p.add_argument("path")
    p.add_argument("--side", choices=["user", "item"], required=True)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--key-column", help="default: <side>_id")
    p.add_argument("--prefix", default="mtrank")
    p.add_argument("--ttl", type=int, help="key expiry in seconds")
    args = p.parse_args(argv)
    n = push_snapshot(args.redis, args.path, args.side, args.key_column, args.prefix, args.ttl)
    print(f"pushed {n} {args.side} rows to {args.redis}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
