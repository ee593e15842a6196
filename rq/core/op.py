"""``rq::RQMoE`` (docs/spec.md §8): one bundle for a layer's weights and attributes, and the op's reference.

:class:`RQLayerWeights` is everything of one R&Q MoE layer that is not per call: the node attributes
(``top_k``, ``activation``, ``group_size``, ``copies`` = ``logcnt``, ``precision``) and the weight inputs in
the op's stacked layout: six (original and INT4 classes), or ten when the bundle carries the INT8 class too.
Every implementation takes ``(hidden, topk_ids, topk_weights, layer, offsets)``: :func:`rq_moe_reference` here,
the Triton kernels (:func:`rq.kernels.moe.rq_moe`), the PyTorch R&Q model's experts, the ONNX exporter (which
writes ``layer.tensors()`` as initializers and ``layer.attributes()`` on the node) and, through those attributes
and tensors, the TensorRT plugin.

The reference is deliberately simple: one Python loop over the physical copies that received assignments,
INT4 and INT8 weights dequantized with :mod:`rq.core.int4` / :mod:`rq.core.int8` (the exact product
``q * scale``), the token -> copy mapping from :mod:`rq.core.replica`, arithmetic in float32
(``compute_dtype``), and the weighted sum over the top-k slots in slot order. Only ``torch`` and ``rq.core`` are imported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rq.core import int4, int8, replica
from rq.core.experts import ACTIVATIONS, activation_code, apply_activation, is_glu

__all__ = ["ACTIVATIONS", "CALL_INPUTS", "INPUTS", "INPUTS_INT8", "INT8_INPUTS", "OUTPUTS", "PRECISIONS", "WEIGHT_INPUTS",
           "CopyTables", "RQLayerWeights", "activation_code", "check_call", "copy_tables", "is_glu", "rq_moe_reference",
           "stack_layer"]

CALL_INPUTS = ("hidden", "topk_ids", "topk_weights", "offsets")
INT8_INPUTS = ("w_in_q8", "w_in_scales8", "w_out_q8", "w_out_scales8")
WEIGHT_INPUTS = ("w_in", "w_out", "w_in_q", "w_in_scales", "w_out_q", "w_out_scales")
"""The six weight inputs every node has; the four :data:`INT8_INPUTS` follow them only where a model has INT8
copies (docs/spec.md §8), so a file without INT8 copies is the same as before the INT8 class existed."""
INPUTS = CALL_INPUTS + WEIGHT_INPUTS
"""The op's inputs in order (docs/spec.md §8), without the optional INT8 class."""
INPUTS_INT8 = INPUTS + INT8_INPUTS
"""The op's inputs in order with the INT8 class."""
PRECISIONS = ("original", "int4", "int8")
"""Precision names by code (docs/spec.md §8 ``precision`` attribute): 0 original, 1 INT4, 2 INT8."""
OUTPUTS = ("y", "expert_counts")


class CopyTables(NamedTuple):
    """Per-physical-copy bookkeeping derived from the op attributes (all int64, on ``logcnt.device``).

    phy2log: ``[P]`` logical expert of each copy; phys_base: ``[N]`` first copy of each expert;
    slot: ``[P]`` index of the copy inside its precision class (docs/spec.md §8); precision: ``[P]`` 0/1/2.
    """

    phy2log: torch.Tensor
    phys_base: torch.Tensor
    slot: torch.Tensor
    precision: torch.Tensor


def copy_tables(logcnt: torch.Tensor, precision: torch.Tensor) -> CopyTables:
    """Build :class:`CopyTables`; checks that ``precision`` has one 0/1/2 entry per physical copy."""
    logcnt = torch.as_tensor(logcnt, dtype=torch.int64)
    precision = torch.as_tensor(precision, dtype=torch.int64, device=logcnt.device)
    num_phys = int(logcnt.sum())
    if logcnt.dim() != 1 or bool((logcnt < 1).any()):
        raise ValueError(f"copies (logcnt) must be a [N] vector of integers >= 1, got {logcnt.tolist()}")
    if tuple(precision.shape) != (num_phys,):
        raise ValueError(f"precision must have one entry per physical copy: expected [{num_phys}], got {list(precision.shape)}")
    if bool(((precision < 0) | (precision >= len(PRECISIONS))).any()):
        raise ValueError(f"precision entries must be 0 (original), 1 (int4) or 2 (int8), got {precision.tolist()}")
    slot = torch.zeros_like(precision)
    for code in range(len(PRECISIONS)):
        members = precision == code
        slot = torch.where(members, torch.cumsum(members, 0) - 1, slot)
    return CopyTables(replica.phy2log(logcnt), replica.phys_base(logcnt), slot, precision)


