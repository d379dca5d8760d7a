"""Streamed Parquet training data (model/stream.py): the schema equals the in-memory fit, every row once per epoch
in a fresh order, ranks split the rows, the buffer mixes row groups, errors name the field, and training matches
the in-memory path."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.data import fit_schema
from model.stream import ParquetRows, StreamData, fit_schema_streamed, prefetched, row_slices, shuffled
from model.train import Placement
from mtrank.config import Config, ConfigError, apply_overrides, parse_config
from mtrank.encoding import FittedSchema
from tests.conftest import TINY_OVERRIDES

SHARDS, SHARD_ROWS, GROUP_ROWS = 4, 6000, 2000  # 4 files x 3 row groups of 2000 rows


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same rows as flat shards and as hive partitions ``day=k/``; ``rid`` numbers the rows 0..N-1 (in the
    flat layout row group g holds rids [2000 g, 2000 (g + 1)))."""
    from model.synthetic import generate

    root = tmp_path_factory.mktemp("stream")
    n = SHARDS * SHARD_ROWS
    rows = generate(n + 8000, seed=0)  # one synthetic world: train shards, then validation and test rows
    rows["rid"] = np.arange(len(rows))
    (root / "flat").mkdir()
    for k in range(SHARDS):
        df = rows.iloc[k * SHARD_ROWS : (k + 1) * SHARD_ROWS]
        (root / f"hive/day={k}").mkdir(parents=True)
        df.to_parquet(root / f"flat/part-{k}.parquet", index=False, row_group_size=GROUP_ROWS)
        df.to_parquet(root / f"hive/day={k}/part-0.parquet", index=False, row_group_size=GROUP_ROWS)
    rows.iloc[n : n + 4000].to_parquet(root / "val.parquet", index=False)
    rows.iloc[n + 4000 :].to_parquet(root / "test.parquet", index=False)
    return {"root": root, "frame": rows.iloc[:n].assign(day=np.repeat(np.arange(SHARDS), SHARD_ROWS))}


def stream_config(root: Path, train: list[str], stream: dict[str, Any] | None = None, overrides: list[str] = (),
                  rid_task: bool = False, piecewise: bool = False, day: bool = False) -> Config:
    from model.synthetic import DEMO_CONFIG

    raw = json.loads(json.dumps(DEMO_CONFIG))
    raw["data"] = {"train": train, "validation": ["val.parquet"], "test": ["test.parquet"],
                   "stream": {"shuffle_buffer": 5000, "read_rows": 1000, **(stream or {})}}
    if piecewise:
        for f in raw["features"]:
            if f["kind"] == "numeric":
                f.update(encoding="piecewise_linear", bins=8)
    if day:
        raw["features"].append({"name": "day", "side": "context", "encoding": "vocab"})
    if rid_task:  # the row id as a regression label: batches tell which rows they hold
        raw["tasks"].append({"name": "rid", "type": "regression", "label": {"column": "rid"}})
    return parse_config(apply_overrides(raw, [*TINY_OVERRIDES, *overrides]), base_dir=root)


def assert_same_schema(a: FittedSchema, b: FittedSchema) -> None:
    """Equal but for float sums taken in another order (means, standard deviations, defaults: 1e-9 relative)."""
    assert a.table_size == b.table_size
    for fa, fb in zip(a.features, b.features, strict=True):
        assert (fa.name, fa.vocab, fa.offset, fa.edges) == (fb.name, fb.vocab, fb.offset, fb.edges), fa.name
        for key in ("mean", "std", "default"):
            assert getattr(fa, key) == pytest.approx(getattr(fb, key), rel=1e-9, abs=1e-12), (fa.name, key)


