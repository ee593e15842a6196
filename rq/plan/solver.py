"""The mixed-precision planner of one layer (docs/spec.md §6, "Mixed precision"): for every copy, original /
INT8 / INT4, within the budget, at the LIS goal, with the least predicted error. Pure functions over tensors.

1. Replication follows the greedy's order (:func:`replication_order`: the expert with the highest per-copy
   load gets the next replica); a prefix of ``R`` replicas is *feasible* when it fits the budget with every
   quantized copy in the cheapest allowed format and at most ``max_quantized`` primaries quantized. The LIS goal
   keeps the prefixes within ``(1 + lis_tolerance)`` of the best feasible LIS.
2. For one prefix (copy counts ``C_e``) :func:`assign_precisions` is exact: a copy of expert ``e`` at precision
   ``p`` adds ``S_p[e] / (C_e * A)`` to the predicted error (it takes ``1/C_e`` of the expert's load, §4), and a
   layer's bytes depend only on how many copies are original (``a``) and INT8 (``b``), since all experts of a
   layer have one size per precision. A dynamic programme over the experts with state ``(a, b)`` therefore
   finds the minimum over every assignment (originals only on primaries, so ``a`` also counts the primaries
   left unquantized). ``O(N * C_max * N * P)`` per prefix.
3. Among the goal's prefixes, the least predicted error wins (fewest replicas on ties).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from rq.errors import RQError

ALLOWED = ("int4", "int8")


@dataclass(frozen=True)
class MixedDecision:
    logcnt: torch.Tensor  # [N] int64 copies per expert
    primary: torch.Tensor  # [N] int64 precision code of the primary (0 original, 1 INT4, 2 INT8)
    int8_replicas: torch.Tensor  # [N] int64 replicas stored INT8 (the other replicas INT4)
    planned_bytes: int
    lis_before: float
    lis_after: float
    predicted_error: float


def parse_precisions(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"int4,int8"`` -> ``("int4", "int8")`` (sorted, unique); :class:`RQError` on anything else."""
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in items if p not in ALLOWED]
    if bad or not items:
        raise RQError(f"--precisions {','.join(items) if items else text!r} is not a list of {' and '.join(ALLOWED)}; "
                      f"write e.g. --precisions int4,int8")
    return tuple(p for p in ALLOWED if p in items)


