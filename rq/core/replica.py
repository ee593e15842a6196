"""Replica assignment rule of docs/spec.md §4 and the copy bookkeeping around it. Pure functions over tensors.

Vocabulary (shared with planner, placement, export and kernels, after DeepSeek EPLB):
``logcnt [N]`` copies per logical expert (C_e), ``phys_base [N]`` first physical id of each logical expert
(physical ids are logical-major), ``phy2log [P]`` logical expert of each physical copy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def phys_base(logcnt: torch.Tensor) -> torch.Tensor:
    """``[N]`` first physical id of each logical expert: ``phys(e, 0) = sum_{j<e} C_j``."""
    return torch.cumsum(logcnt, 0) - logcnt


def phy2log(logcnt: torch.Tensor) -> torch.Tensor:
    """``[P]`` logical expert of each physical copy, P = sum(logcnt)."""
    return torch.repeat_interleave(torch.arange(logcnt.numel(), device=logcnt.device), logcnt)


def copy_index(logcnt: torch.Tensor) -> torch.Tensor:
    """``[P]`` copy index ``c`` of each physical copy: ``phys(e, c) - phys_base[e]`` (0 = the primary)."""
    logcnt = logcnt.to(torch.int64)
    return torch.arange(int(logcnt.sum()), device=logcnt.device) - phys_base(logcnt)[phy2log(logcnt)]


def assignment_ranks(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rank ``n`` of each assignment among those routed to the same expert, token-major (docs/spec.md §1, §4).

    ids: ``[T, K]`` logical expert ids; entries outside ``[0, N)`` are dropped assignments (Switch
    capacity overflow) and get rank -1. Returns int64 ``[T, K]``. Deterministic: a stable sort of the
    flattened ids keeps the token-major order within each expert.
    """
    flat = ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_experts)
    keys = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(flat.numel(), device=flat.device) - starts[keys[order]]
    return torch.where(valid, ranks, torch.full_like(ranks, -1)).reshape(ids.shape)


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[N]`` loads of one call (dropped assignments excluded)."""
    flat = ids.reshape(-1).to(torch.int64)
    flat = flat[(flat >= 0) & (flat < num_experts)]
    return torch.bincount(flat, minlength=num_experts)


def assign_copies(ids: torch.Tensor, logcnt: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Copy index ``c = (o_e + n) mod C_e`` of each assignment (docs/spec.md §4, exact).

    ids: ``[T, K]`` logical ids; logcnt: ``[N]`` copies per expert; offsets: ``[N]`` int64 or None (zeros).
    Returns int64 ``[T, K]``; dropped assignments get -1.
    """
    num_experts = logcnt.numel()
    ranks = assignment_ranks(ids, num_experts)
    safe = ids.to(torch.int64).clamp(0, num_experts - 1)
    offs = torch.zeros(num_experts, dtype=torch.int64, device=ids.device) if offsets is None else offsets.to(torch.int64)
    copies = (offs[safe] + ranks) % logcnt.to(torch.int64)[safe]
    return torch.where(ranks >= 0, copies, torch.full_like(copies, -1))


SMALL_CALL = 64
"""Calls with at most this many assignments (decode steps) rank them by an ``A x A`` comparison instead of a
sort: a few elementwise operations, where a sort's fixed costs dominate a tiny call."""


def route(ids: torch.Tensor, logcnt: torch.Tensor, offsets: torch.Tensor | None = None,
          base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phys [T, K], expert_counts [N])`` of one call: the physical copy ``phys(e, c)`` of every assignment
    (-1 = dropped) and the loads. The same integers as :func:`physical_ids` and :func:`expert_counts`
    (docs/spec.md §4) in fewer operations (the hot path of a forward).

    base: ``phys_base(logcnt)`` when the caller has it already."""
    num_experts = logcnt.numel()
    logcnt = logcnt.to(torch.int64)
    base = phys_base(logcnt) if base is None else base
    flat = ids.reshape(-1).to(torch.int64)
    keys = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # dropped -> N
    counts = torch.bincount(keys, minlength=num_experts + 1)
    if flat.numel() <= SMALL_CALL:  # rank = earlier assignments of the same expert, token-major
        same = keys.unsqueeze(1) == keys.unsqueeze(0)  # [A, A]
        rank = torch.tril(same, diagonal=-1).sum(1)
        expert = keys.clamp(max=num_experts - 1)
        shifted = rank if offsets is None else rank + offsets.to(torch.int64)[expert]
        phys = torch.where(keys < num_experts, base[expert] + shifted % logcnt[expert], -1)
        return phys.reshape(ids.shape), counts[:num_experts]
    order = torch.argsort(keys, stable=True)  # token-major inside each expert
    sorted_keys = keys[order]
    expert = sorted_keys.clamp(max=num_experts - 1)
    rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_keys]
    shifted = rank if offsets is None else rank + offsets.to(torch.int64)[expert]
    phys_sorted = torch.where(sorted_keys < num_experts, base[expert] + shifted % logcnt[expert], -1)
    phys = torch.empty_like(flat)
    phys[order] = phys_sorted
    return phys.reshape(ids.shape), counts[:num_experts]


class CopySplit(NamedTuple):
    """What :func:`split_load` derives from ``logcnt`` alone, computed once for a layer (``[P]`` int64 each)."""

    owner: torch.Tensor  # logical expert of each copy
    copy: torch.Tensor  # copy index c of each copy
    count: torch.Tensor  # C_e of each copy's expert


def copy_split(logcnt: torch.Tensor) -> CopySplit:
    logcnt = logcnt.to(torch.int64)
    owner = phy2log(logcnt)
    return CopySplit(owner, copy_index(logcnt), logcnt[owner])


def physical_ids(ids: torch.Tensor, logcnt: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Physical copy id of each assignment, ``phys(e, c)``; dropped assignments get -1. int64 ``[T, K]``."""
    copy = assign_copies(ids, logcnt, offsets)
    base = phys_base(logcnt.to(torch.int64))
    phys = base[ids.to(torch.int64).clamp(0, logcnt.numel() - 1)] + copy
    return torch.where(copy >= 0, phys, torch.full_like(phys, -1))


def copy_loads(ids: torch.Tensor, logcnt: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[P]`` loads of the physical copies for one call."""
    phys = physical_ids(ids, logcnt, offsets).reshape(-1)
    return torch.bincount(phys[phys >= 0], minlength=int(logcnt.sum()))


def split_load(load: torch.Tensor, logcnt: torch.Tensor, offsets: torch.Tensor | None = None,
               split: CopySplit | None = None) -> torch.Tensor:
    """``[..., P]`` per-copy loads that the rule gives when ``load[..., e]`` assignments reach expert ``e`` in
    one call (any leading dimensions: one row per call); ``split``: :func:`copy_split` of ``logcnt``, when the
    caller keeps it.

    Copy c of e receives the ranks n with (o_e + n) mod C_e == c: ``L // C`` plus one for the first
    ``L mod C`` copies counted from the offset. Exact for a call whose per-expert loads are ``load``, so
    batch LIS and the planner's predictions need no per-assignment work.
    """
    load = load.to(torch.int64)
    owner, copy, c = split if split is not None else copy_split(logcnt)
    if offsets is not None:
        copy = (copy - offsets.to(torch.int64)[owner]) % c  # position of this copy in the rotation from the offset
    per_owner = load[..., owner]
    return per_owner // c + (copy < per_owner % c).to(torch.int64)
