"""Replica-aware dispatch (docs/spec.md §4) in Triton: token->copy mapping, loads, and the copy-sorted permutation.

Four small launches, none with atomics, so the result is the same integers whatever the scheduling:

1. ``dispatch_count``: per block of ``BLOCK_A`` assignments, the expert of each assignment (``eid``, N for a
   dropped id), its rank among earlier assignments of the same block and expert (``lrank``), and the
   block's histogram ``hist [NB, N]``.
2. ``dispatch_scan``: per expert, an exclusive prefix sum of ``hist`` over blocks (in place) and the
   loads ``expert_counts [N]``. Rank of an assignment = prefix of its block + its local rank, which is
   exactly the token-major rank ``n`` of docs/spec.md §4.
3. ``dispatch_copies``: per physical copy, its load from the rule (``L // C`` plus one for the first
   ``L mod C`` copies counted from the offset, as :func:`rq.core.replica.split_load`), the exclusive prefix
   ``copy_start [P+1]``, and per precision class the prefix of GEMM row tiles ``tile_start [3, P+1]`` (three
   pointers, one per class — original, INT4, INT8: the TensorRT plugin keeps each in its own 256-byte aligned
   buffer, as the AOT cubins assume 16-byte aligned pointers).
4. ``dispatch_scatter``: ``copy = (o_e + n) mod C_e``, ``phys = phys_base[e] + copy``; the assignments of
   one copy are the ranks ``n`` with one residue mod ``C_e``, so the position inside the copy is ``n // C_e``
   and ``sorted_assign[copy_start[phys] + n // C_e] = a`` is the permutation sorted by physical id,
   token-major inside each copy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK_A = 128  # assignments per dispatch program (the local-rank compare is BLOCK_A x BLOCK_A)
BLOCK_N = 64  # experts per histogram / scan step
BLOCK_B = 32  # blocks per scan step
BLOCK_P = 256  # copies per step of the single-program copy scan


@triton.jit
def dispatch_count_kernel(
    ids_ptr,  # [A] int32/int64 logical ids (token-major flattened topk_ids)
    eid_ptr,  # [A] int32 out: expert id, N for dropped
    lrank_ptr,  # [A] int32 out: rank inside the block among the same expert
    hist_ptr,  # [NB, N] int32 out: per-block loads
    num_assign,
    num_experts,
    BLOCK_A: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    blk = tl.program_id(0)
    idx = tl.arange(0, BLOCK_A)
    offs = blk * BLOCK_A + idx
    in_range = offs < num_assign
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int64)
    valid = in_range & (ids >= 0) & (ids < num_experts)
    eid = tl.where(valid, ids, num_experts).to(tl.int32)
    tl.store(eid_ptr + offs, eid, mask=in_range)
    # rank among earlier assignments of this block routed to the same expert (token-major order)
    same = (eid[:, None] == eid[None, :]) & (idx[None, :] < idx[:, None])
    lrank = tl.sum(same.to(tl.int32), axis=1)
    tl.store(lrank_ptr + offs, lrank, mask=in_range)
    for n0 in range(0, num_experts, BLOCK_N):
        experts = n0 + tl.arange(0, BLOCK_N)
        hits = (eid[:, None] == experts[None, :]).to(tl.int32)
        tl.store(hist_ptr + blk * num_experts + experts, tl.sum(hits, axis=0), mask=experts < num_experts)


@triton.jit
def dispatch_scan_kernel(
    hist_ptr,  # [NB, N] int32 in: per-block loads; out: exclusive prefix over blocks
    counts_ptr,  # [N] int64 out: expert_counts
    num_blocks,
    num_experts,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    experts = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    e_mask = experts < num_experts
    carry = tl.zeros([BLOCK_N], dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        ptrs = hist_ptr + blocks[:, None] * num_experts + experts[None, :]
        mask = (blocks[:, None] < num_blocks) & e_mask[None, :]
        tile = tl.load(ptrs, mask=mask, other=0)
        inclusive = tl.cumsum(tile, axis=0)
        tl.store(ptrs, inclusive - tile + carry[None, :], mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(counts_ptr + experts, carry.to(tl.int64), mask=e_mask)


@triton.jit
def dispatch_copies_kernel(
    counts_ptr,  # [N] int64 loads
    offsets_ptr,  # [N] int64 replica offsets o_e
    logcnt_ptr,  # [N] int32 copies C_e
    base_ptr,  # [N] int32 first physical id of each expert
    phy2log_ptr,  # [P] int32 logical expert of each copy
    prec_ptr,  # [P] int32 0 = original, 1 = int4, 2 = int8
    copy_start_ptr,  # [P+1] int32 out: first sorted row of each copy
    tile_start0_ptr,  # [P+1] int32 out: first row tile of each copy among the original-precision copies
    tile_start1_ptr,  # [P+1] int32 out: the same among the INT4 copies
    tile_start2_ptr,  # [P+1] int32 out: the same among the INT8 copies
    num_phys,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row_carry = 0
    tile_carry0 = 0
    tile_carry1 = 0
    tile_carry2 = 0
    for p0 in range(0, num_phys, BLOCK_P):
        phys = p0 + tl.arange(0, BLOCK_P)
        mask = phys < num_phys
        expert = tl.load(phy2log_ptr + phys, mask=mask, other=0)
        c = tl.load(logcnt_ptr + expert, mask=mask, other=1)
        load = tl.load(counts_ptr + expert, mask=mask, other=0).to(tl.int32)
        off = (tl.load(offsets_ptr + expert, mask=mask, other=0) % c).to(tl.int32)
        off = tl.where(off < 0, off + c, off)  # floor mod, as Python/torch, for negative offsets
        copy = phys - tl.load(base_ptr + expert, mask=mask, other=0)
        shifted = (copy - off + c) % c  # position of this copy in the rotation starting at the offset
        rows = tl.where(mask, load // c + (shifted < load % c).to(tl.int32), 0)
        prec = tl.load(prec_ptr + phys, mask=mask, other=0)
        tiles = (rows + BLOCK_M - 1) // BLOCK_M
        tiles0 = tl.where(prec == 0, tiles, 0)
        tiles1 = tl.where(prec == 1, tiles, 0)
        tiles2 = tl.where(prec == 2, tiles, 0)
        tl.store(copy_start_ptr + phys, row_carry + tl.cumsum(rows, axis=0) - rows, mask=mask)
        tl.store(tile_start0_ptr + phys, tile_carry0 + tl.cumsum(tiles0, axis=0) - tiles0, mask=mask)
        tl.store(tile_start1_ptr + phys, tile_carry1 + tl.cumsum(tiles1, axis=0) - tiles1, mask=mask)
        tl.store(tile_start2_ptr + phys, tile_carry2 + tl.cumsum(tiles2, axis=0) - tiles2, mask=mask)
        row_carry += tl.sum(rows, axis=0)
        tile_carry0 += tl.sum(tiles0, axis=0)
        tile_carry1 += tl.sum(tiles1, axis=0)
        tile_carry2 += tl.sum(tiles2, axis=0)
    tl.store(copy_start_ptr + num_phys, row_carry)
    tl.store(tile_start0_ptr + num_phys, tile_carry0)
    tl.store(tile_start1_ptr + num_phys, tile_carry1)
    tl.store(tile_start2_ptr + num_phys, tile_carry2)


@triton.jit
def dispatch_scatter_kernel(
    eid_ptr,  # [A] int32 expert per assignment (N = dropped)
    lrank_ptr,  # [A] int32 rank inside the block
    prefix_ptr,  # [NB, N] int32 exclusive prefix over blocks
    offsets_ptr,  # [N] int64
    logcnt_ptr,  # [N] int32
    base_ptr,  # [N] int32
    copy_start_ptr,  # [P+1] int32
    sorted_assign_ptr,  # [A] int32 out: assignment at each sorted row (rows >= copy_start[P] untouched)
    assign_pos_ptr,  # [A] int32 out: sorted row of each assignment, -1 = dropped
    phys_ptr,  # [A] int32 out: physical copy of each assignment, -1 = dropped
    num_assign,
    num_experts,
    BLOCK_A: tl.constexpr,
):
    blk = tl.program_id(0)
    offs = blk * BLOCK_A + tl.arange(0, BLOCK_A)
    in_range = offs < num_assign
    eid = tl.load(eid_ptr + offs, mask=in_range, other=num_experts)
    valid = in_range & (eid < num_experts)
    e = tl.where(valid, eid, 0)
    rank = tl.load(prefix_ptr + blk * num_experts + e, mask=valid, other=0) + tl.load(lrank_ptr + offs, mask=valid, other=0)
    c = tl.load(logcnt_ptr + e, mask=valid, other=1)
    off = (tl.load(offsets_ptr + e, mask=valid, other=0) % c).to(tl.int32)
    off = tl.where(off < 0, off + c, off)
    copy = (off + rank) % c
    phys = tl.load(base_ptr + e, mask=valid, other=0) + copy
    pos = tl.load(copy_start_ptr + phys, mask=valid, other=0) + rank // c
    tl.store(sorted_assign_ptr + pos, offs, mask=valid)
    tl.store(assign_pos_ptr + offs, tl.where(valid, pos, -1), mask=in_range)
    tl.store(phys_ptr + offs, tl.where(valid, phys, -1), mask=in_range)


class DeviceTables(NamedTuple):
    """int32 copy tables on the kernels' device (see :func:`rq.core.op.copy_tables`)."""

    logcnt: torch.Tensor  # [N]
    phys_base: torch.Tensor  # [N]
    phy2log: torch.Tensor  # [P]
    precision: torch.Tensor  # [P]
    slot: torch.Tensor  # [P]


