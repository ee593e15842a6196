"""Pure-PyTorch reference of ``rq::RQMoE`` (docs/op.md): the semantics every fast path is tested against.

Deliberately simple: one Python loop over physical copies, weights dequantized with :mod:`rq.core.int4`, the
token->copy mapping from :mod:`rq.core.replica`, arithmetic in float32 (``compute_dtype``), and the weighted
sum over the top-k slots in slot order. Only ``torch`` and ``rq`` are imported, so the PyTorch R&Q model,
the ONNX export tests and the kernel tests can all use it on CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rq.core import int4, replica

ACTIVATIONS = ("silu_glu", "gelu_glu", "gelu_tanh_glu", "gelu", "gelu_tanh", "relu")
"""Activation names of docs/op.md; the index in this tuple is the integer code the kernels and plugin use."""

GLU_ACTIVATIONS = ("silu_glu", "gelu_glu", "gelu_tanh_glu")


def activation_code(name: str) -> int:
    """Integer code of an activation (the ``act`` argument of the kernels and the plugin)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {ACTIVATIONS}")
    return ACTIVATIONS.index(name)


def is_glu(activation: str) -> bool:
    """Gated activations read ``w_in`` as ``[2I, H]``: gate rows ``[0, I)``, up rows ``[I, 2I)``."""
    activation_code(activation)
    return activation in GLU_ACTIVATIONS


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``[M, I_in] -> [M, I]``: the expert nonlinearity, gated or not (docs/op.md)."""
    if activation in GLU_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        approximate = "tanh" if activation == "gelu_tanh_glu" else "none"
        if activation == "silu_glu":
            return torch.nn.functional.silu(gate) * up
        return torch.nn.functional.gelu(gate, approximate=approximate) * up
    if activation == "gelu":
        return torch.nn.functional.gelu(h)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    if activation == "relu":
        return torch.relu(h)
    raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")


class CopyTables(NamedTuple):
    """Per-physical-copy bookkeeping derived from the op attributes (all int64, on ``logcnt.device``).

    phy2log: ``[P]`` logical expert of each copy; phys_base: ``[N]`` first copy of each expert;
    slot: ``[P]`` index of the copy inside its precision class (docs/op.md); precision: ``[P]`` 0/1.
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


