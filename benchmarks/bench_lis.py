"""Issue 7 on a real model: LIS and accuracy of R&Q against baselines, at equal memory, on the same tokens.

Measured on held-out data of the calibration domain (``heldout_code``) and of another domain
(``heldout_prose``), for the demo checkpoint (or any local checkpoint):

1. LIS vs memory budget (0.75x-1.25x) and vs batch size (1..512 sequences, and streaming decode),
   cumulative and instantaneous (docs/spec.md §2);
2. baselines at equal memory (see :mod:`benchmarks.baselines` for what "equal" means for each):
   no balancing, replicate-only (EPLB-style), R&Q with each importance metric, random plans;
   with perplexity change (bootstrap CI over sequences), mean KL and top-1 agreement (docs/spec.md §9);
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
import time
from dataclasses import asdict, dataclass, field, replace

import torch

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
from rq.plan.planner import PlanOptions, expert_int4_bytes, make_plan
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
    """Perplexity change (%) with a 95 % bootstrap interval over sequences, mean KL, top-1 agreement."""
    a = other.nll.numel()
    tokens = a * other.predicted_per_sequence
    ppl_o = math.exp(float(original.nll[:a].sum()) / tokens)
    ppl_r = math.exp(float(other.nll.sum()) / tokens)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(a, (bootstrap, a), generator=gen)
    diff = (other.nll[idx].sum(-1) - original.nll[:a][idx].sum(-1)) / tokens  # mean NLL change per resample
    changes = 100.0 * (torch.exp(diff) - 1.0)
    return {"ppl_original": ppl_o, "ppl": ppl_r, "ppl_change_pct": 100.0 * (ppl_r / ppl_o - 1.0),
            "ppl_change_ci95": [float(torch.quantile(changes, 0.025)), float(torch.quantile(changes, 0.975))],
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
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


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
    return sum(values) / len(values)


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


def int4_share(counts: list[torch.Tensor], plan) -> float:
    """Share of all assignments (every layer) that the replica rule sends to an INT4 copy under ``plan``
    (``counts``: per layer ``[n, N]``, run as one call)."""
    on_int4 = total = 0
    for layer_counts, layer in zip(counts, plan.layers):
        loads = split_load(layer_counts.sum(0, keepdim=True), torch.tensor(layer.logcnt))[0]
        on_int4 += int(loads[torch.tensor(layer.precision) == 1].sum())
        total += int(loads.sum())
    return on_int4 / total if total else math.nan


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
    """Everything of issue 7 that needs the model. Returns a JSON-able dict (see module docstring)."""
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
    log(f"original passes: " + ", ".join(f"{d} {p.seconds:.1f}s" for d, p in originals.items()))
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
        meta[name] = {"method": method, "budget": budget, "memory": memory_factor(plan),
                      "int4": sum(q for q, _ in counts), "replicas": sum(r for _, r in counts),
                      "copies": [l.logcnt for l in plan.layers],
                      "pred_before": _nanmean([l.lis_before for l in plan.layers if l.lis_before is not None]),
                      "pred_after": _nanmean([l.lis_after for l in plan.layers if l.lis_after is not None]), **extra}

    for b in settings.budgets:
        for metric in IMPORTANCE_METRICS:
            if metric in settings.sweep_metrics or b == settings.headline_budget:
                add(f"rq[{metric}]@{b:g}", make_plan_or_none(stats, budget_factor=b, importance=metric, **opts),
                    f"R&Q ({metric})", b, importance=metric)
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
            acc[d][name]["int4_share"] = int4_share([c[:acc_n] for c in p.counts], plan)
        log(f"  {name}: memory {meta[name]['memory']:.3f}x, code LIS {lis['heldout_code'][name]['cumulative']['reduction']:.3f}x, "
            f"ppl {acc['heldout_code'][name]['ppl_change_pct']:+.3f}% code / {acc['heldout_prose'][name]['ppl_change_pct']:+.3f}% prose")
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
                  "expert_bytes_int4": expert_int4_bytes(stats.layers[0], settings.group_size)},
        "data": {"calibration_main_sequences": main_n, "calibration_main_tokens": stats.calibration.tokens,
                 "calibration_pool": list(pool.shape), **{d: list(v.shape) for d, v in evals.items()},
                 "accuracy_sequences": acc_n},
        "plans": meta, "lis": lis, "accuracy": acc, "streaming": streaming,
        "calibration_sweep": sweep, "prose_oracle": oracle, "importance_vs_frequency": importance_vs_frequency,
        "headline": headline, "timings_s": timings,
    }


# --------------------------------------------------------------------------------------------- plots

GOAL_LIS, PAPER_LIS, GOAL_PPL = 2.0, 1.4, 0.3
COLORS = {"rq": "#4c72b0", "freq": "#dd8452", "eplb": "#55a868", "random": "#8172b3", "none": "#c44e52",
          "gate_mass": "#937860", "contribution": "#da8bc3"}
DOMAIN_TITLE = {"heldout_code": "held-out code (calibration domain)", "heldout_prose": "held-out prose (other domain)"}
DOMAIN_SHORT = {"heldout_code": "code (calib. domain)", "heldout_prose": "prose (other domain)"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _budget_series(res: dict, domain: str, prefix: str, key: str, table: str = "table_cumulative"):
    xs, ys = [], []
    for b in res["settings"]["budgets"]:
        name = f"{prefix}@{b:g}"
        if name in res["lis"][domain]:
            xs.append(res["plans"][name]["memory"] if prefix.startswith("rq") else b)
            ys.append(res["lis"][domain][name][table][key])
    return xs, ys


def plot_budget(res: dict, path) -> None:
    """LIS reduction and perplexity change against memory, every method, both domains."""
    plt = _plt()
    s = res["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(16, 8.5), sharex=True)
    for col, domain in enumerate(DOMAINS):
        ax = axes[0, col]
        for prefix, label, color in (("rq[quant_sensitivity]", "R&Q", COLORS["rq"]),
                                     ("eplb", "replicate-only (EPLB), equal memory", COLORS["eplb"])):
            for table, key, style, what in (("table_cumulative", "reduction", "-o", "cumulative"),
                                            ("table_inst", "inst_reduction", "--s", f"per batch of {s['table_batch']}")):
                xs, ys = _budget_series(res, domain, prefix, key, table)
                ax.plot(xs, ys, style, color=color, label=f"{label}: {what}")
        rand = [res["lis"][domain][n]["table_cumulative"]["reduction"] for n in res["lis"][domain] if n.startswith("random")]
        mem = [res["plans"][n]["memory"] for n in res["lis"][domain] if n.startswith("random")]
        if rand:
            ax.plot(mem, rand, "x", color=COLORS["random"], ms=9, mew=2, label="random plans (same counts), cumulative")
        same = res["lis"][domain].get("eplb_same_copies")
        if same:
            ax.annotate(f"EPLB with R&Q's copy count needs {res['plans']['eplb_same_copies']['memory']:.2f}x memory\n"
                        f"for {same['table_cumulative']['reduction']:.2f}x cumulative",
                        xy=(0.98, 0.03), xycoords="axes fraction", va="bottom", ha="right", fontsize=8,
                        bbox=dict(boxstyle="round", fc="white", ec="0.7"))
        ax.axhline(GOAL_LIS, color="k", ls=":", lw=1, label="goal 2x")
        ax.axhline(PAPER_LIS, color="0.5", ls="-.", lw=1, label="paper: up to 1.4x")
        ax.axhline(1.0, color="0.8", lw=0.8)
        ax.set_title(f"LIS reduction, {DOMAIN_SHORT[domain]}")
        ax.set_ylabel("LIS before / LIS after (model LIS)")
        if col == 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        ax = axes[1, col]
        for metric, color in (("quant_sensitivity", COLORS["rq"]), ("frequency", COLORS["freq"])):
            xs, ys, lo, hi = [], [], [], []
            for b in s["budgets"]:
                name = f"rq[{metric}]@{b:g}"
                if name in res["accuracy"][domain]:
                    a = res["accuracy"][domain][name]
                    xs.append(res["plans"][name]["memory"])
                    ys.append(a["ppl_change_pct"])
                    lo.append(a["ppl_change_pct"] - a["ppl_change_ci95"][0])
                    hi.append(a["ppl_change_ci95"][1] - a["ppl_change_pct"])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="-o", color=color, capsize=3,
                        label=f"R&Q, INT4 chosen by {metric}")
        rand = [(res["plans"][n]["memory"], res["accuracy"][domain][n]["ppl_change_pct"])
                for n in res["accuracy"][domain] if n.startswith("random")]
        if rand:
            ax.plot(*zip(*rand), "x", color=COLORS["random"], ms=9, mew=2, label="random plans")
        ax.plot([min(s["budgets"]), max(s["budgets"])], [0, 0], color=COLORS["eplb"], lw=2,
                label="replicate-only / original (0 by construction)")
        ax.axhspan(-GOAL_PPL, GOAL_PPL, color="0.9", zorder=0, label="goal: |change| <= 0.3 %")
        ax.set_title(f"perplexity change (95% bootstrap CI), {DOMAIN_SHORT[domain]}")
        ax.set_xlabel("expert memory / reference (bf16 accounting)" if s["bytes_per_param"] == 2 else
                      "expert memory / reference")
        ax.set_ylabel("perplexity change (%)")
        if col == 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"R&Q vs baselines against memory budget ({res['model']['architecture']}, "
                 f"{res['model']['layers']} layers x {res['model']['experts']} experts, top-{res['model']['top_k']}; "
                 f"{res['data']['accuracy_sequences']} x {s['seq_len']} tokens per domain)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batch(res: dict, path) -> None:
    """Model LIS against batch size (cumulative and per batch) and in streaming decode."""
    plt = _plt()
    head = res["headline"]
    eplb = f"eplb@{max(res['settings']['budgets']):g}"
    fig, axes = plt.subplots(1, 3, figsize=(17, 6.4), gridspec_kw={"width_ratios": [1, 1, 0.9]})
    for ax, domain in zip(axes, DOMAINS):
        entries = res["lis"][domain]
        sizes = sorted(int(k) for k in entries[head] if k.isdigit())
        get = lambda name, key: [entries[name][str(b)][key] for b in sizes]  # noqa: E731
        ax.plot(sizes, get(head, "inst_before"), "-o", color=COLORS["none"], label="no balancing: per batch (mean)")
        ax.plot(sizes, get(head, "inst_p95_before"), ":", color=COLORS["none"], label="no balancing: per batch (p95)")
        ax.plot(sizes, get(head, "inst_after"), "-o", color=COLORS["rq"],
                label=f"R&Q @ {res['plans'][head]['memory']:.2f}x memory: per batch (mean)")
        ax.plot(sizes, get(head, "inst_p95_after"), ":", color=COLORS["rq"], label="R&Q: per batch (p95)")
        ax.plot(sizes, get(eplb, "inst_after"), "-^", color=COLORS["eplb"],
                label=f"replicate-only @ {res['plans'][eplb]['memory']:.2f}x memory: per batch (mean)")
        ax.axhline(entries[head]["cumulative"]["before"], color=COLORS["none"], ls="--", lw=1,
                   label="no balancing: cumulative")
        ax.axhline(entries[head]["cumulative"]["after"], color=COLORS["rq"], ls="--", lw=1, label="R&Q: cumulative")
        floor = entries[head].get("floor", {})
        fs = [b for b in sizes if str(b) in floor]
        if fs:
            ax.plot(fs, [floor[str(b)] for b in fs], ":", color="0.3", lw=1.5,
                    label="uniform-random assignment to R&Q's copies (noise level)")
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"batch size (sequences of {res['settings']['seq_len']} tokens)")
        ax.set_ylabel("model LIS (mean over MoE layers)")
        ax.set_title(DOMAIN_TITLE[domain])
        ax.set_ylim(bottom=0.9)
    ax = axes[2]
    stream = res["streaming"]
    if stream:
        bs = sorted(int(b) for b in stream)
        ax.plot(bs, [stream[str(b)]["none"]["inst_before"] for b in bs], "-o", color=COLORS["none"],
                label="no balancing")
        ax.plot(bs, [stream[str(b)].get(head, {}).get("inst_after", math.nan) for b in bs], "-o", color=COLORS["rq"],
                label="R&Q (rotating offsets)")
        ax.plot(bs, [stream[str(b)][eplb]["inst_after"] for b in bs], "-^", color=COLORS["eplb"],
                label=f"replicate-only @ {res['plans'][eplb]['memory']:.2f}x")
        ax.plot(bs, [stream[str(b)].get("rq_decode_fit", {}).get("inst_after", math.nan) for b in bs], "--o",
                color=COLORS["rq"], mfc="white", label="copies fitted to these decode steps (in-sample bound)")
        ax.plot(bs, [stream[str(b)].get("floor", {}).get("per_step", math.nan) for b in bs], ":", color="0.3",
                lw=1.5, label="uniform-random assignment to R&Q's copies (noise level)")
        for b in bs:
            if math.isnan(stream[str(b)].get(head, {}).get("inst_after", math.nan)):
                ax.annotate("R&Q per step n/a: T*K < copies", xy=(b, 1.0), xytext=(b * 1.15, 1.3), ha="left",
                            fontsize=8, color=COLORS["rq"], arrowprops=dict(arrowstyle="->", color=COLORS["rq"]))
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.set_ylim(bottom=0.9)
        ax.set_xlabel("concurrent sequences B (tokens per decode step)")
        ax.set_ylabel("model LIS per decode step (mean)")
        ax.set_title(f"streaming decode, code prompts, {res['settings']['stream_steps']} steps")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), title="streaming panel (right)",
                  title_fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.33, 0.01), ncol=2, fontsize=8,
               title="batch panels (left, middle)", title_fontsize=8)
    fig.suptitle("LIS vs batch size: R&Q at the headline budget (memory in bf16 accounting)")
    fig.subplots_adjust(left=0.045, right=0.985, top=0.9, bottom=0.36, wspace=0.22)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importance(res: dict, path) -> None:
    """Finding (ii): accuracy of the INT4 choice by each importance metric vs random, at equal LIS and memory."""
    plt = _plt()
    b = res["settings"]["headline_budget"]
    names = [(f"rq[{m}]@{b:g}", m) for m in IMPORTANCE_METRICS] + \
        [(n, n.split("@")[0]) for n in res["accuracy"]["heldout_code"] if n.startswith("random")]
    names = [(n, label) for n, label in names if n in res["accuracy"]["heldout_code"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, ylabel in ((axes[0], "ppl_change_pct", "perplexity change (%)"), (axes[1], "kl_mean", "mean KL(original || R&Q)")):
        width = 0.38
        for j, domain in enumerate(DOMAINS):
            vals = [res["accuracy"][domain][n][key] for n, _ in names]
            xs = [i + (j - 0.5) * width for i in range(len(names))]
            if key == "ppl_change_pct":
                ci = [res["accuracy"][domain][n]["ppl_change_ci95"] for n, _ in names]
                err = [[v - c[0] for v, c in zip(vals, ci)], [c[1] - v for v, c in zip(vals, ci)]]
                ax.bar(xs, vals, width, yerr=err, capsize=3, label=DOMAIN_TITLE[domain],
                       color=["#4c72b0", "#dd8452"][j])
            else:
                ax.bar(xs, vals, width, label=DOMAIN_TITLE[domain], color=["#4c72b0", "#dd8452"][j])
        ax.set_xticks(range(len(names)), [label for _, label in names], rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="k", lw=0.8)
        if key == "ppl_change_pct":
            ax.axhspan(-GOAL_PPL, GOAL_PPL, color="0.9", zorder=0, label="goal |change| <= 0.3 %")
        ax.legend(fontsize=8)
    head = res["plans"][res["headline"]]
    fig.suptitle(f"Which experts go INT4 (budget {b:g}x: {head['int4']} INT4 primaries, {head['replicas']} INT4 replicas "
                 f"in every variant, so memory and LIS are equal; only accuracy differs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(res: dict, path) -> None:
    """Finding (iii): stability vs calibration-set size and LIS transfer to the other domain."""
    plt = _plt()
    rows = res["calibration_sweep"]
    ns = [r["sequences"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for key, label in (("spearman_load", "load"), ("spearman_gate_mass", "gate mass"),
                       ("spearman_contribution", "contribution"), ("spearman_quant_sensitivity", "INT4 sensitivity")):
        ax.plot(ns, [r[key] for r in rows], "-o", label=f"Spearman of {label} vs largest set")
    ax.plot(ns, [r["replica_overlap"] for r in rows], "-s", color="k", label="replica allocation overlap")
    ax.plot(ns, [r["int4_overlap"] for r in rows], "--s", color="0.4", label="INT4 set overlap")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"calibration sequences (x {res['settings']['seq_len']} tokens)")
    ax.set_ylabel("agreement with the largest set")
    ax.set_title(f"stability vs the largest set ({max(ns)} sequences)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for domain, color in zip(DOMAINS, ("#4c72b0", "#dd8452")):
        ax.plot(ns, [r[f"{domain}_reduction"] for r in rows], "-o", color=color, label=f"{DOMAIN_TITLE[domain]}: cumulative")
        ax.plot(ns, [r[f"{domain}_inst_reduction"] for r in rows], "--s", color=color,
                label=f"{DOMAIN_TITLE[domain]}: per batch of {res['settings']['table_batch']}")
    oracle = res["prose_oracle"]
    ax.axhline(oracle["prose_calibrated"]["reduction"], color="#dd8452", ls=":",
               label="prose-calibrated plan on prose (in-domain bound), cumulative")
    ax.axhline(GOAL_LIS, color="k", ls=":", lw=1)
    ax.axhline(1.0, color="0.8", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"calibration sequences (x {res['settings']['seq_len']} tokens, code)")
    ax.set_ylabel("LIS reduction")
    ax.set_title(f"LIS reduction of the plan on held-out data (budget {res['settings']['headline_budget']:g}x)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(res: dict, out_dir) -> list:
    from pathlib import Path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"lis_vs_budget.png": plot_budget, "lis_vs_batch.png": plot_batch,
             "importance_accuracy.png": plot_importance, "calibration_size.png": plot_calibration}
    for name, fn in paths.items():
        fn(res, out_dir / name)
    return [out_dir / n for n in paths]
