"""The synthetic feed generator: deterministic, structurally sound labels, a valid demo config."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.synthetic import DEMO_CONFIG, LABELS, generate, write
from mtrank.config import parse_config
from mtrank.metrics import auc

USER_COLUMNS = ["user_age_bucket", "user_country", "user_activity"]
ITEM_COLUMNS = ["item_category", "item_price", "item_tags", "item_popularity"]


@pytest.fixture(scope="module")
def feed() -> pd.DataFrame:
    return generate(50_000, seed=1)


def test_same_seed_same_frame_other_seed_other_frame() -> None:
    a, b, c = generate(3000, seed=5), generate(3000, seed=5), generate(3000, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_columns_and_value_ranges(feed: pd.DataFrame) -> None:
    features = [f["name"] for f in DEMO_CONFIG["features"]]
    assert list(feed.columns) == [*features, *LABELS]
    assert set(feed["click"].unique()) == {0, 1} and set(feed["purchase"].unique()) == {0, 1}
    assert set(feed["like"].dropna().unique()) == {0.0, 1.0}
    assert (feed["watch_time"].dropna() >= 0).all()
    assert feed["hour"].between(0, 23).all() and (feed["item_price"] > 0).all()
    tags = feed["item_tags"].str.split("|")
    assert tags.map(len).between(1, 4).all()
    assert (tags.map(len) == tags.map(lambda t: len(set(t)))).all()  # no repeated tag within an item


def test_user_and_item_attributes_are_consistent(feed: pd.DataFrame) -> None:
    """One value per user / item, so the rows can seed a feature store keyed by id."""
    assert (feed.groupby("user_id")[USER_COLUMNS].nunique() == 1).all().all()
    assert (feed.groupby("item_id")[ITEM_COLUMNS].nunique() == 1).all().all()


def test_purchase_implies_click(feed: pd.DataFrame) -> None:
    assert (feed.loc[feed["purchase"] == 1, "click"] == 1).all()
    assert 0.01 < feed["purchase"].mean() < feed["click"].mean() < 0.5


def test_watch_time_mostly_when_clicked(feed: pd.DataFrame) -> None:
    watch = feed["watch_time"]
    clicked = feed["click"] == 1
    assert watch[clicked].mean() > 5 * watch[~clicked].mean()
    assert (watch[~clicked].dropna() == 0).mean() > 0.7


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3])
def test_missing_label_fractions(rate: float) -> None:
    df = generate(40_000, seed=2, missing_label_rate=rate)
    for col in ("like", "watch_time"):
        assert df[col].isna().mean() == pytest.approx(rate, abs=0.01), col
    assert not df[["click", "purchase"]].isna().any().any()


def test_task_correlation_controls_click_like_correlation() -> None:
    def corr(rho: float) -> float:
        df = generate(40_000, seed=3, task_correlation=rho, missing_label_rate=0.0)
        return float(np.corrcoef(df["click"], df["like"])[0, 1])

    low, high = corr(0.0), corr(0.9)
    assert abs(low) < 0.03 and high > low + 0.1


def test_labels_are_learnable_beyond_base_rate(feed: pd.DataFrame) -> None:
    """Even a lookup table of click rates by (country, category) fitted on half the rows ranks well."""
    keys = ["user_country", "item_category"]
    train, test = feed.iloc[: len(feed) // 2], feed.iloc[len(feed) // 2 :]
    rates = train.groupby(keys)["click"].mean().rename("rate")
    pred = test.join(rates, on=keys)["rate"].fillna(train["click"].mean())
    assert auc(test["click"].to_numpy(), pred.to_numpy()) > 0.65


def test_generates_200k_rows_quickly() -> None:
    start = time.perf_counter()
    df = generate(200_000)
    assert len(df) == 200_000 and time.perf_counter() - start < 2.0


@pytest.mark.parametrize("name", ["feed.parquet", "feed.csv", "feed.csv.gz"])
def test_write_round_trips(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, 500, seed=4)
    back = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path)
    expected = generate(500, seed=4)
    assert list(back.columns) == list(expected.columns) and len(back) == 500
    np.testing.assert_array_equal(back["like"].isna(), expected["like"].isna())
    assert (back["user_id"].astype(str) == expected["user_id"].astype(str)).all()


def test_write_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format"):
        write(tmp_path / "feed.json", 10)


def test_demo_config_is_valid_and_matches_the_data(tmp_path: Path) -> None:
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["data"]["train"] = [str(tmp_path / "demo.parquet")]
    cfg = parse_config(raw, base_dir=tmp_path)
    assert [t.name for t in cfg.tasks] == ["ctr", "like", "ctcvr", "watch_time"]
    ctcvr = next(t for t in cfg.tasks if t.name == "ctcvr")
    assert ctcvr.chain is not None and (ctcvr.chain.parent, ctcvr.chain.head) == ("ctr", "cvr")
    assert cfg.model.arch == "mmoe" and cfg.eval.group_column == "user_id"
    assert {f.side for f in cfg.features} == {"user", "context", "item"}
    columns = set(generate(10).columns)
    assert {f.source for f in cfg.features} | {t.label.column for t in cfg.tasks} <= columns
    assert DEMO_CONFIG["data"]["train"] == ["demo.parquet"]  # the module constant is untouched
