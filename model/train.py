"""Training loop, evaluation and the run directory.

``train(cfg, out_dir)`` reads and encodes the data, trains with early stopping on a validation
metric, keeps the best checkpoint and writes the run directory::

    RUN_DIR/config.yaml    the validated config (overrides applied)
    RUN_DIR/schema.json    the fitted feature schema
    RUN_DIR/model.pt       best state_dict
    RUN_DIR/val.npz        the encoded validation split (export calibrates and checks parity on it)
    RUN_DIR/metrics.json   docs/metrics-json.md describes it
    RUN_DIR/train.log      one line per epoch
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from model.balance import make_balancer
from model.data import Split, encode_split, fit_schema, load_frames
from model.nets import MultiTaskRanker
from mtrank.config import Config, TaskConfig, parse_config
from mtrank.encoding import FittedSchema
from mtrank.metrics import binary_metrics, regression_metrics

LOWER_IS_BETTER = ("logloss", "mse", "mae", "loss", "ece")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def to_tensors(split: Split) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in split.inputs.items()}


def task_losses(out: dict[str, dict[str, torch.Tensor]], labels: torch.Tensor, mask: torch.Tensor,
                tasks: list[TaskConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean loss per task -> (losses [T], present [T]). Missing labels contribute no gradient."""
    losses, present = [], []
    for k, t in enumerate(tasks):
        y, m = labels[:, k], mask[:, k]
        if t.type == "regression":
            per_row = (out["scores"][t.name] - y) ** 2
        elif t.chain is None:
            per_row = F.binary_cross_entropy_with_logits(out["logits"][t.name], y, reduction="none")
        else:  # entire-space product: the head learns only through p(parent) * p(head)
            per_row = F.binary_cross_entropy(out["scores"][t.name].clamp(1e-7, 1 - 1e-7), y, reduction="none")
        per_row = torch.where(m, per_row, torch.zeros_like(per_row))
        n = m.sum()
        losses.append(per_row.sum() / n.clamp_min(1))
        present.append(n > 0)
    return torch.stack(losses), torch.stack(present).float()


