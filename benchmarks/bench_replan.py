"""Re-planning from served traffic on a live Triton Inference Server (CPU): LIS before and after each re-plan as
traffic keeps drifting.

    python -m benchmarks.bench_replan                 # demo model: code plan first, traffic prose, code, prose
    python -m benchmarks.bench_replan --schedule prose --json out.json --plot lis.png    # one round

The demo model is calibrated on its code split and served (``rq tritonserver``, the ``nvidia-pytriton`` wheel's
server, explicit model control). Traffic comes in phases, one domain each (``--schedule``): short prose or code
prompts streamed at ``--concurrency``. A monitor scrapes ``/metrics`` every ``--interval`` seconds. In each phase,
once the serving version's ``rq_moe_plan_drift`` exceeds the threshold (drift detected) and the phase has run
``--min-window`` seconds, it runs :func:`rq.replan.run.replan` on the window since the phase started (``since``:
a scrape saved at its start), in a thread while the load keeps running; the new version is published and loaded,
serves the phase ``--after`` more seconds, and the next phase starts. A phase without drift in
``--phase-timeout`` seconds is left as it is.

Reported per round, on the traffic the new version served in its phase (its logical loads, each plan scored by the
replica rule): LIS with no balancing, replicate-only at the same memory (EPLB's greedy replicas within the budget:
none at budget 1.0), the plan that was serving, the re-plan, and the plan calibrated teacher-forced on that
domain's text (the ceiling); the share of the gap to the ceiling the re-plan recovers; LIS over copies the server's
counters measured per version; time from drift detected to the new version serving (plan, export + parity,
publish, load); failed requests. At the end, each version's perplexity change on held-out code and prose, and a
PNG of LIS over copies through every swap.
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


def _prompts(domain: str, n: int, skip: int) -> list[str]:
    """``n`` short prompts of held-out text: prose as 10 words, code as 3 source lines (``skip`` words / lines in,
    past what the calibration of that domain reads)."""
    from rq.demo import corpus

    if domain == "prose":
        words = corpus.load_split("heldout_prose").split()[skip:]
        return [" ".join(words[i * 10:(i + 1) * 10]) for i in range(n)]
    lines = [line for line in corpus.load_split("heldout_code").splitlines()[skip:] if line.strip()]
    return ["\n".join(lines[i * 3:(i + 1) * 3])[:160] for i in range(n)]


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


def _plot(timeline, rounds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for version in sorted({v for _, v, _ in timeline}, key=int):
        points = [(t, y) for t, v, y in timeline if v == version]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=f"version {version}")
    top = max((y for _, _, y in timeline), default=1.0)
    for i, r in enumerate(rounds):
        ax.axvline(r["phase_start_s"], color="grey", lw=0.8)
        ax.text(r["phase_start_s"], top, f" {r['domain']}", fontsize=8, va="top", color="grey")
        if r.get("detected_s") is not None:
            ax.axvline(r["detected_s"], color="tab:red", ls="--", lw=1, label="drift detected" if i == 0 else None)
        if r.get("serving_s") is not None:
            ax.axvline(r["serving_s"], color="tab:green", ls="--", lw=1, label="new version serving" if i == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel("LIS over copies (mean of layers)")
    ax.set_title("Demo, code-calibrated plan first; traffic drifts " + " -> ".join(r["domain"] for r in rounds) +
                 ": a re-plan per drift", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _version_only(scrape: dict, version: str) -> dict:
    return {k: v for k, v in scrape.items() if dict(k[1]).get("version") == version}


def _accuracy(demo: Path, plan_path: Path, sequences: int) -> dict[str, float]:
    """Perplexity change (%) of the plan on held-out code and prose, teacher-forced (docs/spec.md §9)."""
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.demo import corpus
    from rq.eval.evaluate import evaluate
    from rq.models.adapters import load_model
    from rq.plan.schema import load_plan
    from rq.rqmodel.model import apply_plan

    original, adapter = load_model(demo)
    rq_model, _ = load_model(demo)
    apply_plan(rq_model, adapter, load_plan(plan_path))
    tokenizer = load_tokenizer(demo)
    out = {}
    for domain in ("code", "prose"):
        data = load_token_data(tokenizer, corpus.split_path(f"heldout_{domain}"), seq_len=128, max_sequences=sequences)
        report = evaluate(original, rq_model, adapter, data.sequences, batch_sizes=[sequences], stream_steps=0,
                          show_progress=False)
        out[domain] = report.accuracy.ppl_change_pct
    return out


class _Load:
    """One phase of traffic: ``cases`` streamed at ``concurrency`` in a thread until :meth:`stop`."""

    def __init__(self, url: str, cases, concurrency: int):
        from rq.engines.tritonserver_client import run_load

        self.stop_event = threading.Event()
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.update(result=run_load(
            url, cases, requests=10**6, concurrency=concurrency, ignore_eos=True, stop=self.stop_event, keep=True,
            timeout=300)), daemon=True)
        self.thread.start()

    def stop(self):
        self.stop_event.set()
        self.thread.join(timeout=600)
        return self.result["result"]


def run(root: Path, sequences: int, concurrency: int, interval: float, after: float, threshold: float,
        max_tokens: int, min_window: float, schedule: list[str], phase_timeout: float) -> dict:
    import torch

    import rq
    from benchmarks.baselines import eplb_logcnt, equal_memory_replicas
    from rq.atomic import atomic_write_text
    from rq.core.lis import lis_value, model_lis
    from rq.core.replica import split_load
    from rq.engines.tritonserver import GENERATE, ServingOptions, write_model_repository
    from rq.engines.tritonserver_client import parse_metrics, scrape_metrics
    from rq.export import export_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import load_plan, save_plan
    from rq.replan.run import plan_lis_on, replan
    from rq.replan.served import copy_loads_by_version, read_scrape_text, window_loads
    from rq.testing.tritonserver import TritonServer

    demo = Path(rq.__file__).parent / "demo" / "checkpoint"
    code = _calibrate(demo, "calibration", sequences, root / "stats_code")
    prose = _calibrate(demo, "heldout_prose", sequences, root / "stats_prose")
    options = PlanOptions(budget_factor=1.0)
    save_plan(make_plan(code, options), root / "plan_code.json")
    save_plan(make_plan(prose, options), root / "plan_prose.json")
    ceilings = {"code": load_plan(root / "plan_code.json"), "prose": load_plan(root / "plan_prose.json")}
    export_model(demo, root / "plan_code.json", root / "build", check=False, show_progress=False)
    serving = ServingOptions(instances=2, intra_op_threads=1, max_context=128, default_max_tokens=max_tokens,
                             max_tokens_limit=64, forward_model=False, drift_threshold=threshold)
    repo = write_model_repository(root / "build", root / "repo", serving)
    # past the tokens the prose calibration reads; code prompts from held-out code (calibrated on another split)
    # two disjoint prompt sets per domain: the re-plan is fitted on the first and scored on the second, so it is
    # judged on traffic of the domain it has not seen (the same prompts again would flatter it)
    prompts = {"prose": _prompts("prose", 64, skip=20000), "code": _prompts("code", 64, skip=0)}
    n_layers, n_experts = len(code.layers), code.model.num_experts
    sizes = code.layers[0].original_bytes
    scrapes: list[tuple[float, dict]] = []
    rounds: list[dict] = []
    plans = {"1": root / "plan_code.json"}
    served = {"requests": 0, "errors": 0, "versions": {}}
    with TritonServer(repo, models=[GENERATE]) as server:
        t0 = time.perf_counter()
        version = "1"

        def scrape_now() -> dict:
            scrape = scrape_metrics(server.metrics_url, "rq_moe_")
            scrapes.append((time.perf_counter() - t0, scrape))
            return scrape

        for domain in schedule:
            start_file = root / f"phase{len(rounds) + 1}.prom"
            atomic_write_text(start_file, read_scrape_text(server.metrics_url))  # the window starts here
            entry = {"domain": domain, "running_version": version, "phase_start_s": time.perf_counter() - t0}
            fit_cases, score_cases = ([(p, max_tokens, None) for p in half] for half in
                                      (prompts[domain][:32], prompts[domain][32:]))
            load = _Load(server.grpc_url, fit_cases, concurrency)
            loads = [load]
            switch = None
            outcome: dict = {}

            def do_replan(since=start_file):
                outcome["result"] = replan(repo, server.metrics_url, root / "stats_code", demo,
                                           server=server.http_url, since=since, margin=0.0)
                outcome["serving"] = time.perf_counter() - t0

            replanner = threading.Thread(target=do_replan, daemon=True)
            phase_end = None
            while True:  # the monitor keeps scraping while the re-plan runs
                time.sleep(interval)
                scrape = scrape_now()
                now = scrapes[-1][0]
                drift = [v for (name, labels), v in scrape.items()
                         if name == "rq_moe_plan_drift" and dict(labels).get("version") == version]
                if "detected_s" not in entry and drift and max(drift) > threshold:
                    entry["detected_s"] = now
                if "detected_s" in entry and "started_s" not in entry and now >= entry["phase_start_s"] + min_window:
                    entry["started_s"] = now
                    replanner.start()
                if "detected_s" not in entry and now > entry["phase_start_s"] + phase_timeout:
                    entry["outcome"] = f"no drift detected in {phase_timeout:.0f} s"
                    break
                if "started_s" in entry and not replanner.is_alive():
                    result = outcome.get("result")
                    if result is None or result.published is None:
                        entry["outcome"] = result.summary() if result else "the re-plan raised"
                        break
                    if phase_end is None:  # the new version serves: the second prompt set starts, then the first stops
                        entry["serving_s"] = outcome["serving"]
                        phase_end = now + after
                        switch = scrape
                        loads.append(_Load(server.grpc_url, score_cases, concurrency))
                        loads[0].stop()
                    if now > phase_end:
                        break
            results = [loads[0].result["result"]] if len(loads) > 1 else []
            results.append(loads[-1].stop())
            phase = {"requests": sum(r.requests for r in results), "errors": sum(r.errors for r in results),
                     "versions": {}}
            for r in results:
                for v, count in r.versions.items():
                    phase["versions"][v] = phase["versions"].get(v, 0) + count
            served["requests"] += phase["requests"]
            served["errors"] += phase["errors"]
            for v, count in phase["versions"].items():
                served["versions"][v] = served["versions"].get(v, 0) + count
            end = scrape_now()
            result = outcome.get("result")
            if result is not None and result.published is not None:
                new = str(result.published)
                # what it served of the second prompt set
                window = window_loads(_version_only(end, new), _version_only(switch, new), n_layers, n_experts)
                plans[new] = repo / "rq_onnx" / new / "plan.json"
                running_plan, new_plan = load_plan(plans[version]), load_plan(plans[new])
                replicate = [lis_value(split_load(l, eplb_logcnt(l.to(torch.float64),
                                                                 equal_memory_replicas(1.0, sizes)))) for l in window]
                scores = {"no balancing": [lis_value(l) for l in window], "replicate-only, same memory": replicate,
                          f"running plan (version {version})": plan_lis_on(running_plan, window),
                          f"re-plan (version {new})": plan_lis_on(new_plan, window),
                          f"{domain}-calibrated plan (ceiling)": plan_lis_on(ceilings[domain], window)}
                means = {k: model_lis(v) for k, v in scores.items()}
                base = means["no balancing"][0]
                old_m, new_m, top_m = (means[k][0] for k in list(means)[2:])
                gap = (old_m - new_m) / (old_m - top_m) if old_m > top_m * 1.05 else None  # n/a: at the ceiling
                measured = copy_loads_by_version(end, parse_metrics(start_file.read_text(), "rq_moe_"))
                entry.update({
                    "published_version": new, "window_assignments": int(window.sum()),
                    "fitted_on_assignments": result.assignments,
                    "lis": {k: {"mean": m, "worst": w, "reduction": base / m} for k, (m, w) in means.items()},
                    "gap_recovered": gap,
                    "measured_copy_lis": {v: model_lis(_layer_lis(layers))[0] for v, layers in measured.items()
                                          if all(float(l.sum()) > 0 for l in layers.values())},
                    "replan_seconds": result.seconds, "started_to_serving_s": entry["serving_s"] - entry["started_s"],
                    "outcome": result.summary()})
                version = new
            entry.update(phase)
            rounds.append(entry)
    accuracy = {v: _accuracy(demo, path, 32) for v, path in plans.items()}
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})",
        "settings": {"calibration_sequences": sequences, "seq_len": 128, "concurrency": concurrency,
                     "max_tokens": max_tokens, "drift_threshold": threshold, "budget_factor": 1.0,
                     "schedule": schedule, "min_window_s": min_window, "after_s": after},
        "served": served, "rounds": rounds, "accuracy_ppl_change_pct": accuracy, "timeline": _timeline(scrapes),
    }


def report(res: dict) -> str:
    parts = []
    for i, r in enumerate(res["rounds"], 1):
        head = f"**Round {i}: {r['domain']} traffic, version {r['running_version']} serving.** "
        if "lis" not in r:
            parts.append(head + r["outcome"])
            continue
        rows = [[k, fmt(v["mean"]), fmt(v["worst"]), fmt(v["reduction"], 2, "x")] for k, v in r["lis"].items()]
        sec = r["replan_seconds"]
        gap = r["gap_recovered"]
        parts.append(head + (
            f"Fitted on {r['fitted_on_assignments']:,} assignments of the phase's first 32 prompts; scored on the "
            f"{r['window_assignments']:,} assignments version {r['published_version']} then served of 32 other "
            f"prompts of the same domain:\n\n") + table(
            [f"plan, on the {r['domain']} traffic version {r['published_version']} served", "LIS mean", "worst layer",
             "vs no balancing"], rows, align="lrrr") + (
            f"\n\nGap from the running plan to the ceiling recovered: "
            f"{'n/a (the running plan is within 5 % of the ceiling)' if gap is None else fmt(100 * gap, 0) + ' %'}. "
            f"LIS over copies by the server's counters in this phase: " +
            ", ".join(f"version {v} {fmt(x)}" for v, x in sorted(r["measured_copy_lis"].items())) +
            f". Drift detected {fmt(r['detected_s'] - r['phase_start_s'], 1)} s into the phase, re-plan started at "
            f"{fmt(r['started_s'] - r['phase_start_s'], 1)} s, version {r['published_version']} serving "
            f"{fmt(r['started_to_serving_s'], 1)} s later (" + ", ".join(f"{k} {v:.1f} s" for k, v in sec.items()) +
            f"). {r['requests']} requests, {r['errors']} failed; served by version: {r['versions']}."))
    acc = res["accuracy_ppl_change_pct"]
    parts.append("Perplexity change of each version's plan, held-out code / prose (32 x 128 tokens): " +
                 "; ".join(f"version {v} {a['code']:+.2f} % / {a['prose']:+.2f} %" for v, a in acc.items()) + ".")
    s = res["served"]
    parts.append(f"In all: {s['requests']} requests at concurrency {res['settings']['concurrency']}, {s['errors']} "
                 f"failed; served by version: {s['versions']}.")
    return "\n\n".join(parts)


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
    parser.add_argument("--schedule", default="prose,code,prose",
                        help="traffic domains in turn (prose, code); the server starts on the code-calibrated plan")
    parser.add_argument("--phase-timeout", type=float, default=60.0,
                        help="seconds a phase waits for drift before the next one starts")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "plots" / "replan_lis.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rq-bench-replan-") as tmp:
        schedule = [d.strip() for d in args.schedule.split(",") if d.strip()]
        if not schedule or any(d not in ("prose", "code") for d in schedule):
            raise SystemExit(f"--schedule takes prose and code, comma-separated; got {args.schedule!r}")
        res = run(Path(tmp), args.sequences, args.concurrency, args.interval, args.after, args.threshold,
                  args.max_tokens, args.min_window, schedule, args.phase_timeout)
    _plot(res["timeline"], res["rounds"], args.plot)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
