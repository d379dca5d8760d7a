"""The /rank body, from bytes to what the scorer takes: candidates' features as columns, no object per candidate.

The candidates come in one of two forms: a list of objects (``RankRequest``: ``{"item_id", "features": {...}}``
per candidate) or, for clients that can send them, columns (``RankColumnsRequest``: ``{"item_id": [...],
"features": {name: [...]}}``: one key per feature instead of one per value, and no object per candidate to build).

A body of the usual shape (the list form: every candidate ``{"item_id", "features"}`` with the same feature names in
the same order; the column form: ``item_id`` and ``features`` with every column as long as the ids; no escaped keys)
takes the **scanned path**: ``service._rankjson`` (C, built with the package) reads the
candidates in one pass over the bytes with the GIL released, an integer column straight into int64 without a Python
object per value, and checks the item ids when they are plain strings of 1-256 characters; the names and the other
columns come back as JSON text, which ``orjson`` decodes: a column of float literals only into float64 with its range
checked, any other held to the rules by the fast path's column checks (step 3 below); ``orjson`` parses the rest of
the body (the options). The scanner answers "not my case" rather than "invalid", so any body it does not take goes
on to the fast path, and so does every body when the extension is missing (the package was built with no C
compiler).

Any other valid body takes the **fast path**:

1. ``orjson.loads`` on the raw bytes;
2. the fields other than ``candidates`` (a few values) through :class:`service.schemas.RankOptions`;
3. the candidates checked **per column, not per value**: in the list form every candidate an object with
   ``item_id`` (a string of 1-256 characters) and at most ``features``, then per feature name the column of its
   values over the candidates is built (once: the scorer takes it as it is); in the column form the columns are
   there already. Each column is checked with builtins running in C (the set of value types, ``min``/``max`` of
   lengths and of numbers) against the rules of ``service.schemas``; an integer column becomes an int64 array
   (what the encoder hashes from its digits). Only list values (multi-valued features) are checked one by one.

Anything the fast path does not accept (invalid JSON, a lone surrogate, which orjson refuses, any rule broken,
another content type) goes through the **checked path**: FastAPI's own body handling (``json.loads``, then
:class:`service.schemas.RankRequest`, or ``RankColumnsRequest`` when ``candidates`` is an object), so error answers
are exactly those of a route declaring the model; a column form whose features lists are not one value per item
id is then a 422 naming the list (``InputError``). A body the checked path accepts is served from its result, so
the fast path can only make a valid request faster, never refuse it. ``tests/service/test_rank_body.py`` holds
both paths to the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import orjson
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from service.schemas import (
    MAX_FEATURES,
    MAX_ID,
    MAX_NAME,
    MAX_STR,
    RankColumnsRequest,
    RankOptions,
    RankRequest,
    feature_value,
)
from service.scorer import InputError

try:  # the C extension (service/_rankjson.c): the scanned path here, the spliced response in service.rank_response
    from service import _rankjson as rankjson
except ImportError:  # the package was built without a C compiler (the extension is optional; the app logs it)
    rankjson = None

_I64 = 1 << 63
_SCALARS = frozenset({str, int, float, bool, type(None)})
_NUMBERS = frozenset({int, float, bool})
_NO_FEATURES: dict[str, Any] = {}


@dataclass
class RankBody:
    """A valid /rank body: the options, and the candidates as ids and feature columns (``service.scorer.RankInput``'s
    fields: ``item_features`` per candidate for the list form, None for the column form)."""

    options: RankOptions
    item_ids: list[str]  # [n]
    # [n] per candidate, as sent (error messages locate values in them); None: the column form, or a scanned list
    # form (every candidate sent every name of ``columns``)
    item_features: list[Mapping[str, Any]] | None
    # feature name -> [n] values (None: not sent; an integer column as int64, a scanned float column as float64),
    # every name sent. None: not built
    columns: dict[str, list[Any] | np.ndarray] | None
    columnar: bool = False


def is_json(content_type: str | None) -> bool:
    """What FastAPI parses as JSON: application/json or application/*+json (parameters ignored)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_rank(body: bytes, content_type: str | None) -> RankBody:
    """The body of a /rank request; raises ``RequestValidationError`` (422) or ``HTTPException`` (400) as FastAPI
    would for a route declaring ``RankRequest`` (``RankColumnsRequest`` when ``candidates`` is an object), and
    ``InputError`` (422) for a features column whose length is not the number of item ids."""
    if is_json(content_type):
        scanned = _scanned(body) if rankjson is not None else None
        if scanned is not None:
            return scanned
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        fast = _fast(doc) if type(doc) is dict else None
        if fast is not None:
            return fast
    return _checked(body, content_type)


def _scanned(body: bytes) -> RankBody | None:
    """The body through ``service._rankjson``, or None when the scanner does not take it or anything needs the other
    paths' verdict: the scanner checks the structure, reads integer columns and vouches for plain item ids; the item
    ids, names and other columns it hands back as JSON text, decoded here (float columns straight to float64) and
    held to the fast path's rules."""
    got = rankjson.scan(body, MAX_ID)
    if got is None:
        return None
    start, end, ids, ids_checked, names, raw, kinds, columnar = got
    try:
        doc = orjson.loads(body[:start] + b"[]" + body[end:])  # the options: every member but the candidates
        ids, names = orjson.loads(ids), orjson.loads(names)
        columns: dict[str, list[Any] | np.ndarray] = {}
        for name, col, kind in zip(names, raw, kinds):
            checked = np.frombuffer(col, dtype=np.int64) if kind == _INTS else \
                _float_column(orjson.loads(col)) if kind == _FLOATS else _checked_column(orjson.loads(col))
            if checked is None:
                return None
            columns[name] = checked
    except orjson.JSONDecodeError:
        return None
    del doc["candidates"]
    # names: unique (the scanner refuses a repeated or escaped name); their number and lengths are checked here
    if not (ids_checked or _valid_ids(ids)) or len(names) > MAX_FEATURES or (names and max(map(len, names)) > MAX_NAME):
        return None
    try:
        options = RankOptions.model_validate(doc)
    except ValidationError:
        return None
    return RankBody(options, ids, None, columns, columnar=columnar)


def _fast(doc: dict[str, Any]) -> RankBody | None:
    """The body, or None when anything needs the checked path's verdict."""
    cands = doc.pop("candidates", None)
    if type(cands) is not list and type(cands) is not dict:
        return None
    try:
        options = RankOptions.model_validate(doc)
    except ValidationError:
        return None
    if type(cands) is dict:
        return _fast_columns(options, cands)
    if not all(type(c) is dict for c in cands):
        return None
    ids = [c.get("item_id") for c in cands]
    feats = [c.get("features", _NO_FEATURES) for c in cands]
    sent = sum(f is not _NO_FEATURES for f in feats)
    if sum(map(len, cands)) != len(cands) + sent or not _valid_ids(ids):  # only the two keys
        return None
    if not all(type(f) is dict for f in feats) or max(map(len, feats), default=0) > MAX_FEATURES:
        return None
    names: set[str] = set().union(*feats)
    if names and max(map(len, names)) > MAX_NAME:
        return None
    columns = _checked_columns(_transpose(feats, names), len(ids))
    return None if columns is None else RankBody(options, ids, feats, columns)


def _transpose(feats: list[dict[str, Any]], names: set[str]) -> dict[str, list[Any]]:
    """Per-candidate feature objects -> name -> [n] values (None where a candidate does not send the name)."""
    if len(names) > 1 and min(map(len, feats)) == len(names):  # every candidate sends every name (the usual body):
        order = tuple(names)  # one C-level itemgetter per candidate instead of a lookup per value
        return dict(zip(order, map(list, zip(*map(itemgetter(*order), feats)))))
    return {name: [f.get(name) for f in feats] for name in names}


def _fast_columns(options: RankOptions, cands: dict[str, Any]) -> RankBody | None:
    """The column form (``CandidateColumns``): item ids and feature columns as sent, each column checked once."""
    ids, feats = cands.get("item_id"), cands.get("features", _NO_FEATURES)
    if len(cands) != 1 + (feats is not _NO_FEATURES) or type(ids) is not list or not _valid_ids(ids):
        return None
    if type(feats) is not dict or len(feats) > MAX_FEATURES or (feats and max(map(len, feats)) > MAX_NAME):
        return None
    columns = _checked_columns(feats, len(ids))
    return None if columns is None else RankBody(options, ids, None, columns, columnar=True)


_INTS, _FLOATS = ord("i"), ord("f")  # service._rankjson's column kinds


def _within_int64(lowest: float, highest: float) -> bool:
    """The fast paths' bound on a column's numbers: all within (-2**63, 2**63); anything else (-2**63 itself
    included) is left to the checked path."""
    return -_I64 < lowest and highest < _I64


def _float_column(values: list[float]) -> np.ndarray | None:
    """A column the scanner found to hold float literals only (orjson gives finite floats only) as float64 [n];
    None when a value is outside (-2**63, 2**63), which ``_checked_column`` leaves to the checked path too."""
    col = np.array(values, dtype=np.float64)
    return col if _within_int64(col.min(), col.max()) else None


def _valid_ids(ids: list[Any]) -> bool:
    """Every item id a string of 1 to ``MAX_ID`` characters (``service.schemas.Id``)."""
    return all(type(i) is str for i in ids) and (not ids or (1 <= min(map(len, ids)) and max(map(len, ids)) <= MAX_ID))


def _checked_columns(columns: dict[str, Any], n: int) -> dict[str, list[Any] | np.ndarray] | None:
    """Every column a list of ``n`` values passing ``_checked_column``; None at the first that is not."""
    out = {}
    for name, values in columns.items():
        col = _checked_column(values) if type(values) is list and len(values) == n else None
        if col is None:
            return None
        out[name] = col
    return out


def _checked_column(col: list[Any]) -> list[Any] | np.ndarray | None:
    """One feature's values over the candidates, held to the rules of ``service.schemas.feature_value`` (lists value
    by value); an integer column as int64 [n] (what the encoder hashes from its digits). None when a rule fails."""
    types = set(map(type, col))
    if types == {int}:
        try:
            return np.array(col, dtype=np.int64)  # numpy checks the range [-2**63, 2**63)
        except OverflowError:
            return None
    if not _SCALARS.issuperset(types):
        if types - _SCALARS != {list}:
            return None
        try:
            for v in col:
                if type(v) is list:
                    feature_value(v)
        except PydanticCustomError:
            return None
        values = [v for v in col if type(v) is not list]
    else:
        values = col
    if str in types and max(map(len, values) if types == {str} else (len(v) for v in values if type(v) is str)) > MAX_STR:
        return None
    if types & _NUMBERS:
        numbers = values if types <= _NUMBERS else [v for v in values if type(v) is int or type(v) is float]  # bools: 0, 1
        # orjson gives finite floats only (it refuses NaN, Infinity and overflowing literals); strict at -2**63:
        # orjson turns a smaller integer into the float -2**63 (the checked path decides that value)
        if numbers and not _within_int64(min(numbers), max(numbers)):
            return None
    return col


def _checked(body: bytes, content_type: str | None) -> RankBody:
    """FastAPI's handling of a JSON body declared as ``RankRequest`` (fastapi.routing.get_request_handler):
    ``json.loads`` only for a JSON content type (a parse failure is a 422 ``json_invalid`` with the document, any
    other failure a 400), an empty body a missing one, then the model's validation with ``body`` before each loc."""
    doc: Any = body
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}],
                                     body=None)
    if is_json(content_type):
        try:
            doc = json.loads(body)
        except json.JSONDecodeError as e:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": e.msg}}], body=e.doc) from e
        except Exception as e:
            raise HTTPException(400, detail="There was an error parsing the body") from e
    columnar = type(doc) is dict and type(doc.get("candidates")) is dict
    try:
        req = (RankColumnsRequest if columnar else RankRequest).model_validate(doc)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)],
                                     body=doc) from None
    if isinstance(req, RankColumnsRequest):
        n = len(req.candidates.item_id)
        for name, col in req.candidates.features.items():
            if len(col) != n:
                raise InputError(("body", "candidates", "features", name),
                                 f"{len(col)} values for {n} candidates (one per item_id)", "column_length")
        return RankBody(req, req.candidates.item_id, None, dict(req.candidates.features), columnar=True)
    return RankBody(req, [c.item_id for c in req.candidates], [c.features for c in req.candidates], None)
