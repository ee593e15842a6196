"""From a traced :class:`rq.export.graphs.GraphSpec` to a finished ONNX file on disk.

``torch.onnx.export`` (dynamo) produces the graph with ``rq::RQMoE`` nodes; this module then, on the ONNX IR
model (no 2 GB protobuf limit): adds the ``rq`` model-local functions (:mod:`rq.export.function`), names the
dynamic axes, records metadata, and saves ``<name>.onnx`` + ``<name>.onnx.data`` (external data).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir
import torch

from rq.errors import RQError
from rq.core.op import CALL_INPUTS, INPUTS_INT8, WEIGHT_INPUTS
from rq.export.function import DOMAIN, OP_NAME, VERSION, rq_functions
from rq.export.graphs import GraphSpec

_ONNX_DTYPES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.INT64: "int64",
                ir.DataType.INT32: "int32", ir.DataType.BFLOAT16: "bfloat16", ir.DataType.BOOL: "bool"}
_BULKY_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


@contextlib.contextmanager
def _quiet(enabled: bool = True):
    """Silence the exporter's progress prints and library warnings (they are not actionable for users)."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trace(spec: GraphSpec, opset: int, quiet: bool = True, lazy: Callable[[object], None] | None = None) -> ir.Model:
    """Run the dynamo exporter on ``spec`` and return the ONNX IR model. ``lazy``: the module's weights are fake
    tensors; the graph is traced unoptimized and ``lazy(program)`` gives it lazy initializers and runs the
    exporter's optimizer on them (:func:`rq.export.streamed.lazy_program`)."""
    with _quiet(quiet), torch.no_grad():
        try:
            program = torch.onnx.export(spec.module, spec.args, dynamo=True, opset_version=opset,
                                        dynamic_shapes=spec.dynamic_shapes, input_names=spec.input_names,
                                        output_names=spec.output_names, optimize=lazy is None, verbose=False)
            if lazy is not None:
                lazy(program)
        except Exception as err:  # the exporter wraps everything; keep the first line, it names the op
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RQError(f"torch.onnx could not export the {spec.name} graph ({first}); "
                          f"this architecture/transformers version is not exportable yet") from err
        finally:
            _forget_last_trace()
    return program.model


def _forget_last_trace() -> None:
    """Drop the references two libraries keep to the last trace in module globals, each of which reaches the
    traced graph and with it every weight of the model, so they would stay alive for the rest of the export
    (2 GB of a 1.7 GB mid-size checkpoint, through the parity check): torch.export's fake-tensor -> FX node
    map (cleared only when the next trace starts) and the last node each of onnxscript's default rewrite rules
    looked at, in, and with (its pattern matchers are module-level objects)."""
    import gc

    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for matcher in (o for o in gc.get_objects() if isinstance(o, SimplePatternMatcher)):
        for state in ("_match", "_graph", "_tracer"):  # each set again at the start of the next match
            matcher.__dict__.pop(state, None)
        matcher._current_node = None


def finalize(model: ir.Model, spec: GraphSpec, opset: int, metadata: dict[str, str]) -> ir.Model:
    """Add the ``rq`` functions, name dynamic axes, check node attributes, attach metadata (in place)."""
    names = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    if names != (spec.input_names, spec.output_names):
        raise RQError(f"the exported {spec.name} graph has inputs/outputs {names}, expected "
                      f"{(spec.input_names, spec.output_names)}; the installed torch may be unsupported")
    nodes = [n for n in model.graph.all_nodes() if n.domain == DOMAIN and n.op_type == OP_NAME]
    if len(nodes) != len(spec.moe_layers):
        raise RQError(f"the exported {spec.name} graph has {len(nodes)} {DOMAIN}::{OP_NAME} nodes, expected one per "
                      f"MoE layer ({len(spec.moe_layers)})")
    activations = {n.attributes["activation"].as_string() for n in nodes}
    if len(activations) > 1:
        raise RQError(f"MoE layers use different activations {sorted(activations)}; the exported function body "
                      f"supports one activation per model")
    for node, layer in zip(nodes, spec.moe_layers):
        node.name = f"rq_moe_{layer}"
        store_packed_as_int8(node)
    if nodes:
        model.opset_imports[DOMAIN] = VERSION
        int8 = {len(n.inputs) == len(INPUTS_INT8) for n in nodes}
        if len(int8) > 1:
            raise RQError("some MoE layers carry the INT8 weight class and some do not; apply the plan with "
                          "rq.rqmodel.apply_plan, which gives every layer of a plan with INT8 copies that class")
        for proto in rq_functions(activations.pop(), opset, int8.pop()):
            fn = ir.serde.deserialize_function(proto)
            model.functions[fn.identifier()] = fn
    for value in [*model.graph.inputs, *model.graph.outputs]:
        dims = spec.dims.get(value.name)
        if dims is not None and value.shape is not None and len(dims) == len(value.shape):
            value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])
    for node in model.graph.all_nodes():  # the exporter's per-node stack traces are most of the file
        for key in _BULKY_NODE_METADATA:
            node.metadata_props.pop(key, None)
    model.producer_name, model.producer_version = "rq-export", metadata.get("rq.tool_version", "")
    model.metadata_props.update(metadata)
    return model


