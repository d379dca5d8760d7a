"""HTTP routes: /rank, /feedback, /models, /routing, /healthz, /readyz, /metrics, /admin/*.

Handlers get what they need through dependencies (``Depends``): the app's :class:`Services`, the
model serving *at the start of the request* (a reload during the request does not affect it), and
the admin bearer-token check. ``POST /rank`` reaches its endpoint through :class:`RankDispatch` (the same
dependency functions and exception handlers, without FastAPI's routing).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import random
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service import fusion as fusion_mod
from service.errors import error_body
from service.feature_store import FeatureStore, StoreResult
from service.feedback import Event, IngestResult, JoinStore, JoinStoreUnavailable, PutResult
from service.feedback.log import FeedbackLog
from service.metrics import Metrics
from service.monitor import Monitor
from service.observe import Observability
from service.rank_body import parse_rank
from service.rank_response import response_json
from service.registry import Registry, ReloadError
from service.schemas import (
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelsResponse,
    RankOptions,
    RankResponse,
    ReloadRequest,
    ReloadResponse,
    RoutingResponse,
    ShadowRequest,
    ShadowResponse,
)
from service.scorer import InputError, Model, Ranked, RankInput, Scored, clock, order_scored
from service.settings import Settings
from service.shadow import Shadow


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    registry: Registry
    store: FeatureStore
    joins: JoinStore  # prediction log + feedback (shared by workers / replicas, see service.feedback)
    feedback_log: FeedbackLog  # joined labels, appended for `mtrank calibrate` (service.feedback.log)
    executor: ThreadPoolExecutor  # inference + calibration, prediction log, statistics kept: off the event loop
    obs: Observability
    monitor: Monitor
    shadow: Shadow


# Dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in a thread pool, two
# thread hand-offs per request for what are attribute reads.
async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_model(svc: ServicesDep) -> Model:
    model = svc.registry.current  # grabbed once: this request finishes on this model
    if model is None:
        raise HTTPException(503, detail="no model loaded yet")
    return model


ModelDep = Annotated[Model, Depends(get_model)]
_bearer = HTTPBearer(auto_error=False, description="admin.token from the service config")


async def require_admin(svc: ServicesDep,
                        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """The admin bearer-token check (RFC 6750): **403** when the admin API is disabled (no ``admin.token``
    configured), whatever the request sends; **401** with ``WWW-Authenticate: Bearer`` when the request has
    no bearer credentials (no ``Authorization`` header, another scheme, an empty token); **403** when the
    token is wrong (compared in constant time)."""
    token = svc.settings.admin.token
    if token is None:
        raise HTTPException(403, detail="admin API disabled: no admin.token configured")
    if creds is None:
        raise HTTPException(401, detail="missing bearer token (Authorization: Bearer <admin.token>)",
                            headers={"WWW-Authenticate": 'Bearer realm="mtrank-admin"'})
    if not hmac.compare_digest(creds.credentials.encode(), token.get_secret_value().encode()):
        raise HTTPException(403, detail="invalid bearer token")


_BODY_ERRORS: dict[int | str, dict[str, Any]] = {  # what any operation that reads a JSON body can answer
    400: {"model": ErrorResponse, "description": "Python's JSON parser failed (invalid UTF-8, nesting too deep, an "
                                                 "integer over 4300 digits); detail says which"},
    413: {"model": ErrorResponse, "description": "Body over limits.max_body_bytes"},
    422: {"model": ErrorResponse, "description": "Invalid request (also: invalid JSON, with line and column; no JSON "
                                                 "content type); detail[].loc names the field"},
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    **_BODY_ERRORS,
    503: {"model": ErrorResponse, "description": "No model loaded yet"},
}
_ADMIN: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No bearer token",
          "headers": {"WWW-Authenticate": {"description": "Bearer (RFC 6750)", "schema": {"type": "string"}}}},
    403: {"model": ErrorResponse, "description": "Wrong token, or the admin API is disabled (no admin.token)"},
}
_ADMIN_BODY = {**_ADMIN, **_BODY_ERRORS}
router = APIRouter()


# ------------------------------------------------------------------------------------- /rank


# Request ids come from a generator of their own (seeded from os.urandom, reseeded in a forked child):
# the module-level ``random`` is seeded by whoever calls ``random.seed`` in this process (the trainer in
# ``mtrank demo`` does), which would repeat ids across runs.
_request_ids = random.Random()
os.register_at_fork(after_in_child=_request_ids.seed)


def new_request_id() -> str:
    """128 random bits as 32 hex digits: a join key, not a secret. Not ``uuid4()``: its ``os.urandom``
    syscall per request showed up in a profile of the event loop (A/B in docs/benchmarks.md)."""
    return f"{_request_ids.getrandbits(128):032x}"


def _check_candidates(item_ids: list[str], max_candidates: int, columnar: bool) -> None:
    n = len(item_ids)
    if n > max_candidates:
        raise InputError(("body", "candidates") + (("item_id",) if columnar else ()),
                         f"{n} candidates exceed the limit of {max_candidates}")
    if len(set(item_ids)) != n:
        first: dict[str, int] = {}
        for j, i in enumerate(item_ids):
            if i in first:
                loc, at = (("item_id", j), f"item_id.{first[i]}") if columnar else ((j, "item_id"), str(first[i]))
                raise InputError(("body", "candidates", *loc), f"duplicate item_id {i!r} (also at candidates.{at})")
            first[i] = j


def _choose_fusion(svc: Services, model: Model, req: RankOptions, request_id: str
                   ) -> tuple[fusion_mod.Fusion, str, str | None]:
    s = svc.settings
    if req.fusion is not None:
        f = model.fusion_for(req.fusion, s.fusion.allow_request_expressions, s.limits.max_expression_chars)
        return f, req.fusion, None
    arm = fusion_mod.choose_arm(req.user_id or request_id, [(a.name, a.traffic) for a in s.experiments],
                                s.experiment_salt)
    if arm is None:
        return model.profiles[s.fusion.default], s.fusion.default, "default"
    profile = next(a.profile for a in s.experiments if a.name == arm)
    return model.profiles[profile], profile, arm


def _json(body: dict[str, Any] | bytes, background: BackgroundTask | None = None, status_code: int = 200) -> Response:
    """A response we built ourselves (shape = RankResponse, or ErrorResponse), serialised straight to JSON bytes with
    orjson (it replaced pydantic-core's ``to_json``, itself ~4x cheaper than validating the items against the model),
    or already serialised (``service.rank_response.response_json``)."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status_code=status_code, media_type="application/json", background=background)


RANK_PATH = "/rank"  # the route's path, and what RankDispatch takes
_RANK_BODY = {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/RankRequest"}, {"$ref": "#/components/schemas/RankColumnsRequest"}]}}}}


@router.post(RANK_PATH, response_model=RankResponse, tags=["ranking"], openapi_extra={"requestBody": _RANK_BODY},
             responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "request_id already used (ids are single-use)"}},
             summary="Rank candidates for one request")
