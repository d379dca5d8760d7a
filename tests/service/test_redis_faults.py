"""Redis killed, paused (SIGSTOP: slow, not down) and restarted under closed-loop /rank load.

The service uses Redis for everything it can (feature store, reload channel, prediction log and
feedback join). Through every fault: no /rank answer other than 200; ``degraded: true`` while Redis
is unusable; recovery (``degraded: false`` again) within the feature store's breaker window after
Redis is back; the failures visible in the metrics; the reload channel reconnects.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.feature_store import push_rows
from tests.service.conftest import rank_body, wait_until
from tests.service.test_api import metric

ITEMS = {f"i{k}": {"item_category": f"c{k % 3}", "item_price": 5.0 + k} for k in range(8)}


class Load(threading.Thread):
    """Closed-loop /rank on one keep-alive connection; records (time, status, degraded, seconds)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.records: list[tuple[float, int, bool | None, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            k = 0
            while not self.halt.is_set():
                k += 1
                t0 = time.monotonic()
                r = c.post("/rank", json=rank_body(8, request_id=f"f{k}"))
                degraded = r.json().get("degraded") if r.status_code == 200 else None
                self.records.append((t0, r.status_code, degraded, time.monotonic() - t0))

    def since(self, t: float) -> list[tuple[float, int, bool | None, float]]:
        return [r for r in self.records if r[0] >= t]


@pytest.mark.slow
def test_rank_survives_redis_killed_paused_and_restarted(tmp_path: Path, make_bundle, start_server: Any,
                                                           redis_server: Any) -> None:
    make_bundle(tmp_path)
    push_rows(redis_server.url, "item", ITEMS)
    breaker_s = 0.5
    srv = start_server(tmp_path, feature_store={"backend": "redis", "redis": {
                           "url": redis_server.url, "cache_ttl_s": 0, "retry_after_ms": breaker_s * 1000}},
                       reload={"pubsub_channel": "mtrank:reload", "poll_interval_ms": 50},
                       feedback={"backend": "redis", "retry_after_ms": breaker_s * 1000})
    wait_until(lambda: srv.services.registry.pubsub_connected, 10, what="reload channel subscribed")
    load = Load(srv.url)
    load.start()
    try:
        wait_until(lambda: len(load.records) > 20, what="first responses")
        assert not any(r[2] for r in load.records), "degraded before any fault"

        def recovered(after: float) -> bool:
            recent = load.since(after)
            return bool(recent) and recent[-1][2] is False

        # 1. killed: degraded, never an error; back within the breaker window once Redis is up again
        t_kill = time.monotonic()
        redis_server.kill()
        wait_until(lambda: any(r[2] for r in load.since(t_kill)), 5, what="degraded answers after the kill")
        time.sleep(1.0)
        redis_server.start()
        push_rows(redis_server.url, "item", ITEMS)  # no persistence: the rows are reloaded, as a loader job would
        t_up = time.monotonic()
        wait_until(lambda: recovered(t_up), breaker_s + 3, interval=0.05, what="recovery after the restart")
        recovery_s = next(r[0] for r in load.since(t_up) if r[2] is False) - t_up
        wait_until(lambda: srv.services.registry.pubsub_connected, 10, what="reload channel resubscribed")

        # 2. paused (SIGSTOP): slow, not down; answers stay bounded by the lookup budget
        t_stop = time.monotonic()
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: sum(1 for r in load.since(t_stop) if r[2]) >= 5, 10, what="degraded while paused")
            time.sleep(1.0)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        t_cont = time.monotonic()
        wait_until(lambda: recovered(t_cont), breaker_s + 3, interval=0.05, what="recovery after SIGCONT")
        paused = [r for r in load.records if t_stop <= r[0] < t_cont]
        time.sleep(0.5)
    finally:
        load.halt.set()
        load.join(10)
    statuses = {r[1] for r in load.records}
    assert statuses == {200}, f"non-200 answers: {statuses}"
    assert recovery_s < breaker_s + 1.0
    # while paused: a lookup waits at most the budget (2 x 20 ms socket timeout); the prediction-log write
    # at most its 50 ms socket timeout, then both breakers skip Redis
    assert max(r[3] for r in paused) < 1.0, max(r[3] for r in paused)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        text = c.get("/metrics").text
        assert c.get("/models").json()["active"] is not None
    assert metric(text, "mtrank_feature_store_errors_total", backend="redis", reason="error") > 0
    assert metric(text, "mtrank_feature_store_errors_total", backend="redis", reason="timeout") > 0
    assert metric(text, "mtrank_feature_store_errors_total", backend="redis", reason="circuit_open") > 0
    assert metric(text, "mtrank_join_store_errors_total", backend="redis", op="put") > 0
    assert metric(text, "mtrank_http_requests_total", route="/rank", status="200") == len(load.records)
