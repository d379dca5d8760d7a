"""Census-Income (KDD): test AUC and training throughput of mtrank vs torch-rechub, same split, same features.

For every architecture (shared_bottom, mmoe, cgc, ple; plus our ``single`` baseline, ours only) and seed,
in ONE process so that throughput ratios are measured under the same conditions:

* OURS   ``model.train.train(load_config(examples/census-income/<arch>.yaml, overrides), tmp run dir)``
         with the budget forced through ``--set`` overrides (epochs, batch size, lr, weight decay, seed,
         threads, no progress bar, early-stopping patience = epochs so every epoch runs and the best epoch
         by validation mean AUC is kept).
* RECHUB torch-rechub's own model (SharedBottom, MMOE, PLE n_level=1 for CGC, PLE n_level=2 for PLE) fed
         EXACTLY our encoded features: ``model.data.load_frames`` / ``fit_schema`` / ``encode_split``; one
         ``SparseFeature(name, vocab_size=feature.size, embed_dim=<ours>)`` per categorical field with local
         id = global id - feature.offset, one ``DenseFeature(name)`` per numeric feature (our normalised
         value). Data path and trainer as a user would write them: ``DataGenerator(x, y).generate_dataloader``
         and ``MTLTrainer.train_one_epoch`` / ``MTLTrainer.evaluate`` (Adam, same lr / weight decay / batch /
         epochs); we loop the epochs ourselves and keep the state_dict of the best epoch by validation mean
         AUC, then score the test split with ``sklearn.metrics.roc_auc_score``.

Throughput: ours = ``metrics["train"]["rows_per_s"]`` (rows x epochs / time in the training loop);
rechub = rows x epochs / time spent inside ``train_one_epoch`` (its DataLoader included, validation excluded).
rechub's tqdm bars are removed by replacing the ``tqdm`` name inside ``torch_rechub.trainers.mtl_trainer``
with a pass-through (``tqdm.tqdm(it, ...) -> it``), so neither output nor time is spent on them.

Usage (from the repository root; OPENBLAS_CORETYPE slows numpy on the benchmark machine, so unset it)::

    env -u OPENBLAS_CORETYPE python benchmarks/census_peer.py            # full: 5 epochs x seeds 0,1,2
    env -u OPENBLAS_CORETYPE python benchmarks/census_peer.py --quick    # smoke test: 1 epoch, seed 0

Writes all raw results to ``--out-json`` (default /tmp/census_peer.json) and replaces the section between
``<!-- census-peer:start -->`` and ``<!-- census-peer:end -->`` in ``--docs`` (default docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from benchmarks.common import log, mean_std, write_docs  # noqa: E402
from model.data import encode_split, fit_schema, load_frames  # noqa: E402
from model.evaluate import predict  # noqa: E402
from model.train import load_run, train  # noqa: E402
from mtrank.config import Config, load_config  # noqa: E402

EXAMPLES = ROOT / "examples" / "census-income"
MULTI_TASK_ARCHS = ["shared_bottom", "mmoe", "cgc", "ple"]
ALL_ARCHS = ["single", *MULTI_TASK_ARCHS]
START, END = "<!-- census-peer:start -->", "<!-- census-peer:end -->"
SECTION_TITLE = "## Census-Income (KDD): accuracy and training throughput vs torch-rechub"


# ------------------------------------------------------------------------------------------ ours


def ours_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    return [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
            f"train.weight_decay={args.weight_decay}", f"train.seed={seed}", f"train.threads={args.threads}",
            "train.balancer=fixed", "train.progress=false", "train.early_stopping.metric=mean_auc",
            f"train.early_stopping.patience={args.epochs + 1}"]


def run_ours(args: argparse.Namespace, arch: str, seed: int, test_inputs: dict[str, np.ndarray],
             test_labels: np.ndarray, ref_schema: dict[str, Any]) -> dict[str, Any]:
    cfg = load_config(EXAMPLES / f"{arch}.yaml", ours_overrides(args, seed))
    with tempfile.TemporaryDirectory(prefix=f"census-peer-{arch}-{seed}-") as run_dir:
        m = train(cfg, run_dir)
        schema = json.loads((Path(run_dir) / "schema.json").read_text())
        # Cross-check: the run encoded the data exactly as the peer is fed, and our AUC agrees with sklearn's.
        if schema != ref_schema:
            raise RuntimeError(f"{arch}/{seed}: the run's fitted schema differs from the peer's")
        _, _, model = load_run(run_dir)
        scores, _ = predict(model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in test_inputs.items()})
    tasks = cfg.task_names
    sk = {t: float(roc_auc_score(test_labels[:, k], scores[t])) for k, t in enumerate(tasks)}
    tr = m["train"]
    return {
        "impl": "ours", "arch": arch, "seed": seed,
        "test_auc": {t: float(m["test"][t]["auc"]) for t in tasks},
        "test_auc_sklearn": sk,
        "val_auc": {t: float(m["validation"][t]["auc"]) for t in tasks},
        "rows_per_s": float(tr["rows_per_s"]), "train_seconds": float(tr["train_seconds"]),
        "prepare_seconds": float(tr["prepare_seconds"]), "rows": int(tr["rows"]),
        "epochs_run": int(tr["epochs_run"]), "best_epoch": int(tr["best_epoch"]), "params": int(tr["params"]),
        "history": [{"epoch": h["epoch"], "val_mean_auc": h["val_metric"], "train_loss": h["train_loss"]}
                    for h in m["history"]],
    }


# ---------------------------------------------------------------------------------------- rechub


def silence_rechub_tqdm() -> None:
    """Replace the ``tqdm`` module name inside rechub's MTL trainer with a pass-through."""
    from torch_rechub.trainers import mtl_trainer

    mtl_trainer.tqdm = types.SimpleNamespace(tqdm=lambda iterable, *a, **kw: iterable)


