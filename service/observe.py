"""What the model does in production, as Prometheus counters: gates, calibration buckets, score bins, arms.

:class:`ModelStats` binds every label child one bundle needs (which creates those series when the
bundle is loaded, so panels show 0 rather than nothing) and turns one scored request into counter
increments with vectorised numpy over the arrays the ONNX run already returned:

* per gate ``[n, m]`` (rows renormalised in float64, so one gate's weights add up to exactly n):
  summed weight per expert, top-1 counts per expert, candidates, and every candidate's normalised
  entropy as one bucket count per histogram bucket (:func:`service.metrics.observe_many`);
* per binary task: served (calibrated) scores per calibration bucket, count and summed probability;
* per task with a reference histogram in the manifest: served scores per reference bin (the live
  side of the PSI; calibrated scores against ``calibrated_score_hist``, else raw against ``score_hist``);
* per arm: items returned.

The cost is a few numpy passes over [n, m] plus one ``inc`` per (gate, expert) and per non-empty
bucket, independent of n beyond the numpy passes (docs/benchmarks.md measures /rank with and
without). :meth:`ModelStats.observe` runs in the inference thread, never on the event loop.

Joined feedback (``observe_feedback``) adds labels per bucket of the score that was served, and
positives per arm. Everything here is a counter, so Prometheus can ``sum`` and ``rate`` it across
workers and replicas; window statistics derived from them live in ``service.monitor``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtrank.bundle import GateInfo, Histogram
from mtrank.metrics import bin_index, normalised_entropy
from service.feedback import JoinedLabel
from service.metrics import Metrics, observe_many
from service.registry import PRIMARY, SHADOW
from service.scorer import Model, Scored
from service.settings import MonitoringSettings, Settings

REQUEST_ARM = "<request>"  # arm label of requests that named their fusion (no experiment arm)
ROUTING_CHECKS = ("divergence", "dead_expert", "collapse", "entropy")
RELOAD_TRIGGERS = ("startup", "poll", "admin", "pubsub", "rollback", "shadow")
NAN = float("nan")


def bucket_labels(edges: Sequence[float]) -> list[str]:
    """``"lo-hi"`` per bin of ``edges`` (``"0-0.1"``, ..., ``"0.9-1"``): the ``bucket`` label values."""
    return [f"{lo:.4g}-{hi:.4g}" for lo, hi in zip(edges[:-1], edges[1:])]


def gate_labels(g: GateInfo) -> tuple[str, str]:
    """(level, task) labels of a gate: its extraction level, and its task or ``shared``."""
    return str(g.level), g.owner


@dataclass
class _Gate:
    output: str
    labels: tuple[str, str]
    experts: list[str]
    weight: list[Any]  # counter child per expert
    top1: list[Any]
    candidates: Any
    entropy: Any  # histogram child


@dataclass
class _Bins:
    task: str
    edges: np.ndarray  # [B + 1]
    calibrated: bool  # bin the calibrated scores (else raw)
    children: list[Any]  # counter child per bin


@dataclass
class _Calibration:
    task: str
    predictions: list[Any]  # counter child per bucket
    predicted: list[Any]


class ModelStats:
    """The counters of one loaded bundle; :meth:`observe` turns a scored request into increments."""

    def __init__(self, model: Model, metrics: Metrics, settings: MonitoringSettings) -> None:
        self.version = model.version
        m = metrics
        self.edges = np.asarray(settings.edges(), dtype=np.float64)
        self.buckets = bucket_labels(self.edges)
        self.gates: list[_Gate] = []
        for g in model.manifest.gates:
            lv = gate_labels(g)
            self.gates.append(_Gate(g.output, lv, g.experts,
                                    [m.gate_weight.labels(*lv, e) for e in g.experts],
                                    [m.gate_top1.labels(*lv, e) for e in g.experts],
                                    m.gate_candidates.labels(*lv), m.gate_entropy.labels(*lv)))
        binary = [t.name for t in model.manifest.tasks if t.type == "binary"]
        self.binary = binary
        self.calibration = [_Calibration(t, [m.cal_predictions.labels(t, b) for b in self.buckets],
                                         [m.cal_predicted.labels(t, b) for b in self.buckets]) for t in binary]
        for t in binary:  # the feedback side, pre-created too
            for b in self.buckets:
                for c in (m.cal_labeled, m.cal_positives, m.cal_labeled_predicted):
                    c.labels(t, b)
        ref = model.manifest.reference
        self.bins: list[_Bins] = []
        for t in model.task_names:
            hist: Histogram | None = ref.calibrated_score_hist.get(t)
            calibrated = hist is not None
            hist = hist or ref.score_hist.get(t)
            if hist is not None and len(hist.edges) >= 2:
                self.bins.append(_Bins(t, np.asarray(hist.edges), calibrated,
                                       [m.score_bucket.labels(t, b) for b in bucket_labels(hist.edges)]))

    def observe(self, scored: Scored, n: int) -> None:
        """Counter increments for one request of ``n`` candidates (gates, calibration buckets, score bins)."""
        for g in self.gates:
            w = scored.gates.get(g.output)  # [n, m]
            if w is None or not n:
                continue
            w64 = w.astype(np.float64)
            w64 /= w64.sum(axis=1, keepdims=True)  # rows sum to 1 exactly: weights add up to candidates
            sums = w64.sum(axis=0).tolist()  # [m]
            top1 = np.bincount(w64.argmax(axis=1), minlength=len(g.experts)).tolist()  # [m]
            g.candidates.inc(n)
            for j, (s, c) in enumerate(zip(sums, top1)):
                g.weight[j].inc(s)
                if c:
                    g.top1[j].inc(c)
            observe_many(g.entropy, normalised_entropy(w64))
        for cal in self.calibration:
            p = scored.calibrated[cal.task]
            count, total = _bin_totals(p, self.edges)
            for b in np.flatnonzero(count).tolist():
                cal.predictions[b].inc(float(count[b]))
                cal.predicted[b].inc(float(total[b]))
        for bins in self.bins:
            p = (scored.calibrated if bins.calibrated else scored.raw)[bins.task]
            count = np.bincount(bin_index(p, bins.edges), minlength=len(bins.children))
            for b in np.flatnonzero(count).tolist():
                bins.children[b].inc(float(count[b]))


def _bin_totals(p: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(count [B], summed p [B]) per bin of ``edges``."""
    idx = bin_index(p, edges)
    b = len(edges) - 1
    return np.bincount(idx, minlength=b), np.bincount(idx, weights=p.astype(np.float64), minlength=b)


