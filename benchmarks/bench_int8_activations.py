"""What ``rq export --ort-int8-activations`` costs in accuracy: perplexity on ONNX Runtime of the original model,
the R&Q export (exact) and the same plan with ``QMoE`` on int8 activations, on the demo's held-out code and prose.

    python -m benchmarks.bench_int8_activations --json benchmarks/plots/int8_activations.json

All three run as ``model.ort.onnx`` on ONNX Runtime's fused kernels (the original: the identity plan's export, as
in ``bench_speed``), teacher-forced over ``--sequences`` x ``--seq-len`` tokens of each split in batches of 8
(offsets at 0: batch mode). Against the original: perplexity change, next-token top-1 agreement, mean KL
(docs/spec.md §9 accuracy metrics); and the int8 export against the exact one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

BUILDS = ("original", "R&Q exact", "R&Q int8 activations")


def build_all(model_dir: Path, work: Path, calibration_sequences: int) -> dict[str, Path]:
    """The plan (budget 1.0, calibrated on the demo's code split) exported exactly and with int8 activations,
    and the identity plan's export (the original on the same fused kernels)."""
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.demo import corpus
    from rq.export import export_model
    from rq.models.adapters import load_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import save_plan

    model, adapter = load_model(model_dir)
    data = load_token_data(load_tokenizer(model_dir), corpus.split_path("calibration"), seq_len=128,
                           max_sequences=calibration_sequences)
    stats = calibrate(model, adapter, data, group_size=64, show_progress=False)
    save_plan(make_plan(stats, PlanOptions(budget_factor=1.0)), work / "plan.json")
    save_plan(make_plan(stats, PlanOptions(budget_factor=1.0, max_replicas=0)), work / "identity.json")
    builds = dict(zip(BUILDS, (work / "identity", work / "rq", work / "rq-int8")))
    export_model(model_dir, work / "identity.json", builds["original"], force=True, check=False, show_progress=False)
    export_model(model_dir, work / "plan.json", builds["R&Q exact"], force=True, show_progress=False)
    export_model(model_dir, work / "plan.json", builds["R&Q int8 activations"], force=True, show_progress=False,
                 ort_int8_activations=True)
    return builds


def logits_of(build: Path, sequences: torch.Tensor, batch: int = 8) -> list[np.ndarray]:
    """``model.ort.onnx``'s logits per batch, teacher-forced, offsets at 0."""
    from rq.export.runtime import OrtGenerator

    generator = OrtGenerator(build, streaming=False)
    out = []
    for start in range(0, len(sequences), batch):
        generator.reset()
        out.append(generator.prefill(sequences[start:start + batch].numpy()).logits)
    return out


def compare(sequences: torch.Tensor, base: list[np.ndarray], other: list[np.ndarray]) -> dict:
    from rq.eval.evaluate import AccuracyAccumulator

    acc = AccuracyAccumulator(encoder_decoder=False)
    start = 0
    for lo, lr in zip(base, other):  # one entry per batch of logits_of
        acc.add(sequences[start:start + len(lo)], torch.from_numpy(lo), torch.from_numpy(lr))
        start += len(lo)
    result = acc.result()
    return {"ppl_base": result.ppl_original, "ppl": result.ppl_rq, "ppl_change_pct": result.ppl_change_pct,
            "top1_agreement": result.top1_agreement, "mean_kl": result.kl_mean}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--workdir", type=Path, help="where the builds go (default: a temporary folder)")
    args = parser.parse_args(argv)
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.demo import corpus
    from rq.demo.corpus import demo_checkpoint_dir

    model_dir = demo_checkpoint_dir()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rq-bench-int8-"))
    work.mkdir(parents=True, exist_ok=True)
    builds = build_all(model_dir, work, args.calibration_sequences)
    tokenizer = load_tokenizer(model_dir)
    results = {"sequences": args.sequences, "seq_len": args.seq_len, "splits": {}}
    table = Table(title="ONNX Runtime (model.ort.onnx), teacher-forced: against the original's export")
    for col in ("split", "engine", "perplexity", "ppl change", "top-1 agreement", "mean KL"):
        table.add_column(col)
    for split in ("heldout_code", "heldout_prose"):
        sequences = load_token_data(tokenizer, corpus.split_path(split), seq_len=args.seq_len,
                                    max_sequences=args.sequences).sequences
        logits = {name: logits_of(path, sequences) for name, path in builds.items()}
        entry = {name: compare(sequences, logits["original"], logits[name]) for name in BUILDS[1:]}
        entry["int8 vs exact"] = compare(sequences, logits["R&Q exact"], logits["R&Q int8 activations"])
        results["splits"][split] = entry
        table.add_row(split, "original", f"{entry['R&Q exact']['ppl_base']:.4f}", "", "", "")
        for name in BUILDS[1:]:
            r = entry[name]
            table.add_row("", name, f"{r['ppl']:.4f}", f"{r['ppl_change_pct']:+.3f} %", f"{r['top1_agreement']:.4f}",
                          f"{r['mean_kl']:.2e}")
        r = entry["int8 vs exact"]
        table.add_row("", "int8 vs exact", "", f"{r['ppl_change_pct']:+.3f} %", f"{r['top1_agreement']:.4f}",
                      f"{r['mean_kl']:.2e}")
    Console(width=140).print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