def replication_order(load: list[int], max_replicas: int) -> list[int]:
    """The experts that receive replicas one after another: highest per-copy load ``L_e / C_e`` first, lower id on
    ties, at most ``max_replicas`` per expert, never an expert without load (the greedy's order, §6)."""
    copies = [1] * len(load)
    heap = [(-load[e], e) for e in range(len(load)) if load[e] > 0 and max_replicas > 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, e = heapq.heappop(heap)
        order.append(e)
        copies[e] += 1
        if copies[e] <= max_replicas:
            heapq.heappush(heap, (-load[e] / copies[e], e))
    return order


def predicted_error(load: torch.Tensor, sensitivity: dict[int, torch.Tensor], logcnt: torch.Tensor,
                    copy_precision: list[list[int]]) -> float:
    """``sum_e sum_c S_{p(e,c)}[e] / (C_e * A)`` (docs/spec.md §6) with ``S`` per precision code (0 = no error);
    ``copy_precision[e]`` lists the codes of expert ``e``'s copies. ``nan`` for a layer without load."""
    total = float(load.sum())
    if total == 0:
        return math.nan
    err = 0.0
    for e, codes in enumerate(copy_precision):
        err += sum(float(sensitivity[c][e]) for c in codes if c) / (int(logcnt[e]) * total)
    return err


def assign_precisions(logcnt: list[int], s4: torch.Tensor, s8: torch.Tensor, total: float, bytes_of: tuple[int, int, int],
                      budget: float, min_original: int, precisions: tuple[str, ...]
                      ) -> tuple[list[tuple[int, int]], float, int] | None:
    """The exact minimum of the predicted error for fixed copy counts (module doc, step 2).

    logcnt: ``C_e``; s4 / s8: ``[N]`` sensitivities; total: the layer's assignments ``A``; bytes_of: bytes of one
    copy (original, INT4, INT8); min_original: primaries that must stay original (the quantization cap).
    Returns per expert ``(original primary 0/1, INT8 copies)`` (the rest INT4), the error and the bytes, or
    ``None`` when nothing fits.
    """
    n, num_phys = len(logcnt), sum(logcnt)
    b0, b4, b8 = bytes_of
    use4, use8 = "int4" in precisions, "int8" in precisions
    inf = math.inf
    # INT8 copies beyond what the budget can pay for over INT4 ones are never feasible: the table stops there
    b_cap = num_phys if not use4 else min(num_phys, max(0, int((budget - min_original * b0 - (num_phys - min_original)
                                                                 * b4) // max(b8 - b4, 1))))
    err = torch.full((n + 1, b_cap + 1), inf, dtype=torch.float64)  # [a original, b INT8] -> least error
    err[0, 0] = 0.0
    choices = []  # per expert: [a, b] index of the option taken
    for e, c in enumerate(logcnt):
        options = [(o, j) for o in (0, 1) for j in range(c - o + 1)
                   if (use8 or j == 0) and (use4 or j == c - o)]
        # fewest bytes first: a later option replaces an earlier one only when strictly better
        options.sort(key=lambda oj: oj[0] * b0 + oj[1] * b8 + (c - oj[0] - oj[1]) * b4)
        new = torch.full_like(err, inf)
        pick = torch.full(err.shape, -1, dtype=torch.int16)
        for index, (o, j) in enumerate(options):
            n4 = c - o - j
            cost = ((j * float(s8[e]) if j else 0.0) + (n4 * float(s4[e]) if n4 else 0.0)) / (c * total) if total else 0.0
            shifted = torch.full_like(err, inf)
            if j > b_cap:
                continue
            shifted[o:, j:] = err[:n + 1 - o, :b_cap + 1 - j] + cost
            better = shifted < new
            new = torch.where(better, shifted, new)
            pick = torch.where(better, torch.tensor(index, dtype=torch.int16), pick)
        err = new
        choices.append((options, pick))
    a = torch.arange(n + 1, dtype=torch.float64).unsqueeze(1)
    b = torch.arange(b_cap + 1, dtype=torch.float64).unsqueeze(0)
    size = a * b0 + b * b8 + (num_phys - a - b) * b4  # [a, b] bytes
    feasible = torch.isfinite(err) & (size <= budget) & (a >= min_original) & (a + b <= num_phys)
    if not bool(feasible.any()):
        return None
    best_err = float(err[feasible].min())
    ties = feasible & (err <= best_err)
    best_size = float(size[ties].min())
    a_best, b_best = (int(v) for v in torch.nonzero(ties & (size <= best_size))[0])  # lowest (a, b) among equals
    chosen = [(0, 0)] * n
    for e in range(n - 1, -1, -1):
        options, pick = choices[e]
        o, j = options[int(pick[a_best, b_best])]
        chosen[e] = (o, j)
        a_best, b_best = a_best - o, b_best - j
    return chosen, best_err, int(best_size)


def solve_layer(load: torch.Tensor, s4: torch.Tensor, s8: torch.Tensor, original_bytes: list[int], int4_bytes: int,
                int8_bytes: int, *, precisions: tuple[str, ...], quantizable: bool, budget_factor: float,
                max_quantized: int, max_replicas: int, lis_tolerance: float = 0.0) -> MixedDecision:
    """Plan one layer (module doc). load / s4 / s8: ``[N]`` float64 (``s8`` may be ``None`` when ``int8`` is not
    allowed); original_bytes: per expert (one size for all, else :class:`RQError`); int4_bytes / int8_bytes: one
    copy. Deterministic."""
    n = load.numel()
    loads = [int(v) for v in load.round().to(torch.int64).tolist()]
    total = sum(loads)
    if len(set(original_bytes)) > 1:
        raise RQError("mixed precision needs the experts of a layer to have one size; plan with --precisions int4")
    b0 = original_bytes[0]
    budget = budget_factor * n * b0
    s8 = s8 if s8 is not None else torch.full_like(s4, math.inf)
    if not quantizable:  # nothing can be quantized: every expert at original precision, no replica
        if n * b0 > budget:
            raise RQError(f"budget {budget_factor:g}x cannot be met: this layer's weights cannot be quantized; "
                          f"raise --budget")
        lis = max(loads) * n / total if total else math.nan
        return MixedDecision(torch.ones(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64),
                             torch.zeros(n, dtype=torch.int64), n * b0, lis, lis, 0.0 if total else math.nan)
    cheapest = min(int4_bytes if "int4" in precisions else math.inf, int8_bytes if "int8" in precisions else math.inf)
    min_original = n - max_quantized
    order = replication_order(loads, max_replicas)
    copies = [1] * n
    prefixes = []  # (lis, replicas, copies)
    for r in range(len(order) + 1):
        if r:
            copies[order[r - 1]] += 1
        num_phys = n + r
        if min_original * b0 + (num_phys - min_original) * cheapest > budget:
            break  # more replicas only take more bytes
        busiest = max((-(-loads[e] // copies[e]) for e in range(n)), default=0)
        prefixes.append((busiest * num_phys / total if total else math.nan, r, list(copies)))
    if not prefixes:
        raise RQError(f"budget {budget_factor:g}x cannot be met even with {max_quantized} of {n} experts quantized; "
                      f"raise --budget or --max-quantized-fraction")
    lis_before = prefixes[0][0]
    finite = [p for p in prefixes if not math.isnan(p[0])]
    floor = min((p[0] for p in finite), default=math.nan)
    goal = [p for p in finite if p[0] <= floor * (1 + lis_tolerance) + 1e-12] or prefixes[:1]
    best = None
    for lis, r, logcnt in goal:
        solved = assign_precisions(logcnt, s4, s8, float(total), (b0, int4_bytes, int8_bytes), budget, min_original,
                                   precisions)
        if solved is not None and (best is None or solved[1] < best[1][1]):
            best = ((lis, r, logcnt), solved)
    if best is None:
        raise RQError(f"budget {budget_factor:g}x cannot be met with precisions {','.join(precisions)}; "
                      f"raise --budget or --max-quantized-fraction")
    (lis, _, logcnt), (chosen, err, size) = best
    primary, int8_replicas = [], []
    for c, (o, j) in zip(logcnt, chosen):
        primary.append(0 if o else (2 if j else 1))
        int8_replicas.append(j - (0 if o else 1) if j else 0)
    return MixedDecision(torch.tensor(logcnt), torch.tensor(primary), torch.tensor(int8_replicas), size, lis_before,
                         lis, err if total else math.nan)
