"""ONNX Runtime (CPU) speed and file size of the exported R&Q model, against PyTorch eager R&Q and against the
original model exported without R&Q (Hugging Face ``batched_mm`` experts), all in the same run.

    python -m benchmarks.bench_export                       # demo checkpoint if built, else a synthetic Mixtral
    python -m benchmarks.bench_export --model DIR --plan plan.json --batch 1,8 --new-tokens 32

Greedy generation of ``--new-tokens`` tokens after a ``--prompt-len`` prompt, batch sizes ``--batch``;
median of ``--repeats`` runs after one warm-up. Every engine uses ``--threads`` intra-op threads.
R&Q runs in streaming mode (replica offsets rotating per step, docs/spec.md §4). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rq
from rq.models.adapters import load_model
from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import TokenData
from rq.export.api import export_baseline, export_model
from rq.export.runtime import OrtGenerator, position_ids_from_mask
from rq.plan.planner import PlanOptions, make_plan
from rq.rqmodel.model import apply_plan, set_mode
from rq.plan.schema import load_plan, save_plan

DEMO = Path(rq.__file__).parent / "demo" / "checkpoint"


def synthetic_model(out: Path) -> Path:
    """A random-weight Mixtral big enough for timings to mean something (hidden 256, 8 experts of 512)."""
    from transformers import AutoModelForCausalLM

    from rq.testing.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("mixtral")
    config.update(dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=32, vocab_size=2048))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate" in name and param.dim() == 2:
                param.normal_(0, 0.2)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def make_plan_for(model_dir: Path, out: Path, budget: float, group_size: int) -> Path:
    model, adapter = load_model(model_dir)
    tokens = torch.randint(2, model.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, adapter, TokenData(tokens, "seeded random tokens"), group_size=group_size,
                      show_progress=False)
    save_plan(make_plan(stats, PlanOptions(budget_factor=budget)), out)
    return out


def _timed(run, repeats: int) -> dict:
    """``run() -> (prefill seconds, decode seconds)``; one warm-up, then the median of each over ``repeats``."""
    run()
    samples = [run() for _ in range(repeats)]
    return {"prefill_s": statistics.median(s[0] for s in samples), "decode_s": statistics.median(s[1] for s in samples)}


def bench_ort(build: Path, ids: np.ndarray, new_tokens: int, threads: int, repeats: int) -> dict:
    gen = OrtGenerator(build, streaming=True, intra_op_num_threads=threads)

    def run():
        start = time.perf_counter()
        out = gen.prefill(ids)
        mid = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = gen.step(out.logits[:, -1, :].argmax(-1))
        return mid - start, time.perf_counter() - mid

    return _timed(run, repeats)


def bench_torch(model, ids: np.ndarray, new_tokens: int, repeats: int) -> dict:
    @torch.no_grad()
    def run():
        mask = torch.ones(ids.shape, dtype=torch.int64)
        pos = torch.from_numpy(position_ids_from_mask(mask.numpy()))
        start = time.perf_counter()
        out = model(input_ids=torch.from_numpy(ids), attention_mask=mask, position_ids=pos, use_cache=True)
        mid = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = out.logits[:, -1, :].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
        return mid - start, time.perf_counter() - mid

    return _timed(run, repeats)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def onnx_bytes(build: Path) -> int:
    return sum(p.stat().st_size for p in build.iterdir() if p.suffix in (".onnx", ".data"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: demo checkpoint, else synthetic)")
    parser.add_argument("--plan", type=Path, help="plan.json (default: calibrate on random tokens and plan)")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, help="where builds go (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rq-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or (DEMO if (DEMO / "config.json").is_file() else None)
    if model_dir is None:
        model_dir = synthetic_model(work / "synthetic")
    plan_path = args.plan or make_plan_for(model_dir, work / "plan.json", args.budget, args.group_size)
    plan = load_plan(plan_path)

    rq_build = export_model(model_dir, plan_path, work / "build-rq", force=True, show_progress=False)
    base_build = export_baseline(model_dir, work / "build-original", force=True, show_progress=False)

    model, adapter = load_model(model_dir)
    original_model, _ = load_model(model_dir)
    apply_plan(model, adapter, plan)
    set_mode(model, "streaming")

    rows = []
    rng = np.random.default_rng(0)
    vocab = rq_build.manifest["vocab_size"]
    for batch in [int(b) for b in args.batch.split(",")]:
        ids = rng.integers(2, vocab, size=(batch, args.prompt_len), dtype=np.int64)
        engines = {
            "ONNX Runtime, R&Q (rq::RQMoE function)": lambda: bench_ort(rq_build.out_dir, ids, args.new_tokens,
                                                                       args.threads, args.repeats),
            "ONNX Runtime, original (no R&Q)": lambda: bench_ort(base_build.out_dir, ids, args.new_tokens,
                                                                 args.threads, args.repeats),
            "PyTorch eager, R&Q (rq.rqmodel.model)": lambda: bench_torch(model, ids, args.new_tokens, args.repeats),
            "PyTorch eager, original": lambda: bench_torch(original_model, ids, args.new_tokens, args.repeats),
        }
        for name, run in engines.items():
            r = run()
            total = r["prefill_s"] + r["decode_s"]
            rows.append((name, batch, r["prefill_s"] * 1e3, batch * (args.new_tokens - 1) / r["decode_s"],
                         batch * args.new_tokens / total))

    cfg = rq_build.manifest
    print(f"### rq-export: ONNX Runtime CPU vs PyTorch eager ({cfg['architecture']}, {model_dir.name})\n")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens (greedy), median of {args.repeats}; R&Q plan: budget "
          f"{plan.budget.budget_factor:g}x, group {plan.quantization.group_size}, "
          f"{sum(sum(l.logcnt) for l in plan.layers)} copies for {sum(len(l.logcnt) for l in plan.layers)} experts; "
          f"parity {'PASSED' if rq_build.passed else 'FAILED'}\n")
    print(f"| engine | batch | prefill ms ({args.prompt_len} tokens) | decode tokens/s | end-to-end tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, prefill_ms, decode_tps, e2e_tps in rows:
        print(f"| {name} | {batch} | {prefill_ms:.1f} | {decode_tps:.1f} | {e2e_tps:.1f} |")
    rq_bytes, base_bytes = onnx_bytes(rq_build.out_dir), onnx_bytes(base_build.out_dir)
    print("\n| export | ONNX files (MB) | vs original | expert weights (MB, plan) |")
    print("|---|---:|---:|---:|")
    print(f"| original (no R&Q) | {_mb(base_bytes)} | 1.00x | {_mb(plan.budget.reference_bytes)} |")
    print(f"| R&Q | {_mb(rq_bytes)} | {rq_bytes / base_bytes:.2f}x | {_mb(plan.budget.planned_bytes)} |")
    print(f"\nbuilds in {work}")


if __name__ == "__main__":
    main()
