"""The PyTorch side of the export: which modules are traced, with which inputs and outputs.

Each MoE layer's :class:`rq.rqmodel.model.RQExperts` is swapped for an :class:`ExportExperts` whose forward,
under ``torch.onnx.is_in_onnx_export()``, emits ONE ``rq::RQMoE`` node (``torch.onnx.ops.symbolic_multi_out``)
with the layer's buffers as inputs: they become the graph's initializers, byte for byte (docs/spec.md §5 INT4 data
is never re-quantized). The router before it is the model's own code, traced into standard ops.

Per-layer replica offsets enter and per-layer ``expert_counts`` leave through a side channel
(:class:`LayerIO`), because the Hugging Face forward between the graph's inputs and the experts call is
not ours to change. The graph wrappers flatten everything into named tensors:

- decoder-only (:class:`CausalLMGraph`): ``input_ids``, ``attention_mask``, ``position_ids``,
  ``past_key_values.{i}.key/value``, ``rq_offsets.{l}`` -> ``logits``, ``present.{i}.key/value``,
  ``expert_counts.{l}``. Prefill is the same graph with a past of length 0.
- encoder-decoder (Switch Transformers): :class:`EncoderGraph` and :class:`DecoderGraph` (self-attention
  cache only; cross-attention keys/values are recomputed from ``encoder_hidden_states`` each step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from rq.export.function import DOMAIN, OP_NAME, VERSION, node_attributes
from rq.rqmodel.model import RQExperts


@dataclass
class LayerIO:
    """Side channel of one MoE layer during a traced call: offsets in, counts out."""

    offsets: torch.Tensor | None = None  # [N] int64
    counts: torch.Tensor | None = None  # [N] int64


class ExportExperts(nn.Module):
    """Drop-in for :class:`RQExperts` (same call) that becomes one ``rq::RQMoE`` node when exported.

    Outside an ONNX export it runs the wrapped reference with the side-channel offsets, statelessly
    (the graph's semantics: offsets in, counts out), so a wrapper can be smoke-tested in PyTorch.
    """

    def __init__(self, rq: RQExperts, layer: int):
        super().__init__()
        assert rq.w_in_scales.dtype == rq.w_out_scales.dtype == torch.float16, \
            f"INT4 scales must stay float16 (the INT4 format), layer {layer} has {rq.w_in_scales.dtype}"
        self.rq, self.layer = rq, layer
        self.io = LayerIO()
        # concrete python values now: buffers are fake tensors while torch.export traces
        self.attrs = node_attributes(rq.layer)

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rq, n = self.rq, self.rq.num_experts
        offsets = self.io.offsets if self.io.offsets is not None else torch.zeros(n, dtype=torch.int64)
        weights = weights.to(hidden.dtype)  # docs/spec.md §8: topk_weights has the hidden float type
        if torch.onnx.is_in_onnx_export():
            y, counts = torch.onnx.ops.symbolic_multi_out(
                f"{DOMAIN}::{OP_NAME}",
                [hidden, ids, weights, offsets, *rq.weight_tensors()],  # the buffers: initializers
                attrs=self.attrs, dtypes=(hidden.dtype, torch.int64), shapes=(hidden.shape, [n]), version=VERSION)
            self.io.counts = counts
            return y
        saved_mode, saved_offsets = rq.mode, rq.offsets.clone()
        try:
            rq.mode = "streaming"
            rq.offsets.copy_(offsets)
            y = rq(hidden, ids, weights)
            self.io.counts = rq.last_counts.clone()
        finally:
            rq.mode = saved_mode
            rq.offsets.copy_(saved_offsets)
        return y


def swap_in_export_experts(model: nn.Module, wrappers: list[ExportExperts] | None = None) -> list[ExportExperts]:
    """Replace every :class:`RQExperts` of ``model`` by an :class:`ExportExperts` (``wrappers`` from an earlier
    call are put back, so graph modules built around them stay valid); returns them in layer order."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, RQExperts)]
    known = {id(w.rq): w for w in wrappers or []}
    wrappers = []
    for index, (name, module) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = known.get(id(module)) or ExportExperts(module, index)
        setattr(parent, child, wrapper)
        wrappers.append(wrapper)
    return wrappers


def swap_out_export_experts(model: nn.Module) -> None:
    """Undo :func:`swap_in_export_experts` (the model is the plain R&Q reference again)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ExportExperts):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.rq)


@contextlib.contextmanager
def export_experts(model: nn.Module, wrappers: list[ExportExperts] | None = None) -> Iterator[list[ExportExperts]]:
    """``with export_experts(model) as wrappers:`` the model holds :class:`ExportExperts` inside the block."""
    wrappers = swap_in_export_experts(model, wrappers)
    try:
        yield wrappers
    finally:
        swap_out_export_experts(model)


@dataclass(frozen=True)
class KVSpec:
    """Shapes of one attention layer's cache: ``[batch, heads, seq, dim]`` for keys and for values."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int


@dataclass
class GraphSpec:
    """A traced module with its sample inputs and the ONNX names and dynamic axes of every tensor."""

    name: str  # "decoder" or "encoder"
    file: str
    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    moe_layers: list[int]  # indices into the model's MoE layers (the ExportExperts order)
    dims: dict[str, list[str | int]] = field(default_factory=dict)  # tensor name -> named dims


def _self_attention_cache(cache):
    return getattr(cache, "self_attention_cache", cache)


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in _self_attention_cache(cache).layers]


