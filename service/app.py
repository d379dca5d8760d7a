"""The FastAPI application: wiring, lifespan, middleware and error handlers.

``create_app(settings)`` builds every component (metrics, feature store, registry, join store,
inference executor, observability, monitor, shadow); the lifespan starts them: feature-store
connection, the initial bundle load (off the event loop), the reload poller and pub/sub listener,
the monitor thread, then the GC tuning:

* ``gc.freeze()`` moves everything alive after start-up (modules, the model, settings) to a
  permanent generation the collector never scans again;
* ``gc.set_threshold(gc.gen0_threshold)`` (default 50 000 instead of 700) makes young collections
  rarer: a request allocates a few thousand objects, so the default threshold triggers a
  collection every request or two, adding its pause to tail latency.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtrank.config import ConfigError
from service.api import Services, router
from service.feature_store import build_feature_store
from service.feedback import build_join_store
from service.metrics import Metrics, MetricsMiddleware, multiprocess_dir
from service.monitor import Monitor
from service.observe import Observability
from service.registry import Registry, ReloadError
from service.scorer import InputError
from service.settings import GCSettings, Settings
from service.shadow import Shadow

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


def _error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "value_error")}
              for e in errors]
    message = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail)
    return {"detail": detail, "message": message}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(_error_body(list(exc.errors())), status_code=422)


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse(_error_body([{"loc": exc.loc, "msg": exc.msg, "type": exc.kind}]), status_code=422)


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
    obs = Observability(metrics, settings, store.backend)
    monitor = Monitor(metrics, settings.monitoring, lambda: registry.current, flush=obs.flush)
    registry.listeners += [obs.on_slot, monitor.on_slot]
    services = Services(settings=settings, metrics=metrics, registry=registry, store=store, joins=joins,
                        executor=ThreadPoolExecutor(settings.onnx.executor_threads, thread_name_prefix="mtrank-infer"),
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
        try:
            yield
        finally:
            registry.stop()
            monitor.stop()
            obs.stop()
            services.shadow.stop()
            joins.close()
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
    )
    app.state.services = services
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(InputError, _input_error)  # type: ignore[arg-type]
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics,  # added last = outermost: sees 413s too
                       known_paths=frozenset(getattr(r, "path", "") for r in router.routes))
    return app
