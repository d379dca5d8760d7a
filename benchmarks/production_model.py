"""A production-size ranking model for speed benchmarks: its synthetic data and its configs.

Shape (Criteo-like): 26 categorical features hashed into 16-dim embeddings (13 on the request side: a user id
with 500k buckets, user profile and context; 13 on the item side: an item id with 200k buckets, catalogue
attributes) and 13 numeric (6 request, 7 item), so the input is I = 26 * 16 + 13 = 429 wide (Ir = 214,
Ii = 215). Three binary tasks (click, like, purchase). Configs in ``benchmarks/configs/``:

* ``production_mmoe.yaml``  MMoE, 8 experts [256, 128], towers [64]: about 1.18 M multiply-adds per candidate;
* ``production_ple.yaml``   PLE, 2 levels of 1 task expert per task + 3 shared experts [256, 128], towers [64]:
  about 1.29 M.

``generate(n)`` draws users and items first (attributes fixed per entity; heavy users and popular items appear
more often), then rows, then labels from learnable structure: user x item latent factors, a user segment x item
category affinity, a language match, popularity, rating, price and hour effects; each task mixes one score
shared by all tasks with its own. Vectorised numpy; 200k rows take about a second. It never reads real data.

Usage: ``python benchmarks/production_model.py OUT.parquet --rows 150000 [--seed 0]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

CONFIGS = Path(__file__).resolve().parent / "configs"
ARCH_CONFIGS = {"mmoe": CONFIGS / "production_mmoe.yaml", "ple": CONFIGS / "production_ple.yaml"}
LATENT = 8
# categorical cardinalities of the entities' attributes (the configs hash them into at least as many buckets)
USER_CATS = {"user_age_bucket": 7, "user_gender": 3, "user_country": 60, "user_city": 3000, "user_language": 25,
             "user_segment": 16, "device_os": 4, "device_model": 800, "app_version": 40}
CONTEXT_CATS = {"hour": 24, "weekday": 7, "surface": 6}
ITEM_CATS = {"item_category": 30, "item_brand": 8000, "item_seller": 30000, "item_creator": 40000,
             "item_format": 5, "item_language": 25, "item_origin_country": 60, "item_quality_tier": 5, "item_topic": 200}


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf_codes(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n codes in [0, k) with a heavy head (weights 1 / (rank + 1))."""
    w = 1.0 / np.arange(1, k + 1)
    return rng.choice(k, size=n, p=w / w.sum())


def generate(n_rows: int, seed: int = 0, n_users: int = 40_000, n_items: int = 20_000) -> pd.DataFrame:
    """``n_rows`` impressions with 26 categorical (integer codes), 13 numeric and 3 binary label columns."""
    rng = np.random.default_rng(seed)
    users = {k: _zipf_codes(rng, n_users, c) for k, c in USER_CATS.items()}
    u_activity = rng.lognormal(0.0, 1.0, n_users)
    u_latent = rng.normal(size=(n_users, 2, LATENT))
    items = {k: _zipf_codes(rng, n_items, c) for k, c in ITEM_CATS.items()}
    items["item_subcategory"] = items["item_category"] * 10 + rng.integers(0, 10, n_items)
    i_price = np.exp(rng.normal(3.0, 0.8, n_items) + 0.05 * items["item_category"])
    i_popularity = rng.lognormal(3.0, 1.3, n_items)
    i_rating = np.clip(rng.normal(4.0, 0.6, n_items) + 0.2 * items["item_quality_tier"], 1.0, 5.0)
    i_age_days = rng.exponential(60.0, n_items)
    i_latent = rng.normal(size=(n_items, 2, LATENT))

    u = rng.choice(n_users, size=n_rows, p=u_activity / u_activity.sum())
    it = rng.choice(n_items, size=n_rows, p=i_popularity / i_popularity.sum())
    df = pd.DataFrame({"user_id": u, "item_id": it})
    df = df.assign(**{k: v[u] for k, v in users.items()}, **{k: v[it] for k, v in items.items()})
    for k, c in CONTEXT_CATS.items():
        df[k] = rng.integers(0, c, n_rows)
    df["item_price_bucket"] = np.digitize(np.log(i_price[it]), np.linspace(1.0, 5.5, 19))
    df["item_freshness_bucket"] = np.digitize(i_age_days[it], [1, 3, 7, 14, 30, 60, 120, 240, 365])
    df["user_activity"] = u_activity[u]
    df["user_tenure_days"] = rng.exponential(400.0, n_users)[u]
    df["user_ctr_7d"] = rng.beta(2.0, 30.0, n_users)[u]
    df["user_purchases_30d"] = rng.poisson(1.5, n_users)[u]
    df["user_avg_session_min"] = rng.lognormal(2.0, 0.6, n_users)[u]
    df["session_depth"] = rng.geometric(0.2, n_rows)
    df["item_price"] = i_price[it]
    df["item_popularity"] = i_popularity[it]
    df["item_ctr_7d"] = rng.beta(2.0, 30.0, n_items)[it]
    df["item_age_days"] = i_age_days[it]
    df["item_rating"] = i_rating[it]
    df["item_reviews"] = rng.poisson(i_popularity / 5.0)[it]
    df["item_duration_s"] = rng.lognormal(4.0, 0.7, n_items)[it]

    affinity = rng.normal(0.0, 0.8, (USER_CATS["user_segment"], ITEM_CATS["item_category"]))
    hour_effect = 0.3 * np.sin(np.arange(24) / 24 * 2 * np.pi)
    brand_effect = rng.normal(0.0, 0.5, ITEM_CATS["item_brand"])
    shared = (np.einsum("nk,nk->n", u_latent[u, 0], i_latent[it, 0]) / np.sqrt(LATENT)
              + affinity[df["user_segment"].to_numpy(), df["item_category"].to_numpy()]
              + 0.6 * (df["user_language"].to_numpy() == df["item_language"].to_numpy())
              + 0.3 * _z(np.log(df["item_popularity"].to_numpy())) + 0.2 * _z(df["item_rating"].to_numpy())
              + hour_effect[df["hour"].to_numpy()])
    own_like = (np.einsum("nk,nk->n", u_latent[u, 1], i_latent[it, 1]) / np.sqrt(LATENT)
                + 0.4 * _z(df["item_rating"].to_numpy()) + 0.2 * df["item_quality_tier"].to_numpy())
    own_buy = (-0.7 * _z(np.log(df["item_price"].to_numpy())) + 0.4 * _z(df["user_purchases_30d"].to_numpy())
               + brand_effect[df["item_brand"].to_numpy()])
    z = _z(shared)
    p = {"click": _sigmoid(-1.8 + 1.4 * z),
         "like": _sigmoid(-2.4 + 1.4 * _z(0.6 * z + 0.8 * _z(own_like))),
         "purchase": _sigmoid(-3.0 + 1.5 * _z(0.5 * z + 0.87 * _z(own_buy)))}
    for name, prob in p.items():
        df[name] = (rng.random(n_rows) < prob).astype(np.int8)
    return df


def write(path: str | Path, n_rows: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generate(n_rows, seed).to_parquet(path, index=False)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=150_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write(args.out, args.rows, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
