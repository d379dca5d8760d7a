"""Shadow scoring: a second bundle scores a sample of live traffic, off the request path, and is compared.

After a ``/rank`` response is sent, :meth:`Shadow.offer` draws the request into the sample with
probability ``shadow.sample`` and queues it (a :class:`~service.background.BoundedWorker`: a full queue
drops the job and counts ``mtrank_shadow_requests_total{result="dropped"}``). The shadow thread scores
the same request input and feature-store rows with the model in the registry's ``shadow`` slot, fuses
with the same profile (or expression), and records against the primary answer:

* Spearman correlation of the primary and shadow fused scores over all candidates
  (``mtrank_shadow_rank_correlation``), and the overlap of their top ``shadow.top_k``
  (``mtrank_shadow_topk_overlap``, |top-k ∩ top-k| / k);
* per task both bundles score: summed |primary - shadow| calibrated score
  (``mtrank_shadow_score_abs_diff_total``) over ``mtrank_shadow_candidates_total``;
* time (``mtrank_shadow_duration_seconds``) and outcome (``scored`` / ``error`` / ``dropped``).

The shadow never touches the response (it runs after it is sent, on arrays it only reads) and a
shadow that fails is counted and logged (rate-limited), never raised.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np

from mtrank.metrics import spearman
from service.background import BoundedWorker
from service.feature_store import StoreResult
from service.logs import RateLimitedLogger
from service.metrics import Metrics
from service.registry import Registry
from service.scorer import Ranked, RankInput
from service.settings import Settings

log = logging.getLogger("mtrank.service.shadow")
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)


@dataclass(frozen=True)
class ShadowJob:
    inp: RankInput
    store: StoreResult
    fusion: str  # the profile name or request expression the primary used
    primary: Ranked


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top-k of a ∩ top-k of b| / k for two score vectors [n] (k clipped to n); nan when n = 0."""
    k = min(k, a.size)
    if k == 0:
        return float("nan")
    top_a = np.argpartition(-a, k - 1)[:k] if k < a.size else np.arange(a.size)
    top_b = np.argpartition(-b, k - 1)[:k] if k < b.size else np.arange(b.size)
    return np.intersect1d(top_a, top_b, assume_unique=True).size / k


class Shadow:
    def __init__(self, settings: Settings, metrics: Metrics, registry: Registry) -> None:
        self.settings = settings
        self.s = settings.shadow
        self.metrics = metrics
        self.registry = registry
        self.worker = BoundedWorker("mtrank-shadow", self.s.queue_size,
                                    on_drop=metrics.shadow_requests.labels("dropped").inc)
        self._ratelog = RateLimitedLogger(log, 30.0)

    def offer(self, inp: RankInput, store: StoreResult, fusion: str, primary: Ranked) -> None:
        """Queue the request for shadow scoring when a shadow is loaded and the sample draws it."""
        if self.registry.shadow is None or not len(inp.item_ids) or _rng.random() >= self.s.sample:
            return
        self.worker.submit(self.score, ShadowJob(inp, store, fusion, primary))

    def score(self, job: ShadowJob) -> None:
        model = self.registry.shadow
        if model is None:
            return
        m = self.metrics
        started = time.perf_counter()
        try:
            s = self.settings
            reject = s.limits.unknown_features == "reject"
            scored = model.score(job.inp, job.store, reject)
            fusion = model.fusion_for(job.fusion, True, max(len(job.fusion), s.limits.max_expression_chars))
            n = len(job.inp.item_ids)
            fused = fusion({t: v.astype(np.float64) for t, v in scored.calibrated.items()}, n)  # [n]
            primary = job.primary
            rho = spearman(primary.fused, fused)
            if rho == rho:  # nan when either ranking is constant: nothing to correlate
                m.shadow_correlation.observe(rho)
            m.shadow_overlap.observe(topk_overlap(primary.fused, fused, self.s.top_k))
            for t, p in primary.scored.calibrated.items():
                q = scored.calibrated.get(t)
                if q is not None:
                    m.shadow_abs_diff.labels(t).inc(float(np.abs(p.astype(np.float64) - q).sum()))
            m.shadow_candidates.inc(n)
            m.shadow_requests.labels("scored").inc()
        except Exception as err:  # noqa: BLE001 - a broken shadow is counted, never raised
            m.shadow_requests.labels("error").inc()
            self._ratelog.warning("shadow", "shadow model %s failed: %s: %s", model.version, type(err).__name__, err)
        finally:
            m.shadow_latency.observe(time.perf_counter() - started)

    def stop(self) -> None:
        self.worker.stop()
