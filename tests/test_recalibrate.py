"""``mtrank calibrate``: refit a bundle's calibration on feedback, on real parts (a trained, exported bundle,
feedback written with mtrank.feedback_log's writer, onnxruntime, a real server for the hot reload).

Feedback is generated from the bundle's own raw scores (its ONNX model on the run's validation rows, resampled)
with labels drawn from a chosen true probability: a deliberately different one (the current calibration is
wrong: a refit must win), or the current calibration itself (nothing to gain: nothing may be written).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mtrank.bundle import (
    Calibration,
    Histogram,
    list_versions,
    onnx_runner,
    read_current,
    read_manifest,
    verify_bundle,
)
from mtrank.cli import CALIBRATE_NOTHING_WRITTEN, main
from mtrank.feedback_log import JsonlWriter, encode_records
from mtrank.metrics import ece, equal_width_edges
from tests.service.test_feedback_log import Rec

Truth = Callable[[str, np.ndarray, Calibration], np.ndarray]  # (task, raw, current calibration) -> P(label = 1)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def drifted(task: str, raw: np.ndarray, cal: Calibration) -> np.ndarray:
    """A true probability the bundle's calibration does not know: sigmoid(0.5 logit(raw) - 1)."""
    return 1.0 / (1.0 + np.exp(-(0.5 * _logit(raw) - 1.0)))


def calibrated(task: str, raw: np.ndarray, cal: Calibration) -> np.ndarray:
    """The current calibration is the truth."""
    return cal.apply(raw)


