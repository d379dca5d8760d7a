"""Training: a ``Trainer`` with one clear ``step``, early stopping, and a rank-aware run directory.

``train(cfg, out_dir)`` reads and encodes the data, places model and data on the configured device,
trains with early stopping on a validation metric, keeps the best checkpoint and writes the run
directory (only the main process writes; see ``Placement``)::

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model import distributed
from model.balance import StepContext, make_balancer, task_gradients
from model.data import Split, encode_split, fit_schema, load_frames
from model.evaluate import evaluate_split, to_tensors
from model.gates import gate_regularization
from model.nets import MultiTaskRanker
from model.warmstart import WarmStart
from mtrank.config import Config, GradNormBalancer, TaskConfig, parse_config
from mtrank.encoding import FittedSchema

LOWER_IS_BETTER = ("logloss", "mse", "mae", "ece")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def task_loss_sums(out: dict[str, dict[str, torch.Tensor]], labels: torch.Tensor, mask: torch.Tensor,
                   tasks: list[TaskConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task: the summed loss over labelled rows and their count -> (sums [T], counts [T]).
    Missing labels contribute no gradient."""
    sums, counts = [], []
    for k, t in enumerate(tasks):
        y, m = labels[:, k], mask[:, k]
        if t.type == "regression":
            per_row = (out["scores"][t.name] - y) ** 2
        elif t.chain is None:
            per_row = F.binary_cross_entropy_with_logits(out["logits"][t.name], y, reduction="none")
        else:  # entire-space product: the head learns only through p(parent) * p(head)
            per_row = F.binary_cross_entropy(out["scores"][t.name].clamp(1e-7, 1 - 1e-7), y, reduction="none")
        sums.append(torch.where(m, per_row, torch.zeros_like(per_row)).sum())
        counts.append(m.sum())
    return torch.stack(sums), torch.stack(counts).to(sums[0].dtype)


