"""Window statistics over recent traffic: routing checks, score drift (PSI) and calibration (ECE).

Everything is derived from the counters ``service.observe`` increments, read back the way
Prometheus reads them: in multiprocess mode from every worker's files (``MultiProcessCollector``),
else from this process's registry. So the window covers the traffic of *all* workers of the host,
whichever worker evaluates it, and the numbers agree with what PromQL computes from the same
counters. The evaluator keeps snapshots of those totals; the window is the difference between the
newest and the newest one at least ``monitoring.window_s`` old (or the oldest kept, right after a
start or a model change: a new primary model starts a new window, from its swap).

Per gate of the primary bundle, against the manifest's reference statistics (validation split):

* ``divergence``: Jensen-Shannon divergence (bits) of live vs reference mean expert weights;
* ``dead_expert``: the smallest live mean weight is below ``dead_fraction / n_experts`` (``mtrank.metrics.dead_expert_threshold``);
* ``collapse``: the largest live mean weight is above ``collapse_share``;
* ``entropy``: |live - reference| mean normalised entropy above ``entropy_delta``.

A check with fewer than ``monitoring.min_candidates`` candidates in the window is not evaluated
(gauge NaN, status ``insufficient_data``). Per task: PSI of served scores over the reference bins;
per binary task: ECE of joined feedback (bucketed by the served score) once ``min_labels`` joined.
Results go to gauges (``mtrank_routing_check``, ``mtrank_routing_divergence``,
``mtrank_score_psi``, ``mtrank_calibration_ece``, ``mtrank_monitor_window_candidates``), to
``mtrank_routing_check_failures_total`` (one per failing evaluation), and to ``GET /routing``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from mtrank.metrics import dead_expert_threshold, ece_from_sums, js_divergence, psi
from service.metrics import Metrics, multiprocess_dir
from service.observe import bucket_labels, gate_labels
from service.registry import PRIMARY
from service.scorer import Model
from service.settings import MonitoringSettings
from service.threads import NamedThread

log = logging.getLogger("mtrank.service.monitor")

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted label pairs)
Totals = dict[Key, float]


def _key(name: str, labels: dict[str, str]) -> Key:
    return name, tuple(sorted(labels.items()))


def read_totals(metrics: Metrics, families: Iterable[Any]) -> Totals:
    """Current values of the given metric objects' samples, summed over all workers in multiprocess mode."""
    wanted = {f._name for f in families}
    mp = multiprocess_dir()
    if mp:
        from prometheus_client import multiprocess

        collected = [f for f in multiprocess.MultiProcessCollector(None, path=mp).collect() if f.name in wanted]
    else:
        collected = [fam for f in families for fam in f.collect()]
    out: Totals = {}
    for fam in collected:
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out[_key(s.name, s.labels)] = out.get(_key(s.name, s.labels), 0.0) + s.value
    return out


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class Monitor:
    """Evaluates the window statistics of the primary model; :meth:`evaluate` is thread-safe."""

    def __init__(self, metrics: Metrics, settings: MonitoringSettings, current: Callable[[], Model | None],
                 flush: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.flush = flush  # this process's accumulated statistics into the counters, before reading them
        self.settings = settings
        self.current = current
        self.clock = clock
        m = metrics
        self.families = [m.gate_weight, m.gate_candidates, m.gate_top1, m.gate_entropy, m.score_bucket,
                         m.cal_labeled, m.cal_positives, m.cal_labeled_predicted]
        self.edges = settings.edges()
        self.buckets = bucket_labels(self.edges)
        self._history: deque[tuple[float, Totals]] = deque()
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------- lifecycle
    def on_slot(self, slot: str, model: Model | None) -> None:
        """Registry listener: a new primary model starts a new window at its swap."""
        if slot == PRIMARY:
            with self._lock:
                self._history.clear()
                self._version = model.version if model is not None else None
                if model is not None:
                    self._history.append((self.clock(), read_totals(self.metrics, self.families)))

    def start(self) -> None:
        self._stop.clear()
        self._thread = NamedThread(target=self._loop, name="mtrank-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.evaluate()
            except Exception:  # noqa: BLE001 - monitoring must never take the service down
                log.exception("monitor evaluation failed")

    # ---------------------------------------------------------------------------- evaluation
    def _window(self, model: Model) -> tuple[float, Totals, Totals]:
        self.flush()
        now = self.clock()
        totals = read_totals(self.metrics, self.families)
        with self._lock:
            if model.version != self._version:
                self._history.clear()
                self._version = model.version
            h = self._history
            h.append((now, totals))
            cutoff = now - self.settings.window_s
            while len(h) >= 2 and h[1][0] <= cutoff:
                h.popleft()
            t0, base = h[0]
        return now - t0, base, totals

    def evaluate(self) -> dict[str, Any]:
        """Recompute every window statistic, set the gauges, and return the ``GET /routing`` document."""
        model = self.current()
        s = self.settings
        if model is None:
            return {"model_version": None, "window_s": s.window_s, "gates": [], "status": "insufficient_data"}
        span, base, now_totals = self._window(model)

        def delta(name: str, **labels: str) -> float:
            k = _key(name, labels)
            return now_totals.get(k, 0.0) - base.get(k, 0.0)

        m = self.metrics
        ref = model.manifest.reference
        th = s.routing
        gates = []
        window_candidates = 0.0
        for g in model.manifest.gates:
            level, task = gate_labels(g)
            lv = {"level": level, "task": task}
            n = delta("mtrank_gate_candidates_total", **lv)
            window_candidates = max(window_candidates, n)
            k = len(g.experts)
            live = np.array([delta("mtrank_gate_weight_total", **lv, expert=e) for e in g.experts]) / max(n, 1.0)
            top1 = np.array([delta("mtrank_gate_top1_total", **lv, expert=e) for e in g.experts]) / max(n, 1.0)
            ent_n = delta("mtrank_gate_entropy_count", **lv)
            live_ent = delta("mtrank_gate_entropy_sum", **lv) / ent_n if ent_n else math.nan
            ref_mean = np.asarray(ref.gate_mean.get(g.output, [math.nan] * k), dtype=np.float64)
            ref_ent_nats = ref.gate_entropy.get(g.output, math.nan)
            ref_ent = ref_ent_nats / math.log(k) if k > 1 else 0.0
            enough = n >= s.min_candidates
            values = {
                "divergence": (js_divergence(live, ref_mean) if enough and np.isfinite(ref_mean).all() else math.nan,
                               th.divergence, "above"),
                "dead_expert": (float(live.min()) if enough else math.nan, dead_expert_threshold(k, th.dead_fraction), "below"),
                "collapse": (float(live.max()) if enough else math.nan, th.collapse_share, "above"),
                "entropy": (abs(live_ent - ref_ent) if enough else math.nan, th.entropy_delta, "above"),
            }
            checks = {}
            for check, (value, threshold, fails_when) in values.items():
                if math.isnan(value):
                    status, gauge = "insufficient_data", math.nan
                else:
                    failing = value > threshold if fails_when == "above" else value < threshold
                    status, gauge = ("fail", 0.0) if failing else ("pass", 1.0)
                    if failing:
                        m.routing_failures.labels(check, level, task).inc()
                m.routing_check.labels(check, level, task).set(gauge)
                checks[check] = {"value": _num(value), "threshold": threshold, "fails_when": fails_when,
                                 "status": status}
            m.routing_divergence.labels(level, task).set(values["divergence"][0])
            gates.append({"output": g.output, "level": g.level, "task": task, "experts": g.experts,
                          "candidates": int(n), "live_mean": [_num(x) for x in live] if n else None,
                          "reference_mean": [_num(x) for x in ref_mean], "live_top1_share": [_num(x) for x in top1] if n else None,
                          "live_entropy": _num(live_ent), "reference_entropy": _num(ref_ent), "checks": checks})
        m.window_candidates.set(window_candidates)

        drift = {}
        for t in model.task_names:
            hist = ref.calibrated_score_hist.get(t) or ref.score_hist.get(t)
            if hist is None:
                continue
            live_counts = [delta("mtrank_score_bucket_total", task=t, bucket=b) for b in bucket_labels(hist.edges)]
            value = psi(hist.counts, live_counts) if sum(live_counts) >= s.min_candidates else math.nan
            m.score_psi.labels(t).set(value)
            drift[t] = {"psi": _num(value), "candidates": int(sum(live_counts)),
                        "scores": "calibrated" if t in ref.calibrated_score_hist else "raw"}

        calibration = {}
        for t in (t.name for t in model.manifest.tasks if t.type == "binary"):
            count = [delta("mtrank_calibration_labeled_total", task=t, bucket=b) for b in self.buckets]
            sum_p = [delta("mtrank_calibration_labeled_probability_total", task=t, bucket=b) for b in self.buckets]
            sum_y = [delta("mtrank_calibration_positives_total", task=t, bucket=b) for b in self.buckets]
            value = ece_from_sums(count, sum_p, sum_y) if sum(count) >= s.min_labels else math.nan
            m.cal_ece.labels(t).set(value)
            calibration[t] = {"ece": _num(value), "labels": int(sum(count))}

        statuses = {c["status"] for g in gates for c in g["checks"].values()}
        status = "fail" if "fail" in statuses else "pass" if statuses == {"pass"} else "insufficient_data"
        self.last = {"model_version": model.version, "evaluated_at": _now(), "window_s": s.window_s,
                     "span_s": round(span, 3), "min_candidates": s.min_candidates, "status": status,
                     "gates": gates, "drift": drift, "calibration": calibration}
        return self.last
