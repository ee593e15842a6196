"""The planner at real model shapes: plan time, peak memory and predicted LIS on synthetic stats.

Shapes (:mod:`rq.testing.synthetic`): DeepSeek-V3-like (58 MoE layers x 256 experts, top-8) and Mixtral-like
(32 x 8, top-2), bf16 experts, Zipf-skewed loads. For each budget:

* time of :func:`rq.plan.planner.make_plan` for the whole model (validated plan document included), its peak
  Python-heap allocation (``tracemalloc``: the plan's pydantic objects and Python lists; the planner's
  torch tensors are ``[N]`` vectors, negligible) and the growth of the process's peak RSS, each
  (shape, budget) in a fresh spawned process (the tracemalloc run is a second, untimed one);
* LIS on a *held-out* synthetic sample (same popularity ranking, log-normal drift, fresh sampling) of
  the R&Q plan and of replicate-only (EPLB) at equal memory -- cumulative loads only, there is no routing
  to batch here;
* scaling of :func:`rq.plan.planner.plan_layer` with the number of experts (one layer, Zipf loads, top-8).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import statistics
import time
import tracemalloc

import numpy as np
import torch

from benchmarks.baselines import eplb_logcnt, equal_memory_replicas
from rq.core.lis import lis_value, model_lis
from rq.plan.planner import PlanOptions, expert_int4_bytes, make_plan, plan_layer
from rq.core.replica import split_load
from rq.testing.synthetic import SHAPES, synthetic_stats, zipf_probs


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _plan_case(shape: str, budget: float, seed: int, num_layers: int | None, drift: float) -> dict:
    """Runs in a fresh process: plan one synthetic model and judge it on a held-out sample."""
    torch.set_num_threads(1)
    stats = synthetic_stats(shape, seed=seed, num_layers=num_layers)
    heldout = synthetic_stats(shape, seed=seed, num_layers=num_layers, drift=drift, sample_seed=1)
    make_plan(synthetic_stats("mixtral", seed=seed, num_layers=1), PlanOptions())  # warm up lazy imports
    rss_before = _maxrss_mib()
    start = time.perf_counter()
    plan = make_plan(stats, PlanOptions(budget_factor=budget))
    seconds = time.perf_counter() - start
    rss_after = _maxrss_mib()
    tracemalloc.start()  # a second, untimed run for the Python-heap peak (tracemalloc slows allocation)
    make_plan(stats, PlanOptions(budget_factor=budget))
    python_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    json_bytes = len(plan.model_dump_json(indent=2))
    before, after, eplb, eplb_same = [], [], [], []
    for s, h, layer in zip(stats.layers, heldout.layers, plan.layers):
        logcnt = torch.tensor(layer.logcnt)
        before.append(lis_value(h.load))
        after.append(lis_value(split_load(h.load.to(torch.int64), logcnt)))
        r_eq = equal_memory_replicas(budget, s.original_bytes)
        eplb.append(lis_value(split_load(h.load.to(torch.int64), eplb_logcnt(s.load, r_eq))))
        eplb_same.append(lis_value(split_load(h.load.to(torch.int64),
                                              eplb_logcnt(s.load, int(logcnt.sum()) - s.num_experts))))
    calib_before = model_lis([l.lis_before for l in plan.layers if l.lis_before is not None])
    calib_after = model_lis([l.lis_after for l in plan.layers if l.lis_after is not None])
    n, layers = stats.layers[0].num_experts, len(stats.layers)
    replicas = sum(e.replicas for l in plan.layers for e in l.experts)
    return {
        "shape": shape, "budget": budget, "layers": layers, "experts": n, "top_k": stats.layers[0].top_k,
        "seconds": seconds, "seconds_per_layer": seconds / layers,
        "peak_rss_growth_mib": rss_after - rss_before, "python_heap_peak_mib": python_peak, "peak_rss_mib": rss_after,
        "plan_json_bytes": json_bytes,
        "memory": plan.budget.planned_bytes / plan.budget.reference_bytes,
        "int4": sum(e.precision == "int4" for l in plan.layers for e in l.experts), "replicas": replicas,
        "eplb_equal_memory_replicas": sum(equal_memory_replicas(budget, s.original_bytes) for s in stats.layers),
        "eplb_same_copies_memory": 1.0 + replicas / (n * layers),
        "calibration_lis_before": calib_before[0], "calibration_lis_after": calib_after[0],
        "heldout_lis_before": model_lis(before)[0], "heldout_lis_after": model_lis(after)[0],
        "heldout_worst_before": model_lis(before)[1], "heldout_worst_after": model_lis(after)[1],
        "heldout_reduction": model_lis(before)[0] / model_lis(after)[0],
        "eplb_equal_memory_reduction": model_lis(before)[0] / model_lis(eplb)[0],
        "eplb_same_copies_reduction": model_lis(before)[0] / model_lis(eplb_same)[0],
    }


def _scaling_case(num_experts: int, top_k: int, zipf: float, repeats: int, seed: int) -> dict:
    """Time of one :func:`plan_layer` call at ``num_experts`` experts (median of ``repeats``)."""
    gen = torch.Generator().manual_seed(seed)
    probs = zipf_probs(num_experts, zipf, torch.randperm(num_experts, generator=gen)).clamp(max=1 / top_k)
    load = torch.poisson(probs / probs.sum() * 65536 * top_k, generator=gen)
    importance = torch.rand(num_experts, generator=gen, dtype=torch.float64)
    shape = SHAPES["deepseek_v3"]
    original = torch.full((num_experts,), (2 * shape.intermediate_size * shape.hidden_size +
                                           shape.hidden_size * shape.intermediate_size) * 2, dtype=torch.int64)
    stats1 = synthetic_stats("deepseek_v3", num_layers=1)
    int4 = torch.full_like(original, expert_int4_bytes(stats1.layers[0], 128))
    times, decision = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        decision = plan_layer(load, importance, original, int4, quantizable=True, budget_factor=1.0,
                              max_quantized=num_experts // 2, max_replicas=7)
        times.append(time.perf_counter() - start)
    return {"experts": num_experts, "seconds": statistics.median(times),
            "replicas": int(decision.logcnt.sum()) - num_experts, "int4": int(decision.quantized.sum()),
            "lis_before": decision.lis_before, "lis_after": decision.lis_after}


def run(quick: bool = False, seed: int = 0, drift: float = 0.25, log=print) -> dict:
    """All planner-scale measurements; ``quick`` keeps 4 DeepSeek layers and small scaling sizes."""
    torch.set_num_threads(1)
    budgets = (0.75, 1.0, 1.25)
    cases = [(shape, b) for shape in ("deepseek_v3", "mixtral") for b in budgets]
    if quick:  # in-process (peak RSS then is the whole process's, not the plan's): no spawn cost
        results = [_plan_case(shape, b, seed, 4 if shape == "deepseek_v3" else None, drift) for shape, b in cases]
    else:
        with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # a fresh process per case
            results = [pool.apply(_plan_case, (shape, b, seed, None, drift)) for shape, b in cases]
    rows = results
    for row in rows:
        log(f"  {row['shape']} @ {row['budget']:g}: {row['seconds']:.2f} s ({row['layers']} layers), "
            f"Python heap peak {row['python_heap_peak_mib']:.1f} MiB, peak RSS +{row['peak_rss_growth_mib']:.1f} MiB, "
            f"held-out LIS {row['heldout_lis_before']:.2f} -> {row['heldout_lis_after']:.2f} "
            f"({row['heldout_reduction']:.2f}x; EPLB equal memory {row['eplb_equal_memory_reduction']:.2f}x)")
    sizes = (8, 64, 256) if quick else (8, 16, 32, 64, 128, 256, 512, 1024)
    scaling = [_scaling_case(n, 8 if n >= 64 else 2, 0.35 if n >= 64 else 0.5, 1 if quick else 3, seed)
               for n in sizes]
    for row in scaling:
        log(f"  plan_layer N={row['experts']}: {1e3 * row['seconds']:.1f} ms, {row['replicas']} replicas")
    return {"seed": seed, "drift": drift, "cases": rows, "scaling": scaling,
            "shapes": {k: v.__dict__ for k, v in SHAPES.items()}}


def fit_exponent(scaling: list[dict]) -> float:
    """Least-squares slope of log(time) against log(N) over the sizes >= 64 (the asymptotic regime)."""
    pts = [(math.log(r["experts"]), math.log(r["seconds"])) for r in scaling if r["experts"] >= 64]
    if len(pts) < 2:
        return math.nan
    slope, _ = np.polyfit(*zip(*pts), deg=1)
    return float(slope)