def task_losses(out: dict[str, dict[str, torch.Tensor]], labels: torch.Tensor, mask: torch.Tensor,
                tasks: list[TaskConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean loss per task -> (losses [T], present [T])."""
    sums, counts = task_loss_sums(out, labels, mask, tasks)
    return sums / counts.clamp_min(1), (counts > 0).float()


def select_metric(metrics: dict[str, Any], name: str) -> tuple[float, bool]:
    """(value, higher_is_better) of a resolved early-stopping metric (``Config.stopping_metric``; the config
    validated its name). ``loss`` is the mean over tasks of log loss (binary) or MSE (regression)."""
    if name == "mean_auc":
        aucs = [m["auc"] for m in metrics.values() if "auc" in m and not math.isnan(m["auc"])]
        return (float(np.mean(aucs)) if aucs else float("nan")), True
    if name == "loss":
        return float(np.mean([m["logloss"] if "logloss" in m else m["mse"] for m in metrics.values()])), False
    task, _, key = name.partition(".")
    return float(metrics[task].get(key, math.nan)), key not in LOWER_IS_BETTER


def build_model(cfg: Config, schema: FittedSchema) -> MultiTaskRanker:
    return MultiTaskRanker(schema, cfg.tasks, cfg.model)


# ------------------------------------------------------------------------------- placement, run dir


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its device, and its rank among ``world_size`` processes.

    Rank 0 is the main process: the only one that writes the run directory and prints progress.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def resolve(cls, device: str) -> Placement:
        """Under torchrun (``WORLD_SIZE`` > 1) this process joins the group: gloo on CPU, nccl with one GPU per
        local rank (``use_cuda`` says which)."""
        dev, rank, world = distributed.init(use_cuda(device, distributed.gpu_count(), distributed.local_world_size()))
        return cls(dev, rank, world)


def use_cuda(device: str, gpus: int, local_processes: int) -> bool:
    """Whether to train on CUDA: ``auto`` when there is a GPU for each of this node's processes (else the CPU,
    where DDP runs on gloo); ``cuda`` requires that, or it is a config error naming ``train.device``."""
    if device == "cpu":
        return False
    enough = gpus >= max(1, local_processes)
    if device == "cuda" and not enough:
        from mtrank.config import ConfigError

        raise ConfigError(f"train.device: 'cuda' with {local_processes} process(es) on this machine needs as many GPUs "
                          f"(one per process), found {gpus}")
    return enough


class RunDir:
    """The run directory. Only the main process writes; elsewhere every method is a no-op."""

    def __init__(self, path: str | Path, placement: Placement):
        self.path = Path(path)
        self.enabled = placement.is_main
        self._log: IO[str] | None = None
        if self.enabled:
            self.path.mkdir(parents=True, exist_ok=True)
            self._log = open(self.path / "train.log", "w")

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            (self.path / name).write_text(text)

    def save_split(self, name: str, split: Split) -> None:
        if self.enabled:
            split.save(self.path / name)

    def save_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        if self.enabled:
            torch.save({k: v.cpu() for k, v in state.items()}, self.path / name)

    def log(self, line: str) -> None:
        """One line to stderr and train.log."""
        if self._log is not None:
            print(line, file=sys.stderr, flush=True)
            self._log.write(line + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# ------------------------------------------------------------------------------------------ trainer


@dataclass
class Batch:
    """One rank's share of one global batch, on the training device."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool


class BatchSource(Protocol):
    """What an epoch trains on: in-memory tensors (``TrainData``) or a streamed dataset (``model.stream``).

    ``batches`` yields this rank's share of each global batch of ``batch_size`` rows. Every rank must yield
    the same number of batches in an epoch (DDP steps together), none twice in an epoch, in an order drawn
    from ``gen`` (every rank holds a generator seeded alike)."""

    @property
    def rows(self) -> int:
        """Rows per epoch over all ranks (progress, probe spacing, schedule length)."""
        ...

    def batches(self, gen: torch.Generator, batch_size: int, placement: Placement) -> Iterator[Batch]: ...


@dataclass
class TrainData:
    """A split's inputs, labels and masks as tensors on the training device (data that fits in memory)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T] bool

    @classmethod
    def from_split(cls, split: Split, device: torch.device) -> TrainData:
        return cls({k: v.to(device) for k, v in to_tensors(split).items()},
                   torch.from_numpy(split.labels).to(device), torch.from_numpy(split.mask).to(device))

    @property
    def rows(self) -> int:
        return self.labels.shape[0]

    def batches(self, gen: torch.Generator, batch_size: int, placement: Placement) -> Iterator[Batch]:
        """A seeded permutation, the same on every rank; each rank takes every W-th row of each global batch.
        A global batch smaller than 2 rows per rank is dropped (batch norm cannot train on one row)."""
        rank, world = placement.rank, placement.world_size
        perm = torch.randperm(self.rows, generator=gen).to(self.labels.device)
        for i in range(0, self.rows, batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2 * world:
                continue
            idx = idx[rank::world]
            yield Batch({k: v[idx] for k, v in self.inputs.items()}, self.labels[idx], self.mask[idx])


@dataclass
class FitResult:
    best_value: float
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass
class EpochStats:
    """Accumulated over one epoch's steps; ``record`` turns it into the epoch's instruments."""

    T: int
    device: torch.device
    loss_sum: torch.Tensor = field(init=False)
    loss_count: torch.Tensor = field(init=False)
    weight_sum: torch.Tensor = field(init=False)
    steps: int = 0
    probes: int = 0
    grad_norm_sum: torch.Tensor = field(init=False)
    grad_norm_count: torch.Tensor = field(init=False)
    cosine_sum: torch.Tensor = field(init=False)
    pair_count: torch.Tensor = field(init=False)
    clipped: int = 0
    skipped: int = 0
    probe_seconds: float = 0.0

    def __post_init__(self) -> None:
        z = lambda *shape: torch.zeros(*shape, device=self.device)  # noqa: E731
        self.loss_sum, self.loss_count, self.weight_sum = z(self.T), z(self.T), z(self.T)
        self.grad_norm_sum, self.grad_norm_count = z(self.T), z(self.T)
        self.cosine_sum, self.pair_count = z(self.T, self.T), z(self.T, self.T)

    def probe(self, grads: torch.Tensor, present: torch.Tensor) -> None:
        """Per-task gradients on the shared parameters [T, P] of one batch -> norms and pairwise cosines."""
        norms = grads.norm(dim=1)  # [T]
        unit = grads / norms.clamp_min(1e-12).unsqueeze(1)
        ok = present * (norms > 0).float()  # [T]: labelled in this batch, with a gradient
        both = ok.unsqueeze(0) * ok.unsqueeze(1)  # [T, T]
        self.grad_norm_sum += norms * present
        self.grad_norm_count += present
        self.cosine_sum += (unit @ unit.T) * both
        self.pair_count += both
        self.probes += 1

    def record(self, tasks: list[str]) -> dict[str, Any]:
        mean_loss = (self.loss_sum / self.loss_count.clamp_min(1)).tolist()
        out: dict[str, Any] = {
            "train_loss": dict(zip(tasks, mean_loss)),
            "weights": dict(zip(tasks, (self.weight_sum / max(self.steps, 1)).tolist())),
            "steps": self.steps, "clipped_steps": self.clipped, "skipped_steps": self.skipped,
        }
        if self.probes:
            cos = (self.cosine_sum / self.pair_count.clamp_min(1)).tolist()
            norm = torch.where(self.grad_norm_count > 0, self.grad_norm_sum / self.grad_norm_count.clamp_min(1), math.nan)
            out["grad_norm"] = dict(zip(tasks, norm.tolist()))
            out["grad_cosine"] = {f"{a}|{b}": (cos[i][j] if self.pair_count[i, j] > 0 else math.nan)
                                  for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j}
            out["probes"], out["probe_seconds"] = self.probes, self.probe_seconds
        return out


class Trainer:
    """Owns the model, the loss balancer and the optimiser on one device; ``step`` is one update."""

    def __init__(self, cfg: Config, model: MultiTaskRanker, placement: Placement):
        self.cfg, self.placement = cfg, placement
        tc = cfg.train
        self.model = model.to(placement.device)
        self.groups = self.model.parameter_groups()
        # Several processes: DistributedDataParallel averages the model's gradients over ranks in backward (and
        # broadcast rank 0's initial weights); the balancer's own parameters are averaged in ``step``.
        self.forward: torch.nn.Module = self.model
        if placement.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [placement.device.index] if placement.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        self.balancer = make_balancer(tc.balancer, cfg.tasks, seed=tc.seed).to(placement.device)
        balancer_lr = tc.balancer.lr if isinstance(tc.balancer, GradNormBalancer) else tc.lr
        groups: list[dict[str, Any]] = [{"params": list(self.model.parameters())}]
        own = list(self.balancer.parameters())
        if own:
            groups.append({"params": own, "lr": balancer_lr, "weight_decay": 0.0})
        self.optim = torch.optim.Adam(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.ema: AveragedModel | None = None
        if tc.ema_decay is not None:  # buffers (batch-norm statistics) averaged too
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)

    @property
    def evaluated(self) -> MultiTaskRanker:
        """The weights that are validated and kept: the moving average when ``train.ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    def step(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor, stats: EpochStats,
             probe: bool = False) -> None:
        """Forward, per-task masked losses (+ gate terms), balanced backward, clip, optimiser step.

        With W processes each holds its share of the global batch; a task's loss is its local sum over the
        global count of labelled rows (one all-reduce of T counts), times W, so DDP's gradient average is the
        gradient of the global masked mean.
        """
        tc = self.cfg.train
        out = self.forward(inputs)
        sums, counts = task_loss_sums(out, labels, mask, self.cfg.tasks)
        world = self.placement.world_size
        if world > 1:
            counts = distributed.all_reduce_(counts.detach().clone())
        losses, present = sums * world / counts.clamp_min(1), (counts > 0).float()
        self.optim.zero_grad(set_to_none=True)
        if probe:
            t0 = time.perf_counter()
            stats.probe(task_gradients(losses, present, self.groups.shared), present)
            stats.probe_seconds += time.perf_counter() - t0
        ctx = StepContext(self.groups, out["representation"], gate_regularization(out["gates"], tc.gates))
        weights = self.balancer.backward(losses, present, ctx)
        if world > 1:
            for p in self.balancer.parameters():
                if p.grad is not None:
                    distributed.all_reduce_(p.grad, mean=True)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or math.inf)
        if not torch.isfinite(norm):  # an exploding or NaN gradient: skip the update, count it
            stats.skipped += 1
        else:
            stats.clipped += int(tc.grad_clip is not None and float(norm) > tc.grad_clip)
            self.optim.step()
            self.balancer.after_step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        if self.scheduler is not None:
            self.scheduler.step()
        losses = losses.detach() / world  # summed over ranks at the end of the epoch: the global mean
        ok = present * torch.isfinite(losses)
        stats.loss_sum += torch.nan_to_num(losses) * ok
        stats.loss_count += ok
        stats.weight_sum += weights
        stats.steps += 1

    def train_epoch(self, data: BatchSource, gen: torch.Generator, desc: str = "") -> EpochStats:
        """One pass over ``data`` (``BatchSource``: no row twice, a different shuffle per epoch and rank)."""
        tc, T = self.cfg.train, len(self.cfg.tasks)
        self.model.train()
        stats = EpochStats(T, self.placement.device)
        n_batches = math.ceil(data.rows / tc.batch_size)
        n_probe = min(tc.instruments.probes_per_epoch, n_batches)
        probes = {int(i) for i in np.linspace(0, n_batches - 1, n_probe)} if n_probe else set()
        batches: Any = data.batches(gen, tc.batch_size, self.placement)
        if tc.progress and self.placement.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            batches = tqdm(batches, desc=desc, leave=False, unit="batch", total=n_batches)
        for i, batch in enumerate(batches):
            self.step(batch.inputs, batch.labels, batch.mask, stats, probe=i in probes)
        distributed.all_reduce_(stats.loss_sum)
        self.balancer.end_epoch(stats.loss_sum / stats.loss_count.clamp_min(1))
        return stats

    def fit(self, train: BatchSource, validation: Split, run: RunDir) -> FitResult:
        """Epochs with early stopping on the resolved ``train.early_stopping`` metric; keeps the best state (CPU)."""
        tc, metric = self.cfg.train, self.cfg.stopping_metric
        if tc.lr_schedule == "cosine":
            steps = tc.epochs * math.ceil(train.rows / tc.batch_size)
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optim, T_max=steps)
        gen = torch.Generator().manual_seed(tc.seed)
        x_val = to_tensors(validation)
        result: FitResult | None = None
        train_time, bad_epochs = 0.0, 0
        history: list[dict[str, Any]] = []
        tasks = self.cfg.task_names
        for epoch in range(1, tc.epochs + 1):
            t_epoch = time.perf_counter()
            stats = self.train_epoch(train, gen, desc=f"epoch {epoch}")
            seconds = time.perf_counter() - t_epoch
            train_time += seconds
            val_metrics, val_gates = evaluate_split(self.cfg, self.evaluated, validation, x_val)
            value, higher = select_metric(val_metrics, metric)
            record = {"epoch": epoch, **stats.record(tasks), "train_seconds": seconds, "val_metric": value,
                      "lr": self.optim.param_groups[0]["lr"],
                      "val": {t: {k: v for k, v in m.items() if k in ("auc", "logloss", "mse")}
                              for t, m in val_metrics.items()},
                      "gates": {g: {k: v for k, v in st.items() if k in ("mean", "entropy", "dead", "dominant")}
                                for g, st in val_gates.items()},
                      "balancer": self.balancer.state()}
            history.append(record)
            run.log(f"epoch {epoch}/{tc.epochs} "
                    + " ".join(f"loss[{k}]={v:.4f}" for k, v in record["train_loss"].items())
                    + " w=" + ",".join(f"{v:.2f}" for v in record["weights"].values())
                    + (f" cos={','.join(f'{v:+.2f}' for v in record['grad_cosine'].values())}"
                       if record.get("grad_cosine") else "")
                    + (f" clipped={stats.clipped}" if stats.clipped else "")
                    + (f" skipped={stats.skipped} (non-finite gradient)" if stats.skipped else "")
                    + "".join(f" {g}:" + (f" dead={','.join(st['dead'])}" if st["dead"] else "")
                              + (f" dominant={','.join(st['dominant'])}" if st["dominant"] else "")
                              for g, st in record["gates"].items() if st["dead"] or st["dominant"])
                    + f" | val {metric}={value:.4f} ({time.perf_counter() - t_epoch:.1f}s)")
            improved = _improved(value, result.best_value if result else None, higher)
            if improved or result is None:  # a first epoch with a NaN metric is still the best so far
                state = {k: v.detach().to("cpu", copy=True) for k, v in self.evaluated.state_dict().items()}
                result = FitResult(value, epoch, state)
            if improved:
                bad_epochs = 0
            else:
                bad_epochs += 1
                if bad_epochs > tc.early_stopping.patience:
                    run.log(f"early stop after epoch {epoch} (best epoch {result.best_epoch})")
                    break
        assert result is not None
        result.history, result.train_seconds = history, train_time
        self.model.load_state_dict(result.best_state)
        return result


