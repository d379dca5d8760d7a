"""Loss balancers, gradient surgery, min-norm weights, gate regularisation and numerical safety."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from model.balance import StepContext, make_balancer, min_norm_weights, project_conflicts
from model.gates import entropy, gate_regularization, load_balance
from model.layers import Gate
from model.train import Placement, Trainer, task_losses
from mtrank.config import (
    DwaBalancer,
    GateRegularization,
    GradNormBalancer,
    MgdaBalancer,
    PcGradBalancer,
    TaskConfig,
    parse_config,
)
from tests.test_model import UNCHAINED, _inputs, _model, _schema

BALANCERS = ["fixed", "uncertainty", "gradnorm", "dwa", "pcgrad", "mgda", "mgda_ub"]


def _balancer_cfg(name: str) -> dict:
    return {"kind": "mgda", "upper_bound": True} if name == "mgda_ub" else {"kind": name}


# ------------------------------------------------------------------------------------------ MGDA


def _brute_force_min_norm(G: np.ndarray, steps: int) -> tuple[np.ndarray, float]:
    """Grid search over the simplex: the weights with the smallest ||sum_t a_t g_t||."""
    T = G.shape[0]
    best, best_a = math.inf, None
    for ks in itertools.product(range(steps + 1), repeat=T - 1):
        if sum(ks) > steps:
            continue
        a = np.array([*ks, steps - sum(ks)], dtype=np.float64) / steps
        norm = float(np.linalg.norm(a @ G))
        if norm < best:
            best, best_a = norm, a
    return best_a, best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("T", [2, 3, 4])
def test_min_norm_weights_match_brute_force(T: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(T, 5))
    G[1] = -0.7 * G[0] + 0.3 * rng.normal(size=5)  # a conflicting pair
    alpha = min_norm_weights(torch.tensor(G @ G.T), torch.ones(T, dtype=torch.bool)).double().numpy()
    assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1.0)
    _, brute = _brute_force_min_norm(G, {2: 2000, 3: 200, 4: 60}[T])
    assert np.linalg.norm(alpha @ G) <= brute + 1e-6, "Frank-Wolfe found a worse point than the grid"


def test_min_norm_two_tasks_closed_form_and_inactive_tasks() -> None:
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])  # min over a in [0,1] of |a g1 + (1-a) g2| at a = 0.6
    G = torch.tensor(np.stack([g1, g2, [5.0, 5.0]]))
    alpha = min_norm_weights(G @ G.T, torch.tensor([True, True, False]))
    assert alpha.tolist() == pytest.approx([0.6, 0.4, 0.0])
    # Same direction: the smaller gradient takes all the weight
    G = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert min_norm_weights(G @ G.T, torch.ones(2, dtype=torch.bool)).tolist() == pytest.approx([1.0, 0.0])



@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
@pytest.mark.parametrize("T", [2, 3])
def test_min_norm_weights_come_back_on_the_device_of_the_gram(device: str, T: int) -> None:
    """Seen on an H200: the Frank-Wolfe iterate lived on the host, and ``M @ a`` failed on a cuda Gram matrix
    (every MGDA step of a cuda run); the solve now runs on the host and the weights go back to the Gram's device."""
    G = torch.randn(T, 7, generator=torch.Generator().manual_seed(T), dtype=torch.float64).to(device)
    alpha = min_norm_weights(G @ G.T, torch.ones(T, dtype=torch.bool, device=device))
    assert alpha.device == G.device and alpha.dtype == G.dtype
    assert float(alpha.sum()) == pytest.approx(1.0) and float(alpha.min()) >= 0


# ---------------------------------------------------------------------------------------- PCGrad