async def rank_items(request: Request, svc: ServicesDep, model: ModelDep) -> Response:
    """Scores every candidate for every task with the active bundle, fuses the calibrated scores
    with the chosen profile (request ``fusion``, else the user's experiment arm, else the default
    profile) and returns them best first. The candidates come as a list of objects (``RankRequest``) or
    as columns (``RankColumnsRequest``: less JSON to send and to parse)."""
    body = parse_rank(await request.body(), request.headers.get("content-type"))  # the body as RankRequest documents it
    req, item_ids = body.options, body.item_ids
    _check_candidates(item_ids, svc.settings.limits.max_candidates, body.columnar)
    request_id = req.request_id or new_request_id()
    fusion, fusion_name, arm = _choose_fusion(svc, model, req, request_id)
    n = len(item_ids)
    svc.metrics.candidates.observe(n)
    svc.metrics.fusion.labels(fusion_name if fusion_name in model.profiles else "<expression>", arm or "<request>").inc()
    base = {"request_id": request_id, "model_version": model.version, "fusion": fusion_name, "arm": arm}
    if n == 0:
        model.check_request(RankInput(req.user_id, req.context, [], []),
                            svc.settings.limits.unknown_features == "reject")  # same 422s as with items
        return _json({**base, "degraded": False, "items": []})
    store = await svc.store.fetch(req.user_id, item_ids, model.has_user_features, model.has_item_features)
    inp = RankInput(req.user_id, req.context, item_ids, body.item_features, body.columns, body.columnar)
    # The request's Python runs here, on the event loop; the inference thread gets what runs without the GIL (the
    # graph) and what may block (the prediction log). Python on one thread, not two, is less GIL contention:
    # 1.16x req/s with the int8 bundle, 1.10x with fp32 (docs/benchmarks.md, table of changes).
    t0 = clock()
    inputs = model.encode(inp, store, svc.settings.limits.unknown_features == "reject")
    t1 = clock()
    served = n if req.top_k is None else min(req.top_k, n)
    scored, logged = await asyncio.get_running_loop().run_in_executor(
        svc.executor, _score_logged, svc, model, inputs, item_ids, arm, request_id, served)
    scored.record("features", t0, t1)
    ranked = order_scored(scored, fusion, n, req.top_k)
    for stage, seconds in ranked.scored.timings.items():
        svc.metrics.stage.labels(stage).observe(seconds)
    for stage, seconds in ranked.scored.cpu.items():
        svc.metrics.stage_cpu.labels(stage).inc(seconds)
    if logged == "reused" and req.request_id is not None:
        return _request_id_reused(request_id)
    body = response_json({**base, "degraded": store.degraded}, item_ids, ranked, model.task_names, req.raw_scores,
                         req.return_task_scores)
    return _json(body, BackgroundTask(_after_rank, svc, inp, store, fusion_name, ranked))


