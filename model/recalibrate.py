"""``mtrank calibrate BUNDLE_DIR --feedback LOG``: refit a bundle's calibration on served feedback, no retraining.

Input: the feedback log the service writes (``mtrank.feedback_log``: a JSON-lines directory or file, or a
Redis stream), one record per joined label with the raw and calibrated score that was served.

1. **Which records.** Those whose ``model_version`` is a version in the bundles directory whose
   ``model.onnx`` has this bundle's sha256 (``manifest.files["model.onnx"]``): this version and every
   other calibration of the same model (their raw scores are the same). Records of versions no longer in
   the directory are not used (nothing proves their model).
2. **Split.** Per calibrated binary task, the records with a 0/1 label and a finite raw score, split by
   request: a request is in the holdout when the top 32 bits of a 64-bit hash of its id (FNV-1a 64,
   ``mtrank.encoding.fnv1a64``, then ``mtrank.encoding.mix64``), over 2^32, are below ``holdout_fraction``. Deterministic, and a request is
   never on both sides.
3. **Refit** on the fit side's raw scores with ``model.calibrate.fit_calibration`` (isotonic or Platt,
   chosen by cross-fitted logloss, as at export).
4. **Check on the holdout.** ECE (``mtrank.metrics.ece``, 10 equal-width bins: the service's default
   ``monitoring.calibration_buckets``) of the current table (``Calibration.apply(raw)``) and of the refit.
   The refit is kept when both sides have at least ``min_labels`` labels of both classes, its holdout ECE is
   lower, and it is lower in at least ``confidence`` of ``BOOTSTRAP_ROUNDS`` paired bootstrap resamples of the
   holdout requests (Poisson(1) weight per request; ``confidence=0`` keeps any lower ECE). The bootstrap is
   there because holdout ECE is noisy: with a table that is already right, a refit beats it on a finite
   holdout by chance about as often as not, and that would write a new version for nothing.
5. **Write** (when a task kept its refit; else :class:`NoImprovement`, nothing written): a new version via
   ``mtrank.bundle.write_bundle`` with every file of the parent byte-identical (``model.onnx``,
   ``golden.json``), the manifest's ``calibration`` replaced for the kept tasks (their ``ece_before`` /
   ``ece_after`` / ``logloss_*`` are now raw vs refit on the feedback holdout),
   ``reference.calibrated_score_hist`` recomputed for them (:func:`calibrated_histogram`), ``lineage`` =
   ``calibrate`` with ``parent``, the parent's ``run_dir`` / ``checkpoint_sha256`` and per-task ``detail``, a
   new ``created_at``; then ``CURRENT`` unless ``activate=False``. Optionally signed.

Torch-free; sklearn (``model.calibrate``) is imported when a task is refitted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.bundle import (
    MODEL,
    BundleError,
    BundleManifest,
    Calibration,
    Histogram,
    Lineage,
    check_version_name,
    list_versions,
    read_manifest,
    verify_checksums,
    write_bundle,
    write_current,
)
from mtrank.encoding import fnv1a64, mix64
from mtrank.feedback_log import DEFAULT_STREAM, FeedbackColumns, describe_source, read_feedback
from mtrank.metrics import bin_index, ece, equal_width_edges, logloss

log = logging.getLogger("mtrank.recalibrate")

ECE_BINS = 10  # the service's default monitoring.calibration_buckets
BOOTSTRAP_ROUNDS = 200
BOOTSTRAP_CELLS = 1 << 22  # rows x resamples weighted at a time (memory bound of the bootstrap)
SPREAD_POINTS = 16  # points per raw histogram bin pushed through the new calibration
SEED = 0


class NoImprovement(Exception):
    """No task's refit passed the holdout check; nothing was written. ``summary`` says why, per task."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class TaskResult:
    """One task's outcome (its ``lineage.detail`` entry)."""

    labels_fit: int = 0
    labels_holdout: int = 0
    ece_holdout_before: float | None = None  # current calibration on the holdout
    ece_holdout_after: float | None = None  # the refit on the holdout
    bootstrap_win_share: float | None = None  # share of resamples where the refit's ECE is lower
    method: str | None = None  # the refit's (isotonic / platt / identity)
    kept: bool = False
    reason: str = ""


