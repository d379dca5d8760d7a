"""Ranking and calibration metrics in numpy (no sklearn, no torch): usable by trainer and service."""

from __future__ import annotations

from typing import Any

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (like scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    ends = np.r_[first[1:], len(x)]
    avg = (first + ends + 1) / 2.0  # mean of 1-based positions first+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney statistic; nan when only one class is present."""
    y = np.asarray(y) > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(np.asarray(p, dtype=np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-group AUC weighted by group size, over groups holding both classes.

    Vectorised: one lexsort by (group, score), tie-averaged ranks within groups via run lengths.
    """
    y = np.asarray(y) > 0.5
    p = np.asarray(p, dtype=np.float64)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    order = np.lexsort((p, g))
    g, p, y = g[order], p[order], y[order]
    n = len(y)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_start = np.flatnonzero(new_group)
    gid = np.cumsum(new_group) - 1
    # tie runs: same group and same score
    new_run = new_group | np.r_[True, p[1:] != p[:-1]]
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], n]
    run_id = np.cumsum(new_run) - 1
    pos_in_group = np.arange(n) - group_start[gid]  # 0-based
    run_first = pos_in_group[run_start]
    avg_rank = run_first + (run_end - run_start + 1) / 2.0  # 1-based average rank within group
    ranks = avg_rank[run_id]
    n_groups = len(group_start)
    n_pos = np.bincount(gid, weights=y, minlength=n_groups)
    size = np.bincount(gid, minlength=n_groups).astype(np.float64)
    n_neg = size - n_pos
    rank_sum = np.bincount(gid, weights=ranks * y, minlength=n_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return float("nan")
    aucs = (rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (n_pos[valid] * n_neg[valid])
    return float(np.sum(aucs * size[valid]) / np.sum(size[valid]))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def mse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(y, np.float64) - np.asarray(p, np.float64)) ** 2)) if len(y) else float("nan")


def mae(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y, np.float64) - np.asarray(p, np.float64)))) if len(y) else float("nan")


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins on [0, 1]: edges, count, mean predicted and mean observed per bin."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    safe = np.maximum(count, 1)
    return [{"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": int(count[b]),
             "mean_pred": float(sum_p[b] / safe[b]), "mean_obs": float(sum_y[b] / safe[b])} for b in range(n_bins)]


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: sum_b (n_b / N) |mean_pred_b - mean_obs_b|."""
    bins = reliability(y, p, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["mean_pred"] - b["mean_obs"]) for b in bins))


def binary_metrics(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None = None, n_bins: int = 10) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(len(y)), "auc": auc(y, p), "logloss": logloss(y, p), "ece": ece(y, p, n_bins),
                           "base_rate": float(np.mean(y)) if len(y) else float("nan"),
                           "mean_pred": float(np.mean(p)) if len(p) else float("nan")}
    if groups is not None:
        out["gauc"] = gauc(y, p, groups)
    out["reliability"] = reliability(y, p, n_bins)
    return out


def regression_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    return {"n": int(len(y)), "mse": mse(y, p), "mae": mae(y, p)}
