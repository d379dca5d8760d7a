"""Observability: gate counters, routing checks, calibration buckets and ECE, PSI, experiment arms.

Every expectation is computed independently here from the ONNX outputs or the served scores (numpy /
scipy), never read back from the code under test. Servers are real uvicorn instances (one per test, so
counters start at zero) serving real bundles; routing tests use a bundle whose gate 0 was made to
prefer expert 0 strongly as the candidates' dense features grow, so shifted traffic collapses it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy as scipy_entropy

from tests.conftest import demo_config
from tests.service.conftest import clone_bundle, rank_body, wait_until
from tests.service.test_api import metric

if TYPE_CHECKING:
    from service.scorer import Model, Scored

USER_COLS = ["user_id", "user_age_bucket", "user_country", "user_activity", "device", "hour"]
ITEM_COLS = ["item_category", "item_price", "item_tags", "item_popularity"]
MONITOR = {"min_candidates": 500, "min_labels": 1, "interval_s": 3600.0}  # evaluated on demand (GET /routing)


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def traffic_rows(demo_data: Path) -> pd.DataFrame:
    return pd.read_parquet(demo_data)


def requests_like_training(rows: pd.DataFrame, n_requests: int, n_candidates: int, seed: int,
                           shift: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """/rank bodies drawn from the synthetic data: one row's user and context, other rows' items."""
    rng = np.random.default_rng(seed)
    bodies = []
    for r in range(n_requests):
        user = rows.iloc[int(rng.integers(len(rows)))]
        items = rows.iloc[rng.choice(len(rows), n_candidates, replace=False)]
        cands = []
        for k, (_, it) in enumerate(items.iterrows()):
            feats = {c: (it[c].item() if hasattr(it[c], "item") else it[c]) for c in ITEM_COLS}
            feats.update(shift or {})
            cands.append({"item_id": f"{it['item_id']}-{r}-{k}", "features": feats})
        ctx = {c: (user[c].item() if hasattr(user[c], "item") else user[c]) for c in USER_COLS[1:]}
        bodies.append({"request_id": f"req-{seed}-{r}", "user_id": str(user["user_id"]), "context": ctx,
                       "candidates": cands})
    return bodies


@pytest.fixture(scope="session")
def ple_run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    from model.train import train

    run = tmp_path_factory.mktemp("ple_run")
    train(demo_config(demo_data, ["model.arch=ple", "model.levels=2", "model.n_shared_experts=2",
                                  "model.n_task_experts=1"]), run)
    return run


@pytest.fixture(scope="module")
def routing_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MMoE with +30 on gate 0's logit of expert 0 per unit of every item dense feature."""
    import torch

    from model.export import export_run
    from model.train import load_run

    run = tmp_path_factory.mktemp("routing_run")
    shutil.copytree(tiny_run, run, dirs_exist_ok=True)
    _, schema, _ = load_run(run)
    di = schema.n_dense("item")
    state = torch.load(run / "model.pt", weights_only=True)
    key = "levels.0.gates.0.linear.weight"  # [n_experts, in_dim]; item dense features are the last di inputs
    state[key][0, -di:] += 30.0
    torch.save(state, run / "model.pt")
    return export_run(run, tmp_path_factory.mktemp("routing_bundles"), version="routing", activate=False)


def serve_bundle(bundle: Path, tmp_path: Path, start_server: Any, version: str = "v1", **overrides: Any) -> Any:
    bundles = tmp_path / "bundles"
    bundles.mkdir(exist_ok=True)
    if not (bundles / version).exists():
        clone_bundle(bundle, bundles, version, activate=True)
    overrides.setdefault("monitoring", MONITOR)
    return start_server(bundles, **overrides)


def post_all(client: Any, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for body in bodies:
        r = client.post("/rank", json=body)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


# ------------------------------------------------------------------------------------ gates


def test_observe_many_equals_observe() -> None:
    """The batched histogram update leaves exactly what one ``observe`` per value leaves."""
    from service.metrics import Metrics, observe_many

    values = np.r_[np.random.default_rng(0).random(500), 0.0, 0.1, 0.2, 1.0]  # values on bucket bounds too
    a, b = Metrics(), Metrics()
    for v in values:
        a.gate_entropy.labels("0", "ctr").observe(float(v))
    observe_many(b.gate_entropy.labels("0", "ctr"), values)
    for name in ("mtrank_gate_entropy_bucket", "mtrank_gate_entropy_count", "mtrank_gate_entropy_sum"):
        got = {tuple(s.labels.items()): s.value for f in b.registry.collect() for s in f.samples if s.name == name}
        want = {tuple(s.labels.items()): s.value for f in a.registry.collect() for s in f.samples if s.name == name}
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want), name