# ------------------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("layout", ["flat", "hive", "glob"])
def test_streamed_schema_equals_the_in_memory_fit(data: dict[str, Any], layout: str) -> None:
    train = {"flat": ["flat"], "hive": ["hive"], "glob": ["flat/part-[0-1].parquet", "flat/part-[23].parquet"]}[layout]
    cfg = stream_config(data["root"], train, piecewise=True, day=layout == "hive")
    rows = ParquetRows(cfg)
    assert (rows.rows, len(rows.groups)) == (SHARDS * SHARD_ROWS, SHARDS * SHARD_ROWS // GROUP_ROWS)
    streamed = fit_schema_streamed(cfg, rows)
    assert_same_schema(streamed, fit_schema(cfg, data["frame"]))
    assert all(len(f.edges) == 9 for f in streamed.features if f.kind == "numeric")
    if layout == "hive":  # the partition directories became a column, read like any other
        assert streamed.feature("day").vocab == ["0", "1", "2", "3"]


def test_bounded_distinct_values_keep_the_exact_range(data: dict[str, Any]) -> None:
    """Above ``distinct_sample`` distinct values the edges come from a uniform sample of them: the end edges stay
    exact, the inner ones land near their quantile of the distinct values."""
    cfg = stream_config(data["root"], ["flat"], {"distinct_sample": 200}, piecewise=True)
    streamed = fit_schema_streamed(cfg, ParquetRows(cfg))
    exact = fit_schema(cfg, data["frame"])
    for f, e in zip(streamed.features, exact.features):
        if f.kind != "numeric":
            continue
        x = data["frame"][f.source].to_numpy(dtype=np.float64)
        distinct = np.unique(np.sign(x) * np.log1p(np.abs(x)))
        assert len(distinct) > 200 and len(f.edges) == len(e.edges) == 9, f.name
        assert (f.edges[0], f.edges[-1]) == (e.edges[0], e.edges[-1])
        ranks = np.searchsorted(distinct, f.edges) / (len(distinct) - 1)
        assert np.abs(ranks - np.linspace(0, 1, 9)).max() < 0.1, (f.name, ranks)


def test_fit_on_a_seeded_sample_of_rows(data: dict[str, Any]) -> None:
    cfg = stream_config(data["root"], ["flat"], {"fit_sample_rows": 5000, "seed": 7})
    rows = ParquetRows(cfg)
    order = np.random.default_rng(7).permutation(len(rows.groups))  # the documented row-group order
    first = np.concatenate([np.arange(GROUP_ROWS) + GROUP_ROWS * g for g in order[:3]])[:5000]
    sample = data["frame"].iloc[first]
    assert_same_schema(fit_schema_streamed(cfg, rows), fit_schema(cfg, sample))
    assert fit_schema_streamed(cfg, rows).feature("item_price").mean != fit_schema(cfg, data["frame"]).feature(
        "item_price").mean


# ------------------------------------------------------------------------------------------ batches


def epoch_rids(cfg: Config, schema: FittedSchema, gen: torch.Generator, rank: int = 0, world: int = 1
               ) -> tuple[list[np.ndarray], StreamData]:
    placement = Placement(torch.device("cpu"), rank, world)
    source = StreamData(cfg, schema, ParquetRows(cfg), placement)
    k = cfg.task_names.index("rid")
    return [b.labels[:, k].long().numpy() for b in source.batches(gen, cfg.train.batch_size, placement)], source


@pytest.fixture(scope="module")
def rid_cfg(data: dict[str, Any]) -> tuple[Config, FittedSchema]:
    cfg = stream_config(data["root"], ["flat"], rid_task=True, overrides=["train.batch_size=500"])
    return cfg, fit_schema_streamed(cfg, ParquetRows(cfg))


@pytest.mark.parametrize("prefetch", [True, False])
def test_every_row_once_per_epoch_in_a_new_order(rid_cfg: tuple[Config, FittedSchema], prefetch: bool) -> None:
    cfg, schema = rid_cfg
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"stream": cfg.data.stream.model_copy(
        update={"prefetch": prefetch})})})
    gen = torch.Generator().manual_seed(0)
    e1, source = epoch_rids(cfg, schema, gen)
    e2, _ = epoch_rids(cfg, schema, gen)
    other, _ = epoch_rids(cfg, schema, torch.Generator().manual_seed(1))
    n = SHARDS * SHARD_ROWS
    assert source.rows == (n // 500) * 500 == sum(map(len, e1))  # 24000 rows: nothing to drop
    for epoch in (e1, e2, other):
        assert len(epoch) == source.n_batches and all(len(b) == 500 for b in epoch)
        assert np.array_equal(np.sort(np.concatenate(epoch)), np.arange(n))
    assert not np.array_equal(np.concatenate(e1), np.concatenate(e2))
    assert not np.array_equal(np.concatenate(e1), np.concatenate(other))


@pytest.mark.parametrize("batch_size", [500, 333])
def test_two_ranks_read_disjoint_rows_in_the_same_number_of_batches(rid_cfg: tuple[Config, FittedSchema],
                                                                    batch_size: int) -> None:
    """Rank r's share of a batch is len(range(r, B, 2)) rows (333: 167 and 166), as in TrainData; ranks read rows
    in proportion and step together. An odd batch size leaves fewer than 2 global batches undrawn."""
    cfg, schema = rid_cfg
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch_size})})
    ranks = [epoch_rids(cfg, schema, torch.Generator().manual_seed(5), r, 2) for r in (0, 1)]
    (b0, s0), (b1, s1) = ranks
    assert len(b0) == len(b1) == s0.n_batches == s1.n_batches
    assert [len(b) for b in b0] == [len(range(0, batch_size, 2))] * len(b0)
    assert [len(b) for b in b1] == [len(range(1, batch_size, 2))] * len(b1)
    r0, r1 = np.concatenate(b0), np.concatenate(b1)
    assert not set(r0.tolist()) & set(r1.tolist())
    seen = np.unique(np.concatenate([r0, r1]))
    assert len(seen) == len(r0) + len(r1) == s0.rows
    assert SHARDS * SHARD_ROWS - len(seen) < 2 * batch_size


