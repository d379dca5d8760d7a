"""What the model does in production, as Prometheus counters: gates, calibration buckets, score bins, arms.

:class:`ModelStats` binds every label child one bundle needs (which creates those series when the
bundle is loaded, so panels show 0 rather than nothing) and turns one scored request into counter
increments with vectorised numpy over the arrays the ONNX run already returned, batched over the
requests since the last flush (one [N, m] array per gate, one [T, N] array per group of tasks):

* per gate ``[n, m]`` (rows renormalised in float64, so one gate's weights add up to exactly n):
  summed weight per expert, top-1 counts per expert, candidates, and every candidate's normalised
  entropy as one count per histogram bucket (:func:`service.metrics.observe_many`);
* per binary task: served (calibrated) scores per calibration bucket, count and summed probability;
* per task with a reference histogram in the manifest: served scores per reference bin (the live
  side of the PSI; calibrated scores against ``calibrated_score_hist``, else raw against ``score_hist``);
* per arm: items returned.

Per request the cost is keeping a reference to the arrays; a flush (every
``monitoring.flush_interval_s`` on a thread of its own, and before ``/metrics`` or a window evaluation
reads the counters) runs those numpy passes over everything kept since the last one, in chunks of
``FLUSH_CHUNK_CANDIDATES``, and makes one
``inc`` per (gate, expert) and non-empty bucket, so both are paid per second, not per request
(docs/benchmarks.md measures /rank with and without). Nothing of it runs on the event loop.

Joined feedback (``observe_feedback``) adds labels per bucket of the score that was served, and
positives per arm. Everything here is a counter, so Prometheus can ``sum`` and ``rate`` it across
workers and replicas; window statistics derived from them live in ``service.monitor``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from threading import Event, Lock, Thread
from typing import Any

import numpy as np

from mtrank.bundle import GateInfo, Histogram
from mtrank.metrics import bin_index, normalised_entropy
from service.feedback import JoinedLabel
from service.metrics import Metrics, observe_many
from service.registry import PRIMARY, SHADOW
from service.scorer import Model, Scored
from service.settings import MonitoringSettings, Settings
from service.threads import NamedThread

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


MAX_PENDING_CANDIDATES = 100_000  # a request that brings the batch past this flushes it inline (bounds memory)
# A flush counts its batch in chunks of about this many candidates: numpy's passes stay in the cache, and no single
# call holds the GIL long (with the 0.25 s flush interval: the tail at half load, docs/benchmarks.md, table of changes).
FLUSH_CHUNK_CANDIDATES = 16_384


def top1_counts(wt: np.ndarray) -> np.ndarray:
    """Columns of ``wt`` [m, N] (one gate's weights, expert-major) whose largest value is in row j (ties go to the
    first): int64 [m]. Row by row: m contiguous passes over [N]."""
    best = wt.max(axis=0)  # [N]
    taken = np.zeros(wt.shape[1], dtype=bool)
    counts = np.zeros(wt.shape[0], dtype=np.int64)
    for j in range(wt.shape[0]):
        hit = wt[j] == best
        hit &= ~taken
        counts[j] = np.count_nonzero(hit)
        taken |= hit
    return counts


class _Gate:
    """One gate's counters, and the statistics of a batch of its outputs."""

    def __init__(self, g: GateInfo, metrics: Metrics) -> None:
        m = metrics
        lv = gate_labels(g)
        self.output = g.output
        self.m = len(g.experts)
        self.weight = [m.gate_weight.labels(*lv, e) for e in g.experts]
        self.top1 = [m.gate_top1.labels(*lv, e) for e in g.experts]
        self.candidates = m.gate_candidates.labels(*lv)
        self.entropy = m.gate_entropy.labels(*lv)

    def flush(self, batch: list[dict[str, np.ndarray]]) -> None:
        """Count a batch of requests' outputs of this gate ([n_i, m] each) into the counters."""
        parts = [g[self.output] for g in batch if self.output in g]
        if not parts:
            return
        # Expert-major [m, N] (written through ``out``: concatenating the transposes alone keeps their column-major
        # order): every pass below runs over contiguous rows of N, not over rows of m values (a gate's flush in 0.74x
        # the time: docs/benchmarks.md, "What is left outside the model").
        wt = np.concatenate([p.T for p in parts], axis=1,
                            out=np.empty((self.m, sum(len(p) for p in parts)), dtype=np.float32))  # [m, N]
        # Sums in float64, each candidate's weights divided by their sum, so a gate's weights add up to exactly its
        # candidates. einsum, not ``@``: numpy's BLAS would run it on its thread pool, whose threads then spin for a
        # while, burning the cores the requests need (about 0.9 ms of CPU per 500-candidate request).
        inv = 1.0 / wt.sum(axis=0, dtype=np.float64)  # [N]
        sums = np.einsum("mn,n->m", wt, inv).tolist()  # [m]
        ent = normalised_entropy(wt, axis=0)  # [N] float32
        self.candidates.inc(wt.shape[1])
        for j, (s_, c) in enumerate(zip(sums, top1_counts(wt).tolist())):
            self.weight[j].inc(s_)
            if c:
                self.top1[j].inc(c)
        observe_many(self.entropy, ent)


