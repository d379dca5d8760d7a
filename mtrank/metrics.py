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

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["auc", "binary_metrics", "ece", "gauc", "logloss", "mae", "mse", "regression_metrics", "reliability"]

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


def _bin_sums(y: ArrayLike, p: ArrayLike, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width bins on [0, 1] (1.0 falls in the last bin): (count, sum of p, sum of y) per bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    y_arr, p_arr = _pair(y, p)
    idx = np.clip(np.floor(p_arr * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p_arr, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y_arr, minlength=n_bins)
    return count, sum_p, sum_y


def reliability(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> list[dict[str, Any]]:
    """Reliability-diagram rows: per equal-width bin ``{lower, upper, count, mean_pred, mean_obs}``.

    One dict per bin, in bin order (the ``reliability`` list of ``metrics.json``); the means of an
    empty bin are ``nan``.
    """
    count, sum_p, sum_y = _bin_sums(y, p, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = sum_p / count
        mean_obs = sum_y / count
    bins = np.arange(n_bins, dtype=np.float64)
    columns = {"lower": (bins / n_bins).tolist(), "upper": ((bins + 1) / n_bins).tolist(), "count": count.tolist(),
               "mean_pred": mean_pred.tolist(), "mean_obs": mean_obs.tolist()}
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def ece(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error: ``sum_b (n_b / N) * |mean_pred_b - mean_obs_b|``; ``nan`` if empty."""
    count, sum_p, sum_y = _bin_sums(y, p, n_bins)
    total = int(count.sum())
    # (n_b / N) * |sum_p_b / n_b - sum_y_b / n_b| == |sum_p_b - sum_y_b| / N, and 0 for empty bins
    return float(np.abs(sum_p - sum_y).sum() / total) if total else NAN


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
