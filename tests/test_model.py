"""Architectures: shapes, gates, PLE routing, ESMM chains, masked losses, balancers."""

from __future__ import annotations

import pytest
import torch

from model.balance import make_balancer
from model.layers import SplitInput
from model.nets import ExtractionLevel, MultiTaskRanker
from model.train import task_losses
from mtrank.config import ModelConfig, TaskConfig, UncertaintyBalancer
from mtrank.encoding import FittedFeature, FittedSchema

ARCHS = ["single", "shared_bottom", "mmoe", "cgc", "ple"]


def _schema() -> FittedSchema:
    feats = [
        FittedFeature(name="user_id", kind="categorical", side="user", source="user_id", encoding="hash", buckets=50, offset=1),
        FittedFeature(name="device", kind="categorical", side="context", source="device", encoding="vocab",
                      vocab=["android", "ios"], offset=52),
        FittedFeature(name="age", kind="numeric", side="user", source="age"),
        FittedFeature(name="item_id", kind="categorical", side="item", source="item_id", encoding="hash", buckets=40, offset=56),
        FittedFeature(name="tags", kind="multi_categorical", side="item", source="tags", encoding="hash", buckets=20,
                      offset=97, max_len=3),
        FittedFeature(name="price", kind="numeric", side="item", source="price"),
    ]
    return FittedSchema(features=tuple(feats), table_size=118)


TASKS = [
    TaskConfig(name="ctr", label={"column": "click"}),
    TaskConfig(name="ctcvr", label={"column": "buy"}, chain={"parent": "ctr", "head": "cvr"}),
    TaskConfig(name="watch", type="regression", label={"column": "wt"}),
]


