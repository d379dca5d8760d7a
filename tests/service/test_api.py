"""The HTTP API over real HTTP: /rank contract, bad input (documented 4xx), feedback, ops endpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mtrank.bundle import read_manifest
from tests.service.conftest import ServerThread, rank_body, settings_for, wait_until


@pytest.fixture(scope="module")
def served(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the module: small limits, request expressions allowed, an extra profile."""
    from model.export import export_run

    bundles = tmp_path_factory.mktemp("api_bundles")
    export_run(tiny_run, bundles, version="api-v1")
    srv = ServerThread(settings_for(
        bundles, limits={"max_candidates": 50, "max_body_bytes": 64_000},
        fusion={"allow_request_expressions": True,
                "profiles": {"ctr_only": {"type": "weighted_sum", "weights": {"ctr": 1.0}},
                             "prod": {"type": "weighted_product", "weights": {"ctr": 1.0, "cvr": 0.5}}}})).start()
    yield srv, read_manifest(bundles / "api-v1")
    srv.stop()


@pytest.fixture
def client(served):
    with served[0].client() as c:
        yield c


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            head, value = line.rsplit(" ", 1)
            got = head[len(name):].strip("{}")
            if all(part in got.split(",") for part in want.split(",") if part):
                total += float(value)
    return total


# ------------------------------------------------------------------------------------ contract


