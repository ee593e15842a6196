"""Pipeline commands: ``rq calibrate`` -> ``rq plan`` -> ``rq eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from rq.cli.app import DTYPE_HELP, command, console, parse_device, parse_dtype, parse_int_list, quiet_transformers
from rq.errors import RQError

STREAM_HELP = ("always: one decoder layer in memory at a time, read from the checkpoint when a pass reaches it; "
               "never: layers stay once read; auto: stream unless the model takes under half the free memory.")


@command()
def calibrate(
    model_dir: Path = typer.Argument(..., help="Local Hugging Face checkpoint folder (config.json, safetensors, tokenizer)."),
    data: Path = typer.Option(..., "--data", help="Text file, or folder of text files, to calibrate on."),
    out: Path = typer.Option(..., "--out", help="Folder: stats.json + stats.safetensors (replaced whole)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration sequence."),
    sequences: int = typer.Option(128, help="Number of sequences (max); fewer if the data is shorter."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    group_size: int = typer.Option(128, help="INT4 block size for quant_sensitivity: 128 or 64."),
    seed: int = typer.Option(0, help="Seed that picks which sequences are used."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow checkpoints that ship their own modeling code."),
    device: str = typer.Option("cpu", help="Where to run the model: cpu, cuda, cuda:1, ... (one decoder layer "
                                           "there at a time)"),
    stream: str = typer.Option("auto", help=STREAM_HELP),
) -> None:
    """Record per-layer expert loads and importance (gate mass, contribution, INT4 sensitivity).

    The model streams: one decoder layer is read from the checkpoint at a time, so models larger than memory
    calibrate."""
    from rq.models.streaming import open_streamed
    from rq.calibrate.accumulate import calibrate as run
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.core.int4 import check_group_size
    from rq.atomic import check_out_dir

    quiet_transformers()
    check_out_dir(out, force=True)  # before the model loads: a file in the way is an error in a second, not an hour
    try:
        check_group_size(group_size)
    except ValueError as err:
        raise RQError(str(err)) from None
    streamed = open_streamed(model_dir, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code,
                             device=parse_device(device))
    streamed.keep_layers(stream)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    token_data = load_token_data(tokenizer, data, seq_len=seq_len, max_sequences=sequences, seed=seed)
    stats = run(streamed, streamed.adapter, token_data, batch_size=batch_size, group_size=group_size, seed=seed)
    stats.save(out)
    total = sum(int(s.load.sum()) for s in stats.layers)
    console.print(f"calibrated {len(stats.layers)} MoE layers on {token_data.tokens:,} tokens "
                  f"({total:,} assignments) -> {out}")


@command()
def plan(
    stats_dir: Path = typer.Argument(..., help="Output folder of `rq calibrate`."),
    out: Path = typer.Option(Path("plan.json"), "--out", help="File: the plan.json to write."),
    budget: float = typer.Option(1.0, help="Memory budget as a multiple of the original expert bytes, per layer."),
    importance: str = typer.Option("quant_sensitivity", help="frequency, gate_mass, contribution or quant_sensitivity."),
    max_quantized_fraction: float = typer.Option(0.5, help="At most this fraction of a layer's experts go INT4."),
    max_replicas: int = typer.Option(7, help="At most this many INT4 replicas per expert."),
    lis_tolerance: float = typer.Option(0.0, help="Keep the fewest replicas whose predicted LIS is within "
                                                  "(1 + this) of the best: trades a little balance for accuracy."),
    precisions: str = typer.Option("int4", help="Quantized formats copies may use: int4, int8 or int4,int8 (with "
                                                "int8: the exact per-layer solver, least predicted error)."),
) -> None:
    """Choose each copy's precision and the replicas per layer within the memory budget; write a validated plan.json."""
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.solver import parse_precisions
    from rq.eval.report import plan_table
    from rq.plan.schema import save_plan
    from rq.calibrate.stats import CalibrationStats
    from rq.atomic import check_out_file

    check_out_file(out)
    stats = CalibrationStats.load(stats_dir)
    result = make_plan(stats, PlanOptions(budget_factor=budget, importance=importance,
                                          max_quantized_fraction=max_quantized_fraction, max_replicas=max_replicas,
                                          lis_tolerance=lis_tolerance, precisions=parse_precisions(precisions)))
    save_plan(result, out)
    console.print(plan_table(result))
    console.print(f"plan written to {out}")


@command("eval")
def eval_(
    model_dir: Path = typer.Argument(..., help="The checkpoint the plan was made for."),
    plan_path: Path = typer.Option(..., "--plan", help="plan.json from `rq plan`."),
    data: Path = typer.Option(..., "--data", help="Held-out text file or folder."),
    seq_len: int = typer.Option(256, help="Tokens per evaluation sequence."),
    sequences: int = typer.Option(64, help="Number of evaluation sequences (max)."),
    batch_sizes: str = typer.Option("1,4,16,64", help="Batch sizes (sequences per call) for batch LIS."),
    stream_batch: int = typer.Option(16, help="Concurrent sequences in streaming generation (tokens per decode step)."),
    stream_steps: int = typer.Option(32, help="Decode steps of streaming generation (0 to skip)."),
    seed: int = typer.Option(0, help="Seed that picks which sequences are used."),
    out: Optional[Path] = typer.Option(None, "--out", help="File: also write the numbers here as JSON."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow checkpoints that ship their own modeling code."),
    device: str = typer.Option("cpu", help="Where to run both models: cpu, cuda, cuda:1, ... (one decoder layer "
                                           "of each there at a time)"),
    stream: str = typer.Option("auto", help=STREAM_HELP),
) -> None:
    """LIS before/after (batch sizes and streaming, cumulative and instantaneous) and accuracy parity.

    Both models stream in lockstep: one decoder layer and its R&Q version in memory at a time."""
    from rq.models.streaming import open_streamed
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.eval.evaluate import evaluate
    from rq.eval.report import print_eval
    from rq.eval.streamed import StreamedPair
    from rq.plan.schema import load_plan
    from rq.atomic import atomic_write_text, check_out_file

    quiet_transformers()
    if out is not None:
        check_out_file(out)
    plan_doc = load_plan(plan_path)
    sizes = parse_int_list(batch_sizes, "--batch-sizes")
    streamed = open_streamed(model_dir, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code,
                             device=parse_device(device))
    streamed.keep_layers(stream, copies=2)
    pair = StreamedPair(streamed, plan_doc)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    token_data = load_token_data(tokenizer, data, seq_len=seq_len, max_sequences=sequences, seed=seed)
    report = evaluate(pair, None, streamed.adapter, token_data.sequences, batch_sizes=sizes,
                      stream_batch=stream_batch, stream_steps=stream_steps)
    print_eval(report, console)
    if out is not None:
        atomic_write_text(out, json.dumps({"data": token_data.description, **report.to_json()}, indent=2) + "\n")
        console.print(f"numbers written to {out}")
