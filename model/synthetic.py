"""Synthetic feed interactions for the demo and the tests (numpy + pandas, no torch).

Each row is one impression of an item to a user in a context. Users and items are drawn first
(heavy users and popular items appear more often), then every label follows from learnable
structure: user x item latent factors, category main effects, country x category and age x category
affinities, item tags, price, popularity, user activity, hour of day and device. Each task mixes one score shared by all
tasks with a score of its own::

    score_task = rho * shared + sqrt(1 - rho^2) * own_task      (rho = task_correlation)

so ``task_correlation`` sets how alike the tasks are (the construction of the MMoE paper's
synthetic data). Labels:

* ``click``      0/1 on every impression (the shared score alone);
* ``like``       0/1 on every impression, correlated with click through the shared score;
* ``purchase``   0/1, only ever 1 when ``click`` is 1 (entire-space / ESMM structure: purchase
  = click * Bernoulli(pCVR)), and strongly price-dependent;
* ``watch_time`` minutes >= 0: a gamma draw when clicked, mostly 0 otherwise (short bounces).

``like`` and ``watch_time`` are missing (NaN) on a ``missing_label_rate`` fraction of rows each.
Everything is vectorised and deterministic for a seed; 200k rows take a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

COUNTRIES = np.array(["us", "gb", "de", "fr", "br", "in", "jp", "mx"])
COUNTRY_P = np.array([0.30, 0.10, 0.12, 0.10, 0.12, 0.14, 0.06, 0.06])
DEVICES = np.array(["ios", "android", "web"])
DEVICE_EFFECT = np.array([0.3, 0.0, -0.4])
AGE_BUCKETS = np.arange(1, 7)  # 1 = 18-24 ... 6 = 65+
AGE_P = np.array([0.20, 0.28, 0.22, 0.15, 0.10, 0.05])
N_CATEGORIES = 12
N_TAGS = 40
MAX_TAGS = 4
LATENT_DIM = 4

LABELS = ("click", "like", "purchase", "watch_time")
# (intercept, slope) of each binary label's logit on its standardised score
CLICK_LOGIT = (-1.9, 1.6)
LIKE_LOGIT = (-2.6, 1.5)
CVR_LOGIT = (-2.3, 1.5)  # purchase given click


@dataclass(frozen=True)
class _Users:
    ids: np.ndarray  # "u0", "u1", ...
    age: np.ndarray  # int bucket
    country: np.ndarray  # index into COUNTRIES
    activity: np.ndarray  # sessions per day
    device: np.ndarray  # index into DEVICES: the user's usual device
    latent: np.ndarray  # [n_users, 2, LATENT_DIM]: shared factors, like factors


@dataclass(frozen=True)
class _Items:
    ids: np.ndarray  # "i0", "i1", ...
    category: np.ndarray  # int in [0, N_CATEGORIES)
    price: np.ndarray
    popularity: np.ndarray
    tags: np.ndarray  # "t3|t17"
    tag_effect: np.ndarray  # mean effect of the item's tags on likes
    latent: np.ndarray  # [n_items, 2, LATENT_DIM]


def _prefixed(prefix: str, n: int) -> np.ndarray:
    return np.char.add(prefix, np.arange(n).astype(str))


def _lookup(table: np.ndarray, idx: np.ndarray) -> pd.Series:
    """``table[idx]`` as a column, taken from a small pandas array (cheaper than a large numpy text array)."""
    return pd.Series(pd.Series(table).array.take(idx))


def _standardize(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _draw_users(rng: np.random.Generator, n: int) -> _Users:
    return _Users(
        ids=_prefixed("u", n),
        age=rng.choice(AGE_BUCKETS, size=n, p=AGE_P),
        country=rng.choice(len(COUNTRIES), size=n, p=COUNTRY_P),
        activity=np.round(rng.lognormal(0.5, 0.7, size=n), 3),
        device=rng.choice(len(DEVICES), size=n, p=[0.45, 0.40, 0.15]),
        latent=rng.normal(0.0, 1.0, size=(n, 2, LATENT_DIM)),
    )


def _draw_items(rng: np.random.Generator, n: int) -> _Items:
    category = rng.integers(0, N_CATEGORIES, size=n)
    category_price = rng.normal(2.8, 0.6, size=N_CATEGORIES)
    price = np.round(np.exp(category_price[category] + rng.normal(0.0, 0.5, size=n)), 2)
    popularity = np.round(rng.lognormal(4.0, 1.2, size=n)).astype(np.int64) + 1
    # 1..MAX_TAGS distinct tags per item, drawn near the category's block of tags
    offsets = np.argsort(rng.random((n, 2 * MAX_TAGS)), axis=1)[:, :MAX_TAGS]
    tag_ids = (category[:, None] * 3 + offsets) % N_TAGS  # [n, MAX_TAGS]
    n_tags = rng.integers(1, MAX_TAGS + 1, size=n)
    used = np.arange(MAX_TAGS) < n_tags[:, None]
    tag_names = np.char.add("t", tag_ids.astype(str))
    tags = tag_names[:, 0]
    for j in range(1, MAX_TAGS):  # loop over tag positions, vectorised over items
        tags = np.where(used[:, j], np.char.add(np.char.add(tags, "|"), tag_names[:, j]), tags)
    tag_effect = np.where(used, rng.normal(0.0, 1.0, size=N_TAGS)[tag_ids], 0.0).sum(axis=1) / n_tags
    return _Items(ids=_prefixed("i", n), category=category, price=price, popularity=popularity, tags=tags,
                  tag_effect=tag_effect, latent=rng.normal(0.0, 1.0, size=(n, 2, LATENT_DIM)))


def _mix(shared: np.ndarray, own: np.ndarray, rho: float) -> np.ndarray:
    """A task score with correlation ``rho`` to the shared score (both standardised)."""
    return rho * shared + np.sqrt(1.0 - rho**2) * _standardize(own)


def generate(n_rows: int, n_users: int = 2000, n_items: int = 500, seed: int = 0, task_correlation: float = 0.5,
             missing_label_rate: float = 0.05) -> pd.DataFrame:
    """``n_rows`` synthetic impressions: feature columns, then the labels (see the module docstring).

    Deterministic for a given ``seed`` (and the other arguments). ``task_correlation`` in [0, 1]
    is the correlation of each task's score with the shared (click) score.
    """
    if n_rows < 0 or n_users < 1 or n_items < 1:
        raise ValueError("n_rows must be >= 0, n_users and n_items >= 1")
    if not 0.0 <= task_correlation <= 1.0:
        raise ValueError(f"task_correlation must be in [0, 1], got {task_correlation}")
    if not 0.0 <= missing_label_rate < 1.0:
        raise ValueError(f"missing_label_rate must be in [0, 1), got {missing_label_rate}")
    rng = np.random.default_rng(seed)
    users, items = _draw_users(rng, n_users), _draw_items(rng, n_items)
    effect = rng.normal(0.0, 1.0, size=(2, N_CATEGORIES))  # main effects of the category: click, like
    affinity = rng.normal(0.0, 1.0, size=(4, max(len(COUNTRIES), len(AGE_BUCKETS)), N_CATEGORIES))

    # ---- impressions: who sees what, where, when
    u = rng.choice(n_users, size=n_rows, p=users.activity / users.activity.sum())
    pop_weight = items.popularity**0.7
    i = rng.choice(n_items, size=n_rows, p=pop_weight / pop_weight.sum())
    device = np.where(rng.random(n_rows) < 0.8, users.device[u], rng.integers(0, len(DEVICES), size=n_rows))
    hour_p = 1.0 + 0.8 * np.cos(2 * np.pi * (np.arange(24) - 20) / 24)  # evening peak
    hour = rng.choice(24, size=n_rows, p=hour_p / hour_p.sum())

    # ---- learnable structure
    country, age, cat = users.country[u], users.age[u] - 1, items.category[i]
    latent = np.einsum("nkd,nkd->nk", users.latent[u], items.latent[i]) / np.sqrt(LATENT_DIM)  # [n, 2]
    log_price = _standardize(np.log1p(items.price[i]))
    log_pop = _standardize(np.log1p(items.popularity[i]))
    activity = _standardize(np.log1p(users.activity[u]))
    evening = np.cos(2 * np.pi * (hour - 21) / 24)
    shared = _standardize(0.9 * log_pop + 0.6 * activity - 0.5 * log_price + 0.5 * evening + DEVICE_EFFECT[device]
                          + 0.6 * effect[0, cat] + 0.6 * affinity[0, country, cat] + 0.4 * affinity[1, age, cat]
                          + 0.5 * latent[:, 0])
    rho = task_correlation
    like_score = _mix(shared, 0.8 * effect[1, cat] + 0.6 * affinity[2, age, cat] + 0.8 * items.tag_effect[i]
                      + 0.7 * latent[:, 1] - 0.3 * DEVICE_EFFECT[device], rho)
    cvr_score = _mix(shared, -1.2 * log_price + 0.6 * affinity[3, country, cat] + 0.4 * activity, rho)
    watch_score = _mix(shared, 0.8 * affinity[2, age, cat] + 0.6 * evening + 0.4 * latent[:, 1], rho)

    # ---- labels
    click = rng.random(n_rows) < _sigmoid(CLICK_LOGIT[0] + CLICK_LOGIT[1] * shared)
    like = rng.random(n_rows) < _sigmoid(LIKE_LOGIT[0] + LIKE_LOGIT[1] * like_score)
    purchase = click & (rng.random(n_rows) < _sigmoid(CVR_LOGIT[0] + CVR_LOGIT[1] * cvr_score))
    watched = rng.gamma(2.0, np.exp(0.3 + 0.5 * watch_score) / 2.0)
    bounce = np.where(rng.random(n_rows) < 0.15, rng.exponential(0.1, size=n_rows), 0.0)
    watch_time = np.round(np.where(click, watched, bounce), 3)
    like_label = np.where(rng.random(n_rows) < missing_label_rate, np.nan, like.astype(np.float64))
    watch_label = np.where(rng.random(n_rows) < missing_label_rate, np.nan, watch_time)

    return pd.DataFrame({
        "user_id": _lookup(users.ids, u),
        "user_age_bucket": users.age[u],
        "user_country": _lookup(COUNTRIES, country),
        "user_activity": users.activity[u],
        "device": _lookup(DEVICES, device),
        "hour": hour,
        "item_id": _lookup(items.ids, i),
        "item_category": _lookup(_prefixed("c", N_CATEGORIES), cat),
        "item_price": items.price[i],
        "item_tags": _lookup(items.tags, i),
        "item_popularity": items.popularity[i],
        "click": click.astype(np.int64),
        "like": like_label,
        "purchase": purchase.astype(np.int64),
        "watch_time": watch_label,
    })


def correlated_regression(n_rows: int, correlation: float, seed: int = 0, dim: int = 100, n_sines: int = 10,
                          scale: float = 1.0, noise: float = 0.1) -> pd.DataFrame:
    """Two regression tasks whose relatedness is set by ``correlation`` (Ma et al., KDD 2018, Section 4.1).

    Unit vectors u1 ⟂ u2 in R^dim; w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2) with p = ``correlation``
    (the cosine of w1 and w2), c = ``scale``; x ~ N(0, I); for each task
    y_t = w_t.x + sum_k sin(alpha_k w_t.x + beta_k) + N(0, noise^2), with alpha_k, beta_k ~ N(0, 1) shared by
    both tasks. The non-linear part makes the label correlation fall below p; p = 1 gives identical tasks
    up to noise. Columns ``x0 .. x{dim-1}``, ``y1``, ``y2``.
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w = scale * np.stack([u1, correlation * u1 + np.sqrt(1.0 - correlation**2) * u2])  # [2, dim]
    alpha, beta = rng.normal(size=n_sines), rng.normal(size=n_sines)
    x = rng.normal(size=(n_rows, dim))
    z = x @ w.T  # [n, 2]
    y = z + np.sin(z[:, :, None] * alpha + beta).sum(-1) + rng.normal(scale=noise, size=z.shape)
    out = pd.DataFrame(x.astype(np.float32), columns=[f"x{i}" for i in range(dim)])
    out["y1"], out["y2"] = y[:, 0], y[:, 1]
    return out


