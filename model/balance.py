"""Loss balancers: per-task losses [T] -> one scalar to minimise.

A balancer is an ``nn.Module`` (it may own parameters, trained by the same optimiser) with
``combine(losses, present)``. ``present`` [T] marks tasks that had labelled rows in the batch, so
a balancer never reweights a task that contributed nothing. New methods (GradNorm, DWA, PCGrad)
register in ``BALANCERS``; methods that need per-task gradients override ``backward`` instead.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrank.config import TaskConfig


class Balancer(nn.Module):
    def __init__(self, tasks: list[TaskConfig]):
        super().__init__()
        self.register_buffer("weights", torch.tensor([t.weight for t in tasks], dtype=torch.float32))

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, present: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Compute gradients of the balanced loss (default: autograd on ``combine``); returns it."""
        total = self.combine(losses, present)
        total.backward()
        return total

    def state(self) -> dict[str, list[float]]:
        """Current effective task weights, for logging."""
        return {"weights": self.weights.tolist()}


class FixedWeights(Balancer):
    """sum_t w_t L_t with the configured task weights."""

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return (self.weights * losses * present).sum()


class UncertaintyWeights(Balancer):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    With s_t = log sigma_t^2 learned per task: classification exp(-s_t) L_t + s_t / 2,
    regression exp(-s_t) L_t / 2 + s_t / 2. The configured weights still scale each term.
    """

    def __init__(self, tasks: list[TaskConfig]):
        super().__init__(tasks)
        self.log_var = nn.Parameter(torch.zeros(len(tasks)))
        self.register_buffer("scale", torch.tensor([0.5 if t.type == "regression" else 1.0 for t in tasks]))

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        terms = self.scale * torch.exp(-self.log_var) * losses + 0.5 * self.log_var
        return (self.weights * terms * present).sum()

    def state(self) -> dict[str, list[float]]:
        return {"weights": (self.weights * self.scale * torch.exp(-self.log_var)).tolist(),
                "log_var": self.log_var.tolist()}


BALANCERS: dict[str, type[Balancer]] = {"fixed": FixedWeights, "uncertainty": UncertaintyWeights}


def make_balancer(name: str, tasks: list[TaskConfig]) -> Balancer:
    return BALANCERS[name](tasks)