class RankDispatch:
    """ASGI middleware: ``POST /rank`` straight to :func:`rank_items`, every other request on to ``app``.

    FastAPI's path to an endpoint (its own middleware, the router, dependency solving) cost about 0.6 ms of CPU per
    500-candidate request (docs/benchmarks.md, table of changes), more than the response's JSON. This takes
    the route's own parts, in the route's order: the dependencies' functions (:func:`get_services`,
    :func:`get_model`: a 503 without a model), the endpoint, and on an exception the app's handler for it (looked up
    as Starlette's ``ExceptionMiddleware`` does: a status code first, then the exception's classes), so the answers
    are the route's, byte for byte (``tests/service/test_api.py``). An exception without a handler propagates, as
    through the route. Installed inside the metrics and body-limit middleware, which see every request either way;
    the route stays registered for the OpenAPI contract and for any request this does not take (another method, a
    ``root_path``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != RANK_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            svc = await get_services(request)
            response = await rank_items(request, svc, await get_model(svc))
        except Exception as exc:
            handler = _exception_handler(request.app.exception_handlers, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


def _exception_handler(handlers: dict[Any, Callable[..., Any]], exc: Exception) -> Callable[..., Any] | None:
    """The app's handler for ``exc``: by status code for an HTTP exception, else the nearest of its classes."""
    if isinstance(exc, StarletteHTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    return next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)


def _score_logged(svc: Services, model: Model, inputs: Mapping[str, np.ndarray], item_ids: list[str], arm: str | None,
                  request_id: str, served: int) -> tuple[Scored, PutResult]:
    """Inference thread: the graph run and calibration (``Model.score_inputs``); the prediction-log write, before
    the response, so feedback sent right after it joins (SQLite and Redis writes block); then the model's statistics
    (``service.observe``) from the same arrays, unless the log refused the request id as already used (the request
    is then answered 409, nothing of it counted)."""
    sc = model.score_inputs(inputs)
    t0 = clock()
    logged = svc.joins.put(request_id, model.version, arm, item_ids, model.task_names, sc.raw, sc.calibrated)
    t1 = clock()
    sc.record("log", t0, t1)
    if logged != "reused":
        svc.obs.observe(model, sc, len(item_ids), arm, served)
        sc.record("observe", t1, clock())
    return sc, logged


def _request_id_reused(request_id: str) -> Response:
    """409 for a request id the prediction log already holds (ids are single-use: docs/service.md, "/feedback")."""
    msg = (f"request_id {request_id!r} was already used by a ranked request; request ids are single-use "
           "(send a new one, or none to have one generated)")
    return _json(error_body([{"loc": ("body", "request_id"), "msg": msg, "type": "request_id_reused"}]), status_code=409)


async def _after_rank(svc: Services, inp: RankInput, store: StoreResult, fusion: str, ranked: Ranked) -> None:
    """After the response is sent: offer the request to the shadow (O(1); a full queue drops it)."""
    svc.shadow.offer(inp, store, fusion, ranked)


# ---------------------------------------------------------------------------------- /feedback


@router.post("/feedback", response_model=FeedbackResponse, tags=["ranking"],
             responses={**_ERRORS, 503: {"model": ErrorResponse, "description": "No model, or the feedback store is unavailable"}},
             summary="Record labels for ranked items")
