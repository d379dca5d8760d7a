"""Shadow scoring: compared off the request path, never changing /rank, a failing shadow only counted."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.background import BoundedWorker
from service.shadow import topk_overlap
from tests.service.conftest import clone_bundle, rank_body, wait_until
from tests.service.test_api import metric

ADMIN = {"Authorization": "Bearer tok"}


def _served(tmp_path: Path, base_bundle: Path, start_server: Any, **shadow: Any) -> Any:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    clone_bundle(base_bundle, bundles, "prim", activate=True)
    clone_bundle(base_bundle, bundles, "shad")
    return start_server(bundles, admin={"token": "tok"}, shadow={"sample": 1.0, **shadow})


def _items(r: Any) -> list[tuple[str, float]]:
    assert r.status_code == 200, r.text
    return [(it["item_id"], it["score"]) for it in r.json()["items"]]


def test_shadow_of_the_same_model_agrees_and_never_changes_the_response(tmp_path: Path, base_bundle: Path,
                                                                         start_server: Any) -> None:
    srv = _served(tmp_path, base_bundle, start_server, version="shad", top_k=5)
    with srv.client() as c:
        assert c.get("/models").json()["shadow"]["version"] == "shad"
        bodies = [rank_body(12, request_id=f"s{k}", user_id=f"u{k}") for k in range(10)]
        with_shadow = [_items(c.post("/rank", json=b)) for b in bodies]
        wait_until(lambda: metric(c.get("/metrics").text, "mtrank_shadow_requests_total", result="scored") == 10,
                   what="10 shadow-scored requests")
        text = c.get("/metrics").text
        assert c.delete("/admin/shadow", headers=ADMIN).json() == {"shadow": None, "previous_shadow": "shad"}
        assert c.get("/models").json()["shadow"] is None
        without = [_items(c.post("/rank", json={**b, "request_id": f"{b['request_id']}-again"})) for b in bodies]
    assert with_shadow == without
    assert metric(text, "mtrank_shadow_rank_correlation_count") == 10
    assert metric(text, "mtrank_shadow_rank_correlation_bucket", le="0.99") == 0  # identical model: rho = 1
    assert metric(text, "mtrank_shadow_topk_overlap_sum") == pytest.approx(10.0)
    assert metric(text, "mtrank_shadow_candidates_total") == 120
    assert metric(text, "mtrank_shadow_score_abs_diff_total", task="ctr") == pytest.approx(0.0, abs=1e-9)
    assert metric(text, "mtrank_shadow_info", version="shad") == 1
    assert metric(text, "mtrank_shadow_requests_total", result="error") == 0


def test_a_failing_shadow_is_counted_never_an_error(tmp_path: Path, base_bundle: Path, start_server: Any) -> None:
    srv = _served(tmp_path, base_bundle, start_server)
    with srv.client() as c:
        assert c.put("/admin/shadow", json={"version": "nope"}, headers=ADMIN).status_code == 404
        assert c.put("/admin/shadow", json={"version": "shad"}, headers=ADMIN).json() == {
            "shadow": "shad", "previous_shadow": None}
        shadow = srv.services.registry.shadow

        class DeadSession:  # fault injection: an ONNX Runtime session that fails every run
            def run(self, *a: Any, **k: Any) -> Any:
                raise RuntimeError("onnxruntime: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

        shadow.session = DeadSession()
        body = rank_body(8)
        answers = [_items(c.post("/rank", json=body)) for _ in range(5)]
        wait_until(lambda: metric(c.get("/metrics").text, "mtrank_shadow_requests_total", result="error") == 5,
                   what="5 shadow errors")
        assert srv.services.registry.current.version == "prim"
    assert all(a == answers[0] for a in answers)


def test_shadow_needs_the_admin_token(tmp_path: Path, base_bundle: Path, start_server: Any) -> None:
    srv = _served(tmp_path, base_bundle, start_server)
    with srv.client() as c:
        assert c.put("/admin/shadow", json={"version": "shad"}).status_code == 401  # no credentials (RFC 6750)
        assert c.put("/admin/shadow", json={"version": "shad"}, headers={"Authorization": "Bearer bad"}).status_code == 403
        assert c.get("/models").json()["shadow"] is None


def test_bounded_worker_drops_when_full() -> None:
    gate, dropped, ran = threading.Event(), [], []
    worker = BoundedWorker("test", 2, on_drop=lambda: dropped.append(1))
    worker.submit(gate.wait)  # occupies the thread
    wait_until(lambda: worker.pending() == 0, what="the first job to start")
    results = [worker.submit(ran.append, k) for k in range(5)]
    assert results == [True, True, False, False, False] and len(dropped) == 3
    gate.set()
    worker.join()
    assert ran == [0, 1]
    worker.stop()


def test_topk_overlap() -> None:
    a = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert topk_overlap(a, a, 3) == 1.0
    assert topk_overlap(a, -a, 2) == 0.0
    assert topk_overlap(a, np.array([5.0, 1.0, 3.0, 2.0, 4.0]), 2) == 0.5
    assert topk_overlap(a, a, 10) == 1.0  # k clipped to n
