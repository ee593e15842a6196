"""The ``fast`` experts backend: the op of docs/spec.md §8 as two grouped matrix products, like the original model.

The reference (:func:`rq.core.op.rq_moe_reference`) dequantizes every INT4 copy it runs, on every call, which is
most of its time. Here each layer's weights are turned once into the compute dtype and grouped by *weight
version*: a version is one distinct ``(w_in, w_out)`` pair — each original-precision copy is one, and all the
INT4 copies of a logical expert (its INT4 primary and its replicas, which hold the same §5 bytes) share one,
and so do its INT8 copies (§5a), each dequantized exactly (``q * scale``). Assignments are mapped to copies by the
replica rule (§4, exact) and then to versions; since copies of one version compute the same function, their rows are
multiplied together with ``torch.nn.functional.grouped_mm`` — the kernel Hugging Face's own ``grouped_mm`` experts use.

Memory: one float copy per quantized version (one expert per logical expert and quantized precision it has), kept on the layer's
:class:`~rq.core.op.RQLayerWeights` (which ``RQExperts`` keeps while its buffers are unchanged). A layer whose
original-precision weights exceed :data:`VIEW_BYTES` multiplies them straight from its own weights (transposed
views: no copy when the compute dtype and device are theirs), at the price of a second grouped product per
projection; smaller layers copy them next to the quantized versions and make one call (the fixed cost of a call
is what matters there: 10-20 % of a small layer's decode step, measured on the demo model). The reference stays the
definition the tests compare this backend with (within the §9 tolerances).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rq.core import replica
from rq.core.experts import apply_activation
from rq.core.op import RQLayerWeights, check_call, copy_weights


VIEW_BYTES = 64 << 20  # per layer: above, original-precision weights are used in place (module doc)


class Versions(NamedTuple):
    """The distinct weight versions of one layer in the compute dtype, and which version each copy uses.
    Versions ``[0, P_orig)`` are the original-precision copies (their slots), the rest the INT4 and INT8 versions; the
    weights come in one or two groups of consecutive versions (one tensor each)."""

    w_in_t: tuple[torch.Tensor, ...]  # groups of [U_g, H, I_in]: input @ weight
    w_out_t: tuple[torch.Tensor, ...]  # groups of [U_g, I, H]
    version: torch.Tensor  # [P + 1] int64: version of each physical copy; entry P (dropped ids) = U
    logcnt: torch.Tensor  # [N] int64 on the device
    base: torch.Tensor  # [N] int64: first physical id of each expert

    @property
    def num_versions(self) -> int:
        return sum(w.shape[0] for w in self.w_in_t)


def _same_bytes(layer: RQLayerWeights, a: int, b: int) -> bool:
    """Whether quantized copies ``a`` and ``b`` (physical ids, one precision class) hold identical bytes and scales."""
    sa, sb = int(layer.tables.slot[a]), int(layer.tables.slot[b])
    names = ("w_in_q", "w_in_scales", "w_out_q", "w_out_scales")
    if layer.precision[a] == 2:
        names = tuple(name + "8" for name in names)
    return all(torch.equal(getattr(layer, n)[sa], getattr(layer, n)[sb]) for n in names)


def _groups(original: torch.Tensor, stacked: torch.Tensor | None, in_place: bool) -> tuple[torch.Tensor, ...]:
    """Weights ``[U_g, cols, rows]`` per group: ``original [P_orig, rows, cols]`` transposed in place (a view)
    and the quantized versions (``stacked``, already transposed), or all of them in one tensor. Empty groups are
    left out."""
    original_t = original.transpose(1, 2)
    if not in_place:
        return (torch.cat([original_t, stacked]) if stacked is not None else original_t.contiguous(),)
    return tuple(g for g in (original_t, stacked) if g is not None and len(g))


def _stacked_versions(layer: RQLayerWeights, owners: list[int], dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The dequantized ``w_in`` and ``w_out`` of the copies ``owners``, transposed (``[U, cols, rows]``), each written
    into one preallocated tensor: a layer's quantized versions are held once, not once more while stacked."""
    stacked: list[torch.Tensor | None] = [None, None]
    for index, p in enumerate(owners):
        for which, w in enumerate(copy_weights(layer, p, dtype)):
            w = w.to(device).T
            if stacked[which] is None:
                stacked[which] = torch.empty((len(owners), *w.shape), dtype=w.dtype, device=device)
            stacked[which][index].copy_(w)
    return stacked[0], stacked[1]