def test_rank_contract(served, client: httpx.Client) -> None:
    _, manifest = served
    r = client.post("/rank", json=rank_body(8, request_id="r-contract", top_k=5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "r-contract" and body["model_version"] == "api-v1"
    assert body["fusion"] == "default" and body["arm"] == "default" and body["degraded"] is False
    items = body["items"]
    assert [it["rank"] for it in items] == [1, 2, 3, 4, 5]
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    names = [t.name for t in manifest.tasks]
    assert "cvr" in names
    for it in items:
        assert list(it["task_scores"]) == names
        # default profile: weight 1 on every non-derived binary task, over calibrated scores
        want = sum(it["task_scores"][t.name] for t in manifest.tasks if t.type == "binary" and not t.derived)
        assert it["score"] == pytest.approx(want, rel=1e-6)

    raw = client.post("/rank", json=rank_body(8, top_k=5, raw_scores=True)).json()
    assert raw["request_id"] != body["request_id"] and len(raw["request_id"]) == 32  # generated
    by_id = {it["item_id"]: it["task_scores"] for it in raw["items"]}
    for it in items:
        for t, cal in manifest.calibration.items():
            expect = float(cal.apply(np.array([by_id[it["item_id"]][t]], dtype=np.float32))[0])
            assert it["task_scores"][t] == pytest.approx(expect, abs=1e-6)

    lean = client.post("/rank", json=rank_body(3, return_task_scores=False)).json()
    assert all(it["task_scores"] is None for it in lean["items"]) and len(lean["items"]) == 3


def test_fusion_profiles_and_expressions(served, client: httpx.Client) -> None:
    by = {}
    for fusion in ("ctr_only", "prod", "2 * ctr + clip(cvr, 0.1, 0.2)"):
        r = client.post("/rank", json=rank_body(6, fusion=fusion))
        assert r.status_code == 200, r.text
        assert r.json()["fusion"] == fusion and r.json()["arm"] is None
        by[fusion] = r.json()["items"]
    for it in by["ctr_only"]:
        assert it["score"] == pytest.approx(it["task_scores"]["ctr"], rel=1e-6)
    for it in by["prod"]:
        ts = it["task_scores"]
        assert it["score"] == pytest.approx(ts["ctr"] * ts["cvr"] ** 0.5, rel=1e-5)
    for it in by["2 * ctr + clip(cvr, 0.1, 0.2)"]:
        ts = it["task_scores"]
        assert it["score"] == pytest.approx(2 * ts["ctr"] + min(max(ts["cvr"], 0.1), 0.2), rel=1e-5)


def test_empty_candidates_is_200_with_no_items(client: httpx.Client) -> None:
    r = client.post("/rank", json={"candidates": []})
    assert r.status_code == 200 and r.json()["items"] == []


def test_unknown_features_are_ignored(client: httpx.Client) -> None:
    plain = client.post("/rank", json=rank_body(4, raw_scores=True)).json()["items"]
    noisy = rank_body(4, raw_scores=True)
    noisy["context"]["not_a_feature"] = "x"
    for c in noisy["candidates"]:
        c["features"]["bogus"] = 1
        c["features"]["user_country"] = "zz"  # a user-side name among item features: ignored too
    got = client.post("/rank", json=noisy).json()["items"]
    assert got == plain


def test_unknown_categorical_values_hash_like_any_value(served, client: httpx.Client) -> None:
    body = rank_body(3)
    body["candidates"][0]["features"][pick(served[1], ("item",), "categorical")] = "never-seen-category-\u2603"
    body["context"][pick(served[1], ("user", "context"), "categorical")] = 12345
    assert client.post("/rank", json=body).status_code == 200


# ------------------------------------------------------------------------------------ bad input


def _raw(client: httpx.Client, content: bytes | str, **kw: Any) -> httpx.Response:
    return client.post("/rank", content=content, headers={"content-type": "application/json"}, **kw)


def _cands(*features: dict[str, Any]) -> dict[str, Any]:
    return {"candidates": [{"item_id": f"i{k}", "features": f} for k, f in enumerate(features)]}


BAD = [  # (request body, expected status, loc the error must name)
    ({"candidates": "nope"}, 422, ["body", "candidates"]),
    ({}, 422, ["body", "candidates"]),
    ({"candidates": [{"features": {}}]}, 422, ["body", "candidates", 0, "item_id"]),
    ({"candidates": [{"item_id": 7}]}, 422, ["body", "candidates", 0, "item_id"]),
    ({"candidates": [{"item_id": ""}]}, 422, ["body", "candidates", 0, "item_id"]),
    ({"candidates": [{"item_id": "a", "extra": 1}]}, 422, ["body", "candidates", 0, "extra"]),
    ({"candidates": [], "top_k": 0}, 422, ["body", "top_k"]),
    ({"candidates": [], "top_k": "ten"}, 422, ["body", "top_k"]),
    ({"candidates": [], "return_task_scores": "maybe"}, 422, ["body", "return_task_scores"]),
    ({"candidates": [], "user_id": ["u"]}, 422, ["body", "user_id"]),
    ({"candidates": [], "request_id": "r" * 300}, 422, ["body", "request_id"]),
    ({"candidates": [], "context": "ios"}, 422, ["body", "context"]),
    ({"candidates": [], "context": {"device": {"nested": 1}}}, 422, ["body", "context", "device"]),
    ({"candidates": [], "bogus_field": 1}, 422, ["body", "bogus_field"]),
    ({"candidates": [{"item_id": f"i{k}"} for k in range(51)]}, 422, ["body", "candidates"]),
    ({"candidates": [{"item_id": "a"}, {"item_id": "b"}, {"item_id": "a"}]}, 422, ["body", "candidates", 2, "item_id"]),
    (_cands({}, {"<num_item>": "cheap"}), 422, ["body", "candidates", 1, "features", "<num_item>"]),
    (_cands({"<num_item>": [1, 2]}), 422, ["body", "candidates", 0, "features", "<num_item>"]),
    (_cands({"<cat_item>": ["a", "b"]}), 422, ["body", "candidates", 0, "features", "<cat_item>"]),
    (_cands({"<cat_item>": [["a"]]}), 422, ["body", "candidates", 0, "features", "<cat_item>"]),
    (_cands({"<num_item>": 10**30}), 422, ["body", "candidates", 0, "features", "<num_item>"]),
    (_cands({"<cat_item>": "x" * 2000}), 422, ["body", "candidates", 0, "features", "<cat_item>"]),
    ({"candidates": [], "context": {"<num_req>": "late"}}, 422, ["body", "context", "<num_req>"]),
    ({"candidates": [], "context": {"<cat_req>": [1, 2]}}, 422, ["body", "context", "<cat_req>"]),
    ({"candidates": [{"item_id": "a"}], "fusion": "no_such_profile"}, 422, ["body", "fusion"]),
    ({"candidates": [{"item_id": "a"}], "fusion": "__import__('os').system('true')"}, 422, ["body", "fusion"]),
    ({"candidates": [{"item_id": "a"}], "fusion": "ctr.__class__"}, 422, ["body", "fusion"]),
    ({"candidates": [{"item_id": "a"}], "fusion": "(lambda: ctr)()"}, 422, ["body", "fusion"]),
    ({"candidates": [{"item_id": "a"}], "fusion": "ctr +"}, 422, ["body", "fusion"]),
    ({"candidates": [{"item_id": "a"}], "fusion": "x" * 600}, 422, ["body", "fusion"]),
    ({"candidates": [{"item_id": "a"}], "fusion": ""}, 422, ["body", "fusion"]),
    # strict types: no coercion of strings, booleans or numbers into another JSON type
    ({"candidates": [], "top_k": "1"}, 422, ["body", "top_k"]),
    ({"candidates": [], "top_k": True}, 422, ["body", "top_k"]),
    ({"candidates": [], "return_task_scores": "no"}, 422, ["body", "return_task_scores"]),
    ({"candidates": [], "return_task_scores": 1}, 422, ["body", "return_task_scores"]),
    ({"candidates": [], "raw_scores": 0}, 422, ["body", "raw_scores"]),
    ({"candidates": [], "raw_scores": "true"}, 422, ["body", "raw_scores"]),
]


def pick(manifest: Any, side: tuple[str, ...], kind: str) -> str:
    """A feature of the bundle's schema with that side and kind (names differ between demo configs)."""
    return next(f.name for f in manifest.schema.features
                if f.side in side and f.kind == kind and f.name not in ("user_id", "item_id"))


def fill_text(text: str, manifest: Any) -> str:
    """``fill`` for raw JSON text."""
    for placeholder, side, kind in (("<num_item>", ("item",), "numeric"), ("<cat_item>", ("item",), "categorical"),
                                    ("<num_req>", ("user", "context"), "numeric"),
                                    ("<cat_req>", ("user", "context"), "categorical")):
        text = text.replace(placeholder, pick(manifest, side, kind))
    return text


def fill(obj: Any, manifest: Any) -> Any:
    """Replace <num_item>/<cat_item>/<num_req>/<cat_req> placeholders by real feature names."""
    names = {"<num_item>": pick(manifest, ("item",), "numeric"), "<cat_item>": pick(manifest, ("item",), "categorical"),
             "<num_req>": pick(manifest, ("user", "context"), "numeric"),
             "<cat_req>": pick(manifest, ("user", "context"), "categorical")}
    return json.loads(json.dumps(obj).replace("<num_item>", names["<num_item>"]).replace(
        "<cat_item>", names["<cat_item>"]).replace("<num_req>", names["<num_req>"]).replace("<cat_req>", names["<cat_req>"]))


@pytest.mark.parametrize("body, status, loc", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_names_the_field(served, client: httpx.Client, body: dict[str, Any], status: int, loc: list[Any]) -> None:
    body, loc = fill(body, served[1]), fill(loc, served[1])
    r = client.post("/rank", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert any(d["loc"][: len(loc)] == loc for d in err["detail"]), err
    assert ".".join(map(str, loc)) in err["message"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_tokens_rejected(client: httpx.Client, token: str) -> None:
    r = _raw(client, '{"candidates": [{"item_id": "a", "features": {"price": TOKEN}}]}'.replace("TOKEN", token))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "candidates", 0, "features", "price"]
    r = _raw(client, '{"candidates": [], "context": {"hour": [1, TOKEN]}}'.replace("TOKEN", token))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["body", "context", "hour"]


SURROGATES = [  # raw JSON text holding a lone-surrogate escape, and the loc its 422 must name
    ('{"candidates": [{"item_id": "a", "features": {"<cat_item>": "\\ud800"}}]}', ["body", "candidates", 0, "features", "<cat_item>"]),
    ('{"candidates": [{"item_id": "a", "features": {"<cat_item>": "ok \\udfff ok"}}]}', ["body", "candidates", 0, "features", "<cat_item>"]),
    ('{"candidates": [{"item_id": "a", "features": {"<cat_item>": ["x", "\\ud800"]}}]}', ["body", "candidates", 0, "features", "<cat_item>"]),
    ('{"candidates": [{"item_id": "a"}], "context": {"<cat_req>": "\\ud800"}}', ["body", "context", "<cat_req>"]),
    ('{"candidates": [{"item_id": "a"}], "context": {"<cat_req>": ["\\udbff"]}}', ["body", "context", "<cat_req>"]),
    ('{"candidates": [{"item_id": "a"}], "context": {"\\ud800": "x"}}', ["body", "context"]),
    ('{"candidates": [{"item_id": "a", "features": {"k\\ud800": 1}}]}', ["body", "candidates", 0, "features"]),
    ('{"candidates": [{"item_id": "\\ud800"}]}', ["body", "candidates", 0, "item_id"]),
    ('{"candidates": [{"item_id": "a"}], "user_id": "u\\ud800"}', ["body", "user_id"]),
    ('{"candidates": [{"item_id": "a"}], "request_id": "\\udc00"}', ["body", "request_id"]),
    ('{"candidates": [{"item_id": "a"}], "fusion": "\\ud800"}', ["body", "fusion"]),
]


@pytest.mark.parametrize("text, loc", SURROGATES, ids=[f"surrogate{i}" for i in range(len(SURROGATES))])
def test_lone_surrogates_are_422_naming_the_field(served, client: httpx.Client, text: str, loc: list[Any]) -> None:
    """A ``\\ud800`` escape decodes to a string UTF-8 cannot encode: rejected at validation (was a 500 from the
    encoder for values, and from encoding the error body for keys)."""
    text, loc = fill_text(text, served[1]), fill(loc, served[1])
    r = _raw(client, text)
    assert r.status_code == 422, r.text
    err = r.json()
    assert any(d["loc"][: len(loc)] == loc for d in err["detail"]), err
    assert "surrogate" in err["message"]
    if loc[-1] == "fusion" or '["' in text:  # no valid twin: an emoji is no profile, a categorical takes no list
        return
    # a paired surrogate escape is one astral code point: fine
    ok = text.replace("\\ud800", "\\ud83d\\ude00").replace("\\udfff", "\\ud83d\\ude00").replace(
        "\\udbff", "\\ud83d\\ude00").replace("\\udc00", "\\ud83d\\ude00")
    assert _raw(client, ok).status_code == 200, ok


def test_lone_surrogate_in_a_feedback_label_name(client: httpx.Client) -> None:
    r = client.post("/feedback", content='{"events": [{"request_id": "r", "item_id": "i", "labels": {"\\ud800": 1}}]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:4] == ["body", "events", 0, "labels"]


NOT_NUMBERS = ["inf", "-inf", "Infinity", "nan", "NaN", "1e309", "-1e309", "1_000", " 12", "12 ", "0x10", "",
               "\u0661\u0662", ".5", "5.", "1e", "--1", "12abc"]
NUMBERS = [("12.5", 12.5), ("-3", -3.0), ("+7", 7.0), ("1e3", 1000.0), ("2.5E-1", 0.25), (True, 1.0), (7, 7.0)]


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=[f"not_number{i}" for i in range(len(NOT_NUMBERS))])
def test_numeric_features_refuse_strings_outside_the_rule(served, client: httpx.Client, value: str) -> None:
    """One rule (mtrank.encoding.numeric_value): strings must be plain decimal numerals with a finite value.
    "inf", "nan", "1e309" were silently mapped to the default, "1_000" parsed as 1000."""
    num_item, num_req = pick(served[1], ("item",), "numeric"), pick(served[1], ("user", "context"), "numeric")
    r = client.post("/rank", json={"candidates": [{"item_id": "a"}, {"item_id": "b", "features": {num_item: value}}]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "candidates", 1, "features", num_item]
    r = client.post("/rank", json={"candidates": [{"item_id": "a"}], "context": {num_req: value}})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "context", num_req]


@pytest.mark.parametrize("value, number", NUMBERS)
def test_numeric_features_take_numbers_booleans_and_numerals(served, client: httpx.Client, value: Any,
                                                             number: float) -> None:
    num_item, num_req = pick(served[1], ("item",), "numeric"), pick(served[1], ("user", "context"), "numeric")

    def scores(v: Any) -> list[Any]:
        body = {"candidates": [{"item_id": "a", "features": {num_item: v}}], "context": {num_req: v}, "raw_scores": True}
        r = client.post("/rank", json=body)
        assert r.status_code == 200, r.text
        return r.json()["items"]

    assert scores(value) == scores(number)  # a numeral string scores like the number it spells


def test_store_values_outside_the_numeric_rule_count_as_missing(served) -> None:
    from service.feature_store import StoreResult
    from service.scorer import RankInput

    srv, manifest = served
    model = srv.services.registry.current
    num_item = pick(manifest, ("item",), "numeric")
    rows = [{num_item: v} for v in ("inf", "1_000", "nan", float("inf"), 10**400, [1], "12.5", 3, None)]
    inp = RankInput(None, {}, [f"i{k}" for k in range(len(rows))], [{}] * len(rows))
    col = model.item_columns(inp, rows)[num_item]
    assert np.isnan(col[:6]).all() and col[6:8].tolist() == [12.5, 3.0] and np.isnan(col[8])
    ranked = model.score(inp, StoreResult(items=rows))  # the missing ones score like an absent value
    missing = model.score(inp, StoreResult())
    for t, v in ranked.raw.items():
        np.testing.assert_allclose(v[[0, 1, 2, 3, 4, 5, 8]], missing.raw[t][[0, 1, 2, 3, 4, 5, 8]], rtol=1e-6)


def test_json_errors_name_the_position_and_the_content_type(client: httpx.Client) -> None:
    text = '{"candidates": [\n  {"item_id": "a",}\n]}'
    with pytest.raises(json.JSONDecodeError) as syntax:
        json.loads(text)
    assert (syntax.value.lineno, syntax.value.colno) == (2, 19)
    r = _raw(client, text.encode())
    assert r.status_code == 422, r.text
    d = r.json()["detail"][0]
    assert d["loc"] == ["body"] and d["type"] == "json_invalid"
    assert d["msg"] == "invalid JSON at line 2, column 19: Expecting property name enclosed in double quotes", d
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = client.post("/rank", content=b'{"candidates": []}', headers=headers)
        assert r.status_code == 422, r.text
        d = r.json()["detail"][0]
        assert d["type"] == "content_type" and "application/json" in d["msg"], d
        assert (headers.get("content-type") or "no Content-Type") in d["msg"]
    r = _raw(client, b'{"candidates": [], "user_id": "\xff"}')
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["detail"], r.text
    r = _raw(client, "[" * 30_000 + "]" * 30_000)  # under the module server's 64 kB body limit
    assert r.status_code == 400 and "nested too deeply" in r.json()["detail"], r.text
    assert client.post("/rank", json={"candidates": []}, headers={"content-type": "application/vnd.x+json"}).status_code == 200


def test_malformed_json_and_content_type(client: httpx.Client) -> None:
    assert _raw(client, b'{"candidates": [').status_code == 422
    assert _raw(client, b"\xff\xfe").status_code in (400, 422)
    assert client.post("/rank", content=b'{"candidates": []}', headers={"content-type": "text/plain"}).status_code == 422
    assert _raw(client, "[" * 100_00 + "]" * 100_00).status_code in (400, 422)  # deep nesting


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = json.dumps({"candidates": [{"item_id": f"item-{k:08d}", "features": {"category": "c" * 500}}
                                     for k in range(200)]}).encode()
    assert len(big) > 64_000
    r = _raw(client, big)  # Content-Length over the limit
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the bytes actually read are counted
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = client.post("/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert metric(client.get("/metrics").text, "mtrank_http_requests_total", route="/rank", status="413") == 2


def test_no_500_and_state_unchanged_after_bad_input(served, client: httpx.Client) -> None:
    _, srv_manifest = served
    before = client.get("/models").json()
    for body, _, _ in BAD:
        assert client.post("/rank", json=fill(body, srv_manifest)).status_code in (413, 422)
    assert client.get("/models").json() == before
    assert client.get("/healthz").status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "mtrank_http_requests_total", status="500") == 0
    assert metric(text, "mtrank_http_requests_total", route="/rank", status="422") >= len(BAD) - 1


# ------------------------------------------------------------------------------------- feedback


def test_feedback_validate_dedup_join(served, client: httpx.Client) -> None:
    srv, _ = served
    ranked = client.post("/rank", json=rank_body(4, request_id="fb-1")).json()["items"]
    ev = [{"request_id": "fb-1", "item_id": "i0", "labels": {"ctr": 1, "cvr": 0}},
          {"request_id": "fb-1", "item_id": "i1", "labels": {"ctr": 0}},
          {"request_id": "unknown-request", "item_id": "x", "labels": {"watch_time": 12.5}}]
    r = client.post("/feedback", json={"events": ev})
    assert r.status_code == 200 and r.json() == {"accepted": 3, "duplicates": 0, "joined": 2}
    # same events again: duplicates; a new label for a known key is accepted (first value of each label wins)
    again = [*ev[:2], {"request_id": "fb-1", "item_id": "i1", "labels": {"ctr": 1, "like": 1}}]
    r = client.post("/feedback", json={"events": again})
    assert r.json() == {"accepted": 1, "duplicates": 2, "joined": 1}

    # joined labels land in the calibration buckets of the score that was served (10 buckets of 0.1)
    want = {it["item_id"]: it["task_scores"]["ctr"] for it in ranked}
    text = client.get("/metrics").text

    def per_bucket(name: str, task: str) -> dict[str, float]:
        return {b: metric(text, name, task=task, bucket=b) for b in (f"{i / 10:g}-{(i + 1) / 10:g}" for i in range(10))}

    labeled = per_bucket("mtrank_calibration_labeled_total", "ctr")
    expected: dict[str, float] = {}
    for item in ("i0", "i1"):
        b = min(int(want[item] * 10), 9)
        expected[f"{b / 10:g}-{(b + 1) / 10:g}"] = expected.get(f"{b / 10:g}-{(b + 1) / 10:g}", 0) + 1
    assert {k: v for k, v in labeled.items() if v} == expected
    assert sum(per_bucket("mtrank_calibration_positives_total", "ctr").values()) == 1  # i0 clicked, i1 not
    assert sum(per_bucket("mtrank_calibration_labeled_probability_total", "ctr").values()) == pytest.approx(
        want["i0"] + want["i1"], abs=1e-6)
    assert sum(per_bucket("mtrank_calibration_labeled_total", "like").values()) == 1
    assert metric(text, "mtrank_feedback_events_total", result="duplicate") >= 2
    assert metric(text, "mtrank_feedback_events_total", result="joined") >= 3


@pytest.mark.parametrize("events, loc", [
    ([{"request_id": "r", "item_id": "i", "labels": {"ctrr": 1}}], ["body", "events", 0, "labels", "ctrr"]),
    ([{"request_id": "r", "item_id": "i", "labels": {"ctr": 1}},
      {"request_id": "r", "item_id": "j", "labels": {"ctr": 2}}], ["body", "events", 1, "labels", "ctr"]),
    ([{"request_id": "r", "item_id": "i", "labels": {}}], ["body", "events", 0, "labels"]),
    ([{"request_id": "r", "item_id": "i", "labels": {"ctr": "yes"}}], ["body", "events", 0, "labels", "ctr"]),
    ([{"request_id": "r", "item_id": "i", "labels": {"ctr": "1"}}], ["body", "events", 0, "labels", "ctr"]),
    ([{"request_id": "r", "item_id": "i", "labels": {"ctr": True}}], ["body", "events", 0, "labels", "ctr"]),
    ([{"request_id": "r", "item_id": "i", "labels": {"": 1}}], ["body", "events", 0, "labels"]),
    ([{"request_id": "r", "labels": {"ctr": 1}}], ["body", "events", 0, "item_id"]),
    ([], ["body", "events"]),
])
def test_feedback_bad_input(served, client: httpx.Client, events: list, loc: list) -> None:
    rid = f"bad-{len(str(events))}-{loc[-1]}"
    events = json.loads(json.dumps(events).replace('"r"', json.dumps(rid)))
    r = client.post("/feedback", json={"events": events})
    assert r.status_code == 422, r.text
    assert any(d["loc"][: len(loc)] == loc for d in r.json()["detail"]), r.json()
    # nothing stored from a rejected batch: its valid events are new afterwards, not duplicates
    probe = {"events": [{"request_id": rid, "item_id": "i", "labels": {"ctr": 1}}]}
    assert client.post("/feedback", json=probe).json()["accepted"] == 1
    assert client.post("/feedback", content=b'{"events": [{"request_id": "r", "item_id": "i", "labels": {"ctr": NaN}}]}',
                       headers={"content-type": "application/json"}).status_code == 422


# ----------------------------------------------------------------------------------- operations


def test_generated_request_ids_ignore_the_global_random_seed() -> None:
    """`mtrank demo` trains (``random.seed``) and serves in one process: ids must not repeat across runs."""
    import random

    from service.api import new_request_id

    random.seed(0)
    first = new_request_id()
    random.seed(0)
    second = new_request_id()
    assert first != second and len(first) == len(second) == 32 and int(first, 16) >= 0


def test_ops_endpoints_and_openapi(served, client: httpx.Client) -> None:
    assert client.post("/rank", json=rank_body(2)).status_code == 200
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": "api-v1"}
    models = client.get("/models").json()
    assert models["active"] == "api-v1" and models["loaded"] == ["api-v1"] and models["previous"] is None
    assert models["current_pointer"] == "api-v1" and models["last_error"] is None
    assert {t["name"] for t in models["tasks"]} >= {"ctr", "cvr"}
    spec = client.get("/openapi.json").json()
    assert {"/rank", "/feedback", "/models", "/healthz", "/readyz", "/metrics", "/admin/reload",
            "/admin/rollback"} <= set(spec["paths"])
    assert "RankRequest" in spec["components"]["schemas"] and "RankResponse" in spec["components"]["schemas"]
    text = client.get("/metrics").text
    for name in ("mtrank_http_requests_total", "mtrank_http_request_duration_seconds_bucket", "mtrank_rank_candidates_bucket",
                 "mtrank_model_info", "mtrank_model_reloads_total", "mtrank_rank_stage_seconds_bucket"):
        assert name in text, name
    assert metric(text, "mtrank_model_info", version="api-v1") == 1
    assert metric(text, "mtrank_model_reloads_total", result="success", trigger="startup") == 1
    for stage in ("features", "inference", "log", "observe"):  # the inference thread's CPU per stage, within its wall
        cpu, wall = (metric(text, "mtrank_rank_stage_cpu_seconds_total", stage=stage),
                     metric(text, "mtrank_rank_stage_seconds_sum", stage=stage))
        assert 0 < cpu <= wall + 1e-4, (stage, cpu, wall)


def test_admin_auth(tmp_path: Path, make_bundle, start_server) -> None:
    make_bundle(tmp_path)
    off = start_server(tmp_path)  # no admin.token: disabled
    with off.client() as c:
        r = c.post("/admin/reload", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "disabled" in r.json()["detail"]
        assert c.post("/admin/rollback").status_code == 403
        assert c.delete("/admin/shadow").status_code == 403  # disabled wins over missing credentials
    on = start_server(tmp_path, admin={"token": "s3cret"})
    with on.client() as c:
        # RFC 6750: no bearer credentials -> 401 with a Bearer challenge; a wrong token -> 403
        for headers in ({}, {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"}, {"Authorization": "s3cret"}):
            for r in (c.post("/admin/reload", headers=headers), c.post("/admin/rollback", headers=headers),
                      c.put("/admin/shadow", json={"version": "x"}, headers=headers), c.delete("/admin/shadow", headers=headers)):
                assert r.status_code == 401, (headers, r.request.url, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
                assert "missing bearer token" in r.json()["detail"]
        r = c.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403 and "www-authenticate" not in r.headers and r.json()["detail"] == "invalid bearer token"
        ok = c.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["status"] == "unchanged"
        r = c.post("/admin/reload", json={"version": "../etc"}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "version"]  # the version-name rule
        r = c.post("/admin/reload", json={"version": "v-missing"}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 404 and "no such bundle" in r.json()["detail"]
        r = c.post("/admin/rollback", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 404 and "no previous" in r.json()["detail"]


def test_docs_served_from_local_assets(client: httpx.Client) -> None:
    """/docs and /redoc reference only assets the server itself serves (they were on a CDN: blank offline)."""
    import re

    for page, kinds in (("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}), ("/redoc", {"redoc.standalone.js"})):
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text
        urls = re.findall(r'(?:src|href)\s*[=:]\s*["\']([^"\']+)["\']', r.text)
        assert {u.rsplit("/", 1)[-1] for u in urls} >= kinds, urls
        assert not [u for u in urls if "//" in u], f"{page} loads from another host: {urls}"
        assert "/openapi.json" in r.text
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 500, url
            if url.endswith(".js"):
                assert "javascript" in asset.headers["content-type"], (url, asset.headers)
            elif url.endswith(".css"):
                assert asset.headers["content-type"].startswith("text/css"), (url, asset.headers)
    swagger = client.get("/docs-assets/swagger-ui-bundle.js").text
    assert "3.1" in client.get("/openapi.json").json()["openapi"] and "SwaggerUIBundle" in swagger


def test_top_k_takes_what_json_schema_calls_an_integer(client: httpx.Client) -> None:
    """Strict, but by JSON Schema's definition: 3.0 is the integer 3; "3", true and 2.5 are not integers."""
    assert len(client.post("/rank", json=rank_body(5, top_k=3.0)).json()["items"]) == 3
    for bad in ("3", True, 2.5):
        assert client.post("/rank", json=rank_body(5, top_k=bad)).status_code == 422, bad


def test_405_allow_lists_every_method_of_the_path(client: httpx.Client) -> None:
    """/admin/shadow is two routes (PUT, DELETE): Starlette's 405 named only the first in Allow."""
    for method, path, allow in (("OPTIONS", "/admin/shadow", "DELETE, PUT"), ("PATCH", "/admin/shadow", "DELETE, PUT"),
                                ("GET", "/rank", "POST"), ("POST", "/docs", "GET")):
        r = client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)


def test_openapi_states_statuses_and_limits(served, client: httpx.Client) -> None:
    """Every status an operation can answer is in its responses; the settings' limits are in the schemas."""
    doc = client.get("/openapi.json").json()
    want = {("post", "/rank"): {"200", "400", "409", "413", "422", "503"},
            ("post", "/feedback"): {"200", "400", "413", "422", "503"},
            ("post", "/admin/reload"): {"200", "400", "401", "403", "404", "409", "413", "422", "502", "503"},
            ("put", "/admin/shadow"): {"200", "400", "401", "403", "404", "409", "413", "422"},
            ("post", "/admin/rollback"): {"200", "401", "403", "404"}, ("delete", "/admin/shadow"): {"200", "401", "403"},
            ("get", "/readyz"): {"200", "503"}}
    for (method, path), codes in want.items():
        op = doc["paths"][path][method]
        assert set(op["responses"]) == codes, (method, path, sorted(op["responses"]))
        if "401" in codes:
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"] and op["security"] == [{"HTTPBearer": []}]
    schemas = doc["components"]["schemas"]
    assert schemas["RankRequest"]["properties"]["candidates"]["maxItems"] == 50  # the module server's limits
    assert schemas["FeedbackRequest"]["properties"]["events"]["maxItems"] == 1000
    fusion = schemas["RankRequest"]["properties"]["fusion"]
    assert "x-mtrank-runtime-check" in fusion  # expressions allowed on this server: not a closed set
    assert schemas["FeedbackEvent"]["properties"]["labels"]["propertyNames"] == {"maxLength": 128, "minLength": 1}
    for name in ("top_k", "return_task_scores", "raw_scores"):
        assert name in schemas["RankRequest"]["properties"]


def test_not_ready_until_a_bundle_appears(tmp_path: Path, make_bundle, start_server) -> None:
    srv = start_server(tmp_path, ready=False)
    with srv.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        assert c.post("/rank", json=rank_body(2)).status_code == 503
        make_bundle(tmp_path, version="late-1")
        wait_until(lambda: c.get("/readyz").status_code == 200, 20, what="bundle pick-up")
        assert c.post("/rank", json=rank_body(2)).json()["model_version"] == "late-1"


def test_unknown_features_rejected_when_configured(tmp_path: Path, make_bundle, start_server) -> None:
    make_bundle(tmp_path)
    srv = start_server(tmp_path, limits={"unknown_features": "reject"})
    with srv.client() as c:
        r = c.post("/rank", json={"candidates": [{"item_id": "a"}, {"item_id": "b", "features": {"bogus": 1}}]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "candidates", 1, "features", "bogus"]
        r = c.post("/rank", json={"context": {"nope": 1}, "candidates": []})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "context", "nope"]
        assert c.post("/rank", json=rank_body(2)).status_code == 200


def test_gc_tuning_applied_after_start(tmp_path: Path, make_bundle, start_server) -> None:
    import gc

    make_bundle(tmp_path)
    before = gc.get_threshold()
    try:
        start_server(tmp_path, gc={"freeze": True, "gen0_threshold": 12345})
        assert gc.get_threshold()[0] == 12345 and gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_switch_interval_set_while_serving_and_restored_at_shutdown(tmp_path: Path, make_bundle, start_server) -> None:
    make_bundle(tmp_path)
    before = sys.getswitchinterval()
    srv = start_server(tmp_path, interpreter={"switch_interval_ms": 0.25})
    assert sys.getswitchinterval() == pytest.approx(0.00025)
    srv.stop()
    assert sys.getswitchinterval() == before


def test_scores_match_trainer_encoding_end_to_end(served, client: httpx.Client, tiny_run: Path, demo_data: Path) -> None:
    """Raw rows sent as JSON score exactly like the trainer's encoding of the same rows run through the bundle."""
    import pandas as pd

    from model.data import encode_split, needed_columns, read_files
    from model.train import load_run
    from mtrank.bundle import onnx_runner

    srv, manifest = served
    cfg, schema, _ = load_run(tiny_run)
    df = read_files(cfg.data, cfg.data.train, needed_columns(cfg))
    rows = df.head(6)
    expected = onnx_runner(srv.services.registry.current.bundle_dir / "model.onnx")(encode_split(cfg, schema, rows).inputs)
    records = json.loads(pd.read_parquet(demo_data).head(6).to_json(orient="records"))
    for k, rec in enumerate(records):
        ctx = {f.name: rec.get(f.source) for f in schema.features if f.side == "context" or
               (f.side == "user" and f.name != "user_id")}
        item = {f.name: rec.get(f.source) for f in schema.features if f.side == "item" and f.name != "item_id"}
        body = {"user_id": str(rec["user_id"]), "context": ctx, "raw_scores": True,
                "candidates": [{"item_id": str(rec["item_id"]), "features": item}]}
        got = client.post("/rank", json=body).json()["items"][0]["task_scores"]
        for t in manifest.tasks:
            assert got[t.name] == pytest.approx(float(expected[t.output][k]), abs=1e-5), (k, t.name)


def test_candidates_as_columns_rank_like_the_list_form(served, client: httpx.Client) -> None:
    """The column form (RankColumnsRequest) gives the list form's response: same order, scores, task scores."""
    rows = rank_body(12, request_id="rows-1", top_k=7)
    rows["candidates"][3]["features"]["item_price"] = None  # null = not sent, in both forms
    del rows["candidates"][5]["features"]["item_category"]
    names = ["item_category", "item_price"]
    cols = {**rows, "request_id": "cols-1", "candidates": {
        "item_id": [c["item_id"] for c in rows["candidates"]],
        "features": {k: [c["features"].get(k) for c in rows["candidates"]] for k in names}}}
    a, b = client.post("/rank", json=rows), client.post("/rank", json=cols)
    assert a.status_code == b.status_code == 200, b.text
    assert a.json()["items"] == b.json()["items"] and len(b.json()["items"]) == 7
    assert client.post("/rank", json={"candidates": {"item_id": []}}).json()["items"] == []


@pytest.mark.parametrize("candidates, loc", [
    ({"item_id": ["a", "b", "a"]}, ["body", "candidates", "item_id", 2]),
    ({"item_id": ["a", "b"], "features": {"<num_item>": [1.0]}}, ["body", "candidates", "features", "<num_item>"]),
    ({"item_id": ["a", "b"], "features": {"<num_item>": [1.0, "cheap"]}}, ["body", "candidates", "features", "<num_item>", 1]),
    ({"item_id": [f"i{k}" for k in range(51)]}, ["body", "candidates", "item_id"]),  # limits.max_candidates 50
    ({"item_id": "a"}, ["body", "candidates", "item_id"]),
])
def test_bad_columns_name_the_field(served, client: httpx.Client, candidates: dict[str, Any], loc: list[Any]) -> None:
    manifest = served[1]
    r = client.post("/rank", json=fill({"candidates": candidates}, manifest))
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == fill(loc, manifest)


# ------------------------------------------------------------------------------- /rank dispatch


def test_rank_dispatch_answers_as_the_fastapi_route(served, tmp_path: Path) -> None:
    """``service.api.RankDispatch`` takes POST /rank past FastAPI's routing: a second server built without it (the
    route itself answering) gets the same requests, and every answer is the same status, media type and bytes:
    rankings in both forms, each documented 4xx (the handlers' bodies), a 413 raised while the body streams in, a
    409 for a reused request id, a 405 for another method; and a 503 from both before any model is loaded."""
    from service.api import RankDispatch

    def routed(settings: Any) -> ServerThread:  # the app without RankDispatch: FastAPI's route answers /rank
        s = ServerThread(settings)
        s.app.user_middleware = [m for m in s.app.user_middleware if m.cls is not RankDispatch]
        return s

    srv, manifest = served
    plain = routed(srv.settings).start()
    big = json.dumps({"candidates": [{"item_id": f"item-{k:08d}", "features": {"category": "c" * 500}}
                                     for k in range(200)]}).encode()
    cols = {"item_id": ["a", "b"], "features": {pick(manifest, ("item",), "numeric"): [1.5, None]}}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("POST", {"json": rank_body(8, request_id="same-1", top_k=5)}),
        ("POST", {"json": rank_body(8, request_id="same-1")}),  # reused: 409
        ("POST", {"json": {"user_id": "u", "request_id": "same-2", "candidates": cols}}),
        ("POST", {"json": rank_body(3, request_id="same-3", fusion="ctr_only", return_task_scores=False)}),
        *(("POST", {"json": fill(body, manifest)}) for body, _, _ in BAD),
        ("POST", {"content": b'{"candidates": [', "headers": {"content-type": "application/json"}}),
        ("POST", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}),
        ("POST", {"content": b'{"candidates": []}', "headers": {"content-type": "text/plain"}}),
        ("POST", {"content": [big[i:i + 8192] for i in range(0, len(big), 8192)],  # streamed: no Content-Length
                  "headers": {"content-type": "application/json"}}),
        ("GET", {}),
    ]
    try:
        with srv.client() as a, plain.client() as b:
            statuses = []
            for method, kw in cases:
                sent = [{**kw, "content": iter(kw["content"])} if isinstance(kw.get("content"), list) else kw
                        for _ in range(2)]  # a list of chunks goes as a fresh generator to each server
                ra, rb = a.request(method, "/rank", **sent[0]), b.request(method, "/rank", **sent[1])
                assert (ra.status_code, ra.headers.get("content-type"), ra.headers.get("allow"), ra.content) == \
                       (rb.status_code, rb.headers.get("content-type"), rb.headers.get("allow"), rb.content), kw
                statuses.append(ra.status_code)
            assert statuses[:4] == [200, 409, 200, 200] and statuses[-2:] == [413, 405]
            assert set(statuses[4:-2]) <= {400, 422}
    finally:
        plain.stop()
    empty = tmp_path / "empty"
    empty.mkdir()
    no_model = [ServerThread(settings_for(empty)), routed(settings_for(empty))]
    try:
        answers = []
        for s in no_model:
            s.start(ready=False)
            with s.client() as c:
                r = c.post("/rank", json=rank_body(2))
                answers.append((r.status_code, r.content))
        assert answers[0] == answers[1] and answers[0][0] == 503
    finally:
        for s in no_model:
            s.stop()
