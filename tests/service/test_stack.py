"""``mtrank stack``: redis + replicas + prometheus on loopback, a shared join store and reload channel,
and nothing left running after it stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.stack import Stack, StackConfig
from tests.service.conftest import rank_body, require_binary, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.slow
def test_stack_replicas_share_feedback_and_reloads(tmp_path: Path, make_bundle) -> None:
    require_binary("redis-server")
    require_binary("prometheus")
    bundles = tmp_path / "bundles"
    v1 = make_bundle(bundles).name
    cfg = StackConfig(bundles=bundles, replicas=2, port=0, prometheus_port=0, scrape_interval="1s",
                      feature_store="redis", workdir=tmp_path / "stack")
    with Stack(cfg) as stack:
        a, b = stack.replica_urls
        with httpx.Client(base_url=a, timeout=10) as ca, httpx.Client(base_url=b, timeout=10) as cb:
            items = ca.post("/rank", json=rank_body(5, request_id="st-1")).json()["items"]
            ev = [{"request_id": "st-1", "item_id": items[0]["item_id"], "labels": {"ctr": 1}}]
            assert cb.post("/feedback", json={"events": ev}).json() == {"accepted": 1, "duplicates": 0, "joined": 1}
            v2 = make_bundle(bundles, activate=False).name
            auth = {"Authorization": f"Bearer {stack.admin_token}"}
            r = ca.post("/admin/reload", json={"version": v2, "broadcast": True}, headers=auth)
            assert r.status_code == 200 and r.json()["receivers"] >= 2, r.text
            for c in (ca, cb):  # the other replica follows over the reload channel
                wait_until(lambda c=c: c.get("/models").json()["active"] == v2, what=f"{v2} on every replica")
        def targets_up() -> bool:
            res = httpx.get(f"{stack.prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            return len(res) == 2 and all(t["health"] == "up" for t in res)

        wait_until(targets_up, 30, interval=0.5, what="prometheus scraping both replicas")
        urls = [*stack.replica_urls, stack.prometheus_url]
        pids = list(stack.pids().values())
    assert v1 != v2
    assert all(_refused(u) for u in urls)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_cli_stack_prints_urls_and_stops_everything_on_ctrl_c(tmp_path: Path, make_bundle) -> None:
    require_binary("redis-server")
    bundles = tmp_path / "bundles"
    make_bundle(bundles)
    proc = subprocess.Popen([sys.executable, "-m", "mtrank.cli", "stack", "--bundles", str(bundles), "--replicas", "1",
                             "--port", "0", "--no-prometheus", "--feature-store", "embedded"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    url = re.search(r"mtrank-1: (http://\S+)", "".join(lines))
    assert url, "".join(lines)
    assert httpx.post(f"{url[1]}/rank", json=rank_body(3), timeout=10).status_code == 200
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(lines) + out
    assert _refused(f"{url[1]}/healthz")
