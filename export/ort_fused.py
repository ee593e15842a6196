"""ONNX Runtime's fast route: ``model.ort.onnx``, the exported graph with each ``rq::RQMoE`` node run on ONNX
Runtime's own fused MoE kernels (docs/spec.md §8, "Files and runtimes").

Per MoE layer, with the layer's ``P`` copies split into ``P_int4`` INT4 and ``P_orig`` original-precision ones:

1. ``phys, expert_counts = rq::RQReplicaMap(topk_ids, offsets)``: the replica rule (§4), exact integers, the
   same model-local function as the portable body;
2. the routing weights scattered into dense per-class matrices ``W_q [T, P_int4]`` and ``W_o [T, P_orig]``
   (column = the copy's slot in its class; dropped assignments and the other class go to a spare column
   that is sliced off);
3. ``y_q = com.microsoft.QMoE(hidden, router_probs=W_q, ..., router_weights=W_q)``: 4-bit, ``block_size=G``,
   the §5 bytes ``XOR 0x88`` (QMoE's default zero point is 8), gate/up rows interleaved for SwiGLU
   (``swiglu_fusion=1``); ``router_weights`` makes the mixing weights exactly ``W_q``, and ``k = min(K, P_int4)``
   picks every nonzero entry of a row (a token has at most ``K``), zero-weight picks being skipped;
4. ``y_o = com.microsoft.MoE(hidden, router_probs=log W_o, ...) * rowsum(W_o)``: the MoE kernel applies a
   softmax to ``router_probs``, which ``log`` undoes up to the row sum (``log 0 = -inf`` entries get weight 0);
5. ``y = y_q + y_o``.

Both kernels compute the exact dequantized value ``q * scale`` of §5 in the activation type, so the route agrees
with the reference within the §9 tolerances (measured: 1e-7 on float32 layers). A layer the kernels cannot
serve keeps its ``rq::RQMoE`` node and the portable function body: ONNX Runtime's CPU kernels have no gated GELU
and their GELU is the tanh approximation (so erf GELU stays portable), and with INT4 copies QMoE needs the
hidden and expert sizes to be multiples of the group size (no partial last block); layers with INT8 copies stay
portable too (ONNX Runtime's 8-bit ``QMoE`` is not exact, docs/spec.md §8). The mixing-weight
identity of step 4 needs non-negative routing weights, which every supported router produces (softmax or
sigmoid scores).

The file is written from ``model.onnx`` without loading its weights: the graph protobuf is edited, the
non-expert initializers keep pointing at ``model.onnx.data`` (shared, not copied), and each fused layer's
converted weights are streamed to ``model.ort.onnx.data`` one layer at a time (memory-mapped reads).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from rq.core.experts import GLU_ACTIVATIONS
from rq.core.op import CALL_INPUTS, WEIGHT_INPUTS
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


class _Weights:
    """Read-only numpy views of external initializers (memory-mapped: nothing is read until used)."""

    def __init__(self, proto: onnx.ModelProto, folder: Path):
        self.folder = folder
        self.tensors = {t.name: t for t in proto.graph.initializer}
        self._maps: dict[str, np.memmap] = {}

    def array(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        info = {e.key: e.value for e in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if "location" not in info:  # small tensors may be stored inline
            return onnx.numpy_helper.to_array(tensor)
        location = info["location"]
        if location not in self._maps:
            self._maps[location] = np.memmap(self.folder / location, dtype=np.uint8, mode="r")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        return self._maps[location][offset:offset + length].view(dtype).reshape(tuple(tensor.dims))

    def release(self) -> None:
        """Unmap the files once no view is left, so the pages read so far stop counting as this process's."""
        self._maps.clear()


class _DataWriter:
    """Appends tensors to one external data file, 64-byte aligned, and returns their TensorProto (no data).
    Writes ``<path>.tmp``; :meth:`commit` renames it to ``path`` (the name the protos refer to)."""

    def __init__(self, path: Path):
        self.path, self.location = path, path.name
        self.tmp = path.with_name(path.name + ".tmp")
        self.handle = open(self.tmp, "wb")

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        offset = self.handle.tell()
        pad = -offset % 64
        if pad:
            self.handle.write(b"\0" * pad)
            offset += pad
        self.handle.write(array.tobytes())
        proto = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def _interleave(a: np.ndarray, inter: int) -> np.ndarray:
    """``[P, 2I, ...]`` gate rows then up rows -> rows g0, u0, g1, u1, ... (``swiglu_fusion=1``)."""
    return np.stack((a[:, :inter], a[:, inter:]), axis=2).reshape(a.shape)


def route_of(layer: int, activation: str, precision: list[int], hidden: int, inter: int, group: int) -> LayerRoute:
    """Whether ONNX Runtime's fused kernels compute this layer exactly (see the module doc)."""
    if activation not in FUSED_ACTIVATIONS:
        return LayerRoute(layer, False, WHY_NOT.get(activation, f"no fused kernel for {activation}"))
    if 2 in precision:
        return LayerRoute(layer, False, "INT8 copies: ONNX Runtime's 8-bit QMoE is not exact (docs/spec.md §8), "
                                        "the portable body runs them")
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


