"""Loss balancers: per-task losses [T] -> gradients of one objective, and the weights they used.

Every balancer receives the weighted losses w_t L_t (``tasks[t].weight`` scales its task's loss
before any method) and a ``present`` mask [T] of the tasks that had labelled rows in the batch: a
task that contributed nothing is never reweighted, never projected and never divides anything.
``backward`` leaves gradients on every parameter (plus those of ``extra``, e.g. gate
regularisation) and returns the effective task weights of the step [T].

* ``fixed``        sum_t L_t.
* ``uncertainty``  Kendall, Gal & Cipolla (CVPR 2018): learned log-variances s_t.
* ``gradnorm``     Chen et al. (ICML 2018): weights that equalise the tasks' gradient norms on the
                   last shared layer, scaled by relative inverse training rates with asymmetry alpha;
                   renormalised to sum to T after every step.
* ``dwa``          Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): weights from the ratio of
                   each task's last two epoch losses, softmax with a temperature, times T.
* ``pcgrad``       Yu et al. (NeurIPS 2020): on the shared parameters, each task's gradient is projected
                   off every other task gradient it conflicts with (negative dot product), in a random
                   order; task-specific parameters keep their own gradients.
* ``mgda``         Sener & Koltun (NeurIPS 2018): weights are the min-norm point of the convex hull of
                   the task gradients (closed form for two tasks, Frank-Wolfe otherwise), times T; on
                   the shared parameters or, with ``upper_bound``, on the shared representation (MGDA-UB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model import distributed
from model.nets import ParameterGroups
from mtrank.config import (
    BalancerConfig,
    DwaBalancer,
    GradNormBalancer,
    MgdaBalancer,
    PcGradBalancer,
    TaskConfig,
    UncertaintyBalancer,
)

EPS = 1e-12


@dataclass
class StepContext:
    """What a balancer may differentiate besides the losses: the model's parameter groups and the shared
    representation of this batch (MGDA-UB), and ``extra``, a scalar added to the objective as is."""

    groups: ParameterGroups
    representation: torch.Tensor
    extra: torch.Tensor | None = None


def task_gradients(losses: torch.Tensor, present: torch.Tensor, wrt: list[torch.Tensor], reduce: bool = True
                   ) -> torch.Tensor:
    """Flattened gradient of each present task's loss w.r.t. ``wrt`` -> [T, P] (zero rows for absent tasks).

    The graph is kept, so the caller can still backpropagate the combined objective. Across processes the
    result is averaged over ranks (``reduce``; parameters are the same on every rank, so this is the
    gradient of the global batch); pass ``reduce=False`` for per-row tensors such as the representation.
    """
    numel = sum(p.numel() for p in wrt)
    out = losses.new_zeros(len(losses), numel)
    for t in range(len(losses)):
        if not present[t]:
            continue
        grads = torch.autograd.grad(losses[t], wrt, retain_graph=True, allow_unused=True)
        out[t] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, wrt)])
    out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return distributed.all_reduce_(out, mean=True) if reduce else out


def min_norm_weights(gram: torch.Tensor, active: torch.Tensor, iterations: int = 250, tol: float = 1e-10
                     ) -> torch.Tensor:
    """argmin_{a in simplex} ||sum_t a_t g_t||^2 given the Gram matrix M = G G^T [T, T] -> a [T].

    Only ``active`` tasks take weight. Two tasks: the closed form; more: Frank-Wolfe with exact line
    search (Sener & Koltun, Algorithm 2) plus away steps (Lacoste-Julien & Jaggi, 2015), which converge
    linearly where plain Frank-Wolfe crawls towards an optimum on a face of the simplex. Written on M,
    so it never touches the gradients themselves; M is [T, T], so it is solved on the host whatever the
    training device (each iteration branches on its values), and ``a`` comes back on ``gram``'s device.
    """
    T, device = gram.shape[0], gram.device
    alpha = torch.zeros(T, dtype=gram.dtype)
    gram, active = gram.detach().cpu(), active.cpu()
    idx = torch.nonzero(active, as_tuple=False).flatten()
    if len(idx) <= 1:
        alpha[idx] = 1.0
        return alpha.to(device)
    M = gram[idx][:, idx].double()
    k = len(idx)
    a = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if k == 2:  # min_g ||g v1 + (1 - g) v2||^2  =>  g = (v2.v2 - v1.v2) / ||v1 - v2||^2
        denom = M[0, 0] + M[1, 1] - 2 * M[0, 1]
        g = ((M[1, 1] - M[0, 1]) / denom).clamp(0.0, 1.0) if denom > EPS else torch.tensor(0.5, dtype=torch.float64)
        a = torch.stack([g, 1 - g])
    else:
        for _ in range(iterations):  # Frank-Wolfe with away steps: linear convergence when the optimum is on a face
            grad = M @ a  # half the gradient of a^T M a
            s_, v_ = int(torch.argmin(grad)), int(torch.argmax(torch.where(a > 0, grad, -torch.inf)))
            d_fw, d_away = -a.clone(), a.clone()
            d_fw[s_] += 1.0
            d_away[v_] -= 1.0
            if -(grad @ d_fw) >= -(grad @ d_away):
                d, gamma_max = d_fw, 1.0
            else:
                d, gamma_max = d_away, float(a[v_] / (1 - a[v_])) if a[v_] < 1 else 1e12
            gap = -(grad @ d)
            curvature = d @ M @ d
            if gap <= tol or curvature <= EPS:
                break
            a = (a + (gap / curvature).clamp(max=gamma_max) * d).clamp_min(0.0)
            a = a / a.sum()
    alpha[idx] = a.to(alpha.dtype)
    return alpha.to(device)


def project_conflicts(grads: torch.Tensor, active: torch.Tensor, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """PCGrad: [T, P] task gradients -> [T, P] with each projected off the ones it conflicts with.

    For task i (active only), over the other active tasks j in a random order: if g_i . g_j < 0,
    g_i -= (g_i . g_j) / ||g_j||^2 g_j, against the original g_j (Yu et al., Algorithm 1).
    """
    out = grads.clone()
    idx = torch.nonzero(active, as_tuple=False).flatten().tolist()
    norms2 = (grads * grads).sum(1)
    for i in idx:
        others = [j for j in idx if j != i]
        order = torch.randperm(len(others), generator=generator).tolist()
        for o in order:
            j = others[o]
            dot = out[i] @ grads[j]
            if dot < 0 and norms2[j] > EPS:
                out[i] -= dot / norms2[j] * grads[j]
    return out


class Balancer(nn.Module):
    """Base: the configured task weights, and the default backward (autograd on ``combine``)."""

    def __init__(self, tasks: list[TaskConfig]):
        super().__init__()
        self.T = len(tasks)
        self.register_buffer("task_weights", torch.tensor([t.weight for t in tasks], dtype=torch.float32))

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted losses [T] -> (objective, effective weights [T])."""
        return (losses * present).sum(), torch.ones_like(losses)

    def backward(self, losses: torch.Tensor, present: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Gradients of the balanced objective (+ ``ctx.extra``) on every parameter -> effective weights [T]."""
        total, weights = self.combine(self.task_weights * losses, present)
        _backward(total, ctx.extra)
        return weights.detach() * self.task_weights

    def after_step(self) -> None:
        """Called after the optimiser step (GradNorm renormalises its weights here)."""

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        """Called with the epoch's mean training loss per task [T] (DWA sets next epoch's weights)."""

    def state(self) -> dict[str, list[float]]:
        """The balancer's own learned or derived quantities, for the log."""
        return {}


