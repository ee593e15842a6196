"""ONNX Runtime's fast route: ``model.ort.onnx``, the exported graph with each ``rq::RQMoE`` node run on ONNX
Runtime's own fused MoE kernels (docs/spec.md §8, "Files and runtimes").

Per MoE layer, with the layer's ``P`` copies split into ``P_int4`` INT4 and ``P_orig`` original-precision ones:

1. ``phys, expert_counts = rq::RQReplicaMap(topk_ids, offsets)``: the replica rule (§4), exact integers, the
   same model-local function as the portable body;
2. the routing weights scattered into dense per-class matrices ``W_q [T, P_int4]`` and ``W_o [T, P_orig]``
   (column = the copy's slot in its class; dropped assignments and the other class go to a spare column
   that is sliced off);
   The INT4 class has one column per *expert* with INT4 copies, not per copy: every INT4 copy of an expert
   holds the same bytes (docs/spec.md §5), so all of them share the expert's column and QMoE holds each
   expert's INT4 weights once (fewer, larger GEMMs; the replicas' bytes are not loaded at all);
3. ``y_q = com.microsoft.QMoE(hidden, router_probs=W_q, ..., router_weights=W_q)``: 4-bit, ``block_size=G``,
   the §5 bytes ``XOR 0x88`` (QMoE's default zero point is 8), gate/up rows interleaved for SwiGLU
   (``swiglu_fusion=1``); ``router_weights`` makes the mixing weights exactly ``W_q``, and ``k = min(K, P_int4)``
   picks every nonzero entry of a row (a token has at most ``K``), zero-weight picks being skipped;
   exact float32 activations by default, int8 ones with ``int8_activations`` (``accuracy_level=4``, opt-in:
   :data:`INT8_ACTIVATIONS_LEVEL`);
4. ``y_o = com.microsoft.MoE(hidden, router_probs=log W_o, ...) * rowsum(W_o)``: the MoE kernel applies a
   softmax to ``router_probs``, which ``log`` undoes up to the row sum (``log 0 = -inf`` entries get weight 0);
5. with INT8 copies (docs/spec.md §5a), ``y_8 = com.microsoft.MoE(hidden, router_probs=log W_8, ...) * rowsum(W_8)``
   on the exact dequantized values ``q * scale`` (float32; rounded once to float16 in float16 graphs), one column
   per expert with INT8 copies as for INT4. Not ONNX Runtime's 8-bit ``QMoE``: its CPU kernel (1.32) runs
   block-wise 8-bit experts through MLAS's n-bit GEMM with activations quantized to int8 whatever the node's
   ``accuracy_level`` (measured 2.4e-2 absolute error on outputs of magnitude 2.2, its INT4 path 8e-7; only the
   process-wide ``ORT_QMOE_CPU_QNBIT_GEMM=fp32`` switches that off, which a file cannot carry). The price: the
   session holds the INT8 experts' weights as floats;
6. ``y = y_q + y_o (+ y_8)``.

Both kernels compute the exact dequantized value ``q * scale`` of §5 in the activation type, so the route agrees
with the reference within the §9 tolerances (measured: 1e-7 on float32 layers). A layer the kernels cannot
serve keeps its ``rq::RQMoE`` node and the portable function body: ONNX Runtime's CPU kernels have no gated GELU
and their GELU is the tanh approximation (so erf GELU stays portable), and with INT4 copies QMoE needs the
hidden and expert sizes to be multiples of the group size (no partial last block). The mixing-weight
identity of step 4 needs non-negative routing weights, which every supported router produces (softmax or
sigmoid scores).

The file is written from ``model.onnx`` without loading its weights: the graph protobuf is edited and every
initializer keeps pointing at ``model.onnx.data``, the expert weights included: the kernels' layouts (gate/up
rows interleaved, nibbles ``XOR 0x88``) are computed from the §5 tensors by ``Gather``/``BitwiseXor``/``Cast``
nodes on initializers, which ONNX Runtime's constant folding turns into the kernels' constant weights when the
session is created (and the kernels then pre-pack). So the folder stores each weight once; a session with graph
optimizations disabled would convert them on every call. Each conversion is as few nodes as it can be: the
folding holds every folded node's output until it is done, so each extra node on a weight is one more copy of
it at session creation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from rq.core.experts import GLU_ACTIVATIONS
from rq.core.op import CALL_INPUTS, INT8_INPUTS, WEIGHT_INPUTS
from rq.export.function import DOMAIN, MAP_NAME, OP_NAME

MS_DOMAIN = "com.microsoft"
ORT_SUFFIX = ".ort.onnx"
# rq activation -> ONNX Runtime MoE/QMoE activation_type whose CPU kernel computes exactly it
FUSED_ACTIVATIONS = {"silu_glu": "swiglu", "relu": "relu", "gelu_tanh": "gelu"}
WHY_NOT = {"gelu_glu": "ONNX Runtime's CPU MoE kernels have no gated GELU",
           "gelu_tanh_glu": "ONNX Runtime's CPU MoE kernels have no gated GELU",
           "gelu": "ONNX Runtime's MoE GELU is the tanh approximation, not erf"}


@dataclass(frozen=True)
class LayerRoute:
    """How one MoE layer runs in ``model.ort.onnx``: ``fused`` or the portable body, with the reason."""

    layer: int
    fused: bool
    reason: str = ""

    def to_json(self) -> dict:
        return {"route": "fused" if self.fused else "portable", **({"reason": self.reason} if self.reason else {})}


def ort_file_name(onnx_file: str) -> str:
    """``model.onnx`` -> ``model.ort.onnx``."""
    return onnx_file.removesuffix(".onnx") + ORT_SUFFIX


def _interleave(b: "_Builder", name: str, inter: int) -> str:
    """``[P, 2I, X]`` gate rows then up rows -> rows g0, u0, g1, u1, ... (``swiglu_fusion=1``), as one ``Gather``
    along the rows of the initializer ``name``, which ONNX Runtime folds into a constant when the session is
    created. One node, not ``Reshape``/``Transpose``/``Reshape``: that chain's three folded copies of every
    layer's gate/up weights made session creation peak at 2x the weights (mid-size model, benchmarks/RESULTS.md;
    0.8-0.9x with one node)."""
    rows = np.stack([np.arange(inter), np.arange(inter) + inter], axis=1).reshape(-1)
    return b.op("Gather", name, b.const(rows.astype(np.int64)), axis=1)


def _slots(b: "_Builder", name: str, shape: tuple[int, ...], slots: np.ndarray, count: int) -> str:
    """The stacked initializer ``name`` restricted to ``slots`` (along axis 0), or itself when that is all."""
    if len(slots) == count and np.array_equal(slots, np.arange(count)):
        return name
    return b.op("Gather", name, b.const(slots.astype(np.int64)), axis=0)


def _zero_point_8(b: "_Builder", name: str) -> str:
    """The §5 bytes (INT8-typed two's-complement nibbles) ``XOR 0x88`` as UINT8: QMoE's nibbles with zero point
    8. ``Cast`` between 8-bit integer types keeps the bits."""
    return b.op("Cast", b.op("BitwiseXor", name, b.const(np.array(-120, np.int8))), to=TensorProto.UINT8)


def _dequant_int8(b: "_Builder", values: str, scales: str, shape: tuple[int, ...], group: int, float_type: int) -> str:
    """``q * scale`` of the §5a tensors (``[P, R, C]`` int8, ``[P, R, ceil(C/G)]`` float16) in float32, exact, then
    in the graph's float type: ``Cast``/``Expand``/``Mul`` on initializers, which ONNX Runtime folds (unlike
    ``DequantizeLinear``, which its constant folding keeps for QDQ fusion)."""
    p, rows, cols = shape
    blocks = -(-cols // group)
    s = b.op("Unsqueeze", b.op("Cast", scales, to=TensorProto.FLOAT), b.const(np.array([3], np.int64)))
    s = b.op("Expand", s, b.const(np.array([p, rows, blocks, group], np.int64)))
    s = b.op("Reshape", s, b.const(np.array([p, rows, blocks * group], np.int64)))
    if blocks * group != cols:  # the partial last block
        s = b.op("Slice", s, b.const(np.array([0], np.int64)), b.const(np.array([cols], np.int64)),
                 b.const(np.array([2], np.int64)))
    out = b.op("Mul", b.op("Cast", values, to=TensorProto.FLOAT), s)
    return out if float_type == TensorProto.FLOAT else b.op("Cast", out, to=float_type)


def route_of(layer: int, activation: str, precision: list[int], hidden: int, inter: int, group: int) -> LayerRoute:
    """Whether ONNX Runtime's fused kernels compute this layer exactly (see the module doc)."""
    if activation not in FUSED_ACTIVATIONS:
        return LayerRoute(layer, False, WHY_NOT.get(activation, f"no fused kernel for {activation}"))
    if 1 in precision and (hidden % group or inter % group):
        return LayerRoute(layer, False, f"QMoE needs H={hidden} and I={inter} to be multiples of the group size "
                                        f"{group} (this layer's last INT4 block is partial)")
    return LayerRoute(layer, True)


