"""Building blocks: the shared embedding, the split first-layer input, batched expert MLPs and softmax gates.

Notation in shape comments: B batch, S id slots, F fields, D embedding dim, n experts,
I input width (Ir request part + Ii item part), H hidden width, T tasks, m experts visible to one gate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from mtrank.encoding import FittedSchema, Group


class FeatureEmbedding(nn.Module):
    """One embedding table for every categorical feature; pools multi-valued fields.

    ``forward(group, ids)``: ids int64 [B, S] (global rows, 0 = padding) -> [B, F * D].
    """

    def __init__(self, schema: FittedSchema, dim: int):
        super().__init__()
        self.dim = dim
        self.table = nn.Embedding(schema.table_size, dim, padding_idx=0)
        nn.init.normal_(self.table.weight, std=0.05)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.pooled: dict[str, bool] = {}
        for group in ("request", "item"):
            feats = schema.id_features(group)
            if not feats or all(f.n_slots == 1 for f in feats):
                self.pooled[group] = False
                continue
            # Pool matrix P [S, F]: slot s belongs to field f. Mean fields divide by the count.
            fields = schema.slot_fields(group)
            pool = torch.zeros(len(fields), len(feats))
            pool[torch.arange(len(fields)), torch.tensor(fields)] = 1.0
            mean = torch.tensor([f.kind == "multi_categorical" and f.pooling == "mean" for f in feats])
            self.register_buffer(f"{group}_pool", pool, persistent=False)
            self.register_buffer(f"{group}_mean", mean, persistent=False)
            self.pooled[group] = True

    def forward(self, group: Group, ids: torch.Tensor) -> torch.Tensor:
        emb = self.table(ids)  # [B, S, D]
        if not self.pooled[group]:
            return emb.flatten(1)  # [B, S * D]
        pool: torch.Tensor = getattr(self, f"{group}_pool")  # [S, F]
        mean: torch.Tensor = getattr(self, f"{group}_mean")  # [F]
        present = (ids != 0).to(emb.dtype)  # [B, S]; padding rows are zero anyway
        summed = torch.matmul(emb.transpose(1, 2), pool)  # [B, D, F]
        counts = torch.matmul(present, pool).clamp_min(1.0)  # [B, F]
        denom = torch.where(mean, counts, torch.ones_like(counts))
        return (summed / denom.unsqueeze(1)).transpose(1, 2).flatten(1)  # [B, F * D]


class SplitInput(NamedTuple):
    """The first layer's input x = [request, item] [B, I], kept as its two parts and never materialised.

    ``request`` [Br, Ir] with Br = 1 (serving: one request for every candidate) or B; ``item`` [B, Ii];
    ``request_dim`` = Ir as a Python int (from the schema, so that an ONNX export folds the weight slices
    into constants). A linear layer reads it as ``request @ W[:Ir] + item @ W[Ir:]``: the request's share
    of the multiply-adds is done once per request row and broadcast-added over the candidates, and the
    result equals ``cat([request.expand(B, -1), item], 1) @ W`` up to float rounding.
    """

    request: torch.Tensor
    item: torch.Tensor
    request_dim: int

    def matmul(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w (+ bias) for w [I, H], bias [H] -> [B, H]; the bias joins the request's product, at its batch.

        ``addmm``, so the export is one ONNX ``Gemm`` whose addend C is the request's product (broadcast from
        [Br, H]): ONNX Runtime adds it while it writes the product, and fuses a ReLU that follows (FusedGemm), where
        a MatMul then an Add each make a pass over [B, H]."""
        r = self.request @ w[: self.request_dim]  # [Br, H]
        return torch.addmm(r if bias is None else r + bias, self.item, w[self.request_dim :])  # [Br, H] + [B, H]

    def cat(self) -> torch.Tensor:
        """The concatenated x [B, I] (request rows broadcast over the candidates)."""
        return torch.cat([self.request.expand(self.item.shape[0], -1), self.item], dim=1)