class PeerData:
    """Our encoded splits re-laid out as torch-rechub inputs: one numpy column per feature."""

    def __init__(self, cfg: Config):
        t0 = time.perf_counter()
        train_df, val_df, test_df = load_frames(cfg)
        self.schema = fit_schema(cfg, train_df)
        self.splits = {"train": encode_split(cfg, self.schema, train_df),
                       "validation": encode_split(cfg, self.schema, val_df),
                       "test": encode_split(cfg, self.schema, test_df)}
        for name, s in self.splits.items():
            if not s.mask.all():
                raise RuntimeError(f"{name}: census labels are never missing, but the mask has gaps")
        if self.schema.n_slots("item") or self.schema.n_dense("item"):
            raise RuntimeError("census has request features only")
        self.id_feats = self.schema.id_features("request")
        if any(f.kind != "categorical" for f in self.id_feats):
            raise RuntimeError("the peer mapping handles single-valued categorical features only")
        self.dense_feats = self.schema.dense_features("request")
        self.task_names = cfg.task_names
        self.columns = {name: self._columns(s) for name, s in self.splits.items()}
        self.prepare_seconds = time.perf_counter() - t0

    def _columns(self, split) -> dict[str, np.ndarray]:
        ids, dense = split.inputs["request_ids"], split.inputs["request_dense"]
        x: dict[str, np.ndarray] = {}
        for j, f in enumerate(self.id_feats):
            local = ids[:, j] - f.offset
            if local.min() < 0 or local.max() >= f.size:
                raise RuntimeError(f"{f.name}: local ids outside [0, {f.size})")
            x[f.name] = np.ascontiguousarray(local)
        col = 0
        for f in self.dense_feats:  # one peer DenseFeature per dense column (piecewise-linear: 1 + bins)
            for k in range(f.width):
                x[self._dense_name(f, k)] = np.ascontiguousarray(dense[:, col])
                col += 1
        return x

    @staticmethod
    def _dense_name(f, k: int) -> str:
        return f.name if f.width == 1 else f"{f.name}.{k}"

    def labels(self, split: str) -> np.ndarray:
        return self.splits[split].labels  # [N, T] float32

    def features(self, embed_dim: int) -> list:
        """Fresh feature objects (rechub caches the embedding table on the SparseFeature object)."""
        from torch_rechub.basic.features import DenseFeature, SparseFeature

        return ([SparseFeature(f.name, vocab_size=f.size, embed_dim=embed_dim) for f in self.id_feats]
                + [DenseFeature(self._dense_name(f, k)) for f in self.dense_feats for k in range(f.width)])


