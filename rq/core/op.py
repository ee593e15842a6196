"""``rq::RQMoE`` (docs/spec.md §8): one bundle for a layer's weights and attributes, and the op's reference.

:class:`RQLayerWeights` is everything of one R&Q MoE layer that is not per call: the node attributes
(``top_k``, ``activation``, ``group_size``, ``copies`` = ``logcnt``, ``precision``) and the six weight inputs in
the op's stacked layout. Every implementation takes ``(hidden, topk_ids, topk_weights, layer, offsets)``:
:func:`rq_moe_reference` here, the Triton kernels (:func:`rq.kernels.moe.rq_moe`), the PyTorch R&Q model's
experts, the ONNX exporter (which writes ``layer.tensors()`` as initializers and ``layer.attributes()`` on
the node) and, through those attributes and tensors, the TensorRT plugin.

The reference is deliberately simple: one Python loop over the physical copies that received assignments,
INT4 weights dequantized with :mod:`rq.core.int4` (the exact product ``q * scale``), the token -> copy mapping
from :mod:`rq.core.replica`, arithmetic in float32 (``compute_dtype``), and the weighted sum over the top-k
slots in slot order. Only ``torch`` and ``rq.core`` are imported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rq.core import int4, replica
from rq.core.experts import ACTIVATIONS, activation_code, apply_activation, is_glu

__all__ = ["ACTIVATIONS", "CALL_INPUTS", "INPUTS", "OUTPUTS", "WEIGHT_INPUTS", "CopyTables", "RQLayerWeights",
           "activation_code", "check_call", "copy_tables", "is_glu", "rq_moe_reference"]

CALL_INPUTS = ("hidden", "topk_ids", "topk_weights", "offsets")
WEIGHT_INPUTS = ("w_in", "w_out", "w_in_q", "w_in_scales", "w_out_q", "w_out_scales")
INPUTS = CALL_INPUTS + WEIGHT_INPUTS
"""The op's inputs in order (docs/spec.md §8)."""
OUTPUTS = ("y", "expert_counts")


class CopyTables(NamedTuple):
    """Per-physical-copy bookkeeping derived from the op attributes (all int64, on ``logcnt.device``).

    phy2log: ``[P]`` logical expert of each copy; phys_base: ``[N]`` first copy of each expert;
    slot: ``[P]`` index of the copy inside its precision class (docs/spec.md §8); precision: ``[P]`` 0/1.
    """

    phy2log: torch.Tensor
    phys_base: torch.Tensor
    slot: torch.Tensor
    precision: torch.Tensor


def copy_tables(logcnt: torch.Tensor, precision: torch.Tensor) -> CopyTables:
    """Build :class:`CopyTables`; checks that ``precision`` has one 0/1 entry per physical copy."""
    logcnt = torch.as_tensor(logcnt, dtype=torch.int64)
    precision = torch.as_tensor(precision, dtype=torch.int64, device=logcnt.device)
    num_phys = int(logcnt.sum())
    if logcnt.dim() != 1 or bool((logcnt < 1).any()):
        raise ValueError(f"copies (logcnt) must be a [N] vector of integers >= 1, got {logcnt.tolist()}")
    if tuple(precision.shape) != (num_phys,):
        raise ValueError(f"precision must have one entry per physical copy: expected [{num_phys}], got {list(precision.shape)}")
    if bool(((precision != 0) & (precision != 1)).any()):
        raise ValueError(f"precision entries must be 0 (original) or 1 (int4), got {precision.tolist()}")
    is_int4 = precision == 1
    slot = torch.where(is_int4, torch.cumsum(is_int4, 0) - 1, torch.cumsum(~is_int4, 0) - 1)
    return CopyTables(replica.phy2log(logcnt), replica.phys_base(logcnt), slot, precision)


