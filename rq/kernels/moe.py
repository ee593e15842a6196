"""``rq::RQMoE`` on the GPU through the Triton kernels.

Pipeline (docs/kernels.md): dispatch (4 small launches) -> ``expert_in`` per precision class (gate/up GEMM
with the activation fused) -> ``expert_out`` per class (down projection, rows written back in assignment
order) -> deterministic combine. Block sizes come from :func:`launch_config`, which the AOT build and the
TensorRT plugin share, so all three run the same compiled variants.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from rq.core.op import RQLayerWeights, activation_code, check_call, is_glu

from . import combine as _combine
from . import dispatch as _dispatch
from . import gemm

BLOCK_N = 64
BLOCK_K = 64  # divides both group sizes (64, 128): one scale per row per weight tile
NUM_WARPS = 4
BLOCK_M_CHOICES = (16, 64)


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


def launch_config(num_assign: int, num_phys: int) -> LaunchConfig:
    """Row tile of the grouped GEMMs: 16 when copies get few rows (decode), 64 otherwise (prefill).

    The same rule is in plugins/rqMoeLauncher.cpp (``chooseBlockM``); keep them equal.
    """
    block_m = 16 if num_assign <= 16 * max(num_phys, 1) else 64
    return LaunchConfig(block_m, BLOCK_N, BLOCK_K, NUM_WARPS)


@functools.lru_cache(maxsize=64)
def _cached_tables(logcnt: tuple[int, ...], precision: tuple[int, ...], device: str) -> _dispatch.DeviceTables:
    return _dispatch.device_tables(torch.tensor(logcnt), torch.tensor(precision), torch.device(device))


def rq_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: RQLayerWeights,
           offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [T, H]`` and ``expert_counts [N]`` int64 of ``rq::RQMoE`` with the Triton kernels (docs/spec.md §8).

    Same signature and semantics as :func:`rq.core.op.rq_moe_reference`. All tensors on one device (CUDA,
    or CPU under ``TRITON_INTERPRET=1``); the layer's copy tables are cached per device.
    """
    hidden_size, inter = check_call(hidden, topk_ids, topk_weights, layer, offsets)
    device = hidden.device
    tables = _cached_tables(layer.logcnt, layer.precision, str(device))
    num_tokens, top_k = topk_ids.shape
    num_experts = layer.num_experts
    num_phys = layer.num_copies
    num_assign = num_tokens * top_k
    y = torch.empty_like(hidden)
    if num_assign == 0:
        return y.zero_(), torch.zeros(num_experts, dtype=torch.int64, device=device)
    cfg = launch_config(num_assign, num_phys)
    d = _dispatch.dispatch_assignments(topk_ids, offsets, tables, cfg.block_m)
    hidden = hidden.contiguous()
    h = torch.empty(num_assign, inter, dtype=hidden.dtype, device=device)  # [A, I] sorted rows
    out = torch.empty(num_assign, hidden_size, dtype=hidden.dtype, device=device)  # [A, H] assignment order
    dot_dtype, dot_precision = gemm.dot_config(hidden.dtype, device)
    classes = [
        (0, layer.num_orig, layer.w_in, layer.w_in, layer.w_out, layer.w_out, d.tile_start[0]),
        (1, layer.num_int4, layer.w_in_q, layer.w_in_scales, layer.w_out_q, layer.w_out_scales, d.tile_start[1]),
    ]
    if layer.num_int8:
        classes.append((2, layer.num_int8, layer.w_in_q8, layer.w_in_scales8, layer.w_out_q8, layer.w_out_scales8,
                        d.tile_start[2]))
    act = activation_code(layer.activation)
    glu = is_glu(layer.activation)
    for cls, count, wi, si, wo, so, tile_start in classes:
        if count == 0:
            continue
        tiles = triton.cdiv(num_assign, cfg.block_m) + count  # upper bound; extra programs exit at once
        common = dict(IS_INT4=cls == 1, IS_INT8=cls == 2, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                      DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, num_warps=cfg.num_warps)
        gemm.expert_in_kernel[(tiles, triton.cdiv(inter, cfg.block_n))](
            hidden, wi.contiguous(), si.contiguous(), h, d.sorted_assign, d.copy_start, tile_start, tables.slot,
            num_phys, hidden_size, inter, top_k, act, layer.group_size, GLU=glu, **common)
        gemm.expert_out_kernel[(tiles, triton.cdiv(hidden_size, cfg.block_n))](
            h, wo.contiguous(), so.contiguous(), out, d.sorted_assign, d.copy_start, tile_start, tables.slot,
            num_phys, hidden_size, inter, layer.group_size, **common)
    _combine.combine(out, topk_weights, d.eid, num_experts, y)
    return y, d.expert_counts
