"""Gate health and gate regularisation.

Health (per gate, from its mean weight per expert over a split): an expert is **dead** when its mean
weight is below ``mtrank.metrics.dead_expert_threshold(m)`` (the rule the service's routing check applies,
with its fraction configurable) and **dominant** when it holds more than ``DOMINANT_SHARE`` of the gate's weight.

Regularisation (``train.gates``), summed over every gate, each a mean over the batch:

* entropy:      ``+ weight * H(w)`` (towards confident routing) or ``- weight * H(w)`` (towards spread);
* load balance: ``weight * m * sum_i f_i P_i`` as in Switch Transformer / GShard, with f_i the fraction of
  rows whose top-1 expert is i (no gradient) and P_i the mean gate weight of expert i; 1 when balanced.
"""

from __future__ import annotations

import numpy as np
import torch

from mtrank.config import GateRegularization
from mtrank.metrics import dead_expert_threshold

DOMINANT_SHARE = 0.5


def gate_health(mean: np.ndarray) -> dict[str, list[int]]:
    """Mean weight per expert [m] -> {"dead": [expert index], "dominant": [expert index]}."""
    m = len(mean)
    return {"dead": [int(i) for i in np.flatnonzero(mean < dead_expert_threshold(m))],
            "dominant": [int(i) for i in np.flatnonzero(mean > DOMINANT_SHARE)] if m > 1 else []}


def entropy(w: torch.Tensor) -> torch.Tensor:
    """Row entropies (nats) of gate weights [B, m] -> [B]."""
    return -(w * torch.log(w.clamp_min(1e-12))).sum(dim=1)


def load_balance(w: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss of gate weights [B, m] -> scalar (1 when routing is balanced)."""
    m = w.shape[1]
    top1 = torch.nn.functional.one_hot(w.argmax(dim=1), m).to(w.dtype)  # [B, m]
    return m * (top1.mean(0) * w.mean(0)).sum()


def gate_regularization(gates: dict[str, torch.Tensor], cfg: GateRegularization) -> torch.Tensor | None:
    """The configured gate terms summed over gates, or None when every weight is 0 (or there are no gates)."""
    if not gates or (cfg.entropy_weight == 0 and cfg.load_balance_weight == 0):
        return None
    sign = 1.0 if cfg.entropy_towards == "confident" else -1.0
    total = torch.zeros((), device=next(iter(gates.values())).device)
    for w in gates.values():
        if cfg.entropy_weight:
            total = total + sign * cfg.entropy_weight * entropy(w).mean()
        if cfg.load_balance_weight:
            total = total + cfg.load_balance_weight * load_balance(w)
    return total