def write(path: str | Path, n_rows: int, seed: int = 0, **options: Any) -> Path:
    """Generate ``n_rows`` rows (``options`` go to :func:`generate`) and write them by suffix.

    ``.parquet`` writes Parquet; ``.csv`` or ``.csv.gz`` writes CSV (missing labels as empty cells).
    """
    path = Path(path)
    df = generate(n_rows, seed=seed, **options)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.name.endswith((".csv", ".csv.gz")):
        df.to_csv(path, index=False)
    else:
        raise ValueError(f"{path}: unknown format, expected .parquet, .csv or .csv.gz")
    return path


def _vocab(name: str, side: str) -> dict[str, Any]:
    return {"name": name, "kind": "categorical", "side": side, "encoding": "vocab"}


# The demo's experiment config (a mapping for mtrank.config.parse_config); callers replace
# data.train with the generated file.
DEMO_CONFIG: dict[str, Any] = {
    "data": {
        "train": ["demo.parquet"],
        "split": {"source": "train", "validation_fraction": 0.1, "test_fraction": 0.1},
    },
    "features": [
        {"name": "user_id", "kind": "categorical", "side": "user", "encoding": "hash", "buckets": 20_000},
        _vocab("user_age_bucket", "user"),
        _vocab("user_country", "user"),
        {"name": "user_activity", "kind": "numeric", "side": "user", "transform": "log1p"},
        _vocab("device", "context"),
        _vocab("hour", "context"),
        {"name": "item_id", "kind": "categorical", "side": "item", "encoding": "hash", "buckets": 5_000},
        _vocab("item_category", "item"),
        {"name": "item_price", "kind": "numeric", "side": "item", "transform": "log1p"},
        {"name": "item_tags", "kind": "multi_categorical", "side": "item", "buckets": 200, "separator": "|",
         "max_len": MAX_TAGS, "pooling": "mean"},
        {"name": "item_popularity", "kind": "numeric", "side": "item", "transform": "log1p"},
    ],
    "tasks": [
        {"name": "ctr", "type": "binary", "label": {"column": "click", "op": "eq", "value": 1}},
        {"name": "like", "type": "binary", "label": {"column": "like", "op": "value"}},
        {"name": "ctcvr", "type": "binary", "label": {"column": "purchase", "op": "value"},
         "chain": {"parent": "ctr", "head": "cvr"}},
        {"name": "watch_time", "type": "regression", "label": {"column": "watch_time", "op": "value"}},
    ],
    "model": {"arch": "mmoe", "embedding_dim": 8, "expert_hidden": [64], "tower_hidden": [32], "n_experts": 4},
    "train": {"epochs": 3, "batch_size": 1024},
    "eval": {"group_column": "user_id"},
}


