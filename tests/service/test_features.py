"""Feature precedence (request > store > default) through scores, Redis degradation, experiment arms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from mtrank.bundle import read_manifest
from service.feature_store import push_rows
from tests.service.conftest import rank_body
from tests.service.test_api import metric, pick


def raw_scores(c: httpx.Client, body: dict[str, Any]) -> dict[str, dict[str, float]]:
    r = c.post("/rank", json={**body, "raw_scores": True})
    assert r.status_code == 200, r.text
    return {it["item_id"]: it["task_scores"] for it in r.json()["items"]}


def assert_same(a: dict, b: dict, same: bool = True) -> None:
    diffs = [abs(a[i][t] - b[i][t]) for i in a for t in a[i]]
    if same:
        assert max(diffs) < 1e-6, diffs
    else:
        assert max(diffs) > 1e-5, diffs


@pytest.fixture
def bundle(tmp_path: Path, make_bundle) -> tuple[Path, Any]:
    bundles = tmp_path / "bundles"
    b = make_bundle(bundles)
    return bundles, read_manifest(b)


def _features(manifest: Any) -> tuple[str, str, str]:
    """(numeric item feature, numeric user feature, categorical user feature) of the bundle."""
    return (pick(manifest, ("item",), "numeric"), pick(manifest, ("user",), "numeric"),
            pick(manifest, ("user",), "categorical"))


def test_precedence_embedded_store(tmp_path: Path, bundle, start_server) -> None:
    bundles, manifest = bundle
    num_item, num_user, cat_user = _features(manifest)
    store_item, store_user = {num_item: 987.0}, {num_user: 55.0, cat_user: "store-value"}
    snap = pd.DataFrame([{"user_id": "u1", "item_id": "i0", **store_item, **store_user}])
    snap.to_parquet(tmp_path / "snap.parquet")
    with_store = start_server(bundles, feature_store={"snapshot": str(tmp_path / "snap.parquet")})
    no_store = start_server(bundles, feature_store={"backend": "none"})
    bare = {"user_id": "u1", "candidates": [{"item_id": "i0"}]}
    explicit = {"user_id": "u1", "context": store_user, "candidates": [{"item_id": "i0", "features": store_item}]}
    override = {"user_id": "u1", "context": {num_user: 1.0, cat_user: "req"},
                "candidates": [{"item_id": "i0", "features": {num_item: 1.0}}]}
    with with_store.client() as s, no_store.client() as n:
        assert_same(raw_scores(s, bare), raw_scores(n, bare), same=False)  # store value != default
        assert_same(raw_scores(s, bare), raw_scores(n, explicit))  # the store supplies exactly its values
        assert_same(raw_scores(s, override), raw_scores(n, override))  # request beats store
        # only the item row, only the user row: each side is filled independently
        only_item = {"user_id": "u1", "context": {num_user: 1.0, cat_user: "req"}, "candidates": [{"item_id": "i0"}]}
        assert_same(raw_scores(s, only_item), raw_scores(n, {**only_item, "candidates": [
            {"item_id": "i0", "features": store_item}]}))
        text = s.get("/metrics").text
        assert metric(text, "mtrank_feature_store_hits_total", side="item") >= 3
        assert metric(text, "mtrank_feature_store_hits_total", side="user") >= 3
        s.post("/rank", json={"user_id": "nobody", "candidates": [{"item_id": "zz"}]})
        text = s.get("/metrics").text
        assert metric(text, "mtrank_feature_store_misses_total", side="item") >= 1
        assert metric(text, "mtrank_feature_store_misses_total", side="user") >= 1


def test_redis_store_precedence_and_outage(bundle, start_server, redis_server) -> None:
    bundles, manifest = bundle
    num_item, num_user, cat_user = _features(manifest)
    srv = start_server(bundles, feature_store={"backend": "redis", "redis": {
        "url": redis_server.url, "cache_ttl_s": 0.0, "socket_timeout_ms": 50, "retry_after_ms": 0}})
    body = {"user_id": "u1", "candidates": [{"item_id": "i0"}, {"item_id": "i1"}]}
    with srv.client() as c:
        defaults = raw_scores(c, body)  # nothing in Redis yet: defaults
        push_rows(redis_server.url, "user", {"u1": {num_user: 55.0, cat_user: "store-value"}})
        push_rows(redis_server.url, "item", {"i0": {num_item: 987.0}})
        stored = raw_scores(c, body)
        assert_same({"i0": stored["i0"]}, {"i0": defaults["i0"]}, same=False)
        explicit = {"user_id": "u1", "context": {num_user: 55.0, cat_user: "store-value"},
                    "candidates": [{"item_id": "i0", "features": {num_item: 987.0}}, {"item_id": "i1"}]}
        assert_same(raw_scores(c, explicit), stored)  # request values equal to the store's: same scores
        override = {**explicit, "candidates": [{"item_id": "i0", "features": {num_item: 1.0}}, {"item_id": "i1"}]}
        assert_same({"i0": raw_scores(c, override)["i0"]}, {"i0": stored["i0"]}, same=False)  # request wins

        errors_before = metric(c.get("/metrics").text, "mtrank_feature_store_errors_total")
        redis_server.kill()  # mid-test outage
        for _ in range(3):
            r = c.post("/rank", json={**body, "raw_scores": True})
            assert r.status_code == 200 and r.json()["degraded"] is True
        degraded = {it["item_id"]: it["task_scores"] for it in r.json()["items"]}
        assert_same(degraded, defaults)  # request features + defaults
        assert_same({"i0": raw_scores(c, override)["i0"]}, {"i0": raw_scores(c, override)["i0"]})
        text = c.get("/metrics").text
        assert metric(text, "mtrank_feature_store_errors_total") >= errors_before + 3
        assert metric(text, "mtrank_http_requests_total", status="500") == 0
        assert c.get("/readyz").status_code == 200


def test_experiment_arms(bundle, start_server) -> None:
    bundles, _ = bundle
    srv = start_server(bundles, fusion={"profiles": {"ctr_only": {"type": "weighted_sum", "weights": {"ctr": 1.0}}}},
                       experiments=[{"name": "ctr_arm", "profile": "ctr_only", "traffic": 0.5}])
    with srv.client() as c:
        arms = {}
        for k in range(40):
            body = rank_body(3, user_id=f"user-{k}")
            first = c.post("/rank", json=body).json()
            again = c.post("/rank", json=body).json()
            assert first["arm"] == again["arm"]  # stable per user
            arms[k] = first["arm"]
            if first["arm"] == "ctr_arm":
                assert first["fusion"] == "ctr_only"
                assert all(it["score"] == pytest.approx(it["task_scores"]["ctr"], rel=1e-6) for it in first["items"])
            else:
                assert first["arm"] == "default" and first["fusion"] == "default"
        assert set(arms.values()) == {"ctr_arm", "default"}
        named = c.post("/rank", json=rank_body(3, user_id="user-1", fusion="default")).json()
        assert named["arm"] is None and named["fusion"] == "default"
        # no user id: the request id keys the arm (request ids are single-use: each ranks once)
        from service.fusion import choose_arm

        for rid in ("req-7", "req-8", "req-9"):
            got = c.post("/rank", json={**rank_body(2, request_id=rid), "user_id": None}).json()["arm"]
            assert got == (choose_arm(rid, [("ctr_arm", 0.5)], "mtrank") or "default")
        text = c.get("/metrics").text
        assert metric(text, "mtrank_fusion_requests_total", profile="ctr_only", arm="ctr_arm") >= 2
