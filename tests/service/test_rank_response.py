"""service.rank_response: the /rank response spliced from orjson's arrays (service._rankjson.splice) is, byte for
byte, orjson's output for the response objects, over random rankings, ids and task names that need escaping,
numbers from subnormal to huge, NaN and infinities; and splice's refusals."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import orjson
import pytest

from service import rank_response
from service.rank_response import response_items, response_json
from service.scorer import Ranked, Scored

SPECIAL = [0.0, -0.0, 1.0, 5e-324, 2.2250738585072014e-308, 1e-7, 0.1, 1 / 3, 123456789.125, 1e21, 1.7976931348623157e308,
           float("nan"), float("inf"), -float("inf")]


def _ranked(rng: random.Random, n: int, tasks: list[str], top_k: int | None) -> Ranked:
    def column(dtype: Any) -> np.ndarray:
        values = [rng.choice(SPECIAL) if rng.random() < 0.2 else rng.uniform(-1e3, 1e3) * rng.random() ** 8
                  for _ in range(n)]
        with np.errstate(over="ignore"):  # huge values become float32 infinities
            return np.array(values, dtype=dtype)

    fused = column(np.float64)
    order = np.argsort(-np.nan_to_num(fused), kind="stable")[:top_k]
    raw = {t: column(np.float32) for t in tasks}
    calibrated = {t: column(np.float32) for t in tasks}
    return Ranked(order, fused, Scored(raw, calibrated, {}))


def _ids(rng: random.Random, n: int) -> list[str]:
    pool = ["i", "é", "漢", '"', "\\", "\n", "\u2028", "\x00", "😀", ",", "}", "]"]
    return [f"{j}" + "".join(rng.choice(pool) for _ in range(rng.randrange(3))) for j in range(n)]


@pytest.mark.parametrize("tasks", [["ctr", "like", "purchase"], ["only"], [], ['q"uote', "é", "back\\slash"]])
def test_spliced_items_are_orjsons_bytes(rankjson: Any, tasks: list[str]) -> None:
    rng = random.Random(len(tasks))
    for n in (0, 1, 2, 17, 500):
        for top_k in (None, 1, 5):
            ranked = _ranked(rng, n, tasks, top_k)
            ids = _ids(rng, n)
            head = {"request_id": "r\"1", "model_version": "v1", "fusion": "default", "arm": None, "degraded": False}
            for raw_scores in (False, True):
                for with_task_scores in (True, False):
                    expected = orjson.dumps({**head, "items": response_items(ids, ranked, tasks, raw_scores,
                                                                             with_task_scores)})
                    assert response_json(head, ids, ranked, tasks, raw_scores, with_task_scores) == expected


def test_without_the_extension_the_objects_are_written(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    ranked, ids = _ranked(rng, 20, ["a", "b"], None), _ids(rng, 20)
    head = {"request_id": "r", "degraded": True}
    monkeypatch.setattr(rank_response, "rankjson", None)
    assert response_json(head, ids, ranked, ["a", "b"], False, True) == \
        orjson.dumps({**head, "items": response_items(ids, ranked, ["a", "b"], False, True)})


def test_head_with_items_is_refused(rankjson: Any) -> None:
    rng = random.Random(4)
    with pytest.raises(ValueError, match="items"):
        response_json({"items": 1, "x": 2}, _ids(rng, 3), _ranked(rng, 3, ["a"], None), ["a"], False, True)


@pytest.mark.parametrize("segments, arrays, error", [
    ((b"<", b">"), (b"[1,2]", b"[3]"), ValueError),  # lengths differ
    ((b"<", b">", b".", b"!"), (b"[1,2]", b"[3,4]"), ValueError),  # k arrays need k + 1 segments
    ((b"<",), (b"[1]",), ValueError),
    ((b"<", b">"), (b"{}",), ValueError),  # not an array
    ((b"<", b">"), (b"[1,]",), ValueError),
    ((b"<", b">"), (b"[1] x",), ValueError),
    ((b"<", b">"), ("[1]",), TypeError),
    (["<", ">"], (b"[1]",), TypeError),
])
def test_splice_refuses_what_is_not_k_arrays_of_n(rankjson: Any, segments: Any, arrays: Any, error: type) -> None:
    with pytest.raises(error):
        rankjson.splice(segments, arrays)


def test_splice_interleaves(rankjson: Any) -> None:
    assert rankjson.splice((b"<", b"|", b">"), (b'["a,]", "b"]', b"[ 1 , [2, {}] ]")) == \
        b'[<"a,]"|1>,<"b"|[2, {}]>]'
    assert rankjson.splice((b"<", b">"), (b"[]",)) == b"[]"