def drift(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """A deliberate, learnable drift of ``generate`` rows (refresh demos and tests): a new device ``tv`` takes
    40 % of the ``web`` impressions and is clicked far more often, and items of category ``c3`` lose most of
    their clicks (and so their purchases). Returns a changed copy."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    n = len(out)
    tv = (out["device"].to_numpy() == "web") & (rng.random(n) < 0.4)
    out.loc[tv, "device"] = "tv"
    click = out["click"].to_numpy().copy()
    click[tv] |= (rng.random(n) < 0.5)[tv]
    c3 = out["item_category"].to_numpy() == "c3"
    click[c3] &= (rng.random(n) < 0.2)[c3]
    out["click"] = click
    out["purchase"] = out["purchase"].to_numpy() & click
    return out


def corrupt_labels(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The binary labels of ``frame`` permuted across rows (each column on its own): a window whose labels are
    noise, which a refresh gate must refuse to promote."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    for col in ("click", "like", "purchase"):
        out[col] = out[col].to_numpy()[rng.permutation(len(out))]
    return out


def write_refresh_days(root: str | Path, old_rows: int, day_rows: int, days: int = 3) -> Path:
    """The refresh demo's data under ``root`` (tests/test_refresh.py, benchmarks/refresh_cycle.py): ``old.parquet``
    (``old_rows`` of one synthetic world) and the ``days`` days after it, :func:`drift`-ed, as hive partitions
    ``data/day=2026-11-24/part-0.parquet`` ...; ``corrupt/`` holds the same days with every day but the last
    (the holdout) :func:`corrupt_labels`-ed. Returns ``root``."""
    root = Path(root)
    df = generate(old_rows + days * day_rows, seed=0)
    df.iloc[:old_rows].to_parquet(root / "old.parquet")
    new = drift(df.iloc[old_rows:].reset_index(drop=True), seed=1)
    for i, rows in enumerate(np.array_split(np.arange(len(new)), days)):
        part = new.iloc[rows]
        for kind, frame in (("data", part), ("corrupt", corrupt_labels(part, seed=2) if i < days - 1 else part)):
            d = root / kind / f"day=2026-11-{24 + i}"
            d.mkdir(parents=True)
            frame.to_parquet(d / "part-0.parquet")
    return root