def _set_offsets(experts: list[ExportExperts], offsets) -> None:
    for wrapper, off in zip(experts, offsets):
        wrapper.io.offsets = off


class CausalLMGraph(nn.Module):
    """``(input_ids, attention_mask, position_ids, past, offsets) -> (logits, present, counts)``."""

    def __init__(self, model: nn.Module, experts: list[ExportExperts]):
        super().__init__()
        self.model = model
        self.experts = experts  # plain list: the modules are registered inside ``model``

    def forward(self, input_ids, attention_mask, position_ids, past, offsets):
        from transformers import DynamicCache

        _set_offsets(self.experts, offsets)
        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        return out.logits, _cache_tensors(out.cache), [w.io.counts for w in self.experts]


class EncoderGraph(nn.Module):
    """Seq2seq encoder: ``(input_ids, attention_mask, offsets) -> (encoder_hidden_states, counts)``."""

    def __init__(self, model: nn.Module, experts: list[ExportExperts]):
        super().__init__()
        self.model, self.experts = model, experts

    def forward(self, input_ids, attention_mask, offsets):
        _set_offsets(self.experts, offsets)
        hidden = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, [w.io.counts for w in self.experts]


class DecoderGraph(nn.Module):
    """Seq2seq decoder step: ``(decoder_input_ids, encoder_hidden_states, encoder_attention_mask, past,
    offsets) -> (logits, present, counts)``; the self-attention cache grows, cross-attention is recomputed."""

    def __init__(self, model: nn.Module, experts: list[ExportExperts]):
        super().__init__()
        self.model, self.experts = model, experts

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask, past, offsets):
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import MoEModelOutputWithPastAndCrossAttentions

        _set_offsets(self.experts, offsets)
        cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=[(k, v) for k, v in past]), DynamicCache())
        encoded = MoEModelOutputWithPastAndCrossAttentions(last_hidden_state=encoder_hidden_states)
        out = self.model(encoder_outputs=encoded, attention_mask=encoder_attention_mask,
                         decoder_input_ids=decoder_input_ids, cache=cache, use_cache=True)
        return out.logits, _cache_tensors(out.cache), [w.io.counts for w in self.experts]


def kv_specs(model: nn.Module, encoder_decoder: bool) -> list[KVSpec]:
    """Cache shapes of every (self-)attention layer, read from one tiny forward of the model."""
    ids = torch.full((1, 2), 2, dtype=torch.int64)
    with torch.no_grad():
        if encoder_decoder:  # the encoder is run apart: a use_cache flag would reach it and be refused
            from transformers import DynamicCache, EncoderDecoderCache

            encoded = model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
            out = model(encoder_outputs=encoded, attention_mask=torch.ones_like(ids), decoder_input_ids=ids,
                        cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), use_cache=True)
        else:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    specs = []
    for k, v in _cache_tensors(out.cache):
        assert k.dim() == 4 and v.dim() == 4, f"expected [batch, heads, seq, dim] cache tensors, got {tuple(k.shape)}"
        specs.append(KVSpec(k.shape[1], k.shape[3], v.shape[1], v.shape[3]))
    return specs


