"""Ranking, calibration and regression metrics in plain numpy, shared by trainer and service.

No torch, sklearn or pandas: the service imports this module. Every function takes arrays that the
caller has already masked (rows with a missing label removed) and returns plain Python values, so
results can go straight into ``json.dumps``. Undefined values (an AUC with one class, a metric of an
empty array, the means of an empty calibration bin) are ``nan``.

AUC is the Mann-Whitney statistic computed on tie runs (rows of equal score): a positive beats the
negatives below its run and ties half of those in its run, which equals the trapezoidal ROC area of
``sklearn.metrics.roc_auc_score``, weights included. Group AUC reuses the same pass with the rows
sorted by (group, score), so any number of groups costs three sorts and a few ``bincount``s: no
Python loop over rows or groups (1M rows in 100k string-keyed groups take well under a second).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["auc", "average_ranks", "bin_index", "bin_sums", "binary_metrics", "ece", "ece_from_sums", "equal_width_edges", "gauc",
           "js_divergence", "logloss", "mae", "mse", "normalised_entropy", "psi", "regression_metrics", "reliability",
           "spearman"]

NAN = float("nan")


# ------------------------------------------------------------------------------------ helpers


def _pair(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions as flat float64 arrays of equal length."""
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    p_arr = np.asarray(p, dtype=np.float64).ravel()
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"labels and predictions differ in length: {y_arr.size} != {p_arr.size}")
    return y_arr, p_arr