@dataclass(frozen=True, eq=False)
class RQLayerWeights:
    """One R&Q MoE layer as the op sees it: attributes and stacked weights (docs/spec.md §8).

    logcnt: ``[N]`` copies per logical expert (the ``copies`` attribute); precision: ``[P]`` 0 original / 1 INT4
    per physical copy, logical-major; w_in ``[P_orig, I_in, H]``, w_out ``[P_orig, H, I]`` (float);
    w_in_q ``[P_int4, I_in, ceil(H/2)]`` uint8, w_in_scales ``[P_int4, I_in, ceil(H/G)]`` float16,
    w_out_q ``[P_int4, H, ceil(I/2)]``, w_out_scales ``[P_int4, H, ceil(I/G)]``. Copy ``p`` reads slot
    ``#{q < p : precision[q] == precision[p]}`` of its class; an empty class is a ``[0, ...]`` tensor.
    """

    top_k: int
    activation: str
    group_size: int
    logcnt: tuple[int, ...]
    precision: tuple[int, ...]
    w_in: torch.Tensor
    w_out: torch.Tensor
    w_in_q: torch.Tensor
    w_in_scales: torch.Tensor
    w_out_q: torch.Tensor
    w_out_scales: torch.Tensor

    @property
    def num_experts(self) -> int:
        return len(self.logcnt)

    @property
    def num_copies(self) -> int:
        return len(self.precision)

    @property
    def num_orig(self) -> int:
        return self.precision.count(0)

    @property
    def num_int4(self) -> int:
        return self.precision.count(1)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The six weight inputs in op order (:data:`WEIGHT_INPUTS`)."""
        return tuple(getattr(self, name) for name in WEIGHT_INPUTS)

    def attributes(self) -> dict:
        """The node attributes, in docs/spec.md §8 order (``copies`` is ``logcnt``)."""
        return dict(num_experts=self.num_experts, top_k=int(self.top_k), activation=self.activation,
                    copies=[int(c) for c in self.logcnt], precision=[int(p) for p in self.precision],
                    group_size=int(self.group_size))

    @functools.cached_property
    def sizes(self) -> tuple[int, int]:
        """``(H, I)``; validates every attribute and weight shape first (ValueError naming expected and got)."""
        return _check_layer(self)

    @functools.cached_property
    def tables(self) -> CopyTables:
        """Copy tables on CPU (int64)."""
        return copy_tables(torch.tensor(self.logcnt), torch.tensor(self.precision))


def _check_layer(layer: RQLayerWeights) -> tuple[int, int]:
    activation_code(layer.activation)
    copy_tables(torch.tensor(layer.logcnt), torch.tensor(layer.precision))
    glu = is_glu(layer.activation)
    n_orig, n_int4 = layer.num_orig, layer.num_int4
    if n_int4:
        try:
            int4.check_group_size(layer.group_size)
        except ValueError as err:
            raise ValueError(str(err)) from None
    # H and I from whichever class is present: w_in [P_orig, I_in, H], w_out_q [P_int4, H, ceil(I/2)]
    if n_orig:
        hidden, inter = layer.w_out.shape[-2], layer.w_out.shape[-1]
    elif n_int4:
        in_rows = layer.w_in_q.shape[-2]
        hidden, inter = layer.w_out_q.shape[-2], in_rows // 2 if glu else in_rows
    else:
        return 0, 0
    in_rows = 2 * inter if glu else inter
    g = layer.group_size
    expected = {
        "w_in": (n_orig, in_rows, hidden),
        "w_out": (n_orig, hidden, inter),
        "w_in_q": (n_int4, in_rows, int4.packed_width(hidden)),
        "w_in_scales": (n_int4, in_rows, int4.num_blocks(hidden, g)),
        "w_out_q": (n_int4, hidden, int4.packed_width(inter)),
        "w_out_scales": (n_int4, hidden, int4.num_blocks(inter, g)),
    }
    for name, shape in expected.items():
        tensor = getattr(layer, name)
        if shape[0] == 0 and tensor.numel() == 0:
            continue  # an empty class may come with any empty placeholder
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} (activation={layer.activation}), got {list(tensor.shape)}")
    if n_int4:
        for name, dtype in (("w_in_q", torch.uint8), ("w_out_q", torch.uint8), ("w_in_scales", torch.float16),
                            ("w_out_scales", torch.float16)):
            if getattr(layer, name).dtype != dtype:
                raise ValueError(f"{name} must be {dtype} (docs/spec.md §5), got {getattr(layer, name).dtype}")
    return hidden, inter


def check_call(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: RQLayerWeights,
               offsets: torch.Tensor | None = None) -> tuple[int, int]:
    """Validate one call's tensors against the layer; returns ``(H, I)``. Errors name expected and received."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got {list(hidden.shape)}")
    num_tokens = hidden.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [T={num_tokens}, K], got {list(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must be [T, K]={list(topk_ids.shape)}, got {list(topk_weights.shape)}")
    if offsets is not None and tuple(offsets.shape) != (layer.num_experts,):
        raise ValueError(f"offsets must be [N={layer.num_experts}], got {list(offsets.shape)}")
    hidden_size, inter = layer.sizes
    if layer.num_copies and hidden_size and hidden.shape[1] != hidden_size:
        raise ValueError(f"hidden must be [T, H={hidden_size}] for these weights, got {list(hidden.shape)}")
    return hidden.shape[1], inter


def copy_weights(layer: RQLayerWeights, p: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_in [I_in, H], w_out [H, I])`` of physical copy ``p`` in ``dtype``: INT4 copies dequantized exactly."""
    hidden, inter = layer.sizes
    s = int(layer.tables.slot[p])
    if layer.precision[p] == 0:
        return layer.w_in[s].to(dtype), layer.w_out[s].to(dtype)
    g = layer.group_size
    return (int4.dequantize_values(layer.w_in_q[s], layer.w_in_scales[s], g, hidden, dtype),
            int4.dequantize_values(layer.w_out_q[s], layer.w_out_scales[s], g, inter, dtype))


def rq_moe_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: RQLayerWeights,
                     offsets: torch.Tensor | None = None, *,
                     compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [T, H]`` (dtype of ``hidden``) and ``expert_counts [N]`` int64 of ``rq::RQMoE``.

    hidden: ``[T, H]``; topk_ids / topk_weights: ``[T, K]``; offsets: ``[N]`` int64 or None (zeros).
    Ids outside ``[0, N)`` are dropped: no load, no output. Everything runs in ``compute_dtype``.
    """
    check_call(hidden, topk_ids, topk_weights, layer, offsets)
    device = hidden.device
    logcnt = torch.tensor(layer.logcnt, dtype=torch.int64, device=device)
    num_tokens, top_k = topk_ids.shape
    phys = replica.physical_ids(topk_ids, logcnt, offsets).reshape(-1)  # [T*K], -1 = dropped
    counts = replica.expert_counts(topk_ids, layer.num_experts)
    x = hidden.to(compute_dtype)
    out = torch.zeros(num_tokens * top_k, hidden.shape[1], dtype=compute_dtype, device=device)  # [T*K, H]
    for p in torch.unique(phys[phys >= 0]).tolist():
        rows = torch.nonzero(phys == p).squeeze(1)  # assignments of copy p, token-major
        wi, wo = copy_weights(layer, p, compute_dtype)
        h = apply_activation(x[rows // top_k] @ wi.T, layer.activation)  # [M, I]
        out[rows] = h @ wo.T  # [M, H]
    weights = topk_weights.to(compute_dtype).reshape(-1, 1)
    weighted = torch.where((phys >= 0).unsqueeze(1), out * weights, torch.zeros_like(out))
    y = weighted.reshape(num_tokens, top_k, -1).sum(dim=1)  # slot order
    return y.to(hidden.dtype), counts
