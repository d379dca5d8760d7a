"""Export: ONNX round trip per architecture, verify, calibration, int8 guard, atomic pointer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtrank.bundle import (
    BundleError,
    load_golden,
    onnx_runner,
    read_current,
    read_manifest,
    verify_bundle,
    write_current,
)
from mtrank.metrics import ece
from tests.conftest import demo_config

ARCHS = ["single", "shared_bottom", "mmoe", "cgc", "ple", "ple+bn", "mmoe+pl"]
# +pl: the numeric features unclipped with piecewise-linear columns (several dense columns per feature)
PIECEWISE = [f"features.{i}.{k}" for i in (3, 8, 10) for k in ("encoding=piecewise_linear", "clip=null")]


@pytest.fixture(scope="module", params=ARCHS)
def arch_bundle(request, tmp_path_factory, demo_data: Path) -> tuple[Path, Path]:
    from model.export import export_run
    from model.train import train

    arch, _, variant = request.param.partition("+")
    run = tmp_path_factory.mktemp(f"run_{arch}")
    overrides = [f"model.arch={arch}", "model.levels=2", "train.epochs=1", f"model.batch_norm={variant == 'bn'}",
                 *(PIECEWISE if variant == "pl" else [])]
    train(demo_config(demo_data, overrides), run)
    bundles = tmp_path_factory.mktemp(f"bundles_{arch}")
    return run, export_run(run, bundles, version=f"{arch}{variant}-1")


def test_round_trip_matches_torch(arch_bundle: tuple[Path, Path]) -> None:
    """ONNX Runtime reproduces PyTorch's scores and gate weights on the whole validation split."""
    from model.data import Split
    from model.evaluate import predict, to_tensors
    from model.train import load_run

    run, bundle = arch_bundle
    manifest, _ = verify_bundle(bundle)
    _, _, model = load_run(run)
    val = Split.load(run / "val.npz")
    scores, gates = predict(model, to_tensors(val))
    got = onnx_runner(bundle / "model.onnx")({k: v for k, v in val.inputs.items()})
    for t in manifest.tasks:
        np.testing.assert_allclose(got[t.output], scores[t.name], atol=1e-5, rtol=0)
    assert len(manifest.gates) == len(gates)
    for g in manifest.gates:
        w = got[g.output]
        assert w.shape == (len(val), len(g.experts))
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(w, gates[g.output], atol=1e-5, rtol=0)
    # ESMM chain survives export: pCTCVR = pCTR * pCVR
    np.testing.assert_allclose(got["p_ctcvr"], got["p_ctr"] * got["p_cvr"], atol=1e-6)


def test_manifest_contract(arch_bundle: tuple[Path, Path]) -> None:
    _, bundle = arch_bundle
    m = read_manifest(bundle)
    assert m.opset >= 17
    assert [t.name for t in m.tasks] == ["ctr", "like", "ctcvr", "watch_time", "cvr"]
    assert m.task("cvr").derived and not m.task("ctr").derived
    assert set(m.calibration) == {"ctr", "like", "ctcvr"}
    assert set(m.reference.score_hist) == {"ctr", "like", "ctcvr", "watch_time", "cvr"}
    assert set(m.reference.gate_mean) == {g.output for g in m.gates}
    for g in m.gates:
        assert sum(m.reference.gate_mean[g.output]) == pytest.approx(1.0, abs=1e-4)
    assert set(m.files) == {"model.onnx", "golden.json"}
    assert not list(bundle.parent.glob(".*tmp*")), "temporary export directory left behind"


def test_request_batch_of_one_in_onnx(arch_bundle: tuple[Path, Path]) -> None:
    """The serving layout: one request row broadcast over many candidates."""
    _, bundle = arch_bundle
    inputs, _ = load_golden(bundle)
    run = onnx_runner(bundle / "model.onnx")
    n = len(inputs["item_ids"])
    one = {k: (v[:1] if k.startswith("request") else v) for k, v in inputs.items()}
    rep = {k: (np.repeat(v[:1], n, axis=0) if k.startswith("request") else v) for k, v in inputs.items()}
    a, b = run(one), run(rep)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6)