def test_pcgrad_projects_conflicting_pair() -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # dot = -1: conflict
    out = project_conflicts(g, torch.ones(2, dtype=torch.bool))
    # g1 - (g1.g2 / |g2|^2) g2 = (0.5, 0.5); g2 - (g2.g1 / |g1|^2) g1 = (0, 1)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert float(out[0] @ g[1]) == pytest.approx(0.0) and float(out[1] @ g[0]) == pytest.approx(0.0)
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(project_conflicts(agreeing, torch.ones(2, dtype=torch.bool)), agreeing)
    absent = project_conflicts(g, torch.tensor([True, False]))
    torch.testing.assert_close(absent, g)  # an absent task neither projects nor is projected onto


def test_pcgrad_balancer_sets_projected_shared_and_own_task_gradients() -> None:
    """On the shared parameters the gradient is sum_t of the projected task gradients; task-specific
    parameters get exactly the gradient of sum_t L_t."""
    model = _model("mmoe", UNCHAINED).train()
    groups = model.parameter_groups()
    x = _inputs(32)
    labels, mask = torch.tensor([[1.0, 0.0, 2.0]] * 16 + [[0.0, 1.0, -1.0]] * 16), torch.ones(32, 3, dtype=torch.bool)
    out = model(x)
    losses, present = task_losses(out, labels, mask, UNCHAINED)
    per_task = [torch.autograd.grad(loss, groups.shared + groups.task_specific, retain_graph=True, allow_unused=True)
                for loss in losses]
    flat = lambda gs, ps: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, ps)])  # noqa: E731
    n_shared = len(groups.shared)
    G = torch.stack([flat(g[:n_shared], groups.shared) for g in per_task])
    expected_shared = project_conflicts(G, torch.ones(3, dtype=torch.bool), torch.Generator().manual_seed(0)).sum(0)
    expected_task = sum(flat(g[n_shared:], groups.task_specific) for g in per_task)
    bal = make_balancer(PcGradBalancer(), UNCHAINED, seed=0)
    bal.backward(losses, present, StepContext(groups, out["representation"]))
    got_shared = torch.cat([p.grad.reshape(-1) for p in groups.shared])
    got_task = torch.cat([p.grad.reshape(-1) for p in groups.task_specific])
    torch.testing.assert_close(got_task, expected_task)
    torch.testing.assert_close(got_shared, expected_shared, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected_shared, G.sum(0)), "no conflict in this batch: the test proves nothing"


# ------------------------------------------------------------------------------ GradNorm and DWA


def test_gradnorm_moves_weight_to_the_task_with_the_smaller_gradient_and_renormalises() -> None:
    tasks = [TaskConfig(name="a", label={"column": "a"}), TaskConfig(name="b", label={"column": "b"})]
    layer = torch.nn.Parameter(torch.ones(4))
    bal = make_balancer(GradNormBalancer(alpha=0.0, lr=0.1), tasks)
    opt = torch.optim.Adam(bal.parameters(), lr=0.1)
    from model.nets import ParameterGroups

    groups = ParameterGroups(shared=[layer], task_specific=[], layer=layer)
    for _ in range(30):
        losses = torch.stack([(10.0 * layer).sum(), (1.0 * layer).sum()])  # task a's gradient is 10x task b's
        layer.grad = None
        opt.zero_grad()
        weights = bal.backward(losses, torch.ones(2), StepContext(groups, layer))
        opt.step()
        bal.after_step()
        assert float(bal.w.detach().sum()) == pytest.approx(2.0, abs=1e-5) and torch.isfinite(weights).all()
    w = bal.w.detach()
    assert w[1] > 1.5 > w[0], f"GradNorm did not balance the gradient norms: {w.tolist()}"


def test_dwa_weights_follow_loss_ratios() -> None:
    tasks = [TaskConfig(name=n, label={"column": n}) for n in "abc"]
    bal = make_balancer(DwaBalancer(temperature=2.0), tasks)
    bal.end_epoch(torch.tensor([1.0, 1.0, 1.0]))
    assert bal.combine(torch.ones(3), torch.ones(3))[1].tolist() == [1.0, 1.0, 1.0]  # fewer than two epochs seen
    bal.end_epoch(torch.tensor([0.5, 1.0, 0.0]))  # task c: zero loss now
    r = torch.tensor([0.5, 1.0, 0.0])
    expected = 3 * torch.softmax(r / 2.0, 0)
    torch.testing.assert_close(bal.combine(torch.ones(3), torch.ones(3))[1], expected)
    bal.end_epoch(torch.tensor([0.5, 1.0, 0.0]))  # previous loss 0 for task c: ratio 1, not inf/NaN
    w = bal.combine(torch.ones(3), torch.ones(3))[1]
    assert torch.isfinite(w).all() and float(w.sum()) == pytest.approx(3.0)


