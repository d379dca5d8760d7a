"""``mtrank report RUN_DIR``: plots and a markdown summary of a run's training dynamics.

Reads only ``RUN_DIR/metrics.json`` (docs/metrics-json.md) and writes, into ``RUN_DIR/report/`` (or
``--out``)::

    curves.png        per task: training loss, validation metric, effective weight, gradient norm per epoch
    conflict.png      pairwise cosine of the task gradients on the shared parameters, pairs x epochs
    gates_l<L>.png    one heatmap per gate of level L: mean weight per expert (rows) over epochs (columns)
    reliability.png   reliability diagram per binary task, validation and test
    report.md         the summary: metrics, best epoch, gate health, gradient conflict, instrument cost
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    return plt


def _curves(history: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    panels = [("train_loss", "training loss"), ("val", "validation AUC (binary) / MSE"), ("weights", "effective weight"),
              ("grad_norm", "gradient norm on shared parameters")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for t in tasks:
            if key == "val":
                ys = [h["val"][t].get("auc", h["val"][t].get("mse", math.nan)) for h in history]
            else:
                ys = [h.get(key, {}).get(t, math.nan) for h in history]
            ax.plot(epochs, ys, marker=".", label=t)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _conflict(history: list[dict[str, Any]], path: Path) -> bool:
    pairs = list(history[0].get("grad_cosine", {}))
    if not pairs:
        return False
    plt = _pyplot()
    grid = np.array([[h["grad_cosine"].get(p, math.nan) for h in history] for p in pairs])  # [pairs, epochs]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(history) + 3), 0.45 * len(pairs) + 1.5))
    im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(pairs)), [p.replace("|", " vs ") for p in pairs], fontsize=8)
    ax.set_xticks(range(len(history)), [str(h["epoch"]) for h in history], fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_title("cosine of task gradients on shared parameters (red < 0: conflict)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _gates(history: list[dict[str, Any]], gates: dict[str, Any], out: Path) -> list[str]:
    """One figure per level; returns the file names."""
    if not gates:
        return []
    plt = _pyplot()
    levels = sorted({g["level"] for g in gates.values()})
    names = []
    for level in levels:
        members = [n for n, g in gates.items() if g["level"] == level]
        fig, axes = plt.subplots(1, len(members), figsize=(4.2 * len(members), 3.4), squeeze=False)
        for ax, name in zip(axes[0], members):
            experts = gates[name]["experts"]
            grid = np.array([h["gates"][name]["mean"] for h in history]).T  # [experts, epochs]
            im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(float(grid.max()), 1e-6), aspect="auto",
                           interpolation="nearest")
            ax.set_yticks(range(len(experts)), experts, fontsize=7)
            ax.set_xticks(range(len(history)), [str(h["epoch"]) for h in history], fontsize=6)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("epoch")
            fig.colorbar(im, ax=ax, fraction=0.04)
        fig.suptitle(f"level {level}: mean gate weight per expert (validation)", fontsize=10)
        fig.tight_layout()
        file = f"gates_l{level}.png"
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        names.append(file)
    return names


def _reliability(metrics: dict[str, Any], path: Path) -> bool:
    tasks = [t for t, m in metrics.get("validation", {}).items() if "reliability" in m]
    if not tasks:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for split, marker in (("validation", "o"), ("test", "s")):
            rows = metrics.get(split, {}).get(task, {}).get("reliability")
            if not rows:
                continue
            xs = [r["mean_pred"] for r in rows if r["count"]]
            ys = [r["mean_obs"] for r in rows if r["count"]]
            ax.plot(xs, ys, marker=marker, ms=4, label=f"{split} (ECE {metrics[split][task]['ece']:.4f})")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("mean predicted")
        ax.set_ylabel("observed rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else ("–" if v is None or isinstance(v, float) else str(v))


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the plots and ``report.md`` for a finished run; returns the report's path."""
    run = Path(run_dir)
    path = run / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{run}: no metrics.json (not a finished run)")
    metrics = json.loads(path.read_text())
    history: list[dict[str, Any]] = metrics["history"]
    tasks = list(history[0]["train_loss"])
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    tr = metrics["train"]
    best = next(h for h in history if h["epoch"] == tr["best_epoch"])

    _curves(history, tasks, out / "curves.png")
    has_conflict = _conflict(history, out / "conflict.png")
    gate_files = _gates(history, metrics.get("gates", {}).get("validation", {}), out)
    has_reliability = _reliability(metrics, out / "reliability.png")

    lines = [f"# Training report: {run.name}", "",
             f"Architecture **{tr['arch']}**, balancer **{tr.get('balancer', 'fixed')}**, {tr['params']:,} parameters; "
             f"{tr['epochs_run']} epochs run, best epoch **{tr['best_epoch']}** by validation "
             f"`{tr['early_stopping_metric']}` = {_fmt(tr['best_value'])}; {tr['rows']:,} training rows at "
             f"{tr['rows_per_s']:,.0f} rows/s.", "", "## Metrics", "",
             "| split | task | AUC | log loss | ECE | MSE |", "|---|---|---|---|---|---|"]
    for split in ("validation", "test"):
        for task, m in metrics.get(split, {}).items():
            lines.append(f"| {split} | {task} | {_fmt(m.get('auc'))} | {_fmt(m.get('logloss'))} | {_fmt(m.get('ece'))} "
                         f"| {_fmt(m.get('mse'))} |")
    lines += ["", "## Curves", "", "![curves](curves.png)", ""]
    lines += ["| task | final train loss | weight at best epoch | mean weight | gradient norm (mean) |",
              "|---|---|---|---|---|"]
    for t in tasks:
        norms = [h.get("grad_norm", {}).get(t) for h in history if h.get("grad_norm")]
        lines.append(f"| {t} | {_fmt(history[-1]['train_loss'][t])} | {_fmt(best['weights'][t])} | "
                     f"{_fmt(float(np.mean([h['weights'][t] for h in history])))} | "
                     f"{_fmt(float(np.mean(norms)) if norms else None)} |")
    if has_conflict:
        lines += ["", "## Gradient conflict", "", "![conflict](conflict.png)", "",
                  "| pair | mean cosine | epochs in conflict (< 0) |", "|---|---|---|"]
        for pair in history[0]["grad_cosine"]:
            cs = [h["grad_cosine"][pair] for h in history if math.isfinite(h["grad_cosine"][pair])]
            lines.append(f"| {pair.replace('|', ' vs ')} | {_fmt(float(np.mean(cs)) if cs else None)} | "
                         f"{sum(c < 0 for c in cs)} of {len(cs)} |")
    if gate_files:
        lines += ["", "## Gates", ""] + [f"![{f}]({f})" for f in gate_files]
        lines += ["", "At the best epoch (validation):", "", "| gate | entropy | dead experts | dominant experts |",
                  "|---|---|---|---|"]
        for name, g in best["gates"].items():
            lines.append(f"| {name} | {g['entropy']:.3f} | {', '.join(g['dead']) or '–'} | "
                         f"{', '.join(g['dominant']) or '–'} |")
    if has_reliability:
        lines += ["", "## Calibration", "", "![reliability](reliability.png)"]
    probe_s = sum(h.get("probe_seconds", 0.0) for h in history)
    train_s = sum(h["train_seconds"] for h in history)
    clipped = sum(h.get("clipped_steps", 0) for h in history)
    skipped = sum(h.get("skipped_steps", 0) for h in history)
    lines += ["", "## Instruments", "",
              f"Gradient probes: {sum(h.get('probes', 0) for h in history)} batches, {probe_s:.2f} s of "
              f"{train_s:.1f} s training ({100 * probe_s / max(train_s, 1e-9):.1f} %). Clipped steps: {clipped}; "
              f"skipped (non-finite gradient): {skipped}.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