def build_versions(layer: RQLayerWeights, dtype: torch.dtype, device: torch.device) -> Versions:
    """Group the copies of ``layer`` by identical weights; each quantized version is materialized once in ``dtype``,
    original-precision copies are used in place (views of the layer's weights) above :data:`VIEW_BYTES`."""
    phy2log, slot = layer.tables.phy2log.tolist(), layer.tables.slot.tolist()
    num_orig = layer.num_orig
    owner_of_int4_version: list[int] = []  # a representative physical copy per INT4 version
    version = []
    int4_versions_of: dict[tuple[int, int], list[int]] = {}  # (logical expert, precision) -> its quantized versions
    for p, precision in enumerate(layer.precision):
        if precision == 0:
            version.append(slot[p])
            continue
        candidates = int4_versions_of.setdefault((phy2log[p], precision), [])
        match = next((v for v in candidates if _same_bytes(layer, owner_of_int4_version[v], p)), None)
        if match is None:
            match = len(owner_of_int4_version)
            candidates.append(match)
            owner_of_int4_version.append(p)
        version.append(num_orig + match)
    int4_in, int4_out = _stacked_versions(layer, owner_of_int4_version, dtype, device)
    orig_in = layer.w_in.to(device=device, dtype=dtype)  # [P_orig, I_in, H]; itself if no cast
    orig_out = layer.w_out.to(device=device, dtype=dtype)
    in_place = (layer.w_in.nbytes + layer.w_out.nbytes) > VIEW_BYTES
    w_in_t = _groups(orig_in, int4_in, in_place)
    w_out_t = _groups(orig_out, int4_out, in_place)
    version.append(num_orig + len(owner_of_int4_version))
    logcnt = torch.tensor(layer.logcnt, dtype=torch.int64, device=device)
    return Versions(w_in_t, w_out_t, torch.tensor(version, dtype=torch.int64, device=device), logcnt,
                    replica.phys_base(logcnt))


def versions_of(layer: RQLayerWeights, dtype: torch.dtype, device: torch.device) -> Versions:
    """:func:`build_versions`, kept on the layer bundle (which lives as long as its weight tensors) for each
    dtype and device, and rebuilt when a weight tensor was modified in place."""
    stamp = tuple(t._version for t in layer.tensors())
    cache = layer.__dict__.setdefault("_fast_versions", {})
    entry = cache.get((dtype, device))
    if entry is None or entry[0] != stamp:
        entry = cache[(dtype, device)] = (stamp, build_versions(layer, dtype, device))
    return entry[1]


def _grouped(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` rows grouped by version (``ends [U]`` cumulative row counts) times ``weight [U, K, N]``:
    one ``grouped_mm`` where its kernel takes the shapes (rows of 16-byte multiples), else a loop of matmuls."""
    size = x.element_size()
    if hasattr(F, "grouped_mm") and (x.shape[1] * size) % 16 == 0 and (weight.shape[-1] * size) % 16 == 0:
        return F.grouped_mm(x.contiguous(), weight, offs=ends.to(torch.int32))
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    out = x.new_empty(x.shape[0], weight.shape[-1])
    for u, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        if b > a:
            out[a:b] = x[a:b] @ weight[u]
    return out


def _grouped_groups(x: torch.Tensor, groups: tuple[torch.Tensor, ...], ends: torch.Tensor) -> torch.Tensor:
    """:func:`_grouped` over consecutive groups of versions (``ends`` covers them all)."""
    if len(groups) == 1:
        return _grouped(x, groups[0], ends)
    parts, first, start = [], 0, 0
    for weight in groups:
        stop = int(ends[first + weight.shape[0] - 1])
        if stop > start:
            parts.append(_grouped(x[start:stop], weight, ends[first:first + weight.shape[0]] - start))
        first, start = first + weight.shape[0], stop
    if not parts:  # no assignment has a copy
        return x.new_empty(0, groups[0].shape[-1])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def rq_moe_fast(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: RQLayerWeights,
                offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and semantics as :func:`rq.core.op.rq_moe_reference`; computes in ``hidden``'s dtype."""
    check_call(hidden, topk_ids, topk_weights, layer, offsets)
    num_tokens, top_k = topk_ids.shape
    y = torch.zeros_like(hidden)
    if num_tokens == 0 or layer.num_copies == 0:
        return y, replica.expert_counts(topk_ids, layer.num_experts)
    v = versions_of(layer, hidden.dtype, hidden.device)
    phys, counts = replica.route(topk_ids, v.logcnt, offsets, v.base)
    phys = phys.reshape(-1)  # [A], -1 = dropped
    version = v.version[phys]  # [A]; phys = -1 reads the last entry: U = dropped
    order = torch.argsort(version, stable=True)
    ends = torch.cumsum(torch.bincount(version, minlength=v.num_versions + 1)[:v.num_versions], 0)
    kept = order[: int(ends[-1])]  # assignments with a copy, grouped by version
    x = hidden[kept // top_k]
    h = apply_activation(_grouped_groups(x, v.w_in_t, ends), layer.activation)
    out = _grouped_groups(h, v.w_out_t, ends) * topk_weights.reshape(-1)[kept].unsqueeze(1).to(hidden.dtype)
    return y.index_add_(0, kept // top_k, out), counts