class Dispatch(NamedTuple):
    """Result of :func:`dispatch_assignments`. Rows are assignments sorted by physical copy, token-major inside.

    expert_counts: ``[N]`` int64; phys: ``[T, K]`` int32 physical copy (-1 dropped);
    sorted_assign: ``[A]`` int32 assignment of each sorted row (first ``copy_start[P]`` rows valid);
    assign_pos: ``[A]`` int32 sorted row of each assignment (-1 dropped); copy_start: ``[P+1]`` int32;
    tile_start: ``[3, P+1]`` int32 row-tile prefix per precision class (0 original, 1 INT4, 2 INT8) for ``block_m``.
    """

    expert_counts: torch.Tensor
    phys: torch.Tensor
    sorted_assign: torch.Tensor
    assign_pos: torch.Tensor
    copy_start: torch.Tensor
    tile_start: torch.Tensor
    eid: torch.Tensor
    block_m: int


def device_tables(logcnt: torch.Tensor, precision: torch.Tensor, device: torch.device) -> DeviceTables:
    """Copy tables as int32 tensors on ``device`` (built on CPU from the attributes, then moved once)."""
    from rq.core.op import copy_tables

    t = copy_tables(torch.as_tensor(logcnt).cpu(), torch.as_tensor(precision).cpu())
    as32 = lambda v: v.to(torch.int32).to(device)  # noqa: E731
    return DeviceTables(as32(torch.as_tensor(logcnt).cpu()), as32(t.phys_base), as32(t.phy2log), as32(t.precision), as32(t.slot))