class BatchedBatchNorm(nn.Module):
    """Batch normalisation of n MLPs' activations [n, B, H], per (member, unit), over the batch."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(n * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b, h = x.shape
        y = self.bn(x.transpose(0, 1).reshape(b, n * h))  # [B, n * H]
        return y.view(b, n, h).transpose(0, 1)  # [n, B, H]


class BatchedMLP(nn.Module):
    """``n`` independent MLPs (experts, towers) evaluated together.

    Input [B, I] or a ``SplitInput`` (every MLP sees the same input: the first layer is one GEMM over all n,
    two for a split input) or [n, B, I] (each its own input: one bmm). Output [n, B, H_last]. Each hidden layer is
    linear -> (batch norm) -> ReLU -> (dropout); the last layer skips all three when
    ``last_activation`` is false (a tower's logit).
    """

    def __init__(self, n: int, in_dim: int, hidden: list[int], dropout: float = 0.0, last_activation: bool = True,
                 batch_norm: bool = False):
        super().__init__()
        self.n = n
        dims = [in_dim, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        self.n_layers = len(hidden)
        self.last_activation = last_activation
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.empty(n, a, b)
            for k in range(n):  # Kaiming-uniform per expert, like nn.Linear
                nn.init.kaiming_uniform_(w[k].T, a=math.sqrt(5))
            self.weights.append(nn.Parameter(w))
            bound = 1.0 / math.sqrt(a)
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-bound, bound)))
            activated = i < self.n_layers - 1 or last_activation
            self.norms.append(BatchedBatchNorm(n, b) if batch_norm and activated else nn.Identity())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor | SplitInput) -> torch.Tensor:
        for i, (w, b, norm) in enumerate(zip(self.weights, self.biases, self.norms)):
            n, a, h = w.shape
            activated = i < self.n_layers - 1 or self.last_activation
            if isinstance(x, SplitInput):  # shared input, split: two GEMMs against all n weight matrices
                flat = w.permute(1, 0, 2).reshape(a, n * h)  # [I, n * H]
                y = x.matmul(flat, b.reshape(n * h))  # [B, n * H]
                if activated and isinstance(norm, nn.Identity):  # activation before the transpose (elementwise:
                    y, activated = self.dropout(torch.relu(y)), False  # the same values), so Gemm and ReLU fuse
                x = y.view(-1, n, h).transpose(0, 1)  # [n, B, H]
            elif x.dim() == 2:  # shared input [B, I]: one GEMM against all n weight matrices
                x = (x @ w.permute(1, 0, 2).reshape(a, n * h)).view(-1, n, h).transpose(0, 1) + b  # [n, B, H]
            else:  # per-MLP input [n, B, I]
                x = torch.bmm(x, w) + b  # [n, B, H]
            if activated:
                x = self.dropout(torch.relu(norm(x)))
        return x


class Gate(nn.Module):
    """Softmax gate over ``m`` experts: input [B, I] or a ``SplitInput`` -> weights [B, m] (rows sum to 1).

    ``expert_dropout`` p (training only): each row drops each expert with probability p and renormalises
    over the experts it kept; a row that would drop every expert keeps them all.
    """

    def __init__(self, in_dim: int, n_experts: int, temperature: float = 1.0, expert_dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)
        self.temperature = temperature
        self.expert_dropout = expert_dropout

    def forward(self, x: torch.Tensor | SplitInput) -> torch.Tensor:
        lin = self.linear
        logits = x.matmul(lin.weight.T, lin.bias) if isinstance(x, SplitInput) else lin(x)  # [B, m]
        w = torch.softmax(logits / self.temperature, dim=-1)
        if self.training and self.expert_dropout > 0:
            keep = torch.rand_like(w) >= self.expert_dropout  # [B, m]
            keep = keep | ~keep.any(dim=1, keepdim=True)
            w = w * keep
            w = w / w.sum(dim=1, keepdim=True)
        return w


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """weights [B, m], experts [m, B, H] -> [B, H]: sum_i weights[:, i] * experts[i].

    A batched matmul ([B, 1, m] @ [B, m, H]), not an einsum: ONNX Runtime runs the exported Einsum about 3x
    slower than MatMul plus the transpose (0.45 vs 0.13 ms for m = 8, B = 500, H = 128, one thread)."""
    return torch.matmul(weights.unsqueeze(1), experts.transpose(0, 1)).squeeze(1)
