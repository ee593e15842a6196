"""What ``rq place`` and ``rq import-loads`` run: expert-parallel placement of an R&Q plan for multi-GPU
engines with its makespan simulation against DeepSeek EPLB (:func:`place_plan`), and engine load dumps as rq
stats (:func:`import_stats`) (docs/multi-gpu.md). Both raise :class:`~rq.errors.RQError` for user errors
(one line naming the constraint and the fix); the command-line wrappers are in :mod:`rq.cli.placement`.
"""

from __future__ import annotations

import datetime as dt
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from rq import __version__
from rq.atomic import atomic_write_text, staged_dir
from rq.calibrate.stats import CalibrationStats
from rq.errors import RQError
from rq.placement import FILENAMES, FORMATS, SGLANG_STATIC_FILENAME
from rq.placement.diff import diff_document, diff_lines, placement_diff, read_placement
from rq.placement.dispatch import DEFAULT_BATCH_TOKENS
from rq.placement.servers import engine_flags, engine_warnings
from rq.placement.simulate import Layout, recommend, simulate
from rq.placement.formats import check_formats, decoder_layers, model_shape, write_formats, write_sglang
from rq.placement.fit import check_stats, copy_bytes, copy_changes, plan_loads, target_logcnt
from rq.placement.loads import import_loads
from rq.placement.place import _grouped, colocated, place, unavoidable_colocated
from rq.placement.static import balance_static
from rq.placement.report import (dispatch_rows, dispatch_table, layers_table, plot_layers, recommendation_lines,
                                 summary_rows, summary_table)
from rq.plan.schema import load_plan

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


def _check_out_dir(out_dir: Path) -> None:
    """``rq place`` replaces its output folder whole (no half-written placement is ever left); refuse to replace a
    folder that is not an earlier ``rq place`` output."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "placement.json").is_file())):
        raise RQError(f"--out {out_dir} exists and is not an rq place output (no placement.json); rq place replaces its "
                      f"folder whole: choose a new --out")


def place_plan(plan_path: Path, *, devices: int, nodes: int = 1, out_dir: Path = Path("placement"),
               stats_dir: Path | None = None, heldout_stats: Path | None = None, config: Path | None = None,
               groups: int | None = None, slots_per_device: int | None = None, pad: str = "replicate",
               formats: str = ",".join(FORMATS), plots: bool = True, batch_tokens: int = DEFAULT_BATCH_TOKENS,
               echo: Callable[[str], None] | None = print, warn: Callable[[str], None] | None = None,
               previous: Path | None = None) -> dict:
    """Place an R&Q plan's copies on ``devices`` GPUs, write the engine files, ``report.md``, ``placement.json``
    and plots into ``out_dir``, and simulate device balance against EPLB (docs/multi-gpu.md). Every input is
    checked before anything is written, and ``out_dir`` is written whole or not at all. Returns the
    ``placement.json`` document; ``echo`` (None: silent) receives the summary for humans, ``warn`` (default:
    ``echo``) one line per engine file its engine will not use as written (also in ``placement.json``). ``previous``:
    an earlier ``rq place`` output of the same model and devices; the copies each device would load and drop
    (:mod:`rq.placement.diff`) go to ``report.md``, ``placement.json`` (``diff``) and ``echo``."""
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
    prior = read_placement(previous) if previous is not None else None
    if prior is not None and (prior.get("fingerprint") != plan.model.fingerprint or prior.get("devices") != devices):
        raise RQError(f"--previous {previous} places another model or another device count (fingerprint and "
                      f"--devices must match); pass the placement this one replaces")
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
    diff = None if prior is None else diff_document(placement_diff(prior["phy2log"], phy2log, devices), decoder,
                                                    str(previous))
    added, removed = copy_changes(plan, logcnt)
    architecture = plan.model.architecture
    warnings = engine_warnings(wanted, architecture)

    orig, q = copy_bytes(plan, stats)
    layout = Layout(decoder, num_hidden, plan.model.top_k, batch_tokens)
    takes_sglang = "sglang" in wanted and not engine_flags(devices, target.num_phy, n, out_dir, architecture,
                                                           nodes)["sglang"].startswith("none:")
    # SGLang's static dispatch gets the same copies laid out for its static tables (rq.placement.static)
    static_phy = balance_static(loads["calibration"], phy2log, decoder, num_hidden, devices, nodes,
                                node_locked=_grouped(n, nodes, num_groups)) if takes_sglang else None
    sim = simulate(plan, loads, placed, devices, nodes, num_groups, orig, q, layout, static_phy)
    rows = summary_rows(sim, devices)
    modes = dispatch_rows(sim)
    chosen = recommend(sim)
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
    if static_phy is not None:
        notes.append(f"SGLang's static dispatch (--moe-a2a-backend deepep) reads {SGLANG_STATIC_FILENAME}: the same "
                     f"copies, laid out so that the static tables SGLang builds from the layout balance the devices "
                     f"(its row in the dispatch table); every other engine and SGLang's dynamic dispatch read "
                     f"{FILENAMES['sglang']} and the other files.")
    advice = recommendation_lines(modes, chosen, flags)
    report = ["# Expert-parallel placement", "", *[f"- {x}" for x in notes], "",
              "## Model summary (device LIS: max / mean device load per layer; makespan: sum of per-layer max "
              "over sum of per-layer mean)", "", summary_table(rows, load_sets), "",
              "## Device LIS under each engine's dispatch (mean / worst layer)", "",
              dispatch_table(modes, load_sets, chosen), "",
              "## Recommended dispatch per engine (R&Q, calibration loads, mean / worst layer)", "",
              *[f"- {x}" for x in advice], "",
              "## Per layer: device LIS", "", layers_table(sim, decoder, target.num_phy, added, removed, plan_counts),
              "", "## Engine flags", "", *[f"- {k}: `{v}`" for k, v in flags.items()], ""]
    if diff is not None:
        report += ["## Changes against the previous placement", "", *diff_lines(diff), ""]
    if warnings:
        report += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    with staged_dir(out_dir) as tmp:
        written = write_formats(tmp, wanted, phy2log, log2phy, logcnt, decoder, num_hidden, devices)
        if static_phy is not None:
            write_sglang(tmp / SGLANG_STATIC_FILENAME, static_phy, decoder, num_hidden, n)
        files = {k: v.name for k, v in written.items()}
        if static_phy is not None:
            files["sglang-static"] = SGLANG_STATIC_FILENAME
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
            "logcnt": logcnt.tolist(), "files": files, "engine_flags": flags,
            "warnings": warnings, "simulation": rows, "dispatch": {"batch_tokens": batch_tokens, "modes": modes,
                                                                  "recommended": chosen, "advice": advice},
            "plots": [p.name for p in plot_paths], "phy2log": phy2log.tolist(),
            **({"diff": diff} if diff is not None else {}),
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
        echo("\n".join(advice))
        if diff is not None:
            echo("\n".join(diff_lines(diff)))
        echo(f"wrote {', '.join(sorted(files.values()))}, report.md, placement.json"
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