@dataclass(frozen=True, eq=False)
class RQLayerWeights:
    """One R&Q MoE layer as the op sees it: attributes and stacked weights (docs/spec.md §8).

    logcnt: ``[N]`` copies per logical expert (the ``copies`` attribute); precision: ``[P]`` 0 original / 1 INT4
    / 2 INT8 per physical copy, logical-major; w_in ``[P_orig, I_in, H]``, w_out ``[P_orig, H, I]`` (float);
    w_in_q ``[P_int4, I_in, ceil(H/2)]`` uint8, w_in_scales ``[P_int4, I_in, ceil(H/G)]`` float16,
    w_out_q ``[P_int4, H, ceil(I/2)]``, w_out_scales ``[P_int4, H, ceil(I/G)]``; the INT8 class (``None`` when the
    bundle does not carry it, which allows no precision 2): w_in_q8 ``[P_int8, I_in, H]`` int8, w_in_scales8
    ``[P_int8, I_in, ceil(H/G)]`` float16, w_out_q8 ``[P_int8, H, I]``, w_out_scales8 ``[P_int8, H, ceil(I/G)]``.
    Copy ``p`` reads slot ``#{q < p : precision[q] == precision[p]}`` of its class; an empty class is a
    ``[0, ...]`` tensor.
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
    w_in_q8: torch.Tensor | None = None
    w_in_scales8: torch.Tensor | None = None
    w_out_q8: torch.Tensor | None = None
    w_out_scales8: torch.Tensor | None = None

    @property
    def has_int8_class(self) -> bool:
        """Whether the bundle carries the INT8 weight inputs (all four, possibly empty)."""
        return self.w_in_q8 is not None

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

    @property
    def num_int8(self) -> int:
        return self.precision.count(2)

    @property
    def weight_names(self) -> tuple[str, ...]:
        """:data:`WEIGHT_INPUTS`, plus :data:`INT8_INPUTS` when the bundle carries the INT8 class."""
        return WEIGHT_INPUTS + INT8_INPUTS if self.has_int8_class else WEIGHT_INPUTS

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The weight inputs in op order (:attr:`weight_names`)."""
        return tuple(getattr(self, name) for name in self.weight_names)

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


def stack_layer(top_k: int, activation: str, group_size: int, logcnt: tuple[int, ...], precision: tuple[int, ...],
                copies: list[tuple[torch.Tensor, torch.Tensor]], *, int8_class: bool = False,
                dtype: torch.dtype | None = None) -> RQLayerWeights:
    """The bundle of one layer from each physical copy's float ``(w_in [I_in, H], w_out [H, I])``, quantized to
    its precision (docs/spec.md §5, §5a). Copies passing the same tensor objects (an expert's replicas) are
    quantized once and share the result. ``int8_class`` adds the INT8 inputs even when no copy is INT8 (every
    node of a model with INT8 copies has them); it is implied by a precision 2. ``dtype`` is that of the
    original-precision stack (default: the first copy's)."""
    assert len(copies) == len(precision) == sum(logcnt), "one (w_in, w_out) per physical copy"
    if not copies:
        raise ValueError("a layer needs at least one copy")
    w_in0, w_out0 = copies[0]
    (in_rows, hidden), inter = w_in0.shape, w_out0.shape[1]
    dtype = dtype or w_in0.dtype
    g = group_size
    memo: dict[tuple[int, int, int], tuple] = {}

    def quantized(p: int, module):
        key = (id(copies[p][0]), id(copies[p][1]), precision[p])
        if key not in memo:
            memo[key] = tuple(module.quantize(w.detach(), g) for w in copies[p])
        return memo[key]

    def stack(items, empty_shape, dt):
        return torch.stack(items) if items else torch.zeros((0, *empty_shape), dtype=dt)

    orig = [tuple(w.detach() for w in copies[p]) for p in range(len(precision)) if precision[p] == 0]  # stack copies
    q4 = [quantized(p, int4) for p in range(len(precision)) if precision[p] == 1]
    q8 = [quantized(p, int8) for p in range(len(precision)) if precision[p] == 2]
    int8_tensors = {}
    if int8_class or q8:
        int8_tensors = dict(
            w_in_q8=stack([a.values for a, _ in q8], (in_rows, hidden), torch.int8),
            w_in_scales8=stack([a.scales for a, _ in q8], (in_rows, int4.num_blocks(hidden, g)), torch.float16),
            w_out_q8=stack([b.values for _, b in q8], (hidden, inter), torch.int8),
            w_out_scales8=stack([b.scales for _, b in q8], (hidden, int4.num_blocks(inter, g)), torch.float16))
    return RQLayerWeights(
        top_k=top_k, activation=activation, group_size=group_size, logcnt=tuple(logcnt), precision=tuple(precision),
        w_in=stack([a for a, _ in orig], (in_rows, hidden), dtype), w_out=stack([b for _, b in orig], (hidden, inter), dtype),
        w_in_q=stack([a.packed for a, _ in q4], (in_rows, int4.packed_width(hidden)), torch.uint8),
        w_in_scales=stack([a.scales for a, _ in q4], (in_rows, int4.num_blocks(hidden, g)), torch.float16),
        w_out_q=stack([b.packed for _, b in q4], (hidden, int4.packed_width(inter)), torch.uint8),
        w_out_scales=stack([b.scales for _, b in q4], (hidden, int4.num_blocks(inter, g)), torch.float16),
        **int8_tensors)


