"""The copies ``rq place`` places: a plan's copies fitted to one engine-wide slot count, their loads and bytes.

Pure functions over the plan, its stats and tensors (the "fit" step of :func:`rq.placement.run.place_plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rq.calibrate.stats import CalibrationStats
from rq.errors import RQError
from rq.placement.formats import DTYPE_BYTES
from rq.placement.place import fit_logcnt
from rq.plan.planner import expert_int4_bytes
from rq.plan.schema import Plan


def plan_loads(plan: Plan, stats: CalibrationStats | None) -> torch.Tensor:
    """``[L, N]`` int64 loads behind ``plan``: the stats' counts when given, else ``load_share * T * K``."""
    if stats is None:
        total = plan.calibration.tokens * plan.model.top_k
        return torch.tensor([[round(e.load_share * total) for e in layer.experts] for layer in plan.layers],
                            dtype=torch.int64)
    check_stats(plan, stats, "stats")
    return torch.stack([s.load for s in stats.layers]).round().to(torch.int64)


def check_stats(plan: Plan, stats: CalibrationStats, what: str) -> None:
    if stats.model.fingerprint != plan.model.fingerprint:
        raise RQError(f"the {what} are of another model (fingerprint {stats.model.fingerprint[:20]}..., plan "
                      f"{plan.model.fingerprint[:20]}...); pass stats of the model the plan was made for")
    if len(stats.layers) != len(plan.layers) or stats.model.num_experts != plan.model.num_experts:
        raise RQError(f"the {what} have {len(stats.layers)} layers x {stats.model.num_experts} experts, the plan "
                      f"{len(plan.layers)} x {plan.model.num_experts}")


def copy_bytes(plan: Plan, stats: CalibrationStats | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(original [L], int4 [L])`` bytes of one expert copy per layer: from the stats' real sizes when given;
    else original = reference bytes / (L*N) and INT4 solved from the plan's planned bytes (or, for a
    layer without INT4 copies, estimated as 0.5 + 2/G bytes per weight)."""
    num_layers, n = len(plan.layers), plan.model.num_experts
    if stats is not None:
        group = stats.group_size
        orig = torch.tensor([sum(s.original_bytes) / s.num_experts for s in stats.layers], dtype=torch.float64)
        q = torch.tensor([expert_int4_bytes(s, group) if s.quantizable else sum(s.original_bytes) / s.num_experts
                          for s in stats.layers], dtype=torch.float64)
        return orig, q
    per = plan.budget.reference_bytes / (num_layers * n)
    elem = DTYPE_BYTES.get(plan.model.dtype, 2)
    estimate = per * (0.5 + 2 / plan.quantization.group_size) / elem
    orig = torch.full((num_layers,), per, dtype=torch.float64)
    q = torch.full((num_layers,), estimate, dtype=torch.float64)
    for i, layer in enumerate(plan.layers):
        codes = [c for e in layer.experts for c in e.copy_precisions]
        n_int4 = codes.count(1)
        if n_int4:  # INT8 copies at their estimated size (twice INT4's values, the same scales)
            int8_estimate = per * (1 + 2 / plan.quantization.group_size) / elem
            q[i] = (layer.planned_bytes - codes.count(0) * per - codes.count(2) * int8_estimate) / n_int4
    return orig, q


def copy_byte_table(plan: Plan, logcnt: torch.Tensor, orig: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[L, N, max copies]`` bytes of copy ``c`` of expert ``e`` as placed (0 past ``logcnt``): the plan's
    precision for the copies it has (docs/spec.md §6 order), INT4 for copies the placement added. INT8 copies
    are ``q * (1 + 2/G) / (0.5 + 2/G)`` of an INT4 one: the same scales, a byte per value."""
    g = plan.quantization.group_size
    q8 = q * (1 + 2 / g) / (0.5 + 2 / g)
    num_layers, n = logcnt.shape
    table = torch.zeros(num_layers, n, int(logcnt.max()), dtype=torch.float64)
    for li, layer in enumerate(plan.layers):
        size = (float(orig[li]), float(q[li]), float(q8[li]))
        for e, expert in enumerate(layer.experts):
            codes = expert.copy_precisions
            for c in range(int(logcnt[li, e])):
                table[li, e, c] = size[codes[c] if c < len(codes) else 1]
    return table


