"""Prometheus metrics (prometheus-client), one ``Metrics`` object per app.

Single process: the metrics live in the app's own ``CollectorRegistry`` and ``/metrics`` renders it.
Multiprocess (``PROMETHEUS_MULTIPROC_DIR`` set before the process starts, as ``service.main.serve``
does for ``workers > 1``): every worker writes its values to files in that directory and ``/metrics``
aggregates all workers with ``MultiProcessCollector``, whichever worker answers the scrape. The
model-info gauge uses ``livemax`` so the versions of live workers are reported.

Names (see docs/metrics.md for the full list, labels and PromQL):
``mtrank_http_requests_total``, ``mtrank_http_request_duration_seconds``, ``mtrank_rank_candidates``,
``mtrank_rank_stage_seconds``, ``mtrank_rank_stage_cpu_seconds_total``, ``mtrank_model_info``,
``mtrank_model_reloads_total``, ``mtrank_feature_store_hits_total``, ``mtrank_feature_store_misses_total``,
``mtrank_feature_store_errors_total``, ``mtrank_feature_store_timeouts_total``,
``mtrank_feature_store_cache_hits_total``, ``mtrank_feedback_events_total``, ``mtrank_feedback_log_records_total``,
``mtrank_feedback_log_errors_total``, ``mtrank_fusion_requests_total``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
CANDIDATE_BUCKETS = (0, 1, 10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


ENTROPY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # normalised entropy in [0, 1]
CORRELATION_BUCKETS = (-0.5, 0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
OVERLAP_BUCKETS = tuple(round(0.1 * i, 1) for i in range(0, 11))


class Metrics:
    """Every metric family of the service (docs/metrics.md lists them with their PromQL).

    Gauges that a background evaluator sets from host-wide counter deltas (routing checks, PSI,
    ECE) use ``livemostrecent``: every worker computes the same host-wide value, the freshest wins.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("mtrank_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("mtrank_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("mtrank_rank_candidates", "Candidates per /rank request",
                                    buckets=CANDIDATE_BUCKETS, registry=r)
        self.stage = Histogram("mtrank_rank_stage_seconds", "Time per /rank stage (features, inference, observe)",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_cpu = Counter("mtrank_rank_stage_cpu_seconds_total",
                                 "CPU time of the thread running each /rank stage", ["stage"], registry=r)
        self.model_info = Gauge("mtrank_model_info", "1 for the model version this process serves",
                                ["version", "arch"], multiprocess_mode="livemax", registry=r)
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
                                ["result"], registry=r)  # accepted | duplicate | joined | unjoined | orphan
        self.join_errors = Counter("mtrank_join_store_errors_total",
                                   "Prediction-log / feedback store operations that failed (request still served)",
                                   ["backend", "op"], registry=r)
        self.feedback_log_records = Counter("mtrank_feedback_log_records_total",
                                            "Joined labels appended to the feedback log", ["sink"], registry=r)
        self.feedback_log_errors = Counter("mtrank_feedback_log_errors_total",
                                           "Feedback-log appends that failed or were skipped after a failure "
                                           "(their labels are not logged; /feedback still answered)",
                                           ["sink"], registry=r)  # sink: jsonl | redis
        self.fusion = Counter("mtrank_fusion_requests_total", "/rank requests by fusion profile and arm",
                              ["profile", "arm"], registry=r)

        # Gates: summed weight and top-1 count per expert, candidates per gate, entropy per candidate.
        gate = ["level", "task"]
        self.gate_weight = Counter("mtrank_gate_weight_total", "Summed gate weight given to each expert",
                                   [*gate, "expert"], registry=r)
        self.gate_candidates = Counter("mtrank_gate_candidates_total", "Candidates scored through each gate",
                                       gate, registry=r)
        self.gate_top1 = Counter("mtrank_gate_top1_total", "Candidates whose largest gate weight is this expert",
                                 [*gate, "expert"], registry=r)
        self.gate_entropy = Histogram("mtrank_gate_entropy", "Normalised gate entropy per candidate (0 = one expert, 1 = uniform)",
                                      gate, buckets=ENTROPY_BUCKETS, registry=r)

        # Calibration buckets (served calibrated score), and the joined labels per bucket.
        cal = ["task", "bucket"]
        self.cal_predictions = Counter("mtrank_calibration_predictions_total", "Served scores per calibration bucket",
                                       cal, registry=r)
        self.cal_predicted = Counter("mtrank_calibration_predicted_probability_total",
                                     "Summed served (calibrated) probability per bucket", cal, registry=r)
        self.cal_labeled = Counter("mtrank_calibration_labeled_total", "Joined feedback labels per bucket of the served score",
                                   cal, registry=r)
        self.cal_positives = Counter("mtrank_calibration_positives_total", "Joined positive labels per bucket",
                                     cal, registry=r)
        self.cal_labeled_predicted = Counter("mtrank_calibration_labeled_probability_total",
                                             "Summed served probability of the joined labels per bucket", cal, registry=r)
        self.cal_ece = Gauge("mtrank_calibration_ece", "ECE of joined feedback over the monitoring window",
                             ["task"], multiprocess_mode="livemostrecent", registry=r)

        # Drift: live scores binned on the bundle's reference histogram, and the PSI over the window.
        self.score_bucket = Counter("mtrank_score_bucket_total", "Served scores per bin of the reference histogram",
                                    ["task", "bucket"], registry=r)
        self.score_psi = Gauge("mtrank_score_psi", "Population stability index of served scores vs the reference",
                               ["task"], multiprocess_mode="livemostrecent", registry=r)

        # Routing checks over the window, against the bundle's reference gate statistics.
        self.routing_divergence = Gauge("mtrank_routing_divergence", "Jensen-Shannon divergence (bits) of live vs reference mean expert weights",
                                        gate, multiprocess_mode="livemostrecent", registry=r)
        self.routing_check = Gauge("mtrank_routing_check", "1 = the routing check passes, 0 = it fails",
                                   ["check", *gate], multiprocess_mode="livemostrecent", registry=r)
        self.routing_failures = Counter("mtrank_routing_check_failures_total", "Evaluations of a routing check that failed",
                                        ["check", *gate], registry=r)
        self.window_candidates = Gauge("mtrank_monitor_window_candidates", "Candidates in the monitoring window",
                                       multiprocess_mode="livemostrecent", registry=r)

        # Experiment readout per arm.
        self.exp_served = Counter("mtrank_experiment_served_total", "Items returned by /rank per arm", ["arm"], registry=r)
        self.exp_positives = Counter("mtrank_experiment_positives_total", "Joined positive labels per arm and task",
                                     ["arm", "task"], registry=r)

        # Shadow scoring.
        self.shadow_info = Gauge("mtrank_shadow_info", "1 for the shadow model version this process scores with",
                                 ["version", "arch"], multiprocess_mode="livemax", registry=r)
        self.shadow_requests = Counter("mtrank_shadow_requests_total", "Shadow scoring by result (scored, error, dropped)",
                                       ["result"], registry=r)
        self.shadow_correlation = Histogram("mtrank_shadow_rank_correlation", "Spearman correlation of primary and shadow fused scores",
                                            buckets=CORRELATION_BUCKETS, registry=r)
        self.shadow_overlap = Histogram("mtrank_shadow_topk_overlap", "Top-k overlap of primary and shadow rankings",
                                        buckets=OVERLAP_BUCKETS, registry=r)
        self.shadow_abs_diff = Counter("mtrank_shadow_score_abs_diff_total", "Summed |primary - shadow| calibrated score per task",
                                       ["task"], registry=r)
        self.shadow_candidates = Counter("mtrank_shadow_candidates_total", "Candidates scored by the shadow model", registry=r)
        self.shadow_latency = Histogram("mtrank_shadow_duration_seconds", "Shadow scoring time per request",
                                        buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        if multiprocess_dir():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def add_to_histogram(child: Any, counts: Sequence[float], total: float) -> None:
    """Add ``counts[i]`` observations to bucket i of a histogram child and ``total`` to its sum.

    ``counts`` has one entry per upper bound (``+Inf`` last) and is **not** cumulative, as a child
    stores them; this leaves what that many ``observe`` calls would, at one ``inc`` per non-empty
    bucket. Relies on prometheus-client's ``_buckets`` and ``_sum`` (stable since 0.4; checked by
    ``tests/service/test_observe.py``).
    """
    for i, c in enumerate(counts):
        if c:
            child._buckets[i].inc(float(c))
    child._sum.inc(float(total))


def bucket_index(upper_bounds: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Histogram bucket of each value (Prometheus' rule: the first bound with ``value <= bound``; the last
    bound is ``+Inf``): int64 with the shape of ``values``. Equally spaced finite bounds take an arithmetic
    path with an exact correction against the bounds (like ``mtrank.metrics.bin_index``); others a
    binary search."""
    ub = np.asarray(upper_bounds, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    finite = ub[:-1]
    d = np.diff(finite)
    if finite.size < 3 or not np.allclose(d, d[0], rtol=1e-9, atol=0.0) or d[0] <= 0:
        return np.searchsorted(ub, x, side="left").astype(np.int64, copy=False)
    k = ub.size - 1  # index of +Inf
    idx = ((x - finite[0]) * (1.0 / d[0])).astype(np.int64) + 1  # ceil, up to the corrections below
    np.minimum(idx, k, out=idx)
    np.maximum(idx, 0, out=idx)
    idx += (idx < k) & (x > ub[idx])  # rounding put x one bucket too low
    idx -= (idx > 0) & (x <= ub[idx - 1])  # ... or one too high (ub[-1] for idx 0 is masked out)
    return idx


def bucket_counts(upper_bounds: Sequence[float], values: np.ndarray) -> np.ndarray:
    """How many of ``values`` (any shape) fall in each histogram bucket: int64 [len(upper_bounds)]."""
    return np.bincount(bucket_index(upper_bounds, values).ravel(), minlength=len(upper_bounds))


def observe_many(child: Any, values: np.ndarray) -> None:
    """``child.observe(v)`` for every finite v of ``values`` [n], as one bucket count per bucket."""
    v = values[np.isfinite(values)]
    if v.size:
        add_to_histogram(child, bucket_counts(child._upper_bounds, v), float(v.sum(dtype=np.float64)))


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