def _backward(total: torch.Tensor, extra: torch.Tensor | None) -> None:
    (total if extra is None else total + extra).backward()


class FixedWeights(Balancer):
    """sum_t w_t L_t with the configured task weights."""


class UncertaintyWeights(Balancer):
    """Homoscedastic uncertainty weighting: classification exp(-s_t) L_t + s_t / 2, regression
    exp(-s_t) L_t / 2 + s_t / 2, with s_t = log sigma_t^2 learned per task."""

    def __init__(self, tasks: list[TaskConfig]):
        super().__init__(tasks)
        self.log_var = nn.Parameter(torch.zeros(len(tasks)))
        self.register_buffer("scale", torch.tensor([0.5 if t.type == "regression" else 1.0 for t in tasks]))

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.scale * torch.exp(-self.log_var)
        return ((weights * losses + 0.5 * self.log_var) * present).sum(), weights

    def state(self) -> dict[str, list[float]]:
        return {"log_var": self.log_var.tolist()}


class GradNorm(Balancer):
    """Learned weights w_t (a parameter of the balancer, its own learning rate) that make the weighted
    gradient norms G_t = ||grad_W w_t L_t|| on the last shared layer W follow mean(G) * r_t^alpha, where
    r_t is task t's loss ratio L_t / L_t(0) relative to the mean ratio. G_t = w_t ||grad_W L_t||, so the
    gradient of the GradNorm loss sum_t |G_t - target_t| w.r.t. w needs no second-order terms."""

    def __init__(self, tasks: list[TaskConfig], cfg: GradNormBalancer):
        super().__init__(tasks)
        self.alpha = cfg.alpha
        self.w = nn.Parameter(torch.ones(len(tasks)))
        self.register_buffer("initial", torch.full((len(tasks),), float("nan")))

    def backward(self, losses: torch.Tensor, present: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        weighted = self.task_weights * losses
        on = present.bool()
        value = distributed.all_reduce_(weighted.detach().clone(), mean=True)  # the global batch's losses
        with torch.no_grad():  # L_t(0): the first loss seen for each task
            first = on & torch.isnan(self.initial)
            self.initial[first] = value[first]
        if on.sum() >= 2:
            g = task_gradients(weighted, present, [ctx.groups.layer]).norm(dim=1)  # [T] ||grad_W L_t||
            ratio = (value / self.initial.clamp_min(1e-8)).clamp(0.0, 1e4)
            rel = ratio / ratio[on].mean().clamp_min(1e-8)  # relative inverse training rate
            G = self.w * g  # [T], differentiable in w only
            target = (G[on].mean() * rel.clamp(max=1e2) ** self.alpha).detach()
            gn_loss = torch.abs(G - target)[on].sum()
            (grad_w,) = torch.autograd.grad(gn_loss, self.w)
            self.w.grad = torch.nan_to_num(grad_w, nan=0.0, posinf=0.0, neginf=0.0)
        weights = self.w.detach()
        _backward((weights * weighted * present).sum(), ctx.extra)
        return weights * self.task_weights

    @torch.no_grad()
    def after_step(self) -> None:
        w = torch.nan_to_num(self.w, nan=1.0).clamp_min(1e-3)
        self.w.copy_(w * self.T / w.sum())

    def state(self) -> dict[str, list[float]]:
        return {"w": self.w.tolist()}


class DynamicWeightAverage(Balancer):
    """w_t = T softmax_t(r_t / temperature) with r_t = L_t(e-1) / L_t(e-2); 1 for the first two epochs."""

    def __init__(self, tasks: list[TaskConfig], cfg: DwaBalancer):
        super().__init__(tasks)
        self.temperature = cfg.temperature
        self.register_buffer("w", torch.ones(len(tasks)))
        self.history: list[torch.Tensor] = []

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.w * losses * present).sum(), self.w

    @torch.no_grad()
    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        self.history = [*self.history[-1:], mean_losses.detach().to(self.w.device, torch.float32)]
        if len(self.history) < 2:
            return
        prev, last = self.history
        ok = (prev > 1e-8) & torch.isfinite(prev) & torch.isfinite(last)
        r = torch.where(ok, last / prev.clamp_min(1e-8), torch.ones_like(last)).clamp(0.0, 1e2)
        self.w.copy_(self.T * torch.softmax(r / self.temperature, dim=0))

    def state(self) -> dict[str, list[float]]:
        return {"w": self.w.tolist()}


