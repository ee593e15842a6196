"""What ``rq place`` and ``rq import-loads`` run: expert-parallel placement of an R&Q plan for multi-GPU
engines with its makespan simulation against DeepSeek EPLB (:func:`place_plan`), and engine load dumps as rq
stats (:func:`import_stats`) (docs/multi-gpu.md). Both raise :class:`~rq.errors.RQError` for user errors
(one line naming the constraint and the fix); the command-line wrappers are in :mod:`rq.cli.placement`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rq import __version__
from rq.atomic import atomic_write_text, staged_dir
from rq.calibrate.stats import CalibrationStats
from rq.errors import RQError
from rq.placement import FILENAMES, FORMATS
from rq.placement.dispatch import DEFAULT_BATCH_TOKENS, DISPATCH_MODES, ENGINE_MODES, sglang_static_table
from rq.placement.dispatch import device_loads as dispatch_device_loads
from rq.placement.servers import engine_flags, engine_warnings
from rq.placement.formats import DTYPE_BYTES, check_formats, decoder_layers, model_shape, sglang_rows, write_formats
from rq.placement.loads import import_loads
from rq.placement.place import (colocated, device_lis, device_loads, eplb_rebalance, fit_logcnt, makespan_ratio, place,
                                trivial_placement, unavoidable_colocated)
from rq.placement.report import METHOD_LABELS, METHODS, dispatch_table, layers_table, plot_layers, summary_table
from rq.plan.planner import expert_int4_bytes
from rq.plan.schema import Plan, load_plan

PLACEMENT_VERSION = 1


@contextmanager
def single_thread():
    """Run small-tensor work on one intra-op thread: thousands of tiny torch ops are faster without the
    thread pool, and on a busy machine a pool thread waiting for a core costs milliseconds per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- inputs

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


# ----------------------------------------------------------------------------- simulation

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
                   layout: Layout) -> dict[str, dict[str, torch.Tensor]]:
    """``{mode: {load set: [L, G]}}`` device loads of one placement under every engine's dispatch rule."""
    n = loads["calibration"].shape[1]
    tables = sglang_static_table(sglang_rows(phy2log, layout.decoder, layout.num_hidden, n), num_gpus,
                                 num_nodes)[:, layout.decoder]
    return {mode: {key: dispatch_device_loads(mode, value, phy2log, num_gpus, top_k=layout.top_k,
                                              batch_tokens=layout.batch_tokens, static_tables=tables)
                   for key, value in loads.items()} for mode in DISPATCH_MODES}


def simulate(plan: Plan, loads: dict[str, torch.Tensor], placed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             num_gpus: int, num_nodes: int, num_groups: int, orig: torch.Tensor, q: torch.Tensor,
             layout: Layout) -> Simulation:
    """Device loads of the four methods for each load set (``{"calibration": [L, N], "held-out": ...}``).

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
    dispatch = {mode: {name: by_method[name][mode] for name in DISPATCH_METHODS} for mode in DISPATCH_MODES}
    return Simulation(slots, out, per_gpu, float(rq_dev.mean()), mem_slots < floor, dispatch)


def _lis_summary(loads: torch.Tensor) -> dict:
    values = device_lis(loads).numpy()
    defined = values[~np.isnan(values)]  # a layer without load has no LIS (docs/spec.md §2)
    return {"device_lis_mean": float(np.mean(defined)) if defined.size else math.nan,
            "device_lis_worst": float(np.max(defined)) if defined.size else math.nan,
            "makespan_ratio": makespan_ratio(loads)}


def dispatch_rows(sim: Simulation) -> list[dict]:
    """One row per dispatch mode: device LIS of R&Q's and EPLB's placement (same slots) per load set."""
    return [{"mode": mode, **{name: {key: _lis_summary(v) for key, v in sim.dispatch[mode][name].items()}
                              for name in DISPATCH_METHODS}} for mode in DISPATCH_MODES]


def recommend(rows: list[dict]) -> dict[str, str]:
    """Per engine, the dispatch mode whose R&Q device LIS (mean over layers, calibration loads) is lowest."""
    by_mode = {r["mode"]: r["rq"]["calibration"]["device_lis_mean"] for r in rows}
    return {engine: min(modes, key=lambda m: (by_mode[m], modes.index(m))) for engine, modes in ENGINE_MODES.items()}


def summary_rows(sim: Simulation, num_gpus: int) -> list[dict]:
    rows = []
    for name in METHODS:
        mean = sim.bytes_per_gpu_mean if name == "rq" else sim.bytes_per_gpu[name]
        row = {"method": name, "label": METHOD_LABELS[name], "slots": sim.slots[name],
               "slots_per_gpu": sim.slots[name] / num_gpus, "expert_bytes_per_gpu": sim.bytes_per_gpu[name],
               "expert_bytes_per_gpu_mean": mean}
        for key, loads in sim.loads[name].items():
            row[key] = _lis_summary(loads)
        rows.append(row)
    return rows


def _check_out_dir(out_dir: Path) -> None:
    """``rq place`` replaces its output folder whole (no half-written placement is ever left); refuse to replace a
    folder that is not an earlier ``rq place`` output."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "placement.json").is_file())):
        raise RQError(f"--out {out_dir} exists and is not an rq place output (no placement.json); rq place replaces its "
                      f"folder whole: choose a new --out")


