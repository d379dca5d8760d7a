"""service.rank_body: the scanned path (service._rankjson) and the fast path (orjson, checks per column) against the
checked path (FastAPI's json.loads + the RankRequest / RankColumnsRequest model) on the same bodies: valid bodies give
the same request, invalid ones the same errors; the column form gives what the list form gives. The scanner's own
cases and a fuzz of both paths: tests/service/test_rankjson.py."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from service.rank_body import RankBody, _checked, parse_rank
from service.scorer import InputError

JSON = "application/json"


def _outcome(parse: Any, body: bytes, content_type: str | None = JSON) -> tuple[str, Any]:
    """('ok', the request as plain data) or ('error', status and the errors' loc/type)."""
    try:
        got: RankBody = parse(body, content_type)
    except RequestValidationError as e:
        return "error", (422, [(tuple(x["loc"]), x["type"]) for x in e.errors()])
    except HTTPException as e:
        return "error", (e.status_code, e.detail)
    except InputError as e:
        return "error", (422, [(e.loc, e.kind)])
    if got.columnar:
        cols = {k: v.tolist() if isinstance(v, np.ndarray) else list(v) for k, v in (got.columns or {}).items()}
        return "ok", (got.options.model_dump(exclude={"candidates"}), got.item_ids, cols)
    if got.item_features is None:  # the scanned list form: columns only, every candidate sending every name
        assert got.columns is not None
        features = [{k: v[i].item() if isinstance(v, np.ndarray) else v[i] for k, v in got.columns.items()}
                    for i in range(len(got.item_ids))]
    else:
        features = [dict(f) for f in got.item_features]
    if got.columns is not None:  # the columns are the per-candidate features, by name
        names = set().union(*features)
        assert set(got.columns) == names
        assert all(list(got.columns[k]) == [f.get(k) for f in features] for k in names)
        ints = [k for k in names if {type(f.get(k)) for f in features} == {int}]
        assert all(got.columns[k].dtype == np.int64 for k in ints)  # integer columns come as int64 arrays
    return "ok", (got.options.model_dump(exclude={"candidates"}), got.item_ids, features)


def _same(body: bytes, content_type: str | None = JSON) -> tuple[str, Any]:
    fast, checked = _outcome(parse_rank, body, content_type), _outcome(_checked, body, content_type)
    assert fast == checked, body[:300]
    assert repr(fast) == repr(checked), body[:300]  # the same types too (1 == 1.0 == True for ==)
    return fast


def _body(cands: Any, **extra: Any) -> bytes:
    return json.dumps({"user_id": "u1", "context": {"device": "ios", "hour": 21}, "candidates": cands, **extra},
                      allow_nan=True).encode()


def _valid_candidates(rng: random.Random, n: int) -> list[dict[str, Any]]:
    values = [lambda: rng.randrange(-10**6, 10**6), lambda: rng.random() * 100, lambda: f"s{rng.randrange(99)}",
              lambda: rng.random() < 0.5, lambda: None, lambda: [f"t{rng.randrange(9)}", 3], lambda: "é✓"]
    out = []
    for j in range(n):
        feats = {f"f{k}": values[(j * k + k) % len(values)]() for k in range(rng.randrange(0, 6))}
        out.append({"item_id": f"i{j}", "features": feats} if feats or j % 2 else {"item_id": f"i{j}"})
    return out


def test_valid_bodies_take_the_fast_path_with_the_same_request() -> None:
    rng = random.Random(0)
    for n in (0, 1, 7, 60):
        body = _body(_valid_candidates(rng, n), top_k=3.0, request_id="r", raw_scores=True)
        assert _same(body)[0] == "ok"
        assert parse_rank(body, JSON).columns is not None  # not the checked path
    mixed = _body([{"item_id": "a", "features": {"x": 1}}, {"item_id": "b", "features": {"x": "2", "y": [1, "z"]}},
                   {"item_id": "c", "features": {"x": None}}, {"item_id": "d", "features": {"x": 2**63 - 1}},
                   {"item_id": "e", "features": {"x": -(2**63) + 1, "y": []}}])
    assert _same(mixed)[0] == "ok" and parse_rank(mixed, JSON).columns is not None
    lowest = _body([{"item_id": "a", "features": {"x": -(2**63)}}, {"item_id": "b", "features": {"x": 1.5}}])
    assert _same(lowest)[0] == "ok"  # -2**63 beside floats: orjson's float for a smaller int too, so checked
    assert parse_rank(lowest, JSON).columns is None



def test_columns_when_every_candidate_sends_every_name_and_when_not() -> None:
    """The transposition for bodies where every candidate sends every name (in any key order) and for bodies where
    each sends as many names but not the same ones: both give the per-candidate values by name."""
    rng = random.Random(1)
    names = [f"f{k}" for k in range(5)]
    full = [{"item_id": f"i{j}", "features": {k: rng.choice([rng.randrange(99), rng.random(), "s", None, [1, "t"]])
                                              for k in rng.sample(names, len(names))}} for j in range(40)]
    shifted = [{"item_id": f"i{j}", "features": {names[(j + k) % 5]: j * k for k in range(3)}} for j in range(40)]
    one = [{"item_id": f"i{j}", "features": {"x": j}} for j in range(5)]
    for cands in (full, shifted, one):
        assert _same(_body(cands))[0] == "ok"
        assert set(parse_rank(_body(cands), JSON).columns or ()) == set().union(*(c["features"] for c in cands))

BAD_CANDIDATES = {
    "not a list": {"item_id": "a"},
    "not an object": ["a"],
    "extra key": [{"item_id": "a", "score": 1}],
    "missing item_id": [{"features": {}}],
    "int item_id": [{"item_id": 5}],
    "empty item_id": [{"item_id": ""}],
    "long item_id": [{"item_id": "x" * 257}],
    "features not an object": [{"item_id": "a", "features": [1]}],
    "long name": [{"item_id": "a", "features": {"n" * 129: 1}}],
    "too many features": [{"item_id": "a", "features": {f"f{k}": 1 for k in range(257)}}],
    "long string": [{"item_id": "a", "features": {"x": "s" * 1025}}],
    "object value": [{"item_id": "a", "features": {"x": {"y": 1}}}],
    "nested list": [{"item_id": "a", "features": {"x": [[1]]}}],
    "long list": [{"item_id": "a", "features": {"x": list(range(257))}}],
    "int at 2**63": [{"item_id": "a", "features": {"x": 2**63}}],
    "int below -2**63": [{"item_id": "b", "features": {"x": -(2**63) - 1}}],
    "int beyond 2**64": [{"item_id": "a", "features": {"x": 2**64 + 5}}],
    "float at 2**63": [{"item_id": "a", "features": {"x": 9.3e18}}],
    "list with a big int": [{"item_id": "a", "features": {"x": [1, 2**63]}}],
    "NaN": [{"item_id": "a", "features": {"x": float("nan")}}],
    "Infinity in a list": [{"item_id": "a", "features": {"x": [float("inf")]}}],
    "second candidate bad": [{"item_id": "a", "features": {"x": 1}}, {"item_id": "b", "features": {"x": {}}}],
}


@pytest.mark.parametrize("case", sorted(BAD_CANDIDATES))
def test_invalid_candidates_get_the_checked_paths_errors(case: str) -> None:
    kind, (status, errors) = _same(_body(BAD_CANDIDATES[case]))
    assert kind == "error" and status == 422 and errors
    assert all(loc[:2] == ("body", "candidates") for loc, _ in errors), errors


@pytest.mark.parametrize("body, content_type, status", [
    (b'{"candidates": [], "top_k": 0}', JSON, 422),
    (b'{"candidates": [], "surplus": 1}', JSON, 422),
    (b'{"candidates": [], "context": {"x": "\\ud800"}}', JSON, 422),  # orjson refuses it: the checked path names it
    (b'{"candidates": [{"item_id": "\\udc00"}]}', JSON, 422),
    (b'{"candidates": [', JSON, 422),
    (b'[1, 2]', JSON, 422),
    (b'"text"', JSON, 422),
    (b'', JSON, 422),
    (b'{"candidates": []}', None, 422),
    (b'{"candidates": []}', "text/plain", 422),
    (b'{"candidates": ["\xff"]}', JSON, 400),
])
def test_other_invalid_bodies_answer_as_fastapi(body: bytes, content_type: str | None, status: int) -> None:
    kind, (got_status, _) = _same(body, content_type)
    assert (kind, got_status) == ("error", status)


def test_a_json_content_type_with_parameters_or_suffix_is_json() -> None:
    for ct in ("application/json; charset=utf-8", "application/vnd.mtrank+json", "Application/JSON"):
        assert parse_rank(b'{"candidates": [{"item_id": "a"}]}', ct).item_ids == ["a"]


def _as_columns(cands: list[dict[str, Any]]) -> dict[str, Any]:
    names = sorted(set().union(*(c.get("features", {}) for c in cands)))
    return {"item_id": [c["item_id"] for c in cands],
            "features": {k: [c.get("features", {}).get(k) for c in cands] for k in names}}


def test_the_column_form_takes_the_fast_path_and_carries_the_same_values() -> None:
    rng = random.Random(1)
    for n in (0, 1, 9, 60):
        rows = _valid_candidates(rng, n)
        body = _body(_as_columns(rows), top_k=2)
        kind, (_, ids, cols) = _same(body)
        got = parse_rank(body, JSON)
        assert kind == "ok" and got.columnar and got.item_features is None and ids == [c["item_id"] for c in rows]
        listed = parse_rank(_body(rows, top_k=2), JSON)  # the list form of the same candidates
        assert {k: list(v) for k, v in (listed.columns or {}).items()} == {k: v for k, v in cols.items() if any(
            k in c.get("features", {}) for c in rows)} | {k: [None] * n for k, v in cols.items() if not any(
                k in c.get("features", {}) for c in rows)}
    assert _same(_body({"item_id": ["a"]}))[0] == "ok"


BAD_COLUMNS = {
    "no item_id": {"features": {"x": [1]}},
    "item_id not a list": {"item_id": "a"},
    "int item_id": {"item_id": [1]},
    "extra key": {"item_id": ["a"], "score": [1]},
    "features a list": {"item_id": ["a"], "features": [[1]]},
    "column not a list": {"item_id": ["a"], "features": {"x": 1}},
    "long name": {"item_id": ["a"], "features": {"n" * 129: [1]}},
    "bad value": {"item_id": ["a"], "features": {"x": [{"y": 1}]}},
    "int too big": {"item_id": ["a"], "features": {"x": [2**63]}},
    "short column": {"item_id": ["a", "b"], "features": {"x": [1]}},
    "long column": {"item_id": ["a"], "features": {"x": [1, 2]}},
}


@pytest.mark.parametrize("case", sorted(BAD_COLUMNS))
def test_invalid_columns_get_the_checked_paths_errors(case: str) -> None:
    kind, (status, errors) = _same(_body(BAD_COLUMNS[case]))
    assert kind == "error" and status == 422 and errors
    assert all(loc[:2] == ("body", "candidates") for loc, _ in errors), errors
    if "column" in case and "not" not in case:
        assert errors == [(("body", "candidates", "features", "x"), "column_length")]
