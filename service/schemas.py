"""HTTP request/response models (pydantic), shown in the OpenAPI document at ``/docs``.

Feature values are JSON scalars (string, number, boolean, null) or, for multi-valued features, a
list of scalars. ``NaN``/``Infinity`` (which Python's JSON parser accepts) are rejected with a 422
naming the field, as are strings over 1024 characters, lists over 256 values and integers beyond
64 bits. Which features are numeric is known only to the loaded bundle, so "numeric feature given a
non-number" is checked by the scorer (also a 422 naming the field).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

MAX_STR = 1024
MAX_LIST = 256
MAX_FEATURES = 256
_I64 = 1 << 63

Id = Annotated[str, Field(min_length=1, max_length=256)]


_NONE = type(None)


def _scalar(v: Any) -> Any:
    t = type(v)  # exact types: json.loads makes no subclasses; dispatch on type() is ~2x isinstance chains
    if t is str:
        if len(v) > MAX_STR:
            raise PydanticCustomError("string_too_long", f"string longer than {MAX_STR} characters")
    elif t is float:
        if v - v != 0.0:  # NaN or +-inf
            raise PydanticCustomError("finite_number", "NaN and Infinity are not allowed")
    elif t is int:
        if not -_I64 <= v < _I64:
            raise PydanticCustomError("int_range", "integer out of the 64-bit range")
    elif t is not bool and t is not _NONE:
        raise PydanticCustomError("feature_type", "must be a string, number, boolean, null or a list of those")
    return v


def _feature_value(v: Any) -> Any:
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


_SCALAR_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
FeatureValue = Annotated[
    Any, BeforeValidator(_feature_value),
    WithJsonSchema({"anyOf": [*_SCALAR_SCHEMA["anyOf"], {"type": "array", "items": _SCALAR_SCHEMA}]}),
]
Features = Annotated[dict[Annotated[str, Field(max_length=128)], FeatureValue], Field(max_length=MAX_FEATURES)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Candidate(_Req):
    item_id: Id = Field(description="Unique within the request; feeds an item feature named item_id if the schema has one")
    features: Features = Field(default_factory=dict, description="Item-side features by schema feature name")


class RankRequest(_Req):
    request_id: Id | None = Field(None, description="Generated (32 random hex digits) when absent; joins /feedback")
    user_id: Id | None = Field(None, description="Feeds a user feature named user_id; keys the feature store and arms")
    context: Features = Field(default_factory=dict, description="User/context-side features by feature name")
    candidates: list[Candidate] = Field(description="Items to rank; empty list -> empty items (200)")
    top_k: int | None = Field(None, ge=1, description="Return the best k (default: all)")
    fusion: str | None = Field(None, min_length=1, max_length=4096,
                               description="Fusion profile name, or an expression when fusion.allow_request_expressions")
    return_task_scores: bool = True
    raw_scores: bool = Field(False, description="Per-task scores before calibration")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "request_id": "r1", "user_id": "u42", "context": {"device": "ios", "hour": 21},
        "candidates": [{"item_id": "i1", "features": {"item_category": "shoes", "item_price": 12.5}},
                       {"item_id": "i2"}],
        "top_k": 10, "fusion": "default", "return_task_scores": True, "raw_scores": False}]})


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


Label = Annotated[float, Field(allow_inf_nan=False)]


class FeedbackEvent(_Req):
    request_id: Id
    item_id: Id
    labels: dict[Annotated[str, Field(max_length=128)], Label] = Field(
        min_length=1, max_length=64, description="Task name -> label (0/1 for binary tasks)")


class FeedbackRequest(_Req):
    events: list[FeedbackEvent] = Field(min_length=1)


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="Events that added at least one new label")
    duplicates: int = Field(description="Events whose labels were all recorded already (first value wins)")
    joined: int = Field(description="Accepted events matched to a kept /rank prediction")


class ReloadRequest(_Req):
    version: Id | None = Field(None, description="Version to load; absent = follow CURRENT")
    broadcast: bool = Field(False, description="Also publish on the reload channel so every worker/replica follows")


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
    version: Id = Field(description="Bundle version to load into the shadow slot")


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


class ErrorResponse(BaseModel):
    detail: Any
