"""Two "straightforward" peers of mtrank's ``POST /rank`` for the head-to-head HTTP benchmark (issue 9).

Both load the SAME trained run directory as ``mtrank export`` does (``model.pt``, ``config.yaml``, ``schema.json``;
``model.train.load_run``), serve the same JSON contract as ``service.schemas.RankRequest`` / ``RankResponse`` and
share one handler (``make_app``), written the way the common FastAPI + PyTorch tutorials write it:

* pydantic request and response models (a ``Candidate`` model per candidate; ``response_model=`` on the route, so
  FastAPI validates and serialises the response), a plain ``def`` route (FastAPI runs it in its thread pool);
* one feature dict per candidate (context, user id, the candidate's features and item id merged), then per schema
  feature a column over the candidates, encoded with mtrank's own vectorised ``FeatureEncoder.encode_all(columns,
  n)``: the same hashing and numeric transforms, the request features repeated for every candidate (no
  request/item split);
* the model on those rows -> probabilities per task; the fused score is mtrank's default profile
  (``service.fusion.default_weights`` / ``weighted_sum``: weight 1 on every binary task) over the UNCALIBRATED
  probabilities (a run directory holds no calibration: mtrank fits it at export); stable sort, top k, response.

The models (``Peer.predict``):

* ``naive_app``  (b) eager PyTorch under ``torch.no_grad()`` (torch's default threads): the packed embedding
  table, then per extraction level a Python loop over an ``nn.ModuleList`` of expert MLPs (``nn.Sequential`` of
  ``nn.Linear`` + ReLU), gates as ``nn.Linear`` + softmax, ``torch.stack`` of the expert outputs, a weighted sum,
  one tower ``nn.Sequential`` per task; the input row is the concatenation [request..., item...] per candidate.
* ``rechub_app`` (c) torch-rechub's ``MMOE`` (``PLE`` for ple / cgc runs) carrying our weights (one embedding table
  per ``SparseFeature``, sliced from our packed table at the feature's offset; first-layer columns permuted to
  rechub's input order [sparse embeddings..., dense...]; rechub's BatchNorm1d made the identity, or copied when the
  run has batch norm), exported by ``export_rechub`` with torch-rechub's own ``ONNXExporter`` and run by an
  ``onnxruntime.InferenceSession`` with default session options. The server never imports torch (this module
  imports it lazily).

``parity(run_dir, onnx_path, bundle_dir, bodies)`` compares both with the mtrank bundle exported from the same run
(raw outputs ``p_<task>`` through ``service.scorer.Model``). Only architectures with extraction levels (mmoe, cgc,
ple), single-valued categorical features and unchained binary tasks are supported.

Run from the repository root (``PEER_RUN_DIR``: the run directory; ``PEER_ONNX``: the file ``export_rechub``
wrote; ``benchmarks/serve_peers.py`` does all of this itself)::

    PEER_RUN_DIR=/tmp/prod/run_mmoe python -m uvicorn --factory benchmarks.peer_services:naive_app --port 8001
    python -c "from benchmarks.peer_services import export_rechub; export_rechub('/tmp/prod/run_mmoe', '/tmp/r.onnx')"
    PEER_RUN_DIR=/tmp/prod/run_mmoe PEER_ONNX=/tmp/r.onnx \\
        python -m uvicorn --factory benchmarks.peer_services:rechub_app --port 8002
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from fastapi import FastAPI
from pydantic import BaseModel

from mtrank.config import Config, parse_config
from mtrank.encoding import FeatureEncoder, FittedSchema
from service.fusion import default_weights, weighted_sum

if TYPE_CHECKING:
    from torch import nn

    from model.layers import BatchedMLP, Gate

ENV_RUN, ENV_ONNX = "PEER_RUN_DIR", "PEER_ONNX"
PARITY_TOL = 1e-4
Predict = Callable[[dict[str, np.ndarray]], np.ndarray]  # encoded row-aligned inputs -> probabilities [T, n]


# ----------------------------------------------------------------------------------- the contract


class Candidate(BaseModel):
    item_id: str
    features: dict[str, Any] = {}


class RankRequest(BaseModel):
    request_id: str | None = None
    user_id: str | None = None
    context: dict[str, Any] = {}
    candidates: list[Candidate]
    top_k: int | None = None
    return_task_scores: bool = True


class RankedItem(BaseModel):
    item_id: str
    rank: int
    score: float
    task_scores: dict[str, float] | None = None


class RankResponse(BaseModel):
    request_id: str
    model_version: str
    fusion: str
    arm: str | None
    degraded: bool = False
    items: list[RankedItem]


# ------------------------------------------------------------------------------------ the handler


def read_run(run_dir: str | Path) -> tuple[Config, FittedSchema]:
    """A run's config and schema, read as ``model.train.load_run`` reads them (without torch)."""
    run = Path(run_dir)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    cfg = parse_config(raw, base_dir=raw["data"].get("base_dir", "."))
    return cfg, FittedSchema.from_dict(json.loads((run / "schema.json").read_text()))


