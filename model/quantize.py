"""int8 dynamic quantisation of an exported graph (``mtrank export --quantize int8``).

ONNX Runtime's ``quantize_dynamic`` stores the MatMul weights as int8 and quantises each MatMul's activation
per run: a ``DynamicQuantizeLinear`` (one pass for the tensor's min and max, one to quantise it to uint8) in
front of every quantised MatMul, and after it ``MatMulInteger -> Cast -> Mul`` (the int32 product scaled back to
float32), then any bias of the layer as an ``Add``. Everything around the GEMMs stays float32, one pass over memory
per node. In the experts of an MMoE or PLE, whose packed first layer [B, E * H] is large, that is ``Add`` (the
split first layer's request part, ``model.layers.SplitInput``) ``-> Relu -> Reshape -> Transpose ->
DynamicQuantizeLinear`` (rearranged to [E, B, H] for the experts' second layer). Two rewrites give the same numbers,
bit for bit, for fewer passes:

* :func:`bias_into_gemm`, **the addend as the GEMM's bias**: ONNX Runtime's ``MatMulIntegerToFloat`` (a contrib op;
  its optimiser fuses ``MatMulInteger -> Cast -> Mul`` into it anyway) adds a bias of [N] while it writes the
  product. A constant [N] bias goes there; any other addend (the request part: [1, N] when served, [n, N] when the
  request features come row-aligned, as in validation) through an ``If`` on its size: N values, the bias; else the
  ``Add`` as before.
* :func:`quantize_early`, **quantise before moving**: data movement (Reshape, Transpose, Squeeze, Unsqueeze,
  Flatten) keeps every value, so the min and max, hence scale and zero point, are the same before it and after it;
  moving the uint8 tensor moves a quarter of the bytes. **The ReLU folded into the quantisation**: after a ReLU the
  minimum is 0, so ``DynamicQuantizeLinear`` takes the zero point 0 and the scale max / 255, and rounds x / scale
  into [0, 255]; ``QuantizeLinear`` with that scale and a uint8 zero point 0 gives the same codes from the ReLU's
  input, negative values saturating to 0. One pass for the max (``ReduceMax``) and one to quantise, where ReLU, its
  write and the min-max pass were.

Measured on the production MMoE at 500 candidates: the int8 graph in 0.82x its time (``docs/benchmarks.md``, model
speed, with the command).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MOVES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})  # value-preserving data movement
CONTRIB = "com.microsoft"  # ONNX Runtime's contrib operators (MatMulIntegerToFloat)
_ZERO, _FLOOR, _QMAX = "mtrank_quant_zero_u8", "mtrank_quant_max_floor", "mtrank_quant_u8_max"
_FLAT = "mtrank_quant_flat"  # the shape [-1]
# The smallest max the folded scale takes: a ReLU output whose max is below it (all zeros, in practice) quantises to
# zeros with any positive scale, as DynamicQuantizeLinear's do; the floor only keeps the scale a positive normal.
MAX_FLOOR = 255.0 * float(np.finfo(np.float32).tiny)


def quantize_int8(data: bytes) -> bytes:
    """A float32 ONNX model -> ONNX Runtime's dynamic int8 quantisation of it (int8 weights, uint8 activations),
    then :func:`bias_into_gemm` and :func:`quantize_early`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        model = onnx.load(str(dst))
    bias_into_gemm(model)
    quantize_early(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _Graph:
    """A graph's nodes with who writes and how many read each tensor; :meth:`commit` swaps nodes for replacements."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.nodes = list(self.graph.node)  # one list of the node objects: their ids below stay theirs
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.readers: dict[str, int] = {}  # reads in subgraphs (an If's branches) count too
        for name in [i for node in self.nodes for i in _reads(node)] + [o.name for o in self.graph.output]:
            self.readers[name] = self.readers.get(name, 0) + 1
        self.constants = {t.name: t for t in self.graph.initializer}
        self.replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> the nodes in its place
        self.dropped: set[int] = set()

    def sole(self, tensor: str, ops: frozenset[str]) -> onnx.NodeProto | None:
        """The node of one of ``ops`` writing ``tensor``, when nothing else reads it; else None."""
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type in ops and self.readers[tensor] == 1 else None

    def commit(self, renamed: dict[str, str], constants: list[onnx.TensorProto]) -> int:
        """Each replacement where its node was (every tensor it reads exists by then), dropped nodes gone, inputs
        renamed, ``constants`` added; the number of replaced nodes."""
        if not self.replaced:
            return 0
        nodes: list[onnx.NodeProto] = []
        for node in self.nodes:
            if id(node) in self.replaced:
                nodes.extend(self.replaced[id(node)])
            elif id(node) not in self.dropped:
                _rename(node, renamed)
                nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.graph.initializer.extend(c for c in constants if c.name not in self.constants)
        return len(self.replaced)


def _subgraph_nodes(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The nodes of ``node``'s subgraphs (an If's branches, a Loop's body), nested ones included."""
    inner = [n for a in node.attribute for g in [*([a.g] if a.HasField("g") else []), *a.graphs] for n in g.node]
    return inner + [m for n in inner for m in _subgraph_nodes(n)]


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads, its subgraphs' reads included (a branch may read any tensor of the graph)."""
    return [*node.input, *(i for n in _subgraph_nodes(node) for i in n.input)]


def _rename(node: onnx.NodeProto, renamed: dict[str, str]) -> None:
    """``node``'s inputs, and its subgraphs' nodes' inputs, renamed by ``renamed``."""
    for n in [node, *_subgraph_nodes(node)]:
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)