def place_plan(plan_path: Path, devices: int, nodes: int = 1, out_dir: Path = Path("placement"),
               stats_dir: Path | None = None, heldout_stats: Path | None = None, config: Path | None = None,
               groups: int | None = None, slots_per_device: int | None = None, pad: str = "replicate",
               formats: str = ",".join(FORMATS), plots: bool = True, batch_tokens: int = DEFAULT_BATCH_TOKENS,
               echo: Callable[[str], None] | None = print, warn: Callable[[str], None] | None = None) -> dict:
    """Place an R&Q plan's copies on ``devices`` GPUs, write the engine files, ``report.md``, ``placement.json``
    and plots into ``out_dir``, and simulate device balance against EPLB (docs/multi-gpu.md). Every input is
    checked before anything is written, and ``out_dir`` is written whole or not at all. Returns the
    ``placement.json`` document; ``echo`` (None: silent) receives the summary for humans, ``warn`` (default:
    ``echo``) one line per engine file its engine will not use as written (also in ``placement.json``)."""
    if devices < 1 or nodes < 1 or devices % nodes:
        raise RQError(f"--devices {devices} must be a positive multiple of --nodes {nodes} (equal devices per node)")
    if batch_tokens < 1:
        raise RQError(f"--batch-tokens {batch_tokens} must be >= 1 (tokens of one forward pass on one rank)")
    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    check_formats(wanted)
    plan_path, out_dir = Path(plan_path), Path(out_dir)
    _check_out_dir(out_dir)
    plan = load_plan(plan_path)
    stats = CalibrationStats.load(stats_dir) if stats_dir is not None else None
    loads = {"calibration": plan_loads(plan, stats)}
    if heldout_stats is not None:
        held = CalibrationStats.load(heldout_stats)
        check_stats(plan, held, "held-out stats")
        loads["held-out"] = torch.stack([s.load for s in held.layers]).round().to(torch.int64)
    shape = model_shape(config) if config is not None else None
    decoder = decoder_layers(plan)
    num_hidden = shape.num_hidden_layers if shape is not None else max(decoder) + 1
    if shape is not None and shape.num_experts != plan.model.num_experts:
        raise RQError(f"{config} has {shape.num_experts} experts, the plan {plan.model.num_experts}: not this model")
    num_groups = groups if groups is not None else (shape.num_groups if shape is not None else 1)
    n = plan.model.num_experts
    if num_groups < 1 or n % num_groups:
        raise RQError(f"--groups {num_groups} must divide the {n} experts")

    target = target_logcnt(plan, loads["calibration"], devices, slots_per_device, pad)
    original = torch.tensor([[e.precision == "original" for e in layer.experts] for layer in plan.layers])
    placed = place(loads["calibration"], target.logcnt, devices, nodes, num_groups, original)
    phy2log, log2phy, logcnt = placed
    added, removed = copy_changes(plan, logcnt)
    architecture = plan.model.architecture
    warnings = engine_warnings(wanted, architecture)

    orig, q = copy_bytes(plan, stats)
    layout = Layout(decoder, num_hidden, plan.model.top_k, batch_tokens)
    sim = simulate(plan, loads, placed, devices, nodes, num_groups, orig, q, layout)
    rows = summary_rows(sim, devices)
    modes = dispatch_rows(sim)
    chosen = recommend(modes)
    load_sets = list(loads)
    plan_counts = [sum(layer.logcnt) for layer in plan.layers]
    colo, unavoidable = colocated(phy2log, devices), sum(unavoidable_colocated(c, devices) for c in logcnt)
    notes = [
        f"{n} experts, {len(plan.layers)} MoE layers, {devices} devices on {nodes} node(s), "
        f"router groups {num_groups}.",
        f"Placement: P = {target.num_phy} slots ({target.num_phy // devices} per device, "
        f"{target.num_phy - n} redundant); "
        f"plan copies per layer {min(plan_counts)}..{max(plan_counts)}, placed with +{sum(added)} / "
        f"-{sum(removed)} copies in all.",
        f"Copies sharing a device with a copy of the same expert: {colo} (unavoidable: {unavoidable}).",
        "Engines store every copy at one precision: the R&Q row's memory assumes per-copy precision (INT4 replicas) "
        "as rq's runtime executes it; in an engine serving bf16, R&Q's slots cost the EPLB-same-slots memory.",
    ]
    if sim.same_memory_clipped:
        notes.append("EPLB at the same memory would have fewer slots than experts; it is given one slot per expert.")
    flags = engine_flags(devices, target.num_phy, n, out_dir, architecture, nodes,
                         chosen["sglang"].removeprefix("sglang-"))
    other = "static" if chosen["sglang"] == "sglang-dynamic" else "dynamic"
    if not flags["sglang"].startswith("none:"):
        flags["sglang-alternative"] = engine_flags(devices, target.num_phy, n, out_dir, architecture, nodes,
                                                   other)["sglang"]
    notes.append(f"Dispatch (tokens per forward pass and rank: {batch_tokens}): SGLang is given "
                 f"{chosen['sglang'].removeprefix('sglang-')} dispatch, the mode whose device LIS is lower for this "
                 f"placement (the other one's flags: engine_flags.sglang-alternative).")
    report = ["# Expert-parallel placement", "", *[f"- {x}" for x in notes], "",
              "## Model summary (device LIS: max / mean device load per layer; makespan: sum of per-layer max "
              "over sum of per-layer mean)", "", summary_table(rows, load_sets), "",
              "## Device LIS under each engine's dispatch (mean / worst layer)", "",
              dispatch_table(modes, load_sets, chosen), "",
              "## Per layer: device LIS", "", layers_table(sim, decoder, target.num_phy, added, removed, plan_counts),
              "", "## Engine flags", "", *[f"- {k}: `{v}`" for k, v in flags.items()], ""]
    if warnings:
        report += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    with staged_dir(out_dir) as tmp:
        written = write_formats(tmp, wanted, phy2log, log2phy, logcnt, decoder, num_hidden, devices)
        atomic_write_text(tmp / "report.md", "\n".join(report))
        plot_paths = plot_layers(sim, plan, decoder, devices, tmp / "plots") if plots else []
        manifest = {
            "format": "rq-placement", "version": PLACEMENT_VERSION, "tool_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(), "plan": str(plan_path),
            "fingerprint": plan.model.fingerprint, "architecture": architecture, "devices": devices, "nodes": nodes,
            "groups": num_groups, "num_logical_experts": n, "num_physical_experts": target.num_phy,
            "num_redundant_experts": target.num_phy - n, "slots_per_device": target.num_phy // devices,
            "decoder_layers": decoder, "num_hidden_layers": num_hidden, "plan_copies": plan_counts,
            "copies_added": added, "copies_removed": removed, "colocated": colo,
            "logcnt": logcnt.tolist(), "files": {k: v.name for k, v in written.items()}, "engine_flags": flags,
            "warnings": warnings, "simulation": rows, "dispatch": {"batch_tokens": batch_tokens, "modes": modes,
                                                                  "recommended": chosen},
            "plots": [p.name for p in plot_paths],
        }
        atomic_write_text(tmp / "placement.json", json.dumps(manifest, indent=1, default=float) + "\n")
    warn = warn or echo
    if warn is not None:
        for line in warnings:
            warn(f"warning: {line}")
    if echo is not None:
        echo("\n".join(notes))
        echo(summary_table(rows, load_sets))
        echo(dispatch_table(modes, load_sets, chosen))
        echo(f"wrote {', '.join(sorted(FILENAMES[f] for f in written))}, report.md, placement.json"
             + (f" and {len(plot_paths)} plots" if plot_paths else "") + f" to {out_dir}")
    return manifest


def import_stats(engine: str, inputs: list[Path], config: Path, out: Path, group_size: int = 128,
                 placement: Path | None = None) -> CalibrationStats:
    """Per-expert loads recorded by a serving engine -> rq stats in ``out`` (importance = frequency). ``placement``:
    the TensorRT-LLM load balancer YAML whose slots the statistics count."""
    if group_size not in (64, 128):
        raise RQError(f"--group-size must be 64 or 128, got {group_size}")
    with single_thread():
        stats = import_loads(engine, inputs, config, group_size, placement)
    stats.save(out)
    return stats
