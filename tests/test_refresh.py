"""``mtrank refresh``: vocabulary extension keeps the model's function, the window, the gate's decisions, the log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrank.bundle import BundleError, read_current, read_manifest, verify_bundle
from mtrank.config import ConfigError
from tests.conftest import demo_config

ROWS_OLD, ROWS_NEW = 30_000, 45_000


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model trained on an old period, exported as the active bundle; the new period drifted
    (``model.synthetic.drift``: a new device, a category losing clicks) in three day partitions, and the same
    days with the two training partitions' labels permuted (``corrupt/``)."""
    from model.export import export_run
    from model.synthetic import write_refresh_days
    from model.train import train

    root = write_refresh_days(tmp_path_factory.mktemp("refresh"), ROWS_OLD, ROWS_NEW // 3)
    train(demo_config(root / "old.parquet", ["train.epochs=3"]), root / "runs" / "base")
    export_run(root / "runs" / "base", root / "bundles", version="base")
    return root


def _config(root: Path, name: str, data: str = "data", **extra: str) -> Path:
    text = (f"bundles: bundles\nruns: runs\n"
            f"window: {{kind: partitions, glob: '{data}/day=*', train_partitions: 2, holdout_partitions: 1}}\n"
            f"train: {{epochs: 2}}\n" + "".join(f"{k}: {v}\n" for k, v in extra.items()))
    path = root / name
    path.write_text(text)
    return path


def _log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "bundles" / "refresh-log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ warm start


def test_extended_vocabulary_keeps_every_score(tiny_run: Path, demo_data: Path) -> None:
    """New vocabulary rows start from the OOV row and known rows move with their feature's block, so the
    warm-started model scores old and new values exactly as the old model did."""
    import pandas as pd

    from model.data import encode_split
    from model.evaluate import predict, to_tensors
    from model.train import build_model, load_run
    from model.warmstart import WarmStart

    cfg, schema, model = load_run(tiny_run)
    frame = pd.read_parquet(demo_data).iloc[:500].reset_index(drop=True)
    frame.loc[:199, "device"] = "tv"  # new context value, 200 times
    frame.loc[100:299, "item_category"] = "c_new"  # new item value, placed after device in the table
    prepared = WarmStart(schema, model.state_dict()).prepare(cfg, frame)
    assert prepared.vocab_added == {"device": 1, "item_category": 1}
    grown = prepared.schema.feature("device")
    assert grown.vocab == [*schema.feature("device").vocab, "tv"]
    assert prepared.schema.table_size == schema.table_size + 2
    assert prepared.schema.feature("item_id").offset == schema.feature("item_id").offset + 1  # moved by one row

    new_model = build_model(cfg, prepared.schema)
    new_model.load_state_dict(prepared.state)
    new_model.eval()
    old_split, new_split = encode_split(cfg, schema, frame), encode_split(cfg, prepared.schema, frame)
    assert not np.array_equal(old_split.inputs["request_ids"], new_split.inputs["request_ids"])  # "tv" is known now
    before, _ = predict(model, to_tensors(old_split))
    after, _ = predict(new_model, to_tensors(new_split))
    for task in before:
        np.testing.assert_allclose(after[task], before[task], rtol=0, atol=1e-6)
    assert prepared.state["embedding.table.weight"].shape[0] == prepared.schema.table_size
    assert not torch.equal(prepared.state["embedding.table.weight"][: schema.table_size],
                           model.state_dict()["embedding.table.weight"])  # rows were re-laid out, not appended


def test_no_extension_when_disabled_or_nothing_new(tiny_run: Path, demo_data: Path) -> None:
    import pandas as pd

    from model.train import load_run
    from model.warmstart import WarmStart

    cfg, schema, model = load_run(tiny_run)
    frame = pd.read_parquet(demo_data)
    assert WarmStart(schema, model.state_dict()).prepare(cfg, frame).schema == schema
    frame.loc[:, "device"] = "tv"
    assert WarmStart(schema, model.state_dict(), extend_vocab=False).prepare(cfg, frame).schema == schema


# ---------------------------------------------------------------------------------------- config


def test_refresh_config_errors_name_the_field(tmp_path: Path) -> None:
    from model.refresh import load_refresh_config, parse_every

    bad = tmp_path / "r.yaml"
    bad.write_text("bundles: b\nruns: r\nwindow: {kind: partitions, glob: 'x/*', train_partitions: 0}\n")
    with pytest.raises(ConfigError, match=r"window\.train_partitions: Input should be greater than 0"):
        load_refresh_config(bad)
    bad.write_text("bundles: b\nruns: r\nwindow: {kind: days}\n")
    with pytest.raises(ConfigError, match=r"window: Input tag 'days'"):
        load_refresh_config(bad)
    bad.write_text("bundles: b\nruns: r\nwindow: {kind: files, train: [a], holdout: [b]}\ngate: {max_ece: 0}\n")
    with pytest.raises(ConfigError, match=r"gate\.max_ece"):
        load_refresh_config(bad)
    assert [parse_every(s) for s in ("90s", "30m", "6h", "1d", "1.5h")] == [90, 1800, 21600, 86400, 5400]
    for s in ("6", "0h", "-1h", "6 hours"):
        with pytest.raises(ConfigError, match="--every"):
            parse_every(s)


def test_window_takes_the_newest_partitions(world: Path) -> None:
    from model.refresh import load_refresh_config, resolve_window

    rc = load_refresh_config(_config(world, "w.yaml"))
    train, holdout = resolve_window(rc)
    assert [p.parent.name for p in train] == ["day=2026-11-24", "day=2026-11-25"]
    assert [p.parent.name for p in holdout] == ["day=2026-11-26"]
    rc = rc.model_copy(update={"window": rc.window.model_copy(update={"train_partitions": 3})})
    with pytest.raises(ConfigError, match=r"window\.glob: 'data/day=\*' matches 3 partitions; the window needs 4"):
        resolve_window(rc)
    (world / "files.yaml").write_text("bundles: bundles\nruns: runs\n"
                                      "window: {kind: files, train: ['data/day=2026-11-2[45]'], holdout: [nope/*]}\n")
    with pytest.raises(ConfigError, match=r"window\.holdout: 'nope/\*' matches no file"):
        resolve_window(load_refresh_config(world / "files.yaml"))


# -------------------------------------------------------------------------------------- the cycle


def test_refresh_promotes_on_drift_and_rejects_corrupted_labels(world: Path) -> None:
    """The drifted window improves every binary task on the holdout: promoted, CURRENT moves, the new device
    joins the vocabulary. The next cycle, trained on permuted labels, fails the AUC checks: rejected, CURRENT
    stays, the candidate never enters the bundles directory. Both decisions are in the log."""
    from model.refresh import load_refresh_config, refresh_once

    promoted = refresh_once(load_refresh_config(_config(world, "good.yaml")))
    assert promoted["decision"] == "promoted", promoted["reasons"]
    assert promoted["active"] == "base" and promoted["vocab_added"] == {"device": 1}
    current = read_current(world / "bundles")
    assert current == promoted["candidate"]
    manifest, _ = verify_bundle(world / "bundles" / current)
    assert manifest.lineage.kind == "refresh" and manifest.lineage.parent == "base"
    assert Path(manifest.lineage.run_dir) == Path(promoted["run_dir"]).resolve()
    assert "tv" in manifest.schema.feature("device").vocab
    ctr = promoted["holdout"]
    assert ctr["candidate"]["tasks"]["ctr"]["auc"] > ctr["active"]["tasks"]["ctr"]["auc"] + 0.01  # the drift is learnt

    rejected = refresh_once(load_refresh_config(_config(world, "bad.yaml", data="corrupt")))
    assert rejected["decision"] == "rejected"
    assert rejected["active"] == current  # warm-started from the promoted model
    assert any(r.startswith("auc[ctr]: candidate") for r in rejected["reasons"])
    assert read_current(world / "bundles") == current
    assert not (world / "bundles" / rejected["candidate"]).exists()
    assert (Path(rejected["run_dir"]) / "candidate" / rejected["candidate"]).is_dir()  # kept for inspection

    log = _log(world)
    assert [r["decision"] for r in log[-2:]] == ["promoted", "rejected"]
    failed = [c for c in log[-1]["checks"] if not c["passed"]]
    assert failed and all(c["check"] in ("auc", "mse", "ece", "dead_experts", "holdout_rows") for c in failed)


def test_refresh_refuses_a_bundle_without_its_checkpoint(world: Path, tmp_path: Path) -> None:
    from model.refresh import load_refresh_config, refresh_once

    bundles = tmp_path / "bundles"
    shutil.copytree(world / "bundles" / "base", bundles / "base")
    (bundles / "CURRENT").write_text("base\n")
    cfg = tmp_path / "r.yaml"
    cfg.write_text(_config(world, "tmp.yaml").read_text().replace("bundles: bundles", f"bundles: {bundles}")
                   .replace("'data/", f"'{world}/data/"))
    run = Path(read_manifest(bundles / "base").lineage.run_dir)
    backup = tmp_path / "model.pt"
    shutil.copy(run / "model.pt", backup)
    try:
        (run / "model.pt").write_bytes(b"not the checkpoint")
        with pytest.raises(BundleError, match="sha256 differs"):
            refresh_once(load_refresh_config(cfg))
    finally:
        shutil.copy(backup, run / "model.pt")
    (bundles / "CURRENT").unlink()
    with pytest.raises(BundleError, match="no CURRENT bundle"):
        refresh_once(load_refresh_config(cfg))


def test_cli_loop_logs_failed_cycles_and_exits_nonzero(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """``--every`` keeps going after a failed cycle (logged as an ``error`` decision); the exit status says the
    last cycle failed. Bad arguments are exit 2 before anything runs."""
    from mtrank.cli import main

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"bundles: {bundles}\nruns: runs\nwindow: {{kind: files, train: [a], holdout: [b]}}\n")
    assert main(["refresh", str(cfg), "--every", "0.01s", "--cycles", "2"]) == 1
    log = [json.loads(line) for line in (bundles / "refresh-log.jsonl").read_text().splitlines()]
    assert [r["decision"] for r in log] == ["error", "error"]
    assert "no CURRENT bundle" in log[0]["reasons"][0]
    assert main(["refresh", str(cfg), "--every", "soon"]) == 2
    assert "--every 'soon'" in capsys.readouterr().err