def build_rechub_model(arch: str, cfg: Config, features: list, n_tasks: int) -> torch.nn.Module:
    from torch_rechub.models.multi_task import MMOE, PLE, SharedBottom

    mc = cfg.model
    task_types = ["classification"] * n_tasks
    body = {"dims": list(mc.expert_hidden), "dropout": mc.dropout, "activation": "relu"}
    towers = [{"dims": list(mc.tower_hidden), "dropout": mc.dropout, "activation": "relu"} for _ in range(n_tasks)]
    if arch == "shared_bottom":
        return SharedBottom(features, task_types, bottom_params=body, tower_params_list=towers)
    if arch == "mmoe":
        return MMOE(features, task_types, n_expert=mc.n_experts, expert_params=body, tower_params_list=towers)
    if arch in ("cgc", "ple"):
        return PLE(features, task_types, n_level=1 if arch == "cgc" else mc.levels,
                   n_expert_specific=mc.n_task_experts, n_expert_shared=mc.n_shared_experts,
                   expert_params=body, tower_params_list=towers)
    raise ValueError(f"no torch-rechub peer for arch {arch!r}")


def seed_peer(seed: int) -> None:
    """The same global seeding as ``model.train.seed_everything`` (deterministic algorithms included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass(frozen=True)
class PeerSettings:
    """How torch-rechub trains: the equal-budget comparison, or its own census recipe."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    patience: int | None = None  # None: every epoch runs
    stop_task: int | None = None  # early-stopping metric: that task's validation AUC (None: the mean)

    @classmethod
    def budget(cls, args: argparse.Namespace) -> PeerSettings:
        return cls(args.epochs, args.lr, args.weight_decay, args.batch_size)

    @classmethod
    def own_recipe(cls, args: argparse.Namespace) -> PeerSettings:
        """examples/ranking/run_census.py: Adam lr 1e-3, weight decay 1e-4, batch 1024, early stopping with
        patience 30 on the first task's (income's) validation AUC."""
        return cls(args.peer_max_epochs, 1e-3, 1e-4, 1024, patience=30, stop_task=0)


def run_rechub(args: argparse.Namespace, arch: str, seed: int, data: PeerData, peer: PeerSettings) -> dict[str, Any]:
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    cfg = load_config(EXAMPLES / f"{arch}.yaml", ours_overrides(args, seed))
    torch.set_num_threads(args.threads)
    seed_peer(seed)
    n_tasks = len(data.task_names)
    model = build_rechub_model(arch, cfg, data.features(cfg.model.embedding_dim), n_tasks)
    dg = DataGenerator(data.columns["train"], data.labels("train"))
    train_dl, val_dl, _ = dg.generate_dataloader(
        x_val=data.columns["validation"], y_val=data.labels("validation"),
        x_test=data.columns["test"], y_test=data.labels("test"), batch_size=peer.batch_size)
    t_wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"census-peer-rechub-{arch}-{seed}-") as model_path:
        trainer = MTLTrainer(model, task_types=["classification"] * n_tasks, optimizer_fn=torch.optim.Adam,
                             optimizer_params={"lr": peer.lr, "weight_decay": peer.weight_decay},
                             n_epoch=peer.epochs, earlystop_patience=peer.epochs + 1, device="cpu",
                             model_path=model_path)
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        train_time, history = 0.0, []
        for epoch in range(1, peer.epochs + 1):
            out = io.StringIO()  # rechub prints one "train loss" line per epoch; keep it, off the console
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(out):
                losses = trainer.train_one_epoch(train_dl)
            dt = time.perf_counter() - t0
            train_time += dt
            scores = trainer.evaluate(trainer.model, val_dl)  # roc_auc_score per task on validation
            value = float(np.mean(scores) if peer.stop_task is None else scores[peer.stop_task])
            history.append({"epoch": epoch, "val_metric": value, "val_auc": [float(s) for s in scores],
                            "train_loss": [float(x) for x in losses], "train_seconds": dt})
            print(f"rechub {arch} seed {seed} epoch {epoch}/{peer.epochs} | val metric={value:.4f} "
                  f"({dt:.1f}s train)", file=sys.stderr, flush=True)
            if best is None or value > best[0]:
                best = (value, epoch, copy.deepcopy(trainer.model.state_dict()))
            elif peer.patience is not None and epoch - best[1] >= peer.patience:
                break
    wall = time.perf_counter() - t_wall
    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    x_test = {k: torch.from_numpy(v) for k, v in data.columns["test"].items()}
    preds = []
    with torch.no_grad():
        n_test = len(data.labels("test"))
        for i in range(0, n_test, 8192):
            preds.append(model({k: v[i : i + 8192] for k, v in x_test.items()}).numpy())
    p = np.concatenate(preds)
    y = data.labels("test")
    rows = len(data.labels("train"))
    return {
        "impl": "rechub", "arch": arch, "seed": seed,
        "test_auc": {t: float(roc_auc_score(y[:, k], p[:, k])) for k, t in enumerate(data.task_names)},
        "rows_per_s": rows * len(history) / max(train_time, 1e-9), "train_seconds": train_time, "rows": rows,
        "wall_seconds": wall, "epochs_run": len(history), "best_epoch": best[1],
        "params": sum(q.numel() for q in model.parameters()),
        "history": history,
    }


