"""Baselines that R&Q is measured against, as pure functions over tensors and plans.

What "equal memory" means here (per MoE layer; ``R`` = reference bytes, every expert once at original
precision; ``b`` = budget factor; ``B_orig`` / ``B_int4`` = bytes of one expert copy at each precision):

* **no balancing** -- the original model: ``N`` copies, ``R`` bytes (1.0x).
* **replicate-only (EPLB-style)** -- original-precision replicas, nothing quantized, so accuracy is the
  original's by construction (every copy holds the same bytes). At budget ``b`` it gets the memory above
  the reference: ``floor((b - 1) * R / B_orig)`` replicas (none at ``b <= 1``), placed by
  :func:`eplb_logcnt`. A second variant gets as many replicas as R&Q placed (equal *copies*); its memory
  is then reported, which is what replication without quantization costs for the same balance.
* **R&Q by importance metric** -- :func:`rq.plan.planner.make_plan` with ``importance`` in
  ``frequency | gate_mass | contribution | quant_sensitivity``. All INT4 copies of a layer have the same
  size, so the metric changes only *which* experts are INT4, never how many nor the replicas: equal
  memory and equal LIS by construction; only accuracy differs (the paper's finding ii).
* **random** -- per layer exactly as many INT4 primaries and replicas as the R&Q plan (hence equal bytes),
  but the INT4 experts and the replicated experts are drawn uniformly at random (seeded).

Vocabulary follows :mod:`rq.core.replica` (DeepSeek EPLB names): ``logcnt [N]`` copies per logical expert.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from rq.plan.planner import plan_from_decisions
from rq.plan.schema import Plan
from rq.calibrate.stats import METRICS, OPTIONAL_METRICS, CalibrationStats, LayerStats


def eplb_logcnt(load: torch.Tensor, num_replicas: int, max_copies: int | None = None) -> torch.Tensor:
    """Greedy replication by per-copy load, as DeepSeek's EPLB ``replicate_experts`` describes it.

    Each of ``num_replicas`` extra copies goes to the expert whose load per copy ``load[e] / logcnt[e]``
    is highest (ties: lower id). Unlike the R&Q planner there is no "stop when LIS stops improving"
    step: EPLB fills the physical slots it is given.

    load: ``[N]`` loads (any numeric dtype); num_replicas: extra copies to place;
    max_copies: optional cap on ``logcnt[e]``. Returns int64 ``logcnt [N]``.
    """
    assert load.dim() == 1, f"load must be [N], got {tuple(load.shape)}"
    assert num_replicas >= 0, f"num_replicas must be >= 0, got {num_replicas}"
    load = load.to(torch.float64)
    logcnt = torch.ones(load.numel(), dtype=torch.int64)
    for _ in range(num_replicas):
        per_copy = load / logcnt
        if max_copies is not None:
            per_copy = torch.where(logcnt < max_copies, per_copy, torch.full_like(per_copy, -1.0))
        target = int(torch.argmax(per_copy))  # first maximum = lowest id among ties
        if per_copy[target] < 0:
            break
        logcnt[target] += 1
    return logcnt


def equal_memory_replicas(budget_factor: float, original_bytes: list[int]) -> int:
    """Original-precision replicas that fit in ``budget_factor`` x the layer's reference bytes
    (replicate-only baseline): ``floor((b - 1) * R / B_orig)``, 0 when ``b <= 1``."""
    reference = sum(original_bytes)
    per_copy = max(original_bytes)
    return max(0, math.floor((budget_factor * reference - reference) / per_copy + 1e-9))


ACCOUNTING_DTYPES = {1: "float8_e4m3fn", 2: "bfloat16", 4: "float32"}


def with_bytes_per_param(stats: CalibrationStats, bytes_per_param: int | None) -> CalibrationStats:
    """Stats whose ``original_bytes`` count ``bytes_per_param`` per weight (e.g. 2 = bf16 accounting for a
    checkpoint stored in float32); ``None`` keeps the real tensor sizes. Only the budget arithmetic changes, and
    the model info names the accounting dtype, so plans made from these stats validate against the model
    (:mod:`rq.plan.validate` recomputes bytes with it)."""
    if bytes_per_param is None:
        return stats

    def relabel(s: LayerStats) -> LayerStats:
        params = s.w_in_shape[0] * s.w_in_shape[1] + s.w_out_shape[0] * s.w_out_shape[1]
        return dataclasses.replace(s, original_bytes=[int(params * bytes_per_param)] * s.num_experts)

    model = stats.model.model_copy(update={"dtype": ACCOUNTING_DTYPES[bytes_per_param]})
    return dataclasses.replace(stats, model=model, layers=[relabel(s) for s in stats.layers])


def sum_stats(parts: list[CalibrationStats]) -> CalibrationStats:
    """Stats of the union of disjoint calibration sets: every docs/spec.md §3 metric is a sum over assignments."""
    first = parts[0]
    layers = []
    for per_layer in zip(*(p.layers for p in parts)):
        base = per_layer[0]
        sums = {m: sum(getattr(s, m) for s in per_layer) for m in METRICS + OPTIONAL_METRICS
                if all(getattr(s, m) is not None for s in per_layer)}
        layers.append(dataclasses.replace(base, **sums))
    calibration = first.calibration.model_copy(update={
        "sequences": sum(p.calibration.sequences for p in parts), "tokens": sum(p.calibration.tokens for p in parts),
        "data": f"{first.calibration.data} (+{len(parts) - 1} more chunks)" if len(parts) > 1 else first.calibration.data})
    return dataclasses.replace(first, calibration=calibration, layers=layers)


def random_layer_decision(num_experts: int, num_quantized: int, num_replicas: int, max_replicas: int,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantized [N] bool, logcnt [N] int64)``: ``num_quantized`` INT4 primaries and ``num_replicas``
    replicas, each replica on a uniformly random expert that still has room (``<= max_replicas`` each)."""
    assert num_replicas <= num_experts * max_replicas, "more replicas than the per-expert cap allows"
    quantized = torch.zeros(num_experts, dtype=torch.bool)
    quantized[torch.randperm(num_experts, generator=generator)[:num_quantized]] = True
    logcnt = torch.ones(num_experts, dtype=torch.int64)
    for _ in range(num_replicas):
        room = torch.nonzero(logcnt <= max_replicas).flatten()
        logcnt[room[int(torch.randint(room.numel(), (1,), generator=generator))]] += 1
    return quantized, logcnt


def plan_counts(plan: Plan) -> list[tuple[int, int]]:
    """Per layer ``(INT4 primaries, replicas)`` of a plan."""
    return [(sum(e.precision == "int4" for e in layer.experts), sum(e.replicas for e in layer.experts))
            for layer in plan.layers]


def random_plan(template: Plan, stats: CalibrationStats, seed: int, max_replicas: int) -> Plan:
    """Random baseline: per layer the template's counts of INT4 primaries and replicas, at random experts."""
    generator = torch.Generator().manual_seed(seed)
    decisions = [random_layer_decision(s.num_experts, q, r, max_replicas, generator)
                 for s, (q, r) in zip(stats.layers, plan_counts(template))]
    return plan_from_decisions(template, stats, decisions, f"random(seed={seed})")


def memory_factor(plan: Plan) -> float:
    """Planned bytes / reference bytes of a plan (in the plan's own byte accounting)."""
    return plan.budget.planned_bytes / plan.budget.reference_bytes
