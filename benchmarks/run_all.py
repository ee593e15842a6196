"""Measure R&Q against its baselines (LIS, accuracy, memory, planner scale) and write the raw JSON, the plots and
the generated section of RESULTS.md.

    python -m benchmarks.run_all                 # demo checkpoint, full settings (3-5 min on 2 shared cores)
    python -m benchmarks.run_all --quick         # tiny random model, seconds (smoke test)
    python -m benchmarks.run_all --model DIR     # any local Hugging Face MoE checkpoint

Outputs (default ``benchmarks/plots/``; with ``--quick`` ``$TMPDIR/rq-bench-quick/``): ``rq_vs_baselines.json``
(every number, the settings, seeds and the machine), ``lis_vs_budget.png``, ``lis_vs_batch.png``,
``importance_accuracy.png``, ``calibration_size.png`` and ``planner_scale.png``. A full run also rewrites the
section "R&Q vs baselines: LIS, accuracy, memory" of ``benchmarks/RESULTS.md`` (between its markers); the
other sections of that file are left alone.

This module measures (:mod:`benchmarks.bench_lis`, :mod:`benchmarks.bench_planner`) and stores the results dict;
:mod:`benchmarks.report` and :mod:`benchmarks.figures` turn that dict into markdown and PNGs, so
``--from-json`` redraws both from a stored run without measuring.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import RESULTS_JSON
from rq.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"


def environment() -> dict:
    import torch
    import transformers

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    return {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "uname": " ".join(platform.uname()), "nproc": len(os.sched_getaffinity(0)),
            "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


# --------------------------------------------------------------------------------------------- main

MEASURED_HERE = {"bench_lis.py", "bench_planner.py"}


def run_standalone(out: Path, log, timeout_s: int = 900) -> dict:
    """Run every ``benchmarks/bench_*.py`` that is its own script (kernels, export, placement, serving: not the two
    this module imports) with its defaults, each in its own process; stdout goes to ``OUT/<name>.md``.
    Returns ``{name: exit code}`` (None on timeout)."""
    codes = {}
    for script in sorted((REPO / "benchmarks").glob("bench_*.py")):
        if script.name in MEASURED_HERE:
            continue
        log(f"running {script.name}")
        try:
            proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout_s)
            codes[script.stem] = proc.returncode
            (out / f"{script.stem}.md").write_text(proc.stdout + ("\n" + proc.stderr[-4000:] if proc.returncode else ""))
        except subprocess.TimeoutExpired:
            codes[script.stem] = None
        log(f"  {script.name}: exit {codes[script.stem]}")
    return codes


def write_outputs(results: dict, out: Path, md: str | None, log) -> dict:
    """Plots from ``results`` into ``out`` and, when ``md`` is given and the LIS part ran, its section of that
    RESULTS.md."""
    from benchmarks import figures, report

    for path in figures.plot_all(results, out):
        log(f"wrote {path}")
    if md and results.get("lis"):
        md_path = Path(md)
        report.update_results_md(md_path, report.render(results, out, md_path))
        log(f"updated {md_path}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds); default model: a tiny random qwen3_moe")
    parser.add_argument("--model", help="checkpoint directory (default: the demo checkpoint; with --quick a tiny model)")
    parser.add_argument("--out", help="folder for PNGs and JSON (default: benchmarks/plots/; with --quick "
                                      "a folder in the system temp dir, so a smoke run never replaces the real plots)")
    parser.add_argument("--results-md", default=None,
                        help="RESULTS.md to update (default: benchmarks/RESULTS.md for a full run, none with --quick)")
    parser.add_argument("--skip-planner", action="store_true")
    parser.add_argument("--skip-lis", action="store_true")
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: redraw the plots and rewrite the RESULTS.md section from a previous "
                             "run's rq_vs_baselines.json")
    parser.add_argument("--standalone", action="store_true",
                        help="also run the benchmarks/bench_*.py scripts that stand alone (kernels, export, placement, "
                             "tritonserver) with their defaults, each in its own process; their markdown goes to "
                             "OUT/<name>.md")
    args = parser.parse_args(argv)

    import torch

    from benchmarks import bench_lis, bench_planner

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    env = environment()
    out = Path(args.out or (Path(tempfile.gettempdir()) / "rq-bench-quick" if args.quick else
                            REPO / "benchmarks" / "plots"))
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    if args.from_json:
        if not Path(args.from_json).is_file():
            parser.error(f"{args.from_json} does not exist; pass the {RESULTS_JSON} of a previous run")
        results = json.loads(Path(args.from_json).read_text())
        return write_outputs(results, out, args.results_md or str(RESULTS_MD), log)
    log(f"machine: {env['uname']}; {env['nproc']} cores; torch {env['torch']}; load {env['loadavg_start']}")
    results: dict = {"environment": env}
    lis_res = planner_res = None
    tmp = None
    if not args.skip_lis:
        model_dir = args.model
        if model_dir is None and args.quick:
            from rq.testing.tiny import save_tiny_checkpoint
            tmp = tempfile.TemporaryDirectory(prefix="rq-bench-tiny-")
            model_dir = str(save_tiny_checkpoint("qwen3_moe", Path(tmp.name) / "qwen3_moe"))
        if model_dir is None:
            from rq.demo.corpus import demo_checkpoint_dir
            model_dir = str(demo_checkpoint_dir())
            if not (Path(model_dir) / "config.json").is_file():
                parser.error(f"demo checkpoint not found at {model_dir}; train it (`python -m rq.demo.train --out "
                             f"{model_dir}`) or pass --model DIR (or --quick for a tiny model)")
        settings = bench_lis.LISSettings.quick() if args.quick else bench_lis.LISSettings()
        log(f"LIS/accuracy benchmark on {model_dir}")
        lis_res = bench_lis.run(model_dir, settings, log=log)
        results["lis"] = lis_res
    if not args.skip_planner:
        log("planner benchmark (synthetic DeepSeek-V3 / Mixtral shapes)")
        planner_res = bench_planner.run(quick=args.quick, log=log)
        planner_res["exponent"] = bench_planner.fit_exponent(planner_res["scaling"])
        results["planner"] = planner_res
    env["loadavg_end"] = list(os.getloadavg())
    results["seconds"] = time.perf_counter() - start
    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=1, default=float) + "\n")
    write_outputs(results, out, args.results_md or (None if args.quick else str(RESULTS_MD)), log)
    if tmp is not None:
        tmp.cleanup()
    if args.standalone:
        results["standalone"] = run_standalone(out, log)
    log(f"done in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