PACKED_INPUTS = tuple(CALL_INPUTS.__len__() + WEIGHT_INPUTS.index(name) for name in ("w_in_q", "w_out_q"))


def store_packed_as_int8(node: ir.Node) -> None:
    """Retype the node's packed INT4 initializers from UINT8 to INT8, the same bytes (docs/spec.md §5):
    TensorRT's ONNX parser turns UINT8 initializers that feed no Q/DQ node into INT32, which would hand the
    plugin 4x wider, different tensors. The numpy view shares the buffer: nothing is copied."""
    for index in PACKED_INPUTS:
        value = node.inputs[index]
        tensor = value.const_value if value is not None else None
        if tensor is None or tensor.dtype != ir.DataType.UINT8:
            continue
        if isinstance(tensor, ir.LazyTensor):  # read when written (rq.export.streamed)
            value.const_value = type(tensor)(lambda t=tensor, n=value.name: ir.Tensor(t.numpy().view("int8"), name=n),
                                             dtype=ir.DataType.INT8, shape=tensor.shape, name=value.name, cache=False)
        else:
            value.const_value = ir.Tensor(tensor.numpy().view("int8"), name=value.name)
        value.dtype = ir.DataType.INT8


def save(model: ir.Model, path: Path) -> None:
    """``path`` plus ``path.name + '.data'`` holding every initializer (external data, any model size); refused
    before anything is written when the disk has no room for it."""
    check_free_space(path.parent, sum(v.const_value.nbytes for v in model.graph.initializers.values()
                                      if v.const_value is not None))
    ir.save(model, path, external_data=path.name + ".data")


def check_free_space(folder: Path, needed: int) -> None:
    """One-line :class:`RQError` when ``folder``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise RQError(f"{folder} has {free / 2**30:.2f} GiB free, the export writes {needed / 2**30:.2f} GiB; "
                      f"free space there or pass --out on a larger disk")


def describe_io(path: Path) -> dict[str, list[dict]]:
    """``{"inputs": [...], "outputs": [...]}`` with name, dtype and dims (named dims as strings)."""
    proto = onnx.load(path, load_external_data=False)

    def one(value):
        tensor = value.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        dtype = _ONNX_DTYPES.get(ir.DataType(tensor.elem_type), onnx.TensorProto.DataType.Name(tensor.elem_type))
        return {"name": value.name, "dtype": dtype, "shape": dims}

    return {"inputs": [one(v) for v in proto.graph.input], "outputs": [one(v) for v in proto.graph.output]}


def rq_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every ``rq::RQMoE`` node of the main graph, in graph order."""
    return [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_NAME]


def rq_node_weights(onnx_path: Path) -> dict[int, dict[str, str]]:
    """MoE layer -> ``{op input name: initializer name}`` for the weight inputs (4..9, and 10..13 where the model
    has INT8 copies) of each RQMoE node."""
    proto = onnx.load(onnx_path, load_external_data=False)
    return {int(node.name.rsplit("_", 1)[1]): dict(zip(INPUTS_INT8[len(CALL_INPUTS):], node.input[len(CALL_INPUTS):]))
            for node in rq_nodes(proto)}


def external_locations(onnx_path: Path, names: set[str]) -> dict[str, tuple[Path, int, int]]:
    """``{initializer: (data file, offset, length)}`` for those of ``names`` stored as external data."""
    proto = onnx.load(onnx_path, load_external_data=False)
    found = {}
    for tensor in proto.graph.initializer:
        if tensor.name in names and tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            found[tensor.name] = (onnx_path.parent / info["location"], int(info.get("offset", 0)), int(info["length"]))
    return found


def external_location(onnx_path: Path, initializer: str) -> tuple[Path, int, int]:
    """``(data file, offset, length)`` of an externally stored initializer of ``onnx_path``."""
    proto = onnx.load(onnx_path, load_external_data=False)
    for tensor in proto.graph.initializer:
        if tensor.name == initializer:
            info = {e.key: e.value for e in tensor.external_data}
            if "location" not in info:
                raise ValueError(f"initializer {initializer} is stored inside {onnx_path.name}, not as external data")
            return onnx_path.parent / info["location"], int(info.get("offset", 0)), int(info["length"])
    raise KeyError(f"{onnx_path.name} has no initializer named {initializer}")
