"""Multi-task rankers: single-task baseline, Shared-Bottom, MMoE, CGC and PLE, with ESMM chains.

All architectures share the input layer (one embedding table) and the output layer (one batched tower
per task). They differ in the body that turns the input x [B, I] into one representation per task [T, B, H]:

* ``single``        T independent MLPs (one batched MLP with T members)
* ``shared_bottom`` one MLP, its output shared by every tower
* ``mmoe``          n shared experts, one softmax gate per task over all of them
* ``cgc`` / ``ple`` per-task experts + shared experts at each of L extraction levels (CGC: L = 1).
  At each level, task k's gate mixes task k's experts and the shared experts; the shared gate
  (levels before the last) mixes all experts. Level l+1's task-k experts read task k's output of
  level l, its shared experts read the shared output (Tang et al., RecSys 2020, Fig. 5).

ESMM chains: a task with ``chain {parent, head}`` scores p(task) = p(parent) * p(head); its tower
is the head, trained only through the product on all impressions.

Split first layer: with request and item inputs, x = [request, item] is never built. Every layer that
reads x (the first layer of the bottom, of the experts and of the level-0 task experts, and the level-0
gates) computes ``request @ W_r + item @ W_i`` (``model.layers.SplitInput``) with the request product at
its own batch, 1 at serving, so one request's share of the first layer is computed once, not once per
candidate. W_r and W_i are row slices of the unchanged weights: checkpoints and parameter names are those
of the concatenated form, and outputs equal it up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.layers import BatchedMLP, FeatureEmbedding, Gate, SplitInput, mix
from mtrank.config import ModelConfig, TaskConfig
from mtrank.encoding import FittedSchema


@dataclass(frozen=True)
class GateSpec:
    name: str  # ONNX output name, e.g. "gate_l0_ctr"
    level: int
    owner: str  # task name or "shared"
    experts: tuple[str, ...]


class ExtractionLevel(nn.Module):
    """One CGC level. Input: x [B, I] or a ``SplitInput`` (first level) or per-task inputs [T + 1, B, I]
    (last = shared).

    Output: per-task outputs [T + 1, B, H] with the shared slot when the level has a shared gate (every level but
    the last), else [T, B, H] (nothing reads a shared slot after the last level),
    the gate weights {gate name: [B, m]} and the shared experts' outputs [n_shared, B, H] (or None).

    Task experts and shared experts are two batched MLPs, not one packed tensor, so that the
    parameters every task's loss reaches stay separable from those only one task's loss reaches
    (``MultiTaskRanker.parameter_groups``). Expert order in the gates: task experts, then shared.
    """

    def __init__(self, level: int, tasks: list[str], n_task: int, n_shared: int, in_dim: int, cfg: ModelConfig,
                 shared_gate: bool, shared_only_names: bool = False):
        super().__init__()
        self.level, self.tasks, self.T = level, tasks, len(tasks)
        n_total = self.T * n_task + n_shared
        mlp = dict(in_dim=in_dim, hidden=cfg.expert_hidden, dropout=cfg.dropout, batch_norm=cfg.batch_norm)
        self.task_experts = BatchedMLP(self.T * n_task, **mlp) if n_task else None
        self.shared_experts = BatchedMLP(n_shared, **mlp) if n_shared else None
        self.out_dim = cfg.expert_hidden[-1]
        shared_names = [f"expert{i}" if shared_only_names else f"shared{i}" for i in range(n_shared)]
        self.expert_names = [f"{t}{i}" for t in tasks for i in range(n_task)] + shared_names
        # Which per-task input slot each task expert reads at levels after the first: task k's experts read slot k.
        self.register_buffer("task_input", torch.arange(self.T).repeat_interleave(n_task), persistent=False)
        shared_idx = list(range(self.T * n_task, n_total))
        self.selections = [list(range(k * n_task, (k + 1) * n_task)) + shared_idx for k in range(self.T)]
        self.full_selection = [sel == list(range(n_total)) for sel in self.selections]
        for k, sel in enumerate(self.selections):
            self.register_buffer(f"sel{k}", torch.tensor(sel), persistent=False)
        gate = dict(temperature=cfg.gate_temperature, expert_dropout=cfg.expert_dropout)
        self.gates = nn.ModuleList(Gate(in_dim, len(sel), **gate) for sel in self.selections)
        self.shared_gate = Gate(in_dim, n_total, **gate) if shared_gate else None
        self.gate_specs = [GateSpec(f"gate_l{level}_{t}", level, t, tuple(self.expert_names[i] for i in sel))
                           for t, sel in zip(tasks, self.selections)]
        if shared_gate:
            self.gate_specs.append(GateSpec(f"gate_l{level}_shared", level, "shared", tuple(self.expert_names)))

    def forward(self, x: torch.Tensor | SplitInput
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        first = isinstance(x, SplitInput) or x.dim() == 2  # first level: every expert and gate reads x
        # (a SplitInput or [B, I]); later levels x [T + 1, B, I]
        parts = []
        if self.task_experts is not None:
            parts.append(self.task_experts(x if first else x.index_select(0, self.task_input)))  # [T * n_task, B, H]
        shared = self.shared_experts(x if first else x[self.T]) if self.shared_experts is not None else None
        if shared is not None:
            parts.append(shared)  # [n_shared, B, H]
        experts = torch.cat(parts) if len(parts) > 1 else parts[0]  # [n, B, H]
        gate_in = [x] * (self.T + 1) if first else list(x.unbind(0))
        gates: dict[str, torch.Tensor] = {}
        outs = []
        for k, gate in enumerate(self.gates):
            w = gate(gate_in[k])  # [B, m]
            gates[self.gate_specs[k].name] = w
            chosen = experts if self.full_selection[k] else experts.index_select(0, getattr(self, f"sel{k}"))
            outs.append(mix(w, chosen))  # [B, H]
        if self.shared_gate is not None:  # every level but the last: the next level's shared experts read it
            w = self.shared_gate(gate_in[self.T])  # [B, n]
            gates[self.gate_specs[-1].name] = w
            outs.append(mix(w, experts))
        return torch.stack(outs), gates, shared  # [T + 1, B, H]; the last level [T, B, H]


@dataclass(frozen=True)
class ParameterGroups:
    """The model's parameters split by which task losses reach them.

    ``shared``: reached by every task's loss (embedding, shared bottom and experts, the gates and task
    experts of PLE levels that feed a shared gate). ``task_specific``: each element reached by one task's
    loss only (towers, last-level task experts and gates); a tensor may pack several tasks' members, but
    never one element of two tasks. ``layer``: the last shared layer feeding the towers (GradNorm's W).
    """

    shared: list[nn.Parameter]
    task_specific: list[nn.Parameter]
    layer: nn.Parameter


class MultiTaskRanker(nn.Module):
    """Scores a candidate batch for every task and returns every gate's weights.

    ``forward(inputs)`` takes ``{"request_ids": [Br, Sr], "request_dense": [Br, Dr], "item_ids": [B, Si],
    "item_dense": [B, Di]}`` (present groups only; Br is 1 or B) and returns a dict with
    ``scores`` {task or chain head: [B]} (probabilities, or values for regression), ``logits``
    {unchained binary task: [B]}, ``gates`` {gate name: [B, m]} and ``representation``, the shared
    representation the task-specific part reads (MGDA's upper bound differentiates through it): the
    bottom's output [1, B, H] (shared_bottom), the last level's shared experts [n, B, H] (mmoe, cgc,
    ple), else the input x [B, I] (built for it; in training mode the first layer then reads slices of
    it, so gradients reach it). Where gates or task experts also read the level's input, their paths
    bypass it, so the bound is the approximation Sener & Koltun describe, not an identity.
    """

    def __init__(self, schema: FittedSchema, tasks: list[TaskConfig], cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.task_cfgs = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.input_names = schema.input_names()
        self.embedding = FeatureEmbedding(schema, cfg.embedding_dim)
        d = cfg.embedding_dim
        self.request_dim = len(schema.id_features("request")) * d + schema.n_dense("request")  # Ir
        in_dim = self.request_dim + len(schema.id_features("item")) * d + schema.n_dense("item")  # I
        self.has_request = any(n.startswith("request") for n in self.input_names)
        self.has_item = any(n.startswith("item") for n in self.input_names)
        T = len(tasks)
        self.levels = nn.ModuleList()
        self.body: nn.Module | None = None
        if cfg.arch == "single":
            self.body = BatchedMLP(T, in_dim, cfg.expert_hidden, cfg.dropout, batch_norm=cfg.batch_norm)
            hidden = self.body.out_dim
        elif cfg.arch == "shared_bottom":
            self.body = BatchedMLP(1, in_dim, cfg.expert_hidden, cfg.dropout, batch_norm=cfg.batch_norm)
            hidden = self.body.out_dim
        elif cfg.arch == "mmoe":
            self.levels.append(ExtractionLevel(0, self.task_names, 0, cfg.n_experts, in_dim, cfg,
                                               shared_gate=False, shared_only_names=True))
            hidden = self.levels[0].out_dim
        else:  # cgc / ple
            n_levels = 1 if cfg.arch == "cgc" else cfg.levels
            dim = in_dim
            for level in range(n_levels):
                lvl = ExtractionLevel(level, self.task_names, cfg.n_task_experts, cfg.n_shared_experts, dim, cfg,
                                      shared_gate=level < n_levels - 1)
                self.levels.append(lvl)
                dim = lvl.out_dim
            hidden = dim
        self.towers = BatchedMLP(T, hidden, [*cfg.tower_hidden, 1], cfg.dropout, last_activation=False,
                                 batch_norm=cfg.batch_norm)
        # MGDA-UB's representation is x itself when no shared layer sits between x and the towers
        self.input_is_representation = cfg.arch == "single" or (
            bool(len(self.levels)) and self.levels[-1].shared_experts is None)
        self.gate_specs = [spec for lvl in self.levels for spec in lvl.gate_specs]
        self.experts = [f"l{lvl.level}.{name}" for lvl in self.levels for name in lvl.expert_names]

    @property
    def output_names(self) -> list[str]:
        """Scored names (tasks and chain heads) in output order."""
        names = list(self.task_names)
        names += [t.chain.head for t in self.task_cfgs if t.chain is not None]
        return names

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | SplitInput:
        """Encoded inputs -> x: a ``SplitInput`` (request [Br, Ir], item [B, Ii]; Br = 1 or B) when both
        groups are present, else x [B, I]."""
        parts = {}
        for g in ("request", "item"):
            p = []
            if f"{g}_ids" in inputs:
                p.append(self.embedding(g, inputs[f"{g}_ids"]))  # [Bg, Fg * D]
            if f"{g}_dense" in inputs:
                p.append(inputs[f"{g}_dense"])  # [Bg, Dg]
            if p:
                parts[g] = torch.cat(p, dim=1) if len(p) > 1 else p[0]
        if "request" in parts and "item" in parts:
            return SplitInput(parts["request"], parts["item"], self.request_dim)
        return next(iter(parts.values()))

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        x = self.features(inputs)  # SplitInput or [B, I]
        full: torch.Tensor | None = None if isinstance(x, SplitInput) else x  # x [B, I], when built
        if self.training and self.input_is_representation and full is None:
            full = x.cat()  # [B, I]: MGDA-UB differentiates through it, so the first layer reads its slices
            x = SplitInput(full[:, : self.request_dim], full[:, self.request_dim :], self.request_dim)
        gates: dict[str, torch.Tensor] = {}
        T = len(self.task_names)
        shared: torch.Tensor | None = None
        if self.cfg.arch == "single":
            reps = self.body(x)  # [T, B, H]
        elif self.cfg.arch == "shared_bottom":
            shared = self.body(x)  # [1, B, H]
            reps = shared.expand(T, -1, -1)  # [T, B, H]
        else:
            h = x
            for lvl in self.levels:
                h, g, shared = lvl(h)  # [T + 1, B, H] ([T, B, H] from the last), {gate: [B, m]}, [n_shared, B, H]
                gates.update(g)
            reps = h  # [T, B, H]
        out = self.towers(reps).squeeze(-1)  # [T, B, 1] -> [T, B]
        scores: dict[str, torch.Tensor] = {}
        logits: dict[str, torch.Tensor] = {}
        for k, t in enumerate(self.task_cfgs):
            if t.type == "regression":
                scores[t.name] = out[k]
            elif t.chain is None:
                logits[t.name] = out[k]
                scores[t.name] = torch.sigmoid(out[k])
        for k, t in enumerate(self.task_cfgs):
            if t.chain is not None:
                head = torch.sigmoid(out[k])  # p(head | parent), e.g. pCVR
                scores[t.chain.head] = head
                scores[t.name] = scores[t.chain.parent] * head  # pCTCVR = pCTR * pCVR
        representation = shared if shared is not None else full if full is not None else x.cat()
        return {"scores": scores, "logits": logits, "gates": gates, "representation": representation}

    def parameter_groups(self) -> ParameterGroups:
        """Shared vs task-specific parameters (see ``ParameterGroups``), from the architecture."""
        shared: list[nn.Parameter] = list(self.embedding.parameters())
        task: list[nn.Parameter] = list(self.towers.parameters())
        layer = self.embedding.table.weight
        if self.body is not None:
            (task if self.cfg.arch == "single" else shared).extend(self.body.parameters())
            if self.cfg.arch == "shared_bottom":
                layer = self.body.weights[-1]
        L = len(self.levels)
        for lvl in self.levels:
            l = lvl.level  # noqa: E741
            if lvl.shared_experts is not None:
                shared.extend(lvl.shared_experts.parameters())
                if l == L - 1:
                    layer = lvl.shared_experts.weights[-1]
            if lvl.shared_gate is not None:
                shared.extend(lvl.shared_gate.parameters())
            if lvl.task_experts is not None:  # below the last level they feed the shared gate
                (shared if l < L - 1 else task).extend(lvl.task_experts.parameters())
            # a task gate feeds its task's experts and gate one level up: shared if those feed a shared gate
            (shared if l < L - 2 else task).extend(lvl.gates.parameters())
        return ParameterGroups(shared=shared, task_specific=task, layer=layer)


class ExportWrapper(nn.Module):
    """Positional inputs in ``input_names`` order -> flat outputs: scores, then gates (for ONNX)."""

    def __init__(self, model: MultiTaskRanker):
        super().__init__()
        self.model = model
        self.output_names = [f"p_{n}" for n in model.output_names] + [g.name for g in model.gate_specs]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(dict(zip(self.model.input_names, args)))
        return tuple(out["scores"][n] for n in self.model.output_names) + tuple(
            out["gates"][g.name] for g in self.model.gate_specs)
