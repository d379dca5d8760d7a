"""int8 quantisation (``model.quantize``): the rewrite of ONNX Runtime's dynamic quantisation gives its numbers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from model.quantize import bias_into_gemm, quantize_early, quantize_int8

EXPERTS, HIDDEN, OUT, IN = 2, 4, 3, 6


def _experts_graph(relu_readers: int, sign: float = 1.0) -> bytes:
    """x [B, 6] -> MatMul [6, 8] -> Relu -> Reshape [B, 2, 4] -> Transpose [2, B, 4] -> MatMul [2, 4, 3] -> y:
    an MMoE's packed experts in miniature; ``relu_readers`` 2 also returns the ReLU's output (then it must stay);
    ``sign`` -1: the first layer's weights all negative (non-negative inputs then give the ReLU nothing but zeros)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(IN, EXPERTS * HIDDEN)).astype(np.float32)
    inits = [numpy_helper.from_array(w1 if sign > 0 else -np.abs(w1), "w1"),
             numpy_helper.from_array(rng.normal(size=(EXPERTS, HIDDEN, OUT)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1, EXPERTS, HIDDEN], dtype=np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["e"]), helper.make_node("Transpose", ["e"], ["t"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [EXPERTS, "B", OUT])]
    if relu_readers == 2:
        outs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["B", EXPERTS * HIDDEN]))
    graph = helper.make_graph(nodes, "experts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", IN])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _dynamic(data: bytes, tmp_path) -> bytes:
    """ONNX Runtime's quantize_dynamic alone (what quantize_int8 did before the rewrite)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    src.write_bytes(data)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst.read_bytes()


def _run(data: bytes, x: np.ndarray, **more: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, **more})


def _ops(data: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(data).graph.node]


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["mixed", "zeros"])  # zeros: the ReLU outputs nothing else
def test_relu_folded_and_quantized_before_moving_gives_the_same_numbers(tmp_path, sign: float) -> None:
    data = _experts_graph(relu_readers=1, sign=sign)
    x = np.random.default_rng(1).normal(size=(37, IN)).astype(np.float32)
    x = x if sign > 0 else np.abs(x)
    plain, early = _dynamic(data, tmp_path), quantize_int8(data)
    assert "Relu" in _ops(plain) and "Relu" not in _ops(early) and "QuantizeLinear" in _ops(early)
    graph = onnx.load_from_string(early).graph
    transpose = next(n for n in graph.node if n.op_type == "Transpose")
    assert _producer_op(graph, transpose.input[0]) == "Reshape"  # moved: on the codes, after the quantisation
    assert _producer_op(graph, next(n for n in graph.node if n.op_type == "Reshape").input[0]) == "QuantizeLinear"
    (want,), (got,) = _run(plain, x), _run(early, x)
    np.testing.assert_array_equal(got, want)
    assert want.any() == (sign > 0)


def test_a_relu_read_elsewhere_stays_and_only_the_move_is_rewritten(tmp_path) -> None:
    data = _experts_graph(relu_readers=2)
    x = np.random.default_rng(2).normal(size=(11, IN)).astype(np.float32)
    model = onnx.load_from_string(_dynamic(data, tmp_path))
    assert quantize_early(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Relu" in ops and "QuantizeLinear" not in ops
    dql = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear" and _producer_op(model.graph, n.input[0]) == "Relu")
    assert dql.input[0] == "r"
    for want, got in zip(_run(_dynamic(data, tmp_path), x), _run(model.SerializeToString(), x)):
        np.testing.assert_array_equal(got, want)


def test_nothing_to_rewrite_leaves_the_graph_alone(tmp_path) -> None:
    rng = np.random.default_rng(3)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", OUT])],
                              [numpy_helper.from_array(rng.normal(size=(IN, OUT)).astype(np.float32), "w")])
    model = onnx.load_from_string(_dynamic(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                           .SerializeToString(), tmp_path))
    before = model.SerializeToString()
    assert bias_into_gemm(model) == 0 and quantize_early(model) == 0 and model.SerializeToString() == before


def _split_layer_graph() -> bytes:
    """x [B, 6] @ W1 [6, 8] + request [R, 8] (R = 1 or B: the split first layer's request part) -> Relu -> @ W2
    [8, 3] + b2 [3] -> y [B, 3]."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=(IN, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8, OUT)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(OUT,)).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["request", "h"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", IN]),
                                               helper.make_tensor_value_info("request", TensorProto.FLOAT, ["R", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", OUT])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("rows", [1, 23], ids=["one-request", "row-aligned"])
def test_biases_and_the_request_part_go_into_the_int8_gemms(tmp_path, rows: int) -> None:
    """A constant bias becomes the GEMM's bias; the request part too when it is one row (the If's branch), and is
    added after the GEMM when it has a row per candidate: the plain quantisation's numbers either way."""
    data = _split_layer_graph()
    rng = np.random.default_rng(6)
    x, request = rng.normal(size=(23, IN)).astype(np.float32), rng.normal(size=(rows, 8)).astype(np.float32)
    model = onnx.load_from_string(_dynamic(data, tmp_path))
    assert bias_into_gemm(model) == 2
    top = [n.op_type for n in model.graph.node]
    assert "Add" not in top and "MatMulInteger" not in top and top.count("If") == 1
    (want,), (got,) = _run(_dynamic(data, tmp_path), x, request=request), _run(model.SerializeToString(), x, request=request)
    np.testing.assert_array_equal(got, want)
    (early,) = _run(quantize_int8(data), x, request=request)  # both rewrites: the ReLU after the If folded
    np.testing.assert_array_equal(early, want)


def test_a_folded_relu_feeding_an_if_branch(tmp_path) -> None:
    """x @ W1 -> Relu -> @ W2 + request [R, 3]: the second GEMM becomes an If whose branches read the ReLU's
    quantisation, which is then folded; the branches must read the folded zero point (renamed inside them too)."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(size=(IN, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8, OUT)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["o"]), helper.make_node("Add", ["o", "request"], ["y"])]
    graph = helper.make_graph(nodes, "relu_if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", IN]),
                                                 helper.make_tensor_value_info("request", TensorProto.FLOAT, ["R", OUT])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", OUT])], inits)
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    early = quantize_int8(data)
    assert {"If", "QuantizeLinear"} <= set(_ops(early)) and "Relu" not in _ops(early)
    x = rng.normal(size=(9, IN)).astype(np.float32)
    for rows in (1, 9):
        request = rng.normal(size=(rows, OUT)).astype(np.float32)
        (want,), (got,) = _run(_dynamic(data, tmp_path), x, request=request), _run(early, x, request=request)
        np.testing.assert_array_equal(got, want)


def _producer_op(graph: onnx.GraphProto, tensor: str) -> str | None:
    return next((n.op_type for n in graph.node if tensor in n.output), None)
