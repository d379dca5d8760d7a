"""``mtrank refresh REFRESH.yaml``: warm-start the active model on a new window of data, promote it through a gate.

One cycle:

1. the active bundle (``CURRENT``) names the run it was exported from (``manifest.lineage``); its checkpoint
   is loaded after checking its sha256;
2. the data window resolves: ``train`` files (a validation fraction is carved from them for early stopping)
   and ``holdout`` files, which nothing trains or early-stops on;
3. the model is fine-tuned from those weights (``model.warmstart``: vocabularies extended with the
   window's new values, learned rows kept) with the cycle's epochs and learning rate, into a fresh run
   directory, and exported there as a candidate bundle (calibration and routing reference recomputed on
   the window);
4. the candidate and the active bundle score the same holdout through ONNX Runtime, each with its own schema
   and calibration (what the service would serve), and the gate compares them (``GateConfig``);
5. promoted: the candidate is written into the bundles directory and ``CURRENT`` moves (the service
   hot-reloads it); rejected: the active bundle stays and the decision says why.

Every decision is one JSON line in ``BUNDLES/refresh-log.jsonl``, and so is every failed cycle of a loop and every
cycle that fails on an unexpected exception (``docs/refresh.md`` describes the record). ``--every 6h`` repeats the cycle; the window is resolved again
each time, so a ``partitions`` window follows new partitions as they land.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError

from model.data import derive_label, needed_columns, raw_columns, read_files
from model.export import export_run
from model.gates import gate_health
from model.train import load_run, train
from model.warmstart import WarmStart
from mtrank.bundle import (
    GOLDEN,
    MODEL,
    BundleError,
    BundleManifest,
    Lineage,
    onnx_runner,
    read_current,
    read_manifest,
    sha256_file,
    verify_bundle,
    write_bundle,
    write_current,
)
from mtrank.config import (
    Config,
    ConfigError,
    _Strict,
    expand_env,
    format_validation_error,
    parse_config,
    read_yaml_mapping,
    union_tags,
)
from mtrank.encoding import FeatureEncoder
from mtrank.metrics import auc, ece, mse
from mtrank.signing import Signer

LOG_NAME = "refresh-log.jsonl"
DATA_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".gz", ".data")

# ------------------------------------------------------------------------------------------ config


class FilesWindow(_Strict):
    """Explicit files (globs allowed, relative to the refresh config's directory)."""

    kind: Literal["files"] = "files"
    train: list[str] = Field(min_length=1)
    holdout: list[str] = Field(min_length=1)


class PartitionsWindow(_Strict):
    """The newest partitions of a dataset: the matches of ``glob`` (a file or a directory of data files each),
    sorted by path, so ``day=2026-11-25`` sorts before ``day=2026-11-26``. The newest ``holdout_partitions``
    are the holdout; the ``train_partitions`` before them are trained on."""

    kind: Literal["partitions"] = "partitions"
    glob: str
    train_partitions: int = Field(1, gt=0)
    holdout_partitions: int = Field(1, gt=0)


Window = Annotated[FilesWindow | PartitionsWindow, Field(discriminator="kind")]


class FineTune(_Strict):
    """How the candidate is trained from the active weights; unset fields keep the run's own setting."""

    epochs: int = Field(2, gt=0)
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    patience: int = Field(1, ge=0)
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # of the train window, for early stopping
    extend_vocab: bool = True


class GateConfig(_Strict):
    """The promotion gate; every check is evaluated on the holdout for both models, each must pass."""

    max_auc_drop: float = Field(0.002, ge=0.0)  # binary task: candidate AUC >= active AUC - this
    max_ece: float = Field(0.05, gt=0.0)  # binary task: candidate ECE of its calibrated scores <= this
    max_mse_increase: float = Field(0.02, ge=0.0)  # regression task: candidate MSE <= active MSE * (1 + this)
    new_dead_experts: bool = False  # allow a gate more dead experts on the holdout than the active model's
    min_holdout_rows: int = Field(1000, gt=0)  # labelled holdout rows each task needs for a decision


class ExportSettings(_Strict):
    quantize: Literal["none", "int8"] = "none"
    max_auc_drop: float = Field(0.002, ge=0.0)  # int8 export guard (mtrank export --max-auc-drop)
    sign_key: str | None = None  # Ed25519 private key (PEM) that signs promoted bundles


class RefreshConfig(_Strict):
    bundles: str  # the bundles directory: CURRENT names the active model; promoted candidates land here
    runs: str  # each cycle's run directory is runs/refresh-<UTC time>/
    window: Window
    train: FineTune = FineTune()
    gate: GateConfig = GateConfig()
    export: ExportSettings = ExportSettings()
    base_dir: str = "."  # relative paths resolve against the refresh config's directory (set by the loader)

    def path(self, p: str) -> Path:
        q = Path(expand_env(p))
        return q if q.is_absolute() else Path(self.base_dir) / q


def load_refresh_config(path: str | Path) -> RefreshConfig:
    """A refresh YAML, validated; errors name the bad key (``window.train_partitions: ...``)."""
    path = Path(path).resolve()
    raw = read_yaml_mapping(path, "refresh config")
    try:
        return RefreshConfig.model_validate({"base_dir": str(path.parent), **raw})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{path.name}: invalid refresh config", union_tags(Window))) from None


def parse_every(text: str) -> float:
    """``90s``, ``30m``, ``6h``, ``1d`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--every {text!r}: expected a positive duration like 90s, 30m, 6h or 1d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# ------------------------------------------------------------------------------------------ window


def _data_files(match: Path) -> list[Path]:
    """A match of the window: the file itself, or every data file under a directory (sorted)."""
    if match.is_dir():
        return sorted(p for p in match.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES)
                      and not p.name.startswith((".", "_")))
    return [match]


def resolve_window(rc: RefreshConfig) -> tuple[list[Path], list[Path]]:
    """(train files, holdout files), absolute; ConfigError naming the window field when they are not there."""
    w = rc.window
    if isinstance(w, FilesWindow):
        def expand(patterns: list[str], where: str) -> list[Path]:
            files: list[Path] = []
            for pat in patterns:
                hits = sorted(glob.glob(str(rc.path(pat))))
                if not hits:
                    raise ConfigError(f"window.{where}: {pat!r} matches no file")
                files += [f for h in hits for f in _data_files(Path(h))]
            return files

        train, holdout = expand(w.train, "train"), expand(w.holdout, "holdout")
    else:
        matches = [Path(h) for h in sorted(glob.glob(str(rc.path(w.glob))))]
        need = w.train_partitions + w.holdout_partitions
        if len(matches) < need:
            raise ConfigError(f"window.glob: {w.glob!r} matches {len(matches)} partitions; the window needs {need} "
                              f"({w.train_partitions} train + {w.holdout_partitions} holdout)")
        chosen = matches[-need:]
        train = [f for m in chosen[: w.train_partitions] for f in _data_files(m)]
        holdout = [f for m in chosen[w.train_partitions :] for f in _data_files(m)]
    overlap = set(train) & set(holdout)
    if overlap:
        raise ConfigError(f"window: {sorted(map(str, overlap))[0]} is in both train and holdout")
    if not train or not holdout:
        raise ConfigError("window: no data files in the " + ("train" if not train else "holdout") + " partitions")
    return [p.resolve() for p in train], [p.resolve() for p in holdout]


# ------------------------------------------------------------------------------------------ scoring


def score_bundle(bundle_dir: Path, manifest: BundleManifest, cfg: Config, frame: pd.DataFrame,
                 batch: int = 8192) -> dict[str, Any]:
    """A bundle on a labelled frame, as the service scores it: its own schema, ONNX Runtime, its calibration.

    Returns ``{"tasks": {task: {"rows", "auc", "ece", "logloss"} | {"rows", "mse"}}, "gates": {gate output:
    mean weight per expert}}``. AUC is on the raw scores (the model's ranking), ECE on the calibrated ones.
    """
    schema = manifest.schema
    inputs = FeatureEncoder(schema).encode_all(raw_columns(schema, frame), len(frame))
    run = onnx_runner(bundle_dir / MODEL, intra_threads=0)
    parts = [run({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, len(frame), batch)]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    tasks: dict[str, Any] = {}
    for t in cfg.tasks:
        y, present = derive_label(t, frame[t.label.column])
        raw = out[f"p_{t.name}"][present].astype(np.float64)
        y = y[present].astype(np.float64)
        if t.type == "binary":
            cal = manifest.calibration.get(t.name)
            served = cal.apply(raw) if cal is not None else raw
            tasks[t.name] = {"rows": int(present.sum()), "auc": auc(y, raw), "ece": ece(y, served, cfg.eval.ece_bins)}
        else:
            tasks[t.name] = {"rows": int(present.sum()), "mse": mse(y, raw)}
    gates = {g.output: out[g.output].mean(axis=0).tolist() for g in manifest.gates}
    return {"tasks": tasks, "gates": gates}


def gate_checks(gate: GateConfig, cfg: Config, active: dict[str, Any], candidate: dict[str, Any]) -> list[dict[str, Any]]:
    """Every check of the gate: ``{"check", "task"|"gate", "active", "candidate", "bound", "passed"}``."""
    checks: list[dict[str, Any]] = []
    for t in cfg.tasks:
        a, c = active["tasks"][t.name], candidate["tasks"][t.name]
        checks.append({"check": "holdout_rows", "task": t.name, "active": a["rows"], "candidate": c["rows"],
                       "bound": gate.min_holdout_rows, "passed": c["rows"] >= gate.min_holdout_rows})
        if t.type == "binary":
            bound = a["auc"] - gate.max_auc_drop
            checks.append({"check": "auc", "task": t.name, "active": a["auc"], "candidate": c["auc"], "bound": bound,
                           "passed": bool(c["auc"] >= bound)})
            checks.append({"check": "ece", "task": t.name, "active": a["ece"], "candidate": c["ece"],
                           "bound": gate.max_ece, "passed": bool(c["ece"] <= gate.max_ece)})
        else:
            bound = a["mse"] * (1.0 + gate.max_mse_increase)
            checks.append({"check": "mse", "task": t.name, "active": a["mse"], "candidate": c["mse"], "bound": bound,
                           "passed": bool(c["mse"] <= bound)})
    for g, mean in candidate["gates"].items():
        dead = len(gate_health(np.asarray(mean))["dead"])
        before = len(gate_health(np.asarray(active["gates"][g]))["dead"]) if g in active["gates"] else 0
        checks.append({"check": "dead_experts", "gate": g, "active": before, "candidate": dead, "bound": before,
                       "passed": gate.new_dead_experts or dead <= before})
    for c in checks:  # a NaN metric (a task without both classes in the holdout) never passes
        if isinstance(c["candidate"], float) and math.isnan(c["candidate"]):
            c["passed"] = False
    return checks


def _reason(c: dict[str, Any]) -> str:
    what = c.get("task") or c.get("gate")
    rel = {"auc": ">=", "ece": "<=", "mse": "<=", "holdout_rows": ">=", "dead_experts": "<="}[c["check"]]
    fmt = (lambda v: f"{v:.4f}") if isinstance(c["candidate"], float) else str
    return (f"{c['check']}[{what}]: candidate {fmt(c['candidate'])} (active {fmt(c['active'])}), "
            f"needs {rel} {fmt(c['bound'])}")


# -------------------------------------------------------------------------------------------- cycle


def window_config(cfg: Config, rc: RefreshConfig, train_files: list[Path]) -> Config:
    """The run's config with the window's train files as its data and the fine-tuning settings. No test split:
    the holdout is scored once, by the gate, through both bundles (``score_bundle``)."""
    raw = cfg.model_dump(mode="json")
    data = raw["data"]
    data.update(train=[str(p) for p in train_files], validation=[], test=[],
                split={**data["split"], "source": "train", "validation_fraction": rc.train.validation_fraction,
                       "test_fraction": 0.0})
    data.pop("stream", None)  # a window is read in memory
    ft = rc.train
    raw["train"].update(epochs=ft.epochs, **({"lr": ft.lr} if ft.lr else {}),
                        **({"batch_size": ft.batch_size} if ft.batch_size else {}))
    raw["train"]["early_stopping"]["patience"] = ft.patience
    raw["train"]["progress"] = False
    return parse_config(raw, base_dir=data["base_dir"])


def append_decision(bundles: Path, record: dict[str, Any]) -> None:
    """One JSON line in ``BUNDLES/refresh-log.jsonl``, flushed and fsynced (a reader never sees half a line
    that a later write completes: one ``write`` of the whole line on an O_APPEND descriptor)."""
    bundles.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, allow_nan=True, default=str) + "\n").encode()
    fd = os.open(bundles / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _active(bundles: Path) -> tuple[Path, BundleManifest, Path]:
    """The active bundle, its manifest and the run directory behind it (checkpoint hash checked)."""
    version = read_current(bundles)
    if version is None:
        raise BundleError(f"{bundles}: no CURRENT bundle to refresh (export one first)")
    bundle = bundles / version
    manifest = read_manifest(bundle)
    lin = manifest.lineage
    if lin.run_dir is None:
        raise BundleError(f"{bundle}: the manifest records no run directory (exported before lineage was recorded);"
                          " re-export its run with `mtrank export`")
    run_dir = Path(lin.run_dir)
    ckpt = run_dir / "model.pt"
    if not ckpt.exists():
        raise BundleError(f"{bundle}: its run's checkpoint {ckpt} is missing")
    if lin.checkpoint_sha256 and sha256_file(ckpt) != lin.checkpoint_sha256:
        raise BundleError(f"{ckpt}: sha256 differs from the one recorded in {bundle.name}'s manifest")
    return bundle, manifest, run_dir


def refresh_once(rc: RefreshConfig, now: dt.datetime | None = None) -> dict[str, Any]:
    """One refresh cycle (module docstring); returns the decision record it appended to the log."""
    t0 = time.perf_counter()
    now = now or dt.datetime.now(dt.UTC)
    signer = Signer.optional(rc.path(rc.export.sign_key) if rc.export.sign_key else None)  # a bad key fails first
    bundles = rc.path(rc.bundles)
    active_dir, active, parent_run = _active(bundles)
    cfg, schema, model = load_run(parent_run)
    train_files, holdout_files = resolve_window(rc)
    run_cfg = window_config(cfg, rc, train_files)
    run_dir = rc.path(rc.runs) / f"refresh-{now:%Y%m%d-%H%M%S}"
    window = {"train": [str(p) for p in train_files], "holdout": [str(p) for p in holdout_files]}
    metrics = train(run_cfg, run_dir, WarmStart(schema, model.state_dict(), extend_vocab=rc.train.extend_vocab))
    staged = export_run(run_dir, run_dir / "candidate", activate=False, quantize=rc.export.quantize,
                        max_auc_drop=rc.export.max_auc_drop,
                        lineage=Lineage(kind="refresh", parent=active.model_version,
                                        detail={"window": window, "epochs_run": metrics["train"]["epochs_run"],
                                                "vocab_added": metrics["train"].get("vocab_added", {})}))
    candidate = read_manifest(staged)

    holdout = read_files(run_cfg.data, window["holdout"], needed_columns(run_cfg))
    scores = {"active": score_bundle(active_dir, active, cfg, holdout),
              "candidate": score_bundle(staged, candidate, run_cfg, holdout)}
    checks = gate_checks(rc.gate, cfg, scores["active"], scores["candidate"])
    failed = [_reason(c) for c in checks if not c["passed"]]
    record: dict[str, Any] = {
        "time": now.isoformat(), "decision": "rejected" if failed else "promoted", "reasons": failed,
        "active": active.model_version, "candidate": candidate.model_version, "run_dir": str(run_dir),
        "window": window, "rows": {"train": metrics["train"]["rows"], "holdout": len(holdout)},
        "vocab_added": metrics["train"].get("vocab_added", {}), "epochs_run": metrics["train"]["epochs_run"],
        "checks": checks, "holdout": scores,
    }
    if not failed:
        promote(staged, bundles, signer)
    record["seconds"] = time.perf_counter() - t0
    append_decision(bundles, record)
    return record


def promote(staged: Path, bundles: Path, signer: Signer | None) -> Path:
    """Copy a verified staged bundle into ``bundles`` (atomically, signed when ``signer`` is given) and point
    CURRENT at it."""
    manifest, _ = verify_bundle(staged)
    files = {name: (staged / name).read_bytes() for name in (MODEL, GOLDEN)}
    bundle = write_bundle(bundles, manifest, files, signer=signer)
    write_current(bundles, manifest.model_version)
    return bundle


def run_refresh(rc: RefreshConfig, every_s: float | None = None, cycles: int | None = None) -> int:
    """One cycle, or one every ``every_s`` seconds (``cycles`` bounds the count). A failed cycle is logged
    (a ``"decision": "error"`` line) and, when looping, retried at the next tick. Exit status: 0 when the last
    cycle promoted or rejected, 1 when it failed."""
    bundles = rc.path(rc.bundles)
    done, status = 0, 0
    while True:
        start = time.monotonic()
        record: dict[str, Any] | None = None
        try:
            record = refresh_once(rc)
            status = 0
        except (ConfigError, BundleError, FileNotFoundError) as err:
            if every_s is None:
                raise
            append_decision(bundles, {"time": dt.datetime.now(dt.UTC).isoformat(), "decision": "error",
                                      "reasons": [str(err)]})
            print(f"refresh: {err}", file=sys.stderr)
            status = 1
        except Exception as err:  # a bug or a fault: logged with its traceback; a loop carries on
            append_decision(bundles, {"time": dt.datetime.now(dt.UTC).isoformat(), "decision": "error",
                                      "reasons": [f"{type(err).__name__}: {err}"],
                                      "traceback": traceback.format_exc()})
            if every_s is None:
                raise
            traceback.print_exc()
            status = 1
        if record is not None:  # printed outside the try: a closed stdout is not a failed cycle
            print(json.dumps({k: record[k] for k in ("decision", "reasons", "active", "candidate", "run_dir",
                                                     "seconds")}, indent=1), flush=True)
        done += 1
        if every_s is None or (cycles is not None and done >= cycles):
            return status
        time.sleep(max(every_s - (time.monotonic() - start), 0.0))