class _Binned:
    """Tasks whose scores share bin edges, computed as one [T, N] batch: counts (and sums) per bin."""

    def __init__(self, tasks: list[str], edges: Sequence[float], calibrated: bool, counts: list[list[Any]],
                 sums: list[list[Any]] | None) -> None:
        self.tasks, self.calibrated = tasks, calibrated
        self.edges = np.asarray(edges, dtype=np.float64)
        self.counts, self.sums = counts, sums  # children [T][B]
        self.row = np.arange(len(tasks))[:, None] * (len(edges) - 1)

    def flush(self, batch: list[Scored]) -> None:
        if not batch:
            return
        T, B = len(self.tasks), len(self.edges) - 1
        p = np.stack([np.concatenate([(sc.calibrated if self.calibrated else sc.raw)[t] for sc in batch])
                      for t in self.tasks]).astype(np.float64)  # [T, N]
        flat = (bin_index(p, self.edges) + self.row).ravel()
        count = np.bincount(flat, minlength=T * B).reshape(T, B)
        total = None if self.sums is None else np.bincount(flat, weights=p.ravel(), minlength=T * B).reshape(T, B)
        for t, b in zip(*np.nonzero(count)):
            self.counts[t][b].inc(int(count[t, b]))
            if total is not None and self.sums is not None:
                self.sums[t][b].inc(float(total[t, b]))


