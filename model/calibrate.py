"""Post-hoc calibration fitted on the validation split, stored as a piecewise-linear table.

Isotonic regression and Platt scaling are both fitted; the one with the lower *cross-fitted*
logloss (2 folds: fit on one half, score the other) wins, so isotonic's in-sample optimism does
not decide. The winner is refitted on all validation rows and stored as knots (x, y) that the
service applies with ``np.interp``: no sklearn at serving time.
"""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from mtrank.bundle import Calibration
from mtrank.metrics import ece, logloss

EPS = 1e-6
PLATT_GRID = np.concatenate([np.linspace(0, 0.02, 41), np.linspace(0.02, 0.98, 193)[1:-1], np.linspace(0.98, 1, 41)])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    iso = IsotonicRegression(y_min=EPS, y_max=1 - EPS, out_of_bounds="clip").fit(p, y)
    x, v = iso.X_thresholds_, iso.y_thresholds_
    # Extend to [0, 1] so interpolation is defined everywhere.
    x = np.concatenate([[0.0], x, [1.0]])
    v = np.concatenate([[v[0]], v, [v[-1]]])
    return x.tolist(), v.tolist()


def fit_platt(p: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    lr = LogisticRegression(C=1e6, solver="lbfgs").fit(_logit(p)[:, None], y)
    grid = PLATT_GRID
    v = lr.predict_proba(_logit(grid)[:, None])[:, 1]
    return grid.tolist(), v.tolist()


FITTERS = {"isotonic": fit_isotonic, "platt": fit_platt}


def fit_calibration(p: np.ndarray, y: np.ndarray, seed: int = 0, n_bins: int = 10) -> Calibration:
    """Choose and fit a calibrator for raw probabilities ``p`` [N] with labels ``y`` [N]."""
    p = p.astype(np.float64)
    y = y.astype(np.float64)
    before = dict(ece_before=ece(y, p, n_bins), logloss_before=logloss(y, p))
    if len(np.unique(y)) < 2 or len(y) < 100:
        return Calibration(method="identity", x=[0.0, 1.0], y=[0.0, 1.0], ece_after=before["ece_before"],
                           logloss_after=before["logloss_before"], **before)
    fold = np.random.default_rng(seed).permutation(len(y)) % 2 == 0
    cross: dict[str, float] = {}
    for name, fitter in FITTERS.items():
        losses = []
        for train_mask in (fold, ~fold):
            x, v = fitter(p[train_mask], y[train_mask])
            losses.append(logloss(y[~train_mask], np.interp(p[~train_mask], x, v)))
        cross[name] = float(np.mean(losses))
    method = min(cross, key=cross.get)
    x, v = FITTERS[method](p, y)
    q = np.interp(p, x, v)
    return Calibration(method=method, x=x, y=v, ece_after=ece(y, q, n_bins), logloss_after=logloss(y, q), **before)
