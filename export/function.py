"""The reference body of ``rq::RQMoE`` (docs/spec.md §8) as ONNX model-local functions in standard ops.

Two functions of domain ``rq``, version 1, built with ``onnx.helper``:

- ``RQReplicaMap(topk_ids [T, K], offsets [N]) -> (phys [T, K], expert_counts [N])``: the replica rule of
  docs/spec.md §4. The rank ``n`` of an assignment among those routed to the same expert, token-major, is an
  exclusive cumulative sum over a one-hot ``[T*K, N+1]`` matrix (column ``N`` collects the dropped ids), so
  it is exact integer arithmetic with no sort. ``copy = (offsets[e] + n) mod copies[e]`` and
  ``phys = phys_base[e] + copy``; dropped assignments (ids outside ``[0, N)``) get ``-1``.
- ``RQMoE(hidden, topk_ids, topk_weights, offsets, w_in, w_out, w_in_q, w_in_scales, w_out_q, w_out_scales)
  -> (y, expert_counts)``: calls ``RQReplicaMap``, then a ``Loop`` over the physical copies that received
  assignments in this call. Each iteration gathers its tokens, runs the expert MLP with the copy's
  weights (an ``If`` on ``precision[p]``: the original-precision slot, or the INT4 slot as ``INT4`` data
  dequantized by opset-21 blocked ``DequantizeLinear``, zero point 0, ``block_size = group_size``: the exact
  product ``q * scale`` of docs/spec.md §5; in a model with INT8 copies a first ``If`` takes precision 2 to
  the INT8 slot, int8 data through the same ``DequantizeLinear``, §5a) and scales it by the routing weight. The
  ``[n, H]`` rows are scattered once into a ``[T*K, H]`` per-slot buffer and summed over ``K`` in slot order,
  like the PyTorch reference. The §5 bytes (INT8-typed initializers) are unpacked inside the loop, one active
  INT4 copy at a time: unpacking the whole stacked initializer outside it would let ONNX Runtime constant-fold
  it when the session is created, which holds twice the packed bytes as int8 for good and, while folding, about
  six times them (a 1.7 GB mid-size export peaked at 4.8 GB); per call the work stays proportional to the
  copies that received tokens.

This body is the portable definition of the op: it runs on any ONNX runtime with opset 21. ONNX Runtime's
fast route is a second file whose layers run on its fused MoE kernels (:mod:`rq.export.ort_fused`).

The body is specialised to one expert activation (every MoE layer of the supported families shares it);
:func:`rq_functions` takes it as an argument and the exporter checks that every node's ``activation``
attribute agrees. Everything else (N, K, copies, precision, group size, sizes, float type) is read from
the node's attributes and input shapes, so one function serves every MoE layer of a model.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from rq.core.experts import ACTIVATIONS
from rq.core.op import INPUTS, INPUTS_INT8, OUTPUTS, RQLayerWeights

DOMAIN = "rq"
OP_NAME = "RQMoE"
MAP_NAME = "RQReplicaMap"
VERSION = 1
MIN_OPSET = 21  # blocked DequantizeLinear with INT4 data

ATTRIBUTES = ("num_experts", "top_k", "activation", "copies", "precision", "group_size", "plugin_namespace",
              "plugin_version")

_INT = onnx.AttributeProto.INT
_INTS = onnx.AttributeProto.INTS


class _Nodes:
    """A tiny node list builder: ``b.op("Add", a, b) -> output name`` with unique names per scope."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self._n = prefix, [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, n_out: int = 1, domain: str = "",
           **attrs) -> str | list[str]:
        outs = [out] if out else [self.name(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs)
        self.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    def ref(self, op_type: str, *inputs: str, refs: dict[str, tuple[str, int]], out: str | None = None,
            domain: str = "", n_out: int = 1, **attrs) -> str | list[str]:
        """A node whose attributes ``refs`` (name -> (function attribute, type)) refer to the caller's."""
        outs = [out] if out else [self.name(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs)
        for name, (ref_name, kind) in refs.items():
            node.attribute.append(helper.make_attribute_ref(name, kind, ref_attr_name=ref_name))
        self.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=TensorProto.INT64, dims=None) -> str:
        values = value if isinstance(value, (list, tuple)) else [value]
        tensor = helper.make_tensor(self.name("c"), dtype, [len(values)] if dims is None else dims, values)
        return self.op("Constant", value=tensor)


def _replica_map_function(opset: int) -> onnx.FunctionProto:
    b = _Nodes("m_")
    copies = b.ref("Constant", refs={"value_ints": ("copies", _INTS)})  # [N] C_e
    n = b.ref("Constant", refs={"value_int": ("num_experts", _INT)})  # scalar N
    zero, one, minus_one = b.const(0, dims=[]), b.const(1, dims=[]), b.const(-1, dims=[])
    flat = b.op("Reshape", b.op("Cast", "topk_ids", to=TensorProto.INT64), b.const([-1]))  # (A,) token-major
    valid = b.op("And", b.op("GreaterOrEqual", flat, zero), b.op("Less", flat, n))
    keys = b.op("Where", valid, flat, n)  # dropped -> column N
    columns = b.op("Range", zero, b.op("Add", n, one), one)  # (N+1,)
    onehot = b.op("Cast", b.op("Equal", b.op("Unsqueeze", keys, b.const([1])), b.op("Unsqueeze", columns,
                                                                                      b.const([0]))),
                  to=TensorProto.INT64)  # (A, N+1)
    before = b.op("CumSum", onehot, zero, exclusive=1)  # assignments of the same expert earlier in the order
    rank = b.op("Squeeze", b.op("GatherElements", before, b.op("Unsqueeze", keys, b.const([1])), axis=1),
                b.const([1]))  # (A,) n of docs/spec.md §4
    all_counts = b.op("ReduceSum", onehot, b.const([0]), keepdims=0)  # (N+1,)
    b.op("Slice", all_counts, b.const([0]), b.op("Unsqueeze", n, b.const([0])), out="expert_counts")
    safe = b.op("Where", valid, flat, zero)
    copy = b.op("Mod", b.op("Add", b.op("Gather", "offsets", safe), rank), b.op("Gather", copies, safe))
    base = b.op("CumSum", copies, zero, exclusive=1)  # phys(e, 0) = sum_{j<e} C_j
    phys = b.op("Where", valid, b.op("Add", b.op("Gather", base, safe), copy), minus_one)
    b.op("Reshape", phys, b.op("Shape", "topk_ids"), out="phys")
    return helper.make_function(
        DOMAIN, MAP_NAME, ["topk_ids", "offsets"], ["phys", "expert_counts"], b.nodes,
        [helper.make_opsetid("", opset)], attributes=["num_experts", "copies"],
        doc_string="docs/spec.md §4 replica rule: phys [T, K] (-1 = dropped) and expert_counts [N] of one call.")


def _activation(b: _Nodes, h: str, activation: str) -> str:
    """``[n, I_in] -> [n, I]`` in the float type of ``h`` (gate rows first for *_glu, docs/spec.md §8)."""
    def act(x: str, kind: str) -> str:
        if kind == "relu":
            return b.op("Relu", x)
        if kind == "silu":
            return b.op("Mul", x, b.op("Sigmoid", x))
        if kind == "gelu_tanh":
            return b.op("Gelu", x, approximate="tanh")
        return b.op("Gelu", x)  # erf GELU

    if activation.endswith("_glu"):
        gate, up = b.op("Split", h, axis=-1, num_outputs=2, n_out=2)
        return b.op("Mul", act(gate, activation.removesuffix("_glu")), up)
    return act(h, activation)


def _unpack_int4(b: _Nodes, packed: str, width: str) -> str:
    """docs/spec.md §5 bytes -> int8 values: ``[..., O, ceil(W/2)]`` (INT8-typed in the file, element 2j in the
    low nibble) -> ``[..., O, W]`` in [-8, 7], ``width`` (a ``[1]`` int64) dropping an odd row's padding nibble.

    The bytes are stored INT8-typed (TensorRT's parser would widen UINT8 ones to INT32); ``Cast`` to UINT8 keeps
    their bits (two's complement)."""
    as_bytes = b.op("Cast", packed, to=TensorProto.UINT8)
    low = b.op("BitwiseAnd", as_bytes, b.const(15, TensorProto.UINT8, dims=[]))
    high = b.op("BitShift", as_bytes, b.const(4, TensorProto.UINT8, dims=[]), direction="RIGHT")
    nibbles = b.op("Concat", b.op("Unsqueeze", low, b.const([-1])), b.op("Unsqueeze", high, b.const([-1])), axis=-1)
    # explicit last dimension (2 * packed width), not -1: keeps the shape exact for any leading size
    shape = b.op("Concat", b.op("Shape", packed, end=-1), b.op("Mul", b.op("Shape", packed, start=-1), b.const([2])),
                 axis=0)
    unsigned = b.op("Cast", b.op("Reshape", nibbles, shape), to=TensorProto.INT8)  # (..., O, 2*ceil(W/2)) in 0..15
    signed = b.op("Sub", b.op("BitwiseXor", unsigned, b.const(8, TensorProto.INT8, dims=[])),
                  b.const(8, TensorProto.INT8, dims=[]))  # two's-complement nibble -> -8..7
    return b.op("Slice", signed, b.const([0]), width, b.const([-1]))  # (..., O, W)


def _dequantize(b: _Nodes, packed: str, width: str, scales: str, slot: str, like: str) -> str:
    """One INT4 copy: its §5 bytes unpacked to int8 ``[O, W]`` values, as ONNX ``INT4`` data through blocked
    ``DequantizeLinear`` (zero point 0, ``block_size = group_size``, ``ceil(W/G)`` scales: the last block may be
    partial) with its float16 scales held in float32. A 4-bit integer times a float16 is exact in float32, so
    this is the dequantized value of docs/spec.md §5 with no rounding at all (bit-identical to
    ``rq.core.int4.dequantize``); the body computes in float32 like the reference, so a float16 graph rounds
    only the op's output."""
    values = _unpack_int4(b, b.op("Gather", packed, slot, axis=0), width)  # (O, W) int8
    q = b.op("Cast", values, to=TensorProto.INT4)
    scale = b.op("Gather", scales, slot, axis=0)  # (O, ceil(W/G)) float32
    exact = b.ref("DequantizeLinear", q, scale, axis=1, refs={"block_size": ("group_size", _INT)})
    return b.op("CastLike", exact, like)


def _dequantize_int8(b: _Nodes, values: str, scales: str, slot: str, like: str) -> str:
    """One INT8 copy (docs/spec.md §5a): its int8 ``[O, W]`` values through blocked ``DequantizeLinear`` (zero
    point 0, ``block_size = group_size``) with float32 scales: the exact product ``q * scale``."""
    scale = b.op("Gather", scales, slot, axis=0)  # (O, ceil(W/G)) float32
    exact = b.ref("DequantizeLinear", b.op("Gather", values, slot, axis=0), scale, axis=1,
                  refs={"block_size": ("group_size", _INT)})
    return b.op("CastLike", exact, like)


def _expert_branch(name: str, activation: str, quantized: bool | str, xs: str, slot: str,
                   int4: tuple[tuple[str, str, str], tuple[str, str, str]]) -> onnx.GraphProto:
    """If-branch computing one copy's expert MLP on ``xs [n, H]``: reads outer-scope weights and ``slot``;
    ``int4`` names ``(packed bytes, row width, float32 scales)`` of the INT4 ``w_in`` and ``w_out``;
    ``quantized == "int8"`` reads the INT8 class instead (float32 scales named ``f_s8_in`` / ``f_s8_out``)."""
    b = _Nodes(f"{name}_")
    if quantized == "int8":
        w_in = _dequantize_int8(b, "w_in_q8", "f_s8_in", slot, xs)
        w_out = _dequantize_int8(b, "w_out_q8", "f_s8_out", slot, xs)
    elif quantized:
        w_in, w_out = (_dequantize(b, packed, width, scales, slot, xs) for packed, width, scales in int4)
    else:
        w_in = b.op("CastLike", b.op("Gather", "w_in", slot, axis=0), xs)
        w_out = b.op("CastLike", b.op("Gather", "w_out", slot, axis=0), xs)
    h = b.op("MatMul", xs, b.op("Transpose", w_in, perm=[1, 0]))  # (n, I_in)
    b.op("MatMul", _activation(b, h, activation), b.op("Transpose", w_out, perm=[1, 0]), out=f"{name}_out")
    return helper.make_graph(b.nodes, name, [], [helper.make_value_info(f"{name}_out", onnx.TypeProto())])


def _moe_function(activation: str, opset: int, int8: bool = False) -> onnx.FunctionProto:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}', expected one of {ACTIVATIONS}")
    b = _Nodes("f_")
    phys, counts = b.ref(MAP_NAME, "topk_ids", "offsets", domain=DOMAIN, n_out=2,
                         refs={"num_experts": ("num_experts", _INT), "copies": ("copies", _INTS)})
    b.op("Identity", counts, out="expert_counts")
    precision = b.ref("Constant", refs={"value_ints": ("precision", _INTS)})  # (P,) 0 original, 1 INT4
    zero, one = b.const(0, dims=[]), b.const(1, dims=[])
    # slot of each physical copy inside its precision class (docs/spec.md §8)
    if int8:  # three classes: the rank of each copy among those of its own code
        slot = zero
        for code in range(3):
            members = b.op("Equal", precision, b.const(code, dims=[]))
            rank = b.op("Sub", b.op("CumSum", b.op("Cast", members, to=TensorProto.INT64), zero), one)
            slot = b.op("Where", members, rank, slot)
    else:
        is_orig = b.op("Sub", one, precision)
        slot = b.op("Where", b.op("Equal", precision, one),
                    b.op("Sub", b.op("CumSum", precision, zero), one), b.op("Sub", b.op("CumSum", is_orig, zero), one))
    flat_phys = b.op("Reshape", phys, b.const([-1]))  # (A,)
    active = b.op("Unique", b.op("Compress", flat_phys, b.op("GreaterOrEqual", flat_phys, zero)), sorted=1)
    trips = b.op("Squeeze", b.op("Shape", active), b.const([0]))  # copies used in this call
    top_k = b.op("Shape", "topk_ids", start=1, end=2)  # (1,)
    # arithmetic in float32 whatever the graph's float type, as the reference (rq.core.op) computes
    flat_weights = b.op("Cast", b.op("Reshape", "topk_weights", b.const([-1])), to=TensorProto.FLOAT)  # (A,)
    # (packed bytes, row width, float32 scales) of the stacked INT4 copies. Row widths: w_in rows are H wide,
    # w_out rows I wide (I = the rows of w_in, halved for gated activations)
    hidden_width = b.op("Shape", "hidden", start=1, end=2)
    rows_in = b.op("Shape", "w_in_q", start=1, end=2)
    inter_width = b.op("Div", rows_in, b.const([2])) if activation.endswith("_glu") else rows_in
    int4 = (("w_in_q", hidden_width, b.op("Cast", "w_in_scales", to=TensorProto.FLOAT)),
            ("w_out_q", inter_width, b.op("Cast", "w_out_scales", to=TensorProto.FLOAT)))
    if int8:
        b.op("Cast", "w_in_scales8", to=TensorProto.FLOAT, out="f_s8_in")
        b.op("Cast", "w_out_scales8", to=TensorProto.FLOAT, out="f_s8_out")
    # rows and assignment indices of every copy are collected in sequences, then scattered once
    no_rows = b.op("SequenceConstruct", b.op("Cast", b.op("Slice", "hidden", b.const([0]), b.const([0])),
                                             to=TensorProto.FLOAT))  # [(0, H)]
    no_index = b.op("SequenceConstruct", b.op("Slice", flat_phys, b.const([0]), b.const([0])))  # [(0,)]

    lb = _Nodes("l_")  # loop body: one physical copy per iteration
    p = lb.op("Gather", active, "l_iter")  # scalar physical id
    picked = lb.op("Squeeze", lb.op("NonZero", lb.op("Equal", flat_phys, p)), lb.const([0]))  # (n,) assignments
    xs = lb.op("Cast", lb.op("Gather", "hidden", lb.op("Div", picked, top_k), axis=0), to=TensorProto.FLOAT,
               out="l_xs")  # (n, H) their tokens, float32
    p_slot = lb.op("Gather", slot, p, out="l_slot")
    code = lb.op("Gather", precision, p)
    if int8:  # If(INT8) else If(INT4) else original
        inner = _Nodes("int8_else_")
        inner.op("If", inner.op("Equal", code, one), out="int8_else_out",
                 then_branch=_expert_branch("int4", activation, True, xs, p_slot, int4),
                 else_branch=_expert_branch("orig", activation, False, xs, p_slot, int4))
        not_int8 = helper.make_graph(inner.nodes, "int8_else", [],
                                     [helper.make_value_info("int8_else_out", onnx.TypeProto())])
        out = lb.op("If", lb.op("Equal", code, lb.const(2, dims=[])), else_branch=not_int8,
                    then_branch=_expert_branch("int8", activation, "int8", xs, p_slot, int4))  # (n, H)
    else:
        out = lb.op("If", lb.op("Equal", code, one), then_branch=_expert_branch("int4", activation, True, xs, p_slot, int4),
                    else_branch=_expert_branch("orig", activation, False, xs, p_slot, int4))  # (n, H)
    scaled = lb.op("Mul", out, lb.op("Unsqueeze", lb.op("Gather", flat_weights, picked), lb.const([1])))
    lb.op("SequenceInsert", "l_rows", scaled, out="l_rows_out")
    lb.op("SequenceInsert", "l_index", picked, out="l_index_out")
    lb.op("Identity", "l_cond", out="l_cond_out")
    body = helper.make_graph(
        lb.nodes, "rq_copy_loop",
        [helper.make_tensor_value_info("l_iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("l_cond", TensorProto.BOOL, []),
         helper.make_value_info("l_rows", onnx.TypeProto()), helper.make_value_info("l_index", onnx.TypeProto())],
        [helper.make_tensor_value_info("l_cond_out", TensorProto.BOOL, []),
         helper.make_value_info("l_rows_out", onnx.TypeProto()),
         helper.make_value_info("l_index_out", onnx.TypeProto())])
    rows, index = b.op("Loop", trips, "", no_rows, no_index, body=body, n_out=2)
    per_slot_shape = b.op("Concat", b.op("Shape", flat_phys), b.op("Shape", "hidden", start=1), axis=0)
    zeros = b.op("ConstantOfShape", per_slot_shape)  # (A, H) float32; dropped rows stay 0
    per_slot = b.op("ScatterND", zeros, b.op("Unsqueeze", b.op("ConcatFromSequence", index, axis=0), b.const([1])),
                    b.op("ConcatFromSequence", rows, axis=0))  # (A, H): each assignment written once
    y_shape = b.op("Concat", b.op("Shape", "hidden", end=1), top_k, b.op("Shape", "hidden", start=1), axis=0)
    y = b.op("ReduceSum", b.op("Reshape", per_slot, y_shape), b.const([1]), keepdims=0)  # sum over k in order
    b.op("CastLike", y, "hidden", out="y")
    return helper.make_function(
        DOMAIN, OP_NAME, list(INPUTS_INT8 if int8 else INPUTS), list(OUTPUTS), b.nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)], attributes=list(ATTRIBUTES),
        doc_string=f"rq::RQMoE reference semantics (docs/spec.md §4, §5, §8), activation {activation}.")


def rq_functions(activation: str, opset: int = MIN_OPSET, int8: bool = False) -> list[onnx.FunctionProto]:
    """The model-local functions to add to a model whose ``rq::RQMoE`` nodes use ``activation``; ``int8``: the
    nodes carry the INT8 class (inputs 10-13, docs/spec.md §8), and the body runs precision 2 too. Without it
    the body is the one of files made before the INT8 class existed, byte for byte."""
    if opset < MIN_OPSET:
        raise ValueError(f"the RQMoE function body needs opset >= {MIN_OPSET} (INT4 DequantizeLinear), got {opset}")
    return [_replica_map_function(opset), _moe_function(activation, opset, int8)]


def node_attributes(layer: RQLayerWeights) -> dict:
    """The attributes of one ``rq::RQMoE`` node: the layer's (docs/spec.md §8 order), then the two that make
    TensorRT's ONNX parser pick the plugin."""
    return {**layer.attributes(), "plugin_namespace": DOMAIN, "plugin_version": str(VERSION)}