def test_top1_counts_and_entropy_over_the_expert_major_layout() -> None:
    """The flush's passes over [m, N]: top-1 counts as ``argmax`` gives them (ties to the first expert) and the
    normalised entropy of each column as scipy gives it, also where weights tie or are 0."""
    from mtrank.metrics import normalised_entropy
    from service.observe import top1_counts

    w = np.random.default_rng(1).dirichlet(np.ones(5), 300).astype(np.float32)  # [N, m]
    w[:40] = np.float32(0.2)  # all five tie: expert 0 takes them
    w[40:60] = [0.5, 0.0, 0.5, 0.0, 0.0]  # a tie between 0 and 2, zeros
    wt = np.ascontiguousarray(w.T)
    assert top1_counts(wt).tolist() == np.bincount(w.argmax(axis=1), minlength=5).tolist()
    want = scipy_entropy(w.astype(np.float64).T) / math.log(5)
    assert normalised_entropy(wt, axis=0) == pytest.approx(want, abs=1e-6)
    assert normalised_entropy(w) == pytest.approx(want, abs=1e-6)


def random_scored(model: Model, rng: np.random.Generator, n: int) -> Scored:
    """A ``Scored`` of ``n`` candidates for ``model``: uniform raw scores, their square roots as calibrated, Dirichlet
    gate weights."""
    from service.scorer import Scored

    p = {t: rng.random(n).astype(np.float32) for t in model.task_names}
    gates = {g.output: rng.dirichlet(np.ones(len(g.experts)), n).astype(np.float32) for g in model.manifest.gates}
    return Scored(p, {t: np.sqrt(v) for t, v in p.items()}, gates)


def test_a_flush_in_chunks_counts_what_one_flush_counts(base_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch counted chunk by chunk (``FLUSH_CHUNK_CANDIDATES``) leaves every counter where one pass over the whole
    batch leaves it; the chunks cut the batch at request boundaries, in order, each of at least the chunk's
    candidates but the last."""
    from service import observe
    from service.metrics import Metrics
    from service.scorer import Model
    from service.settings import FusionSettings, MonitoringSettings, OnnxSettings

    model = Model.load(base_bundle, OnnxSettings(), FusionSettings())
    rng = np.random.default_rng(0)
    batch = [random_scored(model, rng, n) for n in (50, 10, 70, 30, 30, 5, 90)]
    sizes = [[len(sc.raw[model.task_names[0]]) for sc in chunk] for chunk in observe._chunks(batch, 60)]
    assert sizes == [[50, 10], [70], [30, 30], [5, 90]]

    def counters(chunk: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        monkeypatch.setattr(observe, "FLUSH_CHUNK_CANDIDATES", chunk)
        metrics = Metrics()
        stats = observe.ModelStats(model, metrics, MonitoringSettings())
        for sc in batch:
            stats.observe(sc, len(sc.raw[model.task_names[0]]))
        stats.flush()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in metrics.registry.collect()
                for s in f.samples if not s.name.endswith("_created")}

    whole, chunked = counters(10**9), counters(60)
    assert whole.keys() == chunked.keys()
    assert any(k[0] == "mtrank_gate_weight_total" and v > 0 for k, v in whole.items())
    assert all(chunked[k] == pytest.approx(v, abs=1e-9) for k, v in whole.items())


def test_a_flush_returns_only_once_a_concurrent_flush_has_counted_its_batch(
        base_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``/metrics`` and the window evaluation flush, then read: while the flush thread is still counting the batch it
    took, their flush must wait for it, not return at once on an empty batch (the PSI of a window once read None
    because its score bins were half counted)."""
    import threading

    from service import observe
    from service.metrics import Metrics
    from service.scorer import Model
    from service.settings import FusionSettings, MonitoringSettings, OnnxSettings

    model = Model.load(base_bundle, OnnxSettings(), FusionSettings())
    metrics = Metrics()
    stats = observe.ModelStats(model, metrics, MonitoringSettings())
    stats.observe(random_scored(model, np.random.default_rng(0), 40), 40)
    entered, release = threading.Event(), threading.Event()
    gate_flush = observe._Gate.flush

    def slow_flush(self: Any, batch: list[dict[str, np.ndarray]]) -> None:
        entered.set()
        release.wait(10)
        gate_flush(self, batch)

    monkeypatch.setattr(observe._Gate, "flush", slow_flush)
    first = threading.Thread(target=stats.flush)
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=stats.flush)  # a reader's flush: the batch is already taken
    second.start()
    second.join(0.3)
    assert second.is_alive(), "a second flush returned while the first was still counting"
    release.set()
    first.join(10)
    second.join(10)
    candidates = [s.value for f in metrics.registry.collect() for s in f.samples if s.name == "mtrank_gate_candidates_total"]
    assert candidates and all(v == 40 for v in candidates)


