"""Wall time of every stage with and without layer streaming, on models that fit in memory.

    python -m benchmarks.bench_stages                      # demo model: calibrate, plan, eval, export
    python -m benchmarks.bench_stages --models demo,mid    # + the mid-size model (calibrate, eval, export)

Each stage runs as a fresh process in every mode: ``whole`` is the path before streaming (``load_model`` of the
whole checkpoint, twice for eval, then the same library call the command makes; export's is ``--stream never``,
the baseline of its ratios), and the ``rq`` command with ``--stream never`` (streaming machinery, every layer kept once
read), ``auto`` (the default: kept when the model fits) and ``always`` (one decoder layer at a time). The modes
run interleaved, ``--repeats`` rounds (a different mode first in each), so a busy machine slows them alike; each mode
keeps its own stats, plan and build. Reported: median wall and CPU time (user + system) per stage and mode, and
their ratios against ``whole`` from the same run. ``plan`` loads no model (no ``--stream``): its ratios are the
noise floor. Export runs with its parity check. Results: ``benchmarks/plots/stages.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.bench_scale import measure, stage_commands
from benchmarks.bench_speed import build_mid_size
from benchmarks.markdown import fmt, table
from rq.demo.corpus import demo_checkpoint_dir, split_path

HERE = Path(__file__).resolve().parent
MODES = ("whole", "never", "auto", "always")
STREAM_MODES = MODES[1:]
STAGES = {"demo": ("calibrate", "plan", "eval", "export"), "mid": ("calibrate", "eval", "export")}
TOKENS = {"demo": (16, 64), "mid": (8, 128)}
"""Sequences x tokens per calibration and eval run (eval at batch sizes 1 and 2)."""

WHOLE_MODEL = {
    "calibrate": """
import sys
from pathlib import Path
from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import load_token_data, load_tokenizer
from rq.models.adapters import load_model
folder, data, out, sequences, seq_len = sys.argv[1:]
model, adapter = load_model(folder, dtype="auto")
tokens = load_token_data(load_tokenizer(folder), data, seq_len=int(seq_len), max_sequences=int(sequences))
calibrate(model, adapter, tokens, batch_size=int(sequences)).save(Path(out))
""",
    "eval": """
import sys
from rq.calibrate.data import load_token_data, load_tokenizer
from rq.eval.evaluate import evaluate
from rq.models.adapters import load_model
from rq.plan.schema import load_plan
from rq.rqmodel.model import apply_plan
folder, data, plan, sequences, seq_len = sys.argv[1:]
original, adapter = load_model(folder, dtype="auto")
rq_model, _ = load_model(folder, dtype="auto")
apply_plan(rq_model, adapter, load_plan(plan))
tokens = load_token_data(load_tokenizer(folder), data, seq_len=int(seq_len), max_sequences=int(sequences))
evaluate(original, rq_model, adapter, tokens.sequences, batch_sizes=[1, 2], stream_steps=0)
""",
}
"""The stages as they ran before streaming: the whole checkpoint loaded, then the command's library call."""


def whole_model_commands(folder: Path, work: Path, data: Path, tokens: tuple[int, int], plan: Path) -> dict:
    """``whole`` mode's commands: calibrate and eval on loaded models (``plan`` from another mode's run)."""
    sequences, seq_len = (str(n) for n in tokens)
    stats = work / f"{folder.name}-stats"
    return {"calibrate": [sys.executable, "-c", WHOLE_MODEL["calibrate"], str(folder), str(data), str(stats),
                          sequences, seq_len],
            "eval": [sys.executable, "-c", WHOLE_MODEL["eval"], str(folder), str(data), str(plan), sequences,
                     seq_len]}


