"""Device balance of a placement (the "simulate" step of :func:`rq.placement.run.place_plan`): device loads of R&Q's
placement against DeepSeek EPLB's, on calibration and held-out loads, under an even split and under every
serving engine's own dispatch rule (:mod:`rq.placement.dispatch`). Pure functions over tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rq.placement.dispatch import DISPATCH_MODES, ENGINE_MODES, sglang_static_table
from rq.placement.dispatch import device_loads as dispatch_device_loads
from rq.placement.fit import copy_byte_table, rq_bytes
from rq.placement.formats import sglang_rows
from rq.placement.place import device_lis, device_loads, eplb_rebalance, makespan_ratio, trivial_placement
from rq.plan.schema import Plan


@dataclass
class Simulation:
    """Device loads ``{method: {load set: [L, G]}}`` and the slot count of each method."""

    slots: dict[str, int]
    loads: dict[str, dict[str, torch.Tensor]]
    bytes_per_gpu: dict[str, float]  # max over devices of expert bytes per device, summed over layers
    bytes_per_gpu_mean: float  # R&Q: mean over devices
    same_memory_clipped: bool
    # {dispatch mode: {method: {load set: [L, G]}}} for the placements an engine is given (R&Q, EPLB same slots)
    dispatch: dict[str, dict[str, dict[str, torch.Tensor]]]


DISPATCH_METHODS = ("eplb_same_slots", "rq")


@dataclass(frozen=True)
class Layout:
    """How the MoE layers sit in the model (SGLang's static tables span every decoder layer)."""

    decoder: list[int]
    num_hidden: int
    top_k: int
    batch_tokens: int


def dispatch_loads(loads: dict[str, torch.Tensor], phy2log: torch.Tensor, num_gpus: int, num_nodes: int,
                   layout: Layout, modes: tuple[str, ...] = DISPATCH_MODES) -> dict[str, dict[str, torch.Tensor]]:
    """``{mode: {load set: [L, G]}}`` device loads of one placement under every engine's dispatch rule."""
    n = loads["calibration"].shape[1]
    tables = sglang_static_table(sglang_rows(phy2log, layout.decoder, layout.num_hidden, n), num_gpus,
                                 num_nodes)[:, layout.decoder]
    return {mode: {key: dispatch_device_loads(mode, value, phy2log, num_gpus, top_k=layout.top_k,
                                              batch_tokens=layout.batch_tokens, static_tables=tables)
                   for key, value in loads.items()} for mode in modes}


def simulate(plan: Plan, loads: dict[str, torch.Tensor], placed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             num_gpus: int, num_nodes: int, num_groups: int, orig: torch.Tensor, q: torch.Tensor,
             layout: Layout, static_phy2log: torch.Tensor | None = None) -> Simulation:
    """Device loads of the four methods for each load set (``{"calibration": [L, N], "held-out": ...}``).
    ``static_phy2log``: R&Q's layout for SGLang's static dispatch (:mod:`rq.placement.static`), simulated in the
    ``sglang-static`` row in place of ``placed``.

    ``eplb_same_slots`` gets R&Q's slot count; ``eplb_same_memory`` the slots that R&Q's bytes (per-copy
    precision) buy at the original precision, rounded down to a multiple of G (never below N)."""
    phy2log, log2phy, logcnt = placed
    num_layers, n = logcnt.shape
    num_phy = phy2log.shape[1]
    calib = loads["calibration"]
    total_rq = float(rq_bytes(plan, logcnt, orig, q).sum())
    mem_slots = int(total_rq // float(orig.sum())) // num_gpus * num_gpus
    floor = math.ceil(n / num_gpus) * num_gpus
    methods = {
        "before": trivial_placement(num_layers, n),
        "eplb_same_slots": eplb_rebalance(calib, num_phy, num_groups, num_nodes, num_gpus),
        "eplb_same_memory": eplb_rebalance(calib, max(mem_slots, floor), num_groups, num_nodes, num_gpus),
        "rq": placed,
    }
    slots = {name: int(m[0].shape[1]) for name, m in methods.items()}
    out = {name: {key: device_loads(value, m[1], m[2], num_gpus) for key, value in loads.items()}
           for name, m in methods.items()}
    per_gpu = {name: float(orig.sum()) * math.ceil(slots[name] / num_gpus) for name in methods if name != "rq"}
    table = copy_byte_table(plan, logcnt, orig, q)
    rq_dev = torch.zeros(num_gpus, dtype=torch.float64)
    for li in range(num_layers):  # per-copy precision (copy_byte_table)
        copy_b = torch.zeros(num_phy, dtype=torch.float64)
        copy_slots = log2phy[li, :, :table.shape[-1]]
        copy_b[copy_slots[copy_slots >= 0]] = table[li][copy_slots >= 0]
        rq_dev += copy_b.view(num_gpus, -1).sum(-1)
    per_gpu["rq"] = float(rq_dev.max())
    by_method = {name: dispatch_loads(loads, methods[name][0], num_gpus, num_nodes, layout) for name in DISPATCH_METHODS}
    if static_phy2log is not None:
        by_method["rq"]["sglang-static"] = dispatch_loads(loads, static_phy2log, num_gpus, num_nodes, layout,
                                                          ("sglang-static",))["sglang-static"]
    dispatch = {mode: {name: by_method[name][mode] for name in DISPATCH_METHODS} for mode in DISPATCH_MODES}
    return Simulation(slots, out, per_gpu, float(rq_dev.mean()), mem_slots < floor, dispatch)


def lis_summary(loads: torch.Tensor) -> dict:
    values = device_lis(loads).numpy()
    defined = values[~np.isnan(values)]  # a layer without load has no LIS (docs/spec.md §2)
    return {"device_lis_mean": float(np.mean(defined)) if defined.size else math.nan,
            "device_lis_worst": float(np.max(defined)) if defined.size else math.nan,
            "makespan_ratio": makespan_ratio(loads)}



def recommend(sim: Simulation) -> dict[str, str]:
    """Per engine, the dispatch mode whose R&Q device LIS (mean over layers, calibration loads) is lowest."""
    by_mode = {mode: lis_summary(sim.dispatch[mode]["rq"]["calibration"])["device_lis_mean"] for mode in DISPATCH_MODES}
    return {engine: min(modes, key=lambda m: (by_mode[m], modes.index(m))) for engine, modes in ENGINE_MODES.items()}