@pytest.fixture(scope="module")
def raw_pool(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Raw scores of the tiny run's model (its exported ONNX graph) on the validation rows, per output."""
    from model.export import export_run

    bundle = export_run(tiny_run, tmp_path_factory.mktemp("pool"), version="pool", activate=False)
    z = np.load(tiny_run / "val.npz")
    manifest = read_manifest(bundle)
    out = onnx_runner(bundle / "model.onnx")({k: z[k] for k in manifest.inputs})
    return {t.name: out[t.output].astype(np.float64) for t in manifest.tasks}


def write_feedback(log_dir: Path, bundle: Path, pool: dict[str, np.ndarray], truth: Truth, version: str | None = None,
                   requests: int = 2500, items: int = 8, seed: int = 0) -> int:
    """Feedback records for ``requests`` x ``items`` served items of ``bundle`` (served as ``version``, default the
    bundle's), one label per calibrated task; returns the number of records."""
    manifest = read_manifest(bundle)
    version = version or manifest.model_version
    rng = np.random.default_rng(seed)
    n = requests * items
    rows = rng.integers(0, len(next(iter(pool.values()))), n)
    rids = [f"s{seed}-r{k // items}" for k in range(n)]
    iids = [f"i{k % items}" for k in range(n)]
    recs: list[Rec] = []
    for task, cal in manifest.calibration.items():
        raw = pool[task][rows].astype(np.float32).astype(np.float64)  # served as float32
        y = (rng.random(n) < truth(task, raw, cal)).astype(np.float64)
        served = cal.apply(raw)
        recs += [Rec(r, i, task, lab, s, c, version, "default")
                 for r, i, lab, s, c in zip(rids, iids, y.tolist(), raw.tolist(), served.tolist())]
    writer = JsonlWriter(log_dir)
    for k in range(0, len(recs), 1000):
        writer.write(encode_records(recs[k:k + 1000], time.time()), len(recs[k:k + 1000]))
    writer.close()
    return len(recs)


def calibrate(capsys: pytest.CaptureFixture[str], bundle: Path, log_dir: Path | str, *extra: str) -> tuple[int, Any]:
    """``mtrank calibrate`` through the CLI: (exit code, the JSON summary it printed); stderr stays in capsys."""
    capsys.readouterr()
    code = main(["calibrate", str(bundle), "--feedback", str(log_dir), *extra])
    out, err = capsys.readouterr()
    print(err, end="", file=sys.stderr)
    return code, json.loads(out) if out.strip() else None


# ------------------------------------------------------------------------------------------------ tests


def test_miscalibrated_feedback_writes_a_calibrated_child(tmp_path: Path, make_bundle, raw_pool, capsys) -> None:
    bundles = tmp_path / "bundles"
    parent = make_bundle(bundles)
    old = read_manifest(parent)
    n = write_feedback(tmp_path / "log", parent, raw_pool, drifted)
    code, summary = calibrate(capsys, parent, tmp_path / "log")
    assert code == 0, summary
    child = Path(summary["bundle"])
    new = read_manifest(child)
    assert summary["version"] == new.model_version != old.model_version and child.parent == bundles
    assert read_current(bundles) == new.model_version and summary["activated"] is True
    for name in ("model.onnx", "golden.json"):  # byte-identical
        assert (child / name).read_bytes() == (parent / name).read_bytes()
    assert new.files == old.files
    verify_bundle(child)
    assert summary["feedback"]["records"] == summary["feedback"]["records_of_this_model"] == n

    lin = new.lineage
    assert lin.kind == "calibrate" and lin.parent == old.model_version
    assert lin.run_dir == old.lineage.run_dir and lin.checkpoint_sha256 == old.lineage.checkpoint_sha256
    tasks = lin.detail["tasks"]
    assert set(tasks) == set(old.calibration)
    kept = [t for t, d in tasks.items() if d["kept"]]
    assert kept, tasks
    for t in kept:
        d = tasks[t]
        assert d["ece_holdout_after"] < d["ece_holdout_before"] and d["bootstrap_win_share"] >= 0.95
        assert d["labels_fit"] >= 500 and 0.25 < d["labels_holdout"] / (d["labels_fit"] + d["labels_holdout"]) < 0.35
        assert d["labels_fit"] + d["labels_holdout"] == n // len(old.calibration)
        assert new.calibration[t] != old.calibration[t]
        # the refit is close to the truth it was fitted on: re-check on fresh draws
        raw = raw_pool[t]
        y = (np.random.default_rng(9).random(raw.size * 20) < drifted(t, np.tile(raw, 20), old.calibration[t]))
        p = np.tile(raw, 20)
        assert ece(y, new.calibration[t].apply(p)) < ece(y, old.calibration[t].apply(p))
        hist, ref = new.reference.calibrated_score_hist[t], old.reference.calibrated_score_hist[t]
        assert hist.edges == ref.edges and sum(hist.counts) == sum(ref.counts)
    for t in set(old.calibration) - set(kept):
        assert new.calibration[t] == old.calibration[t]
        assert new.reference.calibrated_score_hist[t] == old.reference.calibrated_score_hist[t]
    assert new.reference.score_hist == old.reference.score_hist


def test_calibrated_feedback_writes_nothing(tmp_path: Path, make_bundle, raw_pool, capsys) -> None:
    bundles = tmp_path / "bundles"
    parent = make_bundle(bundles)
    write_feedback(tmp_path / "log", parent, raw_pool, calibrated, seed=1)
    before = list_versions(bundles)
    code, summary = calibrate(capsys, parent, tmp_path / "log")
    assert code == CALIBRATE_NOTHING_WRITTEN
    assert "nothing written: no task's calibration improved" in capsys.readouterr().err
    assert list_versions(bundles) == before and read_current(bundles) == parent.name
    assert summary["bundle"] is None and summary["tasks"]
    for task, d in summary["tasks"].items():
        assert not d["kept"] and d["reason"], task
        assert d["reason"].startswith(("no improvement", "improvement not significant")), d


def test_only_records_of_the_same_model_count(tmp_path: Path, make_bundle, raw_pool, capsys) -> None:
    from tests.service.conftest import clone_bundle

    bundles = tmp_path / "bundles"
    parent = make_bundle(bundles)
    # another model (its manifest names another model.onnx checksum): drifted labels that must be ignored
    other = clone_bundle(parent, bundles, "other-model")
    m = json.loads((other / "manifest.json").read_text())
    m["files"]["model.onnx"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    log_dir = tmp_path / "log"
    write_feedback(log_dir, parent, raw_pool, drifted, version="other-model", seed=2)
    write_feedback(log_dir, parent, raw_pool, drifted, version="gone", seed=3)  # a version no longer there
    code, summary = calibrate(capsys, parent, log_dir)
    assert code == CALIBRATE_NOTHING_WRITTEN
    assert summary["feedback"]["records_of_this_model"] == 0
    assert {d["reason"] for d in summary["tasks"].values()} == {"no feedback for this model"}

    # a version serving the same model.onnx (an earlier calibration of it) counts: same raw scores
    clone_bundle(parent, bundles, "same-model")
    n = write_feedback(log_dir, parent, raw_pool, drifted, version="same-model", seed=4)
    code, summary = calibrate(capsys, parent, log_dir, "--no-activate", "--version", "recal-1")
    assert code == 0, summary
    assert summary["feedback"]["same_model_versions"] == sorted([parent.name, "same-model"])
    assert summary["feedback"]["records_of_this_model"] == n
    assert read_current(bundles) == parent.name and (bundles / "recal-1").is_dir()  # --no-activate


def test_signed_child(tmp_path: Path, make_bundle, raw_pool, capsys) -> None:
    from mtrank.signing import Trust, generate_keypair

    private, public, kid = generate_keypair(tmp_path / "release")
    parent = make_bundle(tmp_path / "bundles")
    write_feedback(tmp_path / "log", parent, raw_pool, drifted, seed=6)
    code, summary = calibrate(capsys, parent, tmp_path / "log", "--sign", str(private))
    assert code == 0 and summary["signed_by"] == kid
    verify_bundle(summary["bundle"], trust=Trust.from_files([public], require=True))


@pytest.mark.parametrize("args, message", [
    (["--holdout-fraction", "1.5"], "--holdout-fraction"),
    (["--version", "../x"], "--version"),
    (["--min-labels", "0"], "--min-labels"),
])
def test_bad_arguments_exit_2(tmp_path: Path, make_bundle, capsys, args: list[str], message: str) -> None:
    parent = make_bundle(tmp_path / "bundles")
    (tmp_path / "log").mkdir()
    code = main(["calibrate", str(parent), "--feedback", str(tmp_path / "log"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_missing_feedback_and_unreachable_redis_exit_2(tmp_path: Path, make_bundle, capsys) -> None:
    from tests.service.conftest import free_port

    parent = make_bundle(tmp_path / "bundles")
    assert main(["calibrate", str(parent), "--feedback", str(tmp_path / "nope")]) == 2
    assert "no such feedback log" in capsys.readouterr().err
    assert main(["calibrate", str(parent), "--feedback", f"redis://127.0.0.1:{free_port()}/0"]) == 2
    assert "--feedback: redis" in capsys.readouterr().err


def test_calibrated_histogram_keeps_the_total() -> None:
    from model.recalibrate import calibrated_histogram

    edges = equal_width_edges(20)
    raw = Histogram(edges=edges.tolist(), counts=[0, 5, 40, 300, 77, 9, 1] + [0] * 13)
    same = calibrated_histogram(raw, Calibration(method="identity", x=[0.0, 1.0], y=[0.0, 1.0]), edges)
    assert same.counts == raw.counts  # identity: every point stays in its bin
    half = Calibration(method="platt", x=[0.0, 1.0], y=[0.0, 0.5])
    squeezed = calibrated_histogram(raw, half, edges)
    assert sum(squeezed.counts) == sum(raw.counts) and sum(squeezed.counts[10:]) == 0
    assert squeezed.counts[:4] == [5, 340, 86, 1]  # raw bins 2k, 2k + 1 land in calibrated bin k


def test_holdout_split_is_by_request_and_deterministic() -> None:
    from model.recalibrate import bootstrap_win_share, holdout_mask

    rids = np.asarray([f"r{k // 4}" for k in range(40_000)], dtype=object)
    mask = holdout_mask(rids, 0.3)
    assert np.array_equal(mask, holdout_mask(rids.copy(), 0.3))
    per_request = mask.reshape(-1, 4)
    assert np.all(per_request.all(axis=1) | ~per_request.any(axis=1))  # a request is on one side only
    for prefix in ("r", "s0-r", "s1-r", "x" * 40):  # ids differing only in their last characters: still ~30 %
        share = holdout_mask(np.asarray([f"{prefix}{k}" for k in range(10_000)], dtype=object), 0.3).mean()
        assert 0.28 < share < 0.32, (prefix, share)
    y = (np.random.default_rng(0).random(4000) < 0.3).astype(float)
    p = np.full(4000, 0.3)
    assert bootstrap_win_share(y, p, p, rids[:4000]) == 0.0  # equal predictions never win
    assert bootstrap_win_share(y, np.full(4000, 0.6), p, rids[:4000]) == 1.0


def test_bootstrap_check_refuses_chance_improvements() -> None:
    """With a table that is already right, a refit beats it on a finite holdout by chance (point ECE) about a
    third of the time; the bootstrap check (--confidence 0.95) keeps none of them."""
    from model.recalibrate import refit_task
    from mtrank.feedback_log import FeedbackColumns

    cur = Calibration(method="platt", x=[0.0, 0.5, 1.0], y=[0.0, 0.3, 0.9])
    chance, guarded = 0, 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        raw = rng.beta(2, 5, 3000)
        y = (rng.random(raw.size) < cur.apply(raw)).astype(np.float64)
        obj = lambda v: np.asarray(v, dtype=object)  # noqa: E731
        rows = FeedbackColumns(ts=np.zeros(raw.size), request_id=obj([f"q{seed}-{k // 5}" for k in range(raw.size)]),
                               item_id=obj(["i"] * raw.size), task=obj(["ctr"] * raw.size), label=y, raw=raw,
                               calibrated=cur.apply(raw), model_version=obj(["v"] * raw.size),
                               arm=obj([None] * raw.size))
        res, table = refit_task(rows, cur, 0.3, 200, confidence=0.95)
        assert res.ece_holdout_before is not None and res.ece_holdout_after is not None
        chance += res.ece_holdout_after < res.ece_holdout_before  # what confidence 0 would keep
        guarded += res.kept or table is not None
    assert chance >= 3 and guarded == 0, (chance, guarded)


def test_service_hot_reloads_the_calibrated_version(tmp_path: Path, make_bundle, raw_pool, capsys) -> None:
    from tests.service.conftest import ServerThread, rank_body, settings_for, wait_until

    bundles = tmp_path / "bundles"
    parent = make_bundle(bundles)
    write_feedback(tmp_path / "log", parent, raw_pool, drifted, seed=5)
    srv = ServerThread(settings_for(bundles)).start()
    try:
        with srv.client() as c:
            assert c.get("/models").json()["active"] == parent.name
            code, summary = calibrate(capsys, parent, tmp_path / "log")
            assert code == 0, summary
            version = summary["version"]
            wait_until(lambda: c.get("/models").json()["active"] == version, what=f"{version} via CURRENT")
            new = read_manifest(bundles / version)
            raw = c.post("/rank", json=rank_body(6, raw_scores=True)).json()
            served = c.post("/rank", json=rank_body(6)).json()
            assert served["model_version"] == version
            raw_by_item = {it["item_id"]: it["task_scores"] for it in raw["items"]}
            for it in served["items"]:
                for t, cal in new.calibration.items():
                    want = float(cal.apply(np.asarray([raw_by_item[it["item_id"]][t]], dtype=np.float32))[0])
                    assert it["task_scores"][t] == pytest.approx(want, abs=1e-6)
            assert isinstance(c.get("/metrics"), httpx.Response)
    finally:
        srv.stop()