@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_gate_counters_equal_the_onnx_gate_outputs(arch: str, tiny_run: Path, ple_run: Path, tmp_path: Path,
                                                   start_server: Any) -> None:
    from model.export import export_run
    from service.feature_store import StoreResult
    from service.scorer import RankInput

    bundle = export_run(tiny_run if arch == "mmoe" else ple_run, tmp_path / "src", version="g", activate=False)
    srv = serve_bundle(bundle, tmp_path, start_server)
    body = rank_body(37)
    with srv.client() as c:
        assert c.post("/rank", json=body).status_code == 200
        text = c.get("/metrics").text
    model = srv.services.registry.current
    inp = RankInput(body["user_id"], body["context"], [x["item_id"] for x in body["candidates"]],
                    [x["features"] for x in body["candidates"]])
    gates = model.manifest.gates
    outs = model.session.run([g.output for g in gates], model.encode(inp, StoreResult()))  # independent ONNX run
    if arch == "ple":  # every level and the shared gates are counted
        assert {(g.level, g.owner) for g in gates} >= {(0, "shared"), (1, "ctr"), (0, "ctr")}
    for g, w in zip(gates, outs):
        lv = {"level": str(g.level), "task": g.owner}
        w = w.astype(np.float64)
        assert metric(text, "mtrank_gate_candidates_total", **lv) == 37
        total = 0.0
        for j, e in enumerate(g.experts):
            got = metric(text, "mtrank_gate_weight_total", **lv, expert=e)
            assert got == pytest.approx(w[:, j].sum(), abs=1e-5), (g.output, e)
            assert metric(text, "mtrank_gate_top1_total", **lv, expert=e) == int((w.argmax(1) == j).sum())
            total += got
        assert total == pytest.approx(37, abs=1e-9)  # one gate's weights add up to the candidates scored
        ent = scipy_entropy(w.T) / math.log(w.shape[1])  # per candidate, normalised
        assert metric(text, "mtrank_gate_entropy_sum", **lv) == pytest.approx(ent.sum(), abs=1e-5)
        assert metric(text, "mtrank_gate_entropy_count", **lv) == 37
        assert metric(text, "mtrank_gate_entropy_bucket", **lv, le="0.5") == int((ent <= 0.5).sum())
    assert metric(text, "mtrank_model_info", version="v1", arch=arch) == 1


# ---------------------------------------------------------------------------------- routing


def test_routing_checks_pass_on_training_like_traffic(routing_bundle: Path, traffic_rows: pd.DataFrame,
                                                       tmp_path: Path, start_server: Any) -> None:
    srv = serve_bundle(routing_bundle, tmp_path, start_server)
    with srv.client() as c:
        before = c.get("/routing").json()
        assert before["status"] == "insufficient_data" and before["gates"][0]["checks"]["collapse"]["value"] is None
        post_all(c, requests_like_training(traffic_rows, 40, 50, seed=1))
        doc = c.get("/routing").json()
        text = c.get("/metrics").text
    gate = doc["gates"][0]
    assert doc["model_version"] == "v1" and gate["candidates"] == 2000
    assert doc["status"] == "pass", doc
    live, ref = np.array(gate["live_mean"]), np.array(gate["reference_mean"])
    assert 0.2 < live[0] < 0.9 and np.abs(live - ref).max() < 0.1  # the made-sensitive expert is used, not dominant
    for check in ("divergence", "dead_expert", "collapse", "entropy"):
        assert metric(text, "mtrank_routing_check", check=check, level="0", task="ctr") == 1
        assert metric(text, "mtrank_routing_check_failures_total", check=check) == 0
    assert metric(text, "mtrank_routing_divergence", level="0", task="ctr") == pytest.approx(
        gate["checks"]["divergence"]["value"], abs=1e-6)
    assert metric(text, "mtrank_monitor_window_candidates") == 2000