# ------------------------------------------------------------------------------------ safety


def _trainer(balancer: dict, tasks: list[TaskConfig] = UNCHAINED, **train) -> Trainer:
    cfg = parse_config({"data": {"train": ["x.csv"]},
                        "features": [{"name": "f", "side": "user"}],
                        "tasks": [t.model_dump() for t in tasks],
                        "model": {"arch": "mmoe", "embedding_dim": 4, "expert_hidden": [16], "tower_hidden": [8],
                                  "n_experts": 3},
                        "train": {"balancer": balancer, "lr": 0.01, **train}})
    from model.nets import MultiTaskRanker

    torch.manual_seed(0)
    return Trainer(cfg, MultiTaskRanker(_schema(), cfg.tasks, cfg.model), Placement(torch.device("cpu")))


def _finite(trainer: Trainer) -> bool:
    return all(torch.isfinite(p).all() for p in [*trainer.model.parameters(), *trainer.balancer.parameters()])


@pytest.mark.parametrize("name", BALANCERS)
def test_near_zero_loss_task_stays_finite(name: str) -> None:
    """Task 'like' is always 0 and its tower starts at a logit of -20: its loss is ~2e-9 from the first step
    (what GradNorm's and DWA's loss ratios and MGDA's min-norm solve must survive)."""
    from model.train import EpochStats

    trainer = _trainer(_balancer_cfg(name))
    with torch.no_grad():
        trainer.model.towers.biases[-1][1].fill_(-20.0)
    x = _inputs(64)
    labels = torch.tensor([[1.0, 0.0, 1e-4]] * 64)
    labels[::2, 0] = 0.0
    mask = torch.ones(64, 3, dtype=torch.bool)
    for _epoch in range(3):
        stats = EpochStats(3, torch.device("cpu"))
        for _ in range(10):
            trainer.step(x, labels, mask, stats, probe=True)
        trainer.balancer.end_epoch(stats.loss_sum / stats.loss_count.clamp_min(1))
        record = stats.record(["ctr", "like", "watch"])
        assert all(math.isfinite(v) for v in record["weights"].values()), record
        assert all(math.isfinite(v) for v in record["grad_norm"].values()), record
    assert record["train_loss"]["like"] < 1e-2
    assert _finite(trainer)


@pytest.mark.parametrize("name", BALANCERS)
def test_task_without_labels_in_batch_keeps_weights_finite(name: str) -> None:
    from model.train import EpochStats

    trainer = _trainer(_balancer_cfg(name))
    mask = torch.ones(32, 3, dtype=torch.bool)
    mask[:, 1] = False  # 'like' unlabelled in every batch
    stats = EpochStats(3, torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.model.towers.state_dict().items()}
    for _ in range(5):
        trainer.step(_inputs(32), torch.tensor([[1.0, 1.0, 0.5]] * 32), mask, stats, probe=True)
    record = stats.record(["ctr", "like", "watch"])
    assert all(math.isfinite(v) for v in record["weights"].values()) and _finite(trainer)
    assert record["train_loss"]["like"] == 0.0 and math.isnan(record["grad_cosine"]["ctr|like"])
    assert math.isnan(record["grad_norm"]["like"]) and record["grad_norm"]["ctr"] > 0
    # the unlabelled task's tower member got no gradient: Adam leaves it where it was
    after = trainer.model.towers.state_dict()
    torch.testing.assert_close(after["weights.1"][1], before["weights.1"][1])


