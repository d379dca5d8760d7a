"""service._rankjson, the C scanner of the /rank body (list form and column form): which bodies it takes, what it
hands back, and that ``parse_rank`` (scanned path first) answers every body as the checked path does, on usual
bodies, on the cases the scanner declines and on a fuzz of mutated bodies (truncated, bytes dropped, inserted or
replaced)."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from service import rank_body
from service.rank_body import parse_rank
from tests.service.test_rank_body import JSON, _same


@pytest.fixture(scope="module")
def scan(rankjson: Any) -> Any:
    return rankjson.scan


NAMES = ["cat", "brand", "price", "tags", "flag", "label", "none", "big", "score"]


def _value(rng: random.Random, name: str) -> Any:
    """One feature value; per name a mix of types, so some columns are all integers and others are not."""
    if name in ("cat", "brand"):
        return rng.randrange(-5, 70_000)
    if name == "big":
        return rng.choice([2**63 - 1, -(2**63) + 1, 10**18, 0])
    if name == "price":
        return rng.choice([rng.random() * 100, rng.randrange(100), 1e-300, -0.0, 12.5e3])
    if name == "tags":
        return rng.choice([["a", 1], [], ["é"], None])
    if name == "flag":
        return rng.random() < 0.5
    if name == "score":  # float literals only (json.dumps writes every float with a fraction or an exponent)
        return rng.choice([rng.random() * 100, -rng.random(), 1.5e-7, -0.0, 3.0, 2.5e17])
    if name == "label":
        return rng.choice(["plain", "é✓ 漢字", 'quote " and \\ backslash', "tab\there", "\u2028", "", "x" * 1024])
    return None


def _usual(rng: random.Random, n: int, names: list[str] = NAMES) -> list[dict[str, Any]]:
    """Candidates as a client sends them: every candidate the same names in the same order."""
    return [{"item_id": rng.choice([f"i{j}", f"é{j}", f"id \"{j}\""]), "features": {k: _value(rng, k) for k in names}}
            for j in range(n)]


def _dumps(doc: Any, rng: random.Random) -> bytes:
    """JSON with a random layout: compact, spaced, indented, ASCII-escaped or not."""
    style = rng.randrange(4)
    if style == 0:
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    elif style == 1:
        text = json.dumps(doc, ensure_ascii=True)
    elif style == 2:
        text = json.dumps(doc, indent=rng.choice([1, "\t"]), ensure_ascii=False)
    else:
        text = " \n" + json.dumps(doc, separators=(" , ", " : "), ensure_ascii=False) + "\r\n"
    return text.encode()


def _columns(cands: list[dict[str, Any]]) -> dict[str, Any]:
    """The same candidates in the column form (``RankColumnsRequest``)."""
    names = list(cands[0]["features"]) if cands else []
    return {"item_id": [c["item_id"] for c in cands], "features": {k: [c["features"][k] for c in cands] for k in names}}


def _doc(cands: Any, **extra: Any) -> dict[str, Any]:
    return {"user_id": "u1", "context": {"device": "ios", "hour": 21, "tags": ["a", 1, None]},
            "candidates": cands, "top_k": 5, **extra}


def test_usual_bodies_are_scanned_and_give_the_checked_paths_request(scan: Any) -> None:
    rng = random.Random(0)
    floats = 0
    for _ in range(60):
        body = _dumps(_doc(_usual(rng, rng.choice([1, 2, 17, 80]))), rng)
        assert scan(body, 256) is not None, body[:200]
        got = parse_rank(body, JSON)
        assert got.item_features is None and not got.columnar, body[:200]  # the scanned path's result
        assert _same(body)[0] == "ok"
        for k in ("cat", "brand", "big"):  # integer columns: int64, no Python object per value
            assert isinstance(got.columns[k], np.ndarray) and got.columns[k].dtype == np.int64
        floats += got.columns["score"].dtype == np.float64  # float columns: float64 unless a value is out of range
    assert floats >= 20


def test_usual_column_form_bodies_are_scanned_and_give_the_checked_paths_request(scan: Any) -> None:
    rng = random.Random(1)
    for _ in range(60):
        body = _dumps(_doc(_columns(_usual(rng, rng.choice([1, 2, 17, 80])))), rng)
        assert scan(body, 256)[7] is True, body[:200]
        got = parse_rank(body, JSON)
        assert got.columnar and isinstance(got.columns["cat"], np.ndarray), body[:200]  # the scanned path's result
        assert _same(body)[0] == "ok"


def test_the_scanners_output(scan: Any) -> None:
    body = (b'{"top_k": 2, "candidates": [{"item_id": "a", "features": {"x": 1, "y": 2.5, "z": "s\\"t", "w": 1e3}},'
            b' {"features": {"x": -7, "y": null, "z": true, "w": -0.5E-2}, "item_id": "b"}], "user_id": "u"}')
    start, end, ids, ids_checked, names, columns, kinds, columnar = scan(body, 256)
    assert body[start:end].startswith(b"[{") and body[start:end].endswith(b"}]") and columnar is False
    assert json.loads(body[:start] + b"[]" + body[end:]) == {"top_k": 2, "candidates": [], "user_id": "u"}
    assert json.loads(ids) == ["a", "b"] and ids_checked is True and json.loads(names) == ["x", "y", "z", "w"]
    assert kinds == b"ijjf"
    assert type(columns[0]) is bytearray and np.frombuffer(columns[0], dtype=np.int64).tolist() == [1, -7]
    assert json.loads(columns[1]) == [2.5, None] and json.loads(columns[2]) == ['s"t', True]
    assert json.loads(columns[3]) == [1000.0, -0.005]
    assert scan(body.replace(b"1e3", b"1000"), 256)[6] == b"ijjj"  # an integer literal: not a float column
    with pytest.raises(TypeError):  # bytes only: the pass reads the body without the GIL
        scan(bytearray(body), 256)


def test_the_scanners_output_for_the_column_form(scan: Any) -> None:
    body = (b'{"top_k": 2, "candidates": {"features": {"x": [1, -7], "y": [2.5, null], "w": [1e3, -0.5E-2]}, '
            b'"item_id": ["a", "b"]}, "user_id": "u"}')
    start, end, ids, ids_checked, names, columns, kinds, columnar = scan(body, 256)
    assert columnar is True and body[start:end].startswith(b'{"features"') and body[start:end].endswith(b'"b"]}')
    assert json.loads(ids) == ["a", "b"] and ids_checked is True and json.loads(names) == ["x", "y", "w"]
    assert kinds == b"ijf" and np.frombuffer(columns[0], dtype=np.int64).tolist() == [1, -7]
    assert json.loads(columns[1]) == [2.5, None] and json.loads(columns[2]) == [1000.0, -0.005]
    assert scan(b'{"candidates": {"item_id": ["a"], "features": {}}}', 256)[4:] == (b"[]", [], b"", True)


@pytest.mark.parametrize(("item_id", "max_id", "checked"), [
    (b'"a"', 1, True), (b'"ab"', 1, False), (b'""', 5, False), (b'"\\u00e9"', 5, False), (b"5", 5, False),
    ("é✓".encode() * 128, 256, True), ("é✓".encode() * 128 + "é".encode(), 256, False)])
def test_item_ids_are_checked_when_they_are_plain_strings_of_1_to_max_id_characters(
        scan: Any, item_id: bytes, max_id: int, checked: bool) -> None:
    """Characters, not bytes ("é✓" is 5 bytes); an escaped or non-string id is left to the caller's check."""
    if not item_id.startswith((b'"', b"5")):
        item_id = b'"' + item_id + b'"'
    body = b'{"candidates": [{"item_id": "k", "features": {}}, {"item_id": ' + item_id + b', "features": {}}]}'
    assert scan(body, max_id)[3] is checked


