"""A real Prometheus scraping the real service (2 workers) while ranking traffic and feedback flow.

Every PromQL expression of the Grafana dashboard and the left-hand side of every alert rule is then
evaluated through Prometheus' HTTP API and must return at least one series without error, so a
metric renamed in code but not in the dashboard (or the rules) fails here. The rules are loaded by
the server too, and each must evaluate without error. The service runs as ``mtrank serve --workers 2``
with Redis as feature store, reload channel and join store, and a shadow model; the test also checks
that the window statistics (``GET /routing``) and the feedback join cover both workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.promql import ALERTS, alert_lhs, alert_rules, dashboard_exprs
from tests.service.conftest import clone_bundle, free_port, rank_body, require_binary, wait_until
from tests.service.test_api import metric

ROOT = Path(__file__).resolve().parents[2]


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return (out or b"").decode(errors="replace")


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _query(prom: str, expr: str) -> dict[str, Any]:
    return httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()


@pytest.mark.slow
def test_dashboard_and_alert_queries_return_series_from_a_real_prometheus(tmp_path: Path, make_bundle,
                                                                           redis_server) -> None:
    prometheus = require_binary("prometheus")
    from service.feature_store import push_rows

    bundles = tmp_path / "bundles"
    v1 = make_bundle(bundles)
    clone_bundle(v1, bundles, "shadow-v1")
    push_rows(redis_server.url, "item", {f"i{k}": {"item_category": f"c{k % 3}", "item_price": 5.0 + k} for k in range(3)})
    port = free_port()
    cfg = tmp_path / "service.yaml"
    cfg.write_text(json.dumps({
        "workers": 2, "admin": {"token": "tok"},
        "onnx": {"executor_threads": 1, "warmup_candidates": [1, 8], "warmup_rounds": 1},
        "feature_store": {"backend": "redis", "redis": {"url": redis_server.url}},
        "reload": {"poll_interval_ms": 200},
        "fusion": {"profiles": {"ctr_only": {"type": "weighted_sum", "weights": {"ctr": 1.0}}}},
        "experiments": [{"name": "treatment", "profile": "ctr_only", "traffic": 0.5}],
        "monitoring": {"interval_s": 1.0, "min_candidates": 50, "min_labels": 5},
        "shadow": {"version": "shadow-v1", "sample": 1.0},
    }))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "mp"), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "mtrank.cli", "serve", "--bundles", str(bundles), "--port",
                               str(port), "--config", str(cfg)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    pport = free_port()
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "mtrank", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }))
    prom = subprocess.Popen([prometheus, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url, purl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{pport}"
    try:
        wait_until(lambda: _up(f"{url}/readyz"), 90, interval=0.2, what="the 2-worker service")
        wait_until(lambda: _up(f"{purl}/-/ready"), 60, interval=0.2, what="prometheus")
        sent, candidates, events = 0, 0, 0
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:  # fresh connections spread the requests over both workers
            with httpx.Client(base_url=url, timeout=10) as c:
                n = 10 + sent % 7
                r = c.post("/rank", json=rank_body(n, request_id=f"p{sent}", user_id=f"u{sent}"))
                assert r.status_code == 200, r.text
                sent, candidates = sent + 1, candidates + n
                items = r.json()["items"]
            with httpx.Client(base_url=url, timeout=10) as c:  # feedback on a new connection: often the other worker
                ev = [{"request_id": f"p{sent - 1}", "item_id": it["item_id"], "labels": {"ctr": k % 2, "like": 0}}
                      for k, it in enumerate(items[:3])]
                assert c.post("/feedback", json={"events": ev}).json()["joined"] == len(ev)
                events += len(ev)
        with httpx.Client(base_url=url, timeout=10) as c:
            doc = c.get("/routing").json()
            text = c.get("/metrics").text
        assert max(g["candidates"] for g in doc["gates"]) == candidates  # the window covers both workers
        assert metric(text, "mtrank_feedback_events_total", result="joined") == events
        assert metric(text, "mtrank_rank_candidates_count") == sent
        assert len(list((tmp_path / "mp").glob("counter_*.db"))) >= 2, "traffic reached one worker only"
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
    finally:
        prom_out = _stop(prom)
        out = _stop(server)
    assert server.returncode == 0, out[-3000:]
    assert prom.returncode == 0, prom_out[-3000:]
