"""Hedged plans on the demo: is a plan no worse than no balancing on streaming decode from prose prompts, in every
layer, and what does hedging cost on code? Calibrated on code only, and on both domains as ``rq demo`` does.

    python -m benchmarks.bench_hedge --json benchmarks/plots/hedge.json --plot benchmarks/plots/hedge.png

Per calibration set and seed: one calibration of the demo model, 128 x 128 tokens (``rq demo``'s size) drawn with
the seed from ``code`` (the ``calibration`` split) or ``both`` (``calibration`` then ``calibration_prose``, the
demo's default), recording the traffic windows (16 sequences each) and the model's own greedy generation (33 new
tokens from 16-token prompts, 8 sequences per window). Two plans at budget 1.0 from the same stats: the greedy
fitted to the sum (``--no-hedge``) and the hedged plan (worst window, docs/spec.md §6), the default for stats with
generations. Each is evaluated as ``rq eval --sequences 64 --stream-batch 32 --seed S`` would (256-token
sequences, 32 decode steps), for every held-out seed, on held-out prose and code: per-layer cumulative LIS with no
balancing and with the plan, batch 64 and streaming, and perplexity. Every number is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from benchmarks.markdown import fmt, table

CALIBRATIONS = {"code": ("calibration",), "both": ("calibration", "calibration_prose")}
SPLITS = ("heldout_prose", "heldout_code")


def _evaluate_plans(model, adapter, demo, stats, heldout: dict) -> dict:
    from rq.eval.evaluate import evaluate
    from rq.models.adapters import load_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.rqmodel.model import apply_plan

    plans = {"fitted (--no-hedge)": make_plan(stats, PlanOptions(hedge=False)),
             "hedged (default)": make_plan(stats, PlanOptions())}
    assert plans["hedged (default)"].options.get("hedge"), "stats with generations plan hedged by default"
    out = {}
    for name, plan in plans.items():
        rq_model, _ = load_model(demo)
        apply_plan(rq_model, adapter, plan)
        entry = {"planned_bytes": plan.budget.planned_bytes, "reference_bytes": plan.budget.reference_bytes,
                 "copies": [sum(layer.logcnt) for layer in plan.layers],
                 "int4_primaries": [sum(e.precision == "int4" for e in layer.experts) for layer in plan.layers]}
        for key, tokens in heldout.items():
            report = evaluate(model, rq_model, adapter, tokens.sequences, batch_sizes=[64], stream_batch=32,
                              stream_steps=32, show_progress=False)
            entry[key] = {
                "batch64": [[p.before, p.after] for p in report.batch[64]],
                "streaming": [[p.before, p.after] for p in report.streaming],
                "ppl_change_pct": report.accuracy.ppl_change_pct, "losses": report.losses()}
        out[name] = entry
    return out


def run(args) -> dict:
    import torch
    from rich.progress import track

    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.demo import corpus
    from rq.models.adapters import load_model

    torch.manual_seed(0)
    demo = corpus.demo_checkpoint_dir()
    model, adapter = load_model(demo)
    tokenizer = load_tokenizer(demo)
    heldout = {f"{split}@{seed}": load_token_data(tokenizer, corpus.split_path(split), seq_len=256,
                                                  max_sequences=args.sequences, seed=seed)
               for split in SPLITS for seed in args.heldout_seeds}
    result = {"machine": args.machine, "python": platform.python_version(), "generate": args.generate,
              "sequences": args.sequences, "stream_batch": 32, "stream_steps": 32,
              "heldout_seeds": args.heldout_seeds, "runs": []}
    jobs = [(c, s) for c in args.calibrations for s in args.seeds]
    for calibration, seed in track(jobs, description="calibrate, plan, evaluate"):
        calib = load_token_data(tokenizer, [corpus.split_path(s) for s in CALIBRATIONS[calibration]], seq_len=128,
                                max_sequences=128, seed=seed)
        stats = calibrate(model, adapter, calib, show_progress=False, window=16, generate=args.generate,
                          generate_window=8, prompt_len=16, seed=seed)
        result["runs"].append({"calibration": calibration, "seed": seed,
                               "plans": _evaluate_plans(model, adapter, demo, stats, heldout)})
    return result


def _mean_pair(pairs) -> tuple[float, float]:
    return sum(b for b, _ in pairs) / len(pairs), sum(a for _, a in pairs) / len(pairs)


def markdown(result: dict) -> str:
    """One row per calibration set, seed and plan: prose decode (every held-out seed), code decode and code batch."""
    rows = []
    for run in result["runs"]:
        for name, entry in run["plans"].items():
            prose = [entry[f"heldout_prose@{s}"]["streaming"] for s in result["heldout_seeds"]]
            worse = sum(a > b for pairs in prose for b, a in pairs)
            closest = max(a / b for pairs in prose for b, a in pairs)
            reductions = " / ".join(f"{b / a:.2f}x" for b, a in (_mean_pair(p) for p in prose))
            first = f"heldout_code@{result['heldout_seeds'][0]}"
            code_stream, code_batch = (_mean_pair(entry[first][m]) for m in ("streaming", "batch64"))
            prose0 = entry[f"heldout_prose@{result['heldout_seeds'][0]}"]
            rows.append([run["calibration"], str(run["seed"]), name, reductions,
                         f"{worse} of {4 * len(prose)}", f"{closest:.2f}",
                         " / ".join(f"{fmt(b)}->{fmt(a)}" for b, a in prose0["streaming"]),
                         f"{code_stream[0] / code_stream[1]:.2f}x", f"{code_batch[0] / code_batch[1]:.2f}x",
                         f"{entry[first]['ppl_change_pct']:+.2f} % / {prose0['ppl_change_pct']:+.2f} %",
                         f"{entry['planned_bytes'] / entry['reference_bytes']:.3f}x"])
    head = ["calibration", "seed", "plan", "prose decode, per held-out seed", "layers worse",
            "max after/before", "prose decode per layer (first seed)", "code decode", "code batch 64",
            "ppl code / prose", "memory"]
    return table(head, rows)


def plot(result: dict, path: Path) -> None:
    """Per-layer LIS of prose streaming decode (first held-out seed, first calibration seed): no balancing and each
    plan, one panel per calibration set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts = {}
    for run in result["runs"]:
        firsts.setdefault(run["calibration"], run)
    key = f"heldout_prose@{result['heldout_seeds'][0]}"
    fig, axes = plt.subplots(1, len(firsts), figsize=(5.2 * len(firsts), 3.6), sharey=True, squeeze=False)
    for ax, (calibration, run) in zip(axes[0], firsts.items()):
        names = list(run["plans"])
        none = [b for b, _ in run["plans"][names[0]][key]["streaming"]]
        layers = range(len(none))
        width = 0.8 / (len(names) + 1)
        ax.bar([i - 0.4 + width / 2 for i in layers], none, width, label="no balancing", color="0.6")
        for j, name in enumerate(names, start=1):
            after = [a for _, a in run["plans"][name][key]["streaming"]]
            ax.bar([i - 0.4 + width * (j + 0.5) for i in layers], after, width, label=name)
        ax.set_title(f"calibrated on {calibration} (seed {run['seed']})")
        ax.set_xlabel("MoE layer")
        ax.set_xticks(list(layers))
    axes[0][0].set_ylabel("LIS, prose streaming decode (cum.)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--calibrations", type=lambda t: t.split(","), default=["code", "both"],
                        help=f"comma-separated, of {', '.join(CALIBRATIONS)}")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="calibration seeds")
    parser.add_argument("--heldout-seeds", type=_ints, default=[0, 1, 2], help="held-out selection seeds")
    parser.add_argument("--generate", type=int, default=33)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--machine", default="2-core CPU")
    args = parser.parse_args()
    if unknown := set(args.calibrations) - set(CALIBRATIONS):
        parser.error(f"unknown calibration {sorted(unknown)}; choose from {', '.join(CALIBRATIONS)}")
    result = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    print(markdown(result))


if __name__ == "__main__":
    main()