@torch.no_grad()
def predict(model: MultiTaskRanker, inputs: dict[str, torch.Tensor], batch_size: int = 8192
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scores {name: [N]} and gate weights {gate: [N, m]} for row-aligned inputs."""
    model.eval()
    n = next(iter(inputs.values())).shape[0]
    scores: dict[str, list[np.ndarray]] = {}
    gates: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch_size):
        out = model({k: v[i : i + batch_size] for k, v in inputs.items()})
        for name, v in out["scores"].items():
            scores.setdefault(name, []).append(v.numpy())
        for name, v in out["gates"].items():
            gates.setdefault(name, []).append(v.numpy())
    return ({k: np.concatenate(v) for k, v in scores.items()}, {k: np.concatenate(v) for k, v in gates.items()})


def gate_stats(model: MultiTaskRanker, gates: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean weight per expert and mean entropy (nats) of every gate."""
    stats = {}
    for spec in model.gate_specs:
        w = gates[spec.name]
        entropy = float(np.mean(-np.sum(w * np.log(np.clip(w, 1e-12, 1.0)), axis=1)))
        stats[spec.name] = {"level": spec.level, "owner": spec.owner, "experts": list(spec.experts),
                            "mean": [float(x) for x in w.mean(axis=0)], "entropy": entropy}
    return stats


def evaluate_split(cfg: Config, model: MultiTaskRanker, split: Split, tensors: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-task metrics, gate statistics) on one split."""
    scores, gates = predict(model, tensors)
    metrics: dict[str, Any] = {}
    for k, t in enumerate(cfg.tasks):
        m = split.mask[:, k]
        y, p = split.labels[m, k], scores[t.name][m]
        if t.type == "binary":
            groups = split.groups[m] if split.groups is not None else None
            metrics[t.name] = binary_metrics(y, p, groups=groups, n_bins=cfg.eval.ece_bins)
        else:
            metrics[t.name] = regression_metrics(y, p)
    return metrics, gate_stats(model, gates)


def select_metric(metrics: dict[str, Any], name: str) -> tuple[float, bool]:
    """(value, higher_is_better) of the early-stopping metric."""
    if name == "mean_auc":
        aucs = [m["auc"] for m in metrics.values() if "auc" in m and not math.isnan(m["auc"])]
        return (float(np.mean(aucs)) if aucs else float("nan")), True
    task, _, key = name.partition(".")
    if task not in metrics or key not in metrics[task]:
        raise KeyError(f"train.early_stopping.metric: {name!r} is not a validation metric")
    return float(metrics[task][key]), key not in LOWER_IS_BETTER


def build_model(cfg: Config, schema: FittedSchema) -> MultiTaskRanker:
    return MultiTaskRanker(schema, cfg.tasks, cfg.model)


def train(cfg: Config, out_dir: str | Path) -> dict[str, Any]:
    """Train, evaluate on validation and test, write the run directory; returns metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    t0 = time.perf_counter()
    train_df, val_df, test_df = load_frames(cfg)
    schema = fit_schema(cfg, train_df)
    splits = {"train": encode_split(cfg, schema, train_df), "validation": encode_split(cfg, schema, val_df),
              "test": encode_split(cfg, schema, test_df) if len(test_df) else None}
    prep_s = time.perf_counter() - t0
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (out / "schema.json").write_text(json.dumps(schema.to_dict(), indent=1))
    splits["validation"].save(out / "val.npz")

    model = build_model(cfg, schema)
    balancer = make_balancer(tc.balancer, cfg.tasks)
    optim = torch.optim.Adam(list(model.parameters()) + list(balancer.parameters()), lr=tc.lr,
                             weight_decay=tc.weight_decay)
    tr = splits["train"]
    x_train = to_tensors(tr)
    y_train, m_train = torch.from_numpy(tr.labels), torch.from_numpy(tr.mask)
    x_val = to_tensors(splits["validation"])
    gen = torch.Generator().manual_seed(tc.seed)
    n = len(tr)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, Any]] = []
    train_time, bad_epochs = 0.0, 0
    log_file = open(out / "train.log", "w")
    progress = tc.progress and sys.stderr.isatty()
    for epoch in range(1, tc.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        sums = torch.zeros(len(cfg.tasks))
        counts = torch.zeros(len(cfg.tasks))
        t_epoch = time.perf_counter()
        batches = range(0, n, tc.batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, unit="batch")
        for i in batches:
            idx = perm[i : i + tc.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a single row
                continue
            batch = {k: v[idx] for k, v in x_train.items()}
            out_b = model(batch)
            losses, present = task_losses(out_b, y_train[idx], m_train[idx], cfg.tasks)
            optim.zero_grad(set_to_none=True)
            balancer.backward(losses, present, model)
            optim.step()
            sums += losses.detach() * present
            counts += present
        train_time += time.perf_counter() - t_epoch
        val_metrics, _ = evaluate_split(cfg, model, splits["validation"], x_val)
        value, higher = select_metric(val_metrics, tc.early_stopping.metric)
        task_loss = {t.name: float(sums[k] / max(counts[k], 1)) for k, t in enumerate(cfg.tasks)}
        record = {"epoch": epoch, "train_loss": task_loss, "val_metric": value,
                  "val": {t: {k: v for k, v in m.items() if k in ("auc", "logloss", "mse")} for t, m in val_metrics.items()},
                  "balancer": balancer.state()}
        history.append(record)
        line = (f"epoch {epoch}/{tc.epochs} " + " ".join(f"loss[{k}]={v:.4f}" for k, v in task_loss.items())
                + f" | val {tc.early_stopping.metric}={value:.4f} ({time.perf_counter() - t_epoch:.1f}s)")
        print(line, file=sys.stderr, flush=True)
        log_file.write(line + "\n")
        improved = best is None or (value > best[0] if higher else value < best[0])
        if improved:
            best = (value, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs > tc.early_stopping.patience:
                print(f"early stop after epoch {epoch} (best epoch {best[1]})", file=sys.stderr)
                break
    log_file.close()
    assert best is not None
    model.load_state_dict(best[2])
    torch.save(best[2], out / "model.pt")

    metrics: dict[str, Any] = {}
    gates: dict[str, Any] = {}
    for name in ("validation", "test"):
        if splits[name] is not None:
            metrics[name], gates[name] = evaluate_split(cfg, model, splits[name], to_tensors(splits[name]))
    result = {
        **metrics,
        "gates": gates,
        "train": {"arch": cfg.model.arch, "rows": n, "epochs_run": len(history), "best_epoch": best[1],
                  "best_value": best[0], "early_stopping_metric": tc.early_stopping.metric,
                  "rows_per_s": n * len(history) / max(train_time, 1e-9), "train_seconds": train_time,
                  "prepare_seconds": prep_s, "params": sum(p.numel() for p in model.parameters())},
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=True))
    return result


# ------------------------------------------------------------------------------------- runs


def load_run(run_dir: str | Path) -> tuple[Config, FittedSchema, MultiTaskRanker]:
    """Config, schema and best model of a finished run."""
    run = Path(run_dir)
    if not (run / "model.pt").exists():
        raise FileNotFoundError(f"{run}: not a finished run (no model.pt)")
    raw = yaml.safe_load((run / "config.yaml").read_text())
    cfg = parse_config(raw, base_dir=raw["data"].get("base_dir", "."))
    schema = FittedSchema.from_dict(json.loads((run / "schema.json").read_text()))
    model = build_model(cfg, schema)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    model.eval()
    return cfg, schema, model


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
