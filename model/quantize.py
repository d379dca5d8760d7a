"""int8 dynamic quantisation of an exported graph (``mtrank export --quantize int8``).

ONNX Runtime's ``quantize_dynamic`` stores the MatMul weights as int8 and quantises each MatMul's activation
per run: a ``DynamicQuantizeLinear`` (one pass for the tensor's min and max, one to quantise it to uint8) in
front of every quantised MatMul. It places that node right before the MatMul, after whatever came before in
float32. In the experts of an MMoE or PLE that is ``Relu -> Reshape -> Transpose -> DynamicQuantizeLinear``: the
experts' packed first layer [B, E * H] is rearranged to [E, B, H] for their second layer. :func:`quantize_early`
rewrites such a chain to give the same numbers for less work:

* **quantise before moving**: data movement (Reshape, Transpose, Squeeze, Unsqueeze, Flatten) keeps every value, so
  the min and max, hence scale and zero point, are the same before it and after it; moving the uint8 tensor moves
  a quarter of the bytes;
* **ReLU folded into the quantisation**: after a ReLU the minimum is 0, so ``DynamicQuantizeLinear`` takes the zero
  point 0 and the scale max / 255, and rounds x / scale into [0, 255]; ``QuantizeLinear`` with that scale and a
  uint8 zero point 0 gives the same codes from the ReLU's input, negative values saturating to 0. One pass for
  the max (``ReduceMax``) and one to quantise, where ReLU, its write and the min-max pass were.

Measured on the production MMoE at 500 candidates: 0.90x the int8 graph's time (``docs/benchmarks.md``, table of
changes, with its command).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MOVES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})  # value-preserving data movement
_ZERO, _FLOOR, _QMAX = "mtrank_quant_zero_u8", "mtrank_quant_max_floor", "mtrank_quant_u8_max"
# The smallest max the folded scale takes: a ReLU output whose max is below it (all zeros, in practice) quantises to
# zeros with any positive scale, as DynamicQuantizeLinear's do; the floor only keeps the scale a positive normal.
MAX_FLOOR = 255.0 * float(np.finfo(np.float32).tiny)


def quantize_int8(data: bytes) -> bytes:
    """A float32 ONNX model -> ONNX Runtime's dynamic int8 quantisation of it (int8 weights, uint8 activations),
    then :func:`quantize_early`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        model = onnx.load(str(dst))
    quantize_early(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def quantize_early(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place: every ``DynamicQuantizeLinear`` fed through data movement (:data:`MOVES`) and/or
    by a ReLU quantises the tensor before the movement, and the ReLU's input with the ReLU folded in (module
    docstring). Only nodes whose output nothing else reads are moved or folded; the quantised tensor, scale and zero
    point keep their names, so their consumers are untouched. Returns the number of rewritten quantisations."""
    g = model.graph
    nodes = list(g.node)  # one list of the node objects: their ids below stay theirs
    producer = {out: node for node in nodes for out in node.output}
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in g.output:
        readers[out.name] = readers.get(out.name, 0) + 1

    def sole(tensor: str, ops: frozenset[str]) -> onnx.NodeProto | None:
        node = producer.get(tensor)
        return node if node is not None and node.op_type in ops and readers[tensor] == 1 else None

    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(DynamicQuantizeLinear) -> its replacement
    dropped: set[int] = set()
    zero_points: dict[str, str] = {}  # a folded quantisation's zero-point output -> the constant uint8 0
    for dql in nodes:
        if dql.op_type != "DynamicQuantizeLinear":
            continue
        source, moves = dql.input[0], []
        while (move := sole(source, MOVES)) is not None:
            moves.append(move)
            source = move.input[0]
        relu = sole(source, frozenset({"Relu"}))
        if not moves and relu is None:
            continue
        q, scale, zero_point = dql.output
        codes = f"{q}_unmoved" if moves else q
        if relu is not None:
            x, stem = relu.input[0], q  # new nodes are named after their tensors, which are unique
            new = [helper.make_node("ReduceMax", [x], [f"{stem}_max"], name=f"{stem}_max", keepdims=0),
                   helper.make_node("Max", [f"{stem}_max", _FLOOR], [f"{stem}_max_floor"], name=f"{stem}_max_floor"),
                   helper.make_node("Div", [f"{stem}_max_floor", _QMAX], [scale], name=f"{stem}_scale"),
                   helper.make_node("QuantizeLinear", [x, scale, _ZERO], [codes], name=f"{stem}_relu_quantized")]
            zero_points[zero_point] = _ZERO
            dropped.add(id(relu))
        else:
            new = [helper.make_node("DynamicQuantizeLinear", [source], [codes, scale, zero_point], name=dql.name)]
        for k, move in enumerate(reversed(moves)):  # replayed on the uint8 codes, in their order
            out = q if k == len(moves) - 1 else f"{move.output[0]}_uint8"
            new.append(helper.make_node(move.op_type, [codes, *move.input[1:]], [out], name=out,
                                        **{a.name: helper.get_attribute_value(a) for a in move.attribute}))
            codes = out
        replaced[id(dql)] = new
        dropped.update(id(move) for move in moves)
    if not replaced:
        return 0
    rewritten: list[onnx.NodeProto] = []
    for node in nodes:  # the replacement where the DynamicQuantizeLinear was: every input it reads exists by then
        if id(node) in replaced:
            rewritten.extend(replaced[id(node)])
        elif id(node) not in dropped:
            for i, name in enumerate(node.input):
                if name in zero_points:
                    node.input[i] = zero_points[name]
            rewritten.append(node)
    del g.node[:]
    g.node.extend(rewritten)
    if zero_points:
        g.initializer.extend([numpy_helper.from_array(np.array(0, dtype=np.uint8), _ZERO),
                              numpy_helper.from_array(np.array(MAX_FLOOR, dtype=np.float32), _FLOOR),
                              numpy_helper.from_array(np.array(255.0, dtype=np.float32), _QMAX)])
    return len(replaced)