# ---------------------------------------------------------------------------------------- report


def summarize(results: list[dict[str, Any]], archs: list[str], tasks: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for arch in archs:
        entry: dict[str, Any] = {}
        for impl in ("ours", "rechub"):
            rs = [r for r in results if r["arch"] == arch and r["impl"] == impl]
            if not rs:
                continue
            entry[impl] = {
                "seeds": [r["seed"] for r in rs],
                "test_auc": {t: dict(zip(("mean", "std"), mean_std([r["test_auc"][t] for r in rs]))) for t in tasks},
                "rows_per_s_median": float(statistics.median(r["rows_per_s"] for r in rs)),
                "rows_per_s": [r["rows_per_s"] for r in rs],
                "params": rs[0]["params"],
                "best_epochs": [r["best_epoch"] for r in rs],
            }
        if "ours" in entry and "rechub" in entry:
            o, p = entry["ours"], entry["rechub"]
            entry["throughput_ratio"] = o["rows_per_s_median"] / p["rows_per_s_median"]
            pairs = {(r["seed"]): r["rows_per_s"] for r in results if r["arch"] == arch and r["impl"] == "rechub"}
            entry["per_seed_ratio"] = [r["rows_per_s"] / pairs[r["seed"]] for r in results
                                       if r["arch"] == arch and r["impl"] == "ours" and r["seed"] in pairs]
            verdict = {}
            for t in tasks:
                d = o["test_auc"][t]["mean"] - p["test_auc"][t]["mean"]
                noise = math.sqrt(o["test_auc"][t]["std"] ** 2 + p["test_auc"][t]["std"] ** 2)
                verdict[t] = {"delta": d, "noise": noise,
                              "status": "ours >= rechub" if d >= 0 else ("within noise" if -d <= noise else "ours lower")}
            entry["auc_verdict"] = verdict
        summary[arch] = entry
    return summary


def bn_note(model: dict[str, Any]) -> str:
    if model.get("batch_norm"):
        return ("Both put BatchNorm after every hidden linear layer of experts / bottom / towers (ours: "
                "`model.batch_norm: true`); torch-rechub's softmax gates also carry a BatchNorm (its design), "
                "hence its slightly larger counts; ours has one shared embedding table with a padding row.")
    return ("torch-rechub's MLPs add BatchNorm after every linear layer (its design; gates included) and ours "
            "has none (`model.batch_norm: false`), hence its slightly larger counts; ours has one shared "
            "embedding table with a padding row.")


def render(summary: dict[str, Any], meta: dict[str, Any], tasks: list[str]) -> str:
    a = meta["args"]
    lines = [START, "",
             f"Generated by `benchmarks/census_peer.py` on {meta['finished']} ({meta['total_minutes']:.1f} min wall).",
             "",
             "Reproduce (from the repository root; `OPENBLAS_CORETYPE` is unset because it slows numpy on this machine):",
             "", "```bash", meta["command"], "```", "",
             f"**Budget (both):** {a['epochs']} epochs, batch {a['batch_size']}, Adam lr {a['lr']}, weight decay "
             f"{a['weight_decay']}, all epochs run, best epoch by validation mean AUC kept; seeds "
             f"{', '.join(map(str, a['seeds']))}; `torch.set_num_threads({a['threads']})` for both, one process, "
             "runs interleaved (for each seed: for each arch: ours, then rechub).",
             "",
             f"**Data:** train on `census-income.data` ({meta['rows']['train']:,} rows); `census-income.test` "
             f"split 1:1 (seeded) into validation ({meta['rows']['validation']:,}) and test "
             f"({meta['rows']['test']:,}) by `model.data.load_frames`. torch-rechub is fed exactly our encoded "
             "features (same vocabularies, OOV/missing ids, the config's numeric encodings): one "
             f"`SparseFeature(vocab_size=feature.size, embed_dim={meta['model']['embedding_dim']})` per categorical "
             f"field ({meta['n_sparse']}) and one `DenseFeature` per dense column ({meta['n_dense']}).",
             "",
             f"**Model sizes (both):** experts / bottom {meta['model']['expert_hidden']}, towers "
             f"{meta['model']['tower_hidden']}, MMoE {meta['model']['n_experts']} experts, CGC/PLE "
             f"{meta['model']['n_shared_experts']} shared + {meta['model']['n_task_experts']} per-task experts, PLE "
             f"{meta['model']['levels']} levels (rechub `PLE(n_level=1)` for CGC). " + bn_note(meta["model"]),
             "",
             f"**Machine:** {meta['machine']}. Shared with other engineers' test runs, so timings are noisy: "
             "throughput is the **median** over seeds (per-seed ratios are paired runs, back to back); load average at "
             "start / end "
             f"{meta['loadavg_start']} / {meta['loadavg_end']}.",
             "",
             "### Test AUC (mean ± std over seeds)", "",
             "| arch | task | ours | torch-rechub | Δ ours − rechub | verdict |",
             "|---|---|---|---|---|---|"]
    for arch, e in summary.items():
        for t in tasks:
            o = e.get("ours", {}).get("test_auc", {}).get(t)
            p = e.get("rechub", {}).get("test_auc", {}).get(t)
            fo = f"{o['mean']:.4f} ± {o['std']:.4f}" if o else "–"
            fp = f"{p['mean']:.4f} ± {p['std']:.4f}" if p else "– (ours only)"
            v = e.get("auc_verdict", {}).get(t)
            fd = f"{v['delta']:+.4f}" if v else "–"
            fv = v["status"] if v else "–"
            lines.append(f"| {arch} | {t} | {fo} | {fp} | {fd} | {fv} |")
    lines += ["", "\"within noise\": ours is lower but by less than sqrt(std_ours² + std_rechub²).", "",
              "### Training throughput (rows/s, training loop only, median over seeds) and parameters", "",
              "| arch | ours rows/s | torch-rechub rows/s | ours / rechub | per-seed ratios | params ours | params rechub |",
              "|---|---|---|---|---|---|---|"]
    for arch, e in summary.items():
        o, p = e.get("ours"), e.get("rechub")
        fo = f"{o['rows_per_s_median']:,.0f}" if o else "–"
        fp = f"{p['rows_per_s_median']:,.0f}" if p else "–"
        fr = f"**{e['throughput_ratio']:.1f}×**" if "throughput_ratio" in e else "–"
        fs = ", ".join(f"{x:.1f}" for x in e.get("per_seed_ratio", [])) or "–"
        lines.append(f"| {arch} | {fo} | {fp} | {fr} | {fs} | {o['params']:,} | "
                     f"{p['params']:,} |" if p else f"| {arch} | {fo} | {fp} | {fr} | {fs} | {o['params']:,} | – |")
    multi = [a for a in summary if "auc_verdict" in summary[a]]
    auc_ok = [a for a in multi if all(summary[a]["auc_verdict"][t]["delta"] >= 0 for t in tasks)]
    auc_noise = [a for a in multi if all(summary[a]["auc_verdict"][t]["status"] != "ours lower" for t in tasks)]
    worst = min((summary[a]["auc_verdict"][t]["delta"], a, t) for a in multi for t in tasks)
    tp_ok = [a for a in multi if summary[a]["throughput_ratio"] >= 3.0]
    lines += ["", "### Targets", "",
              f"- Each multi-task arch at least matches torch-rechub's test AUC on both tasks (mean over seeds): "
              f"{'**holds**' if len(auc_ok) == len(multi) else '**does not hold**'} "
              f"({len(auc_ok)}/{len(multi)} archs: {', '.join(auc_ok) or 'none'}"
              + (f"; not for {', '.join(a for a in multi if a not in auc_ok)}" if len(auc_ok) < len(multi) else "") + ").",
              f"  Within seed noise (higher, or lower by less than sqrt(std_ours² + std_rechub²)) on both tasks: "
              f"{len(auc_noise)}/{len(multi)} archs"
              + (f" (not {', '.join(a for a in multi if a not in auc_noise)})" if len(auc_noise) < len(multi) else "")
              + f"; largest shortfall {worst[0]:+.4f} ({worst[1]} {worst[2]}).",
              f"- Our training throughput ≥ 3× torch-rechub's for the same model: "
              f"{'**holds**' if len(tp_ok) == len(multi) else '**does not hold**'} "
              f"({len(tp_ok)}/{len(multi)} archs; ratios "
              + ", ".join(f"{a} {summary[a]['throughput_ratio']:.1f}×" for a in multi) + ").",
              "",
              "Notes: torch-rechub runs its own data path and trainer as a user would "
              "(`DataGenerator(x, y).generate_dataloader(...)`, a `DataLoader` over a per-row `TorchDataset`, "
              "`MTLTrainer.train_one_epoch` / `MTLTrainer.evaluate`), with BCE on sigmoid outputs and the loss "
              "averaged over tasks; its throughput is rows × epochs / time inside `train_one_epoch` (data loading "
              "included, as in ours). Its tqdm bars are removed by replacing the `tqdm` name in "
              "`torch_rechub.trainers.mtl_trainer` with a pass-through; its per-epoch `print` is redirected. "
              "Both sides run with `torch.use_deterministic_algorithms(True, warn_only=True)` (our trainer sets "
              "it; the peer gets the same seeding). Test AUC: sklearn `roc_auc_score` for torch-rechub; ours is "
              "`metrics[\"test\"][task][\"auc\"]`, cross-checked against sklearn on the reloaded best model "
              f"(max |difference| {meta['max_ours_sklearn_diff']:.1e}). Raw per-seed results: `{a['out_json']}` "
              "(JSON, not committed).",
              "", END]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    base = load_config(EXAMPLES / "base.yaml")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5, help="epochs for both, all run (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=base.train.batch_size, help="default: the config's")
    ap.add_argument("--lr", type=float, default=base.train.lr, help="default: the config's")
    ap.add_argument("--weight-decay", type=float, default=base.train.weight_decay, help="default: the config's")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated (default %(default)s)")
    ap.add_argument("--archs", default=",".join(ALL_ARCHS), help="comma-separated subset of " + ",".join(ALL_ARCHS))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both (default %(default)s)")
    ap.add_argument("--data-dir", default=None, help="census-income directory (sets MTRANK_DATA_DIR)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, first seed only")
    ap.add_argument("--out-json", default="/tmp/census_peer.json")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to update")
    ap.add_argument("--no-docs", action="store_true", help="do not touch the docs file")
    ap.add_argument("--render", metavar="JSON", help="only re-render the docs section from a finished run's JSON")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in args.archs if a not in ALL_ARCHS]
    if bad:
        ap.error(f"--archs: unknown {bad}; choose from {ALL_ARCHS}")
    if args.quick:
        args.epochs, args.seeds = 1, args.seeds[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        section = render(saved["summary"], saved["meta"], list(saved["results"][0]["test_auc"]))
        print(section)
        if not args.no_docs:
            write_docs(Path(args.docs), section, START, END)
        return 0
    if args.data_dir:
        os.environ["MTRANK_DATA_DIR"] = str(Path(args.data_dir).resolve())
    if os.environ.get("OPENBLAS_CORETYPE"):
        log("warning: OPENBLAS_CORETYPE is set; run with `env -u OPENBLAS_CORETYPE` (it slows numpy here)")
    torch.set_num_threads(args.threads)
    silence_rechub_tqdm()
    from importlib.metadata import version

    import torch_rechub

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    base = load_config(EXAMPLES / "base.yaml", ours_overrides(args, args.seeds[0]))
    log(f"encoding census-income with our pipeline for the peer (data: {base.data.resolve(base.data.train[0])})")
    data = PeerData(base)
    ref_schema = json.loads(json.dumps(data.schema.to_dict()))
    log(f"prepared in {data.prepare_seconds:.1f}s: train {len(data.labels('train'))}, validation "
        f"{len(data.labels('validation'))}, test {len(data.labels('test'))}; {len(data.id_feats)} categorical, "
        f"{len(data.dense_feats)} numeric")
    test_inputs, test_labels = data.splits["test"].inputs, data.labels("test")

    results: list[dict[str, Any]] = []
    for seed in args.seeds:
        for arch in args.archs:
            log(f"ours   {arch:<13} seed {seed}")
            r = run_ours(args, arch, seed, test_inputs, test_labels, ref_schema)
            results.append(r)
            log(f"  ours   {arch} seed {seed}: test auc " + " ".join(f"{t}={v:.4f}" for t, v in r["test_auc"].items())
                + f" | {r['rows_per_s']:,.0f} rows/s | params {r['params']:,} | best epoch {r['best_epoch']}")
            if arch == "single":
                continue
            log(f"rechub {arch:<13} seed {seed}")
            r = run_rechub(args, arch, seed, data, PeerSettings.budget(args))
            results.append(r)
            log(f"  rechub {arch} seed {seed}: test auc " + " ".join(f"{t}={v:.4f}" for t, v in r["test_auc"].items())
                + f" | {r['rows_per_s']:,.0f} rows/s | params {r['params']:,} | best epoch {r['best_epoch']}")
            Path(args.out_json).write_text(json.dumps({"partial": True, "results": results}, indent=1))

    tasks = data.task_names
    summary = summarize(results, args.archs, tasks)
    max_diff = max((abs(r["test_auc"][t] - r["test_auc_sklearn"][t]) for r in results if r["impl"] == "ours"
                    for t in tasks), default=0.0)
    cmd_args = [a for a in (sys.argv[1:] if argv is None else argv)]
    meta = {
        "command": "env -u OPENBLAS_CORETYPE python benchmarks/census_peer.py" + (" " + shlex.join(cmd_args) if cmd_args else ""),
        "args": {k: v for k, v in vars(args).items()},
        "finished": time.strftime("%Y-%m-%d %H:%M %Z"),
        "total_minutes": (time.perf_counter() - t_start) / 60,
        "machine": (f"{platform.machine()} Linux, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                    f"torch {torch.__version__}, torch-rechub {version('torch-rechub')}, numpy {np.__version__}"),
        "loadavg_start": "/".join(f"{x:.1f}" for x in load_start),
        "loadavg_end": "/".join(f"{x:.1f}" for x in os.getloadavg()),
        "openblas_coretype_set": bool(os.environ.get("OPENBLAS_CORETYPE")),
        "rows": {k: len(v) for k, v in data.splits.items()},
        "n_sparse": len(data.id_feats), "n_dense": data.schema.n_dense("request"),
        "model": base.model.model_dump(mode="json"),
        "max_ours_sklearn_diff": max_diff,
        "torch_rechub_path": str(Path(torch_rechub.__file__).parent),
    }
    Path(args.out_json).write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=1))
    section = render(summary, meta, tasks)
    print(section)
    if not args.no_docs:
        write_docs(Path(args.docs), section, START, END)
        log(f"updated {args.docs}")
    log(f"raw results: {args.out_json}; total {meta['total_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
