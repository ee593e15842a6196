"""Where an ONNX Runtime prefill spends its time: ONNX Runtime's profiler over interleaved calls of two exports.

    python -m benchmarks.profile_ort BASELINE_BUILD RQ_BUILD [--rounds 7] [--out benchmarks/plots]

Both exports' fused route (``model.ort.onnx``, or ``--flavour genai``: ``model.genai.onnx``) run the same 4 x 128
prefill in alternating order, one intra-op thread each, with profiling on. Per call the kernel times are summed
into the experts kernels (``MoE``, ``QMoE``) and the rest; the report gives per-round ratios (baseline time / R&Q
time, so > 1 means R&Q is faster) and their medians, which a busy machine slows alike, and the mean time per
operator type. A warm-up call per session is not counted.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
from pathlib import Path

EXPERT_OPS = ("MoE", "QMoE")


def _per_call(profile: Path) -> list[collections.Counter]:
    """Kernel microseconds of every ``model_run`` in a profile: ``wall``, ``experts``, ``rest`` and ``op:<type>``."""
    events = json.loads(profile.read_text())
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    rows = [collections.Counter(wall=end - start) for start, end in calls]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        for row, (start, end) in zip(rows, calls):
            if start <= e["ts"] <= end:
                op = e["args"]["op_name"]
                row["experts" if op in EXPERT_OPS else "rest"] += e["dur"]
                row["op:" + op] += e["dur"]
                break
    return rows


def profile(builds: list[Path], rounds: int, flavour: str = "onnxruntime", shape: tuple[int, int] = (4, 128)) -> dict:
    """Interleaved profiled prefills of ``builds`` (the first is the baseline); per-call rows and ratios."""
    import numpy as np
    import onnxruntime as ort

    from rq.export.runtime import OrtGenerator

    work = Path(tempfile.mkdtemp(prefix="rq-profile-"))
    gens = []
    for i, build in enumerate(builds):
        options = ort.SessionOptions()
        options.enable_profiling, options.profile_file_prefix = True, str(work / f"build{i}")
        gens.append(OrtGenerator(build, intra_op_num_threads=1, session_options=options, flavour=flavour))
    ids = np.random.default_rng(0).integers(2, gens[0].manifest["vocab_size"], size=shape)
    for r in range(rounds + 1):  # round 0 is the warm-up
        for gen in (gens if r % 2 == 0 else gens[::-1]):
            gen.reset()
            gen.prefill(ids)
    rows = []
    for gen in gens:
        path = Path(gen.sessions["decoder"].end_profiling())
        rows.append(_per_call(path)[1:])
        path.unlink()
    out = {"builds": [str(b) for b in builds], "flavour": flavour, "shape": list(shape), "rounds": rounds,
           "loadavg": list(os.getloadavg()), "engines": []}
    for build, calls in zip(builds, rows):
        entry = {"build": str(build), "median_ms": {}, "ratio_vs_baseline": {}, "mean_ms_by_op": {}}
        for key in ("wall", "experts", "rest"):
            entry["median_ms"][key] = statistics.median(c[key] for c in calls) / 1000
            entry["ratio_vs_baseline"][key] = statistics.median(a[key] / b[key] for a, b in zip(rows[0], calls))
        ops = collections.Counter()
        for c in calls:
            ops.update({k[3:]: v / len(calls) / 1000 for k, v in c.items() if k.startswith("op:")})
        entry["mean_ms_by_op"] = dict(ops.most_common())
        out["engines"].append(entry)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", type=Path, nargs=2, help="the baseline export, then the R&Q export")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--flavour", choices=("onnxruntime", "genai"), default="onnxruntime")
    parser.add_argument("--out", type=Path, help="where profile_ort.json goes (default: print only)")
    args = parser.parse_args(argv)
    result = profile(list(args.builds), args.rounds, args.flavour)
    for entry in result["engines"]:
        ratios = ", ".join(f"{k} {entry['median_ms'][k]:.1f} ms (x{entry['ratio_vs_baseline'][k]:.3f})"
                           for k in ("wall", "experts", "rest"))
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(entry["mean_ms_by_op"].items())[:8])
        print(f"{entry['build']}: {ratios}\n    {top}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_ort.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
