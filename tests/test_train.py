"""Training end to end on synthetic data: learns, is deterministic, writes the documented run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import demo_config


def test_run_directory_and_metrics_shape(tiny_run: Path) -> None:
    for name in ("config.yaml", "schema.json", "model.pt", "val.npz", "metrics.json", "train.log"):
        assert (tiny_run / name).exists(), name
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert set(m["validation"]) == set(m["test"]) == {"ctr", "like", "ctcvr", "watch_time"}
    for task in ("ctr", "like", "ctcvr"):
        for key in ("auc", "logloss", "ece", "gauc", "reliability"):
            assert key in m["test"][task], (task, key)
        assert len(m["test"][task]["reliability"]) == 10
    assert {"mse", "mae"} <= set(m["test"]["watch_time"])
    gates = m["gates"]["validation"]
    assert set(gates) == {"gate_l0_ctr", "gate_l0_like", "gate_l0_ctcvr", "gate_l0_watch_time"}
    for g in gates.values():
        assert sum(g["mean"]) == pytest.approx(1.0, abs=1e-4)
    assert m["train"]["rows_per_s"] > 0 and len(m["history"]) == m["train"]["epochs_run"]
    assert "loss[ctr]=" in (tiny_run / "train.log").read_text()


def test_learns_clearly_beyond_base_rate(tmp_path: Path) -> None:
    """On the synthetic feed the model must beat a constant predictor clearly."""
    from model.synthetic import write
    from model.train import train

    write(tmp_path / "feed.parquet", 40_000, seed=1)
    m = train(demo_config(tmp_path / "feed.parquet", ["train.epochs=3", "model.arch=ple", "train.lr=0.005"]),
              tmp_path / "run")
    ctr = m["test"]["ctr"]
    base = ctr["base_rate"]
    base_logloss = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert ctr["auc"] > 0.65
    assert ctr["logloss"] < base_logloss - 0.01
    assert m["test"]["ctcvr"]["auc"] > 0.6


def test_same_seed_same_result(tmp_path: Path, demo_data: Path) -> None:
    from model.train import train

    a = train(demo_config(demo_data, ["train.epochs=1", "train.seed=3"]), tmp_path / "a")
    b = train(demo_config(demo_data, ["train.epochs=1", "train.seed=3"]), tmp_path / "b")
    c = train(demo_config(demo_data, ["train.epochs=1", "train.seed=4"]), tmp_path / "c")
    assert a["test"]["ctr"]["auc"] == b["test"]["ctr"]["auc"]
    assert a["test"]["ctr"]["auc"] != c["test"]["ctr"]["auc"]


def test_uncertainty_balancer_trains(tmp_path: Path, demo_data: Path) -> None:
    from model.train import train

    m = train(demo_config(demo_data, ["train.epochs=1", "train.balancer=uncertainty", "train.lr=0.01"]), tmp_path)
    log_var = m["history"][0]["balancer"]["log_var"]
    assert len(log_var) == 4 and all(v != 0.0 for v in log_var), "task uncertainties were not learned"
    assert len(set(log_var)) == 4


def test_cli_train_with_overrides(tmp_path: Path, demo_data: Path, capsys) -> None:
    import yaml

    from mtrank.cli import main

    cfg = demo_config(demo_data)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rc = main(["train", str(path), "--out", str(tmp_path / "run"), "--set", "model.arch=cgc", "--set", "train.epochs=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "validation ctr" in out and "gate gate_l0_ctr" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["arch"] == "cgc"
    rc = main(["train", str(path), "--out", str(tmp_path / "bad"), "--set", "model.arch=nope"])
    assert rc == 2
    assert "model.arch" in capsys.readouterr().err


def test_feature_parity_training_vs_json_requests(demo_data: Path) -> None:
    """Rows encoded by the trainer (from the file) equal the same rows sent as JSON and encoded the service's way."""
    import pandas as pd

    from model.data import encode_split, fit_schema, read_files
    from mtrank.encoding import FeatureEncoder

    cfg = demo_config(demo_data)
    df = read_files(cfg.data, cfg.data.train, [f.source for f in cfg.features] + [t.label.column for t in cfg.tasks])
    schema = fit_schema(cfg, df)
    trained = encode_split(cfg, schema, df.head(300)).inputs
    raw = pd.read_parquet(demo_data).head(300)
    records = json.loads(raw.to_json(orient="records"))  # what a client would send
    enc = FeatureEncoder(schema)
    for group in ("request", "item"):
        cols = {f.name: [r.get(f.source) for r in records] for f in schema.features if f.group == group}
        served = enc.encode(group, cols, len(records))
        for name, arr in served.items():
            np.testing.assert_array_equal(arr, trained[name], err_msg=name)


def test_demo_command_trains_and_exports(tmp_path: Path) -> None:
    """The README's main job, minus serving: synthetic data -> train -> a verified, active bundle."""
    from mtrank.bundle import read_current, verify_bundle
    from mtrank.cli import main

    rc = main(["demo", "--workdir", str(tmp_path), "--rows", "4000", "--no-serve",
               "--set", "train.epochs=1", "--set", "train.threads=1", "--set", "train.progress=false"])
    assert rc == 0
    version = read_current(tmp_path / "bundles")
    manifest, _ = verify_bundle(tmp_path / "bundles" / version)
    assert manifest.arch == "mmoe" and manifest.task("cvr").derived
