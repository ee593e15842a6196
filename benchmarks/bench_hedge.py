"""Hedged plans on the demo: does a code-calibrated plan stay no worse than no balancing on traffic it was not
fitted to (streaming decode from prose prompts), and what does hedging cost on code?

    python -m benchmarks.bench_hedge --json benchmarks/plots/hedge.json

One calibration of the demo model on its calibration split (code, 128 x 128 tokens, the demo's), recording the
traffic windows (16 sequences each) and the model's own greedy generation (33 new tokens from 16-token prompts,
8 sequences per window; ``rq calibrate``'s default). Two plans at budget 1.0 from the same stats: the greedy fitted
to the sum (``--no-hedge``) and the hedged plan (worst window, docs/spec.md §6), which is the default for stats
with generations. Each is evaluated as ``rq eval --sequences 64 --stream-batch 32``
would (256-token sequences, 32 decode steps) on held-out prose and held-out code: per-layer cumulative LIS with
no balancing and with the plan, batch 64 and streaming, and perplexity. Every number is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from benchmarks.markdown import fmt, table


def run(args) -> dict:
    import torch

    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.demo import corpus
    from rq.eval.evaluate import evaluate
    from rq.models.adapters import load_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.rqmodel.model import apply_plan

    torch.manual_seed(0)
    demo = corpus.demo_checkpoint_dir()
    model, adapter = load_model(demo)
    tokenizer = load_tokenizer(demo)
    calib = load_token_data(tokenizer, corpus.split_path("calibration"), seq_len=128, max_sequences=128)
    stats = calibrate(model, adapter, calib, show_progress=False, window=16, generate=args.generate,
                      generate_window=8, prompt_len=16)
    plans = {"fitted (--no-hedge)": make_plan(stats, PlanOptions(hedge=False)),
             "hedged (default)": make_plan(stats, PlanOptions())}
    assert plans["hedged (default)"].options.get("hedge"), "stats with generations plan hedged by default"
    data = {split: load_token_data(tokenizer, corpus.split_path(split), seq_len=256, max_sequences=args.sequences)
            for split in ("heldout_prose", "heldout_code")}
    result = {"machine": args.machine, "python": platform.python_version(), "generate": args.generate,
              "sequences": args.sequences, "stream_batch": 32, "stream_steps": 32, "plans": {}}
    for name, plan in plans.items():
        rq_model, _ = load_model(demo)
        apply_plan(rq_model, adapter, plan)
        entry = {"planned_bytes": plan.budget.planned_bytes, "reference_bytes": plan.budget.reference_bytes,
                 "copies": [sum(layer.logcnt) for layer in plan.layers],
                 "int4_primaries": [sum(e.precision == "int4" for e in layer.experts) for layer in plan.layers]}
        for split, tokens in data.items():
            report = evaluate(model, rq_model, adapter, tokens.sequences, batch_sizes=[64], stream_batch=32,
                              stream_steps=32, show_progress=False)
            entry[split] = {
                "batch64": [[p.before, p.after] for p in report.batch[64]],
                "streaming": [[p.before, p.after] for p in report.streaming],
                "ppl_change_pct": report.accuracy.ppl_change_pct, "losses": report.losses()}
        result["plans"][name] = entry
    return result


def markdown(result: dict) -> str:
    rows = []
    for name, entry in result["plans"].items():
        for split in ("heldout_prose", "heldout_code"):
            for mode in ("streaming", "batch64"):
                pairs = entry[split][mode]
                before = sum(b for b, _ in pairs) / len(pairs)
                after = sum(a for _, a in pairs) / len(pairs)
                layers = " / ".join(f"{fmt(b)}->{fmt(a)}" for b, a in pairs)
                worse = sum(a > b for b, a in pairs)
                rows.append([name, split.removeprefix("heldout_"), mode, f"{fmt(before)} -> {fmt(after)}",
                             f"{before / after:.2f}x", layers, str(worse),
                             f"{entry[split]['ppl_change_pct']:+.2f} %"])
    head = ["plan", "data", "mode", "model LIS", "reduction", "per layer (none -> plan)", "layers worse",
            "ppl change"]
    return table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--generate", type=int, default=33)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--machine", default="2-core CPU, shared")
    args = parser.parse_args()
    result = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
