"""Scoring a split with a trained model: predictions, per-task metrics, gate statistics, the text table."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from model.data import Split
from model.gates import gate_health
from model.nets import MultiTaskRanker
from mtrank.config import Config
from mtrank.metrics import binary_metrics, regression_metrics


def to_tensors(split: Split) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in split.inputs.items()}


@torch.no_grad()
def predict(model: MultiTaskRanker, inputs: dict[str, torch.Tensor], batch_size: int = 8192
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scores {name: [N]} and gate weights {gate: [N, m]} for row-aligned inputs (on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    n = next(iter(inputs.values())).shape[0]
    scores: dict[str, list[np.ndarray]] = {}
    gates: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch_size):
        out = model({k: v[i : i + batch_size].to(device) for k, v in inputs.items()})
        for name, v in out["scores"].items():
            scores.setdefault(name, []).append(v.cpu().numpy())
        for name, v in out["gates"].items():
            gates.setdefault(name, []).append(v.cpu().numpy())
    return ({k: np.concatenate(v) for k, v in scores.items()}, {k: np.concatenate(v) for k, v in gates.items()})


def gate_stats(model: MultiTaskRanker, gates: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per gate: mean weight per expert, mean entropy (nats), dead and dominant experts (``model.gates``)."""
    sums = {name: (w.sum(axis=0), float(gate_entropy(w).sum())) for name, w in gates.items()}
    return gate_summary(model, sums, next(iter(gates.values())).shape[0] if gates else 0)


def gate_entropy(w: np.ndarray) -> np.ndarray:
    """Row entropies (nats) of gate weights [N, m] -> [N]."""
    return -np.sum(w * np.log(np.clip(w, 1e-12, 1.0)), axis=1)


def gate_summary(model: MultiTaskRanker, sums: dict[str, tuple[np.ndarray, float]], n: int) -> dict[str, Any]:
    """``gate_stats`` from per-gate sums over ``n`` rows: (weight per expert [m], entropy) -> the same record."""
    stats = {}
    for spec in model.gate_specs:
        weight, entropy = sums[spec.name]
        mean = weight / max(n, 1)
        health = gate_health(mean)
        stats[spec.name] = {"level": spec.level, "owner": spec.owner, "experts": list(spec.experts),
                            "mean": [float(x) for x in mean], "entropy": entropy / max(n, 1),
                            "dead": [spec.experts[i] for i in health["dead"]],
                            "dominant": [spec.experts[i] for i in health["dominant"]]}
    return stats


def task_metrics(cfg: Config, labels: np.ndarray, mask: np.ndarray, groups: np.ndarray | None,
                 scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-task metrics of scores {task: [N]} against labels [N, T] where ``mask`` [N, T] holds a label."""
    metrics: dict[str, Any] = {}
    for k, t in enumerate(cfg.tasks):
        m = mask[:, k]
        y, p = labels[m, k], scores[t.name][m]
        if t.type == "binary":
            metrics[t.name] = binary_metrics(y, p, groups=groups[m] if groups is not None else None,
                                             n_bins=cfg.eval.ece_bins)
        else:
            metrics[t.name] = regression_metrics(y, p)
    return metrics


def evaluate_split(cfg: Config, model: MultiTaskRanker, split: Split, tensors: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-task metrics, gate statistics) on one split."""
    scores, gates = predict(model, tensors)
    return task_metrics(cfg, split.labels, split.mask, split.groups, scores), gate_stats(model, gates)


def format_table(metrics: dict[str, Any]) -> str:
    """Per-task metrics of validation and test as a text table."""
    cols = ["auc", "gauc", "logloss", "ece", "mse", "mae"]
    rows = [f"{'split':<11}{'task':<14}" + "".join(f"{c:>10}" for c in cols)]
    for split in ("validation", "test"):
        for task, m in metrics.get(split, {}).items():
            cells = "".join(f"{m[c]:>10.4f}" if isinstance(m.get(c), (int, float)) else f"{'-':>10}" for c in cols)
            rows.append(f"{split:<11}{task:<14}{cells}")
    for split, gates in metrics.get("gates", {}).items():
        if split != "validation":
            continue
        for gate, g in gates.items():
            weights = " ".join(f"{e}={w:.2f}" for e, w in zip(g["experts"], g["mean"]))
            rows.append(f"gate {gate:<22} H={g['entropy']:.3f}  {weights}")
    return "\n".join(rows)

