"""Hot reload: under load, broken bundles, rollback, fusion validation at start/reload, pub/sub."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from mtrank.bundle import write_current
from tests.service.conftest import clone_bundle, rank_body, wait_until
from tests.service.test_api import metric

ADMIN = {"Authorization": "Bearer tok"}


def active(c: httpx.Client) -> str | None:
    return c.get("/models").json()["active"]


def test_hot_reload_under_load(tmp_path: Path, make_bundle, start_server) -> None:
    v1 = make_bundle(tmp_path).name
    srv = start_server(tmp_path, admin={"token": "tok"})
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with srv.client() as c:
            k = 0
            while not stop.is_set():
                k += 1
                r = c.post("/rank", json=rank_body(20 + k % 7))
                results.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))

    worker = threading.Thread(target=load)
    worker.start()
    made = [v1]
    try:
        with srv.client() as c:
            wait_until(lambda: len(results) > 20, what="first responses")
            v2 = make_bundle(tmp_path).name  # CURRENT -> v2 (poll)
            made.append(v2)
            wait_until(lambda: active(c) == v2, what=f"{v2} via CURRENT")
            assert c.post("/admin/reload", json={"version": v1}, headers=ADMIN).json()["status"] == "loaded"
            assert active(c) == v1
            v3 = make_bundle(tmp_path).name  # CURRENT -> v3 (poll)
            made.append(v3)
            wait_until(lambda: active(c) == v3, what=f"{v3} via CURRENT")
            r = c.post("/admin/reload", json={"version": v2}, headers=ADMIN)  # v2 no longer loaded: from disk
            assert r.json() == {"status": "loaded", "active": v2, "previous": v3, "receivers": None}
            write_current(tmp_path, v1)
            wait_until(lambda: active(c) == v1, what=f"{v1} via CURRENT again")
            assert c.post("/admin/reload", headers=ADMIN).json()["status"] == "unchanged"  # follow CURRENT = v1
            n = len(results)
            wait_until(lambda: len(results) > n + 20, what="responses after the last swap")
            models = c.get("/models").json()
            assert models["loaded"] == [v1, v2]  # current + previous only
    finally:
        stop.set()
        worker.join(10)
    statuses = {s for s, _ in results}
    assert statuses == {200}, [r for r in results if r[0] != 200][:3]
    seen = {v for _, v in results}
    assert seen <= set(made), seen
    assert len(seen) >= 2 and len(results) > 60


def _corrupt_model(bundle: Path) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))


def _bad_golden(bundle: Path) -> None:
    golden = json.loads((bundle / "golden.json").read_text())
    name = next(iter(golden["outputs"]))
    golden["outputs"][name] = [v + 0.5 for v in golden["outputs"][name]]
    raw = json.dumps(golden).encode()
    (bundle / "golden.json").write_bytes(raw)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["golden.json"] = hashlib.sha256(raw).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _bad_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").write_text("{not json")


@pytest.mark.parametrize("breaker, message", [(_corrupt_model, "sha256 mismatch"), (_bad_golden, "golden"),
                                              (_bad_manifest, "not valid JSON")])
def test_broken_bundle_rejected_old_keeps_serving(tmp_path: Path, make_bundle, start_server, breaker,
                                                  message: str) -> None:
    good = make_bundle(tmp_path)
    srv = start_server(tmp_path, admin={"token": "tok"})
    broken = clone_bundle(good, tmp_path, "broken-1")
    breaker(broken)
    with srv.client() as c:
        write_current(tmp_path, "broken-1")
        wait_until(lambda: c.get("/models").json()["last_error"] is not None, what="rejection")
        models = c.get("/models").json()
        assert models["active"] == good.name and models["current_pointer"] == "broken-1"
        assert models["last_error"]["version"] == "broken-1" and message in models["last_error"]["error"]
        r = c.post("/rank", json=rank_body(3))
        assert r.status_code == 200 and r.json()["model_version"] == good.name
        assert c.get("/readyz").status_code == 200
        r = c.post("/admin/reload", json={"version": "broken-1"}, headers=ADMIN)
        assert r.status_code == 409 and message in r.json()["detail"]
        text = c.get("/metrics").text
        assert metric(text, "mtrank_model_reloads_total", result="failure", trigger="poll") == 1
        assert metric(text, "mtrank_model_reloads_total", result="failure", trigger="admin") == 1
        assert metric(text, "mtrank_model_info", version=good.name) == 1


def test_rollback(tmp_path: Path, make_bundle, start_server) -> None:
    v1 = make_bundle(tmp_path).name
    srv = start_server(tmp_path, admin={"token": "tok"})
    with srv.client() as c:
        v2 = make_bundle(tmp_path).name
        wait_until(lambda: active(c) == v2, what="v2")
        r = c.post("/admin/rollback", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"status": "rolled_back", "active": v1, "previous": v2,
                                                     "receivers": None}
        assert c.post("/rank", json=rank_body(2)).json()["model_version"] == v1
        models = c.get("/models").json()
        assert models["active"] == v1 and models["previous"] == v2 and models["current_pointer"] == v2
        time.sleep(0.3)  # the unchanged pointer is not re-applied: the rollback sticks
        assert active(c) == v1
        assert c.post("/admin/rollback", headers=ADMIN).json()["active"] == v2  # and back again
        text = c.get("/metrics").text
        assert metric(text, "mtrank_model_reloads_total", result="success", trigger="rollback") == 2
        assert metric(text, "mtrank_model_info", version=v2) == 1 and metric(text, "mtrank_model_info", version=v1) == 0


PROFILES = {"fusion": {"profiles": {"eng": {"type": "expression", "expression": "ctr + like"}}}}


def _rename_task(bundle: Path, old: str, new: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    for t in manifest["tasks"]:
        if t["name"] == old:
            t["name"] = new
    manifest["calibration"] = {(new if k == old else k): v for k, v in manifest["calibration"].items()}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_fusion_profile_typo_fails_at_start(tmp_path: Path, make_bundle, start_server, caplog) -> None:
    make_bundle(tmp_path)
    with pytest.raises(RuntimeError, match="failed to start"):
        start_server(tmp_path, fusion={"profiles": {"eng": {"type": "weighted_sum", "weights": {"ctrr": 1.0}}}})
    assert "profile 'eng': unknown task name(s) ['ctrr']" in caplog.text


def test_bundle_not_fitting_the_profiles_is_rejected_on_reload(tmp_path: Path, make_bundle, start_server) -> None:
    good = make_bundle(tmp_path)
    srv = start_server(tmp_path, **PROFILES)
    other = clone_bundle(good, tmp_path, "renamed-1")
    _rename_task(other, "like", "likes")  # still a valid bundle, but profile "eng" reads "like"
    with srv.client() as c:
        write_current(tmp_path, "renamed-1")
        wait_until(lambda: c.get("/models").json()["last_error"] is not None, what="rejection")
        err = c.get("/models").json()["last_error"]["error"]
        assert "profile 'eng'" in err and "'like'" in err
        assert active(c) == good.name
        assert c.post("/rank", json=rank_body(2, fusion="eng")).status_code == 200


def test_pubsub_reload_and_broadcast(tmp_path: Path, make_bundle, start_server, redis_server) -> None:
    v1 = make_bundle(tmp_path).name
    v2 = make_bundle(tmp_path, activate=False).name
    srv = start_server(tmp_path, admin={"token": "tok"},
                       reload={"poll_interval_ms": 0, "pubsub_channel": "mtrank:reload", "redis_url": redis_server.url})
    r = redis_server.client()
    with srv.client() as c:
        wait_until(lambda: srv.services.registry.pubsub_connected, what="subscription")
        assert r.publish("mtrank:reload", v2) == 1
        wait_until(lambda: active(c) == v2, what="pubsub reload")
        r.publish("mtrank:reload", "")  # empty: follow CURRENT
        wait_until(lambda: active(c) == v1, what="pubsub follow CURRENT")
        out = c.post("/admin/reload", json={"version": v2, "broadcast": True}, headers=ADMIN).json()
        assert out["active"] == v2 and out["receivers"] == 1
        text = c.get("/metrics").text
        assert metric(text, "mtrank_model_reloads_total", result="success", trigger="pubsub") >= 2


def test_dropped_model_is_freed_once_no_request_holds_it(tmp_path: Path, make_bundle) -> None:
    """Registry keeps current + previous; an older model lives exactly as long as a request holds it."""
    import gc
    import weakref

    from service.feature_store import StoreResult
    from service.metrics import Metrics
    from service.registry import Registry
    from service.scorer import RankInput, rank
    from service.settings import Settings

    for v in ("v1", "v2", "v3"):
        make_bundle(tmp_path, version=v, activate=False)
    reg = Registry(Settings(bundles_dir=tmp_path), Metrics())
    reg.reload("v1")
    in_flight = reg.current  # what a /rank handler holds from its start to its end
    model_ref, session_ref = weakref.ref(in_flight), weakref.ref(in_flight.session)
    reg.reload("v2")
    reg.reload("v3")
    assert reg.loaded_versions() == ["v3", "v2"]
    gc.collect()
    assert model_ref() is not None  # still held by the request: it finishes on the model it started with
    body = rank_body(4)
    inp = RankInput(body.get("user_id"), body["context"], [c["item_id"] for c in body["candidates"]],
                    [c.get("features", {}) for c in body["candidates"]])
    ranked = rank(in_flight, inp, StoreResult(), in_flight.profiles["default"], None, False)
    assert in_flight.version == "v1" and len(ranked.order) == 4
    del in_flight, ranked
    gc.collect()
    assert model_ref() is None and session_ref() is None  # the v1 session is released
    assert reg.current is not None and reg.current.version == "v3"