def check_inputs(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    offsets: torch.Tensor | None,
    logcnt: torch.Tensor,
    precision: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_in_q: torch.Tensor,
    w_in_scales: torch.Tensor,
    w_out_q: torch.Tensor,
    w_out_scales: torch.Tensor,
    activation: str,
    group_size: int,
) -> int:
    """Validate shapes and dtypes against docs/op.md; returns the intermediate size ``I``.

    Errors name the tensor, the expected shape and the one received.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got {list(hidden.shape)}")
    num_tokens, hidden_size = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [T={num_tokens}, K], got {list(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must be [T, K]={list(topk_ids.shape)}, got {list(topk_weights.shape)}")
    num_experts = int(torch.as_tensor(logcnt).numel())
    if offsets is not None and tuple(offsets.shape) != (num_experts,):
        raise ValueError(f"offsets must be [N={num_experts}], got {list(offsets.shape)}")
    tables = copy_tables(torch.as_tensor(logcnt).cpu(), torch.as_tensor(precision).cpu())
    n_orig = int((tables.precision == 0).sum())
    n_int4 = int((tables.precision == 1).sum())
    glu = is_glu(activation)
    # I comes from whichever class is present: w_out is [P_orig, H, I], w_out_q is [P_int4, H, I/2].
    if n_orig:
        inter = w_out.shape[-1]
    elif n_int4:
        inter = w_out_q.shape[-1] * 2
    else:
        inter = 0
    in_rows = 2 * inter if glu else inter
    expected = {
        "w_in": ((n_orig, in_rows, hidden_size), w_in),
        "w_out": ((n_orig, hidden_size, inter), w_out),
    }
    if n_int4:
        int4.check_group_size(group_size)
        if hidden_size % group_size or inter % group_size:
            raise ValueError(f"INT4 copies need H={hidden_size} and I={inter} to be multiples of group_size={group_size}")
        expected.update(
            {
                "w_in_q": ((n_int4, in_rows, hidden_size // 2), w_in_q),
                "w_in_scales": ((n_int4, in_rows, hidden_size // group_size), w_in_scales),
                "w_out_q": ((n_int4, hidden_size, inter // 2), w_out_q),
                "w_out_scales": ((n_int4, hidden_size, inter // group_size), w_out_scales),
            }
        )
    for name, (shape, tensor) in expected.items():
        if shape[0] == 0 and tensor.numel() == 0:
            continue  # an empty class may come with any empty placeholder
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} (activation={activation}), got {list(tensor.shape)}")
    if n_int4:
        for name in ("w_in_q", "w_out_q"):
            if expected[name][1].dtype != torch.uint8:
                raise ValueError(f"{name} must be uint8 (SPEC §5 packing), got {expected[name][1].dtype}")
        for name in ("w_in_scales", "w_out_scales"):
            if expected[name][1].dtype != torch.float16:
                raise ValueError(f"{name} must be float16, got {expected[name][1].dtype}")
    return inter


def rq_moe_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    offsets: torch.Tensor | None,
    logcnt: torch.Tensor,
    precision: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_in_q: torch.Tensor,
    w_in_scales: torch.Tensor,
    w_out_q: torch.Tensor,
    w_out_scales: torch.Tensor,
    activation: str,
    group_size: int,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [T, H]`` (dtype of ``hidden``) and ``expert_counts [N]`` int64 of ``rq::RQMoE`` (docs/op.md).

    hidden: ``[T, H]``; topk_ids / topk_weights: ``[T, K]``; offsets: ``[N]`` int64 or None (zeros);
    logcnt: ``[N]`` copies per logical expert; precision: ``[P]`` 0 = original, 1 = INT4;
    w_in ``[P_orig, I_in, H]``, w_out ``[P_orig, H, I]``; w_in_q ``[P_int4, I_in, H/2]`` uint8,
    w_in_scales ``[P_int4, I_in, H/G]`` float16, w_out_q ``[P_int4, H, I/2]``, w_out_scales ``[P_int4, H, I/G]``.
    Ids outside ``[0, N)`` are dropped: no load, no output. INT4 weights are dequantized exactly as
    :func:`rq.core.int4.dequantize` (float16 values), then everything runs in ``compute_dtype``.
    """
    check_inputs(hidden, topk_ids, topk_weights, offsets, logcnt, precision, w_in, w_out,
                 w_in_q, w_in_scales, w_out_q, w_out_scales, activation, group_size)
    device = hidden.device
    logcnt = torch.as_tensor(logcnt, dtype=torch.int64, device=device)
    tables = copy_tables(logcnt, torch.as_tensor(precision, device=device))
    num_tokens, top_k = topk_ids.shape
    phys = replica.physical_ids(topk_ids, logcnt, offsets).reshape(-1)  # [T*K], -1 = dropped
    counts = replica.expert_counts(topk_ids, logcnt.numel())
    x = hidden.to(compute_dtype)
    out = torch.zeros(num_tokens * top_k, hidden.shape[1], dtype=compute_dtype, device=device)  # [T*K, H]
    for p in torch.unique(phys[phys >= 0]).tolist():
        rows = torch.nonzero(phys == p).squeeze(1)  # assignments of copy p, token-major
        s = int(tables.slot[p])
        if int(tables.precision[p]) == 0:
            wi, wo = w_in[s].to(compute_dtype), w_out[s].to(compute_dtype)
        else:
            wi = int4.dequantize(int4.Int4Weight(w_in_q[s], w_in_scales[s], group_size)).to(compute_dtype)
            wo = int4.dequantize(int4.Int4Weight(w_out_q[s], w_out_scales[s], group_size)).to(compute_dtype)
        h = apply_activation(x[rows // top_k] @ wi.T, activation)  # [M, I]
        out[rows] = h @ wo.T  # [M, H]
    weights = topk_weights.to(compute_dtype).reshape(-1, 1)
    weighted = torch.where((phys >= 0).unsqueeze(1), out * weights, torch.zeros_like(out))
    y = weighted.reshape(num_tokens, top_k, -1).sum(dim=1)  # slot order
    return y.to(hidden.dtype), counts