class ModelStats:
    """The counters of one loaded bundle.

    :meth:`observe` only keeps a reference to the request's output arrays (they are fresh per request
    and never written after scoring); :meth:`flush` concatenates what was kept since the last flush,
    chunk by chunk (``FLUSH_CHUNK_CANDIDATES``), and counts each chunk with a few numpy passes per group of
    gates or tasks, then one ``inc`` per (gate, expert) and non-empty bucket. So a request pays an append,
    not numpy calls and counter updates (a request's many small numpy calls contend for the GIL with the
    event loop), and the batch passes run over arrays large enough for numpy to be efficient and small
    enough to stay in the cache and hold the GIL briefly.
    """

    def __init__(self, model: Model, metrics: Metrics, settings: MonitoringSettings) -> None:
        self.version = model.version
        m = metrics
        self._lock = Lock()  # the pending batch (held for an append or a swap)
        self._flushing = Lock()  # one flush at a time (held while a batch is counted)
        self._pending: list[Scored] = []
        self._pending_n = 0
        self.gates = [_Gate(g, metrics) for g in model.manifest.gates]
        self.edges = np.asarray(settings.edges(), dtype=np.float64)
        buckets = bucket_labels(self.edges)
        binary = [t.name for t in model.manifest.tasks if t.type == "binary"]
        self.binned: list[_Binned] = []
        if binary:  # calibration buckets of the served scores (count and summed probability)
            self.binned.append(_Binned(binary, self.edges, True,
                                       [[m.cal_predictions.labels(t, b) for b in buckets] for t in binary],
                                       [[m.cal_predicted.labels(t, b) for b in buckets] for t in binary]))
        for t in binary:  # the feedback side, pre-created too
            for b in buckets:
                for c in (m.cal_labeled, m.cal_positives, m.cal_labeled_predicted):
                    c.labels(t, b)
        ref = model.manifest.reference
        drift: dict[tuple[tuple[float, ...], bool], list[str]] = {}  # the live side of the PSI, grouped by edges
        for t in model.task_names:
            hist: Histogram | None = ref.calibrated_score_hist.get(t)
            calibrated = hist is not None
            hist = hist or ref.score_hist.get(t)
            if hist is not None and len(hist.edges) >= 2:
                drift.setdefault((tuple(hist.edges), calibrated), []).append(t)
        for (edges, calibrated), tasks in drift.items():
            labels = bucket_labels(edges)
            self.binned.append(_Binned(tasks, edges, calibrated,
                                       [[m.score_bucket.labels(t, b) for b in labels] for t in tasks], None))

    def observe(self, scored: Scored, n: int) -> None:
        """Keep one request of ``n`` candidates for the next flush (a flush runs here if the batch is full)."""
        if not n:
            return
        with self._lock:
            self._pending.append(scored)
            self._pending_n += n
            full = self._pending_n >= MAX_PENDING_CANDIDATES
        if full:
            self.flush()

    def flush(self) -> None:
        """Count every request kept before the call into the counters; on return they hold it all (thread-safe).

        Flushes run one at a time: one called while another is counting its batch (the flush thread's) waits for it,
        so ``/metrics`` and the window evaluation, which flush before they read, never read a batch half counted.
        Requests keep appending meanwhile (they take ``_lock`` alone)."""
        with self._flushing:
            with self._lock:
                batch, self._pending, self._pending_n = self._pending, [], 0
            for chunk in _chunks(batch, FLUSH_CHUNK_CANDIDATES):
                gates = [sc.gates for sc in chunk]
                for gate in self.gates:
                    gate.flush(gates)
                for binned in self.binned:
                    binned.flush(chunk)


def _chunks(batch: list[Scored], candidates: int) -> Iterator[list[Scored]]:
    """``batch`` in order, cut into runs of requests of at least ``candidates`` candidates (the last one fewer)."""
    start, n = 0, 0
    for i, sc in enumerate(batch):
        n += len(next(iter(sc.raw.values()), ()))
        if n >= candidates:
            yield batch[start : i + 1]
            start, n = i + 1, 0
    if start < len(batch):
        yield batch[start:]


class Observability:
    """Owns the per-model :class:`ModelStats` and the metrics that follow the registry's slots.

    ``on_slot`` is a registry listener: a model entering the primary slot gets its series created and
    ``mtrank_model_info`` moves to it; the shadow slot drives ``mtrank_shadow_info``. A thread flushes
    every model's accumulated statistics into the counters every ``monitoring.flush_interval_s``;
    ``/metrics`` and the window evaluation flush first, so what they read is complete.
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
        for result in ("accepted", "duplicate", "joined", "unjoined", "orphan"):
            m.feedback.labels(result)
        m.window_candidates.set(0)
        self._halt = Event()
        self._thread: Thread | None = None

    # ------------------------------------------------------------------------------- flushing
    def flush(self) -> None:
        """Every loaded bundle's accumulated statistics into the counters (thread-safe)."""
        for st in list(self._stats.values()):
            st.flush()

    def start(self) -> None:
        if self.enabled:
            self._halt.clear()
            self._thread = NamedThread(target=self._loop, name="mtrank-observe", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.flush()

    def _loop(self) -> None:
        while not self._halt.wait(self.settings.flush_interval_s):
            self.flush()

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
            self.flush()  # the bundle served until now gets its last requests counted before the window resets
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
