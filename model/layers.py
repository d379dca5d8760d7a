"""Building blocks: the shared embedding, batched expert MLPs and softmax gates.

Notation in shape comments: B batch, S id slots, F fields, D embedding dim, n experts,
I input width, H hidden width, T tasks, m experts visible to one gate.
"""

from __future__ import annotations

import math

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

    Input [B, I] (every MLP sees the same input: the first layer is one GEMM over all n) or
    [n, B, I] (each its own input: one bmm). Output [n, B, H_last]. Each hidden layer is
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b, norm) in enumerate(zip(self.weights, self.biases, self.norms)):
            if x.dim() == 2:  # shared input [B, I]: one GEMM against all n weight matrices
                n, a, h = w.shape
                y = (x @ w.permute(1, 0, 2).reshape(a, n * h)).view(-1, n, h).transpose(0, 1)  # [n, B, H]
            else:  # per-MLP input [n, B, I]
                y = torch.bmm(x, w)  # [n, B, H]
            x = y + b
            if i < self.n_layers - 1 or self.last_activation:
                x = self.dropout(torch.relu(norm(x)))
        return x


class Gate(nn.Module):
    """Softmax gate over ``m`` experts: input [B, I] -> weights [B, m] (rows sum to 1).

    ``expert_dropout`` p (training only): each row drops each expert with probability p and renormalises
    over the experts it kept; a row that would drop every expert keeps them all.
    """

    def __init__(self, in_dim: int, n_experts: int, temperature: float = 1.0, expert_dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)
        self.temperature = temperature
        self.expert_dropout = expert_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.linear(x) / self.temperature, dim=-1)
        if self.training and self.expert_dropout > 0:
            keep = torch.rand_like(w) >= self.expert_dropout  # [B, m]
            keep = keep | ~keep.any(dim=1, keepdim=True)
            w = w * keep
            w = w / w.sum(dim=1, keepdim=True)
        return w


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """weights [B, m], experts [m, B, H] -> [B, H]."""
    return torch.einsum("bm,mbh->bh", weights, experts)