def past_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def graph_specs(model: nn.Module, experts: list[ExportExperts], moe_paths: list[str], encoder_decoder: bool,
                dtype: torch.dtype) -> list[GraphSpec]:
    """The graphs to export for ``model``, with sample inputs that avoid 0/1 shape specialisation."""
    from torch.export import Dim

    batch, seq, past_seq = Dim("batch"), Dim("seq"), Dim("past_seq")
    kv = kv_specs(model, encoder_decoder)
    b, s, p = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    past = [(torch.randn(b, spec.key_heads, p, spec.key_dim, generator=gen).to(dtype),
             torch.randn(b, spec.value_heads, p, spec.value_dim, generator=gen).to(dtype)) for spec in kv]
    past_dims = [({0: batch, 2: past_seq}, {0: batch, 2: past_seq}) for _ in kv]
    kv_dims = {}
    for i, spec in enumerate(kv):
        kv_dims[f"past_key_values.{i}.key"] = ["batch", spec.key_heads, "past_seq", spec.key_dim]
        kv_dims[f"past_key_values.{i}.value"] = ["batch", spec.value_heads, "past_seq", spec.value_dim]
        kv_dims[f"present.{i}.key"] = ["batch", spec.key_heads, "total_seq", spec.key_dim]
        kv_dims[f"present.{i}.value"] = ["batch", spec.value_heads, "total_seq", spec.value_dim]
    ids = torch.randint(2, vocab, (b, s), generator=gen)

    def offsets_for(layers):
        return [torch.zeros(experts[l].rq.num_experts, dtype=torch.int64) for l in layers]

    def layer_dims(layers):
        dims = {}
        for l in layers:
            dims[f"rq_offsets.{l}"] = [experts[l].rq.num_experts]
            dims[f"expert_counts.{l}"] = [experts[l].rq.num_experts]
        return dims

    if not encoder_decoder:
        layers = list(range(len(experts)))
        args = (ids, torch.ones(b, p + s, dtype=torch.int64), torch.arange(p, p + s).expand(b, s).contiguous(), past,
                offsets_for(layers))
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: Dim("total_seq")}, {0: batch, 1: seq}, past_dims,
                   [None] * len(layers))
        inputs = ["input_ids", "attention_mask", "position_ids", *past_names(len(kv), "past_key_values"),
                  *[f"rq_offsets.{l}" for l in layers]]
        outputs = ["logits", *past_names(len(kv), "present"), *[f"expert_counts.{l}" for l in layers]]
        dims = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "total_seq"],
                "position_ids": ["batch", "seq"], "logits": ["batch", "seq", vocab], **kv_dims, **layer_dims(layers)}
        return [GraphSpec("decoder", "model.onnx", CausalLMGraph(model, experts), args, inputs, outputs, dynamic,
                          layers, dims)]

    enc_layers = [l for l, path in enumerate(moe_paths) if path.startswith("encoder.")]
    dec_layers = [l for l, path in enumerate(moe_paths) if path.startswith("decoder.")]
    assert len(enc_layers) + len(dec_layers) == len(moe_paths), f"MoE layers outside encoder/decoder: {moe_paths}"
    hidden_size = model.config.d_model
    enc_seq = Dim("encoder_seq")
    enc_args = (ids, torch.ones(b, s, dtype=torch.int64), offsets_for(enc_layers))
    enc = GraphSpec(
        "encoder", "encoder.onnx", EncoderGraph(model, [experts[l] for l in enc_layers]), enc_args,
        ["input_ids", "attention_mask", *[f"rq_offsets.{l}" for l in enc_layers]],
        ["encoder_hidden_states", *[f"expert_counts.{l}" for l in enc_layers]],
        ({0: batch, 1: enc_seq}, {0: batch, 1: enc_seq}, [None] * len(enc_layers)), enc_layers,
        {"input_ids": ["batch", "encoder_seq"], "attention_mask": ["batch", "encoder_seq"],
         "encoder_hidden_states": ["batch", "encoder_seq", hidden_size], **layer_dims(enc_layers)})
    encoder_hidden = torch.randn(b, s + 2, hidden_size, generator=gen).to(dtype)
    dec_args = (torch.randint(2, vocab, (b, s), generator=gen), encoder_hidden, torch.ones(b, s + 2, dtype=torch.int64),
                past, offsets_for(dec_layers))
    dec = GraphSpec(
        "decoder", "decoder.onnx", DecoderGraph(model, [experts[l] for l in dec_layers]), dec_args,
        ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask",
         *past_names(len(kv), "past_key_values"), *[f"rq_offsets.{l}" for l in dec_layers]],
        ["logits", *past_names(len(kv), "present"), *[f"expert_counts.{l}" for l in dec_layers]],
        ({0: batch, 1: seq}, {0: batch, 1: enc_seq}, {0: batch, 1: enc_seq}, past_dims, [None] * len(dec_layers)),
        dec_layers,
        {"decoder_input_ids": ["batch", "seq"], "encoder_hidden_states": ["batch", "encoder_seq", hidden_size],
         "encoder_attention_mask": ["batch", "encoder_seq"], "logits": ["batch", "seq", vocab], **kv_dims,
         **layer_dims(dec_layers)})
    return [enc, dec]
