"""Random R&Q layers in the op's layout (docs/spec.md §8) for tests and benchmarks: every copy of one logical
expert holds the same weights, quantized to its own precision (original, INT4 §5, INT8 §5a)."""

from __future__ import annotations

import torch

from rq.core.experts import is_glu
from rq.core.op import RQLayerWeights, stack_layer


def random_layer(logcnt: tuple[int, ...], precision: tuple[int, ...], *, hidden: int = 64, inter: int = 48,
                 activation: str = "silu_glu", group_size: int = 64, top_k: int = 2, seed: int = 0,
                 dtype: torch.dtype = torch.float32, int8_class: bool = False) -> RQLayerWeights:
    """A layer with seeded random experts (``w ~ N(0, 1/in)``) and the given copies and per-copy precisions."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * inter if is_glu(activation) else inter
    experts = [((torch.randn(rows, hidden, generator=gen) / hidden ** 0.5).to(dtype),
                (torch.randn(hidden, inter, generator=gen) / inter ** 0.5).to(dtype)) for _ in logcnt]
    copies = [experts[e] for e, c in enumerate(logcnt) for _ in range(c)]
    return stack_layer(top_k, activation, group_size, tuple(logcnt), tuple(precision), copies,
                       int8_class=int8_class, dtype=dtype)


def random_routing(num_tokens: int, top_k: int, num_experts: int, *, seed: int = 0, hidden: int = 64,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [T, H]``, skewed ``topk_ids [T, K]`` (a few dropped as -1 or N) and ``topk_weights [T, K]``."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen) + torch.linspace(2, -2, num_experts)
    ids = torch.topk(logits, min(top_k, num_experts), dim=-1).indices
    if ids.shape[1] < top_k:
        ids = torch.cat([ids, torch.full((num_tokens, top_k - ids.shape[1]), -1)], dim=1)
    dropped = torch.rand(num_tokens, top_k, generator=gen) < 0.1
    ids = torch.where(dropped, torch.where(torch.rand(num_tokens, top_k, generator=gen) < 0.5, -1, num_experts), ids)
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), dim=-1)
    return torch.randn(num_tokens, hidden, generator=gen).to(dtype), ids, weights.to(dtype)