def test_onnx_request_side_of_first_layer_runs_once(arch_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """The split first layer in the exported graph, observed in an ORT profile of one request and 7 candidates:
    every first-level consumer (bottom / experts, level-0 gates) multiplies the request part at [1, Ir], and
    no MatMul reads the broadcast request part [7, Ir] or the concatenated input [7, I]."""
    import onnxruntime as ort
    import torch

    from model.layers import Gate
    from model.train import load_run

    run, bundle = arch_bundle
    _, _, model = load_run(run)
    first = [model.body] if model.body is not None else [
        m for m in (model.levels[0].task_experts, model.levels[0].shared_experts, *model.levels[0].gates,
                    model.levels[0].shared_gate) if m is not None]
    ir = model.request_dim
    i_all = model.body.weights[0].shape[1] if model.body is not None else model.levels[0].gates[0].linear.in_features
    inputs, _ = load_golden(bundle)
    b = 7
    feed = {k: (v[:1] if k.startswith("request") else np.repeat(v[:1], b, axis=0)) for k, v in inputs.items()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "profile")
    sess = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [(e["args"]["op_name"], tuple(next(iter(e["args"]["input_type_shape"][0].values())))) for e in events
               if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    a_shapes = [shape for op, shape in kernels
                if op in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulInteger", "DynamicQuantizeMatMul")]
    assert a_shapes.count((1, ir)) == len(first), a_shapes
    assert (b, ir) not in a_shapes and (b, i_all) not in a_shapes, a_shapes
    # the item part of an MLP's first layer: one Gemm adding the request's product, its ReLU fused (no batch norm
    # between them); the gates' (softmax next) stay Gemm
    mlps = [m for m in first if not isinstance(m, Gate)]
    fused = 0 if any(not isinstance(norm, torch.nn.Identity) for m in mlps for norm in m.norms) else len(mlps)
    assert [op for op, shape in kernels if shape == (b, i_all - ir)].count("FusedGemm") == fused, kernels


def _copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_rejects_corrupted_model(arch_bundle, tmp_path: Path) -> None:
    bundle = _copy_bundle(arch_bundle[1], tmp_path / "b")
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch"):
        verify_bundle(bundle)


def test_verify_rejects_bad_manifest(arch_bundle, tmp_path: Path) -> None:
    bundle = _copy_bundle(arch_bundle[1], tmp_path / "b")
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        verify_bundle(bundle)
    raw = json.loads((arch_bundle[1] / "manifest.json").read_text())
    del raw["tasks"]
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"invalid manifest.*tasks"):
        verify_bundle(bundle)


def test_verify_rejects_wrong_golden(arch_bundle, tmp_path: Path) -> None:
    """A consistent checksum but a model that does not reproduce its golden outputs is rejected."""
    from mtrank.bundle import sha256_file

    bundle = _copy_bundle(arch_bundle[1], tmp_path / "b")
    golden = json.loads((bundle / "golden.json").read_text())
    golden["outputs"]["p_ctr"][0] = golden["outputs"]["p_ctr"][0] + 0.5
    (bundle / "golden.json").write_text(json.dumps(golden))
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["files"]["golden.json"] = sha256_file(bundle / "golden.json")
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"golden: output 'p_ctr'"):
        verify_bundle(bundle)


def test_cli_verify_exit_codes(arch_bundle, tmp_path: Path, capsys) -> None:
    from mtrank.cli import main

    assert main(["bundle", "verify", str(arch_bundle[1])]) == 0
    bundle = _copy_bundle(arch_bundle[1], tmp_path / "b")
    (bundle / "golden.json").unlink()
    assert main(["bundle", "verify", str(bundle)]) != 0
    assert "golden.json: missing" in capsys.readouterr().err


def test_current_pointer(tiny_run: Path, tmp_path: Path, make_bundle) -> None:
    a = make_bundle(tmp_path, "a")
    assert read_current(tmp_path) == "a"
    make_bundle(tmp_path, "b", activate=False)
    assert read_current(tmp_path) == "a"
    write_current(tmp_path, "b")
    assert read_current(tmp_path) == "b"
    with pytest.raises(BundleError):
        write_current(tmp_path, "missing")
    with pytest.raises(BundleError, match="already exists"):
        make_bundle(tmp_path, "a")
    assert a.is_dir()


def test_calibration_lowers_ece_on_miscalibrated_scores() -> None:
    from model.calibrate import fit_calibration

    rng = np.random.default_rng(0)
    true_p = rng.beta(1, 6, size=20_000)
    y = (rng.random(20_000) < true_p).astype(np.float64)
    overconfident = np.clip(true_p ** 0.5, 1e-4, 1 - 1e-4)  # systematically too high
    cal = fit_calibration(overconfident, y)
    assert cal.method in ("isotonic", "platt")
    assert cal.ece_before > 0.1
    fixed = cal.apply(overconfident)
    assert ece(y, fixed) < cal.ece_before / 4
    assert cal.ece_after == pytest.approx(ece(y, fixed))
    assert np.all(np.diff(cal.y) >= -1e-12), "calibration map must be monotone"


def test_int8_guard(tiny_run: Path, tmp_path: Path) -> None:
    from model.export import ExportError, export_run

    with pytest.raises(ExportError, match="int8 lowers validation AUC"):
        export_run(tiny_run, tmp_path, version="q-refused", quantize="int8", max_auc_drop=-1.0)
    assert not (tmp_path / "q-refused").exists()
    bundle = export_run(tiny_run, tmp_path, version="q", quantize="int8", max_auc_drop=0.05)
    m, _ = verify_bundle(bundle)
    assert m.quantization.mode == "int8"
    assert set(m.quantization.auc_delta) == {"ctr", "like", "ctcvr"}
    assert m.quantization.max_abs_diff is not None and m.quantization.max_abs_diff > 0


def test_int8_rewrite_changes_no_output(arch_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """``model.quantize``'s rewrites of ONNX Runtime's dynamic quantisation (biases and the request part into the
    int8 GEMMs; quantise before the experts' reshaping, the ReLU folded into the quantisation) give the plain
    quantisation's outputs on the whole validation split, row-aligned and as one request's candidates, and leave no
    ReLU or data movement in float32 before a quantisation, and no Add after an int8 GEMM."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from model.data import Split
    from model.quantize import MOVES, _Graph, _int8_gemm, quantize_int8

    run, bundle = arch_bundle
    plain, early = tmp_path / "plain.onnx", tmp_path / "early.onnx"
    quantize_dynamic(str(bundle / "model.onnx"), str(plain), weight_type=QuantType.QInt8)
    early.write_bytes(quantize_int8((bundle / "model.onnx").read_bytes()))
    rows = Split.load(run / "val.npz").inputs  # row-aligned: every row its own request (the If's other branch)
    served = {k: v[:1] if k.startswith("request") else v for k, v in rows.items()}  # one request, as /rank sends
    split = any(k.startswith("item") for k in rows)  # the split first layer: its request part through an If
    for inputs in (rows, served) if split else (rows,):
        want, got = onnx_runner(plain)(inputs), onnx_runner(early)(inputs)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    g = _Graph(onnx.load(str(early)))
    ops = [n.op_type for n in g.nodes]
    fed = [g.producer[n.input[0]].op_type for n in g.nodes if n.op_type == "DynamicQuantizeLinear" and n.input[0] in g.producer]
    assert not {"Relu", *MOVES} & set(fed), fed
    assert ops.count("QuantizeLinear") >= 1  # every architecture has a ReLU'd tower layer
    assert not [n.name for n in g.nodes if n.op_type == "Add" and any(_int8_gemm(g, i) for i in n.input)]
    assert ("If" in ops) == split
