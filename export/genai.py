"""The export as an onnxruntime-genai model folder: ``genai_config.json`` and ``model.genai.onnx``.

onnxruntime-genai (``og.Model(build_dir)``, ``og.Generator``) feeds a decoder graph ``input_ids``,
``attention_mask`` and the KV cache, and ``position_ids`` only when the graph has that input; it never feeds
rq's ``rq_offsets.{l}``. ``model.genai.onnx`` is ONNX Runtime's fused graph (``model.ort.onnx``, or the plain
``model.onnx`` of a baseline export) with those two kinds of inputs made optional (docs/spec.md §4, §8):

- each is also an initializer (ONNX's optional input with a default), holding ``-1``: a negative value
  means "derive it here", so ONNX Runtime reports them as overridable initializers, not inputs, and
  onnxruntime-genai leaves them alone;
- ``position_ids`` is then ``cumsum(attention_mask) - 1`` with pads at 1 (Hugging Face ``generate``'s rule,
  the one rq's runtime feeds), for the call's ``seq`` last columns;
- ``rq_offsets.{l}`` is then ``past_seq`` for every expert, the number of positions before this call
  (``total_seq - seq`` from the input shapes): consecutive decode steps start each expert's copies one
  further, so copies rotate deterministically with no state outside the graph.

Fed explicitly (rq's :class:`~rq.export.runtime.OrtGenerator`), both inputs are used as given, so the graph
computes exactly what ``model.ort.onnx`` computes. The weights are not copied: the graph's initializers
keep pointing at the export's data files. Only the graph protobuf is read and written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GENAI_CONFIG = "genai_config.json"
GENAI_SUFFIX = ".genai.onnx"
DERIVE = -1  # default of the optional inputs: "derive it inside the graph"

# Hugging Face model_type -> onnxruntime-genai model.type. onnxruntime-genai has no type for these MoE families
# (its MoE types are gptoss, phimoe, qwen3_5_moe_text, lfm2, gemma4, tied to their own graphs); every
# ``model.type`` of its LLM list runs the same generic decoder loop over whatever graph the config names, so
# the family's dense type is used, which also selects the family's tokenizer conventions (Qwen's tool-call
# token ids); a family with no dense type gets the generic ``decoder``.
GENAI_TYPES = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "olmoe": "olmo",
               "llama_moe": "llama", "deepseek_v2": "decoder", "deepseek_v3": "decoder", "deepseek": "decoder"}
# search options read from generation_config.json (Hugging Face name -> onnxruntime-genai name)
SEARCH_KEYS = {"do_sample": "do_sample", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
               "repetition_penalty": "repetition_penalty", "num_beams": "num_beams", "length_penalty": "length_penalty",
               "no_repeat_ngram_size": "no_repeat_ngram_size", "min_length": "min_length"}


def genai_file_name(onnx_file: str) -> str:
    """``model.onnx`` / ``model.ort.onnx`` -> ``model.genai.onnx``."""
    return onnx_file.removesuffix(".onnx").removesuffix(".ort") + GENAI_SUFFIX


def genai_type(architecture: str) -> str:
    """onnxruntime-genai's ``model.type`` for a Hugging Face ``model_type`` (see :data:`GENAI_TYPES`)."""
    return GENAI_TYPES.get(architecture, "decoder")


class Unsupported(ValueError):
    """The graph has something onnxruntime-genai's decoder loop cannot feed; the message says what."""


class _Nodes:
    """Nodes and small initializers of the derivation, names under ``rq_genai/``."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"rq_genai/{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self._name(op_type), **attrs))
        return out

    def const(self, value) -> str:
        name = self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name


def _rename_uses(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Point every use of the names in ``renames`` (main graph and subgraphs) at the new names."""
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _rename_uses(sub, renames)


