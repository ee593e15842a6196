"""Triton Inference Server load test of the R&Q ``generate`` model: latency percentiles and throughput.

    python -m benchmarks.bench_tritonserver                        # tiny random Qwen3-MoE export, 500 req @ 16
    python -m benchmarks.bench_tritonserver --concurrency 1,4,16   # one row per concurrency
    python -m benchmarks.bench_tritonserver --build build/         # an existing rq-export folder
    python -m benchmarks.bench_tritonserver --model DIR --data F   # calibrate + plan + export a local checkpoint
    python -m benchmarks.bench_tritonserver --from-test            # the numbers tests/engines/tritonserver wrote last run

Starts the ``tritonserver`` of the ``nvidia-pytriton`` wheel (CPU, Python backend) on free local ports
(:class:`rq.testing.tritonserver.TritonServer`) with a repository from
:func:`rq.engines.tritonserver.write_model_repository`, streams ``--requests`` greedy
generations over gRPC from ``--concurrency`` clients (one stream each, prompts round-robin), checks every
response token by token against offline ``OrtGenerator`` generation, and prints a markdown table:
latency (request sent -> final streamed response) p50/p90/p99, first-token p50/p99, requests/s and
generated tokens/s. ``--json`` writes every number with the settings and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.markdown import MISSING, table

REPO = Path(__file__).resolve().parents[1]
TEST_JSON = REPO / ".pytest_cache" / "d" / "rq-triton" / "load.json"
HEADER = ["concurrency", "requests", "errors", "mismatches", "p50 ms", "p90 ms", "p99 ms", "first token p50/p99 ms",
          "req/s", "tok/s"]


def row(s: dict) -> list:
    """One table row of a :meth:`rq.engines.tritonserver_client.LoadResult.summary`."""
    lat, ttft = s["latency_ms"], s.get("first_token_ms", {})
    return [s["concurrency"], s["requests"], s["errors"], s["mismatches"], lat["p50"], lat.get("p90", MISSING),
            lat["p99"], f"{ttft.get('p50', MISSING)} / {ttft.get('p99', MISSING)}", s["throughput_rps"],
            s["tokens_per_s"]]


def report(summaries: list[dict]) -> str:
    """The markdown table of every row and a note of the settings they share."""
    first = summaries[0]
    note = (f"`generate` (decoupled, gRPC streaming), {first.get('max_tokens')} new tokens per request, "
            f"{first.get('instances')} model instance(s) x {first.get('intra_op_threads')} ONNX Runtime thread(s), "
            f"{first.get('server', 'tritonserver')}, {first.get('cpu_count')} CPU cores; "
            f"model: {first.get('build', first.get('architecture'))}.")
    return table(HEADER, [row(s) for s in summaries], align="r" * len(HEADER)) + "\n\n" + note


def make_build(root: Path, model: str | None, data: str | None) -> Path:
    """calibrate -> plan -> export: a local checkpoint, or a tiny random Qwen3-MoE one."""
    from rq.models.adapters import load_model
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.export import export_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import save_plan

    if model is None:
        from rq.testing.tiny import save_tiny_checkpoint

        model = str(save_tiny_checkpoint("qwen3_moe", root / "ckpt"))
    if data is None:
        import rq

        data = root / "text.txt"
        data.write_text("\n".join(p.read_text() for p in sorted(Path(rq.__file__).parent.rglob("*.py"))))
    net, adapter = load_model(model)
    tokens = load_token_data(load_tokenizer(model), data, seq_len=32, max_sequences=16)
    stats = calibrate(net, adapter, tokens, batch_size=4, group_size=64, show_progress=False)
    save_plan(make_plan(stats, PlanOptions()), root / "plan.json")
    export_model(model, root / "plan.json", root / "build", check=False, show_progress=False)
    return root / "build"


def run(build: Path, concurrencies: list[int], requests: int, max_tokens: int, instances: int, threads: int,
        label: str) -> list[dict]:
    from rq.engines.tritonserver import ServingOptions, write_model_repository
    from rq.export.runtime import OrtGenerator
    from rq.engines.tritonserver_client import run_load
    from rq.testing.tritonserver import SMOKE_PROMPTS, TritonServer

    offline = OrtGenerator(build, intra_op_num_threads=1)
    cases = []
    for prompt in SMOKE_PROMPTS:
        offline.reset()
        ids = offline.tokenizer.encode(prompt).ids
        cases.append((prompt, max_tokens, offline.generate([ids], max_new_tokens=max_tokens).tokens[0].tolist()))
    with tempfile.TemporaryDirectory(prefix="rq-bench-triton-") as tmp:
        options = ServingOptions(instances=instances, intra_op_threads=threads, default_max_tokens=max_tokens,
                                 max_tokens_limit=max(512, max_tokens))
        repo = write_model_repository(build, Path(tmp) / "repo", options)
        with TritonServer(repo, models=["generate"]) as server:
            run_load(server.grpc_url, cases, requests=min(requests, 32), concurrency=2)  # warm-up
            out = []
            for concurrency in concurrencies:
                result = run_load(server.grpc_url, cases, requests=requests, concurrency=concurrency)
                summary = result.summary()
                summary.update(server="tritonserver (nvidia-pytriton wheel), CPU", model="generate",
                               max_tokens=max_tokens, instances=instances, intra_op_threads=threads,
                               cpu_count=os.cpu_count(), architecture=offline.manifest["architecture"], build=label)
                out.append(summary)
                lat = summary["latency_ms"]
                print(f"concurrency {concurrency}: p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
                      f"{summary['throughput_rps']} req/s, errors {summary['errors']}, "
                      f"mismatches {summary['mismatches']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-test", nargs="?", const=str(TEST_JSON), default=None, metavar="JSON",
                        help=f"print the numbers tests/engines/tritonserver wrote (default {TEST_JSON.relative_to(REPO)})")
    parser.add_argument("--build", help="an rq-export folder (default: export a tiny random Qwen3-MoE)")
    parser.add_argument("--model", help="a local Hugging Face MoE checkpoint to calibrate, plan and export")
    parser.add_argument("--data", help="calibration text for --model (default: rq's own sources)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", default="16", help="comma-separated, one table row each")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--instances", type=int, default=2, help="generate model instances (processes)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per instance")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)

    if args.from_test:
        path = Path(args.from_test)
        if not path.is_file():
            print(f"{path} not found: run `python -m pytest tests/engines/tritonserver` first", file=sys.stderr)
            return 1
        print(report([json.loads(path.read_text())]))
        return 0
    from rq.testing.tritonserver import find_tritonserver

    if find_tritonserver() is None:
        print("tritonserver is not installed: pip install nvidia-pytriton", file=sys.stderr)
        return 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rq-bench-build-") as tmp:
        if args.build:
            build, label = Path(args.build), f"export {args.build}"
        else:
            build = make_build(Path(tmp), args.model, args.data)
            label = f"checkpoint {args.model}" if args.model else "tiny random qwen3_moe export"
        summaries = run(build, [int(c) for c in args.concurrency.split(",")], args.requests, args.max_tokens,
                        args.instances, args.threads, label)
    print()
    print(report(summaries))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": summaries, "machine": platform.platform(),
                                               "python": platform.python_version(),
                                               "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
    return 0 if all(s["errors"] == 0 and s["mismatches"] == 0 for s in summaries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
