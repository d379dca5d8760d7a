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


@pytest.mark.parametrize("numeric", ["scalar", "piecewise_linear"])
def test_feature_parity_training_vs_json_requests(demo_data: Path, numeric: str) -> None:
    """Rows encoded by the trainer (from the file) equal the same rows sent as JSON and encoded the service's way."""
    import pandas as pd

    from model.data import encode_split, fit_schema, needed_columns, read_files
    from mtrank.encoding import FeatureEncoder

    cfg = demo_config(demo_data, [f"features.{i}.{k}" for i in (3, 8, 10)
                                  for k in (f"encoding={numeric}", "clip=null")] if numeric != "scalar" else [])
    df = read_files(cfg.data, cfg.data.train, needed_columns(cfg))
    schema = fit_schema(cfg, df)
    trained = encode_split(cfg, schema, df.head(300)).inputs
    assert schema.n_dense("item") == (2 if numeric == "scalar" else 2 + sum(len(f.edges) - 1 for f in schema.features
                                                                             if f.side == "item" and f.edges))
    assert numeric == "scalar" or schema.n_dense("item") > 10
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


# ------------------------------------------------------------------------- early stopping, defects


def test_regression_only_tasks_stop_on_validation_loss(tmp_path: Path, demo_data: Path) -> None:
    """With only regression tasks, mean_auc cannot be computed: the default follows the tasks (mean validation
    loss), and the kept epoch is the one with the lowest validation MSE, not epoch 1 by default."""
    from model.train import train
    from mtrank.config import ConfigError

    only_regression = ["tasks=[{name: watch_time, type: regression, label: {column: watch_time}}, "
                       "{name: activity, type: regression, label: {column: user_activity}}]"]
    m = train(demo_config(demo_data, [*only_regression, "train.epochs=4", "train.lr=0.01",
                                      "train.early_stopping.patience=4"]), tmp_path / "run")
    assert m["train"]["early_stopping_metric"] == "loss"
    values = [h["val_metric"] for h in m["history"]]
    assert all(np.isfinite(values))
    assert m["train"]["best_epoch"] == int(np.argmin(values)) + 1 and m["train"]["best_value"] == min(values)
    with pytest.raises(ConfigError, match=r"train.early_stopping.metric: 'mean_auc' needs a binary task"):
        demo_config(demo_data, [*only_regression, "train.early_stopping.metric=mean_auc"])


def test_early_stopping_on_loss_metric(tmp_path: Path, demo_data: Path) -> None:
    """``metric: loss`` (documented) trains and keeps the epoch of the lowest mean validation loss."""
    from model.train import train

    m = train(demo_config(demo_data, ["train.epochs=2", "train.early_stopping.metric=loss"]), tmp_path / "run")
    losses = [np.mean([v.get("logloss", v.get("mse")) for v in h["val"].values()]) for h in m["history"]]
    assert [h["val_metric"] for h in m["history"]] == pytest.approx(losses)
    assert m["train"]["best_value"] == pytest.approx(min(losses))


def test_missing_column_is_a_config_error_naming_the_field(tmp_path: Path, demo_data: Path, capsys) -> None:
    import yaml

    from mtrank.cli import main

    cfg = demo_config(demo_data).model_dump(mode="json")
    cfg["tasks"][1]["label"]["column"] = "liked"
    cfg["features"][2]["column"] = "country"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"features.2.column: column 'country' not in {demo_data.name}" in err
    assert f"tasks.1.label.column: column 'liked' not in {demo_data.name}" in err
    assert "Traceback" not in err


def test_census_headerless_missing_column_names_the_field(tmp_path: Path) -> None:
    """A headerless CSV: the columns come from ``data.columns``; a label column outside them is named."""
    from model.data import load_frames
    from mtrank.config import ConfigError, parse_config

    (tmp_path / "d.csv").write_text("1,a,0\n2,b,1\n3,a,0\n4,b,1\n")
    cfg = parse_config({"data": {"train": ["d.csv"], "header": False, "columns": ["x", "c", "y"]},
                        "features": [{"name": "c", "side": "user"}],
                        "tasks": [{"name": "t", "label": {"column": "income"}}]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"tasks.0.label.column: column 'income' not in d.csv"):
        load_frames(cfg)


@pytest.mark.parametrize("balancer", ["gradnorm", "dwa", "pcgrad", "mgda", "{kind: mgda, upper_bound: true}"])
def test_every_balancer_trains_and_records_instruments(tmp_path: Path, demo_data: Path, balancer: str) -> None:
    from model.train import train

    m = train(demo_config(demo_data, ["train.epochs=2", f"train.balancer={balancer}", "model.arch=ple",
                                      "model.levels=2", "train.gates.load_balance_weight=0.01"]), tmp_path)
    tasks = ["ctr", "like", "ctcvr", "watch_time"]
    for h in m["history"]:
        assert set(h["weights"]) == set(h["grad_norm"]) == set(tasks)
        assert all(np.isfinite(list(h["weights"].values())))
        assert len(h["grad_cosine"]) == 6 and all(-1.0 <= c <= 1.0 for c in h["grad_cosine"].values())
        assert h["probes"] == 8
        assert set(h["gates"]) == {"gate_l0_ctr", "gate_l0_like", "gate_l0_ctcvr", "gate_l0_watch_time",
                                   "gate_l0_shared", "gate_l1_ctr", "gate_l1_like", "gate_l1_ctcvr",
                                   "gate_l1_watch_time"}
    first, last = m["history"][0]["train_loss"], m["history"][-1]["train_loss"]
    assert last["ctr"] < first["ctr"] and last["like"] < first["like"]
    if "mgda" in balancer or balancer in ("dwa", "gradnorm"):
        assert sum(m["history"][-1]["weights"].values()) == pytest.approx(4.0, rel=1e-3)


def test_report_writes_plots_and_summary(tmp_path: Path, tiny_run: Path, capsys) -> None:
    from mtrank.cli import main

    assert main(["report", str(tiny_run), "--out", str(tmp_path / "rep")]) == 0
    m = json.loads((tiny_run / "metrics.json").read_text())
    for name in ("curves.png", "conflict.png", "gates_l0.png", "reliability.png"):
        data = (tmp_path / "rep" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"best epoch **{m['train']['best_epoch']}**" in md
    for section in ("## Metrics", "## Gradient conflict", "## Gates", "## Calibration", "## Instruments"):
        assert section in md
    assert f"| test | ctr | {m['test']['ctr']['auc']:.4f} |" in md
    assert "ctr vs like" in md and "gate_l0_watch_time" in md
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_cosine_schedule_and_ema_weights(tmp_path: Path, demo_data: Path) -> None:
    """The cosine schedule reaches 0 at the last epoch; with ema_decay the kept weights are the moving average,
    which a plain run from the same seed does not produce."""
    import torch

    from model.train import train

    base = ["train.epochs=2", "train.lr_schedule=cosine", "train.early_stopping.patience=5"]
    plain = train(demo_config(demo_data, base), tmp_path / "plain")
    assert plain["history"][0]["lr"] == pytest.approx(demo_config(demo_data, base).train.lr / 2, rel=0.05)
    assert plain["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-9)
    ema = train(demo_config(demo_data, [*base, "train.ema_decay=0.9"]), tmp_path / "ema")
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ema" / "model.pt", weights_only=True)
    assert set(a) <= set(b) and any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert ema["validation"]["ctr"]["auc"] != plain["validation"]["ctr"]["auc"]
