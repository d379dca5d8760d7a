"""HTTP routes: /rank, /feedback, /models, /healthz, /readyz, /metrics, /admin/reload, /admin/rollback.

Handlers get what they need through dependencies (``Depends``): the app's :class:`Services`, the
model serving *at the start of the request* (a reload during the request does not affect it), and
the admin bearer-token check.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import fusion as fusion_mod
from service.feature_store import FeatureStore
from service.feedback import FeedbackStore, PredictionLog
from service.metrics import Metrics
from service.registry import Registry, ReloadError
from service.schemas import (
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelsResponse,
    RankRequest,
    RankResponse,
    ReloadRequest,
    ReloadResponse,
)
from service.scorer import InputError, Model, RankInput, Scored, rank, response_items
from service.settings import Settings

GateObserver = Callable[[Model, Scored], None]


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    registry: Registry
    store: FeatureStore
    predictions: PredictionLog
    feedback: FeedbackStore
    executor: ThreadPoolExecutor
    # Observability hook: called after each /rank with the model and its scores (raw, calibrated,
    # gate weights [n, m]); runs on the event loop, so keep it cheap (e.g. accumulate means).
    observers: list[GateObserver] = field(default_factory=list)


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
    """403 without a token, with a wrong one, and (``admin API disabled``) when none is configured."""
    token = svc.settings.admin.token
    if token is None:
        raise HTTPException(403, detail="admin API disabled: no admin.token configured")
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.get_secret_value().encode()):
        raise HTTPException(403, detail="invalid or missing bearer token")


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Body over limits.max_body_bytes"},
    422: {"model": ErrorResponse, "description": "Invalid request; detail[].loc names the field"},
    503: {"model": ErrorResponse, "description": "No model loaded yet"},
}
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


def _check_candidates(req: RankRequest, max_candidates: int) -> list[str]:
    n = len(req.candidates)
    if n > max_candidates:
        raise InputError(("body", "candidates"), f"{n} candidates exceed the limit of {max_candidates}")
    ids = [c.item_id for c in req.candidates]
    if len(set(ids)) != n:
        first: dict[str, int] = {}
        for j, i in enumerate(ids):
            if i in first:
                raise InputError(("body", "candidates", j, "item_id"),
                                 f"duplicate item_id {i!r} (also at candidates.{first[i]})")
            first[i] = j
    return ids


def _choose_fusion(svc: Services, model: Model, req: RankRequest, request_id: str
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


def _json(body: dict[str, Any]) -> Response:
    """Serialise a response we built ourselves (shape = RankResponse) straight to JSON bytes in
    pydantic-core: ~4x cheaper than re-validating 1000 items against the response model."""
    return Response(pydantic_core.to_json(body), media_type="application/json")


@router.post("/rank", response_model=RankResponse, responses=_ERRORS, tags=["ranking"],
             summary="Rank candidates for one request")
async def rank_items(req: RankRequest, svc: ServicesDep, model: ModelDep) -> Response:
    """Scores every candidate for every task with the active bundle, fuses the calibrated scores
    with the chosen profile (request ``fusion``, else the user's experiment arm, else the default
    profile) and returns them best first."""
    item_ids = _check_candidates(req, svc.settings.limits.max_candidates)
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
    inp = RankInput(req.user_id, req.context, item_ids, [c.features for c in req.candidates])
    reject = svc.settings.limits.unknown_features == "reject"
    loop = asyncio.get_running_loop()
    ranked = await loop.run_in_executor(svc.executor, rank, model, inp, store, fusion, req.top_k, reject)
    for stage, seconds in ranked.scored.timings.items():
        svc.metrics.stage.labels(stage).observe(seconds)
    svc.predictions.put(request_id, model.version, item_ids, model.task_names, ranked.scored.raw,
                        ranked.scored.calibrated)
    for observe in svc.observers:
        observe(model, ranked.scored)
    items = response_items(item_ids, ranked, model.task_names, req.raw_scores, req.return_task_scores)
    return _json({**base, "degraded": store.degraded, "items": items})


# ---------------------------------------------------------------------------------- /feedback


@router.post("/feedback", response_model=FeedbackResponse, responses=_ERRORS, tags=["ranking"],
             summary="Record labels for ranked items")
async def feedback(body: FeedbackRequest, svc: ServicesDep, model: ModelDep) -> FeedbackResponse:
    """Labels must name tasks of the active bundle (binary tasks: 0 or 1). The whole batch is
    validated before anything is stored. Duplicates (no new label for a (request_id, item_id)) are
    counted, not stored twice."""
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
    res = svc.feedback.ingest(events)
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


# ------------------------------------------------------------------------------- operations


@router.get("/models", response_model=ModelsResponse, tags=["operations"], summary="Loaded model versions")
async def models(svc: ServicesDep) -> Any:
    reg = svc.registry
    cur, prev = reg.current, reg.previous
    tasks = [] if cur is None else [
        {"name": t.name, "type": t.type, "derived": t.derived, "calibrated": t.name in cur.calibration}
        for t in cur.manifest.tasks]
    return {"active": cur.version if cur else None, "previous": prev.version if prev else None,
            "loaded": reg.loaded_versions(), "current_pointer": reg.pointer(), "available": reg.available(),
            "tasks": tasks, "last_error": reg.last_error, "last_reload": reg.last_reload}


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
    body, content_type = svc.metrics.render()
    return Response(body, media_type=content_type)


# ------------------------------------------------------------------------------------ admin


def _outcome(o: Any, receivers: int | None = None) -> dict[str, Any]:
    return {"status": o.status, "active": o.active, "previous": o.previous, "receivers": receivers}


@router.post("/admin/reload", response_model=ReloadResponse, tags=["admin"], summary="Load a bundle version",
             dependencies=[Depends(require_admin)],
             responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                        409: {"model": ErrorResponse, "description": "The bundle failed a check; the old one keeps serving"}})
async def admin_reload(svc: ServicesDep, body: ReloadRequest | None = None) -> Any:
    """Loads ``version`` (default: what CURRENT names), verifies and warms it in a worker thread,
    then swaps it in. With ``broadcast``, also publishes the version on the reload channel so
    every worker and replica follows."""
    body = body or ReloadRequest()
    try:
        outcome = await run_in_threadpool(svc.registry.reload, body.version, "admin")
    except ReloadError as err:
        raise HTTPException(404 if err.not_found else 409, detail=str(err)) from None
    receivers = None
    if body.broadcast:
        try:
            receivers = await run_in_threadpool(svc.registry.publish, body.version)
        except ReloadError as err:
            raise HTTPException(409, detail=str(err)) from None
    return _outcome(outcome, receivers)


@router.post("/admin/rollback", response_model=ReloadResponse, tags=["admin"],
             summary="Serve the previous version again", dependencies=[Depends(require_admin)],
             responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
async def admin_rollback(svc: ServicesDep) -> Any:
    try:
        outcome = svc.registry.rollback()
    except ReloadError as err:
        raise HTTPException(404, detail=str(err)) from None
    return _outcome(outcome)
