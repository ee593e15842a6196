"""``rq demo``: calibrate -> plan -> evaluate on the committed demo model, and the paper's three findings.

(i)   load imbalance vs batch size (instantaneous and cumulative LIS, before and after R&Q);
(ii)  importance is not frequency: rank correlation of INT4 sensitivity with selection frequency;
(iii) how a plan made on calibration data (code and prose, the two domains the demo serves) holds on
      held-out data of both, in batches and in streaming decode, and across calibration-set sizes.
Everything is measured on this run's data; nothing is tabulated in advance.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rq.models.adapters import load_model
from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import TokenData, load_tokenizer, tokenize_sequences
from rq.demo.corpus import CALIBRATION_SPLITS, demo_checkpoint_dir, load_split
from rq.errors import RQError
from rq.eval.evaluate import EvalReport, batch_lis, evaluate, trace_batches
from rq.core.lis import model_lis
from rq.plan.planner import PlanOptions, make_plan
from rq.progress import console
from rq.rqmodel.model import apply_plan
from rq.atomic import atomic_write_text, check_out_dir
from rq.plan.schema import save_plan


@dataclass(frozen=True)
class DemoSettings:
    seq_len: int = 128
    calibration_sequences: int = 128
    eval_sequences: int = 256
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64, 256)
    stream_batch: int = 32
    stream_steps: int = 32
    generate: int = 33  # > 0: calibration also records the model's own generations, and the plan hedges (§6)
    calibration_sizes: tuple[int, ...] = (8, 32, 128)
    prose_sequences: int = 128
    group_size: int = 128
    budget: float = 1.0
    seed: int = 0

    @staticmethod
    def quick() -> "DemoSettings":
        """Reduced mode for tests and smoke runs (seconds, same code path)."""
        return DemoSettings(seq_len=64, calibration_sequences=16, eval_sequences=16, batch_sizes=(1, 4, 16),
                            stream_batch=4, stream_steps=3, calibration_sizes=(4, 16), prose_sequences=16)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(x.double(), stable=True)
        r = torch.empty_like(order, dtype=torch.float64)
        r[order] = torch.arange(x.numel(), dtype=torch.float64)
        for value in x.unique():  # average ranks over ties
            tie = x == value
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _sequences(tokenizer, splits: str | tuple[str, ...], n: int, settings: DemoSettings) -> TokenData:
    """``n`` seeded sequences of the committed split(s), in the splits' order: with several (one per domain)
    the traffic windows of calibration stay within a domain."""
    splits = (splits,) if isinstance(splits, str) else splits
    return tokenize_sequences(tokenizer, [load_split(s) for s in splits], seq_len=settings.seq_len,
                              max_sequences=n, seed=settings.seed,
                              description=" + ".join(f"demo split '{s}'" for s in splits))


def run_demo(out_dir: Path, settings: DemoSettings = DemoSettings(), model_dir: Path | None = None,
             show_progress: bool = True) -> dict:
    """Run the whole demo, write plan/stats/JSON/PNGs into ``out_dir`` and return the summary dict."""
    from rq.demo.plots import write_plots

    start = time.perf_counter()
    model_dir = Path(model_dir or demo_checkpoint_dir())
    if not (model_dir / "config.json").is_file():
        raise RQError(f"demo checkpoint not found at {model_dir}; reinstall rq or rebuild it with "
                      f"`python -m rq.demo.train --out {model_dir}`")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    original, adapter = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    calib = _sequences(tokenizer, CALIBRATION_SPLITS, settings.calibration_sequences, settings)
    heldout = {"heldout_code": _sequences(tokenizer, "heldout_code", settings.eval_sequences, settings),
               "heldout_prose": _sequences(tokenizer, "heldout_prose", settings.prose_sequences, settings)}

    console.print(f"[bold]1/4 calibrate[/] {model_dir.name}: {calib.description}")
    stats = calibrate(original, adapter, calib, group_size=settings.group_size, seed=settings.seed,
                      generate=settings.generate, show_progress=show_progress)
    stats.save(out_dir / "stats")
    console.print(f"[bold]2/4 plan[/] budget {settings.budget:g}x")
    plan = make_plan(stats, PlanOptions(budget_factor=settings.budget))
    save_plan(plan, out_dir / "plan.json")
    rq_model, _ = load_model(model_dir)
    apply_plan(rq_model, adapter, plan)

    console.print("[bold]3/4 evaluate[/] batch sizes, streaming, accuracy on held-out code and prose")
    reports: dict[str, EvalReport] = {}
    for name, data in heldout.items():
        reports[name] = evaluate(original, rq_model, adapter, data.sequences, batch_sizes=list(settings.batch_sizes),
                                 stream_batch=settings.stream_batch,
                                 stream_steps=settings.stream_steps,
                                 show_progress=show_progress)
    reports["calibration"] = evaluate(original, rq_model, adapter, calib.sequences,
                                      batch_sizes=[max(settings.batch_sizes)], stream_steps=0,
                                      show_progress=show_progress)

    console.print("[bold]4/4 findings[/] importance vs frequency, calibration-set size")
    importance = [{"layer": s.index, "load": s.load.tolist(), "quant_sensitivity": s.quant_sensitivity.tolist(),
                   "gate_mass": s.gate_mass.tolist(), "contribution": s.contribution.tolist(),
                   "spearman_sensitivity_vs_frequency": spearman(s.quant_sensitivity, s.load),
                   "spearman_contribution_vs_frequency": spearman(s.contribution, s.load)} for s in stats.layers]
    sweep = calibration_size_sweep(original, adapter, tokenizer, heldout, settings, show_progress, stats)

    summary = {
        "model": str(model_dir), "settings": settings.__dict__, "seconds": None,
        "plan": {"planned_bytes": plan.budget.planned_bytes, "reference_bytes": plan.budget.reference_bytes,
                 "layers": [{"layer": l.layer, "int4": sum(e.precision == "int4" for e in l.experts),
                             "replicas": sum(e.replicas for e in l.experts), "copies": l.logcnt,
                             "lis_before_pred": l.lis_before, "lis_after_pred": l.lis_after} for l in plan.layers]},
        "reports": {name: r.to_json() for name, r in reports.items()},
        "importance": importance, "calibration_sweep": sweep,
    }
    write_plots(out_dir, summary, stats, plan)
    summary["seconds"] = time.perf_counter() - start
    atomic_write_text(out_dir / "demo.json", json.dumps(summary, indent=2, default=float) + "\n")
    print_summary(summary, reports)
    console.print(f"done in {summary['seconds']:.0f} s; plots and numbers in {out_dir}/")
    return summary


def calibration_size_sweep(original, adapter, tokenizer, heldout: dict[str, TokenData], settings: DemoSettings,
                           show_progress: bool, full_stats=None) -> list[dict]:
    """Finding (iii): plan from the first n calibration sequences, for several n; report the plan's LIS on
    held-out data of both domains (the replica rule applied to the original model's held-out routing at
    the largest batch size: routing is the router's, so this is the load split the plan produces), and
    how much of the largest plan's replica allocation it shares. ``full_stats`` (the main run's, on the
    same first ``calibration_sequences`` sequences) is reused rather than recomputed."""
    layers = adapter.moe_layers(original)
    traces = {name: trace_batches(original, adapter, layers, data.sequences, 8, f"routing {name}", show_progress,
                                  keep_logits=False)[0]
              for name, data in heldout.items()}
    largest = max(settings.calibration_sizes)
    pool = _sequences(tokenizer, CALIBRATION_SPLITS, largest, settings)
    # the first n of a shuffled pool, so a small set samples every file rather than the first few; kept in
    # the pool's order, so its windows stay within a domain as the main run's do
    order = torch.randperm(len(pool.sequences), generator=torch.Generator().manual_seed(settings.seed))
    rows, plans = [], {}
    for n in settings.calibration_sizes:
        subset = TokenData(pool.sequences[order[:n].sort().values], f"{n} calibration sequences")
        if full_stats is not None and n == settings.calibration_sequences:
            stats = full_stats
        else:
            stats = calibrate(original, adapter, subset, group_size=settings.group_size, generate=settings.generate,
                              show_progress=False)
        plan = make_plan(stats, PlanOptions(budget_factor=settings.budget))
        plans[n] = plan
        row = {"sequences": n, "tokens": subset.tokens}
        for name, trace in traces.items():
            points = [batch_lis(ids, ids, layer.num_experts, torch.tensor(lp.logcnt), max(settings.batch_sizes))
                      for ids, layer, lp in zip(trace, layers, plan.layers)]
            row[f"{name}_before"] = model_lis([p.before for p in points])[0]
            row[f"{name}_after"] = model_lis([p.after for p in points])[0]
        rows.append(row)
    reference = plans[largest]
    for row in rows:
        plan = plans[row["sequences"]]
        shared = sum(min(a.replicas, b.replicas) for la, lb in zip(plan.layers, reference.layers)
                     for a, b in zip(la.experts, lb.experts))
        total = sum(e.replicas for layer in reference.layers for e in layer.experts)
        row["replica_overlap_with_largest"] = shared / total if total else float("nan")
    return rows


def print_summary(summary: dict, reports: dict[str, EvalReport]) -> None:
    from rich.console import Console

    from rq.demo.tables import demo_tables

    stdout = Console(width=None if sys.stdout.isatty() else 130)
    for table in demo_tables(summary, reports):
        stdout.print(table)
