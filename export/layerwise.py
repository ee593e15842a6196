"""Run an exported graph with ONNX Runtime one decoder layer at a time, so checking a model bigger than memory
holds one layer's weights, not the model's (docs/spec.md §9, "Layer by layer").

An ONNX Runtime session loads every initializer of its graph (the fused route also folds the experts' weights
into its kernels' layouts, a second copy). :func:`segments` cuts a graph into **segments**, one per decoder
layer, by the module scope the exporter records on every node (``pkg.torch.onnx.name_scopes``: the first
``<container>.<index>`` module of the scope, e.g. ``model.model.layers.3``):

- nodes with no such scope go with the values they read: a node reading activations joins the latest segment
  it reads from (the embeddings, masks and rotary tables go to a leading segment; the modules after the last
  layer, the final norm and the output head, to a trailing one); a node computing only on initializers (the
  fused route's weight layouts) joins the first segment that uses its result, so a layer's weights stay in its
  layer's session;
- a value made in one segment and read in another crosses as an output of the first and an input of the
  second (hidden states, masks, shapes: activations, never weights).

:class:`LayerwiseRunner` then runs a sequence of *calls* (prefill feeds, or the prefill and decode steps of one
teacher-forced generation) **layer-major**: every call through the first segment, then every call through the
second, one ONNX Runtime session alive at a time. A call's state that the previous call's outputs feed (a
layer's KV cache: ``present`` -> ``past``; its replica offsets: ``offsets += expert_counts``) is a
:class:`Recurrence` kept inside the segment that produces it. A state another segment reads before its producer
ran (the exporter reads ``past_key_values.{l}``'s shape early, for the sequence length) may only be read by
``Shape`` nodes there; it gets a zero tensor of the call's shape. Anything else is refused with a
:class:`LayerwiseUnsupported` naming the value.

:class:`LayerwiseExport` holds an export's runners and makes the teacher-forced generation of the parity check
(:class:`rq.export.runtime.OrtGenerator`'s calls) layer-major.

The same nodes compute on the same inputs. In float32 graphs the results match a whole-file session to float
rounding; in float16 graphs a session compiled for one layer can round differently from a whole-file session
(one unit in the last place measured at a layer boundary), within the §9 tolerances except where a router's
near-tie flips an assignment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from rq.export.runtime import NP_DTYPES, empty_past, position_ids_from_mask

_SCOPE_KEY = "pkg.torch.onnx.name_scopes"
_BLOCK = re.compile(r"^(.+)\.(\d+)$")


class LayerwiseUnsupported(ValueError):
    """The graph cannot be run layer by layer; the message names the value that crosses layers."""


@dataclass(frozen=True)
class Recurrence:
    """A state input that the previous call's output feeds: ``state`` <- ``output`` (``accumulate``: added)."""

    state: str
    output: str
    accumulate: bool = False


@dataclass
class Segment:
    """One decoder layer's part of a graph (or the leading part before the first layer)."""

    label: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # graph inputs and values of earlier segments it reads
    outputs: list[str] = field(default_factory=list)  # graph outputs and values later segments read
    shape_only: set[str] = field(default_factory=set)  # inputs read only by Shape nodes


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every value ``node`` reads, including the outer-scope names its subgraphs (If/Loop bodies) use."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            made = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
                   {t.name for t in graph.initializer}
            names += [i for n in graph.node for i in _reads(n) if i not in made]
    return names


def _block_of(node: onnx.NodeProto) -> str | None:
    """The first indexed module (``<container>.<i>``) of the node's recorded scope, or None."""
    for prop in node.metadata_props:
        if prop.key == _SCOPE_KEY:
            for scope in re.findall(r"'([^']*)'", prop.value):
                if _BLOCK.match(scope):
                    return scope
    return None