def rq_bytes(plan: Plan, logcnt: torch.Tensor, orig: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[L]`` bytes of the placed copies with per-copy precision (:func:`copy_byte_table`)."""
    return copy_byte_table(plan, logcnt, orig, q).sum((-1, -2))


@dataclass
class Target:
    num_phy: int
    logcnt: torch.Tensor  # [L, N] fitted


def copy_changes(plan: Plan, logcnt: torch.Tensor) -> tuple[list[int], list[int]]:
    """Copies added and removed per layer, placed ``logcnt [L, N]`` against the plan's."""
    diff = logcnt - torch.tensor([layer.logcnt for layer in plan.layers], dtype=torch.int64)
    return diff.clamp(min=0).sum(-1).tolist(), (-diff).clamp(min=0).sum(-1).tolist()


def target_logcnt(plan: Plan, loads: torch.Tensor, num_gpus: int, slots_per_device: int | None,
                  pad: str) -> Target:
    """Fit each layer's plan copies to one engine-wide ``P`` (a multiple of G, at most G copies per expert).

    ``pad``: ``replicate`` fits every layer up to the largest layer's copies (rounded up to a multiple of G),
    ``trim`` down to the smallest layer's (rounded down; then no layer exceeds its planned bytes), ``error``
    refuses a plan whose layers do not already agree. ``slots_per_device`` overrides P.
    """
    n = plan.model.num_experts
    logcnt = torch.tensor([layer.logcnt for layer in plan.layers], dtype=torch.int64)
    per_layer = logcnt.sum(-1)
    least = math.ceil(n / num_gpus) * num_gpus
    if pad not in ("replicate", "trim", "error"):
        raise RQError(f"--pad must be 'replicate', 'trim' or 'error', got '{pad}'")
    largest = int(per_layer.max())
    if slots_per_device is None and largest < num_gpus:
        raise RQError(f"the plan has at most {largest} copies per layer but --devices {num_gpus}: {num_gpus - largest} "
                      f"devices would hold none of its copies (rq place would add replicas the plan did not budget); "
                      f"use --devices {largest} or fewer, plan more replicas (rq plan --budget), or set "
                      f"--slots-per-device to pad on purpose")
    if slots_per_device is not None:
        if slots_per_device * num_gpus < n:
            raise RQError(f"--slots-per-device {slots_per_device} x {num_gpus} devices = {slots_per_device * num_gpus} "
                          f"slots < {n} experts: every expert needs a slot; raise --slots-per-device")
        if slots_per_device > n:
            raise RQError(f"--slots-per-device {slots_per_device} exceeds the {n} experts: a device would hold two "
                          f"copies of one expert, which adds nothing to device balance")
        num_phy = slots_per_device * num_gpus
    elif pad == "trim":
        num_phy = max(int(per_layer.min()) // num_gpus * num_gpus, least)
    else:
        num_phy = min(math.ceil(int(per_layer.max()) / num_gpus) * num_gpus, n * num_gpus)
    if pad == "error":
        bad = [(i, int(c)) for i, c in enumerate(per_layer) if int(c) != num_phy]
        over = [(i, int(e)) for i in range(len(plan.layers)) for e in torch.nonzero(logcnt[i] > num_gpus).flatten()]
        if bad:
            i, c = bad[0]
            raise RQError(f"layer {i} has {c} copies but engines need the same P in every layer and "
                          f"P % {num_gpus} == 0 (P = {num_phy} here); rerun with --pad replicate, --pad trim or "
                          f"--slots-per-device")
        if over:
            i, e = over[0]
            raise RQError(f"layer {i} expert {e} has {int(logcnt[i, e])} copies on {num_gpus} devices; copies beyond "
                          f"one per device do not balance devices: rerun with --pad replicate or "
                          f"rq plan --max-replicas")
    fitted = torch.stack([fit_logcnt(loads[i], logcnt[i], num_phy, num_gpus) for i in range(len(plan.layers))])
    return Target(num_phy, fitted)