class _Builder:
    """Nodes and initializers of one fused layer (names prefixed, so layers never collide)."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits, self._n = prefix, [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, domain: str = "", **attrs) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), domain=domain,
                                           **attrs))
        return out

    def const(self, array: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name


def _class_weights(b: _Builder, column: np.ndarray, width: int, safe: str, hidden: str, weights: str,
                   float_type: int) -> str:
    """``[T, width]`` routing weights of one precision class: ScatterElements into ``width + 1`` columns (the last
    collects the other class and dropped assignments), then the spare column sliced off. Scattered in float32
    (ONNX Runtime's CPU ScatterElements cannot add float16); a real column receives one weight, so the cast back
    to the graph's float type is exact."""
    col = b.op("Gather", b.const(column.astype(np.int64)), safe)  # [T, K]
    rows = b.op("Shape", hidden, start=0, end=1)
    shape = b.op("Concat", rows, b.const(np.array([width + 1], np.int64)), axis=0)
    updates = weights if float_type == TensorProto.FLOAT else b.op("Cast", weights, to=TensorProto.FLOAT)
    full = b.op("ScatterElements", b.op("ConstantOfShape", shape), col, updates, axis=1, reduction="add")
    part = b.op("Slice", full, b.const(np.array([0], np.int64)), b.const(np.array([width], np.int64)),
                b.const(np.array([1], np.int64)))
    return part if float_type == TensorProto.FLOAT else b.op("Cast", part, to=float_type)


def fuse_node(node: onnx.NodeProto, layer: int, dims: dict[str, tuple[int, ...]], float_type: int,
              int8_activations: bool = False) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and new (small) initializers that replace one ``rq::RQMoE`` node (see the module doc); ``dims``:
    initializer name -> shape. The kernels' weights are computed from the node's own weight initializers.
    ``int8_activations``: ``QMoE`` quantizes its activations to int8 (``accuracy_level=4``, see
    :data:`INT8_ACTIVATIONS_LEVEL`)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    copies, precision = [int(c) for c in attrs["copies"]], [int(p) for p in attrs["precision"]]
    activation = attrs["activation"].decode() if isinstance(attrs["activation"], bytes) else attrs["activation"]
    top_k, group = int(attrs["top_k"]), int(attrs["group_size"])
    hidden, topk_ids, topk_weights, offsets = node.input[:len(CALL_INPUTS)]
    w = dict(zip(WEIGHT_INPUTS, node.input[len(CALL_INPUTS):]))
    w |= dict(zip(INT8_INPUTS, node.input[len(CALL_INPUTS) + len(WEIGHT_INPUTS):]))  # the INT8 class, if present
    glu = activation in GLU_ACTIVATIONS
    num_phys = len(precision)
    prec = np.asarray(precision)
    slot = np.where(prec == 1, np.cumsum(prec == 1) - 1, np.cumsum(prec == 0) - 1)
    n_int4, n_orig, n_int8 = int((prec == 1).sum()), int((prec == 0).sum()), int((prec == 2).sum())
    owner = np.repeat(np.arange(len(copies)), copies)  # phy2log
    b = _Builder(f"rq_ort_{layer}/")
    phys = b.name("phys")
    b.nodes.append(helper.make_node(MAP_NAME, [topk_ids, offsets], [phys, node.output[1]], name=b.name(MAP_NAME),
                                    domain=DOMAIN, num_experts=len(copies), copies=copies))
    safe = b.op("Where", b.op("GreaterOrEqual", phys, b.const(np.array(0, np.int64))), phys,
                b.const(np.array(num_phys, np.int64)))  # dropped -> spare entry P of the tables
    common = dict(activation_type=FUSED_ACTIVATIONS[activation], normalize_routing_weights=0)
    if glu:
        common.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    parts = []
    if n_int4:
        # all INT4 copies of one expert hold the same bytes (docs/spec.md §5): QMoE gets each expert's once, and
        # every INT4 copy's weight goes to its expert's column, so replicas cost no extra GEMM or weights here
        experts, first = np.unique(owner[prec == 1], return_index=True)  # first INT4 slot of each such expert
        column_of = {int(e): i for i, e in enumerate(experts)}
        n_q = len(experts)
        fc1_q, fc1_s, fc2_q, fc2_s = (_slots(b, w[n], dims[w[n]], first, n_int4)
                                      for n in ("w_in_q", "w_in_scales", "w_out_q", "w_out_scales"))
        if glu:
            inter = dims[w["w_in_q"]][1] // 2
            fc1_q, fc1_s = _interleave(b, fc1_q, inter), _interleave(b, fc1_s, inter)
        names = [_zero_point_8(b, fc1_q), fc1_s, _zero_point_8(b, fc2_q), fc2_s]
        column = np.append([column_of[int(e)] if q == 1 else n_q for e, q in zip(owner, prec)], n_q)
        w_q = _class_weights(b, column, n_q, safe, hidden, topk_weights, float_type)
        parts.append(b.op("QMoE", hidden, w_q, names[0], names[1], "", names[2], names[3], "", "", "", "", "", "",
                          "", w_q, domain=MS_DOMAIN, k=min(top_k, n_q), expert_weight_bits=4, block_size=group,
                          **common, **({"accuracy_level": INT8_ACTIVATIONS_LEVEL} if int8_activations else {})))
    if n_orig:
        fc1 = w["w_in"]
        if glu:
            fc1 = _interleave(b, fc1, dims[fc1][1] // 2)
        names = [fc1, w["w_out"]]
        column = np.append(np.where(prec == 0, slot, n_orig), n_orig)
        w_o = _class_weights(b, column, n_orig, safe, hidden, topk_weights, float_type)
        moe = b.op("MoE", hidden, b.op("Log", w_o), names[0], "", names[1], domain=MS_DOMAIN, k=min(top_k, n_orig),
                   **common)
        parts.append(b.op("Mul", moe, b.op("ReduceSum", w_o, b.const(np.array([1], np.int64)), keepdims=1)))
    if n_int8:
        # one column per expert with INT8 copies (its copies hold the same values, §5a), as the INT4 class
        experts8, first8 = np.unique(owner[prec == 2], return_index=True)
        n_e8 = len(experts8)
        column_of = {int(e): i for i, e in enumerate(experts8)}
        fc = []
        for q, sc in (("w_in_q8", "w_in_scales8"), ("w_out_q8", "w_out_scales8")):
            shape = (n_e8, *dims[w[q]][1:])
            fc.append(_dequant_int8(b, _slots(b, w[q], dims[w[q]], first8, n_int8),
                                    _slots(b, w[sc], dims[w[sc]], first8, n_int8), shape, group, float_type))
        if glu:
            fc[0] = _interleave(b, fc[0], dims[w["w_in_q8"]][1] // 2)
        column = np.append([column_of[int(e)] if q == 2 else n_e8 for e, q in zip(owner, prec)], n_e8)
        w_8 = _class_weights(b, column, n_e8, safe, hidden, topk_weights, float_type)
        moe = b.op("MoE", hidden, b.op("Log", w_8), fc[0], "", fc[1], domain=MS_DOMAIN, k=min(top_k, n_e8), **common)
        parts.append(b.op("Mul", moe, b.op("ReduceSum", w_8, b.const(np.array([1], np.int64)), keepdims=1)))
    if len(parts) > 1:
        total = parts[0]
        for part in parts[1:-1]:
            total = b.op("Add", total, part)
        b.op("Add", total, parts[-1], out=node.output[0])
    else:
        b.op("Identity", parts[0], out=node.output[0])
    return b.nodes, b.inits


FLOAT_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
INT8_ACTIVATIONS_LEVEL = 4
"""``QMoE``'s ``accuracy_level`` for int8 activations (``rq export --ort-int8-activations``): its CPU kernel then
multiplies the INT4 experts' weights with activations quantized to int8 per block (MLAS' int8 n-bit GEMM), as
onnxruntime-genai's own builder does by default for 4-bit weights on CPU. Faster at prefill (no dequantized
float weights per call), not exact: such a file is checked by the approximate rule of docs/spec.md §9."""


def write_ort_file(onnx_path: Path, shapes: dict[int, tuple[int, int]], dtype: str,
                   int8_activations: bool = False) -> tuple[Path, list[LayerRoute]]:
    """Write ``<name>.ort.onnx`` (no data file of its own) next to ``onnx_path``; ``shapes``: MoE layer -> ``(H, I)``;
    ``dtype``: the export's float type (``float32``/``float16``); ``int8_activations``: see
    :data:`INT8_ACTIVATIONS_LEVEL`.

    Returns the new file and the route of every MoE layer of the graph. Reads and writes only the graph
    protobuf: the file's initializers are ``onnx_path``'s, in its data file."""
    folder = onnx_path.parent
    proto = onnx.load(onnx_path, load_external_data=False)
    float_type = FLOAT_TYPES[dtype]
    dims = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    out_path = folder / ort_file_name(onnx_path.name)
    routes: list[LayerRoute] = []
    nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for node in proto.graph.node:
        if not (node.domain == DOMAIN and node.op_type == OP_NAME):
            nodes.append(node)
            continue
        layer = int(node.name.rsplit("_", 1)[1])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        activation = attrs["activation"].decode()
        hidden_size, inter = shapes[layer]
        route = route_of(layer, activation, list(attrs["precision"]), hidden_size, inter, int(attrs["group_size"]))
        routes.append(route)
        if not route.fused:
            nodes.append(node)
            continue
        new_nodes, inits = fuse_node(node, layer, dims, float_type, int8_activations)
        nodes.extend(new_nodes)
        proto.graph.initializer.extend(inits)
        replaced.update(node.input[len(CALL_INPUTS):])
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | _subgraph_inputs(nodes)  # e.g. an empty class's weights are not
    keep = [t for t in proto.graph.initializer if t.name not in replaced or t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    if any(r.fused for r in routes):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if all(r.fused for r in routes):  # the portable body is no longer called
        kept = [f for f in proto.functions if not (f.domain == DOMAIN and f.name == OP_NAME)]
        del proto.functions[:]
        proto.functions.extend(kept)
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save_model(proto, tmp)
    os.replace(tmp, out_path)
    return out_path, routes


def _subgraph_inputs(nodes: list[onnx.NodeProto]) -> set[str]:
    """Names read inside subgraphs (If/Loop bodies) of ``nodes``: initializers they use must stay."""
    names: set[str] = set()
    for node in nodes:
        for attr in node.attribute:
            for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names.update(i for n in graph.node for i in n.input)
                names |= _subgraph_inputs(list(graph.node))
    return names
