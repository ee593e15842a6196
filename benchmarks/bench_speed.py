"""Speed and peak memory of R&Q against the original model, measured in the same run (ratios, medians).

    python -m benchmarks.bench_speed                 # demo model + a mid-size MoE the benchmark builds (~20 min)
    python -m benchmarks.bench_speed --quick         # a tiny model, for a smoke test (~1 min)
    python -m benchmarks.bench_speed --models demo   # one model
    python -m benchmarks.bench_speed --models demo --only speed --mixed   # + a mixed INT4/INT8 plan's engines
    python -m benchmarks.bench_speed --models mid --runtimes ort,genai    # ONNX Runtime engines only (less memory)
    python -m benchmarks.bench_speed --models mid --runtimes genai --int8-activations --only speed

Engines, each on one thread, run round-robin so a busy machine slows them alike; medians of ``--repeats``:

* PyTorch eager, original (Hugging Face's own ``grouped_mm`` experts) and R&Q (``fast`` backend; the
  ``reference`` backend too on small models);
* ONNX Runtime (CPU), original: the model exported with an identity plan (no replica, no INT4), so its
  experts run on the same fused ``com.microsoft.MoE`` kernel as R&Q's original-precision copies: the fastest
  way we know to run the original model in ONNX Runtime, so the fair baseline. On small models also the
  original model with Hugging Face's ``batched_mm`` experts in plain ops (``rq``'s baseline export), which
  gathers every token's expert weights and needs ``tokens x top_k x expert bytes`` of memory (25 GB for the
  mid-size prefill);
* ONNX Runtime, R&Q: the fused route ``model.ort.onnx`` and the portable ``model.onnx``;
* with ``--mixed``, the same engines for the mixed INT4/INT8 plan at the same budget (``rq plan --precisions
  int4,int8``; its INT8 layers run the portable body in ``model.ort.onnx``), against the INT4-only plan.
* onnxruntime-genai (where installed), original and R&Q: ``og.Model`` on the two export folders, whose
  ``model.genai.onnx`` is the fused graph with the offsets derived inside it (docs/export.md).
* with ``--int8-activations``, the R&Q plan exported again with ``rq export --ort-int8-activations`` (``QMoE`` on
  int8 activations, approximate) on ONNX Runtime and onnxruntime-genai, against the same originals.

Workloads: prefill of 4 x 128 tokens; greedy decode at batch 1 and 8 (16 steps after a 16-token prompt).
Memory, each in a fresh process (peak resident set size, also above the process's size once the libraries
are imported): ``rq-export`` (with its parity check) against the checkpoint's size; ONNX Runtime sessions
(creation and a 4 x 128 prefill) against the weights their files read, and R&Q's against the original's;
PyTorch (load, apply the plan, a 4 x 128 prefill) of R&Q against the original; calibration against the
model's own size; ``rq eval`` at two data sizes.

The mid-size model is a random-weight Qwen3-MoE (hidden 1024, 4 layers, 64 experts, top-8, expert width 512:
about 420M parameters, 1.7 GB in float32) whose routers are skewed (a Zipf-like bias per expert), so R&Q has
heavy hitters to replicate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

WORKLOADS = {"prefill 4x128": (4, 128, 0), "decode B=1": (1, 16, 16), "decode B=8": (8, 16, 16)}
"""name -> (batch, prompt tokens, decode steps); tokens/s counts the prefill tokens or the decoded ones."""
RUNTIMES = ("pytorch", "ort", "genai")
"""Engine families ``--runtimes`` selects: PyTorch eager, ONNX Runtime (rq's runtime), onnxruntime-genai."""

MID = dict(hidden_size=1024, num_hidden_layers=4, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512,
           intermediate_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=8192)


# ------------------------------------------------------------------------------------------------ models

def build_mid_size(out: Path, seed: int = 0, quick: bool = False) -> Path:
    """The mid-size random Qwen3-MoE (``quick``: a small one) with skewed routers, saved as a checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from rq.testing.tiny import tiny_tokenizer

    sizes = dict(MID) if not quick else dict(MID, hidden_size=128, num_experts=16, num_experts_per_tok=4,
                                             moe_intermediate_size=128, intermediate_size=128, head_dim=32,
                                             vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
    config = Qwen3MoeConfig(**sizes, max_position_embeddings=1024, decoder_sparse_step=1, mlp_only_layers=[],
                            pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config)
    n = config.num_experts
    with torch.no_grad():
        popularity = torch.arange(1, n + 1, dtype=torch.float32).pow(-0.6)  # rank^-0.6, shuffled per layer
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                scale = popularity[torch.randperm(n)] / popularity.mean()
                param.normal_(0, 0.02).mul_(scale.unsqueeze(1))
                param.add_(scale.unsqueeze(1) * 0.02)  # a shared direction: heavy hitters win for most tokens
    model.save_pretrained(out)
    tiny_tokenizer(sizes["vocab_size"]).save_pretrained(out)
    return out


def make_plans(model_dir: Path, folder: Path, group_size: int, sequences: int = 16,
               seq_len: int = 128) -> tuple[Path, Path, Path]:
    """Calibrate on seeded random tokens (the demo uses its own calibration split); the R&Q plan at budget 1.0,
    an identity plan (no replica, so no INT4 copy either) for the baseline, and the mixed INT4/INT8 plan at the
    same budget (LIS tolerance 0.15, as benchmarks/RESULTS.md's mixed rows), all from the same statistics."""
    import torch

    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import TokenData, load_tokenizer, tokenize_sequences
    from rq.demo.corpus import demo_checkpoint_dir, load_split
    from rq.models.adapters import load_model
    from rq.plan.planner import PlanOptions
    from rq.plan.planner import make_plan as plan_stats
    from rq.plan.schema import save_plan

    model, adapter = load_model(model_dir)
    if model_dir.resolve() == demo_checkpoint_dir().resolve():
        data = tokenize_sequences(load_tokenizer(model_dir), [load_split("calibration")], seq_len=seq_len,
                                  max_sequences=sequences, description="demo calibration split")
    else:
        tokens = torch.randint(2, model.config.vocab_size, (sequences, seq_len), generator=torch.Generator().manual_seed(0))
        data = TokenData(tokens, "seeded random tokens")
    stats = calibrate(model, adapter, data, group_size=group_size, show_progress=False)
    plan, identity, mixed = folder / "plan.json", folder / "identity-plan.json", folder / "mixed-plan.json"
    save_plan(plan_stats(stats, PlanOptions(budget_factor=1.0)), plan)
    save_plan(plan_stats(stats, PlanOptions(budget_factor=1.0, max_replicas=0)), identity)
    save_plan(plan_stats(stats, PlanOptions(budget_factor=1.0, precisions=("int4", "int8"), lis_tolerance=0.15)), mixed)
    return plan, identity, mixed


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ memory

_CHILD = """\
import json, sys, time
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
def rss():
    return status("VmRSS")
start = rss()
import numpy, onnxruntime, torch, transformers
marks = {{"imported": rss()}}
import_peak, peaks = status("VmHWM"), []
def reset_peak():
    # VmHWM := VmRSS (the high-water mark so far is kept in peaks): the peak of what follows
    peaks.append(status("VmHWM"))
    open("/proc/self/clear_refs", "w").write("5")
    return status("VmHWM")
reset_peak()  # the import's own transient is not the workload's peak
peaks.clear()
t0 = time.perf_counter()
{body}
after = max(peaks + [status("VmHWM")])
print(json.dumps({{"start": start, "peak": max(import_peak, after), "peak_after_imports": after,
                  "seconds": time.perf_counter() - t0, **marks}}))
"""


def measure(body: str, threads: int = 1) -> dict:
    """Run ``body`` (Python, may set ``marks[...]``) in a fresh interpreter that has imported the heavy libraries
    (RSS then: ``imported``); its peak RSS and marks.

    The peak is the kernel's ``VmHWM`` of the child's own address space, not ``getrusage``'s ``ru_maxrss``:
    Linux carries ``ru_maxrss`` over ``fork`` + ``exec``, so every child would report at least this process's
    size when it forked (gigabytes here, with every engine loaded)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    script = _CHILD.format(body=textwrap.dedent(body))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=str(Path(__file__).resolve().parents[1]))
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_export(model_dir: Path, plan: Path, out: Path, int8_activations: bool = False) -> dict:
    """``rq-export`` with its parity check, in its own process: the R&Q build the speed runs use, and its peak
    (``int8_activations``: ``--ort-int8-activations``)."""
    result = measure(f"""
        from rq.export import export_model
        r = export_model({str(model_dir)!r}, {str(plan)!r}, {str(out)!r}, force=True, show_progress=False,
                         ort_int8_activations={int8_activations!r})
        marks["passed"] = r.passed
    """)
    if not result["passed"]:
        raise RuntimeError(f"the export of {model_dir} failed its parity check; see rq check {out}")
    return result


def memory(model_dir: Path, plan: Path, builds: dict[str, Path], quick: bool,
           families: tuple[str, ...] = RUNTIMES) -> dict:
    """Peak memory of ONNX Runtime sessions, PyTorch, calibration and eval, each in its own process (without
    ``pytorch`` in ``families``: the sessions only)."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    # seeded random tokens, so the prefill routes to (nearly) every expert, as traffic does: a constant prompt
    # routes every token alike and leaves most experts' mapped weights unread
    prefill = f"numpy.random.default_rng(0).integers(2, {vocab}, (4, 128)).astype(numpy.int64)"
    out = {"checkpoint_bytes": checkpoint_bytes(model_dir)}
    sessions = {"original (fused MoE)": (builds["identity"], "onnxruntime"),
                "R&Q fused": (builds["rq"], "onnxruntime"), "R&Q portable": (builds["rq"], "portable")}
    for label, (build, flavour) in sessions.items():
        out[f"session: {label}"] = measure(f"""
            from rq.export.runtime import OrtGenerator
            g = OrtGenerator({str(build)!r}, flavour={flavour!r}, intra_op_num_threads=1)
            marks["created"], marks["created_anon"] = rss(), status("RssAnon")
            g.prefill({prefill})
            marks["prefilled"], marks["prefilled_anon"] = rss(), status("RssAnon")
        """)
        out[f"session: {label}"]["file_bytes"] = referenced_bytes(build, flavour)
    if "pytorch" not in families:
        return out
    for label, apply in (("original", ""), ("R&Q (fast)", "apply_plan(model, adapter, load_plan(plan))")):
        out[f"pytorch: {label}"] = measure(f"""
            from rq.models.adapters import load_model
            from rq.plan.schema import load_plan
            from rq.rqmodel.model import apply_plan
            plan = {str(plan)!r}
            model, adapter = load_model({str(model_dir)!r})
            {apply}
            marks["loaded"] = rss()
            with torch.no_grad():
                model(input_ids=torch.from_numpy({prefill}), use_cache=False)
        """)
    sequences = (4, 8) if quick else (8, 32)
    out["calibrate"] = measure(f"""
        from rq.calibrate.accumulate import calibrate
        from rq.calibrate.data import TokenData
        from rq.models.adapters import load_model
        model, adapter = load_model({str(model_dir)!r})
        marks["loaded"] = reset_peak()
        marks["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        tokens = torch.randint(2, model.config.vocab_size, ({sequences[1]}, 128), generator=torch.Generator().manual_seed(0))
        calibrate(model, adapter, TokenData(tokens, "random"), group_size=128, show_progress=False)
        marks["calibration_peak"] = status("VmHWM")  # since the model was loaded
    """)
    for n in sequences:
        out[f"eval_{n}"] = measure(f"""
            from rq.eval.evaluate import evaluate
            from rq.models.adapters import load_model
            from rq.plan.schema import load_plan
            from rq.rqmodel.model import apply_plan
            original, adapter = load_model({str(model_dir)!r})
            rq_model, _ = load_model({str(model_dir)!r})
            apply_plan(rq_model, adapter, load_plan({str(plan)!r}))
            marks["loaded"] = rss()
            tokens = torch.randint(2, original.config.vocab_size, ({n}, 128), generator=torch.Generator().manual_seed(0))
            evaluate(original, rq_model, adapter, tokens, batch_sizes=[1, 4], stream_steps=0, show_progress=False)
        """)
    return out


def referenced_bytes(build: Path, flavour: str) -> int:
    """Bytes of the initializers the graph files ONNX Runtime opens (``flavour``) read, wherever stored."""
    import onnx

    from rq.export.runtime import graph_file, load_manifest

    total = 0
    for graph in load_manifest(build)["graphs"].values():
        proto = onnx.load(build / graph_file(graph, flavour), load_external_data=False)
        for tensor in proto.graph.initializer:
            length = next((int(e.value) for e in tensor.external_data if e.key == "length"), None)
            total += length if length is not None else len(tensor.raw_data)
    return total


# ------------------------------------------------------------------------------------------------ speed

def runtimes(model_dir: Path, plan: Path, builds: dict[str, Path], reference: bool, mixed: Path | None = None,
             families: tuple[str, ...] = RUNTIMES) -> dict:
    """name -> callable(input_ids [B, S], steps) -> seconds of the timed part (prefill or the decode steps), for
    the engine ``families`` asked (the PyTorch models are not even loaded without ``pytorch``)."""
    import numpy as np
    import torch

    from rq.export.runtime import OrtGenerator, position_ids_from_mask
    from rq.models.adapters import load_model
    from rq.plan.schema import load_plan
    from rq.rqmodel.model import apply_plan, set_backend, set_mode

    def torch_runtime(model):
        @torch.no_grad()
        def run(ids: np.ndarray, steps: int) -> float:
            mask = torch.ones(ids.shape, dtype=torch.int64)
            pos = torch.from_numpy(position_ids_from_mask(mask.numpy()))
            start = time.perf_counter()
            out = model(input_ids=torch.from_numpy(ids), attention_mask=mask, position_ids=pos, use_cache=True)
            if not steps:
                return time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                token = out.logits[:, -1, :].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=token, attention_mask=mask, position_ids=pos, cache=out.cache, use_cache=True)
            return time.perf_counter() - start
        return run

    def ort_runtime(build: Path, flavour: str):
        gen = OrtGenerator(build, streaming=True, intra_op_num_threads=1, flavour=flavour)

        def run(ids: np.ndarray, steps: int) -> float:
            gen.reset()
            start = time.perf_counter()
            out = gen.prefill(ids)
            if not steps:
                return time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                out = gen.step(out.logits[:, -1, :].argmax(-1))
            return time.perf_counter() - start
        return run

    out = {}
    if "pytorch" in families:
        original, _ = load_model(model_dir)
        rq_model, adapter = load_model(model_dir)
        apply_plan(rq_model, adapter, load_plan(plan))
        set_mode(rq_model, "streaming")
        out = {"PyTorch, original": torch_runtime(original), "PyTorch, R&Q (fast)": torch_runtime(rq_model)}
    if reference and "pytorch" in families:
        ref_model, _ = load_model(model_dir)
        apply_plan(ref_model, adapter, load_plan(plan))
        set_mode(ref_model, "streaming")
        set_backend(ref_model, "reference")
        out["PyTorch, R&Q (reference)"] = torch_runtime(ref_model)
    if "ort" in families:
        out["ONNX Runtime, original (fused MoE)"] = ort_runtime(builds["identity"], "onnxruntime")
        if "batched_mm" in builds:
            out["ONNX Runtime, original (HF batched_mm)"] = ort_runtime(builds["batched_mm"], "portable")
        out["ONNX Runtime, R&Q fused (model.ort.onnx)"] = ort_runtime(builds["rq"], "onnxruntime")
        out["ONNX Runtime, R&Q portable (model.onnx)"] = ort_runtime(builds["rq"], "portable")
        if "rq-int8" in builds:
            out[INT8_ORT] = ort_runtime(builds["rq-int8"], "onnxruntime")
    if mixed is not None:
        mixed_model, _ = load_model(model_dir)
        apply_plan(mixed_model, adapter, load_plan(mixed))
        set_mode(mixed_model, "streaming")
        out["PyTorch, R&Q mixed (fast)"] = torch_runtime(mixed_model)
        out["ONNX Runtime, R&Q mixed (model.ort.onnx)"] = ort_runtime(builds["mixed"], "onnxruntime")
        out["ONNX Runtime, R&Q mixed portable (model.onnx)"] = ort_runtime(builds["mixed"], "portable")
    if "genai" in families and genai_available():
        out["onnxruntime-genai, original (fused MoE)"] = genai_runtime(builds["identity"])
        out["onnxruntime-genai, R&Q (model.genai.onnx)"] = genai_runtime(builds["rq"])
        if "rq-int8" in builds:
            out[INT8_GENAI] = genai_runtime(builds["rq-int8"])
    return out


INT8_ORT = "ONNX Runtime, R&Q fused, int8 activations"
INT8_GENAI = "onnxruntime-genai, R&Q, int8 activations"
"""The R&Q builds exported with ``--ort-int8-activations`` (``--int8-activations``)."""


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def genai_runtime(build: Path):
    """onnxruntime-genai's own loop over an export folder (``og.Model(build)``), one intra-op thread; prefill is
    ``append_tokens`` of the prompt, each decode step one ``generate_next_token``."""
    import onnxruntime_genai as og

    config = og.Config(str(build))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1,
                                                                          "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run(ids, steps: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + steps + 1, do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids.astype("int32"))
        if not steps:
            return time.perf_counter() - start
        generator.generate_next_token()  # the prompt's token: no forward pass
        start = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()
        return time.perf_counter() - start
    return run


def speed(model_dir: Path, plan: Path, builds: dict[str, Path], repeats: int, reference: bool,
          mixed: Path | None = None, families: tuple[str, ...] = RUNTIMES) -> dict:
    """tokens/s of every engine and workload (medians), engines interleaved."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    runs = runtimes(model_dir, plan, builds, reference, mixed, families)
    vocab = json.loads((builds["rq"] / "manifest.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    results = {}
    for workload, (batch, prompt, steps) in WORKLOADS.items():
        ids = rng.integers(2, vocab, size=(batch, prompt), dtype=np.int64)
        samples = {name: [] for name in runs}
        for name, run in runs.items():
            run(ids, min(steps, 2))  # warm-up
        for _ in range(repeats):
            for name, run in runs.items():
                samples[name].append(run(ids, steps))
        tokens = batch * (steps if steps else prompt)
        results[workload] = {name: tokens / statistics.median(s) for name, s in samples.items()}
    return results


def baseline_builds(model_dir: Path, identity_plan: Path, work: Path, batched_mm: bool) -> dict[str, Path]:
    """The original model's ONNX builds: the identity plan's (fused MoE) and, if asked, Hugging Face's
    ``batched_mm`` experts in plain ops."""
    from rq.export import export_model
    from rq.export.api import export_baseline

    builds = {"identity": export_model(model_dir, identity_plan, work / "identity-build", force=True, check=False,
                                       show_progress=False).out_dir}
    if batched_mm:
        builds["batched_mm"] = export_baseline(model_dir, work / "base-build", force=True, show_progress=False).out_dir
    return builds


# ------------------------------------------------------------------------------------------------ report

def ratios(speeds: dict) -> dict:
    """The ratios the targets are stated in, per workload."""
    fused, portable = "ONNX Runtime, R&Q fused (model.ort.onnx)", "ONNX Runtime, R&Q portable (model.onnx)"
    ort_original, torch_original = "ONNX Runtime, original (fused MoE)", "PyTorch, original"
    pairs = {"ORT R&Q fused / ORT original": (fused, ort_original),
             "ORT R&Q fused / PyTorch original": (fused, torch_original),
             "PyTorch R&Q (fast) / PyTorch original": ("PyTorch, R&Q (fast)", torch_original),
             "ORT R&Q portable / ORT original": (portable, ort_original),
             "ORT R&Q fused / ORT original (HF batched_mm)": (fused, "ONNX Runtime, original (HF batched_mm)"),
             "PyTorch R&Q (reference) / PyTorch original": ("PyTorch, R&Q (reference)", torch_original),
             "PyTorch R&Q mixed / PyTorch R&Q INT4": ("PyTorch, R&Q mixed (fast)", "PyTorch, R&Q (fast)"),
             "ORT R&Q mixed / ORT R&Q INT4 (model.ort.onnx)": ("ONNX Runtime, R&Q mixed (model.ort.onnx)", fused),
             "ORT R&Q mixed / ORT R&Q INT4 (model.onnx)": ("ONNX Runtime, R&Q mixed portable (model.onnx)", portable),
             "onnxruntime-genai R&Q / onnxruntime-genai original": ("onnxruntime-genai, R&Q (model.genai.onnx)",
                                                                   "onnxruntime-genai, original (fused MoE)"),
             "onnxruntime-genai R&Q / ORT R&Q fused (rq's runtime)": ("onnxruntime-genai, R&Q (model.genai.onnx)",
                                                                     fused),
             "ORT R&Q fused, int8 activations / ORT original": (INT8_ORT, ort_original),
             "onnxruntime-genai R&Q, int8 activations / onnxruntime-genai original": (
                 INT8_GENAI, "onnxruntime-genai, original (fused MoE)")}
    return {workload: {key: s[a] / s[b] for key, (a, b) in pairs.items() if a in s and b in s}
            for workload, s in speeds.items()}


def _above_imports(m: dict) -> int:
    """Peak RSS once the libraries were imported, less the RSS then (older runs: the whole process's peak)."""
    return m.get("peak_after_imports", m["peak"]) - m["imported"]


def memory_ratios(mem: dict) -> dict:
    """Peak memory against what each target compares it with; ``above imports`` subtracts the process's size
    once torch, transformers and onnxruntime are imported (~300 MiB, which dwarfs a tiny model)."""
    ckpt = mem["checkpoint_bytes"]
    export = mem["export"]
    out = {"rq-export peak / checkpoint": export["peak"] / ckpt,
           "rq-export peak above imports / checkpoint": _above_imports(export) / ckpt}
    original = _above_imports(mem["session: original (fused MoE)"])
    for label in ("original (fused MoE)", "R&Q fused", "R&Q portable"):
        session = mem[f"session: {label}"]
        out[f"ORT session peak above imports: {label} / its file's weights"] = (_above_imports(session)
                                                                               / session["file_bytes"])
    for label in ("R&Q fused", "R&Q portable"):
        out[f"ORT session peak above imports: {label} / original"] = _above_imports(mem[f"session: {label}"]) / original
    if "pytorch: original" not in mem:  # --runtimes without pytorch and nothing stored: the sessions only
        return out
    out["PyTorch peak above imports: R&Q (fast) / original"] = (_above_imports(mem["pytorch: R&Q (fast)"])
                                                                / _above_imports(mem["pytorch: original"]))
    # loading a checkpoint with Hugging Face peaks above the model's size by itself: the stages that load one
    # are also compared with a plain load + prefill of the original model
    plain = mem["pytorch: original"]["peak"]
    out["PyTorch original peak (load + prefill) / checkpoint"] = plain / ckpt
    out["rq-export peak / PyTorch original peak"] = export["peak"] / plain
    out["calibration peak / PyTorch original peak"] = mem["calibrate"]["peak"] / plain
    c = mem["calibrate"]
    if "calibration_peak" in c:
        out["calibration peak after loading, above the loaded model / model bytes"] = (
            (c["calibration_peak"] - c["loaded"]) / c["model_bytes"])
    evals = sorted((k for k in mem if k.startswith("eval_")), key=lambda k: int(k[5:]))
    out["rq eval peak: " + " vs ".join(f"{k[5:]} seqs" for k in evals)] = " vs ".join(
        f"{mem[k]['peak'] / 2**20:.0f} MiB" for k in evals)
    return out


def markdown(name: str, speeds: dict, mem: dict) -> str:
    lines = [f"#### {name}", "", "| tokens/s | " + " | ".join(speeds) + " |", "|---|" + "---:|" * len(speeds)]
    for engine in next(iter(speeds.values())):
        lines.append(f"| {engine} | " + " | ".join(f"{speeds[w][engine]:.1f}" for w in speeds) + " |")
    lines += ["", "| ratio | " + " | ".join(speeds) + " |", "|---|" + "---:|" * len(speeds)]
    r = ratios(speeds)
    for key in next(iter(r.values())):
        lines.append(f"| {key} | " + " | ".join(f"{r[w][key]:.2f}x" for w in speeds) + " |")
    lines += ["", "| memory | value |", "|---|---:|"]
    for key, value in memory_ratios(mem).items():
        lines.append(f"| {key} | {value if isinstance(value, str) else f'{value:.2f}x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and two repeats (smoke test)")
    parser.add_argument("--models", default="demo,mid", help="comma-separated: demo, mid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="where speed_memory.json goes (default: print only)")
    parser.add_argument("--workdir", type=Path, help="where builds go (default: a temporary folder)")
    parser.add_argument("--mixed", action="store_true", help="also time a mixed INT4/INT8 plan's engines")
    parser.add_argument("--int8-activations", action="store_true",
                        help="also time an R&Q build exported with --ort-int8-activations (ORT and onnxruntime-genai)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="comma-separated engine families to time: pytorch, ort, genai (default: all)")
    parser.add_argument("--only", choices=("speed", "memory"),
                        help="measure only this half; the other half is kept from --out's stored run")
    args = parser.parse_args(argv)
    families = tuple(f.strip() for f in args.runtimes.split(",") if f.strip())
    if not families or set(families) - set(RUNTIMES):
        parser.error(f"--runtimes takes a comma-separated subset of {', '.join(RUNTIMES)}, got {args.runtimes!r}")
    if args.mixed and "pytorch" not in families:
        parser.error("--mixed times the mixed plan's PyTorch engine too; add pytorch to --runtimes")
    from rq.demo.corpus import demo_checkpoint_dir

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rq-bench-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    repeats = 2 if args.quick else args.repeats
    stored = args.out / "speed_memory.json" if args.out is not None else None
    results = {"machine": {"platform": platform.platform(), "cores": len(os.sched_getaffinity(0)),
                           "loadavg_start": list(os.getloadavg()), "threads": 1}, "models": {}}
    if args.only and stored is not None and stored.is_file():
        results["models"] = json.loads(stored.read_text())["models"]
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        folder = work / name
        folder.mkdir(exist_ok=True)
        if name == "demo":
            model_dir, group = demo_checkpoint_dir(), 128
        elif name == "mid":
            model_dir = folder / "checkpoint"
            if not (model_dir / "config.json").is_file():
                build_mid_size(model_dir, quick=args.quick)
            group = 128
        else:
            parser.error(f"unknown model {name!r}; choose demo or mid")
        plan, identity, mixed = make_plans(model_dir, folder, group, sequences=4 if args.quick else 16,
                                           seq_len=32 if args.quick else 128)
        started = time.perf_counter()
        small = name == "demo" or args.quick
        entry = results["models"].setdefault(name, {})
        export = measured_export(model_dir, plan, folder / "rq-build")
        builds = {"rq": folder / "rq-build", **baseline_builds(model_dir, identity, folder, batched_mm=small)}
        if args.int8_activations:
            builds["rq-int8"] = folder / "rq-int8-build"
            measured_export(model_dir, plan, builds["rq-int8"], int8_activations=True)
        if args.mixed:
            builds["mixed"] = folder / "mixed-build"
            measured_export(model_dir, mixed, builds["mixed"])
        if args.only != "memory":
            entry["speeds"] = speed(model_dir, plan, builds, repeats, reference=small, mixed=mixed if args.mixed else None,
                                    families=families)
            entry["ratios"] = ratios(entry["speeds"])
        if args.only != "speed":
            kept = entry.get("memory", {}) if "pytorch" not in families else {}  # the stages not re-measured
            entry["memory"] = {**kept, "export": export, **memory(model_dir, plan, builds, args.quick, families)}
            entry["memory_ratios"] = memory_ratios(entry["memory"])
        entry["seconds " + (args.only or "speed and memory")] = time.perf_counter() - started
        if "speeds" in entry and "memory" in entry:
            print(markdown(f"{name} ({model_dir})", entry["speeds"], entry["memory"]), flush=True)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    if stored is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