def _inputs(b: int, request_batch: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rb = b if request_batch is None else request_batch
    tags = torch.randint(97, 118, (b, 3), generator=g)
    tags[:, 2] = 0  # padding slot
    return {
        "request_ids": torch.stack([torch.randint(1, 51, (rb,), generator=g), torch.randint(52, 56, (rb,), generator=g)], 1),
        "request_dense": torch.randn(rb, 1, generator=g),
        "item_ids": torch.cat([torch.randint(56, 97, (b, 1), generator=g), tags], 1),
        "item_dense": torch.randn(b, 1, generator=g),
    }


# Three tasks without a chain: under a chain, the parent's tower is reached by the chained task's loss too
UNCHAINED = [TASKS[0], TaskConfig(name="like", label={"column": "like"}), TASKS[2]]


def _model(arch: str, tasks: list[TaskConfig] = TASKS, **kw) -> MultiTaskRanker:
    torch.manual_seed(0)
    cfg = ModelConfig(**({"arch": arch, "embedding_dim": 4, "expert_hidden": [8], "tower_hidden": [4], "n_experts": 3,
                          "n_shared_experts": 2, "n_task_experts": 1, "levels": 2} | kw))
    return MultiTaskRanker(_schema(), tasks, cfg).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_gates_sum_to_one(arch: str) -> None:
    model = _model(arch)
    out = model(_inputs(7))
    assert set(out["scores"]) == {"ctr", "ctcvr", "cvr", "watch"}
    for name, s in out["scores"].items():
        assert s.shape == (7,), name
    expected_gates = {"single": 0, "shared_bottom": 0, "mmoe": 3, "cgc": 3, "ple": 3 + 4}[arch]
    assert len(out["gates"]) == expected_gates == len(model.gate_specs)
    for spec in model.gate_specs:
        w = out["gates"][spec.name]
        assert w.shape == (7, len(spec.experts))
        torch.testing.assert_close(w.sum(1), torch.ones(7))
        assert (w >= 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_request_batch_of_one_broadcasts(arch: str) -> None:
    """Serving sends request features once; scores equal the row-repeated training layout."""
    model = _model(arch)
    x = _inputs(5, request_batch=1)
    repeated = {k: (v.expand(5, -1) if k.startswith("request") else v) for k, v in x.items()}
    a, b = model(x)["scores"], model(repeated)["scores"]
    for name in a:
        torch.testing.assert_close(a[name], b[name])


@pytest.mark.parametrize("arch", ["shared_bottom", "ple"])
def test_batch_norm_variant(arch: str) -> None:
    """Batch norm trains on batch statistics and scores candidates independently in eval mode."""
    model = _model(arch, batch_norm=True)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    x = _inputs(6)
    model.train()
    losses, _ = task_losses(model(x), torch.ones(6, 3), torch.ones(6, 3, dtype=torch.bool), TASKS)
    losses.sum().backward()
    model.eval()
    full = model(x)["scores"]["ctr"]
    first = model({k: v[:1] for k, v in x.items()})["scores"]["ctr"]
    torch.testing.assert_close(first, full[:1])


class Concatenated(MultiTaskRanker):
    """The formulation before the split first layer: x = [request broadcast, item] [B, I] multiplied whole."""

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = super().features(inputs)
        return x.cat() if isinstance(x, SplitInput) else x


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k][n] - b[k][n]).detach().abs().max()) for k in ("scores", "logits", "gates") for n in a[k])


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_split_first_layer_matches_concatenated_input(arch: str, batch_norm: bool) -> None:
    """request @ W_r + item @ W_i equals [request, item] @ W: same state_dict, outputs within 1e-5, in training
    (batch statistics, same parameter gradients) and in eval with a request batch of 1 or B."""
    model = _model(arch, batch_norm=batch_norm, expert_hidden=[16, 8])
    old = Concatenated(_schema(), TASKS, model.cfg)
    old.load_state_dict(model.state_dict())
    assert list(old.state_dict()) == list(model.state_dict())
    x = _inputs(9)
    model.train()
    old.train()
    new_out, old_out = model(x), old(x)  # batch norm: batch statistics, and both update the running ones alike
    assert _max_diff(new_out, old_out) <= 1e-5
    torch.testing.assert_close(new_out["representation"], old_out["representation"], atol=1e-5, rtol=0)
    loss = lambda out: sum(s.sum() for s in out["scores"].values())  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(new_out), list(model.parameters()), allow_unused=True),
                    torch.autograd.grad(loss(old_out), list(old.parameters()), allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.eval()
    old.eval()
    for request_batch in (1, 9):
        x = _inputs(9, request_batch=request_batch, seed=1)
        new_out, old_out = model(x), old(x)
        assert _max_diff(new_out, old_out) <= 1e-5
        assert all(s.shape == (9,) for s in new_out["scores"].values())


@pytest.mark.parametrize("arch", [*ARCHS, "cgc-no-shared"])
def test_representation_receives_gradients(arch: str) -> None:
    """MGDA-UB differentiates the task losses w.r.t. the representation: it must lie on their path, including
    where it is the input x itself (single, or no shared experts), which the split first layer never builds."""
    model = _model("cgc", n_shared_experts=0) if arch == "cgc-no-shared" else _model(arch)
    out = model.train()(_inputs(6))
    rep = out["representation"]
    assert rep.shape[-2] == 6
    (grad,) = torch.autograd.grad(sum(s.sum() for s in out["scores"].values()), rep)
    assert grad.abs().sum() > 0


def test_esmm_identity() -> None:
    out = _model("mmoe")(_inputs(16))["scores"]
    torch.testing.assert_close(out["ctcvr"], out["ctr"] * out["cvr"])
    assert ((out["ctcvr"] <= out["ctr"]) & (out["ctcvr"] >= 0)).all()


def test_gate_temperature_sharpens() -> None:
    x = _inputs(64)
    hot = _model("mmoe", gate_temperature=5.0)(x)["gates"]["gate_l0_ctr"]
    cold = _model("mmoe", gate_temperature=0.2)(x)["gates"]["gate_l0_ctr"]
    entropy = lambda w: -(w * w.clamp_min(1e-12).log()).sum(1).mean()  # noqa: E731
    assert entropy(cold) < entropy(hot)


def test_ple_level_routes_each_task_its_own_output() -> None:
    """Level l+1: task k's output depends on task k's and the shared output of level l, never on task j's."""
    model = _model("ple")
    level1: ExtractionLevel = model.levels[1]
    h = torch.randn(len(TASKS) + 1, 6, 8, requires_grad=True)  # [T + 1, B, H] outputs of level 0
    out, _, _ = level1(h)
    T = len(TASKS)
    for k in range(T):
        (grad,) = torch.autograd.grad(out[k].sum(), h, retain_graph=True)
        per_slot = grad.abs().sum(dim=(1, 2))  # [T + 1]
        assert per_slot[k] > 0, f"task {k} ignores its own input"
        assert per_slot[T] > 0, f"task {k} ignores the shared input"
        others = [j for j in range(T) if j != k]
        assert torch.all(per_slot[others] == 0), f"task {k} reads another task's output: {per_slot.tolist()}"


def test_ple_expert_batching_matches_per_expert_loop() -> None:
    """The batched expert GEMM equals running each expert MLP on its own."""
    model = _model("ple")
    for experts in (model.levels[0].task_experts, model.levels[0].shared_experts):
        x = torch.randn(5, experts.weights[0].shape[1])
        batched = experts(x)  # [n, B, H]
        for e in range(experts.n):
            h = x
            for w, b in zip(experts.weights, experts.biases):
                h = torch.relu(h @ w[e] + b[e])
            torch.testing.assert_close(batched[e], h)


@pytest.mark.parametrize(("arch", "levels"), [(a, 2) for a in ARCHS] + [("ple", 3), ("ple", 4)])
def test_parameter_groups_follow_which_losses_reach_them(arch: str, levels: int) -> None:
    """Per-task gradients on a batch: no element of a task-specific tensor gets gradient from two tasks,
    every shared tensor has an element that does, and the groups cover every parameter exactly once."""
    model = _model(arch, UNCHAINED, levels=levels, tower_hidden=[16], expert_hidden=[16]).train()
    groups = model.parameter_groups()
    everything = list(model.parameters())
    ids = [id(p) for p in groups.shared + groups.task_specific]
    assert sorted(ids) == sorted(id(p) for p in everything) and len(set(ids)) == len(ids)
    x = _inputs(64)
    losses, _ = task_losses(model(x), torch.tensor([[1.0, 0.0, 2.0]] * 32 + [[0.0, 1.0, 0.5]] * 32),
                            torch.ones(64, 3, dtype=torch.bool), UNCHAINED)
    grads = [torch.autograd.grad(loss, everything, retain_graph=True, allow_unused=True) for loss in losses]
    reached = {id(p): torch.stack([(g[i] if g[i] is not None else torch.zeros_like(p)) != 0 for g in grads]).sum(0)
               for i, p in enumerate(everything)}  # per element: how many task losses reach it
    for p in groups.task_specific:
        assert reached[id(p)].max() <= 1, f"{arch}: a task-specific tensor {tuple(p.shape)} is reached by two tasks"
    for p in groups.shared:
        if p is model.embedding.table.weight or p.dim() == 1 and p.numel() == 1:
            continue  # embedding rows a batch does not use get no gradient at all
        assert reached[id(p)].max() >= 2, f"{arch}: shared tensor {tuple(p.shape)} is reached by one task only"
    assert any(groups.layer is p for p in groups.shared)
    expected = {"single": model.embedding.table.weight, "shared_bottom": model.body.weights[-1] if model.body else None}
    if arch in ("mmoe", "cgc", "ple"):
        expected[arch] = model.levels[-1].shared_experts.weights[-1]
    assert groups.layer is expected[arch], f"{arch}: GradNorm's layer is not the last shared layer feeding the towers"


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_rows_give_zero_gradient(arch: str) -> None:
    model = _model(arch).train()
    x = _inputs(8)
    x["item_dense"] = x["item_dense"].clone().requires_grad_(True)
    labels = torch.tensor([[1.0, 0.0, 2.0]] * 8)
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[:4] = False  # rows 0-3 have no labels at all
    losses, present = task_losses(model(x), labels, mask, TASKS)
    losses.sum().backward()
    grad = x["item_dense"].grad
    assert torch.all(grad[:4] == 0)
    assert torch.any(grad[4:] != 0)
    assert present.tolist() == [1.0, 1.0, 1.0]


def test_task_without_labels_in_batch_is_absent() -> None:
    model = _model("mmoe")
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[:, 2] = False
    losses, present = task_losses(model(_inputs(8)), torch.zeros(8, 3), mask, TASKS)
    assert present.tolist() == [1.0, 1.0, 0.0]
    assert losses[2].item() == 0.0


def test_uncertainty_balancer_learns_weights() -> None:
    bal = make_balancer(UncertaintyBalancer(), TASKS)
    opt = torch.optim.SGD(bal.parameters(), lr=0.5)
    losses = torch.tensor([0.1, 1.0, 4.0])
    for _ in range(200):
        opt.zero_grad()
        bal.combine(losses, torch.ones(3))[0].backward()
        opt.step()
    w = bal.combine(losses, torch.ones(3))[1].tolist()
    # The optimum of exp(-s) L + s/2 weights a task by 1 / (2 L): noisier tasks get less weight.
    assert w[0] > w[1] > w[2]
    assert w[0] == pytest.approx(1 / (2 * 0.1), rel=0.05)
