"""R&Q against its baselines on a real model: LIS and accuracy at equal memory, on the same tokens.

Measured on held-out data of the calibration domain (``heldout_code``) and of another domain
(``heldout_prose``), for the demo checkpoint (or any local checkpoint):

1. LIS vs memory budget (0.75x-1.25x) and vs batch size (1..512 sequences, and streaming decode),
   cumulative and instantaneous (docs/spec.md §2);
2. baselines at equal memory (see :mod:`benchmarks.baselines` for what "equal" means for each):
   no balancing, replicate-only (EPLB-style), R&Q with each importance metric, random plans;
   with perplexity change (95 % percentile-bootstrap CI over sequences, ``scipy.stats.bootstrap``), mean KL
   and top-1 agreement (docs/spec.md §9);
3. calibration-set size: stability of loads, importance and the plan, and LIS on both domains.

How each number is obtained: every R&Q-type plan is applied to a fresh copy of the model
(:func:`rq.rqmodel.model.apply_plan`) and run on the evaluation sequences; its own routing (which INT4 experts
can perturb) is recorded and the replica rule maps it to copies (:func:`rq.eval.evaluate.batch_lis`, offsets 0;
streaming: :func:`rq.eval.evaluate.streaming_lis`, offsets rotating). Replicate-only keeps every copy at
original precision, so its routing and outputs are the original model's: its LIS is the replica rule on
the original routing with EPLB's copy counts, its accuracy change is 0 by construction.
Batch size is in sequences of ``seq_len`` tokens, batches are consecutive groups of the (seeded, shuffled)
evaluation sequences.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from scipy import stats as scipy_stats

from benchmarks.baselines import (eplb_logcnt, equal_memory_replicas, memory_factor, plan_counts, random_plan,
                                  sum_stats, with_bytes_per_param)
from rq.models.adapters import load_model
from rq.calibrate.accumulate import calibrate
from rq.models.routing import record_routing
from rq.calibrate.data import batches, load_tokenizer, tokenize_sequences, TokenData
from rq.demo.corpus import load_split
from rq.demo.pipeline import spearman
from rq.errors import RQError
from rq.eval.evaluate import LISPoint, group_calls, sequence_loads, streaming_lis
from rq.core.lis import InstantSummary, lis_value, model_lis
from rq.plan.planner import PlanOptions, expert_int4_bytes, expert_int8_bytes, make_plan
from rq.core.replica import copy_loads, expert_counts, split_load
from rq.rqmodel.model import apply_plan
from rq.calibrate.stats import IMPORTANCE_METRICS, CalibrationStats

DOMAINS = ("heldout_code", "heldout_prose")


@dataclass(frozen=True)
class LISSettings:
    seq_len: int = 128
    calibration_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    calibration_main: int = 128  # sequences behind every plan except the calibration-size sweep
    eval_sequences: int = 512  # per domain, for LIS (batch sweep, streaming prompts)
    accuracy_sequences: int = 128  # the first ones of the evaluation set; every table row uses these
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    table_batch: int = 16  # batch size of the instantaneous-LIS column of the tables
    stream_batches: tuple[int, ...] = (16, 64, 256)
    stream_steps: int = 32
    prompt_len: int = 16
    budgets: tuple[float, ...] = (0.75, 0.875, 1.0, 1.125, 1.25)
    headline_budget: float = 1.0
    sweep_metrics: tuple[str, ...] = ("quant_sensitivity", "frequency")  # accuracy at every budget
    random_seeds: tuple[int, ...] = (0, 1, 2)
    group_size: int = 128
    bytes_per_param: float | None = 2.0  # budget accounting: bf16 originals (None: the tensors' real dtype)
    max_quantized_fraction: float = 0.5
    max_replicas: int = 7
    extra_max_replicas: int | None = 15  # one more R&Q row at the headline budget with this replica cap
    mixed_tolerances: tuple[float, ...] = (0.0, 0.05, 0.15)  # mixed INT4/INT8 plans (exact solver) at every budget
    run_batch: int = 16
    seed: int = 0
    bootstrap: int = 1000
    threads: int = 1  # intra-op threads: on a shared 2-core machine 2 OpenMP threads ran tiny ops 1000x slower

    @staticmethod
    def quick() -> "LISSettings":
        """Seconds on a tiny model; the same code path."""
        return LISSettings(seq_len=32, calibration_sizes=(4, 8), calibration_main=8, eval_sequences=16,
                           accuracy_sequences=8, batch_sizes=(1, 4, 16), table_batch=4, stream_batches=(8,),
                           stream_steps=3, prompt_len=8, budgets=(0.75, 1.0, 1.25), random_seeds=(0,),
                           group_size=64, run_batch=8, bootstrap=100)


# --------------------------------------------------------------------------------------------- data

def eval_split(tokenizer, name: str, n: int, settings: LISSettings) -> torch.Tensor:
    """``[n, seq_len]`` windows of split ``name``, in a seeded random order (so any prefix is a random
    sample of the whole split, not its first files)."""
    data = tokenize_sequences(tokenizer, [load_split(name)], seq_len=settings.seq_len, max_sequences=None,
                              seed=settings.seed, description=f"demo split '{name}'")
    order = torch.randperm(data.sequences.shape[0], generator=torch.Generator().manual_seed(settings.seed))
    return data.sequences[order[:n]]


# --------------------------------------------------------------------------------------------- model passes

@dataclass
class Pass:
    """One model over one evaluation set: routing of every layer and per-sequence accuracy terms."""

    ids: list[torch.Tensor]  # per layer [n, S, K] logical ids
    counts: list[torch.Tensor]  # per layer [n, N] int64 assignments per sequence and logical expert
    nll: torch.Tensor  # [A] float64 summed next-token NLL per accuracy sequence
    kl: torch.Tensor | None  # [A] summed KL(original || this) per sequence (None for the original)
    agree: torch.Tensor | None  # [A] next-token top-1 agreements with the original
    predicted_per_sequence: int
    logprobs: torch.Tensor | None = field(default=None, repr=False)  # [A, S-1, V] float32 (original only)
    seconds: float = 0.0


@torch.no_grad()
def run_pass(model, adapter, layers, sequences: torch.Tensor, run_batch: int, accuracy_n: int,
             reference: Pass | None) -> Pass:
    """Run ``sequences`` through ``model`` ``run_batch`` at a time, recording routing; for the first
    ``accuracy_n`` sequences keep NLL (and, against ``reference``, KL and top-1 agreement)."""
    start = time.perf_counter()
    nll, kl, agree, keep = [], [], [], []
    with record_routing(model, adapter, layers) as recorders:
        for first, batch in zip(range(0, sequences.shape[0], run_batch), batches(sequences, run_batch)):
            logits = adapter.forward_logits(model, batch, torch.ones_like(batch)).float()
            rows = max(0, min(batch.shape[0], accuracy_n - first))
            if rows == 0:
                continue
            logp = torch.log_softmax(logits[:rows, :-1].double(), -1)  # (rows, S-1, V)
            nll.append(-logp.gather(-1, batch[:rows, 1:].unsqueeze(-1)).squeeze(-1).sum(-1))
            if reference is None:
                keep.append(logp.float())
            else:
                ref = reference.logprobs[first:first + rows].double()
                kl.append((ref.exp() * (ref - logp)).sum(-1).sum(-1))
                agree.append((ref.argmax(-1) == logp.argmax(-1)).sum(-1).double())
    n = sequences.shape[0]
    ids = [torch.cat(r.calls).reshape(n, sequences.shape[1], -1) for r in recorders]
    counts = [sequence_loads(i, layer.num_experts) for i, layer in zip(ids, layers)]
    return Pass(ids=ids, counts=counts, nll=torch.cat(nll), kl=torch.cat(kl) if kl else None,
                agree=torch.cat(agree) if agree else None, predicted_per_sequence=sequences.shape[1] - 1,
                logprobs=torch.cat(keep) if keep else None, seconds=time.perf_counter() - start)


def accuracy_summary(original: Pass, other: Pass, bootstrap: int, seed: int) -> dict:
    """Perplexity change (%) with a 95 % bootstrap interval over sequences, mean KL, top-1 agreement.

    The interval is the paired percentile bootstrap: ``bootstrap`` resamples of the sequences (with replacement,
    the same sequences for both models, drawn by ``numpy.random.default_rng(seed)``), the perplexity change of
    each, and their 2.5 / 97.5 percentiles. Sequences, not tokens, are resampled: tokens of one sequence are
    not independent.
    """
    a = other.nll.numel()
    tokens = a * other.predicted_per_sequence
    ppl_o = math.exp(float(original.nll[:a].sum()) / tokens)
    ppl_r = math.exp(float(other.nll.sum()) / tokens)

    def change_pct(nll_other, nll_original, axis=-1):  # perplexity change of one (re)sample of sequences
        return 100.0 * np.expm1((np.sum(nll_other, axis=axis) - np.sum(nll_original, axis=axis)) / tokens)

    # random_state=, not rng= (SciPy >= 1.15 only): the dev extra allows SciPy 1.11
    ci = scipy_stats.bootstrap((other.nll.numpy(), original.nll[:a].numpy()), change_pct, paired=True,
                               vectorized=True, n_resamples=bootstrap, confidence_level=0.95, method="percentile",
                               random_state=np.random.default_rng(seed)).confidence_interval
    return {"ppl_original": ppl_o, "ppl": ppl_r, "ppl_change_pct": 100.0 * (ppl_r / ppl_o - 1.0),
            "ppl_change_ci95": [float(ci.low), float(ci.high)],
            "kl_mean": float(other.kl.sum()) / tokens, "top1_agreement": float(other.agree.sum()) / tokens,
            "tokens": tokens}


def identity_accuracy(original: Pass) -> dict:
    """Accuracy entry of a method whose outputs are the original model's (replicate-only)."""
    tokens = original.nll.numel() * original.predicted_per_sequence
    ppl = math.exp(float(original.nll.sum()) / tokens)
    return {"ppl_original": ppl, "ppl": ppl, "ppl_change_pct": 0.0, "ppl_change_ci95": [0.0, 0.0],
            "kl_mean": 0.0, "top1_agreement": 1.0, "tokens": tokens, "by_construction": True}


