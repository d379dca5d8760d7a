"""The /rank response's items, from the ranked arrays: as objects (``response_items``) and as JSON bytes
(``response_json``).

``response_json`` writes what ``orjson.dumps({**head, "items": response_items(...)})`` writes, byte for byte, without
an object per item: orjson writes each column (ids, ranks, scores, one per task) as a JSON array, straight from
numpy for the numbers, and ``service._rankjson.splice`` interleaves the arrays' elements with the fixed parts of an
item (keys, braces). Without the extension (built with no C compiler) it builds the objects.
``tests/service/test_rank_response.py`` holds both to the same bytes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from service.rank_body import rankjson
from service.scorer import Ranked

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_ITEMS_LAST = b'"items":[]}'


def response_items(item_ids: list[str], ranked: Ranked, task_names: list[str], raw_scores: bool,
                   with_task_scores: bool) -> list[dict[str, Any]]:
    """The response rows for the top k (building JSON objects is the only per-item Python)."""
    order = ranked.order
    ids = [item_ids[i] for i in order.tolist()]
    scores = ranked.fused[order].tolist()
    if not with_task_scores:
        return [{"item_id": i, "rank": r, "score": s, "task_scores": None} for r, (i, s) in enumerate(zip(ids, scores), 1)]
    source = ranked.scored.raw if raw_scores else ranked.scored.calibrated
    columns = [source[t][order].astype(np.float64).tolist() for t in task_names]  # [T][k]
    rows = zip(*columns) if columns else [()] * len(ids)  # [k][T]
    return [{"item_id": i, "rank": r, "score": s, "task_scores": dict(zip(task_names, ts))}
            for r, (i, s, ts) in enumerate(zip(ids, scores, rows), 1)]


def response_json(head: dict[str, Any], item_ids: list[str], ranked: Ranked, task_names: list[str], raw_scores: bool,
                  with_task_scores: bool) -> bytes:
    """``orjson.dumps({**head, "items": response_items(item_ids, ranked, ...)})``: the response body."""
    if rankjson is None:
        return orjson.dumps({**head, "items": response_items(item_ids, ranked, task_names, raw_scores,
                                                             with_task_scores)})
    order = ranked.order
    arrays = [orjson.dumps([item_ids[i] for i in order.tolist()]),
              orjson.dumps(np.arange(1, len(order) + 1), option=_NUMPY),
              orjson.dumps(np.ascontiguousarray(ranked.fused[order], dtype=np.float64), option=_NUMPY)]
    if with_task_scores:
        source = ranked.scored.raw if raw_scores else ranked.scored.calibrated
        arrays += [orjson.dumps(source[t][order].astype(np.float64), option=_NUMPY) for t in task_names]
    items = rankjson.splice(_segments(tuple(task_names), with_task_scores), tuple(arrays))
    out = orjson.dumps({**head, "items": []})  # "items" the last key: its empty list is the end of the bytes
    if not out.endswith(_ITEMS_LAST):
        raise ValueError("response_json: head must not hold 'items'")
    return out[: -len(_ITEMS_LAST)] + b'"items":' + items + b"}"


@lru_cache(maxsize=64)
def _segments(task_names: tuple[str, ...], with_task_scores: bool) -> tuple[bytes, ...]:
    """The fixed parts of an item around its ids, rank, score and task score elements (keys escaped by orjson)."""
    head = (b'{"item_id":', b',"rank":', b',"score":')
    if not with_task_scores:
        return (*head, b',"task_scores":null}')
    if not task_names:
        return (*head, b',"task_scores":{}}')
    keys = [orjson.dumps(t) + b":" for t in task_names]
    return (*head, b',"task_scores":{' + keys[0], *(b"," + k for k in keys[1:]), b"}}")
