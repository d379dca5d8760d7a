"""mtrank.onnx_load: large initializers read once from the file, same session answers as a load by path."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mtrank.bundle import MODEL, verify_bundle  # noqa: E402
from mtrank.onnx_load import FOLDER_KEY, WEIGHTS_ATTR, lean_model, session  # noqa: E402

PROVIDERS = ["CPUExecutionProvider"]


def _options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return opts


def embedding_model(path: Path, rows: int = 1000, dim: int = 8) -> dict[str, np.ndarray]:
    """ids [n] -> Gather(table [rows, dim]) -> MatMul(w [dim, 3]) + b [3]; written to ``path``; the weights."""
    rng = np.random.default_rng(0)
    weights = {"table": rng.standard_normal((rows, dim)).astype(np.float32),
               "w": rng.standard_normal((dim, 3)).astype(np.float32), "b": np.arange(3, dtype=np.float32)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"]), helper.make_node("MatMul", ["emb", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return weights


def test_lean_model_points_at_the_raw_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    weights = embedding_model(path)
    lean = lean_model(path, min_bytes=64)
    assert lean is not None
    assert {w.name: w.dims for w in lean.weights} == {"table": (1000, 8), "w": (8, 3)}  # b (12 bytes) stays embedded
    data = path.read_bytes()
    for w in lean.weights:
        assert data[w.offset:w.offset + w.length] == weights[w.name].tobytes()
        np.testing.assert_array_equal(w.read(path), weights[w.name])
    assert len(lean.model) < 1000  # the table's 32 kB are not in it
    parsed = onnx.load_from_string(lean.model)
    ext = {t.name: {e.key: e.value for e in t.external_data} for t in parsed.graph.initializer if t.external_data}
    assert ext["table"] == {"location": "m.onnx", "offset": str(lean.weights[0].offset), "length": "32000"}
    assert parsed.graph.node == onnx.load(path).graph.node


def test_session_answers_like_a_load_by_path(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    embedding_model(path)
    ids = {"ids": np.array([0, 5, 999, 5], dtype=np.int64)}
    want = ort.InferenceSession(str(path), _options(), providers=PROVIDERS).run(None, ids)
    opts = _options()
    sess = session(path, opts, PROVIDERS, min_bytes=64)
    assert opts.get_session_config_entry(FOLDER_KEY) == str(tmp_path.resolve())
    assert len(getattr(sess, WEIGHTS_ATTR)) == 2
    del opts
    gc.collect()  # the OrtValues onnxruntime points into live as long as the session
    np.testing.assert_array_equal(sess.run(None, ids)[0], want[0])


def test_small_or_unreadable_models_load_by_path(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    embedding_model(path, rows=4)
    assert lean_model(path) is None  # nothing reaches the default 1 MiB: loaded by path
    assert not hasattr(session(path, _options(), PROVIDERS), WEIGHTS_ATTR)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    assert lean_model(junk, min_bytes=1) is None
    with pytest.raises(Exception) as by_path:
        ort.InferenceSession(str(junk), providers=PROVIDERS)
    with pytest.raises(type(by_path.value)):  # onnxruntime reports a broken file itself, as before
        session(junk, _options(), PROVIDERS, min_bytes=1)


def test_external_tensors_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    embedding_model(path)
    model = onnx.load(path)
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=1024)
    assert lean_model(path, min_bytes=1) is not None  # w and b are still embedded
    assert {w.name for w in lean_model(path, min_bytes=1).weights} == {"w", "b"}
    ids = {"ids": np.array([1, 2], dtype=np.int64)}
    want = ort.InferenceSession(str(path), providers=PROVIDERS).run(None, ids)[0]
    np.testing.assert_array_equal(session(path, _options(), PROVIDERS, min_bytes=1).run(None, ids)[0], want)


def test_verify_bundle_with_a_lean_session(tmp_path: Path, make_bundle) -> None:
    """Every check of a real bundle passes on a lean session (every initializer externalised), same outputs."""
    bundle = make_bundle(tmp_path / "bundles")
    manifest, sess = verify_bundle(bundle, lambda p: session(p, _options(), PROVIDERS, min_bytes=1))
    assert getattr(sess, WEIGHTS_ATTR)
    ref = ort.InferenceSession(str(bundle / MODEL), providers=PROVIDERS)
    rng = np.random.default_rng(0)
    inputs = {i.name: (rng.integers(0, 50, (7, i.shape[1])) if "ids" in i.name else rng.standard_normal((7, i.shape[1])))
              .astype(np.int64 if "ids" in i.name else np.float32) for i in ref.get_inputs()}
    for got, want in zip(sess.run(None, inputs), ref.run(None, inputs)):
        np.testing.assert_array_equal(got, want)
