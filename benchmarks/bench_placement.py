"""Expert-parallel placement benchmark: device LIS (max / mean device load) and makespan before and after
R&Q placement, against DeepSeek EPLB at the same number of slots and at the same memory, on calibration
loads and on held-out loads the placement was not fitted to.

    python -m benchmarks.bench_placement                 # DeepSeek-V3-like and Mixtral synthetic shapes
    python -m benchmarks.bench_placement --demo-stats S --demo-heldout H   # plus the demo model's stats
    python -m benchmarks.bench_placement --plots DIR     # also write rq place's per-layer PNGs
    python -m benchmarks.bench_placement --dispatch      # device LIS per engine dispatch, EP4 / EP8 / 2 nodes

Synthetic loads: :func:`rq.testing.synthetic.synthetic_stats` (seeded Zipf skew; held-out = same popularity ranking
with log-normal drift 0.25 and fresh sampling). The demo model (rq/demo) is calibrated on its committed
calibration split and judged on heldout_code when its checkpoint exists and no stats are passed.
Prints markdown tables; ``--json FILE`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from rq.placement.report import MODE_LABELS, dispatch_table, markdown_table, summary_table
from rq.placement.run import place_plan
from rq.plan.planner import PlanOptions, make_plan
from rq.plan.schema import save_plan
from rq.calibrate.stats import CalibrationStats
from rq.testing.synthetic import synthetic_stats


def run_case(name: str, stats: CalibrationStats, heldout: CalibrationStats | None, root: Path, *, devices: int,
             nodes: int = 1, groups: int = 1, pad: str = "replicate", slots_per_device: int | None = None,
             options: PlanOptions = PlanOptions(), plots: Path | None = None) -> dict:
    """Plan ``stats``, place on ``devices`` GPUs, simulate; returns the placement manifest plus timings."""
    case = root / name.replace(" ", "_").replace(",", "")
    stats.save(case / "calib")
    if heldout is not None:
        heldout.save(case / "held")
    t0 = time.perf_counter()
    plan = make_plan(stats, options)
    t_plan = time.perf_counter() - t0
    save_plan(plan, case / "plan.json")
    t0 = time.perf_counter()
    manifest = place_plan(case / "plan.json", devices=devices, nodes=nodes, out_dir=plots or case / "placement",
                             stats_dir=case / "calib", heldout_stats=case / "held" if heldout is not None else None,
                             groups=groups, pad=pad, slots_per_device=slots_per_device, plots=plots is not None, echo=None)
    t_place = time.perf_counter() - t0
    return {"name": name, "manifest": manifest, "plan_s": t_plan, "place_s": t_place,
            "plan_copies": (min(manifest["plan_copies"]), max(manifest["plan_copies"])),
            "layers": len(plan.layers), "experts": plan.model.num_experts, "devices": devices, "nodes": nodes}


def table(result: dict) -> str:
    rows = result["manifest"]["simulation"]
    return summary_table(rows, [k for k in ("calibration", "held-out") if k in rows[-1]], digits=1, joined=True)


def dispatch_summary(result: dict) -> str:
    """Device LIS per engine dispatch mode: R&Q's placement against EPLB's (same slots) under the same dispatch."""
    d = result["manifest"]["dispatch"]
    keys = [k for k in ("calibration", "held-out") if k in d["modes"][0]["rq"]]
    return dispatch_table(d["modes"], keys, d["recommended"])


def dispatch_row(result: dict, key: str) -> list[str]:
    """One line of the cross-case table: R&Q / EPLB mean device LIS per mode for load set ``key``."""
    modes = result["manifest"]["dispatch"]["modes"]
    return [result["name"]] + [f"{r['rq'][key]['device_lis_mean']:.3f} / {r['eplb_same_slots'][key]['device_lis_mean']:.3f}"
                               for r in modes]


def describe(result: dict) -> str:
    m = result["manifest"]
    rows = {r["method"]: r for r in m["simulation"]}
    lo, hi = result["plan_copies"]
    return (f"{result['layers']} MoE layers x {result['experts']} experts on {result['devices']} GPUs "
            f"({result['nodes']} node(s)); plan copies per layer {lo}..{hi} -> P = {m['num_physical_experts']} "
            f"({m['slots_per_device']} slots/GPU, +{sum(m['copies_added'])}/-{sum(m['copies_removed'])} copies "
            f"to fit); same memory: R&Q {rows['rq']['slots_per_gpu']:.2f} slots/GPU (INT4 replicas) vs EPLB "
            f"{rows['eplb_same_memory']['slots_per_gpu']:.2f} (original precision); "
            f"plan {result['plan_s']:.2f} s, place + simulate {result['place_s']:.2f} s")


def demo_stats(max_sequences: int) -> tuple[CalibrationStats, CalibrationStats] | None:
    """Calibrate the committed demo checkpoint on its calibration / heldout_code splits, if it exists."""
    from rq.demo import corpus

    ckpt = corpus.demo_checkpoint_dir()
    if not (ckpt / "config.json").is_file():
        return None
    from rq.models.adapters import load_model
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer

    model, adapter = load_model(ckpt)
    tokenizer = load_tokenizer(ckpt)
    out = []
    for split in ("calibration", "heldout_code"):
        data = load_token_data(tokenizer, corpus.split_path(split), seq_len=256, max_sequences=max_sequences)
        out.append(calibrate(model, adapter, data, show_progress=False))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-stats", type=Path, help="calibration stats of the demo model (rq calibrate output)")
    p.add_argument("--demo-heldout", type=Path, help="held-out stats of the demo model")
    p.add_argument("--demo-sequences", type=int, default=64, help="sequences per split when calibrating the demo")
    p.add_argument("--plots", type=Path, help="write the first DeepSeek case's placement and PNGs here")
    p.add_argument("--json", type=Path, help="write all results as JSON")
    p.add_argument("--quick", action="store_true", help="fewer cases (CI smoke run)")
    p.add_argument("--dispatch", action="store_true",
                   help="only the dispatch cases: EP4, EP8 and 2 nodes on a grouped DeepSeek-V3 test model and the demo")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # thousands of tiny tensor ops: the thread pool only adds latency

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ds = synthetic_stats("deepseek_v3", seed=0)
        ds_held = synthetic_stats("deepseek_v3", seed=0, drift=0.25, sample_seed=1)
        mx = synthetic_stats("mixtral", seed=0)
        mx_held = synthetic_stats("mixtral", seed=0, drift=0.25, sample_seed=1)
        cases = [
            ("DeepSeek-V3-like, EP32 (4 nodes x 8), pad to the largest layer", ds, ds_held,
             dict(devices=32, nodes=4, groups=8, plots=args.plots)),
            ("DeepSeek-V3-like, EP32 (4 nodes x 8), trimmed to the plan's bytes", ds, ds_held,
             dict(devices=32, nodes=4, groups=8, pad="trim")),
            ("DeepSeek-V3-like, EP32, 9 slots/GPU (EPLB's usual 288 slots)", ds, ds_held,
             dict(devices=32, nodes=4, groups=8, slots_per_device=9)),
            ("DeepSeek-V3-like, EP32 flat (one node: EPLB's global policy)", ds, ds_held, dict(devices=32)),
            ("DeepSeek-V3-like, EP64 (8 nodes x 8)", ds, ds_held, dict(devices=64, nodes=8, groups=8)),
            ("DeepSeek-V3-like, EP16 (2 nodes x 8)", ds, ds_held, dict(devices=16, nodes=2, groups=8)),
            ("Mixtral-8x7B-like, EP4", mx, mx_held, dict(devices=4)),
            ("Mixtral-8x7B-like, EP8", mx, mx_held, dict(devices=8)),
            ("Mixtral-8x7B-like, EP8 (2 nodes x 4)", mx, mx_held, dict(devices=8, nodes=2)),
        ]
        if args.quick:
            cases = [cases[0], cases[6]]
        if args.dispatch:  # small enough for SGLang's static tables to be replayed for every rank in seconds
            dsv = synthetic_stats("deepseek_v3", seed=0, tokens=16384, num_layers=6)
            dsv_held = synthetic_stats("deepseek_v3", seed=0, tokens=16384, num_layers=6, drift=0.25, sample_seed=1)
            cases = [(f"DeepSeek-V3-like (6 layers, 8 groups), {name}", dsv, dsv_held, kw) for name, kw in
                     (("EP4", dict(devices=4, groups=8)), ("EP8", dict(devices=8, groups=8)),
                      ("EP8 (2 nodes x 4)", dict(devices=8, nodes=2, groups=8)))]
        demo = None
        if args.demo_stats is not None:
            demo = (CalibrationStats.load(args.demo_stats),
                    CalibrationStats.load(args.demo_heldout) if args.demo_heldout is not None else None)
        elif not args.quick:
            demo = demo_stats(args.demo_sequences)
        if demo is not None:
            n = demo[0].model.num_experts
            for g, nodes in ((4, 1), (8, 1), (8, 2)) if args.dispatch else ((2, 1), (4, 1), (8, 1), (4, 2), (8, 2)):
                if g <= n:
                    where = f" ({nodes} nodes x {g // nodes})" if nodes > 1 else ""
                    name = f"demo model ({demo[0].model.architecture}), EP{g}{where}"
                    cases.append((name, demo[0], demo[1], dict(devices=g, nodes=nodes)))
        for name, stats, held, kw in cases:
            result = run_case(name, stats, held, root, **kw)
            results.append(result)
            print(f"### {name}\n\n{describe(result)}\n\n{table(result)}\n\n{dispatch_summary(result)}\n", flush=True)
        if demo is None:
            print("### demo model\n\nskipped: no --demo-stats given and the demo checkpoint (rq/demo/checkpoint) "
                  "is absent; build it with `python -m rq.demo.train --out rq/demo/checkpoint`.\n")
    for key in ("calibration", "held-out"):
        rows = [dispatch_row(r, key) for r in results if key in r["manifest"]["dispatch"]["modes"][0]["rq"]]
        if rows:
            modes = [m["mode"] for m in results[0]["manifest"]["dispatch"]["modes"]]
            print(f"### Device LIS mean per engine dispatch, R&Q / EPLB same slots ({key} loads)\n\n"
                  + markdown_table(["case"] + [MODE_LABELS[m] for m in modes], rows) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps([{k: v for k, v in r.items()} for r in results], indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
