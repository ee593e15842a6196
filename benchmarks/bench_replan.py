"""Re-planning from served traffic on a live Triton Inference Server (CPU): LIS before and after one re-plan.

    python -m benchmarks.bench_replan                 # demo model, code-calibrated plan serving prose
    python -m benchmarks.bench_replan --json out.json --plot lis.png

The demo model is calibrated on its code split and served (``rq tritonserver``, the ``nvidia-pytriton`` wheel's
server, explicit model control); prose prompts stream at ``--concurrency``. A monitor scrapes ``/metrics`` every
``--interval`` seconds; once a layer's ``rq_moe_plan_drift`` has exceeded the threshold (drift detected) and the
first window holds ``--min-window`` seconds of traffic, it runs :func:`rq.replan.run.replan` with the server's
address (in a thread: the monitor keeps scraping), which publishes version 2 and loads it while the load keeps
running; the load goes on for ``--after`` seconds on version 2.

Reported, on the traffic version 2 served (its logical loads, each plan scored by the replica rule): LIS with no
balancing, replicate-only at the same memory (EPLB's greedy replicas within the budget: none at budget 1.0), the
code-calibrated plan that was serving, the re-plan, and a plan calibrated on prose (teacher-forced, the ceiling);
the share of the code plan -> prose plan gap the re-plan recovers; LIS over copies the server's counters measured
for each version; time from drift detected to version 2 serving (plan, export + parity, publish, load); a PNG of
LIS over copies through the swap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.markdown import fmt, table


def _calibrate(demo: Path, split: str, sequences: int, out: Path):
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.demo import corpus
    from rq.models.adapters import load_model

    model, adapter = load_model(demo)
    data = load_token_data(load_tokenizer(demo), corpus.split_path(split), seq_len=128, max_sequences=sequences)
    stats = calibrate(model, adapter, data, group_size=64, show_progress=False)
    stats.save(out)
    return stats


def _prompts(n: int, skip: int) -> list[str]:
    from rq.demo import corpus

    words = corpus.load_split("heldout_prose").split()[skip:]
    return [" ".join(words[i * 10:(i + 1) * 10]) for i in range(n)]


def _layer_lis(per_layer: dict) -> list[float]:
    from rq.core.lis import lis_value

    return [lis_value(loads) for loads in per_layer.values()]


def _timeline(scrapes: list[tuple[float, dict]]) -> list[tuple[float, str, float]]:
    """(seconds, version, mean LIS over copies) of the traffic between consecutive scrapes, per version serving."""
    from rq.core.lis import model_lis
    from rq.replan.served import copy_loads_by_version

    out = []
    for (_, before), (t, after) in zip(scrapes, scrapes[1:]):
        for version, layers in copy_loads_by_version(after, before).items():
            if all(float(l.sum()) >= 4 * l.numel() for l in layers.values()):  # enough work to say anything
                out.append((t, version, model_lis(_layer_lis(layers))[0]))
    return out


def _plot(timeline, detected: float, started: float, serving: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for version in sorted({v for _, v, _ in timeline}):
        points = [(t, y) for t, v, y in timeline if v == version]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=f"version {version}")
    ax.axvline(detected, color="tab:red", ls="--", lw=1, label="drift detected")
    ax.axvline(started, color="tab:orange", ls=":", lw=1, label="re-plan started")
    ax.axvline(serving, color="tab:green", ls="--", lw=1, label="version 2 serving")
    ax.set_xlabel("seconds")
    ax.set_ylabel("LIS over copies (mean of layers)")
    ax.set_title("Demo, code-calibrated plan serving prose: one re-plan from served metrics")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(root: Path, sequences: int, concurrency: int, interval: float, after: float, threshold: float,
        max_tokens: int, min_window: float) -> dict:
    import torch

    import rq
    from benchmarks.baselines import eplb_logcnt, equal_memory_replicas
    from rq.core.lis import lis_value, model_lis
    from rq.core.replica import split_load
    from rq.engines.tritonserver import GENERATE, ServingOptions, write_model_repository
    from rq.engines.tritonserver_client import parse_metrics, run_load, scrape_metrics
    from rq.export import export_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import load_plan, save_plan
    from rq.replan.run import plan_lis_on, replan
    from rq.replan.served import window_loads
    from rq.testing.tritonserver import TritonServer

    demo = Path(rq.__file__).parent / "demo" / "checkpoint"
    code = _calibrate(demo, "calibration", sequences, root / "stats_code")
    prose = _calibrate(demo, "heldout_prose", sequences, root / "stats_prose")
    options = PlanOptions(budget_factor=1.0)
    save_plan(make_plan(code, options), root / "plan_code.json")
    prose_plan = make_plan(prose, options)
    export_model(demo, root / "plan_code.json", root / "build", check=False, show_progress=False)
    serving = ServingOptions(instances=2, intra_op_threads=1, max_context=128, default_max_tokens=max_tokens,
                             max_tokens_limit=64, forward_model=False, drift_threshold=threshold)
    repo = write_model_repository(root / "build", root / "repo", serving)
    cases = [(p, max_tokens, None) for p in _prompts(32, skip=20000)]  # past the prose calibration's tokens
    scrapes: list[tuple[float, dict]] = []
    marks: dict[str, float] = {}
    with TritonServer(repo, models=[GENERATE]) as server:
        stop = threading.Event()
        load: dict = {}
        worker = threading.Thread(target=lambda: load.update(result=run_load(
            server.grpc_url, cases, requests=10**6, concurrency=concurrency, ignore_eos=True, stop=stop, keep=True,
            timeout=300)), daemon=True)
        t0 = time.perf_counter()
        worker.start()
        outcome: dict = {}
        swap = root / "at_swap.prom"

        def do_replan():
            outcome["result"] = replan(repo, server.metrics_url, root / "stats_code", demo, server=server.http_url,
                                       save_scrape=swap, margin=0.0)
            marks["serving"] = time.perf_counter() - t0

        replanner = threading.Thread(target=do_replan, daemon=True)
        deadline = t0 + 900
        while time.perf_counter() < deadline:  # the monitor keeps scraping while the re-plan runs
            time.sleep(interval)
            scrape = scrape_metrics(server.metrics_url, "rq_moe_")
            now = time.perf_counter() - t0
            scrapes.append((now, scrape))
            drift = [v for (name, _), v in scrape.items() if name == "rq_moe_plan_drift"]
            if "detected" not in marks and drift and max(drift) > threshold:
                marks["detected"] = now
            if "detected" in marks and "started" not in marks and now >= min_window:
                marks["started"] = now
                replanner.start()
            if "started" in marks and not replanner.is_alive():
                if outcome.get("result") is None or outcome["result"].published is None:
                    break
                if now > marks["serving"] + after:
                    break
        result = outcome.get("result")
        stop.set()
        worker.join(timeout=600)
        final = scrape_metrics(server.metrics_url, "rq_moe_")
    if result is None or result.published is None:
        raise SystemExit(f"no re-plan was published: {result.summary() if result else 'no drift detected'}")
    served = load["result"]
    before = parse_metrics(swap.read_text(), "rq_moe_")
    n_layers, n_experts = len(code.layers), code.model.num_experts
    # version 2's traffic: its own counters (it started at zero when loaded)
    v2_only = {k: v for k, v in final.items() if dict(k[1]).get("version") == "2"}
    window2 = window_loads(v2_only, None, n_layers, n_experts)
    window1 = window_loads(before, None, n_layers, n_experts)
    new_plan = load_plan(repo / "rq_onnx" / "2" / "plan.json")
    code_plan = load_plan(root / "plan_code.json")
    sizes = code.layers[0].original_bytes
    replicate = [lis_value(split_load(l, eplb_logcnt(l.to(torch.float64), equal_memory_replicas(1.0, sizes))))
                 for l in window2]
    scores = {"no balancing": [lis_value(l) for l in window2], "replicate-only, same memory": replicate,
              "code-calibrated plan (serving)": plan_lis_on(code_plan, window2),
              "one re-plan from served metrics": plan_lis_on(new_plan, window2),
              "prose-calibrated plan (ceiling)": plan_lis_on(prose_plan, window2)}
    means = {k: model_lis(v) for k, v in scores.items()}
    base = means["no balancing"][0]
    code_m, new_m, prose_m = (means[k][0] for k in ("code-calibrated plan (serving)", "one re-plan from served metrics",
                                                    "prose-calibrated plan (ceiling)"))
    from rq.replan.served import copy_loads_by_version

    measured = {"1": model_lis(_layer_lis(copy_loads_by_version(before)["1"]))[0],
                "2": model_lis(_layer_lis(copy_loads_by_version(final)["2"]))[0]}
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})",
        "settings": {"calibration_sequences": sequences, "seq_len": 128, "concurrency": concurrency,
                     "max_tokens": max_tokens, "drift_threshold": threshold, "budget_factor": 1.0},
        "requests": served.requests, "errors": served.errors, "versions": served.versions,
        "window_assignments": {"version 1": int(window1.sum()), "version 2": int(window2.sum())},
        "lis": {k: {"mean": m, "worst": w, "reduction": base / m} for k, (m, w) in means.items()},
        "gap_recovered": (code_m - new_m) / (code_m - prose_m) if code_m > prose_m else None,
        "measured_copy_lis": measured, "replan": {"seconds": result.seconds, "summary": result.summary()},
        "drift_detected_s": marks["detected"], "replan_started_s": marks["started"], "serving_s": marks["serving"],
        "started_to_serving_s": marks["serving"] - marks["started"],
        "timeline": _timeline(scrapes),
    }


def report(res: dict) -> str:
    rows = [[k, fmt(v["mean"]), fmt(v["worst"]), fmt(v["reduction"], 2, "x")] for k, v in res["lis"].items()]
    out = table(["plan, on the prose traffic version 2 served", "LIS mean", "worst layer", "vs no balancing"], rows,
                align="lrrr")
    sec = res["replan"]["seconds"]
    gap = res["gap_recovered"]
    out += (f"\n\nRe-plan recovers {fmt(100 * gap, 0)} % of the code -> prose plan gap. "
            f"LIS over copies measured by the server's counters: version 1 {fmt(res['measured_copy_lis']['1'])}, "
            f"version 2 {fmt(res['measured_copy_lis']['2'])}. Drift detected at {fmt(res['drift_detected_s'], 1)} s, "
            f"re-plan started at {fmt(res['replan_started_s'], 1)} s (first window), version 2 serving "
            f"{fmt(res['started_to_serving_s'], 1)} s later (" + ", ".join(f"{k} {v:.1f} s" for k, v in sec.items()) +
            f"). {res['requests']} requests at concurrency {res['settings']['concurrency']}, {res['errors']} failed; "
            f"served by version: {res['versions']}.")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences of 128 tokens (code; prose)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of load on the new version")
    parser.add_argument("--threshold", type=float, default=1.25, help="drift threshold (rq_moe_plan_drift)")
    parser.add_argument("--min-window", type=float, default=15.0,
                        help="seconds of traffic the first window holds at least (the re-plan starts after both)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "plots" / "replan_lis.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rq-bench-replan-") as tmp:
        res = run(Path(tmp), args.sequences, args.concurrency, args.interval, args.after, args.threshold,
                  args.max_tokens, args.min_window)
    _plot(res["timeline"], res["drift_detected_s"], res["replan_started_s"], res["serving_s"], args.plot)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