async def feedback(body: FeedbackRequest, svc: ServicesDep, model: ModelDep) -> FeedbackResponse:
    """Labels must name tasks of the active bundle (binary tasks: 0 or 1). The whole batch is
    validated before anything is stored. A (request, item, task) label counts once, on any worker or
    replica: an event adding no new label is a duplicate. Joined labels feed the calibration and
    experiment counters."""
    limit = svc.settings.limits.max_feedback_events
    if len(body.events) > limit:
        raise InputError(("body", "events"), f"{len(body.events)} events exceed the limit of {limit}")
    events = []
    for i, ev in enumerate(body.events):
        for task, value in ev.labels.items():
            if task not in model.task_set:
                raise InputError(("body", "events", i, "labels", task),
                                 f"unknown task {task!r} (tasks of {model.version}: {model.task_names})")
            if model.task_types.get(task, "binary") == "binary" and value not in (0.0, 1.0):
                raise InputError(("body", "events", i, "labels", task), f"binary task label must be 0 or 1, got {value}")
        events.append((ev.request_id, ev.item_id, dict(ev.labels)))
    try:
        res = await run_in_threadpool(_ingest_logged, svc, events)
    except JoinStoreUnavailable as err:
        raise HTTPException(503, detail=f"feedback store unavailable; retry (labels already recorded count as duplicates): {err}") from None
    binary = frozenset(t for t, kind in model.task_types.items() if kind == "binary")
    svc.obs.observe_feedback(res.labels, binary)
    m = svc.metrics.feedback
    if res.accepted:
        m.labels("accepted").inc(res.accepted)
    if res.duplicates:
        m.labels("duplicate").inc(res.duplicates)
    if res.joined:
        m.labels("joined").inc(res.joined)
    if res.accepted - res.joined:
        m.labels("unjoined").inc(res.accepted - res.joined)
    return FeedbackResponse(accepted=res.accepted, duplicates=res.duplicates, joined=res.joined)


def _ingest_logged(svc: Services, events: list[Event]) -> IngestResult:
    """Worker thread: record and join the events, then append the joined labels to the feedback log (which
    never raises: a log failure is counted, and the labels are recorded already)."""
    res = svc.joins.ingest(events)
    svc.feedback_log.append(res.labels)
    return res


# ------------------------------------------------------------------------------- operations


@router.get("/models", response_model=ModelsResponse, tags=["operations"], summary="Loaded model versions")
async def models(svc: ServicesDep) -> Any:
    reg = svc.registry
    cur, prev, shadow = reg.current, reg.previous, reg.shadow
    tasks = [] if cur is None else [
        {"name": t.name, "type": t.type, "derived": t.derived, "calibrated": t.name in cur.calibration}
        for t in cur.manifest.tasks]
    shadow_info = None if shadow is None else {
        "version": shadow.version, "arch": shadow.manifest.arch, "sample": svc.settings.shadow.sample,
        "queue_size": svc.settings.shadow.queue_size, "pending": svc.shadow.worker.pending()}
    return {"active": cur.version if cur else None, "previous": prev.version if prev else None,
            "shadow": shadow_info, "loaded": reg.loaded_versions(), "current_pointer": reg.pointer(),
            "available": reg.available(), "tasks": tasks, "last_error": reg.last_error, "last_reload": reg.last_reload}


@router.get("/routing", response_model=RoutingResponse, tags=["operations"],
            summary="Routing checks, score drift and calibration over the monitoring window")
async def routing(svc: ServicesDep) -> Any:
    """Re-evaluates the window (all workers of this host) and returns, per gate of the active bundle,
    live and reference mean expert weights, entropy, and each check's value, threshold and status."""
    return await run_in_threadpool(svc.monitor.evaluate)


@router.get("/healthz", tags=["operations"], summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], summary="Readiness: 200 once a bundle is loaded and warmed",
            responses={503: {"description": "No model loaded yet"}})
async def readyz(svc: ServicesDep, response: Response) -> dict[str, Any]:
    cur = svc.registry.current
    if cur is None:
        response.status_code = 503
        return {"status": "not ready", "reason": "no model loaded", "last_error": svc.registry.last_error}
    return {"status": "ready", "model_version": cur.version}


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
async def metrics(svc: ServicesDep) -> Response:
    body, content_type = await run_in_threadpool(_render_metrics, svc)
    return Response(body, media_type=content_type)


