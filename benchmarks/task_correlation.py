"""The MMoE paper's synthetic experiment: as two tasks become less related, Shared-Bottom degrades more than MMoE.

Data: ``model.synthetic.correlated_regression`` (Ma et al., KDD 2018, Section 4.1): two regression tasks whose
weight vectors have cosine ``p``; 100 Gaussian inputs; labels with a shared sinusoidal non-linearity. For each
correlation p and seed, the same rows train a Shared-Bottom model and an MMoE of similar size with our trainer
(early stopping on the mean validation loss, the default for regression-only tasks); the table reports the test
MSE per task (mean +- std over seeds) and the plot the mean over tasks against p.

Usage (from the repository root)::

    env -u OPENBLAS_CORETYPE python benchmarks/task_correlation.py           # full: 4 correlations x 3 seeds (~8 min)
    env -u OPENBLAS_CORETYPE python benchmarks/task_correlation.py --quick   # smoke: 2 correlations, 1 seed, 2 epochs

Writes raw results to ``--out-json``, the plot to ``docs/img/task_correlation.png`` and replaces the section between
``<!-- task-correlation:start -->`` and ``<!-- task-correlation:end -->`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import log, mean_std, write_docs  # noqa: E402

START, END = "<!-- task-correlation:start -->", "<!-- task-correlation:end -->"
ARCHS = {  # similar parameter counts (about 13-14 k), as in the paper: 8 experts of 16 vs one bottom of 128
    "shared_bottom": {"arch": "shared_bottom", "expert_hidden": [128], "tower_hidden": [8]},
    "mmoe": {"arch": "mmoe", "n_experts": 8, "expert_hidden": [16], "tower_hidden": [8]},
}


def config(data: Path, arch: str, seed: int, epochs: int, dim: int, lr: float) -> dict[str, Any]:
    return {
        "data": {"train": [str(data)], "split": {"source": "train", "validation_fraction": 0.2, "test_fraction": 0.2,
                                                 "seed": seed}},
        "features": [{"name": f"x{i}", "kind": "numeric", "side": "user", "clip": None} for i in range(dim)],
        "tasks": [{"name": "t1", "type": "regression", "label": {"column": "y1"}},
                  {"name": "t2", "type": "regression", "label": {"column": "y2"}}],
        "model": {"embedding_dim": 4, **ARCHS[arch]},
        "train": {"epochs": epochs, "batch_size": 256, "lr": lr, "seed": seed, "threads": 1, "progress": False,
                  "early_stopping": {"metric": "loss", "patience": 8}, "instruments": {"probes_per_epoch": 0}},
    }


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    from model.synthetic import correlated_regression
    from model.train import train
    from mtrank.config import parse_config

    with tempfile.TemporaryDirectory(prefix="task-corr-") as tmp:
        data = Path(tmp) / "data.parquet"
        correlated_regression(job["rows"], job["correlation"], seed=job["seed"], dim=job["dim"]).to_parquet(data)
        cfg = parse_config(config(data, job["arch"], job["seed"], job["epochs"], job["dim"], job["lr"]), base_dir=tmp)
        t0 = time.perf_counter()
        m = train(cfg, Path(tmp) / "run")
    return {**job, "test_mse": {t: m["test"][t]["mse"] for t in ("t1", "t2")},
            "best_epoch": m["train"]["best_epoch"], "epochs_run": m["train"]["epochs_run"],
            "params": m["train"]["params"], "seconds": time.perf_counter() - t0}


def plot(results: list[dict[str, Any]], correlations: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arch in ARCHS:
        means, stds = [], []
        for c in correlations:
            xs = [(r["test_mse"]["t1"] + r["test_mse"]["t2"]) / 2 for r in results
                  if r["arch"] == arch and r["correlation"] == c]
            m, s = mean_std(xs)
            means.append(m)
            stds.append(s)
        ax.errorbar(correlations, means, yerr=stds, marker="o", capsize=3, label=arch)
    ax.set_xlabel("task correlation p (cosine of the task weight vectors)")
    ax.set_ylabel("test MSE, mean of both tasks")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(results: list[dict[str, Any]], args: argparse.Namespace, minutes: float, command: str) -> str:
    lines = [START, "## Synthetic: task relatedness, Shared-Bottom vs MMoE (the MMoE paper's experiment)", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {minutes:.1f} min with:", "",
             "```bash", command, "```", "",
             f"Data: `model.synthetic.correlated_regression` ({args.rows:,} rows per correlation and seed, {args.dim} "
             "Gaussian inputs, two regression tasks whose weight vectors have cosine p, shared sinusoidal "
             "non-linearity; Ma et al., KDD 2018, Section 4.1), split 60/20/20. Models of similar size: "
             f"Shared-Bottom one bottom of {ARCHS['shared_bottom']['expert_hidden']} + towers [8]; MMoE 8 experts of "
             f"[16] + towers [8]. Adam lr {args.lr}, batch 256, up to "
             f"{args.epochs} epochs, early stopping on the mean validation loss (patience 8). Seeds "
             f"{', '.join(map(str, args.seeds))}; test MSE mean ± std over seeds.", "",
             "| p | label corr. | Shared-Bottom t1 | Shared-Bottom t2 | MMoE t1 | MMoE t2 | SB − MMoE (mean of tasks) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in args.correlations:
        cells, avg = [], {}
        for arch in ARCHS:
            rs = [r for r in results if r["arch"] == arch and r["correlation"] == c]
            for t in ("t1", "t2"):
                m, s = mean_std([r["test_mse"][t] for r in rs])
                cells.append(f"{m:.4f} ± {s:.4f}")
            avg[arch] = mean_std([(r["test_mse"]["t1"] + r["test_mse"]["t2"]) / 2 for r in rs])[0]
        label_corr = next(r["label_correlation"] for r in results if r["correlation"] == c)
        lines.append(f"| {c:.2f} | {label_corr:.2f} | " + " | ".join(cells)
                     + f" | {avg['shared_bottom'] - avg['mmoe']:+.4f} |")
    params = {a: next(r["params"] for r in results if r["arch"] == a) for a in ARCHS}
    lines += ["", f"Parameters: Shared-Bottom {params['shared_bottom']:,}, MMoE {params['mmoe']:,}.", "",
              "![test MSE against task correlation](img/task_correlation.png)", "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--correlations", type=float, nargs="+", default=[1.0, 0.9, 0.7, 0.5, 0.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="training processes in parallel (one thread each)")
    ap.add_argument("--out-json", default="/tmp/task_correlation.json")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.epochs, args.correlations, args.seeds = 5000, 2, [1.0, 0.0], [0]
    import numpy as np

    from model.synthetic import correlated_regression

    label_corr = {}
    for c in args.correlations:
        d = correlated_regression(20_000, c, seed=0, dim=args.dim)
        label_corr[c] = float(np.corrcoef(d["y1"], d["y2"])[0, 1])
    jobs = [{"arch": a, "correlation": c, "seed": s, "rows": args.rows, "epochs": args.epochs, "dim": args.dim,
             "lr": args.lr, "label_correlation": label_corr[c]} for s in args.seeds for c in args.correlations for a in ARCHS]
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for r in pool.map(run_one, jobs):
            log(f"{r['arch']:<14} p={r['correlation']:.2f} seed {r['seed']}: test MSE t1 {r['test_mse']['t1']:.4f} "
                f"t2 {r['test_mse']['t2']:.4f} (best epoch {r['best_epoch']}/{r['epochs_run']}, {r['seconds']:.0f}s)")
            results.append(r)
    minutes = (time.perf_counter() - t0) / 60
    Path(args.out_json).write_text(json.dumps(results, indent=1))
    command = "env -u OPENBLAS_CORETYPE python benchmarks/task_correlation.py" + (
        " " + shlex.join(argv) if argv else (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""))
    section = render(results, args, minutes, command)
    print(section)
    if not args.quick:
        plot(results, args.correlations, ROOT / "docs" / "img" / "task_correlation.png")
        write_docs(Path(args.docs), section, START, END)
        log(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
