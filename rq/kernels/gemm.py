"""Grouped expert GEMMs over copy-sorted rows, original precision, docs/spec.md §5 INT4 or §5a INT8, in Triton.

One program computes a ``[BLOCK_M, BLOCK_N]`` output tile of one physical copy. Program axis 0 walks the
row tiles of one precision class (``tile_start`` from :mod:`rq.kernels.dispatch`, found by binary search;
programs past the last tile return at once, so the grid can be sized from ``T*K`` and ``P`` alone, with
no host sync), axis 1 walks output columns. Decode-sized problems (a few rows per copy) are bound by
weight bytes, so the kernels keep many column tiles in flight and read each weight tile exactly once
per row tile.

INT4 weights are read as packed bytes ``[BLOCK_N, BLOCK_K/2]`` (16-byte vectors along the row), unpacked
and dequantized in registers as ``float16(q * scale)`` — the exact values of :func:`rq.core.int4.dequantize` —
and fed to the same ``tl.dot`` as original-precision weights, accumulating in float32. INT8 weights are read
as int8 ``[BLOCK_N, BLOCK_K]`` tiles and dequantized the same way (``q * scale``, exact in float32, §5a).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def dequant_int4_tile(packed, scale):
    """``packed [BN, BK/2]`` uint8, ``scale [BN]`` float16 -> ``[BN, BK]`` float32 (element 2j = low nibble).

    The product of an int in [-8, 7] and a float16 is exact in float32: this is bit for bit the value of
    ``rq.core.int4.dequantize`` (docs/spec.md §5). Callers that feed float16 tensor cores round it once.
    """
    low = (packed & 15).to(tl.int32)
    high = ((packed >> 4) & 15).to(tl.int32)
    low = low - 16 * (low >= 8).to(tl.int32)  # two's complement nibble -> [-8, 7]
    high = high - 16 * (high >= 8).to(tl.int32)
    s = scale.to(tl.float32)[:, None]
    return tl.interleave(low.to(tl.float32) * s, high.to(tl.float32) * s)


@triton.jit
def dequantize_int4_kernel(
    q_ptr,  # [R, ceil(C/2)] uint8
    s_ptr,  # [R, ceil(C/G)] float16
    out_ptr,  # [R, C] float16 or float32
    num_rows,
    num_cols,
    group_size,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Standalone dequantization through :func:`dequant_int4_tile` (tests compare it bit-exactly)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    row_bytes = (num_cols + 1) // 2
    mask = (rows[:, None] < num_rows) & (half[None, :] < row_bytes)
    packed = tl.load(q_ptr + rows[:, None] * row_bytes + half[None, :], mask=mask, other=0)
    num_groups = (num_cols + group_size - 1) // group_size
    scale = tl.load(s_ptr + rows * num_groups + k0 // group_size, mask=rows < num_rows, other=1.0)
    w = dequant_int4_tile(packed, scale)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * num_cols + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < num_rows) & (cols[None, :] < num_cols))


@triton.jit
def find_tile(tile_start_ptr, tile, num_phys):
    """Copy that owns row tile ``tile``: the largest ``p`` with ``tile_start[p] <= tile`` (binary search)."""
    lo = 0
    hi = num_phys - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(tile_start_ptr + mid) <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def activation_fn(gate, act):
    """float32 activation by runtime code (index in ``reference.ACTIVATIONS``); the GLU product is the caller's.

    Codes: 0 silu_glu, 1 gelu_glu, 2 gelu_tanh_glu, 3 gelu, 4 gelu_tanh, 5 relu. A runtime code keeps one
    compiled kernel per dtype instead of six (the branch runs once per tile, in the epilogue).
    """
    if act == 0:
        out = gate * tl.sigmoid(gate)
    elif (act == 1) or (act == 3):
        out = 0.5 * gate * (1.0 + tl.math.erf(gate * INV_SQRT_2))
    elif (act == 2) or (act == 4):
        u = SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        out = 0.5 * gate * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))  # 1 + tanh(u), overflow-safe
    else:
        out = tl.maximum(gate, 0.0)
    return out


@triton.jit
def load_weight_tile(w_ptr, s_ptr, rows, k0, row_mask, in_features, group_size,
                     IS_INT4: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     IS_INT8: tl.constexpr = False):
    """``[BLOCK_K, BN]`` tile of ``W^T`` for one copy's ``W [R, in_features]`` (INT4: packed ``[R, ceil(in/2)]``,
    INT8: int8 ``[R, in]``; scales ``[R, ceil(in/G)]``; the last block may be partial).

    ``BLOCK_K`` divides the group size, so one scale per row covers the whole tile. Columns past
    ``in_features`` read as 0 (the operand they meet is masked to 0 as well).
    """
    if IS_INT4:
        row_bytes = (in_features + 1) // 2
        half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = row_mask[:, None] & (half[None, :] < row_bytes)
        packed = tl.load(w_ptr + rows[:, None] * row_bytes + half[None, :], mask=mask, other=0)
        num_groups = (in_features + group_size - 1) // group_size
        scale = tl.load(s_ptr + rows * num_groups + k0 // group_size, mask=row_mask, other=0.0)
        w = dequant_int4_tile(packed, scale).to(DOT_DTYPE)
    elif IS_INT8:
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols[None, :] < in_features)
        values = tl.load(w_ptr + rows[:, None] * in_features + cols[None, :], mask=mask, other=0)
        num_groups = (in_features + group_size - 1) // group_size
        scale = tl.load(s_ptr + rows * num_groups + k0 // group_size, mask=row_mask, other=0.0)
        w = (values.to(tl.float32) * scale.to(tl.float32)[:, None]).to(DOT_DTYPE)  # q * scale, exact in float32
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols[None, :] < in_features)
        w = tl.load(w_ptr + rows[:, None] * in_features + cols[None, :], mask=mask, other=0.0).to(DOT_DTYPE)
    return tl.trans(w)


@triton.jit
def expert_in_kernel(
    x_ptr,  # [T, H] activations (fp16/bf16/fp32)
    w_ptr,  # [P_c, I_in, H] original weights, or [P_c, I_in, H/2] uint8 packed
    s_ptr,  # [P_c, I_in, H/G] float16 scales (INT4 only; any pointer otherwise)
    h_ptr,  # [A, I] out: activation(x @ W_in^T) in sorted-row order
    sorted_assign_ptr,  # [A] int32
    copy_start_ptr,  # [P+1] int32
    tile_start_ptr,  # [P+1] int32 (this precision class)
    slot_ptr,  # [P] int32
    num_phys,
    hidden_size,
    inter_size,
    top_k,
    act,
    group_size,
    IS_INT4: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_INT8: tl.constexpr = False,
):
    tile = tl.program_id(0)
    if tile >= tl.load(tile_start_ptr + num_phys):
        return
    p = find_tile(tile_start_ptr, tile, num_phys)
    row0 = tl.load(copy_start_ptr + p) + (tile - tl.load(tile_start_ptr + p)) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(copy_start_ptr + p + 1)
    token = tl.load(sorted_assign_ptr + rows, mask=row_mask, other=0) // top_k
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter_size
    slot = tl.load(slot_ptr + p).to(tl.int64)
    in_rows = inter_size
    if GLU:
        in_rows = 2 * inter_size
    if IS_INT4:
        w_base = w_ptr + slot * in_rows * ((hidden_size + 1) // 2)
        s_base = s_ptr + slot * in_rows * ((hidden_size + group_size - 1) // group_size)
    elif IS_INT8:
        w_base = w_ptr + slot * in_rows * hidden_size
        s_base = s_ptr + slot * in_rows * ((hidden_size + group_size - 1) // group_size)
    else:
        w_base = w_ptr + slot * in_rows * hidden_size
        s_base = s_ptr
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token.to(tl.int64)[:, None] * hidden_size + ks[None, :],
                    mask=row_mask[:, None] & (ks[None, :] < hidden_size), other=0.0).to(DOT_DTYPE)
        w = load_weight_tile(w_base, s_base, cols, k0, col_mask, hidden_size, group_size, IS_INT4, BLOCK_K, DOT_DTYPE,
                             IS_INT8)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if GLU:
            w_up = load_weight_tile(w_base, s_base, cols + inter_size, k0, col_mask, hidden_size, group_size,
                                    IS_INT4, BLOCK_K, DOT_DTYPE, IS_INT8)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)
    h = activation_fn(acc, act)
    if GLU:
        h = h * acc_up
    out_ptrs = h_ptr + rows.to(tl.int64)[:, None] * inter_size + cols[None, :]
    tl.store(out_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def expert_out_kernel(
    h_ptr,  # [A, I] sorted-row intermediate
    w_ptr,  # [P_c, H, I] original weights, or [P_c, H, I/2] uint8 packed
    s_ptr,  # [P_c, H, I/G] float16 scales (INT4 only)
    out_ptr,  # [A, H] out: expert output of each assignment, in assignment order
    sorted_assign_ptr,
    copy_start_ptr,
    tile_start_ptr,
    slot_ptr,
    num_phys,
    hidden_size,
    inter_size,
    group_size,
    IS_INT4: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_INT8: tl.constexpr = False,
):
    tile = tl.program_id(0)
    if tile >= tl.load(tile_start_ptr + num_phys):
        return
    p = find_tile(tile_start_ptr, tile, num_phys)
    row0 = tl.load(copy_start_ptr + p) + (tile - tl.load(tile_start_ptr + p)) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(copy_start_ptr + p + 1)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden_size
    slot = tl.load(slot_ptr + p).to(tl.int64)
    if IS_INT4:
        w_base = w_ptr + slot * hidden_size * ((inter_size + 1) // 2)
        s_base = s_ptr + slot * hidden_size * ((inter_size + group_size - 1) // group_size)
    elif IS_INT8:
        w_base = w_ptr + slot * hidden_size * inter_size
        s_base = s_ptr + slot * hidden_size * ((inter_size + group_size - 1) // group_size)
    else:
        w_base = w_ptr + slot * hidden_size * inter_size
        s_base = s_ptr
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * inter_size + ks[None, :],
                    mask=row_mask[:, None] & (ks[None, :] < inter_size), other=0.0).to(DOT_DTYPE)
        w = load_weight_tile(w_base, s_base, cols, k0, col_mask, inter_size, group_size, IS_INT4, BLOCK_K, DOT_DTYPE,
                             IS_INT8)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    assign = tl.load(sorted_assign_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    out_ptrs = out_ptr + assign[:, None] * hidden_size + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def dot_config(dtype: torch.dtype, device: torch.device | None = None) -> tuple[tl.dtype, str]:
    """Operand dtype and ``input_precision`` of ``tl.dot`` for activations of ``dtype``.

    float16/bfloat16 run on tensor cores; float32 uses IEEE products (no TF32) so an FP32 engine stays
    within FP32 rounding of the reference. INT4 weights are float16 values; with bfloat16 activations they
    are rounded to bfloat16 for the tensor cores (within the float16 tolerance of docs/spec.md §9). Triton's CPU
    interpreter computes bfloat16 dots wrongly (Triton 3.9), so on CPU bfloat16 operands are upcast.
    """
    if dtype == torch.float16:
        return tl.float16, "tf32"  # precision flag is ignored for 16-bit operands
    if dtype == torch.bfloat16:
        if device is not None and device.type == "cpu":
            return tl.float32, "ieee"
        return tl.bfloat16, "tf32"
    if dtype == torch.float32:
        return tl.float32, "ieee"
    raise TypeError(f"hidden must be float16, bfloat16 or float32, got {dtype}")


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of :func:`rq.core.int4.dequantize_values`: ``packed [R, ceil(C/2)]`` uint8, ``scales
    [R, ceil(C/G)]`` -> ``[R, C]`` in ``dtype`` (float32: exact; float16: rounded once)."""
    num_rows, half = packed.shape
    num_cols = half * 2 if in_features is None else in_features
    groups = -(-num_cols // group_size)
    if tuple(scales.shape) != (num_rows, groups) or half != -(-num_cols // 2):
        raise ValueError(f"packed {list(packed.shape)} / scales {list(scales.shape)} do not fit [{num_rows}, {num_cols}] "
                         f"with group size {group_size}")
    out = torch.empty(num_rows, num_cols, dtype=dtype, device=packed.device)
    block_k = min(64, group_size)
    grid = (triton.cdiv(num_rows, 32), triton.cdiv(num_cols, block_k))
    dequantize_int4_kernel[grid](packed.contiguous(), scales.contiguous(), out, num_rows, num_cols, group_size,
                                 BLOCK_N=32, BLOCK_K=block_k)
    return out