def run_model(name: str, folder: Path, work: Path, repeats: int, stages: tuple[str, ...]) -> dict:
    """Interleaved runs of ``name``'s stages in every mode; median wall and CPU seconds and their ratios against
    ``whole``."""
    data = split_path("calibration")
    commands = {}
    for mode in STREAM_MODES:
        (work / mode).mkdir(parents=True, exist_ok=True)
        commands[mode] = stage_commands(folder, work / mode, data, TOKENS[name], stream=mode, check=True)
    (work / "whole").mkdir(parents=True, exist_ok=True)
    plan = work / "never" / f"{folder.name}-plan.json"  # written by never's plan stage before eval runs
    commands["whole"] = whole_model_commands(folder, work / "whole", data, TOKENS[name], plan)
    times = {kind: {s: {m: [] for m in MODES} for s in stages} for kind in ("wall_s", "cpu_s")}
    peaks: dict[str, dict[str, int]] = {s: {m: 0 for m in MODES} for s in stages}
    for mode in STREAM_MODES if "plan" not in stages else ():  # stats and plan for the timed stages
        for stage in ("calibrate", "plan"):
            measure(commands[mode][stage], work / mode / f"{stage}.log")
    for round_ in range(repeats):
        order = MODES[round_ % len(MODES):] + MODES[:round_ % len(MODES)]  # a different mode first each round
        for stage in stages:
            for mode in order:
                if mode == "whole" and stage in ("plan", "export"):
                    continue  # plan loads no model; export's whole-model path is --stream never
                result = measure(commands[mode][stage], work / mode / f"{stage}.log")
                if result["rc"] != 0:
                    raise SystemExit(f"{name} {stage} ({mode}) failed; see {work / mode / f'{stage}.log'}")
                for kind, per_stage in times.items():
                    per_stage[stage][mode].append(result[kind])
                peaks[stage][mode] = max(peaks[stage][mode], result["peak_anon"])
                print(name, stage, mode, f"{result['wall_s']:.2f} s wall, {result['cpu_s']:.2f} s CPU", flush=True)
    out: dict = {"tokens": list(TOKENS[name]), "walls_s": times["wall_s"], "cpus_s": times["cpu_s"],
                 "peak_anon": peaks}
    for kind, per_stage in times.items():
        medians = {s: {m: statistics.median(v) for m, v in modes.items() if v} for s, modes in per_stage.items()}
        out[f"median_{kind}"] = medians
        out[f"ratio_{kind}_vs_whole"] = {s: {m: v / med.get("whole", med["never"]) for m, v in med.items()}
                                         for s, med in medians.items()}
    return out


def markdown(results: dict) -> str:
    """One row per model and stage: median wall seconds per mode, and wall / CPU ratios against ``whole``."""
    rows = []
    for name, r in results["models"].items():
        for stage, wall in r["median_wall_s"].items():
            wall_ratio, cpu_ratio = r["ratio_wall_s_vs_whole"][stage], r["ratio_cpu_s_vs_whole"][stage]
            rows.append([name, stage, *(fmt(wall.get(m), 2, " s") for m in MODES),
                         *(f"{fmt(wall_ratio[m], 3)} / {fmt(cpu_ratio[m], 3)}" for m in ("never", "auto", "always"))])
    return table(["model", "stage", "whole", "never", "auto", "always", "never / whole (wall / CPU)",
                  "auto / whole", "always / whole"], rows, "llrrrrrrr")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo", help="comma-separated: demo, mid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="calibrate,plan,eval,export", help="comma-separated: which to time")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the mid-size model is 1.7 GB)")
    parser.add_argument("--out", type=Path, default=HERE / "plots" / "stages.json")
    args = parser.parse_args(argv)
    results = {"machine": "2-core CPU, shared", "load_average_at_start": os.getloadavg()[0],
               "repeats": args.repeats, "models": {}}
    for name in args.models.split(","):
        folder = demo_checkpoint_dir() if name == "demo" else args.work / "mid"
        if name == "mid" and not (folder / "config.json").is_file():
            build_mid_size(folder)
        stages = tuple(s for s in STAGES[name] if s in args.stages.split(","))
        results["models"][name] = run_model(name, folder, args.work / name, args.repeats, stages)
        results["load_average_at_end"] = os.getloadavg()[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