def make_genai_graph(proto: onnx.ModelProto, offsets: dict[str, int],
                     kv_layers: list[dict] | None = None) -> onnx.ModelProto:
    """Turn a decoder graph (in place) into its onnxruntime-genai form (module doc); ``offsets``: the name of
    each ``rq_offsets.{l}`` input -> its length ``N_l``; ``kv_layers``: the manifest's cache shapes. Returns
    ``proto``.

    onnxruntime-genai holds a layer's past and present values in the key's shape. Where the two differ
    (DeepSeek caches its compressed latent as "key" and the shared rotary part as "value", of fewer
    features), the value is stored zero-padded to the key's size: the graph reads the first ``D_v`` features
    of the past value and pads the present one. A cache whose key and value differ in heads is refused."""
    graph = proto.graph
    inputs = {v.name for v in graph.input}
    b = _Nodes()
    seq = b.op("Gather", b.op("Shape", "input_ids"), b.const(1), axis=0)
    total = b.op("Gather", b.op("Shape", "attention_mask"), b.const(1), axis=0)
    past = b.op("Sub", total, seq)  # int64 scalar: positions before this call
    renames = {}
    if "position_ids" in inputs:
        mask = b.op("Cast", "attention_mask", to=TensorProto.INT64)
        positions = b.op("Sub", b.op("CumSum", mask, b.const(1)), b.const(1))
        positions = b.op("Where", b.op("Equal", mask, b.const(0)), b.const(1), positions)
        derived = b.op("Slice", positions, b.op("Unsqueeze", past, b.const([0])), b.const([np.iinfo(np.int64).max]),
                       b.const([1]))
        renames["position_ids"] = b.op("Where", b.op("Less", "position_ids", b.const(0)), derived, "position_ids")
        b.inits.append(numpy_helper.from_array(np.full((1, 1), DERIVE, np.int64), "position_ids"))
    for name, num_experts in offsets.items():
        if name not in inputs:
            continue
        renames[name] = b.op("Where", b.op("Less", name, b.const(0)), past, name)
        b.inits.append(numpy_helper.from_array(np.full(num_experts, DERIVE, np.int64), name))
    padded = {}
    for i, layer in enumerate(kv_layers or []):
        if (layer["value_heads"], layer["value_dim"]) == (layer["key_heads"], layer["key_dim"]):
            continue
        if layer["value_heads"] != layer["key_heads"] or layer["value_dim"] > layer["key_dim"]:
            raise Unsupported(f"attention layer {i} caches keys {layer['key_heads']}x{layer['key_dim']} and values "
                             f"{layer['value_heads']}x{layer['value_dim']}: onnxruntime-genai needs one shape")
        value_in = f"past_key_values.{i}.value"
        renames[value_in] = b.op("Slice", value_in, b.const([0]), b.const([layer["value_dim"]]), b.const([3]))
        padded[f"present.{i}.value"] = layer["key_dim"] - layer["value_dim"]
    tail = _pad_outputs(graph, padded, b)
    _rename_uses(graph, renames)
    # the derivation's own nodes read the originals: prepend them after renaming the rest
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(b.nodes + nodes + tail)
    graph.initializer.extend(b.inits)
    for value in graph.input:  # the defaults' and padded pasts' shapes differ from the fed ones: free dims
        if value.name in renames:
            for index, dim in enumerate(value.type.tensor_type.shape.dim):
                if not value.name.startswith("past_key_values.") or index == 3:
                    dim.Clear()
    return proto


def _pad_outputs(graph: onnx.GraphProto, padded: dict[str, int], b: _Nodes) -> list[onnx.NodeProto]:
    """Zero-pad each graph output in ``padded`` by that many features on its last axis (rank 4); returns the
    ``Pad`` nodes, which go after the rest of the graph."""
    tail = []
    for value in graph.output:
        if value.name not in padded:
            continue
        inner = f"rq_genai/{value.name}"
        for node in graph.node:
            node.output[:] = [inner if o == value.name else o for o in node.output]
        _rename_uses(graph, {value.name: inner})  # later nodes read the unpadded value too
        b.op("Pad", inner, b.const([0, 0, 0, 0, 0, 0, 0, padded[value.name]]), out=value.name)
        tail.append(b.nodes.pop())
        dim = value.type.tensor_type.shape.dim[3]
        if dim.HasField("dim_value"):
            dim.dim_value += padded[value.name]
    return tail


