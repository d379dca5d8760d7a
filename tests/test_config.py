"""Config validation: bad configs fail with an error naming the field; overrides and extends work."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mtrank.config import ConfigError, apply_overrides, load_config, parse_config

BASE = {
    "data": {"train": ["x.csv"]},
    "features": [{"name": "user_id", "side": "user"}, {"name": "price", "kind": "numeric", "side": "item"}],
    "tasks": [{"name": "ctr", "label": {"column": "click"}}],
}


def _with(path: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    apply_overrides(raw, [f"{path}={value}"])
    return raw


def test_minimal_config_defaults() -> None:
    cfg = parse_config(copy.deepcopy(BASE))
    assert cfg.features[0].kind == "categorical" and cfg.features[0].encoding == "hash"
    assert cfg.model.arch == "mmoe" and cfg.train.balancer.kind == "fixed"


@pytest.mark.parametrize("path,value,needle", [
    ("model.arch", "transformer", "model.arch"),
    ("train.epochs", "0", "train.epochs"),
    ("train.balancer", "magic", "train.balancer"),
    ("train.balancer", "{kind: gradnorm, alpha: -1}", "train.balancer.alpha"),
    ("train.balancer", "{kind: dwa, alpha: 1}", "train.balancer.alpha"),
    ("train.early_stopping.metric", "los", "train.early_stopping.metric"),
    ("train.early_stopping.metric", "ctr.mse", "train.early_stopping.metric"),
    ("train.early_stopping.metric", "ctr.gauc", "eval.group_column"),
    ("train.gates.entropy_towards", "up", "train.gates.entropy_towards"),
    ("features.0.buckets", "-3", "features.0.buckets"),
    ("features.1.side", "server", "features.1.side"),
    ("model.gate_temperature", "0", "model.gate_temperature"),
    ("tasks.0.type", "ranking", "tasks.0.type"),
    ("tasks.0.label.op", "gt", "tasks.0.label"),
    ("model.n_expertz", "3", "model.n_expertz"),
    ("data.stream", "{shuffle_buffer: 0}", "data.stream.shuffle_buffer"),
    ("data.stream", "{read_rows: -1}", "data.stream.read_rows"),
    ("data.stream", "{fit_sample_rows: 0}", "data.stream.fit_sample_rows"),
    ("data.stream", "{buffer: 10}", "data.stream.buffer"),
])
def test_bad_field_is_named(path: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_with(path, value))
    assert needle in str(err.value)


def test_chain_must_name_another_task() -> None:
    raw = copy.deepcopy(BASE)
    raw["tasks"].append({"name": "ctcvr", "label": {"column": "buy"}, "chain": {"parent": "ctx", "head": "cvr"}})
    with pytest.raises(ConfigError, match=r"tasks.1.chain.parent"):
        parse_config(raw)


def test_duplicate_feature_names() -> None:
    raw = copy.deepcopy(BASE)
    raw["features"].append({"name": "user_id", "side": "user"})
    with pytest.raises(ConfigError, match=r"features: duplicate names \['user_id'\]"):
        parse_config(raw)


def test_headerless_csv_needs_columns() -> None:
    with pytest.raises(ConfigError, match="columns"):
        parse_config(_with("data.header", "false"))


def test_extends_overrides_and_env(tmp_path: Path, monkeypatch) -> None:
    import yaml

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "data": {"train": ["${MY_DIR:-def}/x.csv"]}}))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {arch: ple, levels: 3}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.seed=7", "model.levels=2"])
    assert (cfg.model.arch, cfg.model.levels, cfg.train.seed) == ("ple", 2, 7)
    assert cfg.data.resolve(cfg.data.train[0]) == tmp_path / "def" / "x.csv"
    monkeypatch.setenv("MY_DIR", "/data")
    assert load_config(tmp_path / "child.yaml").data.resolve(cfg.data.train[0]) == Path("/data/x.csv")


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["model.arch"])


def test_census_example_configs_validate() -> None:
    for arch in ("single", "shared_bottom", "mmoe", "cgc", "ple"):
        cfg = load_config(Path(__file__).parents[1] / "examples" / "census-income" / f"{arch}.yaml")
        assert cfg.model.arch == arch
        assert cfg.task_names == ["income", "marital"]


def test_streamed_data_needs_validation_files_and_parquet() -> None:
    raw = _with("data.stream", "{}")
    with pytest.raises(ConfigError, match=r"data\.validation: required with data\.stream"):
        parse_config(raw)
    raw["data"]["validation"] = ["val.parquet"]
    with pytest.raises(ConfigError, match=r"data\.train\.0: data\.stream reads Parquet only, not 'x\.csv'"):
        parse_config(raw)
    raw["data"]["train"] = ["days/", "more/*.parquet"]
    raw["data"]["test"] = ["test.csv.gz"]
    with pytest.raises(ConfigError, match=r"data\.test\.0: data\.stream reads Parquet only, not 'test\.csv\.gz'"):
        parse_config(raw)
    raw["data"]["test"] = ["test/"]
    cfg = parse_config(raw)
    assert cfg.data.stream is not None and cfg.data.stream.shuffle_buffer == 200_000
    assert cfg.data.stream.fit_sample_rows is None and cfg.data.stream.prefetch
    raw["data"]["format"] = "csv"
    with pytest.raises(ConfigError, match=r"data\.format: data\.stream reads Parquet only"):
        parse_config(raw)