def test_routing_checks_fail_when_shifted_traffic_collapses_a_gate(routing_bundle: Path, traffic_rows: pd.DataFrame,
                                                                     tmp_path: Path, start_server: Any) -> None:
    srv = serve_bundle(routing_bundle, tmp_path, start_server)
    shift = {"item_price": 1e6, "item_popularity": 1e9}  # far above anything seen in training (clipped at +5 sd)
    with srv.client() as c:
        post_all(c, requests_like_training(traffic_rows, 40, 50, seed=2, shift=shift))
        doc = c.get("/routing").json()
        text = c.get("/metrics").text
    gate = doc["gates"][0]
    checks = gate["checks"]
    assert doc["status"] == "fail"
    assert checks["collapse"]["status"] == "fail" and checks["collapse"]["value"] > 0.9
    assert checks["divergence"]["status"] == "fail" and checks["divergence"]["value"] > 0.05
    assert checks["dead_expert"]["status"] == "fail"  # the other experts get (almost) nothing
    assert metric(text, "mtrank_routing_check", check="collapse", level="0", task="ctr") == 0
    assert metric(text, "mtrank_routing_check", check="divergence", level="0", task="ctr") == 0
    assert metric(text, "mtrank_routing_check_failures_total", check="collapse", level="0", task="ctr") >= 1

    # a new bundle starts a new window: its checks are not evaluated yet, the old failure does not linger
    clone_bundle(routing_bundle, srv.settings.bundles_dir, "v2", activate=True)
    with srv.client() as c:
        wait_until(lambda: c.get("/models").json()["active"] == "v2", what="v2 via CURRENT")
        text = c.get("/metrics").text
        assert c.get("/routing").json()["status"] == "insufficient_data"
    assert math.isnan(metric(text, "mtrank_routing_check", check="collapse", level="0", task="ctr"))


# ------------------------------------------------------------------------------ calibration


def _buckets(p: np.ndarray) -> np.ndarray:
    return np.minimum((p * 10).astype(np.int64), 9)  # 10 equal-width buckets, 1.0 in the last


def test_calibration_buckets_and_ece_match_numpy(base_bundle: Path, traffic_rows: pd.DataFrame, tmp_path: Path,
                                                  start_server: Any) -> None:
    srv = serve_bundle(base_bundle, tmp_path, start_server)
    bodies = requests_like_training(traffic_rows, 30, 20, seed=3)
    with srv.client() as c:
        answers = post_all(c, bodies)
        served = [(a["request_id"], it["item_id"], it["task_scores"]["ctr"]) for a in answers for it in a["items"]]
        p_all = np.array([s for _, _, s in served])
        rng = np.random.default_rng(0)
        labelled = [s for s in served if rng.random() < 0.7]
        y = (rng.random(len(labelled)) < np.minimum(1.0, 1.6 * np.array([s for _, _, s in labelled]))).astype(float)
        events = [{"request_id": r, "item_id": i, "labels": {"ctr": float(v)}} for (r, i, _), v in zip(labelled, y)]
        for k in range(0, len(events), 100):
            assert c.post("/feedback", json={"events": events[k:k + 100]}).json()["joined"] == len(events[k:k + 100])
        text = c.get("/metrics").text
        doc = c.get("/routing").json()
        # duplicates are counted once: the same events again change nothing
        assert c.post("/feedback", json={"events": events[:50]}).json() == {"accepted": 0, "duplicates": 50, "joined": 0}
        again = c.get("/metrics").text
    p = np.array([s for _, _, s in labelled])
    b_all, b = _buckets(p_all), _buckets(p)
    for k in range(10):
        lab = f"{k / 10:g}-{(k + 1) / 10:g}"
        assert metric(text, "mtrank_calibration_predictions_total", task="ctr", bucket=lab) == (b_all == k).sum()
        assert metric(text, "mtrank_calibration_predicted_probability_total", task="ctr", bucket=lab) == pytest.approx(
            p_all[b_all == k].sum(), abs=1e-5)
        assert metric(text, "mtrank_calibration_labeled_total", task="ctr", bucket=lab) == (b == k).sum()
        assert metric(text, "mtrank_calibration_positives_total", task="ctr", bucket=lab) == y[b == k].sum()
        assert metric(text, "mtrank_calibration_labeled_probability_total", task="ctr", bucket=lab) == pytest.approx(
            p[b == k].sum(), abs=1e-5)
        for name in ("mtrank_calibration_labeled_total", "mtrank_calibration_positives_total"):
            assert metric(again, name, task="ctr", bucket=lab) == metric(text, name, task="ctr", bucket=lab)
    ece = sum(abs(p[b == k].sum() - y[b == k].sum()) for k in range(10)) / len(p)
    assert doc["calibration"]["ctr"]["ece"] == pytest.approx(ece, abs=1e-5)
    assert doc["calibration"]["ctr"]["labels"] == len(p)
    assert metric(again, "mtrank_calibration_ece", task="ctr") == pytest.approx(ece, abs=1e-5)  # set by /routing


