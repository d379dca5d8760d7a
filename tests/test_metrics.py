"""mtrank.metrics against scikit-learn and straightforward reference implementations."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score

from mtrank import metrics


@pytest.fixture(scope="module")
def sample() -> dict[str, np.ndarray]:
    """Fixed random labels and scores; scores rounded to 2 decimals so that many are tied."""
    rng = np.random.default_rng(7)
    n = 5000
    p = np.round(rng.uniform(0.01, 0.99, n), 2)
    y = (rng.random(n) < p).astype(np.float64)
    return {"y": y, "p": p, "w": rng.uniform(0.1, 3.0, n), "groups": rng.integers(0, 300, n),
            "target": rng.normal(2.0, 1.5, n), "pred": rng.normal(2.0, 1.0, n)}


def reference_gauc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> float:
    """Textbook gAUC: sklearn AUC per group with both classes, weighted by the group's row count."""
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], p[m])
            den += m.sum()
    return num / den


# ------------------------------------------------------------------------------------- AUC


def test_auc_matches_sklearn_with_ties(sample: dict[str, np.ndarray]) -> None:
    y, p = sample["y"], sample["p"]
    assert len(np.unique(p)) < len(p) / 10  # the sample really is tie-heavy
    assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_matches_sklearn_with_weights(sample: dict[str, np.ndarray]) -> None:
    y, p, w = sample["y"], sample["p"], sample["w"]
    assert metrics.auc(y, p, w) == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)


def test_auc_all_tied_is_one_half() -> None:
    assert metrics.auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0, 0], []])
def test_auc_with_one_class_is_nan(y: list[int]) -> None:
    assert math.isnan(metrics.auc(y, np.linspace(0, 1, len(y))))


def test_auc_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="length"):
        metrics.auc([0, 1], [0.5])


# ------------------------------------------------------------------------------------ gAUC


def test_gauc_matches_reference(sample: dict[str, np.ndarray]) -> None:
    y, p, groups = sample["y"], sample["p"], sample["groups"]
    assert metrics.gauc(y, p, groups) == pytest.approx(reference_gauc(y, p, groups), abs=1e-12)


def test_gauc_string_and_object_groups_agree(sample: dict[str, np.ndarray]) -> None:
    y, p, groups = sample["y"], sample["p"], sample["groups"]
    expected = reference_gauc(y, p, groups)
    as_text = np.char.add("user-é-", groups.astype(str))  # non-ASCII text ids
    assert metrics.gauc(y, p, as_text) == pytest.approx(expected, abs=1e-12)
    assert metrics.gauc(y, p, as_text.astype(object)) == pytest.approx(expected, abs=1e-12)
    assert metrics.gauc(y, p, list(as_text)) == pytest.approx(expected, abs=1e-12)


def test_gauc_skips_single_class_groups() -> None:
    y = np.array([1, 0, 1, 1, 0, 0])
    p = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3])
    groups = np.array(["a", "a", "b", "b", "c", "c"])  # a: AUC 1 (2 rows); b, c: one class -> skipped
    assert metrics.gauc(y, p, groups) == 1.0
    assert math.isnan(metrics.gauc([1, 0], [0.4, 0.6], ["a", "b"]))


def test_gauc_one_group_equals_auc(sample: dict[str, np.ndarray]) -> None:
    y, p = sample["y"], sample["p"]
    assert metrics.gauc(y, p, np.zeros(len(y))) == pytest.approx(metrics.auc(y, p), abs=1e-12)


def test_gauc_is_fast_on_a_million_rows() -> None:
    rng = np.random.default_rng(0)
    n = 1_000_000
    groups = np.char.add("u", rng.integers(0, 100_000, n).astype(str))
    p = rng.random(n)
    y = (rng.random(n) < p).astype(np.float64)
    metrics.gauc(y[:1000], p[:1000], groups[:1000])  # warm-up
    start = time.perf_counter()
    value = metrics.gauc(y, p, groups)
    assert time.perf_counter() - start < 1.5  # typically ~0.5 s; slack for loaded CI machines
    assert 0.6 < value < 0.9


# ------------------------------------------------------------------------ pointwise metrics


def test_logloss_mse_mae_match_sklearn(sample: dict[str, np.ndarray]) -> None:
    y, p = sample["y"], sample["p"]
    assert metrics.logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)
    t, q = sample["target"], sample["pred"]
    assert metrics.mse(t, q) == pytest.approx(mean_squared_error(t, q), rel=1e-12)
    assert metrics.mae(t, q) == pytest.approx(mean_absolute_error(t, q), rel=1e-12)


def test_logloss_clips_extreme_predictions() -> None:
    assert metrics.logloss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_empty_inputs_are_nan() -> None:
    for fn in (metrics.logloss, metrics.mse, metrics.mae, metrics.ece):
        assert math.isnan(fn([], [])), fn.__name__


# ----------------------------------------------------------------------------- calibration


def test_ece_small_when_calibrated_large_when_not() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(np.float64)  # P(y=1 | p) = p: calibrated by construction
    assert metrics.ece(y, p) < 0.01
    assert metrics.ece(y, p**3) > 0.15  # systematically under-confident predictions


def test_reliability_bins_and_ece_agree() -> None:
    y = np.array([0, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.55, 0.45, 0.95, 1.0])  # 1.0 falls in the last bin
    bins = metrics.reliability(y, p, n_bins=10)
    assert [b["count"] for b in bins] == [1, 1, 0, 0, 1, 1, 0, 0, 0, 2]
    assert bins[9]["lower"] == 0.9 and bins[9]["upper"] == 1.0
    assert bins[9]["mean_pred"] == pytest.approx(0.975) and bins[9]["mean_obs"] == 1.0
    assert math.isnan(bins[2]["mean_pred"]) and math.isnan(bins[2]["mean_obs"])
    expected = sum(b["count"] / len(y) * abs(b["mean_pred"] - b["mean_obs"]) for b in bins if b["count"])
    assert metrics.ece(y, p, n_bins=10) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------- reports


def test_binary_metrics_report_is_plain_json(sample: dict[str, np.ndarray]) -> None:
    y, p, groups = sample["y"], sample["p"], sample["groups"]
    m = metrics.binary_metrics(y, p, groups=groups, n_bins=5)
    assert set(m) == {"n", "auc", "logloss", "ece", "base_rate", "mean_pred", "gauc", "reliability"}
    assert m["n"] == len(y) and type(m["n"]) is int
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["base_rate"] == pytest.approx(y.mean()) and m["mean_pred"] == pytest.approx(p.mean())
    assert len(m["reliability"]) == 5
    assert json.loads(json.dumps(m)) == m  # only plain Python types
    assert "gauc" not in metrics.binary_metrics(y, p)


def test_regression_metrics_report(sample: dict[str, np.ndarray]) -> None:
    t, q = sample["target"], sample["pred"]
    m = metrics.regression_metrics(t, q)
    assert m == {"n": len(t), "mse": metrics.mse(t, q), "mae": metrics.mae(t, q)}
    assert json.loads(json.dumps(m)) == m


def test_module_imports_neither_torch_sklearn_nor_pandas() -> None:
    code = ("import sys, mtrank.metrics; "
            "print(sorted(m for m in ('torch', 'sklearn', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
