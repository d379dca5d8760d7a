"""The "Hardening" issue over real HTTP: admin preconditions and errors, version names, paths kept out of
error bodies, single-use request ids, and the registry's signature and sanity checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from mtrank.bundle import CURRENT, write_current
from mtrank.config import ConfigError
from tests.service.conftest import clone_bundle, rank_body, wait_until
from tests.service.test_api import metric
from tests.test_bundle_security import tamper_embeddings

ADMIN = {"Authorization": "Bearer tok"}


def _models(c: httpx.Client) -> dict[str, Any]:
    return c.get("/models").json()


def _rejected(c: httpx.Client, version: str) -> dict[str, Any]:
    """Wait for the poller to reject ``version``; returns last_error."""
    wait_until(lambda: (_models(c)["last_error"] or {}).get("version") == version, what=f"rejection of {version}")
    return _models(c)["last_error"]


# ------------------------------------------------------------------------------------- admin reload


def test_broadcast_without_a_channel_changes_nothing(tmp_path: Path, base_bundle: Path, start_server) -> None:
    """Was: 409 "broadcast needs ..." after the model had already been swapped."""
    clone_bundle(base_bundle, tmp_path, "v1", activate=True)
    clone_bundle(base_bundle, tmp_path, "v2")
    srv = start_server(tmp_path, admin={"token": "tok"})
    with srv.client() as c:
        r = c.post("/admin/reload", json={"version": "v2", "broadcast": True}, headers=ADMIN)
        assert r.status_code == 409 and "broadcast needs" in r.json()["detail"]
        models = _models(c)
        assert models["active"] == "v1" and models["previous"] is None and models["loaded"] == ["v1"]
        assert metric(c.get("/metrics").text, "mtrank_model_reloads_total", result="success", trigger="admin") == 0


def test_broadcast_with_the_channel_down_changes_nothing(tmp_path: Path, base_bundle: Path, start_server,
                                                         redis_server: Any) -> None:
    clone_bundle(base_bundle, tmp_path, "v1", activate=True)
    clone_bundle(base_bundle, tmp_path, "v2")
    srv = start_server(tmp_path, admin={"token": "tok"},
                       reload={"pubsub_channel": "mtrank:reload", "redis_url": redis_server.url})
    redis_server.kill()
    with srv.client() as c:
        r = c.post("/admin/reload", json={"version": "v2", "broadcast": True}, headers=ADMIN)
        assert r.status_code == 503 and "nothing changed" in r.json()["detail"]
        assert redis_server.url not in r.text and str(redis_server.port) not in r.text
        assert _models(c)["active"] == "v1"


@pytest.mark.parametrize("version", ["v 1", "../x", "a/b", ".hidden", CURRENT, "v1\n"])
def test_invalid_version_names_are_422_naming_the_field(tmp_path: Path, base_bundle: Path, start_server,
                                                         version: str) -> None:
    """Was: 404 (and `../x` read outside the bundles directory's version namespace)."""
    clone_bundle(base_bundle, tmp_path, "v1", activate=True)
    srv = start_server(tmp_path, admin={"token": "tok"})
    with srv.client() as c:
        for method, path in (("POST", "/admin/reload"), ("PUT", "/admin/shadow")):
            r = c.request(method, path, json={"version": version}, headers=ADMIN)
            assert r.status_code == 422, (path, r.text)
            assert r.json()["detail"][0]["loc"] == ["body", "version"]
        assert _models(c)["active"] == "v1" and _models(c)["shadow"] is None


def test_error_bodies_and_last_error_hold_no_server_paths(tmp_path: Path, base_bundle: Path, start_server,
                                                          caplog) -> None:
    """Was: the 404 for an unknown version, /models last_error (unauthenticated) and 409s held the absolute
    bundle path. Now they name versions and bundle files; the log has the details."""
    clone_bundle(base_bundle, tmp_path, "v1", activate=True)
    broken = clone_bundle(base_bundle, tmp_path, "broken-1")
    data = bytearray((broken / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.onnx").write_bytes(bytes(data))
    srv = start_server(tmp_path, admin={"token": "tok"})
    root = str(tmp_path)
    with srv.client() as c:
        r = c.post("/admin/reload", json={"version": "nope"}, headers=ADMIN)
        assert r.status_code == 404 and r.json()["detail"] == "version 'nope': no such bundle version"
        r = c.put("/admin/shadow", json={"version": "nope"}, headers=ADMIN)
        assert r.status_code == 404 and root not in r.text
        r = c.post("/admin/reload", json={"version": "broken-1"}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["detail"].startswith("broken-1/model.onnx: sha256 mismatch")
        assert root not in r.text
        write_current(tmp_path, "broken-1")
        err = _rejected(c, "broken-1")
        assert err["error"].startswith("broken-1/model.onnx: sha256 mismatch") and root not in json.dumps(err)
        assert root not in c.get("/models").text and root not in c.get("/readyz").text
        (tmp_path / CURRENT).write_text("v 1\n")  # a pointer naming an invalid version (written by hand)
        err = _rejected(c, "v 1")
        assert err["error"].startswith("CURRENT names an invalid version") and root not in json.dumps(err)
        assert _models(c)["active"] == "v1"
    assert f"{root}/broken-1/model.onnx: sha256 mismatch" in caplog.text  # the log keeps the details


# ---------------------------------------------------------------------------------------- request ids


def test_a_reused_request_id_is_409_and_the_first_answer_is_kept(tmp_path: Path, base_bundle: Path,
                                                                  start_server) -> None:
    """Was: the second /rank overwrote the first one's stored predictions."""
    clone_bundle(base_bundle, tmp_path, "v1", activate=True)
    srv = start_server(tmp_path)
    with srv.client() as c:
        first = c.post("/rank", json=rank_body(4, request_id="dup"))
        assert first.status_code == 200
        other = rank_body(3, request_id="dup")
        other["candidates"] = [{"item_id": f"j{k}"} for k in range(3)]
        r = c.post("/rank", json=other)
        assert r.status_code == 409
        body = r.json()
        assert body["detail"][0]["loc"] == ["body", "request_id"] and body["detail"][0]["type"] == "request_id_reused"
        assert body["message"].startswith("body.request_id: request_id 'dup' was already used")
        fb = c.post("/feedback", json={"events": [{"request_id": "dup", "item_id": "i1", "labels": {"ctr": 1}},
                                                  {"request_id": "dup", "item_id": "j1", "labels": {"ctr": 1}}]})
        assert fb.json() == {"accepted": 2, "duplicates": 0, "joined": 1}  # the first answer's items join
        assert c.post("/rank", json=rank_body(2)).status_code == 200  # generated ids: never reused
        assert c.post("/rank", json=rank_body(2, request_id="fresh")).status_code == 200
        text = c.get("/metrics").text
        assert metric(text, "mtrank_http_requests_total", route="/rank", status="409") == 1
        assert metric(text, "mtrank_feedback_events_total", result="orphan") == 0


# --------------------------------------------------------------------------------- signatures, sanity


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mtrank.signing import generate_keypair

    private, public, _ = generate_keypair(tmp_path_factory.mktemp("svc_keys") / "svc")
    return private, public


def test_the_service_refuses_unsigned_and_tampered_bundles(tiny_run: Path, tmp_path: Path, keypair, start_server,
                                                           caplog) -> None:
    from model.export import export_run
    from mtrank.signing import SIGNATURE

    export_run(tiny_run, tmp_path, version="s1", sign_key=keypair[0])
    export_run(tiny_run, tmp_path, version="s2", activate=False, sign_key=keypair[0])
    tamper_embeddings(tmp_path / "s2")  # the attack on a signed bundle
    unsigned = clone_bundle(tmp_path / "s1", tmp_path, "u1")
    (unsigned / SIGNATURE).unlink()
    srv = start_server(tmp_path, admin={"token": "tok"}, bundles={"public_keys": [str(keypair[1])]})
    root = str(tmp_path)
    with srv.client() as c:
        assert _models(c)["active"] == "s1"
        write_current(tmp_path, "u1")
        err = _rejected(c, "u1")
        assert err["error"].startswith("u1/signature.json: missing") and root not in err["error"]
        write_current(tmp_path, "s2")
        err = _rejected(c, "s2")
        assert err["error"].startswith("s2/signature.json: invalid signature") and root not in err["error"]
        r = c.post("/admin/reload", json={"version": "s2"}, headers=ADMIN)
        assert r.status_code == 409 and "invalid signature" in r.json()["detail"]
        assert c.post("/rank", json=rank_body(3)).json()["model_version"] == "s1"
        text = c.get("/metrics").text
        assert metric(text, "mtrank_model_reloads_total", result="failure", trigger="poll") == 2
        assert metric(text, "mtrank_model_reloads_total", result="failure", trigger="admin") == 1
    assert f"{root}/s2/signature.json: invalid signature" in caplog.text


def test_the_service_refuses_the_attack_without_keys(tmp_path: Path, base_bundle: Path, start_server) -> None:
    clone_bundle(base_bundle, tmp_path, "v1", activate=True)
    srv = start_server(tmp_path)
    attacked = clone_bundle(base_bundle, tmp_path, "attacked")
    tamper_embeddings(attacked)
    with srv.client() as c:
        write_current(tmp_path, "attacked")
        err = _rejected(c, "attacked")
        assert "task 'watch_time'" in err["error"] and "outside" in err["error"]
        assert _models(c)["active"] == "v1"
        r = c.post("/rank", json=rank_body(5, return_task_scores=True)).json()
        assert r["model_version"] == "v1" and all(abs(it["task_scores"]["watch_time"]) < 1e6 for it in r["items"])


def test_bundle_trust_settings_are_validated(tmp_path: Path, keypair) -> None:
    from service.settings import load_settings

    assert load_settings(None, bundles_dir=tmp_path, bundles={"public_keys": [str(keypair[1])]}).bundles.required
    assert not load_settings(None, bundles_dir=tmp_path,
                             bundles={"public_keys": [str(keypair[1])], "require_signature": False}).bundles.required
    with pytest.raises(ConfigError, match=r"bundles\.public_keys\.1: .*nope\.pub: cannot read"):
        load_settings(None, bundles_dir=tmp_path,
                      bundles={"public_keys": [str(keypair[1]), str(tmp_path / "nope.pub")]})
    with pytest.raises(ConfigError, match=r"bundles\.public_keys\.0: .*not a PEM public key"):
        load_settings(None, bundles_dir=tmp_path, bundles={"public_keys": [str(keypair[0])]})  # the private key
    with pytest.raises(ConfigError, match=r"bundles\.require_signature: needs at least one key"):
        load_settings(None, bundles_dir=tmp_path, bundles={"require_signature": True})
    with pytest.raises(ConfigError, match=r"shadow\.version: not a valid version name"):
        load_settings(None, bundles_dir=tmp_path, shadow={"version": "../x"})