def dispatch_assignments(
    topk_ids: torch.Tensor,
    offsets: torch.Tensor | None,
    tables: DeviceTables,
    block_m: int,
) -> Dispatch:
    """Run the four dispatch kernels. topk_ids: ``[T, K]`` int32/int64; offsets: ``[N]`` int64 or None."""
    device = topk_ids.device
    num_experts = tables.logcnt.numel()
    num_phys = tables.phy2log.numel()
    ids = topk_ids.reshape(-1).contiguous()
    num_assign = ids.numel()
    num_blocks = triton.cdiv(max(num_assign, 1), BLOCK_A)
    if offsets is None:
        offsets = torch.zeros(num_experts, dtype=torch.int64, device=device)
    offsets = offsets.to(device=device, dtype=torch.int64).contiguous()
    i32 = dict(dtype=torch.int32, device=device)
    eid = torch.empty(num_assign, **i32)
    lrank = torch.empty(num_assign, **i32)
    hist = torch.empty(num_blocks, num_experts, **i32)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)
    copy_start = torch.empty(num_phys + 1, **i32)
    tile_start = torch.empty(3, num_phys + 1, **i32)
    sorted_assign = torch.empty(num_assign, **i32)
    assign_pos = torch.empty(num_assign, **i32)
    phys = torch.empty(num_assign, **i32)
    dispatch_count_kernel[(num_blocks,)](ids, eid, lrank, hist, num_assign, num_experts, BLOCK_A=BLOCK_A, BLOCK_N=BLOCK_N)
    dispatch_scan_kernel[(triton.cdiv(num_experts, BLOCK_N),)](
        hist, counts, num_blocks, num_experts, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N)
    dispatch_copies_kernel[(1,)](
        counts, offsets, tables.logcnt, tables.phys_base, tables.phy2log, tables.precision,
        copy_start, tile_start[0], tile_start[1], tile_start[2], num_phys, BLOCK_M=block_m, BLOCK_P=BLOCK_P,
    )
    dispatch_scatter_kernel[(num_blocks,)](
        eid, lrank, hist, offsets, tables.logcnt, tables.phys_base, copy_start,
        sorted_assign, assign_pos, phys, num_assign, num_experts, BLOCK_A=BLOCK_A,
    )
    return Dispatch(counts, phys.reshape(topk_ids.shape), sorted_assign, assign_pos, copy_start, tile_start, eid, block_m)