def _check_layer(layer: RQLayerWeights) -> tuple[int, int]:
    activation_code(layer.activation)
    copy_tables(torch.tensor(layer.logcnt), torch.tensor(layer.precision))
    glu = is_glu(layer.activation)
    n_orig, n_int4, n_int8 = layer.num_orig, layer.num_int4, layer.num_int8
    int8_fields = [getattr(layer, name) is None for name in INT8_INPUTS]
    if any(int8_fields) and not all(int8_fields):
        raise ValueError(f"the INT8 class needs all of {', '.join(INT8_INPUTS)} (or none of them)")
    if n_int8 and not layer.has_int8_class:
        raise ValueError(f"precision has {n_int8} INT8 copies (code 2) but the layer carries no INT8 weights "
                         f"({', '.join(INT8_INPUTS)})")
    if n_int4 or n_int8:
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
    elif n_int8:
        hidden, inter = layer.w_out_q8.shape[-2], layer.w_out_q8.shape[-1]
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
    if layer.has_int8_class:
        expected |= {"w_in_q8": (n_int8, in_rows, hidden), "w_in_scales8": (n_int8, in_rows, int4.num_blocks(hidden, g)),
                     "w_out_q8": (n_int8, hidden, inter), "w_out_scales8": (n_int8, hidden, int4.num_blocks(inter, g))}
    for name, shape in expected.items():
        tensor = getattr(layer, name)
        if shape[0] == 0 and tensor.numel() == 0:
            continue  # an empty class may come with any empty placeholder
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} (activation={layer.activation}), got {list(tensor.shape)}")
    dtypes = {}
    if n_int4:
        dtypes |= {"w_in_q": torch.uint8, "w_out_q": torch.uint8, "w_in_scales": torch.float16,
                   "w_out_scales": torch.float16}
    if n_int8:
        dtypes |= {"w_in_q8": torch.int8, "w_out_q8": torch.int8, "w_in_scales8": torch.float16,
                   "w_out_scales8": torch.float16}
    for name, dtype in dtypes.items():
        if getattr(layer, name).dtype != dtype:
            raise ValueError(f"{name} must be {dtype} (docs/spec.md §5, §5a), got {getattr(layer, name).dtype}")
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
    """``(w_in [I_in, H], w_out [H, I])`` of physical copy ``p`` in ``dtype``: INT4 and INT8 copies dequantized
    exactly."""
    hidden, inter = layer.sizes
    s = int(layer.tables.slot[p])
    g = layer.group_size
    if layer.precision[p] == 0:
        return layer.w_in[s].to(dtype), layer.w_out[s].to(dtype)
    if layer.precision[p] == 2:
        return (int8.dequantize_values(layer.w_in_q8[s], layer.w_in_scales8[s], g, dtype),
                int8.dequantize_values(layer.w_out_q8[s], layer.w_out_scales8[s], g, dtype))
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
    y = weighted.reshape(num_tokens, top_k, hidden.shape[1]).sum(dim=1)  # slot order (T may be 0)
    return y.to(hidden.dtype), counts
