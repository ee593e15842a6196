"""Wall time of every stage with and without layer streaming, on models that fit in memory.

    python -m benchmarks.bench_stages                      # demo model: calibrate, plan, eval, export
    python -m benchmarks.bench_stages --models demo,mid    # + the mid-size model (calibrate, eval)

Each stage runs as a fresh ``rq`` process (``benchmarks.bench_scale``'s commands and sampler) with ``--stream
never`` (every layer kept once read: the whole model in memory), ``auto`` (the default: kept when the model
fits) and ``always`` (one decoder layer at a time). The three run interleaved, ``--repeats`` rounds (each mode
first in one), so a busy machine slows them alike; each mode keeps its own stats, plan and build. Reported:
median wall time per stage and mode, and its ratio against ``never`` from the same run. ``plan`` loads no model
(no ``--stream``): its ratios are the noise floor. Export runs with its parity check. Results:
``benchmarks/plots/stages.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from benchmarks.bench_scale import measure, stage_commands
from benchmarks.bench_speed import build_mid_size
from benchmarks.markdown import fmt, table
from rq.demo.corpus import demo_checkpoint_dir, split_path

HERE = Path(__file__).resolve().parent
MODES = ("never", "auto", "always")
STAGES = {"demo": ("calibrate", "plan", "eval", "export"), "mid": ("calibrate", "eval")}
TOKENS = {"demo": (16, 64), "mid": (8, 128)}
"""Sequences x tokens per calibration and eval run (eval at batch sizes 1 and 2)."""


def run_model(name: str, folder: Path, work: Path, repeats: int) -> dict:
    """Interleaved runs of ``name``'s stages in every mode; median wall seconds and ratios against ``never``."""
    data = split_path("calibration")
    commands = {}
    for mode in MODES:
        (work / mode).mkdir(parents=True, exist_ok=True)
        commands[mode] = stage_commands(folder, work / mode, data, TOKENS[name], stream=mode, check=True)
    walls: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in STAGES[name]}
    peaks: dict[str, dict[str, int]] = {s: {m: 0 for m in MODES} for s in STAGES[name]}
    needed = ("calibrate", "plan") if "plan" not in STAGES[name] else ()
    for mode in MODES if needed else ():  # stats and plan the measured stages need, not timed
        for stage in needed:
            measure(commands[mode][stage], work / mode / f"{stage}.log")
    for round_ in range(repeats):
        order = MODES[round_ % 3:] + MODES[:round_ % 3]  # each mode goes first once: no order bias
        for stage in STAGES[name]:
            for mode in order:
                result = measure(commands[mode][stage], work / mode / f"{stage}.log")
                if result["rc"] != 0:
                    raise SystemExit(f"{name} {stage} --stream {mode} failed; see {work / mode / f'{stage}.log'}")
                walls[stage][mode].append(result["wall_s"])
                peaks[stage][mode] = max(peaks[stage][mode], result["peak_anon"])
                print(name, stage, mode, f"{result['wall_s']:.2f} s", flush=True)
    medians = {s: {m: statistics.median(v) for m, v in modes.items()} for s, modes in walls.items()}
    return {"tokens": list(TOKENS[name]), "walls_s": walls, "median_s": medians, "peak_anon": peaks,
            "ratio_vs_never": {s: {m: v / med["never"] for m, v in med.items()} for s, med in medians.items()}}


def markdown(results: dict) -> str:
    rows = []
    for name, r in results["models"].items():
        for stage, med in r["median_s"].items():
            ratio = r["ratio_vs_never"][stage]
            rows.append([name, stage, *(fmt(med[m], 2, " s") for m in MODES), fmt(ratio["auto"], 3),
                         fmt(ratio["always"], 3)])
    return table(["model", "stage", "never", "auto", "always", "auto / never", "always / never"], rows, "llrrrrr")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo", help="comma-separated: demo, mid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the mid-size model is 1.7 GB)")
    parser.add_argument("--out", type=Path, default=HERE / "plots" / "stages.json")
    args = parser.parse_args(argv)
    results = {"machine": "2-core CPU, shared", "load_average_at_start": os.getloadavg()[0],
               "repeats": args.repeats, "models": {}}
    for name in args.models.split(","):
        folder = demo_checkpoint_dir() if name == "demo" else args.work / "mid"
        if name == "mid" and not (folder / "config.json").is_file():
            build_mid_size(folder)
        results["models"][name] = run_model(name, folder, args.work / name, args.repeats)
        results["load_average_at_end"] = os.getloadavg()[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
