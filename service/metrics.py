"""Prometheus metrics (prometheus-client), one ``Metrics`` object per app.

Single process: the metrics live in the app's own ``CollectorRegistry`` and ``/metrics`` renders it.
Multiprocess (``PROMETHEUS_MULTIPROC_DIR`` set before the process starts, as ``service.main.serve``
does for ``workers > 1``): every worker writes its values to files in that directory and ``/metrics``
aggregates all workers with ``MultiProcessCollector``, whichever worker answers the scrape. The
model-info gauge uses ``livemax`` so the versions of live workers are reported.

Names (see docs/service.md for the full list and labels):
``mtrank_http_requests_total``, ``mtrank_http_request_duration_seconds``, ``mtrank_rank_candidates``,
``mtrank_rank_stage_seconds``, ``mtrank_model_info``, ``mtrank_model_reloads_total``,
``mtrank_feature_store_hits_total``, ``mtrank_feature_store_misses_total``,
``mtrank_feature_store_errors_total``, ``mtrank_feature_store_timeouts_total``,
``mtrank_feature_store_cache_hits_total``, ``mtrank_feedback_events_total``, ``mtrank_fusion_requests_total``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
CANDIDATE_BUCKETS = (0, 1, 10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("mtrank_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("mtrank_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("mtrank_rank_candidates", "Candidates per /rank request",
                                    buckets=CANDIDATE_BUCKETS, registry=r)
        self.stage = Histogram("mtrank_rank_stage_seconds", "Time per /rank stage (features, inference)",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_info = Gauge("mtrank_model_info", "1 for the model version this process serves",
                                ["version"], multiprocess_mode="livemax", registry=r)
        self.reloads = Counter("mtrank_model_reloads_total", "Bundle loads by result and trigger",
                               ["result", "trigger"], registry=r)
        self.fs_hits = Counter("mtrank_feature_store_hits_total", "Feature-store rows found", ["side"], registry=r)
        self.fs_misses = Counter("mtrank_feature_store_misses_total", "Feature-store rows absent", ["side"],
                                 registry=r)
        self.fs_errors = Counter("mtrank_feature_store_errors_total",
                                 "Feature-store lookups that failed (request served with degraded features)",
                                 ["backend", "reason"], registry=r)
        self.fs_timeouts = Counter("mtrank_feature_store_timeouts_total",
                                   "Feature-store lookups over the time budget", ["backend"], registry=r)
        self.fs_cache_hits = Counter("mtrank_feature_store_cache_hits_total", "Rows served by the local TTL cache",
                                     ["side"], registry=r)
        self.feedback = Counter("mtrank_feedback_events_total", "Feedback events by result",
                                ["result"], registry=r)  # accepted | duplicate | joined | unjoined
        self.fusion = Counter("mtrank_fusion_requests_total", "/rank requests by fusion profile and arm",
                              ["profile", "arm"], registry=r)
        self._version: str | None = None

    def set_model_version(self, version: str | None) -> None:
        if self._version is not None and self._version != version:
            self.model_info.labels(self._version).set(0)
        if version is not None:
            self.model_info.labels(version).set(1)
        self._version = version

    def render(self) -> tuple[bytes, str]:
        if multiprocess_dir():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: request count and latency by route template (not raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths  # a request rejected before routing (e.g. 413) keeps one of these as label

    def _label(self, scope: Scope) -> str:
        route: Any = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        path = scope.get("path", "")
        return path if path in self.known_paths else "<unmatched>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = self._label(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path, method).observe(time.perf_counter() - start)