def bias_into_gemm(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place: every ``Add`` of a float32 tensor to an int8 GEMM's output (``MatMulInteger`` of a
    2-D int8 weight [K, N] ``-> Cast -> Mul`` by the product of the two scales, as ``quantize_dynamic`` writes it)
    becomes ``MatMulIntegerToFloat`` with the addend as its bias (module docstring): directly for a constant [N];
    through an ``If`` on its size for an addend whose last dimension is N and whose rank is at most the GEMM input's
    (by ONNX shape inference), so that with N values it is [1, .., 1, N], the bias broadcast as the ``Add`` did. The
    ``Add``'s output keeps its name. Returns the number of rewritten ``Add`` nodes."""
    g = _Graph(model)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.input, *inferred.value_info] if v.type.tensor_type.HasField("shape")}
    constants: list[onnx.TensorProto] = []  # each If's N
    for add in g.nodes:
        for k, product in enumerate(add.input if add.op_type == "Add" else ()):
            gemm = _int8_gemm(g, product)
            if gemm is None:
                continue
            mmi, nodes, (a_scale, b_scale), n = gemm
            addend, out = add.input[1 - k], add.output[0]
            args = [mmi.input[0], mmi.input[1], a_scale, b_scale, mmi.input[2], mmi.input[3]]
            const, shape, rank = g.constants.get(addend), shapes.get(addend), len(shapes.get(mmi.input[0], ()))
            if const is not None and list(const.dims) == [n]:
                new = [helper.make_node("MatMulIntegerToFloat", [*args, addend], [out], name=out, domain=CONTRIB)]
            elif const is None and shape and shape[-1] == n and len(shape) <= rank:
                size, is_bias = f"{out}_addend_size", f"{out}_addend_is_bias"
                then = helper.make_graph(
                    [helper.make_node("Reshape", [addend, _FLAT], [f"{out}_bias"], name=f"{out}_bias"),
                     helper.make_node("MatMulIntegerToFloat", [*args, f"{out}_bias"], [f"{out}_then"],
                                      name=f"{out}_then", domain=CONTRIB)],
                    f"{out}_then", [], [helper.make_tensor_value_info(f"{out}_then", onnx.TensorProto.FLOAT, None)])
                other = helper.make_graph(
                    [helper.make_node("MatMulIntegerToFloat", args, [f"{out}_product"], name=f"{out}_product",
                                      domain=CONTRIB),
                     helper.make_node("Add", [f"{out}_product", addend], [f"{out}_else"], name=f"{out}_else")],
                    f"{out}_else", [], [helper.make_tensor_value_info(f"{out}_else", onnx.TensorProto.FLOAT, None)])
                constants.append(numpy_helper.from_array(np.array(n, dtype=np.int64), f"{out}_n"))
                new = [helper.make_node("Size", [addend], [size], name=size),
                       helper.make_node("Equal", [size, f"{out}_n"], [is_bias], name=is_bias),
                       helper.make_node("If", [is_bias], [out], name=out, then_branch=then, else_branch=other)]
            else:
                continue
            g.replaced[id(add)] = new
            g.dropped.update(map(id, nodes))
            break
    if g.replaced and not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    if constants:  # an If was made: its branch reshapes the addend with [-1]
        constants.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), _FLAT))
    return g.commit({}, constants)


