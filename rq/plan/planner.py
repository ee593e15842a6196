"""The R&Q planner (docs/spec.md §6): which experts to quantize to INT4 and which to replicate, per layer,
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

import dataclasses
import datetime as dt
import heapq
import math
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from rq import __version__
from rq.core.int4 import int4_nbytes
from rq.core.int8 import int8_nbytes
from rq.errors import RQError
from rq.documents import first_error
from rq.plan.schema import MAX_REPLICAS, PLAN_VERSION, BudgetInfo, ExpertPlan, LayerPlan, Plan, QuantizationInfo
from rq.calibrate.stats import CalibrationStats, LayerStats
from rq.plan.solver import parse_precisions, predicted_error, solve_layer
from rq.plan.robust import hedged_layer


@dataclass(frozen=True)
class PlanOptions:
    budget_factor: float = 1.0
    importance: str = "quant_sensitivity"
    max_quantized_fraction: float = 0.5
    max_replicas: int = 7  # per expert, so at most 8 copies
    lis_tolerance: float = 0.0  # keep the fewest replicas whose LIS is within (1 + tol) of the best
    precisions: tuple[str, ...] = ("int4",)  # quantized formats allowed; with int8 the exact solver plans
    # plan for the worst traffic window of the stats (rq.plan.robust), never above no balancing on any of them;
    # None: hedge exactly when the stats record the model's own generations (docs/spec.md §6)
    hedge: bool | None = None


@dataclass(frozen=True)
class LayerDecision:
    quantized: torch.Tensor  # [N] bool: primary stored as INT4
    logcnt: torch.Tensor  # [N] int64: copies per expert (1 + replicas)
    planned_bytes: int
    lis_before: float
    lis_after: float


def plan_layer(load: torch.Tensor, importance: torch.Tensor, original_bytes: torch.Tensor,
               int4_bytes: torch.Tensor, *, quantizable: bool, budget_factor: float, max_quantized: int,
               max_replicas: int, lis_tolerance: float = 0.0) -> LayerDecision:
    """Plan one layer.

    load: ``[N]`` assignment counts; importance: ``[N]`` (higher = keep at original precision);
    original_bytes / int4_bytes: ``[N]`` int64 real sizes of one copy at each precision;
    quantizable: whether INT4 applies at all (group size divides the weights);
    max_quantized: cap on INT4 primaries; max_replicas: cap on replicas per expert;
    lis_tolerance: keep the shortest greedy prefix whose LIS is within ``(1 + tol)`` of the best one
    (every replica is INT4, so fewer replicas means less INT4 traffic and less accuracy cost).

    Runs in O((N + R) log N) for R replicas: the expert with the highest per-copy load comes off a heap,
    and the predicted LIS is tracked incrementally. With offsets 0 the busiest copy of expert ``e`` holds
    ``ceil(L_e / C_e)`` assignments (docs/spec.md §4), so ``LIS = max_e ceil(L_e / C_e) * P / S``.
    """
    n = load.numel()
    assert importance.shape == original_bytes.shape == int4_bytes.shape == (n,), "per-expert vectors of length N"
    loads = [int(v) for v in load.round().to(torch.int64).tolist()]
    orig, q_bytes = [int(v) for v in original_bytes.tolist()], [int(v) for v in int4_bytes.tolist()]
    total = sum(loads)
    budget = budget_factor * sum(orig)
    # least important first; a stable sort on importance keeps lower ids first among ties
    quant_order = torch.argsort(importance.to(torch.float64), stable=True).tolist() if quantizable else []
    quant_order = quant_order[:max_quantized] if quantizable else []
    max_replicas = max_replicas if quantizable else 0
    quantized = [False] * n
    copies = [1] * n
    size = sum(orig)
    n_quantized = 0

    def quantize_next() -> bool:
        nonlocal size, n_quantized
        if n_quantized >= len(quant_order):
            return False
        e = quant_order[n_quantized]
        quantized[e] = True
        size += q_bytes[e] - orig[e]
        n_quantized += 1
        return True

    while size > budget:
        if not quantize_next():
            raise RQError(f"budget {budget_factor:g}x cannot be met even with {n_quantized} of {n} experts "
                          f"in INT4; raise --budget or --max-quantized-fraction")

    def lis_now(busiest: int) -> float:
        return busiest * sum(copies) / total if total else math.nan

    lis_before = lis_now(max(loads)) if n else math.nan
    heap = [(-loads[e], e) for e in range(n) if loads[e] > 0 and max_replicas > 0]  # key: -L/C, then id
    heapq.heapify(heap)
    capped_busiest = max((loads[e] for e in range(n) if max_replicas == 0), default=0)
    history = [(lis_before, 0, n_quantized)]  # (lis, replicas added, quantizations needed)
    added = 0
    while heap:
        _, e = heap[0]
        copies[e] += 1
        fits = size + q_bytes[e] <= budget
        while not fits and quantize_next():
            fits = size + q_bytes[e] <= budget
        if not fits:
            copies[e] -= 1
            break
        size += q_bytes[e]
        added += 1
        heapq.heappop(heap)
        if copies[e] > max_replicas:
            capped_busiest = max(capped_busiest, -(-loads[e] // copies[e]))
        else:
            heapq.heappush(heap, (-loads[e] / copies[e], e))
        busiest = max(capped_busiest, -(-loads[heap[0][1]] // copies[heap[0][1]]) if heap else 0)
        history.append((lis_now(busiest), added, n_quantized))
    finite = [h for h in history if not math.isnan(h[0])]
    floor = min((h[0] for h in finite), default=math.nan)
    best = next((h for h in finite if h[0] <= floor * (1 + lis_tolerance) + 1e-12), history[0])
    # replay the chosen prefix: the same greedy order, stopped after best[1] replicas
    return _replay(loads, orig, q_bytes, quant_order, best, max_replicas, lis_before)


def _replay(loads, orig, q_bytes, quant_order, best, max_replicas, lis_before) -> LayerDecision:
    best_lis, replicas, n_quantized = best
    n = len(loads)
    quantized = torch.zeros(n, dtype=torch.bool)
    quantized[quant_order[:n_quantized]] = True
    copies = [1] * n
    heap = [(-loads[e], e) for e in range(n) if loads[e] > 0 and max_replicas > 0]
    heapq.heapify(heap)
    for _ in range(replicas):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] <= max_replicas:
            heapq.heappush(heap, (-loads[e] / copies[e], e))
    logcnt = torch.tensor(copies, dtype=torch.int64)
    size = layer_bytes(orig, q_bytes, quantized.tolist(), [c - 1 for c in copies])
    return LayerDecision(quantized, logcnt, size, lis_before, best_lis)


def hedged_decision(s: LayerStats, importance: torch.Tensor, original: torch.Tensor, q_bytes: torch.Tensor, *,
                    budget_factor: float, max_quantized: int, max_replicas: int) -> LayerDecision:
    """One layer by :func:`rq.plan.robust.hedged_layer` over the stats' traffic windows and their sum (docs/spec.md
    §6, "Hedged plans"); predicted LIS on the sum, like the greedy's."""
    orig, q = [int(v) for v in original.tolist()], [int(v) for v in q_bytes.tolist()]
    order = torch.argsort(importance.to(torch.float64), stable=True).tolist()[:max_quantized] if s.quantizable else []
    windows = torch.cat([s.load.unsqueeze(0), s.load_windows])
    quantized, copies, _ = hedged_layer(windows, order, orig, q, budget=budget_factor * sum(orig),
                                        max_replicas=max_replicas if s.quantizable else 0)
    loads = [int(v) for v in s.load.round().to(torch.int64).tolist()]
    total = sum(loads)
    before = max(loads) * len(loads) / total if total else math.nan
    after = max(-(-L // c) for L, c in zip(loads, copies)) * sum(copies) / total if total else math.nan
    return LayerDecision(torch.tensor(quantized), torch.tensor(copies, dtype=torch.int64),
                         layer_bytes(orig, q, quantized, [c - 1 for c in copies]), before, after)


def resolve_hedge(stats: CalibrationStats, hedge: bool | None, precisions: tuple[str, ...]) -> bool:
    """``hedge`` as asked; by default (None) hedged exactly when the stats hold windows of the model's own
    generations and the plan is INT4 only: decode traffic routes differently from the calibration text, so a plan
    fitted to the sum can lose to no balancing there, and only then does the planner see the traffic to hedge for."""
    if hedge is not None:
        return hedge
    return precisions == ("int4",) and stats.windows is not None and stats.windows.generated > 0 and all(
        s.load_windows is not None for s in stats.layers)


def layer_bytes(original_bytes: list[int], int4_bytes: list[int], int4_primary: list[bool], replicas: list[int]) -> int:
    """Bytes of one layer's copies: each primary at its precision, every replica INT4 (docs/spec.md §6)."""
    primaries = sum(q if quantized else o for o, q, quantized in zip(original_bytes, int4_bytes, int4_primary))
    return primaries + sum(r * q for r, q in zip(replicas, int4_bytes))


def copies_bytes(original_bytes: list[int], int4_bytes: int, int8_bytes: int, copy_precisions: list[list[int]]) -> int:
    """Bytes of one layer's copies, each at its own precision (codes of docs/spec.md §8 per expert)."""
    per_code = lambda e: (original_bytes[e], int4_bytes, int8_bytes)  # noqa: E731
    return sum(per_code(e)[code] for e, codes in enumerate(copy_precisions) for code in codes)


def expert_int4_bytes(stats: LayerStats, group_size: int) -> int:
    return int4_nbytes(stats.w_in_shape, group_size) + int4_nbytes(stats.w_out_shape, group_size)


def expert_int8_bytes(stats: LayerStats, group_size: int) -> int:
    return int8_nbytes(stats.w_in_shape, group_size) + int8_nbytes(stats.w_out_shape, group_size)


def _sensitivities(s: LayerStats) -> dict[int, torch.Tensor]:
    """Per precision code, the expert errors of docs/spec.md §6 (INT8 treated as INT4 where it was not measured,
    which only the INT4-only planner reaches)."""
    s8 = s.quant_sensitivity_int8 if s.quant_sensitivity_int8 is not None else s.quant_sensitivity
    return {1: s.quant_sensitivity, 2: s8}


def plan_from_decisions(template: Plan, stats: CalibrationStats, decisions: list[tuple[torch.Tensor, torch.Tensor]],
                        label: str | None = None) -> Plan:
    """A valid plan with per-layer decisions ``(quantized [N] bool, logcnt [N] int64)`` made elsewhere (a
    baseline, a test) and ``template``'s metadata. Bytes are recomputed from ``stats``, the accounting the
    template used, so the plan passes :mod:`rq.plan.validate`; predicted LIS is dropped (``None``) since the
    decisions did not come from the planner, and the budget factor grows to what they take if needed."""
    layers = []
    group = template.quantization.group_size
    for layer, s, (quantized, logcnt) in zip(template.layers, stats.layers, decisions):
        q_bytes = [expert_int4_bytes(s, group)] * s.num_experts
        planned = layer_bytes(s.original_bytes, q_bytes, quantized.tolist(), (logcnt - 1).tolist())
        experts = [e.model_copy(update={"precision": "int4" if bool(quantized[e.expert]) else "original",
                                        "replicas": int(logcnt[e.expert]) - 1, "int8_replicas": 0})
                   for e in layer.experts]
        layers.append(layer.model_copy(update={"experts": experts, "planned_bytes": planned,
                                               "lis_before": None, "lis_after": None, "predicted_error": None}))
    planned = sum(layer.planned_bytes for layer in layers)
    factor = max(template.budget.budget_factor, planned / template.budget.reference_bytes)
    budget = BudgetInfo(reference_bytes=template.budget.reference_bytes, planned_bytes=planned, budget_factor=factor)
    options = {**template.options, "max_replicas": max(int(template.options.get("max_replicas", 0)),
                                                      *(int(d[1].max()) - 1 for d in decisions))}
    update = {"layers": layers, "budget": budget, "options": options}
    return Plan.model_validate(template.model_copy(update=update | ({"importance_metric": label} if label else {}))
                               .model_dump())


def make_plan(stats: CalibrationStats, options: PlanOptions = PlanOptions()) -> Plan:
    """Plan every layer of ``stats`` and return the validated plan document."""
    if options.budget_factor <= 0:
        raise RQError(f"--budget must be positive, got {options.budget_factor}")
    if not 0 <= options.max_quantized_fraction <= 1:
        raise RQError(f"--max-quantized-fraction must be in [0, 1], got {options.max_quantized_fraction}")
    if not 0 <= options.max_replicas <= MAX_REPLICAS:
        raise RQError(f"--max-replicas must be in 0..{MAX_REPLICAS}, got {options.max_replicas}")
    if stats.calibration.tokens == 0 or all(float(s.load.sum()) == 0 for s in stats.layers):
        raise RQError("the calibration stats hold no routed tokens; calibrate on more data")
    precisions = parse_precisions(options.precisions)
    if "int8" in precisions and any(s.quant_sensitivity_int8 is None for s in stats.layers):
        raise RQError("these stats have no INT8 sensitivity (calibrated before INT8 existed); rerun `rq calibrate` "
                      "or plan with --precisions int4")
    options = dataclasses.replace(options, hedge=resolve_hedge(stats, options.hedge, precisions))
    if options.hedge and precisions != ("int4",):
        raise RQError("--hedge plans INT4 copies only; drop --precisions or --hedge")
    if options.hedge and any(s.load_windows is None for s in stats.layers):
        raise RQError("these stats have no traffic windows (calibrated before they existed); rerun `rq calibrate` "
                      "or plan without --hedge")
    if precisions != ("int4",):
        return _mixed_plan(stats, options, precisions)
    group = stats.group_size
    layers = []
    for s in stats.layers:
        original = torch.tensor(s.original_bytes, dtype=torch.int64)
        q_bytes = torch.full_like(original, expert_int4_bytes(s, group)) if s.quantizable else original.clone()
        importance = s.importance(options.importance)
        max_quantized = int(options.max_quantized_fraction * s.num_experts)
        if options.hedge:
            decision = hedged_decision(s, importance, original, q_bytes, budget_factor=options.budget_factor,
                                       max_quantized=max_quantized, max_replicas=options.max_replicas)
        else:
            decision = plan_layer(s.load, importance, original, q_bytes, quantizable=s.quantizable,
                                  budget_factor=options.budget_factor, max_quantized=max_quantized,
                                  max_replicas=options.max_replicas, lis_tolerance=options.lis_tolerance)
        total = float(s.load.sum())
        warnings = [] if s.quantizable else [
            f"weights {s.w_in_shape}/{s.w_out_shape} are not divisible by group size {group}: layer left unquantized "
            f"and unreplicated (try --group-size 64 at calibration)"]
        experts = [ExpertPlan(expert=e, load_share=float(s.load[e]) / total if total else 0.0,
                              importance=float(importance[e]),
                              precision="int4" if bool(decision.quantized[e]) else "original",
                              replicas=int(decision.logcnt[e]) - 1) for e in range(s.num_experts)]
        error = predicted_error(s.load, _sensitivities(s), decision.logcnt, [e.copy_precisions for e in experts])
        layers.append(LayerPlan(
            layer=s.index, module=s.path, planned_bytes=decision.planned_bytes, warnings=warnings,
            lis_before=None if math.isnan(decision.lis_before) else decision.lis_before,
            lis_after=None if math.isnan(decision.lis_after) else decision.lis_after,
            predicted_error=None if math.isnan(error) else error, experts=experts))
    return _finish(stats, options, layers, precisions)


def _mixed_plan(stats: CalibrationStats, options: PlanOptions, precisions: tuple[str, ...]) -> Plan:
    """Every layer by the exact solver of :mod:`rq.plan.solver` (docs/spec.md §6, "Mixed precision")."""
    group = stats.group_size
    layers = []
    names = {0: "original", 1: "int4", 2: "int8"}
    for s in stats.layers:
        importance = s.importance(options.importance)
        d = solve_layer(s.load, s.quant_sensitivity, s.quant_sensitivity_int8, s.original_bytes,
                        expert_int4_bytes(s, group), expert_int8_bytes(s, group), precisions=precisions,
                        quantizable=s.quantizable, budget_factor=options.budget_factor,
                        max_quantized=int(options.max_quantized_fraction * s.num_experts),
                        max_replicas=options.max_replicas, lis_tolerance=options.lis_tolerance)
        total = float(s.load.sum())
        warnings = [] if s.quantizable else [
            f"weights {s.w_in_shape}/{s.w_out_shape} cannot be quantized: layer left at original precision"]
        layers.append(LayerPlan(
            layer=s.index, module=s.path, planned_bytes=d.planned_bytes, warnings=warnings,
            lis_before=None if math.isnan(d.lis_before) else d.lis_before,
            lis_after=None if math.isnan(d.lis_after) else d.lis_after,
            predicted_error=None if math.isnan(d.predicted_error) else d.predicted_error,
            experts=[ExpertPlan(expert=e, load_share=float(s.load[e]) / total if total else 0.0,
                                importance=float(importance[e]), precision=names[int(d.primary[e])],
                                replicas=int(d.logcnt[e]) - 1, int8_replicas=int(d.int8_replicas[e]))
                     for e in range(s.num_experts)]))
    return _finish(stats, options, layers, precisions)


def _finish(stats: CalibrationStats, options: PlanOptions, layers: list[LayerPlan], precisions: tuple[str, ...]) -> Plan:
    reference = sum(sum(s.original_bytes) for s in stats.layers)
    try:
        return _plan_document(stats, options, layers, reference, precisions)
    except ValidationError as err:  # stats that passed their own checks but do not make a consistent plan
        raise RQError(f"these stats do not make a valid plan {first_error(err)}; rerun `rq calibrate`") from None


def _plan_document(stats: CalibrationStats, options: PlanOptions, layers: list[LayerPlan], reference: int,
                   precisions: tuple[str, ...]) -> Plan:
    group = stats.group_size
    return Plan(
        version=PLAN_VERSION, tool_version=__version__, created=dt.datetime.now(dt.timezone.utc).isoformat(),
        model=stats.model, calibration=stats.calibration, quantization=QuantizationInfo(group_size=group),
        importance_metric=options.importance,
        budget=BudgetInfo(reference_bytes=reference, planned_bytes=sum(p.planned_bytes for p in layers),
                          budget_factor=options.budget_factor),
        options={"max_quantized_fraction": options.max_quantized_fraction, "max_replicas": options.max_replicas,
                 "lis_tolerance": options.lis_tolerance, "precisions": ",".join(precisions),
                 **({"hedge": "worst window"} if options.hedge else {})},
        layers=layers)
