"""The hedged planner of one layer (docs/spec.md §6, "Hedged plans"): replicas chosen for the worst of several
traffic windows rather than for their sum, so that a plan never makes any window worse than no balancing.
Pure functions over tensors.

Why: copies fitted to the experts that are hot on the calibration text add units that get no work when other
experts are hot (decode traffic, another domain); LIS over copies then exceeds LIS over the experts. A window
``d`` with loads ``W[d]`` has, for copy counts ``C``, ``LIS_d(C) = max_e ceil(W[d,e] / C_e) * P / S_d`` (offsets
0, docs/spec.md §4) and ``LIS_d(1) = max_e W[d,e] * N / S_d`` with no balancing; its *ratio* is the quotient.

1. Quantization is lazy, as in the greedy (:mod:`rq.plan.planner`): the least important expert is quantized only
   when the budget requires it.
2. Each step gives one INT4 replica to the expert that minimises the mean ratio over the windows (lower id on
   ties), until the budget, the replica cap or the quantization cap stops it.
3. Of every prefix (0 replicas included, whose ratios are all exactly 1), the one with the lowest *worst* ratio
   is kept (then the lowest mean ratio, then fewest replicas): no window's LIS exceeds its no-balancing LIS.
"""

from __future__ import annotations

import math

import torch

from rq.errors import RQError


def window_ratios(windows: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """``[D]`` float64: LIS of each window ``windows [D, N]`` over the copies of ``logcnt`` divided by its LIS
    over the experts (NaN for an empty window)."""
    w = windows.to(torch.float64)
    c = logcnt.to(torch.float64)
    total = w.sum(1)
    after = torch.ceil(w / c).amax(1) * c.sum() / total
    before = w.amax(1) * w.shape[1] / total
    return torch.where(total > 0, after / before, torch.full_like(total, math.nan))


def _candidate_ratios(w: torch.Tensor, copies: torch.Tensor, before: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``[D, N]``: each window's ratio if expert ``e`` (column) got one more copy. ``O(D * N)``."""
    busy = torch.ceil(w / copies)  # [D, N] busiest copy of each expert now
    top2 = torch.topk(busy, min(2, busy.shape[1]), dim=1).values
    first = top2[:, :1]
    second = top2[:, 1:2] if top2.shape[1] > 1 else torch.zeros_like(first)
    others = torch.where(busy >= first, second, first)  # busiest of the other experts
    raised = torch.ceil(w / (copies + 1))
    units = float(copies.sum()) + 1
    return torch.maximum(others, raised) * units / total.unsqueeze(1) / before.unsqueeze(1)


def hedged_layer(windows: torch.Tensor, quant_order: list[int], orig: list[int], q_bytes: list[int], *,
                 budget: float, max_replicas: int) -> tuple[list[bool], list[int], float]:
    """``(int4 primaries [N], copies [N], worst ratio)`` of one layer (module doc).

    windows: ``[D, N]`` loads, empty windows ignored; quant_order: experts in the order they may be quantized
    (least important first, already cut at the quantization cap); orig / q_bytes: bytes of one copy at original
    precision / INT4; budget: the layer's byte budget. :class:`RQError` when even the cap cannot meet it."""
    w = windows.to(torch.float64)
    w = w[w.sum(1) > 0]
    n = len(orig)
    quantized = [False] * n
    size, n_quantized = sum(orig), 0
    while size > budget:
        if n_quantized >= len(quant_order):
            raise RQError(f"budget cannot be met even with {n_quantized} of {n} experts in INT4; raise --budget or "
                          f"--max-quantized-fraction")
        e = quant_order[n_quantized]
        quantized[e], size, n_quantized = True, size + q_bytes[e] - orig[e], n_quantized + 1
    if w.shape[0] == 0 or max_replicas == 0:
        return quantized, [1] * n, 1.0
    total, before = w.sum(1), w.amax(1) * n / w.sum(1)
    seen = w.sum(0) > 0
    copies = torch.ones(n, dtype=torch.float64)
    history = [(1.0, 1.0, 0, n_quantized)]  # (worst ratio, mean ratio, replicas, quantizations)
    chosen: list[int] = []
    while True:
        ratios = _candidate_ratios(w, copies, before, total)  # [D, N]
        mean = ratios.mean(0)
        mean[~seen | (copies > max_replicas)] = math.inf  # an expert never routed to gets no replica
        if not bool(torch.isfinite(mean).any()):
            break
        e = int(torch.argmin(mean))  # argmin returns the first (lowest id) minimum
        while size + q_bytes[e] > budget and n_quantized < len(quant_order):
            q = quant_order[n_quantized]
            quantized[q], size, n_quantized = True, size + q_bytes[q] - orig[q], n_quantized + 1
        if size + q_bytes[e] > budget:
            break
        size += q_bytes[e]
        copies[e] += 1
        chosen.append(e)
        column = ratios[:, e]
        history.append((float(column.max()), float(column.mean()), len(chosen), n_quantized))
    worst, _, replicas, needed = min(history, key=lambda h: (round(h[0], 12), round(h[1], 12), h[2]))
    counts = [1] * n
    for e in chosen[:replicas]:
        counts[e] += 1
    final = [False] * n
    for e in quant_order[:needed]:
        final[e] = True
    return final, counts, worst