def task_names(cfg: Config) -> list[str]:
    if any(t.chain is not None or t.type != "binary" for t in cfg.tasks):
        raise NotImplementedError("the peers serve unchained binary tasks only")
    return [t.name for t in cfg.tasks]


class Peer:
    """What the handler needs: the schema's encoder, the task names, the fusion and a model (``predict``)."""

    def __init__(self, version: str, cfg: Config, schema: FittedSchema, predict: Predict) -> None:
        if any(f.kind == "multi_categorical" for f in schema.features):
            raise NotImplementedError("the peers take single-valued features only")
        self.version = version
        self.schema = schema
        self.tasks = task_names(cfg)
        self.encoder = FeatureEncoder(schema)
        self.fusion = weighted_sum("default", default_weights([(t, "binary", False) for t in self.tasks]), set(self.tasks))
        self.predict = predict

    def probabilities(self, req: RankRequest) -> np.ndarray:
        """Per-task probabilities [T, n]: one merged feature dict per candidate -> columns -> encode -> model."""
        rows = [{**req.context, "user_id": req.user_id, **c.features, "item_id": c.item_id} for c in req.candidates]
        columns = {f.name: [row.get(f.name) for row in rows] for f in self.schema.features}
        return self.predict(self.encoder.encode_all(columns, len(rows)))


def make_app(peer: Peer) -> FastAPI:
    app = FastAPI(title=f"/rank peer ({peer.version})")

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/rank", response_model=RankResponse)
    def rank(req: RankRequest) -> dict[str, Any]:
        probs = peer.probabilities(req)
        scores = {t: probs[k].astype(np.float64) for k, t in enumerate(peer.tasks)}
        fused = peer.fusion(scores, len(req.candidates))
        order = np.argsort(-fused, kind="stable")[: req.top_k]
        items = [{"item_id": req.candidates[i].item_id, "rank": r, "score": float(fused[i]),
                  "task_scores": {t: float(scores[t][i]) for t in peer.tasks} if req.return_task_scores else None}
                 for r, i in enumerate(order.tolist(), 1)]
        return {"request_id": req.request_id or uuid.uuid4().hex, "model_version": peer.version, "fusion": "default",
                "arm": "default", "degraded": False, "items": items}

    return app


# ------------------------------------------------------------------------------------- (b) naive


