"""One refresh cycle on synthetic data with a deliberate drift: the gate promotes a model that learnt the drift and
rejects one fine-tuned on corrupted labels; warm start vs training from scratch on the same window.

World: ``model.synthetic.generate`` rows; the base model (the demo MMoE) is trained on the old period and exported
as the active bundle. The new period is ``model.synthetic.drift``-ed (a new device ``tv`` on 40 % of the web
impressions, clicked far more; category ``c3`` loses 80 % of its clicks) and written as day partitions. Per seed:

1. ``mtrank refresh`` with a ``partitions`` window (2 train days, 1 holdout day): expected **promoted**;
2. the same days with the two training days' binary labels permuted (``model.synthetic.corrupt_labels``):
   expected **rejected**, warm-started from the model promoted in step 1;
3. control: the same model trained from scratch on the window of step 1 (same epochs), scored on the same holdout.

Usage (from the repository root)::

    env -u OPENBLAS_CORETYPE python benchmarks/refresh_cycle.py            # 3 seeds (~3 min)
    env -u OPENBLAS_CORETYPE python benchmarks/refresh_cycle.py --seeds 1  # smoke

Replaces the section between ``<!-- refresh-cycle:start -->`` and ``<!-- refresh-cycle:end -->`` in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import log, write_docs  # noqa: E402
from model.synthetic import write_refresh_days  # noqa: E402

START, END = "<!-- refresh-cycle:start -->", "<!-- refresh-cycle:end -->"
TASKS = ("ctr", "like", "ctcvr")


def refresh_yaml(root: Path, seed: int, data: str, epochs: int) -> Path:
    path = root / f"refresh-{data}-{seed}.yaml"
    path.write_text(f"bundles: bundles-{seed}\nruns: runs-{seed}\n"
                    f"window: {{kind: partitions, glob: '{data}/day=*', train_partitions: 2, holdout_partitions: 1}}\n"
                    f"train: {{epochs: {epochs}}}\n")
    return path


def run_seed(root: Path, seed: int, base_epochs: int, epochs: int) -> dict[str, Any]:
    import json as _json

    from model.data import needed_columns, read_files
    from model.export import export_run
    from model.refresh import load_refresh_config, refresh_once, resolve_window, score_bundle, window_config
    from model.synthetic import DEMO_CONFIG
    from model.train import load_run, train
    from mtrank.bundle import read_manifest
    from mtrank.config import apply_overrides, parse_config

    raw = _json.loads(_json.dumps(DEMO_CONFIG))
    raw["data"]["train"] = [str(root / "old.parquet")]
    cfg = parse_config(apply_overrides(raw, [f"train.seed={seed}", f"train.epochs={base_epochs}", "train.progress=false",
                                             "train.threads=2"]), base_dir=root)
    t0 = time.perf_counter()
    train(cfg, root / f"runs-{seed}" / "base")
    export_run(root / f"runs-{seed}" / "base", root / f"bundles-{seed}", version="base")
    base_s = time.perf_counter() - t0

    good = refresh_once(load_refresh_config(refresh_yaml(root, seed, "data", epochs)))
    bad = refresh_once(load_refresh_config(refresh_yaml(root, seed, "corrupt", epochs)))

    # Control: the same architecture trained from scratch on the window of the good cycle, same epochs.
    rc = load_refresh_config(root / f"refresh-data-{seed}.yaml")
    base_cfg, _, _ = load_run(root / f"runs-{seed}" / "base")
    train_files, holdout_files = resolve_window(rc)
    scratch_cfg = window_config(base_cfg, rc, train_files)
    t0 = time.perf_counter()
    train(scratch_cfg, root / f"runs-{seed}" / "scratch")
    scratch_s = time.perf_counter() - t0
    staged = export_run(root / f"runs-{seed}" / "scratch", root / f"runs-{seed}" / "scratch-bundle", activate=False)
    holdout = read_files(scratch_cfg.data, [str(p) for p in holdout_files], needed_columns(scratch_cfg))
    scratch = score_bundle(staged, read_manifest(staged), scratch_cfg, holdout)
    return {"seed": seed, "base_seconds": base_s, "good": good, "bad": bad, "scratch": scratch,
            "scratch_seconds": scratch_s}


def render(results: list[dict[str, Any]], args: argparse.Namespace, minutes: float, command: str) -> str:
    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.4f}"

    good, bad = [r["good"] for r in results], [r["bad"] for r in results]
    lines = [START, "## Refresh: one cycle with a deliberate drift, and one on corrupted labels", "",
             f"`{command}` ({minutes:.1f} min; {len(results)} training seeds; median over seeds; 2 cores, shared "
             "machine). The demo MMoE is trained on "
             f"{args.old_rows:,} old rows ({args.base_epochs} epochs) and exported as the active bundle; the new "
             f"period ({3 * args.day_rows:,} rows in 3 day partitions) is drifted: a new device `tv` on 40 % of the "
             "web impressions, clicked far more, and category `c3` loses 80 % of its clicks. Each refresh "
             f"fine-tunes {args.epochs} epochs on the 2 older days (10 % of them for early stopping) and the gate "
             "scores both bundles on the newest day through ONNX Runtime with their own schema and calibration.", "",
             "| cycle | decisions | holdout AUC ctr / like / ctcvr: active → candidate | holdout ECE ctr: active → candidate | "
             "vocabulary added | cycle s |",
             "|---|---|---|---|---|---|"]
    for name, recs in (("drifted window", good), ("labels permuted", bad)):
        decisions = ", ".join(f"{d} ×{sum(r['decision'] == d for r in recs)}" for d in ("promoted", "rejected")
                              if any(r["decision"] == d for r in recs))
        aucs = " / ".join(f"{med([r['holdout']['active']['tasks'][t]['auc'] for r in recs])} → "
                          f"{med([r['holdout']['candidate']['tasks'][t]['auc'] for r in recs])}" for t in TASKS)
        vocab = ", ".join(sorted({f"{k} +{v}" for r in recs for k, v in r["vocab_added"].items()})) or "none"
        lines.append(f"| {name} | {decisions} | {aucs} | "
                     f"{med([r['holdout']['active']['tasks']['ctr']['ece'] for r in recs])} → "
                     f"{med([r['holdout']['candidate']['tasks']['ctr']['ece'] for r in recs])} | {vocab} | "
                     f"{statistics.median([r['seconds'] for r in recs]):.1f} |")
    scratch = " / ".join(med([r["scratch"]["tasks"][t]["auc"] for r in results]) for t in TASKS)
    lines += ["", f"Control, trained from scratch on the same window for the same {args.epochs} epochs: holdout AUC "
              f"{scratch} (warm start: "
              + " / ".join(med([r['holdout']['candidate']['tasks'][t]['auc'] for r in good]) for t in TASKS)
              + f"); {statistics.median([r['scratch_seconds'] for r in results]):.1f} s of training.", "",
              "Rejection reasons of the corrupted cycle (first seed): "
              + "; ".join(f"`{x}`" for x in bad[0]["reasons"]) + ".", "", END]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--old-rows", type=int, default=200_000)
    ap.add_argument("--day-rows", type=int, default=60_000)
    ap.add_argument("--base-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out-json", default=str(Path(tempfile.gettempdir()) / "refresh_cycle.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    command = "env -u OPENBLAS_CORETYPE python benchmarks/refresh_cycle.py" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtrank-refresh-") as tmp:
        root = Path(tmp)
        write_refresh_days(root, args.old_rows, args.day_rows)
        results = []
        for seed in range(args.seeds):
            results.append(run_seed(root, seed, args.base_epochs, args.epochs))
            r = results[-1]
            log(f"seed {seed}: drifted {r['good']['decision']}, corrupted {r['bad']['decision']} "
                f"({r['bad']['reasons'][:1]})")
    Path(args.out_json).write_text(json.dumps(results, indent=1, default=str))
    section = render(results, args, (time.perf_counter() - t0) / 60, command)
    print(section)
    if not args.no_docs:
        write_docs(Path(args.docs), section, START, END)


if __name__ == "__main__":
    main()