@pytest.mark.parametrize("buffer,interleave,groups", [(1, 1, 1), (5000, 1, 3), (5000, 4, 4), (5000, 64, 5)])
def test_the_shuffle_buffer_mixes_row_groups(rid_cfg: tuple[Config, FittedSchema], buffer: int, interleave: int,
                                             groups: int) -> None:
    """The first batch (500 rows) is drawn once the buffer holds ``buffer`` rows, read 1000 at a time: with a buffer
    of one batch, from the first record batch (one row group); with 5000 rows read one row group after the other
    (2000 rows each), from three; with 4 or 64 row groups read in turn, from 4 or 5 (five record batches)."""
    cfg, schema = rid_cfg
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"stream": cfg.data.stream.model_copy(
        update={"shuffle_buffer": buffer, "interleave": interleave})})})
    first = epoch_rids(cfg, schema, torch.Generator().manual_seed(0))[0][0]
    assert len(np.unique(first // GROUP_ROWS)) == groups
    if groups > 1:  # and out of their stored order
        assert not np.all(np.diff(first[first // GROUP_ROWS == first[0] // GROUP_ROWS]) > 0)


def test_interleaved_reads_take_row_groups_in_rounds_of_equal_size(rid_cfg: tuple[Config, FittedSchema]) -> None:
    """12 row groups, interleave 5: three rounds of 4 (not 5, 5, 2), each group's two record batches in turn."""
    cfg, _ = rid_cfg
    rows = ParquetRows(cfg)
    frames = rows.read(row_slices(rows.groups, 0, rows.rows), ["rid"], interleave=5)
    firsts = [int(df["rid"].iloc[0]) for df in frames]
    assert [r // GROUP_ROWS for r in firsts] == [g for r in range(3) for _ in range(2) for g in range(4 * r, 4 * r + 4)]
    assert firsts[:5] == [0, 2000, 4000, 6000, 1000]


def test_shuffled_draws_every_row_once_and_fails_when_rows_run_out() -> None:
    chunks = [{"x": np.arange(i, i + 70), "y": np.arange(i, i + 70)[:, None] * 2} for i in range(0, 700, 70)]
    out = list(shuffled(iter(chunks), np.random.default_rng(0), 64, 150, 10))
    assert len(out) == 10 and all(len(b["x"]) == 64 and np.array_equal(b["y"][:, 0], 2 * b["x"]) for b in out)
    assert len(np.unique(np.concatenate([b["x"] for b in out]))) == 640
    with pytest.raises(RuntimeError, match="ran out after 10 of 11 batches"):
        list(shuffled(iter(chunks), np.random.default_rng(0), 64, 150, 11))


def test_prefetch_raises_the_producer_error_and_stops_its_thread() -> None:
    def failing():
        yield 1
        raise ValueError("bad row group")

    it = prefetched(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad row group"):
        next(it)
    it = prefetched(iter(range(1000)), depth=1)
    assert next(it) == 0
    it.close()
    assert not any(t.name == "mtrank-prefetch" for t in threading.enumerate())


# ------------------------------------------------------------------------------------------- errors


def test_a_shard_without_a_column_names_the_field_and_the_file(data: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "day=1").mkdir()
    data["frame"].iloc[:100].drop(columns=["like", "day"]).to_parquet(tmp_path / "day=1/part-0.parquet")
    cfg = stream_config(data["root"], [str(tmp_path)])
    with pytest.raises(ConfigError, match=r"tasks\.1\.label\.column: column 'like' not in day=1/part-0\.parquet"):
        ParquetRows(cfg)


def test_unreadable_or_absent_train_data_names_the_entry(data: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "part-0.parquet").write_text("user_id,click\nu1,1\n")
    with pytest.raises(ConfigError, match=r"data\.train\.0: .*: not a readable Parquet file"):
        ParquetRows(stream_config(data["root"], [str(tmp_path)]))
    with pytest.raises(ConfigError, match=r"data\.train\.1: no files match"):
        ParquetRows(stream_config(data["root"], ["flat", "nowhere/*.parquet"]))
    with pytest.raises(ConfigError, match=r"data\.train\.0: file not found"):
        ParquetRows(stream_config(data["root"], ["missing.parquet"]))


# ------------------------------------------------------------------------------------------ training


def test_streamed_training_matches_the_in_memory_path(data: dict[str, Any]) -> None:
    """The same rows, seed, schema and initial weights: only the batch order differs (streamed: row groups in a
    random order, all 12 at a time, through a 5000-row buffer, 448 rows (under a batch) dropped per epoch; in memory: one permutation). Measured over
    seeds 0-2: |test AUC streamed - in memory| <= 0.0033 per task, while one path's AUC spreads by up to 0.026 across
    those seeds; the bound, 0.01, is 3x the measured gap. Misaligned labels or features would fall to ~0.5."""
    from model.train import train

    root = data["root"]
    streamed = stream_config(root, ["flat"], overrides=["train.epochs=2"])
    in_memory = parse_config({**streamed.model_dump(mode="json"), "data": {
        "train": [f"flat/part-{k}.parquet" for k in range(SHARDS)], "validation": ["val.parquet"],
        "test": ["test.parquet"]}}, base_dir=root)
    a = train(streamed, root / "run-stream")
    b = train(in_memory, root / "run-memory")
    assert (a["train"]["rows"], b["train"]["rows"]) == (24_000 // 512 * 512, 24_000)  # streamed: whole batches
    assert a["train"]["prepare_seconds"] > 0 and (root / "run-stream" / "model.pt").exists()
    assert a["train"]["params"] == b["train"]["params"]
    for task in ("ctr", "like", "ctcvr"):
        assert a["test"][task]["auc"] > 0.6, task
        assert math.isclose(a["test"][task]["auc"], b["test"][task]["auc"], abs_tol=0.01), task


def test_streamed_evaluation_equals_the_in_memory_one(data: dict[str, Any], tiny_run: Path) -> None:
    """The test split read in record batches over several row groups and files scores exactly like the whole
    frame in memory: the same metrics (gAUC groups included) and gate statistics, with no split held in memory."""
    import pandas as pd

    from model.data import encode_split
    from model.evaluate import evaluate_split, to_tensors
    from model.stream import evaluate_streamed
    from model.train import load_run

    cfg, schema, model = load_run(tiny_run)
    root = data["root"]
    frame = pd.read_parquet(root / "test.parquet")
    (root / "test-parts").mkdir(exist_ok=True)
    frame.iloc[:2500].to_parquet(root / "test-parts/a.parquet", index=False, row_group_size=700)
    frame.iloc[2500:].to_parquet(root / "test-parts/b.parquet", index=False, row_group_size=900)
    streamed_cfg = stream_config(root, ["flat"]).model_copy(update={"tasks": cfg.tasks, "eval": cfg.eval})
    streamed_cfg = parse_config({**streamed_cfg.model_dump(mode="json"),
                                 "data": {**streamed_cfg.data.model_dump(mode="json"), "test": ["test-parts"]}},
                                base_dir=root)
    got, got_gates = evaluate_streamed(streamed_cfg, schema, model)
    split = encode_split(cfg, schema, frame)
    want, want_gates = evaluate_split(cfg, model, split, to_tensors(split))
    assert got.keys() == want.keys()
    for task, m in want.items():
        for key, v in m.items():
            if isinstance(v, float):
                assert got[task][key] == pytest.approx(v, rel=1e-6, abs=1e-9), (task, key)
    for gate, st in want_gates.items():
        assert got_gates[gate]["mean"] == pytest.approx(st["mean"], rel=1e-5)
        assert got_gates[gate]["entropy"] == pytest.approx(st["entropy"], rel=1e-5)
        assert got_gates[gate]["dead"] == st["dead"]