def test_psi_and_experiment_readout(base_bundle: Path, traffic_rows: pd.DataFrame, tmp_path: Path,
                                    start_server: Any) -> None:
    from mtrank.bundle import read_manifest

    srv = serve_bundle(base_bundle, tmp_path, start_server,
                       fusion={"profiles": {"ctr_only": {"type": "weighted_sum", "weights": {"ctr": 1.0}}}},
                       experiments=[{"name": "treatment", "profile": "ctr_only", "traffic": 0.5}])
    bodies = requests_like_training(traffic_rows, 30, 20, seed=4)
    with srv.client() as c:
        answers = post_all(c, bodies)
        arms = [a["arm"] for a in answers]
        positives: dict[str, int] = {}
        events = []
        for a in answers:
            for it in a["items"][:3]:
                events.append({"request_id": a["request_id"], "item_id": it["item_id"], "labels": {"ctr": 1}})
                positives[a["arm"]] = positives.get(a["arm"], 0) + 1
        assert c.post("/feedback", json={"events": events}).status_code == 200
        doc = c.get("/routing").json()
        text = c.get("/metrics").text
    assert set(arms) == {"treatment", "default"}
    for arm in ("treatment", "default"):
        assert metric(text, "mtrank_experiment_served_total", arm=arm) == 20 * arms.count(arm)
        assert metric(text, "mtrank_experiment_positives_total", arm=arm, task="ctr") == positives[arm]
    # PSI of the served calibrated ctr scores against the bundle's reference histogram, recomputed here
    hist = read_manifest(srv.settings.bundles_dir / "v1").reference.calibrated_score_hist["ctr"]
    served = np.array([it["task_scores"]["ctr"] for a in answers for it in a["items"]])
    live = np.histogram(np.clip(served, 0, 1), bins=hist.edges)[0]
    e = np.maximum(np.array(hist.counts) / sum(hist.counts), 1e-4)
    a_ = np.maximum(live / live.sum(), 1e-4)
    assert doc["drift"]["ctr"]["psi"] == pytest.approx(float(np.sum((a_ - e) * np.log(a_ / e))), abs=1e-5)
    assert metric(text, "mtrank_score_psi", task="ctr") == pytest.approx(doc["drift"]["ctr"]["psi"], abs=1e-5)


# ------------------------------------------------------------------------------- feedback join


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_feedback_joins_on_another_instance(backend: str, base_bundle: Path, tmp_path: Path, start_server: Any,
                                            request: pytest.FixtureRequest) -> None:
    """Ranked by one instance, labelled through another: joined once, counted on the labelling one."""
    if backend == "redis":
        fb = {"backend": "redis", "redis_url": request.getfixturevalue("redis_server").url}
    else:
        fb = {"backend": "sqlite", "sqlite_path": str(tmp_path / "joins.sqlite")}
    a = serve_bundle(base_bundle, tmp_path, start_server, feedback=fb)
    b = serve_bundle(base_bundle, tmp_path, start_server, feedback=fb)
    with a.client() as ca, b.client() as cb:
        items = ca.post("/rank", json=rank_body(6, request_id="cross-1")).json()["items"]
        ev = [{"request_id": "cross-1", "item_id": items[0]["item_id"], "labels": {"ctr": 1}}]
        assert cb.post("/feedback", json={"events": ev}).json() == {"accepted": 1, "duplicates": 0, "joined": 1}
        assert ca.post("/feedback", json={"events": ev}).json() == {"accepted": 0, "duplicates": 1, "joined": 0}
        text = cb.get("/metrics").text
    assert metric(text, "mtrank_calibration_labeled_total", task="ctr") == 1
    assert metric(text, "mtrank_calibration_labeled_probability_total", task="ctr") == pytest.approx(
        items[0]["task_scores"]["ctr"], abs=1e-6)