class PCGrad(Balancer):
    """Gradient surgery on the shared parameters; task-specific parameters keep sum_t of their own."""

    def __init__(self, tasks: list[TaskConfig], seed: int = 0):
        super().__init__(tasks)
        self.generator = torch.Generator().manual_seed(seed)

    def backward(self, losses: torch.Tensor, present: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        weighted = self.task_weights * losses
        shared = ctx.groups.shared
        grads = task_gradients(weighted, present, shared)  # [T, P]
        projected = project_conflicts(grads, present.bool(), self.generator)
        _backward((weighted * present).sum(), ctx.extra)
        _add_flat((projected - grads).sum(0), shared)  # the shared gradient becomes sum_t of the projected
        return self.task_weights.clone()


class MGDA(Balancer):
    """Min-norm task weights (times T) from the task gradients on the shared parameters, or on the shared
    representation with ``upper_bound`` (MGDA-UB: one backward pass through the task-specific part per task)."""

    def __init__(self, tasks: list[TaskConfig], cfg: MgdaBalancer):
        super().__init__(tasks)
        self.upper_bound, self.normalize = cfg.upper_bound, cfg.normalize

    def backward(self, losses: torch.Tensor, present: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        weighted = self.task_weights * losses
        if self.upper_bound:  # per-row gradients: the global Gram matrix is the sum of the ranks' Gram matrices
            grads = task_gradients(weighted, present, [ctx.representation], reduce=False).double()  # [T, B * ...]
            gram = distributed.all_reduce_(grads @ grads.T)
        else:
            grads = task_gradients(weighted, present, ctx.groups.shared).double()  # [T, P]
            gram = grads @ grads.T  # float64: the min-norm point of nearly parallel gradients is sensitive
        scale = torch.ones_like(gram[0])  # gram of normalised gradients: D G G^T D with D = diag(scale)
        if self.normalize == "l2":
            scale = 1.0 / gram.diagonal().clamp_min(EPS).sqrt()
        elif self.normalize == "loss":
            scale = 1.0 / distributed.all_reduce_(weighted.detach().double(), mean=True).clamp_min(1e-8)
        gram = gram * scale.unsqueeze(0) * scale.unsqueeze(1)
        alpha = min_norm_weights(gram, present.bool()).to(weighted.dtype) * present.sum()
        _backward((alpha.detach() * weighted * present).sum(), ctx.extra)
        return alpha.detach() * self.task_weights


def _add_flat(delta: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Add a flattened [P] vector to the .grad of ``params`` (in order)."""
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(delta[offset : offset + n].view_as(p))
        offset += n


def make_balancer(cfg: BalancerConfig, tasks: list[TaskConfig], seed: int = 0) -> Balancer:
    if isinstance(cfg, UncertaintyBalancer):
        return UncertaintyWeights(tasks)
    if isinstance(cfg, GradNormBalancer):
        return GradNorm(tasks, cfg)
    if isinstance(cfg, DwaBalancer):
        return DynamicWeightAverage(tasks, cfg)
    if isinstance(cfg, PcGradBalancer):
        return PCGrad(tasks, seed)
    if isinstance(cfg, MgdaBalancer):
        return MGDA(tasks, cfg)
    return FixedWeights(tasks)