class Observability:
    """Owns the per-model :class:`ModelStats` and the metrics that follow the registry's slots.

    ``on_slot`` is a registry listener: a model entering the primary slot gets its series created and
    ``mtrank_model_info`` moves to it; the shadow slot drives ``mtrank_shadow_info``.
    """

    def __init__(self, metrics: Metrics, settings: Settings, backend: str) -> None:
        self.metrics = metrics
        self.settings = settings.monitoring
        self.enabled = settings.monitoring.enabled
        self.edges = np.asarray(self.settings.edges(), dtype=np.float64)
        self.buckets = bucket_labels(self.edges)
        self._stats: weakref.WeakKeyDictionary[Model, ModelStats] = weakref.WeakKeyDictionary()
        self._info: dict[str, tuple[str, str] | None] = {PRIMARY: None, SHADOW: None}
        self._window_gauges: list[Any] = []  # the window gauges of the primary bundle (reset on a swap)
        arms = [a.name for a in settings.experiments] + ["default", REQUEST_ARM]
        self._served = {a: metrics.exp_served.labels(a) for a in arms}
        m = metrics
        for result in ("success", "failure"):
            for trigger in RELOAD_TRIGGERS:
                m.reloads.labels(result, trigger)
        if backend in ("redis", "embedded"):
            for reason in ("timeout", "error", "circuit_open"):
                m.fs_errors.labels(backend, reason)
            m.fs_timeouts.labels(backend)
        for result in ("accepted", "duplicate", "joined", "unjoined"):
            m.feedback.labels(result)
        m.window_candidates.set(0)

    def stats(self, model: Model) -> ModelStats | None:
        if not self.enabled:
            return None
        st = self._stats.get(model)
        if st is None:
            st = self._stats[model] = ModelStats(model, self.metrics, self.settings)
        return st

    def on_slot(self, slot: str, model: Model | None) -> None:
        m = self.metrics
        if slot == PRIMARY:
            if model is not None:
                self.stats(model)
                self._precreate_monitoring(model)
            self._move_info(m.model_info, PRIMARY, model)
        elif slot == SHADOW:
            for result in ("scored", "error", "dropped"):
                m.shadow_requests.labels(result)
            if model is not None:
                for t in model.task_names:
                    m.shadow_abs_diff.labels(t)
            self._move_info(m.shadow_info, SHADOW, model)

    def _move_info(self, gauge: Any, slot: str, model: Model | None) -> None:
        new = (model.version, model.manifest.arch) if model is not None else None
        old = self._info[slot]
        if old is not None and old != new:
            gauge.labels(*old).set(0)
        if new is not None:
            gauge.labels(*new).set(1)
        self._info[slot] = new

    def _precreate_monitoring(self, model: Model) -> None:
        """The window gauges of this bundle start as NaN ("not evaluated yet"), failure counters at 0.

        The gauges of the bundle served before go to NaN too: a gate or task the new bundle lacks must
        not keep reporting (and alerting on) the old bundle's last value.
        """
        m = self.metrics
        gauges = []
        for g in model.manifest.gates:
            lv = gate_labels(g)
            gauges.append(m.routing_divergence.labels(*lv))
            for check in ROUTING_CHECKS:
                gauges.append(m.routing_check.labels(check, *lv))
                m.routing_failures.labels(check, *lv)
        gauges += [m.score_psi.labels(t) for t in model.task_names]
        for t in model.manifest.tasks:
            if t.type == "binary":
                gauges.append(m.cal_ece.labels(t.name))
                for a in self._served:
                    m.exp_positives.labels(a, t.name)
        for gauge in [*self._window_gauges, *gauges]:
            gauge.set(NAN)
        self._window_gauges = gauges

    def observe(self, model: Model, scored: Scored, n: int, arm: str | None, served: int) -> None:
        """After ranking (inference thread): the model's counters, and the items served under ``arm``."""
        st = self.stats(model)
        if st is None:
            return
        st.observe(scored, n)
        child = self._served.get(arm or REQUEST_ARM)
        if child is not None:
            child.inc(served)

    def observe_feedback(self, labels: Iterable[JoinedLabel], binary: frozenset[str]) -> None:
        """Joined labels of the ``binary`` tasks: per bucket of the served score, and positives per arm."""
        if not self.enabled:
            return
        m = self.metrics
        for lab in labels:
            if lab.task not in binary:  # regression labels have no calibration bucket
                continue
            b = self.buckets[int(bin_index([lab.calibrated], self.edges)[0])]
            m.cal_labeled.labels(lab.task, b).inc()
            m.cal_labeled_predicted.labels(lab.task, b).inc(lab.calibrated)
            if lab.label == 1.0:
                m.cal_positives.labels(lab.task, b).inc()
                m.exp_positives.labels(lab.arm or REQUEST_ARM, lab.task).inc()