def _has_scope(node: onnx.NodeProto) -> bool:
    """Whether the exporter recorded a module for ``node`` (the nodes rq adds after tracing have none)."""
    return any(prop.key == _SCOPE_KEY for prop in node.metadata_props)


def segments(graph: onnx.GraphProto) -> list[Segment]:
    """Cut ``graph`` into per-layer segments (module doc)."""
    nodes = list(graph.node)
    initializers = {t.name for t in graph.initializer}
    graph_inputs = {v.name for v in graph.input if v.name not in initializers}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    reads = [_reads(node) for node in nodes]
    order: dict[str, int] = {}  # block scope -> segment number, in order of first appearance (0: leading part)
    head = len(nodes) + 1  # the final norm and the output head, after every layer
    seg, const_only, scoped = [0] * len(nodes), [False] * len(nodes), [False] * len(nodes)
    for k, node in enumerate(nodes):
        const_only[k] = all(r in initializers or (r in producer and const_only[producer[r]]) for r in reads[k])
        block = _block_of(node)
        if block is not None:
            seg[k], scoped[k] = order.setdefault(block, len(order) + 1), True
            continue
        seg[k] = max((seg[producer[r]] for r in reads[k] if r in producer), default=0)
        if order and seg[k] == len(order) and _has_scope(node):  # a module after the last layer: the head
            seg[k] = head
    consumers: dict[int, list[int]] = {}
    for k in range(len(nodes)):
        for r in reads[k]:
            if r in producer:
                consumers.setdefault(producer[r], []).append(k)
    for k in reversed(range(len(nodes))):  # weight-only chains go to their first user's segment
        if const_only[k] and not scoped[k] and consumers.get(k):
            seg[k] = min(seg[c] for c in consumers[k])
    seg = _merge_backward_edges(reads, producer, seg)
    return _build(graph, nodes, reads, producer, seg, order, graph_inputs)


def _merge_backward_edges(reads: list[list[str]], producer: dict[str, int], seg: list[int]) -> list[int]:
    """Merge segments until no value flows from a later segment into an earlier one (a run must go forward)."""
    while True:
        bad = [(seg[producer[r]], seg[k]) for k, names in enumerate(reads) for r in names
               if r in producer and seg[producer[r]] > seg[k]]
        if not bad:
            return seg
        high, low = max(bad)
        seg = [low if low <= s <= high else s for s in seg]


def _build(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], reads: list[list[str]], producer: dict[str, int],
           seg: list[int], order: dict[str, int], graph_inputs: set[str]) -> list[Segment]:
    labels = {0: "embeddings", len(nodes) + 1: "head"} | {v: k for k, v in order.items()}
    used = sorted(set(seg))
    out = {s: Segment(labels.get(s, str(s))) for s in used}
    graph_outputs = {v.name for v in graph.output}
    readers: dict[str, set[int]] = {}
    shape_readers: dict[tuple[str, int], bool] = {}
    for k, node in enumerate(nodes):
        out[seg[k]].nodes.append(node)
        for r in reads[k]:
            readers.setdefault(r, set()).add(seg[k])
            key = (r, seg[k])
            shape_readers[key] = shape_readers.get(key, True) and node.op_type == "Shape"
    for s, segment in out.items():
        names = list(dict.fromkeys(r for k in range(len(nodes)) if seg[k] == s for r in reads[k]))
        segment.inputs = [r for r in names if r in graph_inputs or (r in producer and seg[producer[r]] != s)]
        segment.shape_only = {r for r in segment.inputs if shape_readers.get((r, s))}
        made = [o for n in segment.nodes for o in n.output if o]
        segment.outputs = [o for o in made if o in graph_outputs or readers.get(o, set()) - {s}]
    return [out[s] for s in used]


_NP_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
               np.dtype(np.int64): onnx.TensorProto.INT64, np.dtype(np.int32): onnx.TensorProto.INT32,
               np.dtype(np.bool_): onnx.TensorProto.BOOL, np.dtype(np.float64): onnx.TensorProto.DOUBLE}


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, _NP_TO_ONNX[value.dtype], [None] * value.ndim)