def _cand(item: str = "a", **feats: Any) -> dict[str, Any]:
    return {"item_id": item, "features": feats}


DECLINED = {  # bodies the scanner leaves to the other paths (valid or not: they decide)
    "escaped top-level key": b'{"cand\\u0069dates": [{"item_id": "a", "features": {"x": 1}}]}',
    "escaped candidate key": b'{"candidates": [{"item_\\u0069d": "a", "features": {"x": 1}}]}',
    "escaped feature name": b'{"candidates": [{"item_id": "a", "features": {"\\u0078": 1}}]}',
    "candidates twice": b'{"candidates": [{"item_id": "a", "features": {}}], "candidates": [{"item_id": "b", "features": {}}]}',
    "names in another order": json.dumps({"candidates": [_cand(x=1, y=2), _cand("b", y=2, x=1)]}).encode(),
    "a name fewer": json.dumps({"candidates": [_cand(x=1, y=2), _cand("b", x=1)]}).encode(),
    "a name more": json.dumps({"candidates": [_cand(x=1), _cand("b", x=1, y=2)]}).encode(),
    "features missing": json.dumps({"candidates": [{"item_id": "a"}]}).encode(),
    "extra key": json.dumps({"candidates": [{**_cand(x=1), "score": 1}]}).encode(),
    "a name twice": b'{"candidates": [{"item_id": "a", "features": {"x": 1, "x": 2}}]}',
    "item_id twice": b'{"candidates": [{"item_id": "a", "item_id": "b", "features": {}}]}',
    "no candidates": b'{"candidates": []}',
    "columns: features missing": b'{"candidates": {"item_id": ["a"]}}',
    "columns: no item ids": b'{"candidates": {"item_id": [], "features": {}}}',
    "columns: item_id not a list": b'{"candidates": {"item_id": "a", "features": {}}}',
    "columns: a column shorter": b'{"candidates": {"item_id": ["a", "b"], "features": {"x": [1, 2], "y": [1]}}}',
    "columns: a column longer": b'{"candidates": {"features": {"x": [1, 2, 3]}, "item_id": ["a", "b"]}}',
    "columns: a column not a list": b'{"candidates": {"item_id": ["a"], "features": {"x": 1}}}',
    "columns: a name twice": b'{"candidates": {"item_id": ["a"], "features": {"x": [1], "x": [2]}}}',
    "columns: escaped name": b'{"candidates": {"item_id": ["a"], "features": {"\\u0078": [1]}}}',
    "columns: escaped key": b'{"candidates": {"item_\\u0069d": ["a"], "features": {}}}',
    "columns: extra key": b'{"candidates": {"item_id": ["a"], "features": {}, "score": [1]}}',
    "columns: item_id twice": b'{"candidates": {"item_id": ["a"], "item_id": ["b"], "features": {}}}',
    "columns: features not an object": b'{"candidates": {"item_id": ["a"], "features": [[1]]}}',
    "no candidates key": b'{"user_id": "u"}',
    "not an object": b'[{"candidates": []}]',
    "empty body": b"",
    "deep options": b'{"context": {"x": ' + b"[" * 70 + b"]" * 70 + b'}, "candidates": [{"item_id": "a", "features": {}}]}',
    "trailing garbage": json.dumps({"candidates": [_cand(x=1)]}).encode() + b" x",
    "trailing comma": b'{"candidates": [{"item_id": "a", "features": {"x": 1,}}]}',
    "leading zero": b'{"candidates": [{"item_id": "a", "features": {"x": 01}}]}',
    "bare minus": b'{"candidates": [{"item_id": "a", "features": {"x": -}}]}',
    "dot without digits": b'{"candidates": [{"item_id": "a", "features": {"x": 1.}}]}',
    "control character": b'{"candidates": [{"item_id": "a\x01", "features": {}}]}',
    "bad escape": b'{"candidates": [{"item_id": "a\\x", "features": {}}]}',
    "short unicode escape": b'{"candidates": [{"item_id": "\\u12", "features": {}}]}',
    "unclosed": b'{"candidates": [{"item_id": "a", "features": {"x": 1}}',
    "NaN literal": b'{"candidates": [{"item_id": "a", "features": {"x": NaN}}]}',
    "single quotes": b"{'candidates': []}",
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_declined_bodies_get_the_other_paths_answer(scan: Any, case: str) -> None:
    body = DECLINED[case]
    assert scan(body, 256) is None
    _same(body)


TAKEN_BUT_REFUSED = {  # scanned (the structure is the usual one), then a value breaks a rule: the checked path decides
    "long string": [_cand(x="s" * 1025)],
    "long item id": [_cand("i" * 257, x=1)],
    "empty item id": [_cand("", x=1)],
    "int item id": [{"item_id": 5, "features": {"x": 1}}],
    "long name": [{"item_id": "a", "features": {"n" * 129: 1}}],
    "too many names": [{"item_id": "a", "features": {f"f{k}": 1 for k in range(257)}}],
    "int at 2**63": [_cand(x=2**63)],
    "int beyond 2**64": [_cand(x=2**64 + 5)],
    "float at 2**63": [_cand(x=9.3e18)],
    "float below -2**63 in a float column": [_cand(x=1.5), _cand("b", x=-9.3e18)],
    "float overflowing": [_cand(x=1.5)],  # the literal is replaced below
    "object value": [_cand(x={"y": 1})],
    "nested list": [_cand(x=[[1]])],
    "second candidate bad": [_cand(x=1), _cand("b", x={})],
    "columns: long string": _columns([_cand(x="s" * 1025)]),
    "columns: object value": _columns([_cand(x=1), _cand("b", x={"y": 1})]),
    "columns: int item id": {"item_id": [5], "features": {"x": [1]}},
    "columns: long item id": _columns([_cand("i" * 257, x=1)]),
}


@pytest.mark.parametrize("case", sorted(TAKEN_BUT_REFUSED))
def test_values_breaking_a_rule_get_the_checked_paths_answer(scan: Any, case: str) -> None:
    body = json.dumps({"candidates": TAKEN_BUT_REFUSED[case]}).encode()
    if case == "float overflowing":
        body = body.replace(b"1.5", b"1e400")
    assert scan(body, 256) is not None and rank_body._scanned(body) is None
    assert _same(body)[0] == "error"


@pytest.mark.parametrize("raw", [b'"\\ud800"', b'"\xff"', b'"\xed\xa0\x80"', b'"a\\u0000b"', b'"\\ud83d\\ude00"'])
def test_strings_the_json_decoder_judges(scan: Any, raw: bytes) -> None:
    """A lone surrogate escape, invalid UTF-8, an encoded surrogate, an escaped NUL, a surrogate pair: the scanner
    passes string values through; orjson then decodes or refuses them, and the answer is the checked path's."""
    body = b'{"candidates": [{"item_id": "a", "features": {"x": ' + raw + b'}}]}'
    assert scan(body, 256) is not None
    _same(body)


def _mutations(rng: random.Random, body: bytes, k: int) -> list[bytes]:
    significant = b'{}[],:"\\-0123456789.eE tfn\x00\x80\xff'
    out = []
    for _ in range(k):
        i = rng.randrange(len(body))
        op = rng.randrange(4)
        if op == 0:
            out.append(body[:i])
        elif op == 1:
            out.append(body[:i] + body[i + 1:])
        elif op == 2:
            out.append(body[:i] + bytes([rng.choice(significant)]) + body[i:])
        else:
            out.append(body[:i] + bytes([rng.choice(significant)]) + body[i + 1:])
    return out


def test_fuzz_mutated_bodies_answer_as_the_checked_path(scan: Any) -> None:
    rng = random.Random(7)
    bodies = scanned = 0
    for _ in range(120):
        names = rng.sample(NAMES, rng.randrange(1, len(NAMES) + 1))
        cands = _usual(rng, rng.randrange(1, 6), names)
        body = _dumps(_doc(_columns(cands) if rng.random() < 0.5 else cands), rng)
        for mutated in [body, *_mutations(rng, body, 60)]:
            scan(mutated, 256)  # never crashes, whatever the bytes
            _same(mutated)
            bodies += 1
            scanned += rank_body._scanned(mutated) is not None
    assert bodies == 120 * 61 and scanned > bodies // 10  # the scanned path itself took a good share