def _render_metrics(svc: Services) -> tuple[bytes, str]:
    """Off the event loop: this worker's kept per-request statistics counted first (waiting for a flush under way;
    the other workers' flush every ``monitoring.flush_interval_s``), then the exposition."""
    svc.obs.flush()
    return svc.metrics.render()


# ------------------------------------------------------------------------------------ admin


def _outcome(o: Any, receivers: int | None = None) -> dict[str, Any]:
    return {"status": o.status, "active": o.active, "previous": o.previous, "receivers": receivers}


def _reload_failed(err: ReloadError) -> Exception:
    """The HTTP answer to a ReloadError, always with its public message (names versions, never server paths):
    422 naming ``body.version`` (a name breaking the version rule), 404 (unknown version), 503 (the reload
    channel is unreachable), else 409 (the bundle failed a check, or a precondition does not hold). Nothing
    changed in any of them."""
    if err.invalid:
        return InputError(("body", "version"), err.public)
    return HTTPException(404 if err.not_found else 503 if err.unavailable else 409, detail=err.public)


@router.post("/admin/reload", response_model=ReloadResponse, tags=["admin"], summary="Load a bundle version",
             dependencies=[Depends(require_admin)],
             responses={**_ADMIN_BODY, 404: {"model": ErrorResponse},
                        409: {"model": ErrorResponse, "description": "The bundle failed a check; the old one keeps serving"},
                        502: {"model": ErrorResponse, "description": "broadcast: loaded here, but the publish failed"},
                        503: {"model": ErrorResponse, "description": "broadcast: the reload channel is unreachable"}})
async def admin_reload(svc: ServicesDep, body: ReloadRequest | None = None) -> Any:
    """Loads ``version`` (default: what CURRENT names), verifies and warms it in a worker thread,
    then swaps it in. With ``broadcast``, also publishes the version on the reload channel so
    every worker and replica follows."""
    body = body or ReloadRequest()
    try:
        if body.broadcast:  # preconditions first: an error answer means nothing changed
            await run_in_threadpool(svc.registry.check_broadcast)
        outcome = await run_in_threadpool(svc.registry.reload, body.version, "admin")
    except ReloadError as err:
        raise _reload_failed(err) from None
    receivers = None
    if body.broadcast:
        try:
            receivers = await run_in_threadpool(svc.registry.publish, body.version)
        except ReloadError as err:  # Redis went away between the check and the publish: say what did change
            raise HTTPException(502, detail=f"{outcome.status} {outcome.active} on this worker, but {err.public}; "
                                            "retry the broadcast") from None
    return _outcome(outcome, receivers)


@router.post("/admin/rollback", response_model=ReloadResponse, tags=["admin"],
             summary="Serve the previous version again", dependencies=[Depends(require_admin)],
             responses={**_ADMIN, 404: {"model": ErrorResponse}})
async def admin_rollback(svc: ServicesDep) -> Any:
    try:
        outcome = svc.registry.rollback()
    except ReloadError as err:
        raise HTTPException(404, detail=err.public) from None
    return _outcome(outcome)


@router.put("/admin/shadow", response_model=ShadowResponse, tags=["admin"], summary="Set the shadow model",
            dependencies=[Depends(require_admin)],
            responses={**_ADMIN_BODY, 404: {"model": ErrorResponse},
                       409: {"model": ErrorResponse, "description": "The bundle failed a check; no shadow change"}})
async def admin_set_shadow(svc: ServicesDep, body: ShadowRequest) -> Any:
    """Loads ``version`` (verified and warmed like any bundle) into the shadow slot of this worker;
    ``shadow.sample`` of the traffic is then scored by it after each response."""
    try:
        before = await run_in_threadpool(svc.registry.set_shadow, body.version)
    except ReloadError as err:
        raise _reload_failed(err) from None
    return {"shadow": body.version, "previous_shadow": before}


@router.delete("/admin/shadow", response_model=ShadowResponse, tags=["admin"], summary="Clear the shadow model",
               dependencies=[Depends(require_admin)], responses=_ADMIN)
async def admin_clear_shadow(svc: ServicesDep) -> Any:
    before = await run_in_threadpool(svc.registry.set_shadow, None)
    return {"shadow": None, "previous_shadow": before}