def _unicode_words(v: np.ndarray) -> np.ndarray:
    """Fixed-width unicode strings [n] -> uint64 words [n, w], equal rows iff equal strings.

    Code points are narrowed to 8, 16 or 32 bits (whatever the largest one needs) and packed into
    64-bit words, so ids such as ``"u12345"`` become one integer and group by an integer sort
    instead of a string sort. Only equality is kept, not the strings' order.
    """
    width = v.dtype.itemsize // 4
    chars = np.ascontiguousarray(v).view(np.uint32).reshape(v.size, width)
    top = int(chars.max()) if chars.size else 0
    narrow = np.uint8 if top < 1 << 8 else np.uint16 if top < 1 << 16 else np.uint32
    per_word = 8 // np.dtype(narrow).itemsize
    n_words = max(1, -(-width // per_word))
    packed = np.zeros((v.size, n_words * per_word), dtype=narrow)
    packed[:, :width] = chars
    return packed.view(np.uint64)


def _factorize(values: ArrayLike) -> tuple[np.ndarray, int]:
    """Values -> (int64 group codes, number of distinct values); equal values share a code."""
    v = np.asarray(values).ravel()
    if v.dtype == object:  # Python objects (mixed ids): group by their text
        v = v.astype(str)
    words = _unicode_words(v) if v.dtype.kind == "U" else v[:, None]
    order = np.argsort(words[:, 0]) if words.shape[1] == 1 else np.lexsort(words.T)
    ws = words[order]
    new = np.empty(v.size, dtype=bool)
    new[:1] = True
    np.any(ws[1:] != ws[:-1], axis=1, out=new[1:])
    codes = np.empty(v.size, dtype=np.int64)
    codes[order] = np.cumsum(new) - 1
    return codes, int(new.sum())


def _dense_rank(x: np.ndarray) -> np.ndarray:
    """0-based dense rank of each value (equal values share a rank)."""
    order = np.argsort(x)
    xs = x[order]
    new = np.empty(x.size, dtype=bool)
    new[:1] = True
    np.not_equal(xs[1:], xs[:-1], out=new[1:])
    rank = np.empty(x.size, dtype=np.int64)
    rank[order] = np.cumsum(new) - 1
    return rank


def _mann_whitney(y: np.ndarray, p: np.ndarray, w: np.ndarray, codes: np.ndarray, n_groups: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: (weighted pairs won by positives, ties counting 1/2; positive weight; negative weight).

    Rows are ordered by the score, or with several groups by one int64 key ``group * n +
    dense_rank(score)``, so a tie run (equal group and score) is a run of equal keys and groups are
    contiguous. The AUC of group g is ``won[g] / (pos[g] * neg[g])``.
    """
    n = y.size
    if n_groups > 1:
        key = codes * max(n, 1) + _dense_rank(p)
        order = np.argsort(key)
        ks = key[order]
    else:
        order = np.argsort(p)
        ks = p[order]
    run_start = np.empty(n, dtype=bool)
    run_start[:1] = True
    np.not_equal(ks[1:], ks[:-1], out=run_start[1:])
    run_id = np.cumsum(run_start) - 1
    is_pos = y[order] > 0.5
    wo = w[order]
    pos_run = np.bincount(run_id, weights=np.where(is_pos, wo, 0.0))
    neg_run = np.bincount(run_id, weights=np.where(is_pos, 0.0, wo))
    run_group = codes[order][run_start]
    neg_group = np.bincount(run_group, weights=neg_run, minlength=n_groups)
    pos_group = np.bincount(run_group, weights=pos_run, minlength=n_groups)
    # negative weight strictly below each run, within its own group
    neg_below = np.cumsum(neg_run) - neg_run
    neg_below -= (np.cumsum(neg_group) - neg_group)[run_group]
    won = np.bincount(run_group, weights=pos_run * (neg_below + 0.5 * neg_run), minlength=n_groups)
    return won, pos_group, neg_group


# -------------------------------------------------------------------------------- ranking


def auc(y: ArrayLike, p: ArrayLike, w: ArrayLike | None = None) -> float:
    """ROC AUC of scores ``p`` for binary labels ``y`` (> 0.5 is positive), optionally weighted.

    Tied scores count one half, as in ``sklearn.metrics.roc_auc_score``. ``nan`` when only one
    class (or no row) is present.
    """
    y_arr, p_arr = _pair(y, p)
    w_arr = np.ones_like(y_arr) if w is None else np.asarray(w, dtype=np.float64).ravel()
    if w_arr.shape != y_arr.shape:
        raise ValueError(f"weights differ in length from labels: {w_arr.size} != {y_arr.size}")
    won, pos, neg = _mann_whitney(y_arr, p_arr, w_arr, np.zeros(y_arr.size, dtype=np.int64), 1)
    if pos[0] <= 0 or neg[0] <= 0:
        return NAN
    return float(won[0] / (pos[0] * neg[0]))


def gauc(y: ArrayLike, p: ArrayLike, groups: ArrayLike) -> float:
    """Group AUC: each group's AUC weighted by its number of rows (impressions).

    Groups holding a single class are skipped; ``nan`` when no group holds both classes.
    ``groups`` holds one key per row (user ids as strings, integers or Python objects).
    """
    y_arr, p_arr = _pair(y, p)
    codes, n_groups = _factorize(groups)
    if codes.shape != y_arr.shape:
        raise ValueError(f"groups differ in length from labels: {codes.size} != {y_arr.size}")
    won, pos, neg = _mann_whitney(y_arr, p_arr, np.ones_like(y_arr), codes, n_groups)
    valid = (pos > 0) & (neg > 0)
    if not valid.any():
        return NAN
    size = pos[valid] + neg[valid]
    group_auc = won[valid] / (pos[valid] * neg[valid])
    return float(np.sum(group_auc * size) / np.sum(size))


# ----------------------------------------------------------------------------- pointwise


def logloss(y: ArrayLike, p: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; predictions are clipped to ``[eps, 1 - eps]``."""
    y_arr, p_arr = _pair(y, p)
    if y_arr.size == 0:
        return NAN
    q = np.clip(p_arr, eps, 1.0 - eps)
    return float(-np.mean(y_arr * np.log(q) + (1.0 - y_arr) * np.log1p(-q)))


def mse(y: ArrayLike, p: ArrayLike) -> float:
    """Mean squared error; ``nan`` for empty input."""
    y_arr, p_arr = _pair(y, p)
    return float(np.mean(np.square(y_arr - p_arr))) if y_arr.size else NAN


def mae(y: ArrayLike, p: ArrayLike) -> float:
    """Mean absolute error; ``nan`` for empty input."""
    y_arr, p_arr = _pair(y, p)
    return float(np.mean(np.abs(y_arr - p_arr))) if y_arr.size else NAN


# --------------------------------------------------------------------------- calibration


def equal_width_edges(n_bins: int) -> np.ndarray:
    """``n_bins + 1`` equal-width bin edges on [0, 1] (float64)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    return np.linspace(0.0, 1.0, n_bins + 1)


def _uniform_step(e: np.ndarray) -> float | None:
    """The common spacing of ``e`` (ascending, >= 3 points) when it is equally spaced, else None."""
    if e.size < 3 or not np.all(np.isfinite(e)):
        return None
    d = np.diff(e)
    step = float(e[-1] - e[0]) / (e.size - 1)
    return step if step > 0 and np.allclose(d, step, rtol=1e-9, atol=0.0) else None


def bin_index(p: ArrayLike, edges: ArrayLike) -> np.ndarray:
    """Bin of each value for ascending ``edges`` [B + 1]: bin b holds ``edges[b] <= p < edges[b + 1]``.

    The last bin is closed (``p == edges[-1]`` falls in it) and values outside the edges are clipped
    into the first or last bin, so every value lands somewhere. Returns int64 with the shape of ``p``.
    The one binning rule of the project: reliability diagrams, ECE, the service's calibration buckets
    and PSI bins. Equally spaced edges take an arithmetic path (a division, then an exact correction
    against the edges themselves, ~25x faster than a binary search); others ``searchsorted``.
    """
    e = np.asarray(edges, dtype=np.float64)
    x = np.asarray(p, dtype=np.float64)
    n_bins = e.size - 1
    step = _uniform_step(e)
    if step is None:
        return np.searchsorted(e[1:-1], x, side="right").astype(np.int64, copy=False)
    idx = ((x - e[0]) * (1.0 / step)).astype(np.int64)  # truncation; NaN and x < e[0] end up clipped to 0
    np.minimum(idx, n_bins - 1, out=idx)
    np.maximum(idx, 0, out=idx)
    idx -= (idx > 0) & (x < e[idx])  # rounding put x one bin too high
    idx += (idx < n_bins - 1) & (x >= e[idx + 1])  # ... or one too low (idx + 1 <= n_bins: in range)
    return idx


def bin_sums(y: ArrayLike, p: ArrayLike, edges: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin of ``edges``: (count int64 [B], sum of p float64 [B], sum of y float64 [B])."""
    y_arr, p_arr = _pair(y, p)
    n_bins = len(edges) - 1
    idx = bin_index(p_arr, edges)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p_arr, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y_arr, minlength=n_bins)
    return count, sum_p, sum_y


def ece_from_sums(count: ArrayLike, sum_p: ArrayLike, sum_y: ArrayLike) -> float:
    """ECE from per-bin sums: ``sum_b |sum_p_b - sum_y_b| / N`` (= ``sum_b (n_b/N) |mean_p_b - mean_y_b|``); nan if empty."""
    total = float(np.sum(count))
    diff = np.abs(np.asarray(sum_p, dtype=np.float64) - np.asarray(sum_y, dtype=np.float64))
    return float(diff.sum() / total) if total > 0 else NAN


def reliability(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> list[dict[str, Any]]:
    """Reliability-diagram rows: per equal-width bin ``{lower, upper, count, mean_pred, mean_obs}``.

    One dict per bin, in bin order (the ``reliability`` list of ``metrics.json``); the means of an
    empty bin are ``nan``.
    """
    edges = equal_width_edges(n_bins)
    count, sum_p, sum_y = bin_sums(y, p, edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = sum_p / count
        mean_obs = sum_y / count
    columns = {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": count.tolist(),
               "mean_pred": mean_pred.tolist(), "mean_obs": mean_obs.tolist()}
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def ece(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error: ``sum_b (n_b / N) * |mean_pred_b - mean_obs_b|``; ``nan`` if empty."""
    return ece_from_sums(*bin_sums(y, p, equal_width_edges(n_bins)))


# ----------------------------------------------------------------------- monitoring (drift)


def _proportions(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray] | None:
    """Two count (or weight) vectors of the same bins, each normalised to sum 1; None when either sums to <= 0."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the two distributions differ in bins: {a.size} != {b.size}")
    if a.sum() <= 0 or b.sum() <= 0:
        return None
    return a / a.sum(), b / b.sum()


def psi(expected: ArrayLike, actual: ArrayLike, eps: float = 1e-4) -> float:
    """Population stability index of bin counts ``actual`` against ``expected`` (same bins).

    ``sum_b (a_b - e_b) * ln(a_b / e_b)`` over the two count vectors normalised to proportions,
    each proportion floored at ``eps`` so an empty bin costs a large but finite amount. ``nan`` when
    either side has no counts. Rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 shifted.
    """
    both = _proportions(expected, actual)
    if both is None:
        return NAN
    pe, pa = (np.maximum(x, eps) for x in both)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def js_divergence(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon divergence in bits (0 = equal, 1 = disjoint) of two distributions (normalised here)."""
    both = _proportions(p, q)
    if both is None:
        return NAN
    pa, qa = both
    m = 0.5 * (pa + qa)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return max(0.0, 0.5 * kl(pa) + 0.5 * kl(qa))


def average_ranks(x: ArrayLike) -> np.ndarray:
    """1-based ranks of ``x`` [n], ties sharing their average rank (float64 [n])."""
    v = np.asarray(x, dtype=np.float64).ravel()
    n = v.size
    order = np.argsort(v, kind="stable")
    vs = v[order]
    new = np.empty(n, dtype=bool)
    new[:1] = True
    np.not_equal(vs[1:], vs[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, n))
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(starts + (sizes + 1) / 2.0, sizes)
    return ranks


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); ``nan`` if either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.shape != ry.shape:
        raise ValueError(f"x and y differ in length: {rx.size} != {ry.size}")
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else NAN


DEAD_EXPERT_FRACTION = 0.1


def dead_expert_threshold(n_experts: int, fraction: float = DEAD_EXPERT_FRACTION) -> float:
    """The mean gate weight below which an expert counts as dead: ``fraction`` of a uniform share. One rule for
    the trainer's gate health, the refresh gate and the service's ``dead_expert`` routing check."""
    return fraction / n_experts


def normalised_entropy(w: np.ndarray, axis: Literal[0, -1] = -1) -> np.ndarray:
    """Entropy of each distribution of weights along ``axis`` divided by ``ln m`` (m its length): in [0, 1] (1 =
    uniform; 0 when m = 1), the other axes' shape. ``axis=-1``: rows of [..., m]; ``axis=0``: columns of [m, ...].

    Computed in ``w``'s float type (float32 stays float32); the sum over a short last axis is an ``einsum``, much
    faster than a reduction over it and, unlike a matrix-vector product, never on BLAS's thread pool; over axis 0 it
    is m contiguous adds."""
    m = w.shape[axis]
    out_shape = w.shape[:-1] if axis == -1 else w.shape[1:]
    if m < 2:
        return np.zeros(out_shape, dtype=w.dtype)
    x = np.maximum(w, w.dtype.type(1e-12))
    x *= np.log(x)
    return (np.einsum("...m->...", x) if axis == -1 else x.sum(axis=0)) * x.dtype.type(-1.0 / np.log(m))


# ------------------------------------------------------------------------------- reports


def binary_metrics(y: ArrayLike, p: ArrayLike, groups: ArrayLike | None = None, n_bins: int = 10
                   ) -> dict[str, Any]:
    """All metrics of a binary task: n, auc, logloss, ece, base_rate, mean_pred, [gauc], reliability."""
    y_arr, p_arr = _pair(y, p)
    n = int(y_arr.size)
    out: dict[str, Any] = {
        "n": n,
        "auc": auc(y_arr, p_arr),
        "logloss": logloss(y_arr, p_arr),
        "ece": ece(y_arr, p_arr, n_bins),
        "base_rate": float(y_arr.mean()) if n else NAN,
        "mean_pred": float(p_arr.mean()) if n else NAN,
    }
    if groups is not None:
        out["gauc"] = gauc(y_arr, p_arr, groups)
    out["reliability"] = reliability(y_arr, p_arr, n_bins)
    return out


def regression_metrics(y: ArrayLike, p: ArrayLike) -> dict[str, Any]:
    """Metrics of a regression task: n, mse, mae."""
    y_arr, p_arr = _pair(y, p)
    return {"n": int(y_arr.size), "mse": mse(y_arr, p_arr), "mae": mae(y_arr, p_arr)}
