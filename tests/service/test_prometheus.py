"""A real Prometheus scraping the real service (2 workers) while ranking traffic and feedback flow.

Every PromQL expression of the Grafana dashboard and the left-hand side of every alert rule is then
evaluated through Prometheus' HTTP API and must return at least one series without error, so a
metric renamed in code but not in the dashboard (or the rules) fails here. The rules are loaded by
the server too, and each must evaluate without error. Everything runs as ``mtrank stack`` runs it
(``service.stack``): one replica of ``mtrank serve --workers 2`` with Redis as feature store, reload
channel and join store, a shadow model, and Prometheus with the repository's config and alert rules;
the test also checks that the window statistics (``GET /routing``) and the feedback join cover both
workers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.stack import Stack, StackConfig
from tests.promql import alert_lhs, alert_rules, dashboard_exprs
from tests.service.conftest import clone_bundle, rank_body, require_binary, wait_until
from tests.service.test_api import metric


def _query(prom: str, expr: str) -> dict[str, Any]:
    return httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()


@pytest.mark.slow
def test_dashboard_and_alert_queries_return_series_from_a_real_prometheus(tmp_path: Path, make_bundle) -> None:
    require_binary("prometheus")
    require_binary("redis-server")
    bundles = tmp_path / "bundles"
    v1 = make_bundle(bundles)
    clone_bundle(v1, bundles, "shadow-v1")
    items = tmp_path / "items.csv"
    items.write_text("user_id,item_id,item_category,item_price\n" + "".join(f"u{k},i{k},c{k % 3},{5 + k}\n" for k in range(3)))
    extra = tmp_path / "extra.yaml"
    extra.write_text(json.dumps({
        "onnx": {"executor_threads": 1, "warmup_candidates": [1, 8], "warmup_rounds": 1},
        "reload": {"poll_interval_ms": 200},
        "fusion": {"profiles": {"ctr_only": {"type": "weighted_sum", "weights": {"ctr": 1.0}}}},
        "experiments": [{"name": "treatment", "profile": "ctr_only", "traffic": 0.5}],
        "monitoring": {"interval_s": 1.0, "min_candidates": 50, "min_labels": 5},
        "shadow": {"version": "shadow-v1", "sample": 1.0},
        "feedback": {"log": {"kind": "redis"}},
    }))
    cfg = StackConfig(bundles=bundles, replicas=1, workers=2, feature_store="redis", snapshot=items, port=0,
                      prometheus_port=0, scrape_interval="1s", config=extra, workdir=tmp_path / "stack")
    with Stack(cfg) as stack:
        url, purl = stack.replica_urls[0], stack.prometheus_url
        assert purl is not None
        sent, candidates, events = 0, 0, 0
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:  # fresh connections spread the requests over both workers
            with httpx.Client(base_url=url, timeout=10) as c:
                n = 10 + sent % 7
                r = c.post("/rank", json=rank_body(n, request_id=f"p{sent}", user_id=f"u{sent}"))
                assert r.status_code == 200, r.text
                sent, candidates = sent + 1, candidates + n
                ranked = r.json()["items"]
            with httpx.Client(base_url=url, timeout=10) as c:  # feedback on a new connection: often the other worker
                ev = [{"request_id": f"p{sent - 1}", "item_id": it["item_id"], "labels": {"ctr": k % 2, "like": 0}}
                      for k, it in enumerate(ranked[:3])]
                assert c.post("/feedback", json={"events": ev}).json()["joined"] == len(ev)
                events += len(ev)
        with httpx.Client(base_url=url, timeout=10) as c:
            # the window covers both workers (each flushes its statistics within monitoring.flush_interval_s)
            wait_until(lambda: max(g["candidates"] for g in c.get("/routing").json()["gates"]) == candidates, 10,
                       interval=0.2, what=f"{candidates} candidates in the window")
            text = c.get("/metrics").text
        assert metric(text, "mtrank_feedback_events_total", result="joined") == events
        assert metric(text, "mtrank_feedback_log_records_total", sink="redis") == 2 * events  # ctr and like labels
        assert metric(text, "mtrank_rank_candidates_count") == sent
        assert metric(text, "mtrank_feature_store_hits_total", side="item") > 0  # the snapshot's rows, from Redis
        assert len(list((stack.workdir / "prometheus-multiproc-0").glob("counter_*.db"))) >= 2, "one worker only"
        time.sleep(4.0)  # a few more scrapes and rule evaluations after the traffic

        exprs = [("dashboard", e) for e in dashboard_exprs()]
        exprs += [(f"alert {r['name']}", alert_lhs(r["expr"])) for r in alert_rules()]
        assert len(exprs) > 30
        failures = []
        for where, expr in exprs:
            res = _query(purl, expr)
            if res.get("status") != "success":
                failures.append(f"{where}: {expr}\n  error: {res.get('error')}")
            elif not res["data"]["result"]:
                failures.append(f"{where}: {expr}\n  no series")
        assert not failures, f"{len(failures)} of {len(exprs)} queries failed:\n" + "\n".join(failures)

        rules = httpx.get(f"{purl}/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = {r["name"]: r for g in rules for r in g["rules"] if r["type"] == "alerting"}
        assert set(loaded) == {r["name"] for r in alert_rules()}
        assert all(r["health"] == "ok" for r in loaded.values()), {n: r.get("lastError") for n, r in loaded.items()}