def write_genai_graph(src: Path, offsets: dict[str, int], kv_layers: list[dict]) -> Path:
    """Write ``model.genai.onnx`` next to ``src`` (its initializers stay in ``src``'s data files)."""
    proto = onnx.load(src, load_external_data=False)
    make_genai_graph(proto, offsets, kv_layers)
    out = src.parent / genai_file_name(src.name)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save_model(proto, tmp)
    os.replace(tmp, out)
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def genai_config(manifest: dict, model_config: dict, generation: dict, filename: str) -> dict:
    """onnxruntime-genai's ``genai_config.json`` for a decoder-only export.

    ``model_config``: the checkpoint's ``config.json``; ``generation``: its ``generation_config.json`` (may be
    empty), whose sampling settings become the search defaults. ``past_present_share_buffer`` is false: the
    graph concatenates the cache (``present`` = past + new), it does not write into a preallocated buffer."""
    gen_ids = manifest["generation"]
    kv = manifest["kv_cache"]["layers"][0]
    eos = generation.get("eos_token_id", model_config.get("eos_token_id", gen_ids["eos_token_id"]))
    eos = gen_ids["eos_token_id"] if eos is None else eos
    pad = gen_ids["pad_token_id"] if gen_ids["pad_token_id"] is not None else (eos[0] if isinstance(eos, list) else eos)
    bos = generation.get("bos_token_id", model_config.get("bos_token_id"))
    context = int(model_config.get("max_position_embeddings") or 2048)
    text = model_config.get("text_config") or model_config
    heads = int(text.get("num_attention_heads") or kv["key_heads"])
    search = {"max_length": context, "min_length": 0, "do_sample": False, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": False, "early_stopping": True,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
              "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}
    for hf_key, og_key in SEARCH_KEYS.items():
        if generation.get(hf_key) is not None:
            search[og_key] = generation[hf_key]
    decoder = {
        # 3 = errors: ONNX Runtime warns that the optional inputs are overridable initializers, which they are meant to be
        "session_options": {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []},
        "filename": filename,
        "head_size": kv["key_dim"], "hidden_size": int(text.get("hidden_size") or 0),
        "num_attention_heads": heads, "num_key_value_heads": kv["key_heads"],
        "num_hidden_layers": manifest["kv_cache"]["num_layers"],
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    model = {"type": genai_type(manifest["architecture"]), "context_length": context,
             "vocab_size": manifest["vocab_size"], "eos_token_id": eos, "pad_token_id": pad, "decoder": decoder}
    if bos is not None:
        model["bos_token_id"] = bos
    return {"model": model, "search": search}


def write_genai(folder: Path, manifest: dict, model_dir: Path) -> dict:
    """Write ``model.genai.onnx`` and ``genai_config.json`` into an export ``folder`` and return the
    manifest's ``genai`` entry; ``{"unsupported": why}`` (nothing written) for a model onnxruntime-genai's decoder
    loop cannot run (encoder-decoder models)."""
    if manifest["encoder_decoder"]:
        return {"unsupported": "its decoder loop runs decoder-only graphs"}
    graph = manifest["graphs"]["decoder"]
    offsets = {layer["offsets_input"]: layer["num_experts"] for layer in manifest["moe_layers"]}
    try:
        path = write_genai_graph(folder / graph.get("ort_file", graph["file"]), offsets,
                                 manifest["kv_cache"]["layers"])
    except Unsupported as err:
        return {"unsupported": str(err)}
    config = genai_config(manifest, _read_json(model_dir / "config.json"),
                          _read_json(model_dir / "generation_config.json"), path.name)
    tmp = folder / (GENAI_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, folder / GENAI_CONFIG)
    return {"config": GENAI_CONFIG, "file": path.name, "type": config["model"]["type"],
            "position_ids": "derived from attention_mask unless fed", "offsets": "past_seq unless fed"}