def naive_peer(run_dir: str | Path) -> Peer:
    import torch

    from model.train import load_run

    cfg, schema, model = load_run(run_dir)
    net = naive_net(model).eval()

    def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return net({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    return Peer(f"naive:{Path(run_dir).name}", cfg, schema, predict)


def _linear(src: BatchedMLP, i: int, k: int, perm: Sequence[int] | None = None) -> nn.Linear:
    """Layer i of member k of our batched MLP as an ``nn.Linear`` (input rows permuted by ``perm``)."""
    from torch import nn

    w = src.weights[i][k].detach()  # [in, out]
    lin = nn.Linear(*w.shape)
    lin.weight.data.copy_((w if perm is None else w[list(perm)]).T)
    lin.bias.data.copy_(src.biases[i][k, 0])
    return lin


def _copy_norm(dst: nn.BatchNorm1d, src: BatchedMLP, i: int, k: int) -> None:
    """dst := the batch norm of member k at layer i, or the identity where our model has none."""
    from torch import nn

    ours = src.norms[i]
    h = dst.num_features
    if isinstance(ours, nn.Identity):
        dst.weight.data.fill_(1.0)
        dst.bias.data.zero_()
        dst.running_mean.zero_()
        dst.running_var.fill_(1.0 - dst.eps)  # (x - 0) / sqrt(1 - eps + eps) = x
        return
    bn = ours.bn
    rows = slice(k * h, (k + 1) * h)
    dst.eps = bn.eps
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).data.copy_(getattr(bn, name)[rows])


def _gate(g: Gate, perm: Sequence[int] | None = None) -> nn.Linear:
    """Our gate's logits layer with its temperature folded in (softmax follows)."""
    from torch import nn

    w = g.linear.weight.detach()  # [m, I]
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.weight.data.copy_((w if perm is None else w[:, list(perm)]) / g.temperature)
    lin.bias.data.copy_(g.linear.bias / g.temperature)
    return lin


def naive_mlp(src: BatchedMLP, k: int) -> nn.Sequential:
    """Member k of our batched MLP as ``nn.Sequential(Linear, [BatchNorm1d,] ReLU, ...)``."""
    from torch import nn

    layers: list[nn.Module] = []
    for i in range(src.n_layers):
        layers.append(_linear(src, i, k))
        if i < src.n_layers - 1 or src.last_activation:
            if not isinstance(src.norms[i], nn.Identity):
                norm = nn.BatchNorm1d(src.weights[i].shape[2])
                _copy_norm(norm, src, i, k)
                layers.append(norm)
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def naive_net(model: Any) -> nn.Module:
    """Our trained ``MultiTaskRanker`` rebuilt as the tutorial model (torch is imported here, not at module import,
    so the ONNX peer's server never loads it)."""
    import torch
    from torch import nn

    if model.body is not None or model.embedding.pooled.get("request") or model.embedding.pooled.get("item"):
        raise NotImplementedError("naive peer: mmoe / cgc / ple with single-valued features only")

    class Level(nn.Module):
        def __init__(self, lvl: Any) -> None:
            super().__init__()
            te, se = lvl.task_experts, lvl.shared_experts
            self.tasks = lvl.T
            self.task_experts = nn.ModuleList(naive_mlp(te, k) for k in range(te.n)) if te is not None else nn.ModuleList()
            self.shared_experts = nn.ModuleList(naive_mlp(se, k) for k in range(se.n)) if se is not None else nn.ModuleList()
            self.gates = nn.ModuleList(_gate(g) for g in lvl.gates)
            self.shared_gate = _gate(lvl.shared_gate) if lvl.shared_gate is not None else None

        def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
            """xs: T + 1 inputs (task k's, then the shared one) -> T outputs (+ the shared one)."""
            per = len(self.task_experts) // self.tasks
            task_outs = [expert(xs[j // per]) for j, expert in enumerate(self.task_experts)]
            shared_outs = [expert(xs[-1]) for expert in self.shared_experts]
            outs = []
            for k, gate in enumerate(self.gates):
                experts = torch.stack(task_outs[k * per:(k + 1) * per] + shared_outs, dim=1)  # [B, m, H]
                weights = torch.softmax(gate(xs[k]), dim=-1)  # [B, m]
                outs.append((weights.unsqueeze(-1) * experts).sum(dim=1))  # [B, H]
            if self.shared_gate is not None:
                experts = torch.stack(task_outs + shared_outs, dim=1)
                weights = torch.softmax(self.shared_gate(xs[-1]), dim=-1)
                outs.append((weights.unsqueeze(-1) * experts).sum(dim=1))
            return outs

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding.from_pretrained(model.embedding.table.weight.detach().clone())
            self.levels = nn.ModuleList(Level(lvl) for lvl in model.levels)
            self.towers = nn.ModuleList(naive_mlp(model.towers, k) for k in range(model.towers.n))

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            parts = []
            for g in ("request", "item"):
                if f"{g}_ids" in inputs:
                    parts.append(self.embedding(inputs[f"{g}_ids"]).flatten(1))  # [B, F * D]
                if f"{g}_dense" in inputs:
                    parts.append(inputs[f"{g}_dense"])
            x = torch.cat(parts, dim=1)  # [B, I]
            xs = [x] * (len(self.towers) + 1)
            for level in self.levels:
                xs = level(xs)
            return torch.stack([torch.sigmoid(tower(h)).squeeze(-1) for tower, h in zip(self.towers, xs)])  # [T, B]

    return Net()


# ------------------------------------------------------------------------------ (c) torch-rechub


def rechub_permutation(schema: FittedSchema, dim: int) -> list[int]:
    """For each input column of rechub's first layers ([every sparse embedding..., every dense value...], schema
    order within each), its column in ours ([request embeddings, request dense, item embeddings, item dense])."""
    ours: dict[str, range] = {}
    at = 0
    for g in ("request", "item"):
        for f in schema.id_features(g) + schema.dense_features(g):
            width = dim if f.kind == "categorical" else f.width
            ours[f.name] = range(at, at + width)
            at += width
    order = [f for f in schema.features if f.kind == "categorical"] + [f for f in schema.features if f.kind == "numeric"]
    return [c for f in order for c in ours[f.name]]


def export_rechub(run_dir: str | Path, path: str | Path) -> Path:
    """Our run's weights in torch-rechub's MMOE / PLE, exported with torch-rechub's ``ONNXExporter`` to ``path``."""
    import torch
    from torch import nn
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE, PLE
    from torch_rechub.utils.onnx_export import ONNXExporter

    from model.train import load_run

    cfg, schema, model = load_run(run_dir)
    m, tasks = cfg.model, task_names(cfg)
    if any(f.kind == "multi_categorical" for f in schema.features):
        raise NotImplementedError("rechub peer: single-valued features only")
    features = [SparseFeature(f.name, f.size, m.embedding_dim) if f.kind == "categorical" else DenseFeature(f.name, f.width)
                for f in schema.features]
    expert = {"dims": list(m.expert_hidden), "dropout": m.dropout}
    towers = [{"dims": list(m.tower_hidden), "dropout": m.dropout} for _ in tasks]
    types = ["classification"] * len(tasks)
    perm = rechub_permutation(schema, m.embedding_dim)

    def copy_mlp(dst: nn.Module, src: BatchedMLP, k: int, first: Sequence[int] | None) -> None:
        linears = [x for x in dst.mlp if isinstance(x, nn.Linear)]
        for i, lin in enumerate(linears):
            lin.load_state_dict(_linear(src, i, k, first if i == 0 else None).state_dict())
        for i, norm in enumerate(x for x in dst.mlp if isinstance(x, nn.BatchNorm1d)):
            _copy_norm(norm, src, i, k)

    def copy_gate(dst: nn.Module, g: Gate, first: Sequence[int] | None) -> None:
        dst.mlp[0].load_state_dict(_gate(g, first).state_dict())
        norm = dst.mlp[1]
        norm.weight.data.fill_(1.0)
        norm.bias.data.zero_()
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)

    if m.arch == "mmoe":
        net: nn.Module = MMOE(features, types, m.n_experts, expert, towers)
        src = model.levels[0]
        for k, e in enumerate(net.experts):
            copy_mlp(e, src.shared_experts, k, perm)
        for dst, g in zip(net.gates, src.gates):
            copy_gate(dst, g, perm)
    elif m.arch in ("cgc", "ple"):
        net = PLE(features, types, len(model.levels), m.n_task_experts, m.n_shared_experts, expert, towers)
        for level, (cgc, src) in enumerate(zip(net.cgc_layers, model.levels)):
            first = perm if level == 0 else None
            for k, e in enumerate(cgc.experts_specific):
                copy_mlp(e, src.task_experts, k, first)
            for k, e in enumerate(cgc.experts_shared):
                copy_mlp(e, src.shared_experts, k, first)
            for dst, g in zip(cgc.gates_specific, src.gates):
                copy_gate(dst, g, first)
            if src.shared_gate is not None:
                copy_gate(cgc.gate_shared, src.shared_gate, first)
    else:
        raise NotImplementedError(f"rechub peer: arch {m.arch!r}")
    with torch.no_grad():
        for f in schema.features:
            if f.kind == "categorical":
                net.embedding.embed_dict[f.name].weight.copy_(model.embedding.table.weight[f.offset:f.offset + f.size])
    for k, tower in enumerate(net.towers):
        copy_mlp(tower, model.towers, k, None)
    net.eval()
    ONNXExporter(net).export(str(path))
    return Path(path)


def rechub_peer(run_dir: str | Path, onnx_path: str | Path) -> Peer:
    import onnxruntime as ort

    cfg, schema = read_run(run_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    layout: list[tuple[str, str, int, int, int]] = []  # rechub input, encoded array, first column, width, offset
    for g in ("request", "item"):
        for col, f in enumerate(schema.id_features(g)):
            layout.append((f.name, f"{g}_ids", col, 1, f.offset))
        col = 0
        for f in schema.dense_features(g):
            layout.append((f.name, f"{g}_dense", col, f.width, 0))
            col += f.width

    def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[key][:, col] - offset if key.endswith("_ids") else np.ascontiguousarray(inputs[key][:, col:col + w])
                for name, key, col, w, offset in layout}  # per feature: local ids [n] or values [n, width]
        return session.run(None, feed)[0].T  # [n, T] -> [T, n]

    return Peer(f"rechub:{Path(run_dir).name}", cfg, schema, predict)


# ---------------------------------------------------------------------------------------- serving


def naive_app() -> FastAPI:
    return make_app(naive_peer(os.environ[ENV_RUN]))


def rechub_app() -> FastAPI:
    return make_app(rechub_peer(os.environ[ENV_RUN], os.environ[ENV_ONNX]))


# ----------------------------------------------------------------------------------------- parity


def parity(run_dir: str | Path, onnx_path: str | Path, bundle_dir: str | Path, bodies: Sequence[bytes],
           tol: float = PARITY_TOL) -> dict[str, Any]:
    """Max |p_peer - p_mtrank| per task over ``bodies`` (/rank JSON), for (b) and (c), against the raw outputs
    ``p_<task>`` of the mtrank bundle (``service.scorer.Model``, the service's own encoding and session)."""
    from service.feature_store import StoreResult
    from service.scorer import Model, RankInput
    from service.settings import FusionSettings, OnnxSettings

    ref = Model.load(Path(bundle_dir), OnnxSettings(), FusionSettings())
    peers = {"naive": naive_peer(run_dir), "rechub": rechub_peer(run_dir, onnx_path)}
    diff = {name: dict.fromkeys(peer.tasks, 0.0) for name, peer in peers.items()}
    candidates = 0
    for body in bodies:
        req = RankRequest.model_validate_json(body)
        candidates += len(req.candidates)
        inp = RankInput(req.user_id, req.context, [c.item_id for c in req.candidates], [c.features for c in req.candidates])
        raw = ref.score(inp, StoreResult()).raw
        for name, peer in peers.items():
            probs = peer.probabilities(req)
            for k, t in enumerate(peer.tasks):
                diff[name][t] = max(diff[name][t], float(np.max(np.abs(probs[k] - raw[t]))))
    return {"requests": len(bodies), "candidates": candidates, "tolerance": tol, "reference": ref.version,
            "max_abs_diff": diff, "ok": all(v <= tol for d in diff.values() for v in d.values())}