@pytest.mark.parametrize("name", BALANCERS)
def test_exploding_gradients_are_clipped_or_skipped(name: str) -> None:
    from model.train import EpochStats

    trainer = _trainer(_balancer_cfg(name), grad_clip=1.0)
    x = _inputs(32)
    x["item_dense"] = x["item_dense"] * 1e6
    labels = torch.tensor([[1.0, 0.0, 1e8]] * 32)  # a regression target far off: huge MSE gradients
    stats = EpochStats(3, torch.device("cpu"))
    for _ in range(3):
        trainer.step(x, labels, torch.ones(32, 3, dtype=torch.bool), stats)
    assert stats.clipped + stats.skipped == 3
    assert _finite(trainer)
    inf_labels = torch.tensor([[1.0, 0.0, math.inf]] * 32)  # a non-finite loss: the step is skipped, nothing moves
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step(x, inf_labels, torch.ones(32, 3, dtype=torch.bool), stats)
    assert stats.skipped >= 1 and _finite(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_mgda_weights_sum_to_task_count_on_params_and_representation() -> None:
    for cfg in (MgdaBalancer(), MgdaBalancer(upper_bound=True), MgdaBalancer(normalize="l2")):
        model = _model("mmoe", UNCHAINED).train()
        out = model(_inputs(32))
        losses, present = task_losses(out, torch.tensor([[1.0, 0.0, 0.5]] * 32), torch.ones(32, 3, dtype=torch.bool),
                                      UNCHAINED)
        w = make_balancer(cfg, UNCHAINED).backward(losses, present, StepContext(model.parameter_groups(),
                                                                                  out["representation"]))
        assert float(w.sum()) == pytest.approx(3.0, abs=1e-4) and (w >= 0).all()


# ------------------------------------------------------------------------------------- gates


def test_load_balance_and_entropy_terms() -> None:
    uniform = torch.full((10, 4), 0.25)
    assert float(load_balance(uniform)) == pytest.approx(1.0)
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 10)
    assert float(load_balance(collapsed)) == pytest.approx(4 * 0.97)
    assert float(entropy(uniform).mean()) == pytest.approx(math.log(4))
    assert gate_regularization({"g": uniform}, GateRegularization()) is None
    spread = gate_regularization({"g": uniform}, GateRegularization(entropy_weight=1.0, entropy_towards="spread"))
    assert float(spread) == pytest.approx(-math.log(4))


@pytest.mark.parametrize("towards", ["confident", "spread"])
def test_entropy_regularisation_moves_gate_entropy(towards: str) -> None:
    """Training with only the entropy term moves every gate's entropy the configured way."""
    trainer = _trainer({"kind": "fixed"}, gates={"entropy_weight": 1.0, "entropy_towards": towards})
    with torch.no_grad():  # start half-confident (entropy about 0.6 of its maximum), so both directions have room
        for gate in trainer.model.levels[0].gates:
            gate.linear.bias.copy_(torch.tensor([2.0, 0.0, 0.0]))
    x = _inputs(64)

    def mean_entropy() -> float:
        trainer.model.eval()
        with torch.no_grad():
            return float(np.mean([entropy(w).mean() for w in trainer.model(x)["gates"].values()]))

    from model.train import EpochStats

    start = mean_entropy()
    stats = EpochStats(3, torch.device("cpu"))
    for _ in range(30):
        trainer.model.train()
        trainer.step(x, torch.zeros(64, 3), torch.zeros(64, 3, dtype=torch.bool), stats)  # no labels: gate term only
    end = mean_entropy()
    assert (end < start - 0.2) if towards == "confident" else (end > start + 0.2)


def test_expert_dropout_renormalises_in_training_only() -> None:
    torch.manual_seed(0)
    gate = Gate(5, 4, expert_dropout=0.5)
    x = torch.randn(200, 5)
    w = gate.train()(x)
    assert torch.allclose(w.sum(1), torch.ones(200)) and (w == 0).any()
    assert (gate.eval()(x) > 0).all()
