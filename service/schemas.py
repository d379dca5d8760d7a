"""HTTP request/response models (pydantic), shown in the OpenAPI document at ``/docs``.

Feature values are JSON scalars (string, number, boolean, null) or, for multi-valued features, a
list of scalars. ``NaN``/``Infinity`` (which Python's JSON parser accepts) are rejected with a 422
naming the field, as are strings over 1024 characters or holding a lone UTF-16 surrogate (a
``\\ud800``-style escape without its pair: not Unicode text, and not encodable as UTF-8), lists over 256
values and numbers outside the signed 64-bit range [-2^63, 2^63). Which features are numeric is known
only to the loaded bundle, so "numeric feature given a non-number" is checked by the scorer (also a 422
naming the field). Typed string fields (ids, feature names, label names) get pydantic's own check for
lone surrogates (``string_unicode``).

Types are strict: ``top_k`` takes a JSON integer only (JSON Schema's: ``3`` or ``3.0``), the flags JSON
booleans only, labels JSON numbers only (no ``"1"``, ``true`` or ``0`` where the schema says integer,
number or boolean).

The OpenAPI document states every constraint JSON Schema can express. What depends on the loaded
bundle (feature kinds, task names, binary labels), and the uniqueness of ``item_id`` (JSON Schema
cannot state uniqueness by a key), is marked on the schema node with the extension
``x-mtrank-runtime-check`` (``RUNTIME_CHECK``), whose text says what the server checks on top: a
schema-valid value there can still be a 422 naming it. ``service.openapi`` adds the settings-dependent
limits (``limits.max_candidates``, ``limits.max_feedback_events``, fusion profile names).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from mtrank.bundle import VERSION_PATTERN, VERSION_RULE

MAX_STR = 1024
MAX_LIST = 256
MAX_FEATURES = 256
MAX_NAME = 128
MAX_ID = 256
_I64 = 1 << 63
RUNTIME_CHECK = "x-mtrank-runtime-check"  # OpenAPI extension: what the server checks beyond the JSON Schema

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID)]
Name = Annotated[str, Field(max_length=MAX_NAME)]


_NONE = type(None)
_has_surrogate = re.compile("[\ud800-\udfff]").search  # a lone surrogate (a paired one is one astral code point)


def _scalar(v: Any) -> Any:
    t = type(v)  # exact types: json.loads makes no subclasses; dispatch on type() is ~2x isinstance chains
    if t is str:
        if len(v) > MAX_STR:
            raise PydanticCustomError("string_too_long", f"string longer than {MAX_STR} characters")
        if not v.isascii() and _has_surrogate(v):  # isascii() is O(1) on CPython's ASCII strings: the common case
            raise PydanticCustomError("string_unicode", "lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)")
    elif t is float:
        if v - v != 0.0:  # NaN or +-inf
            raise PydanticCustomError("finite_number", "NaN and Infinity are not allowed")
        if not -_I64 <= v < _I64:
            raise PydanticCustomError("int_range", "number outside the signed 64-bit range [-2^63, 2^63)")
    elif t is int:
        if not -_I64 <= v < _I64:
            raise PydanticCustomError("int_range", "number outside the signed 64-bit range [-2^63, 2^63)")
    elif t is not bool and t is not _NONE:
        raise PydanticCustomError("feature_type", "must be a string, number, boolean, null or a list of those")
    return v


def feature_value(v: Any) -> Any:
    """One feature value; called for every value of every candidate, so kept lean."""
    if type(v) is list:
        if len(v) > MAX_LIST:
            raise PydanticCustomError("too_long", f"list longer than {MAX_LIST} values")
        for x in v:
            if type(x) is list or type(x) is dict:
                raise PydanticCustomError("feature_type", "list values must be scalars")
            _scalar(x)
        return v
    return _scalar(v)


_SCALAR_SCHEMA = {"anyOf": [{"type": "string", "maxLength": MAX_STR},
                             {"type": "number", "minimum": -_I64, "exclusiveMaximum": _I64},
                             {"type": "boolean"}, {"type": "null"}]}
FEATURE_CHECK = ("the loaded bundle's schema: a numeric feature takes a number, a boolean or a plain decimal numeral string "
                 "(optional sign, digits, optional fraction and exponent) with a finite value; a categorical feature a "
                 "scalar, not a list; with limits.unknown_features: reject, a name outside the schema is refused. "
                 "A violation is a 422 naming the feature")
FeatureValue = Annotated[
    Any, BeforeValidator(feature_value),
    WithJsonSchema({"anyOf": [*_SCALAR_SCHEMA["anyOf"], {"type": "array", "maxItems": MAX_LIST, "items": _SCALAR_SCHEMA}],
                    RUNTIME_CHECK: FEATURE_CHECK}),
]
Features = Annotated[dict[Name, FeatureValue], Field(max_length=MAX_FEATURES)]


def _json_integer(v: Any) -> Any:
    """JSON Schema's ``integer`` is a number with a zero fractional part, so ``3.0`` is one (converted to 3);
    strings and booleans pass through to the strict ``int`` check, which refuses them (422)."""
    return int(v) if type(v) is float and v.is_integer() else v



class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Candidate(_Req):
    item_id: Id = Field(description="Unique within the request; feeds an item feature named item_id if the schema has one",
                        json_schema_extra={RUNTIME_CHECK: "unique within the request's candidates (JSON Schema cannot "
                                           "state uniqueness by a key): a duplicate is a 422 naming the later one"})
    features: Features = Field(default_factory=dict, description="Item-side features by schema feature name")


class RankOptions(_Req):
    """Everything of a /rank body but its candidates (``service.rank_body`` checks those column by column)."""

    request_id: Id | None = Field(None, description="Generated (32 random hex digits) when absent; joins /feedback")
    user_id: Id | None = Field(None, description="Feeds a user feature named user_id; keys the feature store and arms")
    context: Features = Field(default_factory=dict, description="User/context-side features by feature name")
    top_k: Annotated[int, Field(strict=True, ge=1), BeforeValidator(_json_integer)] | None = Field(
        None, description="Return the best k (default: all)")
    fusion: str | None = Field(None, min_length=1, max_length=4096,
                               description="Fusion profile name, or an expression when fusion.allow_request_expressions")
    return_task_scores: bool = Field(True, strict=True, description="false: task_scores is null")
    raw_scores: bool = Field(False, strict=True, description="Per-task scores before calibration")


class RankRequest(RankOptions):
    candidates: list[Candidate] = Field(description="Items to rank; empty list -> empty items (200)")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "request_id": "r1", "user_id": "u42", "context": {"device": "ios", "hour": 21},
        "candidates": [{"item_id": "i1", "features": {"item_category": "shoes", "item_price": 12.5}},
                       {"item_id": "i2"}],
        "top_k": 10, "fusion": "default", "return_task_scores": True, "raw_scores": False}]})


COLUMN_CHECK = ("every features list holds one value per item_id (JSON Schema cannot state equal lengths): "
                "a list of another length is a 422 naming it")


class CandidateColumns(_Req):
    """The candidates as columns: candidate j is ``item_id[j]`` with ``features[name][j]`` for every name (null:
    not sent). The same candidates as the list form, in less JSON: one key per feature, not per value."""

    item_id: list[Id] = Field(description="One per candidate, unique within the request; the candidates' order",
                              json_schema_extra={RUNTIME_CHECK: "unique (a duplicate is a 422 naming the later one)"})
    features: Annotated[dict[Name, list[FeatureValue]], Field(max_length=MAX_FEATURES)] = Field(
        default_factory=dict, description="Feature name -> one value per candidate (null: not sent for that one)",
        json_schema_extra={RUNTIME_CHECK: COLUMN_CHECK})


class RankColumnsRequest(RankOptions):
    """``RankRequest`` with the candidates as columns (``CandidateColumns``)."""

    candidates: CandidateColumns = Field(description="Items to rank, as columns; no item_id -> empty items (200)")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "user_id": "u42", "context": {"device": "ios", "hour": 21},
        "candidates": {"item_id": ["i1", "i2"], "features": {"item_category": ["shoes", None], "item_price": [12.5, 3]}},
        "top_k": 10}]})


class RankedItem(BaseModel):
    item_id: str
    rank: int = Field(description="1-based")
    score: float = Field(description="Fused score (ranking key)")
    task_scores: dict[str, float] | None = Field(None, description="Per task: calibrated (default) or raw")


class RankResponse(BaseModel):
    request_id: str
    model_version: str
    fusion: str = Field(description="Profile name used, or the request's expression")
    arm: str | None = Field(description="Experiment arm; null when the request named its fusion")
    degraded: bool = Field(False, description="The feature store failed; request features + defaults were used")
    items: list[RankedItem]


LABEL_CHECK = ("the key names a scored task of the active bundle (GET /models: tasks); a binary task's label is 0 or 1. "
               "A violation is a 422 naming the label")
Label = Annotated[float, Field(allow_inf_nan=False, strict=True, json_schema_extra={RUNTIME_CHECK: LABEL_CHECK})]


class FeedbackEvent(_Req):
    request_id: Id
    item_id: Id
    labels: dict[Annotated[str, Field(min_length=1, max_length=MAX_NAME)], Label] = Field(
        min_length=1, max_length=64, description="Task name -> label (0/1 for binary tasks); JSON numbers only")


class FeedbackRequest(_Req):
    events: list[FeedbackEvent] = Field(min_length=1)


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="Events that added at least one new label")
    duplicates: int = Field(description="Events whose labels were all recorded already (first value wins)")
    joined: int = Field(description="Accepted events matched to a kept /rank prediction")


class ReloadRequest(_Req):
    version: Id | None = Field(None, pattern=VERSION_PATTERN,
                               description=f"Version to load; absent = follow CURRENT. A version name: {VERSION_RULE}")
    broadcast: bool = Field(False, strict=True,
                            description="Also publish on the reload channel so every worker/replica follows")


class ModelError(BaseModel):
    version: str | None
    error: str
    trigger: str
    at: str


class ShadowInfo(BaseModel):
    version: str
    arch: str
    sample: float = Field(description="Fraction of /rank requests scored by the shadow")
    queue_size: int
    pending: int = Field(description="Shadow jobs waiting in this worker's queue")


class ModelsResponse(BaseModel):
    active: str | None
    previous: str | None
    shadow: ShadowInfo | None = Field(None, description="The model in the shadow slot, if any")
    loaded: list[str]
    current_pointer: str | None = Field(description="What BUNDLES_DIR/CURRENT names now")
    available: list[str]
    tasks: list[dict[str, Any]]
    last_error: ModelError | None
    last_reload: dict[str, Any] | None


class ReloadResponse(BaseModel):
    status: Literal["loaded", "unchanged", "rolled_back"]
    active: str | None
    previous: str | None
    receivers: int | None = Field(None, description="broadcast: subscribers that got the reload message")


class ShadowRequest(_Req):
    version: Id = Field(pattern=VERSION_PATTERN,
                        description=f"Bundle version to load into the shadow slot. A version name: {VERSION_RULE}")


class ShadowResponse(BaseModel):
    shadow: str | None
    previous_shadow: str | None


class CheckResult(BaseModel):
    value: float | None = Field(description="The checked statistic; null when not evaluated")
    threshold: float
    fails_when: Literal["above", "below"]
    status: Literal["pass", "fail", "insufficient_data"]


class GateRouting(BaseModel):
    output: str = Field(description="The gate's ONNX output")
    level: int
    task: str = Field(description="The task the gate serves, or 'shared'")
    experts: list[str]
    candidates: int = Field(description="Candidates through this gate in the window")
    live_mean: list[float | None] | None = Field(description="Mean weight per expert over the window")
    reference_mean: list[float | None] = Field(description="Mean weight per expert on the validation split")
    live_top1_share: list[float | None] | None
    live_entropy: float | None = Field(description="Mean normalised entropy (0..1) over the window")
    reference_entropy: float | None
    checks: dict[str, CheckResult] = Field(description="divergence, dead_expert, collapse, entropy")


class RoutingResponse(BaseModel):
    model_version: str | None
    evaluated_at: str | None = None
    window_s: float
    span_s: float | None = Field(None, description="Seconds the window actually covers (shorter after a start or swap)")
    min_candidates: int | None = None
    status: Literal["pass", "fail", "insufficient_data"]
    gates: list[GateRouting]
    drift: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per task: PSI of served scores")
    calibration: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per binary task: windowed ECE")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where: 'body', then keys and list indices")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: ``detail`` is a message, or (422) the list of errors; 422s add ``message``."""

    detail: str | list[ErrorItem]
    message: str | None = Field(None, description="422: the errors on one line, 'body.candidates.3.item_id: ...; ...'")