class LayerwiseRunner:
    """Layer-major runs of one exported graph file (module doc)."""

    def __init__(self, path: str | Path, *, session_options: ort.SessionOptions | None = None,
                 providers: Sequence[str] | None = None, on_segment: Callable[[str], None] | None = None):
        """``on_segment(label)`` is called after each segment has run every call (progress)."""
        self.path = Path(path)
        self.proto = onnx.load(self.path, load_external_data=False)
        self.segments = segments(self.proto.graph)
        self.options = session_options or ort.SessionOptions()
        self.options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(self.path.parent.resolve()))
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.on_segment = on_segment
        self._types = {v.name: v for v in [*self.proto.graph.value_info, *self.proto.graph.output]}

    def _model(self, segment: Segment, sample: dict[str, np.ndarray]) -> bytes:
        graph = self.proto.graph
        used = {r for n in segment.nodes for r in _reads(n)}
        inits = [t for t in graph.initializer if t.name in used]
        init_names = {t.name for t in inits}
        inputs = [_value_info(name, sample[name]) for name in segment.inputs if name not in init_names]
        outputs = [self._types.get(name) or helper.make_empty_tensor_value_info(name) for name in segment.outputs]
        sub = helper.make_graph(segment.nodes, f"{graph.name}_{segment.label}", inputs, outputs, inits)
        model = helper.make_model(sub, opset_imports=list(self.proto.opset_import), ir_version=self.proto.ir_version,
                                  functions=list(self.proto.functions))
        return model.SerializeToString()

    def run(self, calls: Sequence[dict[str, np.ndarray]], output_names: Sequence[str], *,
            initial: dict[str, np.ndarray] | None = None, recurrences: Sequence[Recurrence] = (),
            placeholder: Callable[[str, int], np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
        """Run ``calls`` (each a feed of the graph's inputs that no recurrence supplies) and return, per call,
        the ``output_names`` values. ``initial``: each recurrence's state at the first call; ``placeholder(name,
        call)``: a zero tensor of a state's shape at that call, for segments that read only its shape."""
        states = dict(initial or {})
        feeds_of = {r.state: r for r in recurrences}
        fed_by = {r.output: r for r in recurrences}
        values: list[dict[str, np.ndarray]] = [dict(call) for call in calls]
        last_reader = {name: i for i, s in enumerate(self.segments) for name in s.inputs}
        for index, segment in enumerate(self.segments):
            owned = {fed_by[o].state for o in segment.outputs if o in fed_by}
            foreign = [n for n in segment.inputs if n in feeds_of and n not in owned]
            for name in foreign:
                if name not in segment.shape_only:
                    raise LayerwiseUnsupported(f"{name} is read in {segment.label} but updated in another layer")
                if placeholder is None:
                    raise LayerwiseUnsupported(f"{name}'s shape is read in {segment.label}: needs a placeholder")
            session = None
            for t, value in enumerate(values):
                feed = {}
                for name in segment.inputs:
                    if name in owned:
                        feed[name] = states[name]
                    elif name in foreign:
                        feed[name] = placeholder(name, t)
                    else:
                        feed[name] = value[name]
                if session is None:
                    session = ort.InferenceSession(self._model(segment, feed), sess_options=self.options,
                                                   providers=self.providers)
                result = dict(zip(segment.outputs, session.run(segment.outputs, feed)))
                for name, array in result.items():
                    if name in fed_by:
                        rule = fed_by[name]
                        states[rule.state] = states[rule.state] + array if rule.accumulate else array
                value.update(result)
            del session
            if self.on_segment:
                self.on_segment(segment.label)
            for value in values:  # drop what no later segment reads
                for name in [n for n in value if last_reader.get(n, -1) <= index and n not in output_names]:
                    del value[name]
        return [{name: value[name] for name in output_names} for value in values]


class LayerwiseExport:
    """An export's graphs (one file key of the manifest's graphs: ``ort_file`` or ``file``), each a
    :class:`LayerwiseRunner`, and the teacher-forced generation :class:`rq.export.runtime.OrtGenerator` makes
    (streaming offsets), run layer-major."""

    def __init__(self, build_dir: Path, manifest: dict, file_key: str):
        self.manifest = manifest
        self.runners = {name: LayerwiseRunner(build_dir / graph[file_key]) for name, graph in manifest["graphs"].items()}

    def on_segment(self, callback: Callable[[str], None]) -> None:
        for runner in self.runners.values():
            runner.on_segment = callback

    def _offsets(self, graph: str) -> tuple[dict[str, np.ndarray], list[Recurrence]]:
        """Zero replica offsets of ``graph``'s MoE layers, advanced by their loads after every call (§4)."""
        sizes = {m["index"]: m["num_experts"] for m in self.manifest["moe_layers"]}
        initial, rules = {}, []
        for layer in self.manifest["graphs"][graph]["moe_layers"]:
            initial[f"rq_offsets.{layer}"] = np.zeros(sizes[layer], np.int64)
            rules.append(Recurrence(f"rq_offsets.{layer}", f"expert_counts.{layer}", accumulate=True))
        return initial, rules

    def generate(self, input_ids: np.ndarray, mask: np.ndarray, forced: np.ndarray) -> list[dict[str, np.ndarray]]:
        """``OrtGenerator(streaming=True).generate(input_ids, mask, forced_tokens=forced)``, layer-major: per call
        (prefill, then one per forced token), the logits and every MoE layer's ``expert_counts``."""
        kv, dtype = self.manifest["kv_cache"], NP_DTYPES[self.manifest["dtype"]]
        batch = input_ids.shape[0]
        prefix: dict[str, np.ndarray] = {}
        if self.manifest["encoder_decoder"]:
            initial, rules = self._offsets("encoder")
            names = [o["name"] for o in self.manifest["graphs"]["encoder"]["outputs"]]
            prefix = self.runners["encoder"].run([{"input_ids": input_ids, "attention_mask": mask}], names,
                                                 initial=initial, recurrences=rules)[0]
            start = np.full((batch, 1), self.manifest["generation"]["decoder_start_token_id"], np.int64)
            extra = {"encoder_hidden_states": prefix.pop("encoder_hidden_states"), "encoder_attention_mask": mask}
            calls = [{"decoder_input_ids": t, **extra} for t in [start, *np.split(forced, forced.shape[1], axis=1)]]
            past_length = list(range(len(calls)))
        else:
            calls = [{"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}]
            for column in np.split(forced, forced.shape[1], axis=1):
                positions = mask.sum(axis=1, keepdims=True)  # as OrtGenerator.step
                mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
                calls.append({"input_ids": column, "attention_mask": mask, "position_ids": positions})
            past_length = [0] + [input_ids.shape[1] + i for i in range(forced.shape[1])]
        initial, rules = self._offsets("decoder")
        initial |= dict(zip(kv["past_names"], empty_past(kv, batch, dtype)))
        rules += [Recurrence(past, present) for past, present in zip(kv["past_names"], kv["present_names"])]
        slot = {name: i for i, name in enumerate(kv["past_names"])}

        def placeholder(name: str, call: int) -> np.ndarray:
            return empty_past(kv, batch, dtype, past_length[call])[slot[name]]

        names = ["logits", *(f"expert_counts.{layer}" for layer in self.manifest["graphs"]["decoder"]["moe_layers"])]
        steps = self.runners["decoder"].run(calls, names, initial=initial, recurrences=rules, placeholder=placeholder)
        steps[0] |= prefix  # the encoder's loads are the first step's, as OrtGenerator.prefill reports them
        return steps