# --------------------------------------------------------------------------------------------- LIS

def _nanmean(values) -> float:
    """Mean of the values that exist (NaN marks a layer with no balanceable call); NaN when none does."""
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def summarize(points: list[LISPoint]) -> dict:
    """Model-level LIS of per-layer points: mean over layers (and worst layer), cumulative and instantaneous."""
    before, worst_before = model_lis([p.before for p in points])
    after, worst_after = model_lis([p.after for p in points])
    inst_before = _nanmean([p.inst_before.mean for p in points])
    inst_after = _nanmean([p.inst_after.mean for p in points])
    return {"before": before, "after": after, "reduction": before / after,
            "worst_before": worst_before, "worst_after": worst_after, "worst_reduction": worst_before / worst_after,
            "inst_before": inst_before, "inst_after": inst_after, "inst_reduction": inst_before / inst_after,
            "inst_p95_before": _nanmean([p.inst_before.p95 for p in points]),
            "inst_p95_after": _nanmean([p.inst_after.p95 for p in points]),
            "calls": points[0].inst_before.calls,
            "unbalanceable_before": max(p.inst_before.unbalanceable for p in points),
            "unbalanceable_after": max(p.inst_after.unbalanceable for p in points)}


def sampling_floor(assignments: int, units: list[int], trials: int = 200, seed: int = 0) -> float:
    """Mean over layers of the expected LIS when ``assignments`` land uniformly at random on ``units[l]``
    units (multinomial): what even a perfect-in-expectation balancer shows per call at this call size.
    NaN where a call has fewer assignments than units (docs/spec.md §2: such calls cannot be balanced)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for u in units:
        if assignments < u:
            return math.nan
        idx = torch.randint(u, (trials, assignments), generator=gen)
        counts = torch.zeros(trials, u).scatter_add_(1, idx, torch.ones(trials, assignments))
        values.append(float((counts.amax(1) * u / assignments).mean()))
    return statistics.fmean(values)


def batch_points(before_counts: list[torch.Tensor], after_counts: list[torch.Tensor], logcnts: list[torch.Tensor],
                 batch_size: int) -> dict:
    """Model LIS summary when the evaluation sequences run ``batch_size`` at a time (per layer the same
    :class:`rq.eval.evaluate.LISPoint` as :func:`rq.eval.evaluate.batch_lis`, from per-sequence loads)."""
    points = []
    for before, after, logcnt in zip(before_counts, after_counts, logcnts):
        pre = group_calls(before, batch_size)
        post = split_load(group_calls(after, batch_size), logcnt)
        points.append(LISPoint(lis_value(pre.sum(0)), lis_value(post.sum(0)), InstantSummary.of(pre),
                               InstantSummary.of(post)))
    return summarize(points)


@torch.no_grad()
def decode_ids(model, adapter, layers, prompts: torch.Tensor, steps: int) -> list[list[torch.Tensor]]:
    """Greedy decode of ``prompts [B, p]``; per layer the ``[B, K]`` ids of each decode step (prefill dropped)."""
    with record_routing(model, adapter, layers) as recorders:
        model.generate(prompts, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, use_cache=True,
                       attention_mask=torch.ones_like(prompts), pad_token_id=model.config.pad_token_id or 0)
    return [r.calls[1:] for r in recorders]


def stream_points(step_ids: list[list[torch.Tensor]], logcnts: list[torch.Tensor], num_experts: int) -> dict:
    """Streaming LIS of a copy allocation on given decode routing, offsets rotating per step (docs/spec.md §4)."""
    points = []
    for steps, logcnt in zip(step_ids, logcnts):
        offsets = torch.zeros(num_experts, dtype=torch.int64)
        pre, post = [], []
        for ids in steps:
            counts = expert_counts(ids, num_experts)
            pre.append(counts)
            post.append(copy_loads(ids, logcnt, offsets))
            offsets = offsets + counts
        pre, post = torch.stack(pre), torch.stack(post)
        points.append(LISPoint(lis_value(pre.sum(0)), lis_value(post.sum(0)), InstantSummary.of(pre),
                               InstantSummary.of(post)))
    return summarize(points)


def precision_shares(counts: list[torch.Tensor], plan) -> dict[str, float]:
    """Share of all assignments (every layer) that the replica rule sends to copies of each precision under
    ``plan`` (``counts``: per layer ``[n, N]``, run as one call): ``original_share``, ``int4_share``, ``int8_share``."""
    on = torch.zeros(3, dtype=torch.int64)
    for layer_counts, layer in zip(counts, plan.layers):
        loads = split_load(layer_counts.sum(0, keepdim=True), torch.tensor(layer.logcnt))[0]
        on.index_add_(0, torch.tensor(layer.precision), loads.to(torch.int64))
    total = int(on.sum())
    return {f"{name}_share": int(v) / total if total else math.nan for name, v in zip(("original", "int4", "int8"), on)}


# --------------------------------------------------------------------------------------------- calibration

def calibrate_nested(model, adapter, pool: torch.Tensor, sizes: tuple[int, ...], settings: LISSettings,
                     log) -> dict[int, CalibrationStats]:
    """Stats of the first ``n`` pool sequences for every ``n`` in ``sizes``, from one pass over the pool:
    calibrate disjoint chunks and sum them (every docs/spec.md §3 metric is a sum over assignments)."""
    sizes = sorted(n for n in sizes if n <= pool.shape[0])
    out, parts, done = {}, [], 0
    for n in sizes:
        chunk = TokenData(pool[done:n], f"demo split 'calibration', sequences {done}..{n - 1} of a seeded shuffle")
        parts.append(calibrate(model, adapter, chunk, batch_size=settings.run_batch, group_size=settings.group_size,
                               seed=settings.seed, show_progress=False))
        done = n
        out[n] = sum_stats(parts)
        log(f"  calibrated {n} sequences")
    return out


def mixed_name(budget: float, tolerance: float) -> str:
    """Plan name of a mixed INT4/INT8 plan in the results."""
    return f"rq_mixed@{budget:g}" if tolerance == 0 else f"rq_mixed_tol{tolerance:g}@{budget:g}"


def make_plan_or_none(stats: CalibrationStats, **options):
    try:
        return make_plan(stats, PlanOptions(**options))
    except RQError as err:
        return str(err)


def calibration_sweep(stats_by_n: dict[int, CalibrationStats], settings: LISSettings, originals: dict[str, Pass],
                      num_experts: int) -> list[dict]:
    """Finding (iii): stability of loads / importance / the plan vs calibration-set size, and the LIS each
    plan gives on held-out routing of both domains (the original model's routing: replica counts are all
    that change LIS)."""
    largest = max(stats_by_n)
    ref_stats = stats_by_n[largest]
    opts = dict(budget_factor=settings.headline_budget, max_quantized_fraction=settings.max_quantized_fraction,
                max_replicas=settings.max_replicas)
    plans = {n: make_plan(with_bytes_per_param(s, settings.bytes_per_param), PlanOptions(**opts))
             for n, s in stats_by_n.items()}
    ref_plan = plans[largest]
    rows = []
    for n, stats in sorted(stats_by_n.items()):
        plan = plans[n]
        row = {"sequences": n, "tokens": stats.calibration.tokens}
        for metric in ("load", "gate_mass", "contribution", "quant_sensitivity"):
            row[f"spearman_{metric}"] = _nanmean([spearman(getattr(a, metric), getattr(b, metric))
                                                  for a, b in zip(stats.layers, ref_stats.layers)])
        shared = sum(min(a.replicas, b.replicas) for la, lb in zip(plan.layers, ref_plan.layers)
                     for a, b in zip(la.experts, lb.experts))
        total = sum(e.replicas for layer in ref_plan.layers for e in layer.experts)
        row["replica_overlap"] = shared / total if total else math.nan
        q_ref = {(l.layer, e.expert) for l in ref_plan.layers for e in l.experts if e.precision == "int4"}
        q_now = {(l.layer, e.expert) for l in plan.layers for e in l.experts if e.precision == "int4"}
        row["int4_overlap"] = len(q_ref & q_now) / len(q_ref) if q_ref else math.nan
        logcnts = [torch.tensor(l.logcnt) for l in plan.layers]
        for domain, original in originals.items():
            point = batch_points(original.counts, original.counts, logcnts, original.counts[0].shape[0])
            inst = batch_points(original.counts, original.counts, logcnts, settings.table_batch)
            row[f"{domain}_reduction"] = point["reduction"]
            row[f"{domain}_inst_reduction"] = inst["inst_reduction"]
        rows.append(row)
    return rows


def in_domain_oracle(stats: CalibrationStats, original: Pass, settings: LISSettings, num_experts: int) -> dict:
    """The other-domain limitation, bounded: plan from the prose routing of the first half of the prose
    set (loads only; the INT4 choice does not move LIS) vs the code-calibrated plan, both judged on the
    second half."""
    half = original.counts[0].shape[0] // 2
    prose_loads = [c[:half].sum(0).to(torch.float64) for c in original.counts]
    prose_stats = replace(stats, layers=[replace(s, load=l) for s, l in zip(stats.layers, prose_loads)])
    opts = dict(budget_factor=settings.headline_budget, max_quantized_fraction=settings.max_quantized_fraction,
                max_replicas=settings.max_replicas)
    code_plan = make_plan(with_bytes_per_param(stats, settings.bytes_per_param), PlanOptions(**opts))
    prose_plan = make_plan(with_bytes_per_param(prose_stats, settings.bytes_per_param), PlanOptions(**opts))
    second = [c[half:] for c in original.counts]
    out = {"eval_sequences": second[0].shape[0]}
    for name, plan in (("code_calibrated", code_plan), ("prose_calibrated", prose_plan)):
        logcnts = [torch.tensor(l.logcnt) for l in plan.layers]
        cum = batch_points(second, second, logcnts, second[0].shape[0])
        inst = batch_points(second, second, logcnts, settings.table_batch)
        out[name] = {"reduction": cum["reduction"], "before": cum["before"], "after": cum["after"],
                     "inst_reduction": inst["inst_reduction"]}
    return out


# --------------------------------------------------------------------------------------------- main

def _display_path(path) -> str:
    """``path`` relative to the repository when inside it (reports stay machine-independent)."""
    from pathlib import Path
    path, repo = Path(path).resolve(), Path(__file__).resolve().parents[1]
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)


def _weights_sha256(model_dir) -> str:
    """sha256 over the checkpoint's safetensors files (which checkpoint the numbers belong to)."""
    import hashlib
    from pathlib import Path
    digest = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def run(model_dir, settings: LISSettings, log=print) -> dict:
    """Every measurement that needs the model. Returns a JSON-able dict (see module docstring)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    torch.set_num_threads(settings.threads)
    original, adapter = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    layers = adapter.moe_layers(original)
    num_experts = layers[0].num_experts
    pool = eval_split(tokenizer, "calibration", max(settings.calibration_sizes), settings)
    evals = {d: eval_split(tokenizer, d, settings.eval_sequences, settings) for d in DOMAINS}
    lap("load")
    log(f"data: calibration pool {tuple(pool.shape)}, " + ", ".join(f"{d} {tuple(v.shape)}" for d, v in evals.items()))

    stats_by_n = calibrate_nested(original, adapter, pool, settings.calibration_sizes, settings, log)
    main_n = max(n for n in stats_by_n if n <= settings.calibration_main)
    stats_real = stats_by_n[main_n]
    stats = with_bytes_per_param(stats_real, settings.bytes_per_param)
    lap("calibrate")

    originals = {d: run_pass(original, adapter, layers, seqs, settings.run_batch, settings.accuracy_sequences, None)
                 for d, seqs in evals.items()}
    acc_n = originals[DOMAINS[0]].nll.numel()
    log("original passes: " + ", ".join(f"{d} {p.seconds:.1f}s" for d, p in originals.items()))
    lap("original passes")

    # --- plans -------------------------------------------------------------------------------
    opts = dict(max_quantized_fraction=settings.max_quantized_fraction, max_replicas=settings.max_replicas)
    plans: dict[str, object] = {}
    meta: dict[str, dict] = {}

    def add(name: str, plan, method: str, budget: float, **extra) -> None:
        if isinstance(plan, str):
            meta[name] = {"method": method, "budget": budget, "infeasible": plan}
            return
        plans[name] = plan
        counts = plan_counts(plan)
        codes = [p for layer in plan.layers for p in layer.precision]
        errors = [l.predicted_error for l in plan.layers if l.predicted_error is not None]
        meta[name] = {"method": method, "budget": budget, "memory": memory_factor(plan),
                      "int4": sum(q for q, _ in counts), "replicas": sum(r for _, r in counts),
                      "copies_int4": codes.count(1), "copies_int8": codes.count(2),
                      "predicted_error": sum(errors) if errors else None,
                      "copies": [l.logcnt for l in plan.layers],
                      "pred_before": _nanmean([l.lis_before for l in plan.layers if l.lis_before is not None]),
                      "pred_after": _nanmean([l.lis_after for l in plan.layers if l.lis_after is not None]), **extra}

    for b in settings.budgets:
        for metric in IMPORTANCE_METRICS:
            if metric in settings.sweep_metrics or b == settings.headline_budget:
                add(f"rq[{metric}]@{b:g}", make_plan_or_none(stats, budget_factor=b, importance=metric, **opts),
                    f"R&Q ({metric})", b, importance=metric)
    for b in settings.budgets:
        for tol in settings.mixed_tolerances:
            add(mixed_name(b, tol), make_plan_or_none(stats, budget_factor=b, precisions=("int4", "int8"),
                                                       lis_tolerance=tol, **opts),
                f"R&Q mixed INT4/INT8 (exact solver, LIS tolerance {tol:g})", b, lis_tolerance=tol)
    headline = f"rq[quant_sensitivity]@{settings.headline_budget:g}"
    if headline in plans:
        for seed in settings.random_seeds:
            add(f"random[{seed}]@{settings.headline_budget:g}",
                random_plan(plans[headline], stats, seed, settings.max_replicas), "random INT4 + random replicas",
                settings.headline_budget, seed=seed)
    if settings.extra_max_replicas is not None:
        add(f"rq_cap{settings.extra_max_replicas}@{settings.headline_budget:g}",
            make_plan_or_none(stats, budget_factor=settings.headline_budget, importance="quant_sensitivity",
                              max_quantized_fraction=settings.max_quantized_fraction,
                              max_replicas=settings.extra_max_replicas),
            f"R&Q (quant_sensitivity), up to {settings.extra_max_replicas} replicas per expert",
            settings.headline_budget)
    if settings.bytes_per_param is not None:
        add(f"rq_stored_dtype@{settings.headline_budget:g}",
            make_plan_or_none(stats_real, budget_factor=settings.headline_budget, **opts),
            "R&Q (quant_sensitivity), budget in the checkpoint's stored dtype", settings.headline_budget)

    # copy allocations without INT4 (replicate-only): LIS on the original routing, accuracy = original
    alloc: dict[str, list[torch.Tensor]] = {"none": [torch.ones(num_experts, dtype=torch.int64)] * len(layers)}
    meta["none"] = {"method": "no balancing", "budget": 1.0, "memory": 1.0, "int4": 0, "replicas": 0}
    for b in settings.budgets:
        per_layer = [equal_memory_replicas(b, s.original_bytes) for s in stats.layers]
        alloc[f"eplb@{b:g}"] = [eplb_logcnt(s.load, r) for s, r in zip(stats.layers, per_layer)]
        meta[f"eplb@{b:g}"] = {"method": "replicate-only (EPLB), equal memory", "budget": b,
                               "memory": 1.0 + sum(per_layer) / (num_experts * len(layers)), "int4": 0,
                               "replicas": sum(per_layer), "copies": [c.tolist() for c in alloc[f"eplb@{b:g}"]]}
    if headline in plans:
        per_layer = [r for _, r in plan_counts(plans[headline])]
        alloc["eplb_same_copies"] = [eplb_logcnt(s.load, r) for s, r in zip(stats.layers, per_layer)]
        meta["eplb_same_copies"] = {"method": f"replicate-only (EPLB), as many replicas as R&Q@{settings.headline_budget:g}",
                                    "budget": None, "memory": 1.0 + sum(per_layer) / (num_experts * len(layers)),
                                    "int4": 0, "replicas": sum(per_layer),
                                    "copies": [c.tolist() for c in alloc["eplb_same_copies"]]}
    lap("plan")

    # --- LIS and accuracy ----------------------------------------------------------------------
    lis: dict[str, dict[str, dict]] = {d: {} for d in DOMAINS}
    acc: dict[str, dict[str, dict]] = {d: {} for d in DOMAINS}
    full_sizes = [b for b in settings.batch_sizes if b <= settings.eval_sequences]

    def lis_entry(before: list[torch.Tensor], after: list[torch.Tensor], logcnts, full: bool) -> dict:
        """Batch sweep (full set) or not, plus the table columns on the accuracy subset (same tokens for all)."""
        n = after[0].shape[0]
        out = {str(b): batch_points(before, after, logcnts, b) for b in (full_sizes if full else []) if b <= n}
        out["cumulative"] = batch_points(before, after, logcnts, n)
        sub_b, sub_a = [c[:acc_n] for c in before], [c[:acc_n] for c in after]
        out["table_cumulative"] = batch_points(sub_b, sub_a, logcnts, acc_n)
        out["table_inst"] = batch_points(sub_b, sub_a, logcnts, settings.table_batch)
        return out

    for name, logcnts in alloc.items():
        for d in DOMAINS:
            lis[d][name] = lis_entry(originals[d].counts, originals[d].counts, logcnts, full=True)
            acc[d][name] = identity_accuracy(originals[d])
    lap("LIS replicate-only")

    for name, plan in plans.items():
        full = name.startswith("rq[quant_sensitivity]")
        model = copy.deepcopy(original)
        rq_layers = apply_plan(model, adapter, plan)
        logcnts = [r.logcnt.clone() for r in rq_layers]
        for d in DOMAINS:
            seqs = evals[d] if full else evals[d][:acc_n]
            p = run_pass(model, adapter, layers, seqs, settings.run_batch, acc_n, originals[d])
            before = [c[:p.counts[0].shape[0]] for c in originals[d].counts]
            lis[d][name] = lis_entry(before, p.counts, logcnts, full)
            acc[d][name] = accuracy_summary(originals[d], p, settings.bootstrap, settings.seed)
            acc[d][name].update(precision_shares([c[:acc_n] for c in p.counts], plan))
        log(f"  {name}: memory {meta[name]['memory']:.3f}x, "
            f"code LIS {lis['heldout_code'][name]['cumulative']['reduction']:.3f}x, "
            f"ppl {acc['heldout_code'][name]['ppl_change_pct']:+.3f}% code / "
            f"{acc['heldout_prose'][name]['ppl_change_pct']:+.3f}% prose")
        del model
    if headline in plans:  # per-call sampling floor of the headline plan's copy counts, per batch size
        copies = [sum(l.logcnt) for l in plans[headline].layers]
        floors = {str(b): sampling_floor(b * settings.seq_len * layers[0].top_k, copies)
                  for b in full_sizes if b * settings.seq_len * layers[0].top_k <= 200_000}
        for d in DOMAINS:
            lis[d][headline]["floor"] = floors
    lap("R&Q passes")

    # --- streaming decode ----------------------------------------------------------------------
    streaming: dict[str, dict[str, dict]] = {}
    code = evals[DOMAINS[0]]
    for bsz in settings.stream_batches:
        if bsz > code.shape[0]:
            continue
        prompts = code[:bsz, :settings.prompt_len]
        step_ids = decode_ids(original, adapter, layers, prompts, settings.stream_steps)
        entry = {name: stream_points(step_ids, logcnts, num_experts) for name, logcnts in alloc.items()}
        # in-sample bound: copies planned on these decode steps' own loads (the INT4 choice does not move LIS)
        decode_loads = [torch.stack([expert_counts(i, num_experts) for i in steps]).sum(0).to(torch.float64)
                        for steps in step_ids]
        fitted = make_plan_or_none(replace(stats, layers=[replace(s, load=l) for s, l in zip(stats.layers, decode_loads)]),
                                   budget_factor=settings.headline_budget, **opts)
        if not isinstance(fitted, str):
            entry["rq_decode_fit"] = stream_points(step_ids, [torch.tensor(l.logcnt) for l in fitted.layers],
                                                   num_experts)
        if headline in plans:
            entry["floor"] = {"per_step": sampling_floor(bsz * layers[0].top_k,
                                                         [sum(l.logcnt) for l in plans[headline].layers])}
        for name, plan in plans.items():
            if not name.startswith("rq[quant_sensitivity]"):
                continue
            if bsz != settings.stream_batches[len(settings.stream_batches) // 2] and name != headline:
                continue  # the budget sweep in streaming at the middle batch only
            model = copy.deepcopy(original)
            apply_plan(model, adapter, plan)
            entry[name] = summarize(streaming_lis(original, model, adapter, layers, prompts, settings.stream_steps))
            del model
        streaming[str(bsz)] = entry
        log(f"  streaming B={bsz}: R&Q {entry.get(headline, {}).get('reduction', math.nan):.3f}x cumulative, "
            f"{entry.get(headline, {}).get('inst_reduction', math.nan):.3f}x per step")
    lap("streaming")

    sweep = calibration_sweep(stats_by_n, settings, originals, num_experts)
    oracle = in_domain_oracle(stats_real, originals["heldout_prose"], settings, num_experts)
    importance_vs_frequency = [{"layer": s.index, **{f"spearman_{m}_vs_load": spearman(getattr(s, m), s.load)
                                                     for m in ("gate_mass", "contribution", "quant_sensitivity")}}
                               for s in stats_real.layers]
    lap("calibration sweep")

    return {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "model": {"dir": _display_path(model_dir), "weights_sha256": _weights_sha256(model_dir),
                  "architecture": stats.model.architecture, "layers": len(layers),
                  "experts": num_experts, "top_k": layers[0].top_k, "hidden": layers[0].hidden_size,
                  "intermediate": layers[0].intermediate_size,
                  "stored_dtype": stats_real.model.dtype,
                  "expert_bytes_stored": stats_real.layers[0].original_bytes[0],
                  "expert_bytes_accounted": stats.layers[0].original_bytes[0],
                  "expert_bytes_int4": expert_int4_bytes(stats.layers[0], settings.group_size),
                  "expert_bytes_int8": expert_int8_bytes(stats.layers[0], settings.group_size)},
        "data": {"calibration_main_sequences": main_n, "calibration_main_tokens": stats.calibration.tokens,
                 "calibration_pool": list(pool.shape), **{d: list(v.shape) for d, v in evals.items()},
                 "accuracy_sequences": acc_n},
        "plans": meta, "lis": lis, "accuracy": acc, "streaming": streaming,
        "calibration_sweep": sweep, "prose_oracle": oracle, "importance_vs_frequency": importance_vs_frequency,
        "headline": headline, "timings_s": timings,
    }