# ------------------------------------------------------------------------------------------ pieces


def same_model_versions(bundles_dir: Path, manifest: BundleManifest) -> list[str]:
    """Versions in ``bundles_dir`` whose model.onnx checksum (manifest) equals ``manifest``'s, this one included."""
    sha = manifest.files.get(MODEL)
    out = {manifest.model_version}
    for v in list_versions(bundles_dir):
        try:
            other = read_manifest(bundles_dir / v)
        except BundleError as err:
            log.warning("skipping version %s: %s", v, err)
            continue
        if sha is not None and other.files.get(MODEL) == sha:
            out.add(v)
    return sorted(out)


def holdout_mask(request_ids: np.ndarray, fraction: float) -> np.ndarray:
    """bool [N]: the rows whose request falls in the holdout (module docstring, step 2)."""
    if request_ids.size == 0:
        return np.zeros(0, dtype=bool)
    top = (mix64(fnv1a64(np.asarray(request_ids, dtype=str))) >> np.uint64(32)).astype(np.float64)
    return top < fraction * float(1 << 32)


def bootstrap_win_share(y: np.ndarray, p_old: np.ndarray, p_new: np.ndarray, groups: np.ndarray,
                        rounds: int = BOOTSTRAP_ROUNDS, seed: int = SEED) -> float:
    """Share of ``rounds`` paired resamples (Poisson(1) weight per group, a row weighted by its group's) in which
    the ECE of ``p_new`` is lower than that of ``p_old`` (both binned like :func:`mtrank.metrics.ece`)."""
    edges = equal_width_edges(ECE_BINS)
    _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    bins = {"old": bin_index(p_old, edges), "new": bin_index(p_new, edges)}
    probs = {"old": np.asarray(p_old, np.float64), "new": np.asarray(p_new, np.float64)}
    y = np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    step = max(1, BOOTSTRAP_CELLS // max(1, y.size))
    wins = 0
    for start in range(0, rounds, step):
        k = min(step, rounds - start)
        w = rng.poisson(1.0, (k, n_groups)).astype(np.float64)[:, codes]  # [k, N]
        offset = (np.arange(k) * ECE_BINS)[:, None]
        errors = {}
        for side in ("old", "new"):
            flat = (bins[side][None, :] + offset).ravel()
            size = k * ECE_BINS
            count = np.bincount(flat, weights=w.ravel(), minlength=size).reshape(k, ECE_BINS)
            sum_p = np.bincount(flat, weights=(w * probs[side]).ravel(), minlength=size).reshape(k, ECE_BINS)
            sum_y = np.bincount(flat, weights=(w * y).ravel(), minlength=size).reshape(k, ECE_BINS)
            with np.errstate(invalid="ignore", divide="ignore"):
                errors[side] = np.abs(sum_p - sum_y).sum(axis=1) / count.sum(axis=1)
        wins += int(np.sum(errors["new"] < errors["old"]))
    return wins / rounds if rounds else 0.0


def calibrated_histogram(raw: Histogram, calibration: Calibration, edges: np.ndarray) -> Histogram:
    """The reference histogram of calibrated scores, from the raw one: each raw bin's count is spread evenly
    over ``SPREAD_POINTS`` points (the midpoints of equal sub-intervals of the bin), each pushed through
    ``calibration`` and binned on ``edges`` (``mtrank.metrics.bin_index``); counts rounded to integers keeping
    the total (largest remainders). An approximation: the raw scores inside a bin are taken as uniform."""
    e = np.asarray(raw.edges, dtype=np.float64)
    c = np.asarray(raw.counts, dtype=np.float64)
    frac = (np.arange(SPREAD_POINTS) + 0.5) / SPREAD_POINTS
    points = (e[:-1, None] + frac[None, :] * np.diff(e)[:, None]).ravel()  # [B * K], bin-major
    mass = np.repeat(c / SPREAD_POINTS, SPREAD_POINTS)
    out = np.bincount(bin_index(calibration.apply(points), edges), weights=mass, minlength=len(edges) - 1)
    counts = np.floor(out + 1e-9)
    short = int(round(c.sum() - counts.sum()))
    if short > 0:
        counts[np.argsort(-(out - counts), kind="stable")[:short]] += 1
    return Histogram(edges=np.asarray(edges, dtype=np.float64).tolist(), counts=counts.astype(np.int64).tolist())


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    return float(ece(y, p, ECE_BINS))


def refit_task(rows: FeedbackColumns, current: Calibration, holdout_fraction: float, min_labels: int,
               confidence: float) -> tuple[TaskResult, Calibration | None]:
    """Steps 2-4 of the module docstring for one task's records; the refit (with holdout ECE / logloss of raw
    vs refit in its ``*_before`` / ``*_after``) when kept, else None."""
    from model.calibrate import fit_calibration

    res = TaskResult()
    hold = holdout_mask(rows.request_id, holdout_fraction)
    y, raw = rows.label, rows.raw
    res.labels_fit, res.labels_holdout = int((~hold).sum()), int(hold.sum())
    if res.labels_fit + res.labels_holdout == 0:
        res.reason = "no feedback for this model"
        return res, None
    if min(res.labels_fit, res.labels_holdout) < min_labels:
        res.reason = (f"too few labels: {res.labels_fit} to fit, {res.labels_holdout} held out "
                      f"(--min-labels {min_labels} on each side)")
        return res, None
    if any(len(np.unique(y[side])) < 2 for side in (~hold, hold)):
        res.reason = "labels of one class only on the fit or holdout side"
        return res, None
    new = fit_calibration(raw[~hold], y[~hold], seed=SEED, n_bins=ECE_BINS)
    res.method = new.method
    y_h, raw_h = y[hold], raw[hold]
    p_old, p_new = current.apply(raw_h), new.apply(raw_h)
    res.ece_holdout_before, res.ece_holdout_after = _ece(y_h, p_old), _ece(y_h, p_new)
    change = f"holdout ECE {res.ece_holdout_before:.4f} -> {res.ece_holdout_after:.4f}"
    if not res.ece_holdout_after < res.ece_holdout_before:
        res.reason = f"no improvement: {change}"
        return res, None
    if confidence > 0:
        share = bootstrap_win_share(y_h, p_old, p_new, rows.request_id[hold])
        res.bootstrap_win_share = share
        if share < confidence:
            res.reason = (f"improvement not significant: {change}, lower in {share:.0%} of {BOOTSTRAP_ROUNDS} "
                          f"bootstrap resamples of the holdout requests (< {confidence:.0%})")
            return res, None
    res.kept, res.reason = True, change
    held_out = {"ece_before": _ece(y_h, raw_h), "ece_after": res.ece_holdout_after,
                "logloss_before": float(logloss(y_h, raw_h)), "logloss_after": float(logloss(y_h, p_new))}
    return res, new.model_copy(update=held_out)


def default_version(model_sha: str, calibration: dict[str, Calibration], created: dt.datetime) -> str:
    """``<UTC time>-<8 hex>`` like export's, the hex from the model checksum and the new tables (so never the
    parent's)."""
    tables = json.dumps({t: c.model_dump(mode="json") for t, c in sorted(calibration.items())}, sort_keys=True)
    return f"{created:%Y%m%d-%H%M%S}-{hashlib.sha256((model_sha + tables).encode()).hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------- driver


def recalibrate(bundle_dir: str | Path, feedback: str | Path, bundles_dir: str | Path | None = None,
                holdout_fraction: float = 0.3, min_labels: int = 500, confidence: float = 0.95,
                version: str | None = None, activate: bool = True, sign_key: str | Path | None = None,
                stream: str = DEFAULT_STREAM) -> dict[str, Any]:
    """The module docstring's steps; returns the JSON summary (``bundle`` and ``version`` of the new bundle).

    Raises :class:`NoImprovement` (nothing written) when no task keeps its refit; BundleError for a bad bundle or
    an existing version; ValueError for bad arguments; FileNotFoundError / ``FeedbackLogError`` for the log.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    if version is not None:
        check_version_name(version, "version")
    from mtrank.signing import Signer

    signer = Signer.optional(sign_key)
    bundle_dir = Path(bundle_dir)
    bundles = Path(bundles_dir) if bundles_dir is not None else bundle_dir.resolve().parent
    parent = read_manifest(bundle_dir)
    verify_checksums(bundle_dir, parent)  # never copy a model.onnx that no longer matches its manifest
    versions = same_model_versions(bundles, parent)

    records = read_feedback(feedback, stream=stream)
    mine = records.select(np.isin(records.model_version, np.asarray(versions, dtype=object)))
    usable = np.isfinite(mine.raw) & ((mine.label == 0.0) | (mine.label == 1.0))
    types = {t.name: t.type for t in parent.tasks}
    results: dict[str, TaskResult] = {}
    kept: dict[str, Calibration] = {}
    for task, current in parent.calibration.items():
        if types.get(task) != "binary":
            continue
        res, new = refit_task(mine.select(usable & (mine.task == task)), current, holdout_fraction, min_labels,
                              confidence)
        results[task] = res
        if new is not None:
            kept[task] = new
    summary: dict[str, Any] = {
        "bundle": None, "version": None, "parent": parent.model_version, "activated": False, "signed_by": None,
        "feedback": {"source": describe_source(feedback), "records": len(records), "torn_lines": records.torn,
                     "invalid_lines": records.invalid, "same_model_versions": versions,
                     "records_of_this_model": len(mine)},
        "tasks": {t: asdict(r) for t, r in results.items()}}
    if not kept:
        why = "; ".join(f"{t}: {r.reason}" for t, r in results.items()) or "the bundle has no calibrated binary task"
        raise NoImprovement(f"no task's calibration improved on the holdout ({why})", summary)

    created = dt.datetime.now(dt.UTC)
    calibration = {**parent.calibration, **kept}
    version = version or default_version(parent.files[MODEL], calibration, created)
    ref = parent.reference.model_copy(deep=True)
    for task, cal in kept.items():
        if task in ref.score_hist:
            old = ref.calibrated_score_hist.get(task)
            edges = np.asarray(old.edges if old is not None else ref.score_hist[task].edges, dtype=np.float64)
            ref.calibrated_score_hist[task] = calibrated_histogram(ref.score_hist[task], cal, edges)
    lineage = Lineage(kind="calibrate", parent=parent.model_version, run_dir=parent.lineage.run_dir,
                      checkpoint_sha256=parent.lineage.checkpoint_sha256,
                      detail={"feedback": describe_source(feedback), "same_model_versions": versions,
                              "holdout_fraction": holdout_fraction, "min_labels": min_labels,
                              "confidence": confidence, "ece_bins": ECE_BINS,
                              "tasks": summary["tasks"]})
    data = parent.model_dump(by_alias=True, mode="json")
    data.update(model_version=version, created_at=created.isoformat(), reference=ref.model_dump(mode="json"),
                calibration={t: c.model_dump(mode="json") for t, c in calibration.items()},
                lineage=lineage.model_dump(mode="json"), files={})
    manifest = BundleManifest.model_validate(data)
    files = {name: (bundle_dir / name).read_bytes() for name in parent.files}
    path = write_bundle(bundles, manifest, files, signer=signer)
    if activate:
        write_current(bundles, version)
    summary.update(bundle=str(path), version=version, activated=activate,
                   signed_by=signer.key_id if signer is not None else None)
    return summary
