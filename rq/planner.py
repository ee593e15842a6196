"""The R&Q planner (SPEC §6): which experts to quantize to INT4 and which to replicate, per layer,
within a memory budget. :func:`plan_layer` is a pure function over tensors; :func:`make_plan` turns
calibration stats into the validated ``plan.json`` document (no I/O).

Greedy and deterministic (ties break by lower expert id):
1. quantize the least important experts until the layer fits ``budget_factor * reference_bytes``;
2. repeatedly give an INT4 replica to the expert with the highest per-copy load, quantizing the next
   least important expert whenever a replica does not fit, until the budget, the replica cap or the
   quantization cap stops it;
3. keep the prefix of step 2 with the lowest predicted LIS (fewest changes on ties), so replicas that
   do not improve balance, and the quantizations made only for them, are not kept.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import torch

from rq import __version__
from rq.errors import RQError
from rq.int4 import int4_nbytes
from rq.lis import lis_value
from rq.replica import split_load
from rq.schema import PLAN_VERSION, BudgetInfo, ExpertPlan, LayerPlan, Plan, QuantizationInfo
from rq.stats import CalibrationStats, LayerStats


@dataclass(frozen=True)
class PlanOptions:
    budget_factor: float = 1.0
    importance: str = "quant_sensitivity"
    max_quantized_fraction: float = 0.5
    max_replicas: int = 7  # per expert, so at most 8 copies


@dataclass(frozen=True)
class LayerDecision:
    quantized: torch.Tensor  # [N] bool: primary stored as INT4
    logcnt: torch.Tensor  # [N] int64: copies per expert (1 + replicas)
    planned_bytes: int
    lis_before: float
    lis_after: float


def _layer_bytes(quantized, logcnt, original_bytes, int4_bytes) -> int:
    primaries = torch.where(quantized, int4_bytes, original_bytes).sum()
    return int(primaries + ((logcnt - 1) * int4_bytes).sum())


def plan_layer(load: torch.Tensor, importance: torch.Tensor, original_bytes: torch.Tensor,
               int4_bytes: torch.Tensor, *, quantizable: bool, budget_factor: float, max_quantized: int,
               max_replicas: int) -> LayerDecision:
    """Plan one layer.

    load: ``[N]`` assignment counts; importance: ``[N]`` (higher = keep at original precision);
    original_bytes / int4_bytes: ``[N]`` int64 real sizes of one copy at each precision;
    quantizable: whether INT4 applies at all (group size divides the weights);
    max_quantized: cap on INT4 primaries; max_replicas: cap on replicas per expert.
    """
    n = load.numel()
    assert importance.shape == original_bytes.shape == int4_bytes.shape == (n,), "per-expert vectors of length N"
    load = load.to(torch.int64)
    budget = budget_factor * int(original_bytes.sum())
    quantized = torch.zeros(n, dtype=torch.bool)
    logcnt = torch.ones(n, dtype=torch.int64)
    # least important first; a stable sort on importance keeps lower ids first among ties
    quant_order = torch.argsort(importance.to(torch.float64), stable=True).tolist()
    if not quantizable:
        quant_order, max_quantized, max_replicas = [], 0, 0
    quant_order = quant_order[:max_quantized]

    def size() -> int:
        return _layer_bytes(quantized, logcnt, original_bytes, int4_bytes)

    def quantize_next() -> bool:
        if int(quantized.sum()) >= len(quant_order):
            return False
        quantized[quant_order[int(quantized.sum())]] = True
        return True

    while size() > budget:
        if not quantize_next():
            raise RQError(f"budget {budget_factor:g}x cannot be met even with {int(quantized.sum())} of {n} experts "
                          f"in INT4; raise --budget or --max-quantized-fraction")
    lis_before = lis_value(load)
    history = [(lis_before, quantized.clone(), logcnt.clone())]
    while True:
        per_copy = torch.where(logcnt <= max_replicas, load.to(torch.float64) / logcnt, torch.full((n,), -1.0))
        target = int(torch.argmax(per_copy))  # first maximum = lowest id among ties
        if per_copy[target] <= 0:
            break
        logcnt[target] += 1
        while size() > budget and quantize_next():
            pass
        if size() > budget:
            logcnt[target] -= 1
            break
        history.append((lis_value(split_load(load, logcnt)), quantized.clone(), logcnt.clone()))
    finite = [h for h in history if not math.isnan(h[0])]
    best = min(finite, key=lambda h: h[0] - 1e-12) if finite else history[0]  # first minimum = fewest changes
    best_lis, quantized, logcnt = best
    return LayerDecision(quantized, logcnt, size(), lis_before, best_lis)


def expert_int4_bytes(stats: LayerStats, group_size: int) -> int:
    return int4_nbytes(stats.w_in_shape, group_size) + int4_nbytes(stats.w_out_shape, group_size)


def make_plan(stats: CalibrationStats, options: PlanOptions = PlanOptions()) -> Plan:
    """Plan every layer of ``stats`` and return the validated plan document."""
    if options.budget_factor <= 0:
        raise RQError(f"--budget must be positive, got {options.budget_factor}")
    if not 0 <= options.max_quantized_fraction <= 1:
        raise RQError(f"--max-quantized-fraction must be in [0, 1], got {options.max_quantized_fraction}")
    if stats.calibration.tokens == 0 or all(float(s.load.sum()) == 0 for s in stats.layers):
        raise RQError("the calibration stats hold no routed tokens; calibrate on more data")
    group = stats.group_size
    layers = []
    for s in stats.layers:
        original = torch.tensor(s.original_bytes, dtype=torch.int64)
        q_bytes = torch.full_like(original, expert_int4_bytes(s, group)) if s.quantizable else original.clone()
        importance = s.importance(options.importance)
        decision = plan_layer(s.load, importance, original, q_bytes, quantizable=s.quantizable,
                              budget_factor=options.budget_factor,
                              max_quantized=int(options.max_quantized_fraction * s.num_experts),
                              max_replicas=options.max_replicas)
        total = float(s.load.sum())
        warnings = [] if s.quantizable else [
            f"weights {s.w_in_shape}/{s.w_out_shape} are not divisible by group size {group}: layer left unquantized "
            f"and unreplicated (try --group-size 64 at calibration)"]
        layers.append(LayerPlan(
            layer=s.index, module=s.path, planned_bytes=decision.planned_bytes, warnings=warnings,
            lis_before=None if math.isnan(decision.lis_before) else decision.lis_before,
            lis_after=None if math.isnan(decision.lis_after) else decision.lis_after,
            experts=[ExpertPlan(expert=e, load_share=float(s.load[e]) / total if total else 0.0,
                                importance=float(importance[e]),
                                precision="int4" if bool(decision.quantized[e]) else "original",
                                replicas=int(decision.logcnt[e]) - 1) for e in range(s.num_experts)]))
    reference = sum(sum(s.original_bytes) for s in stats.layers)
    return Plan(
        version=PLAN_VERSION, tool_version=__version__, created=dt.datetime.now(dt.timezone.utc).isoformat(),
        model=stats.model, calibration=stats.calibration, quantization=QuantizationInfo(group_size=group),
        importance_metric=options.importance,
        budget=BudgetInfo(reference_bytes=reference, planned_bytes=sum(p.planned_bytes for p in layers),
                          budget_factor=options.budget_factor),
        options={"max_quantized_fraction": options.max_quantized_fraction, "max_replicas": options.max_replicas},
        layers=layers)