def fuse_node(node: onnx.NodeProto, layer: int, weights: _Weights, data: _DataWriter,
              float_type: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and new initializers that replace one ``rq::RQMoE`` node (see the module doc)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    copies, precision = [int(c) for c in attrs["copies"]], [int(p) for p in attrs["precision"]]
    activation = attrs["activation"].decode() if isinstance(attrs["activation"], bytes) else attrs["activation"]
    top_k, group = int(attrs["top_k"]), int(attrs["group_size"])
    hidden, topk_ids, topk_weights, offsets = node.input[:len(CALL_INPUTS)]
    w = dict(zip(WEIGHT_INPUTS, node.input[len(CALL_INPUTS):]))
    glu = activation in GLU_ACTIVATIONS
    num_phys = len(precision)
    prec = np.asarray(precision)
    slot = np.where(prec == 1, np.cumsum(prec == 1) - 1, np.cumsum(prec == 0) - 1)
    n_int4, n_orig = int((prec == 1).sum()), int((prec == 0).sum())
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
        w_in_q, w_out_q = weights.array(w["w_in_q"]).view(np.uint8), weights.array(w["w_out_q"]).view(np.uint8)
        w_in_s, w_out_s = weights.array(w["w_in_scales"]), weights.array(w["w_out_scales"])
        inter = w_in_q.shape[1] // (2 if glu else 1)
        if glu:
            w_in_q, w_in_s = _interleave(w_in_q, inter), _interleave(w_in_s, inter)
        names = [f"rq_ort.{layer}.{n}" for n in ("fc1_q", "fc1_scales", "fc2_q", "fc2_scales")]
        for name, array in zip(names, (w_in_q ^ 0x88, w_in_s, w_out_q ^ 0x88, w_out_s)):
            b.inits.append(data.tensor(name, array))
        column = np.append(np.where(prec == 1, slot, n_int4), n_int4)
        w_q = _class_weights(b, column, n_int4, safe, hidden, topk_weights, float_type)
        parts.append(b.op("QMoE", hidden, w_q, names[0], names[1], "", names[2], names[3], "", "", "", "", "", "",
                          "", w_q, domain=MS_DOMAIN, k=min(top_k, n_int4), expert_weight_bits=4, block_size=group,
                          **common))
    if n_orig:
        w_in, w_out = weights.array(w["w_in"]), weights.array(w["w_out"])
        if glu:
            w_in = _interleave(w_in, w_in.shape[1] // 2)
        names = [f"rq_ort.{layer}.fc1", f"rq_ort.{layer}.fc2"]
        for name, array in zip(names, (w_in, w_out)):
            b.inits.append(data.tensor(name, array))
        column = np.append(np.where(prec == 0, slot, n_orig), n_orig)
        w_o = _class_weights(b, column, n_orig, safe, hidden, topk_weights, float_type)
        moe = b.op("MoE", hidden, b.op("Log", w_o), names[0], "", names[1], domain=MS_DOMAIN, k=min(top_k, n_orig),
                   **common)
        parts.append(b.op("Mul", moe, b.op("ReduceSum", w_o, b.const(np.array([1], np.int64)), keepdims=1)))
    if len(parts) == 2:
        b.op("Add", *parts, out=node.output[0])
    else:
        b.op("Identity", parts[0], out=node.output[0])
    return b.nodes, b.inits


FLOAT_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def write_ort_file(onnx_path: Path, shapes: dict[int, tuple[int, int]], dtype: str) -> tuple[Path, list[LayerRoute]]:
    """Write ``<name>.ort.onnx`` (+ ``.data``) next to ``onnx_path``; ``shapes``: MoE layer -> ``(H, I)``;
    ``dtype``: the export's float type (``float32``/``float16``).

    Returns the new file and the route of every MoE layer of the graph. Reads only the graph protobuf and
    memory-maps the weights of one layer at a time."""
    folder = onnx_path.parent
    proto = onnx.load(onnx_path, load_external_data=False)
    float_type = FLOAT_TYPES[dtype]
    weights = _Weights(proto, folder)
    out_path = folder / ort_file_name(onnx_path.name)
    data = _DataWriter(folder / (out_path.name + ".data"))
    routes: list[LayerRoute] = []
    nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()
    try:
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
            new_nodes, inits = fuse_node(node, layer, weights, data, float_type)
            weights.release()  # one layer's weights resident at a time
            nodes.extend(new_nodes)
            proto.graph.initializer.extend(inits)
            dropped.update(node.input[len(CALL_INPUTS):])
    except BaseException:
        data.discard()
        raise
    data.commit()
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | _subgraph_inputs(nodes)
    keep = [t for t in proto.graph.initializer if t.name not in dropped or t.name in used]
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