def _int8_gemm(g: _Graph, product: str) -> tuple[onnx.NodeProto, list[onnx.NodeProto], tuple[str, str], int] | None:
    """``product`` as ``quantize_dynamic`` writes an int8 GEMM of a 2-D weight [K, N], each node read only by the
    next: ``MatMulInteger(A, W) -> Cast(float) -> Mul(., Mul(a_scale, w_scale))``. (the MatMulInteger, the nodes
    to drop, the activation's and the weight's scales, N); None for anything else."""
    mul = g.sole(product, frozenset({"Mul"}))
    for j, name in enumerate(mul.input if mul is not None else ()):
        cast = g.sole(name, frozenset({"Cast"}))
        scales = g.sole(mul.input[1 - j], frozenset({"Mul"}))
        to = next((a.i for a in cast.attribute if a.name == "to"), None) if cast is not None else None
        mmi = g.sole(cast.input[0], frozenset({"MatMulInteger"})) if to == onnx.TensorProto.FLOAT else None
        weight = g.constants.get(mmi.input[1]) if mmi is not None and len(mmi.input) == 4 else None
        if scales is None or weight is None or len(weight.dims) != 2:
            continue
        a_scale, w_scale = sorted(scales.input, key=lambda t: t in g.constants)  # the weight's: a constant
        return mmi, [mmi, cast, scales, mul], (a_scale, w_scale), int(weight.dims[1])
    return None


def quantize_early(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place: every ``DynamicQuantizeLinear`` fed through data movement (:data:`MOVES`) and/or
    by a ReLU quantises the tensor before the movement, and the ReLU's input with the ReLU folded in (module
    docstring). Only nodes whose output nothing else reads are moved or folded; the quantised tensor, scale and zero
    point keep their names, so their consumers are untouched. Returns the number of rewritten quantisations."""
    g = _Graph(model)
    zero_points: dict[str, str] = {}  # a folded quantisation's zero-point output -> the constant uint8 0
    for dql in g.nodes:
        if dql.op_type != "DynamicQuantizeLinear":
            continue
        source, moves = dql.input[0], []
        while (move := g.sole(source, MOVES)) is not None:
            moves.append(move)
            source = move.input[0]
        relu = g.sole(source, frozenset({"Relu"}))
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
            g.dropped.add(id(relu))
        else:
            new = [helper.make_node("DynamicQuantizeLinear", [source], [codes, scale, zero_point], name=dql.name)]
        for k, move in enumerate(reversed(moves)):  # replayed on the uint8 codes, in their order
            out = q if k == len(moves) - 1 else f"{move.output[0]}_uint8"
            new.append(helper.make_node(move.op_type, [codes, *move.input[1:]], [out], name=out,
                                        **{a.name: helper.get_attribute_value(a) for a in move.attribute}))
            codes = out
        g.replaced[id(dql)] = new
        g.dropped.update(id(move) for move in moves)
    folded = [numpy_helper.from_array(np.array(0, dtype=np.uint8), _ZERO),
              numpy_helper.from_array(np.array(MAX_FLOOR, dtype=np.float32), _FLOOR),
              numpy_helper.from_array(np.array(255.0, dtype=np.float32), _QMAX)]
    return g.commit(zero_points, folded if zero_points else [])
