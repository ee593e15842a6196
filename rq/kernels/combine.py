"""Deterministic weighted combine in Triton: ``y[t] = sum_k w[t, k] * out[t*K + k]`` in slot order.

Each program owns one token and a block of hidden columns and adds the K slots in order in float32, so the
result never depends on scheduling (no atomics). Dropped assignments (``eid == N``) contribute nothing and
their rows of ``out``, which no GEMM wrote, are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 256


@triton.jit
def combine_kernel(
    out_ptr,  # [A, H] expert output per assignment (token-major)
    weights_ptr,  # [T, K] routing weights
    eid_ptr,  # [A] int32 expert id, N = dropped
    y_ptr,  # [T, H] out
    hidden_size,
    top_k,
    num_experts,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden_size
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(0, top_k):
        a = token * top_k + k
        valid = tl.load(eid_ptr + a + 0 * cols) < num_experts  # [BLOCK_H], broadcast load of one id
        w = tl.load(weights_ptr + a).to(tl.float32)
        row = tl.load(out_ptr + a * hidden_size + cols, mask=col_mask & valid, other=0.0).to(tl.float32)
        acc += tl.where(valid, w * row, 0.0)
    tl.store(y_ptr + token * hidden_size + cols, acc.to(y_ptr.dtype.element_ty), mask=col_mask)


def combine(out: torch.Tensor, topk_weights: torch.Tensor, eid: torch.Tensor, num_experts: int, y: torch.Tensor) -> torch.Tensor:
    """Write ``y [T, H]`` from ``out [T*K, H]`` and ``topk_weights [T, K]``; returns ``y``."""
    num_tokens, top_k = topk_weights.shape
    hidden_size = y.shape[1]
    if num_tokens:
        grid = (num_tokens, triton.cdiv(hidden_size, BLOCK_H))
        combine_kernel[grid](out, topk_weights.contiguous(), eid, y, hidden_size, top_k, num_experts, BLOCK_H=BLOCK_H)
    return y
