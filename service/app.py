"""The FastAPI application: wiring, lifespan, middleware and error handlers.

``create_app(settings)`` builds every component (metrics, feature store, registry, join store,
feedback log, inference executor, observability, monitor, shadow); the lifespan starts them: feature-store
connection, the initial bundle load (off the event loop), the reload poller and pub/sub listener,
the monitor thread, then the interpreter tuning (the switch interval is restored at shutdown):

* ``gc.freeze()`` moves everything alive after start-up (modules, the model, settings) to a
  permanent generation the collector never scans again;
* ``gc.set_threshold(gc.gen0_threshold)`` (default 50 000 instead of 700) makes young collections
  rarer: a request allocates a few thousand objects, so the default threshold triggers a
  collection every request or two, adding its pause to tail latency;
* ``sys.setswitchinterval(interpreter.switch_interval_ms)`` (default 0.5 ms instead of 5): an inference thread
  back from onnxruntime (which runs without the GIL) waits less for the event loop to let go of the GIL, its core
  idle meanwhile (``docs/benchmarks.md``, table of changes: less idle CPU, a small req/s gain).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtrank.config import ConfigError
from service import rank_body
from service.api import RankDispatch, Services, router
from service.errors import error_body
from service.feature_store import build_feature_store
from service.feedback import build_join_store
from service.feedback.log import build_feedback_log
from service.metrics import Metrics, MetricsMiddleware, multiprocess_dir
from service.monitor import Monitor
from service.observe import Observability
from service.openapi import install_contract, install_docs
from service.rank_body import is_json
from service.registry import Registry, ReloadError
from service.scorer import InputError
from service.settings import GCSettings, Settings
from service.shadow import Shadow
from service.threads import name_native_thread

log = logging.getLogger("mtrank.service")


class BodyLimitMiddleware:
    """413 when Content-Length, or the bytes actually received, exceed ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body exceeds limits.max_body_bytes ({self.max_bytes} bytes)"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, detail=detail)  # FastAPI re-raises it as a 413 response
            return message

        await self.app(scope, limited_receive, send)


_SURROGATE_MSG = "lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): not Unicode text"


def _line_col(doc: str, pos: int) -> tuple[int, int]:
    """1-based line and column of character ``pos`` of ``doc``."""
    line_start = doc.rfind("\n", 0, pos) + 1
    return doc.count("\n", 0, pos) + 1, pos - line_start + 1


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 body ``{"detail": [{loc, msg, type}], "message"}``, with three rewrites of FastAPI's errors:

    * a body sent without a JSON content type reaches validation as raw bytes: one error naming the
      content type (``type: content_type``);
    * a JSON syntax error (``json_invalid``, loc ``body, <offset>``): loc ``body``, the line and column in msg;
    * pydantic's ``string_unicode`` (a lone surrogate in a typed string): a message that says so.
    """
    errors = list(exc.errors())
    body = getattr(exc, "body", None)
    if isinstance(body, bytes | bytearray) and not is_json(request.headers.get("content-type")):
        got = request.headers.get("content-type")
        return JSONResponse(error_body([{
            "loc": ("body",), "type": "content_type",
            "msg": f"the body must be JSON sent with Content-Type: application/json (got {'no Content-Type' if got is None else repr(got)})"}]),
            status_code=422)
    for e in errors:
        kind, loc = e.get("type"), tuple(e.get("loc", ()))
        if kind == "json_invalid" and len(loc) == 2 and isinstance(loc[1], int) and isinstance(body, str):
            line, col = _line_col(body, loc[1])
            reason = (e.get("ctx") or {}).get("error", "invalid JSON")
            e.update(loc=("body",), msg=f"invalid JSON at line {line}, column {col}: {reason}")
        elif kind == "string_unicode":
            e["msg"] = _SURROGATE_MSG
    return JSONResponse(error_body(errors), status_code=422)


def _parse_failure(cause: BaseException | None) -> str:
    """Why Python's JSON parser itself failed (FastAPI answers 400 without saying)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "JSON nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a JSON integer has too many digits (Python's limit: 4300)"
    return type(cause).__name__ if cause is not None else "unknown error"


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's handler (headers such as WWW-Authenticate kept), plus the reason for a body parse failure, and
    on a 405 an ``Allow`` listing the methods of every route of the path (Starlette's names only the first
    route's: ``PUT`` for /admin/shadow, which also takes DELETE)."""
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return JSONResponse({"detail": f"There was an error parsing the body: {_parse_failure(exc.__cause__)}"},
                            status_code=400)
    if exc.status_code == 405:
        path = request.url.path
        routes = [*router.routes, *request.app.routes]  # the app's list holds the included router as one entry
        methods = {m for r in routes if isinstance(getattr(r, "methods", None), set | frozenset)
                   and getattr(r, "path_regex", None) is not None and r.path_regex.match(path) for m in r.methods}
        if methods:
            exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(sorted(methods))})
    return await http_exception_handler(request, exc)


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse(error_body([{"loc": exc.loc, "msg": exc.msg, "type": exc.kind}]), status_code=422)


def tune_gc(s: GCSettings) -> None:
    """The post-start-up GC tuning described in the module docstring."""
    if s.freeze:
        gc.collect()
        gc.freeze()
    if s.gen0_threshold:
        gc.set_threshold(s.gen0_threshold, *gc.get_threshold()[1:])


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    store = build_feature_store(settings.feature_store, metrics)
    registry = Registry(settings, metrics)
    joins = build_join_store(settings, metrics)
    feedback_log = build_feedback_log(settings, metrics)
    obs = Observability(metrics, settings, store.backend)
    monitor = Monitor(metrics, settings.monitoring, lambda: registry.current, flush=obs.flush)
    registry.listeners += [obs.on_slot, monitor.on_slot]
    services = Services(settings=settings, metrics=metrics, registry=registry, store=store, joins=joins,
                        feedback_log=feedback_log,
                        executor=ThreadPoolExecutor(settings.onnx.executor_threads, thread_name_prefix="mtrank-infer",
                                                    initializer=name_native_thread),
                        obs=obs, monitor=monitor, shadow=Shadow(settings, metrics, registry))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.start()
        try:
            await run_in_threadpool(registry.initial_load)
        except ReloadError as err:
            await store.close()
            raise ConfigError(f"start-up: {err}") from None
        registry.start()
        obs.start()
        if settings.monitoring.enabled:
            monitor.start()
        tune_gc(settings.gc)
        if rank_body.rankjson is None:
            log.warning("service._rankjson is not built (no C compiler at install): /rank bodies and responses take "
                        "the Python path")
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(settings.interpreter.switch_interval_ms / 1000)
        try:
            yield
        finally:
            sys.setswitchinterval(switch_interval)
            registry.stop()
            monitor.stop()
            obs.stop()
            services.shadow.stop()
            joins.close()
            feedback_log.close()
            await store.close()
            services.executor.shutdown(wait=False)
            if multiprocess_dir():
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())

    app = FastAPI(
        title="mtrank",
        summary="Multi-task ranking service (ONNX Runtime)",
        description="Ranks candidates with a multi-task model bundle; see docs/service.md.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # service.openapi serves /docs and /redoc from local assets (no CDN)
        redoc_url=None,
    )
    app.state.services = services
    app.include_router(router)
    install_docs(app)
    install_contract(app, settings)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(InputError, _input_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_middleware(RankDispatch)  # innermost: POST /rank past FastAPI's routing, under the two below
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics,  # added last = outermost: sees 413s too
                       known_paths=frozenset(getattr(r, "path", "") for r in router.routes))
    return app