def _improved(value: float, best: float | None, higher: bool) -> bool:
    """A NaN never improves; anything finite improves on nothing or on NaN."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if higher else value < best


# ------------------------------------------------------------------------------------------ a run


def train(cfg: Config, out_dir: str | Path, warm_start: WarmStart | None = None) -> dict[str, Any]:
    """Train, evaluate on validation and test, write the run directory; returns metrics.json.

    Under torchrun every rank reads and encodes the data, trains on its share of each batch, validates on the
    whole validation split (so all ranks take the same early-stopping decision) and returns the same metrics;
    only rank 0 writes the run directory.
    """
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    placement = Placement.resolve(tc.device)
    run = RunDir(out_dir, placement)
    t0 = time.perf_counter()
    source: BatchSource
    if cfg.data.stream is None:
        train_df, val_df, test_df = load_frames(cfg)
        warm = warm_start.prepare(cfg, train_df) if warm_start is not None else None
        schema = warm.schema if warm is not None else fit_schema(cfg, train_df)
        source = TrainData.from_split(encode_split(cfg, schema, train_df), placement.device)
        splits = {"validation": encode_split(cfg, schema, val_df),
                  "test": encode_split(cfg, schema, test_df) if len(test_df) else None}
    else:  # data larger than memory: Parquet row groups streamed through a shuffle buffer (model/stream.py)
        from model.stream import no_rows, prepare_stream

        warm = warm_start.prepare(cfg, no_rows(cfg)) if warm_start is not None else None  # vocabularies as they are
        schema, source, validation = prepare_stream(cfg, placement, warm.schema if warm is not None else None)
        splits = {"validation": validation, "test": None}  # the test split is streamed after training
    prep_s = time.perf_counter() - t0
    run.write_text("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    run.write_text("schema.json", json.dumps(schema.to_dict(), indent=1))
    run.save_split("val.npz", splits["validation"])

    model = build_model(cfg, schema)
    if warm is not None:
        model.load_state_dict(warm.state)
    trainer = Trainer(cfg, model, placement)
    fit = trainer.fit(source, splits["validation"], run)
    run.save_state("model.pt", fit.best_state)

    metrics: dict[str, Any] = {}
    gates: dict[str, Any] = {}
    for name in ("validation", "test"):
        if splits[name] is not None:
            metrics[name], gates[name] = evaluate_split(cfg, trainer.model, splits[name], to_tensors(splits[name]))
    if cfg.data.stream is not None and cfg.data.test:
        from model.stream import evaluate_streamed

        metrics["test"], gates["test"] = evaluate_streamed(cfg, schema, trainer.model)
    n = source.rows  # rows trained per epoch
    result = {
        **metrics,
        "gates": gates,
        "train": {"arch": cfg.model.arch, "rows": n, "epochs_run": len(fit.history), "best_epoch": fit.best_epoch,
                  "best_value": fit.best_value, "early_stopping_metric": cfg.stopping_metric,
                  "balancer": tc.balancer.kind,
                  "rows_per_s": n * len(fit.history) / max(fit.train_seconds, 1e-9),
                  "train_seconds": fit.train_seconds, "prepare_seconds": prep_s, "device": str(placement.device),
                  "world_size": placement.world_size,
                  **({"vocab_added": warm.vocab_added} if warm is not None else {}),
                  "params": sum(p.numel() for p in trainer.model.parameters())},
        "history": fit.history,
    }
    run.write_text("metrics.json", json.dumps(result, indent=1, allow_nan=True))
    run.close()
    distributed.shutdown()
    return result


def load_run(run_dir: str | Path) -> tuple[Config, FittedSchema, MultiTaskRanker]:
    """Config, schema and best model (on CPU) of a finished run."""
    run = Path(run_dir)
    if not (run / "model.pt").exists():
        raise FileNotFoundError(f"{run}: not a finished run (no model.pt)")
    raw = yaml.safe_load((run / "config.yaml").read_text())
    cfg = parse_config(raw, base_dir=raw["data"].get("base_dir", "."))
    schema = FittedSchema.from_dict(json.loads((run / "schema.json").read_text()))
    model = build_model(cfg, schema)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True, map_location="cpu"))
    model.eval()
    return cfg, schema, model
