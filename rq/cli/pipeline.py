"""Pipeline commands: ``rq calibrate`` -> ``rq plan`` -> ``rq eval``."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from rq.cli.app import DTYPE_HELP, command, console, parse_device, parse_dtype, parse_int_list, quiet_transformers
from rq.errors import RQError

STREAM_HELP = ("always: one decoder layer in memory at a time, read from the checkpoint when a pass reaches it; "
               "never: layers stay once read; auto: stream unless the model takes under half the free memory.")


@command()
def calibrate(
    model_dir: Annotated[Path, typer.Argument(
        help="Local Hugging Face checkpoint folder (config.json, safetensors, tokenizer).")],
    data: Annotated[list[Path], typer.Option("--data", help="Text file, or folder of text files, to calibrate on; "
                                                            "repeat it, one per domain the model serves (windows "
                                                            "then follow the domains).")],
    out: Annotated[Path, typer.Option("--out", help="Folder: stats.json + stats.safetensors (replaced whole).")],
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 512,
    sequences: Annotated[int, typer.Option(help="Number of sequences (max); fewer if the data is shorter.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    group_size: Annotated[int, typer.Option(help="INT4 block size for quant_sensitivity: 128 or 64.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed that picks which sequences are used.")] = 0,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow checkpoints that ship their own modeling code.")] = False,
    device: Annotated[str, typer.Option(help="Where to run the model: cpu, cuda, cuda:1, ... (one decoder layer "
                                             "there at a time)")] = "cpu",
    stream: Annotated[str, typer.Option(help=STREAM_HELP)] = "auto",
    window: Annotated[int, typer.Option(help="Sequences per traffic window: loads are also kept per window, for "
                                             "`rq plan --hedge`.")] = 16,
    generate: Annotated[int, typer.Option(help="Also record routing on the model's own greedy generation of this "
                                               "many new tokens per sequence (decode routes differently; `rq plan` "
                                               "then hedges for it), e.g. 33; 0: none. A streamed model makes one "
                                               "more pass over the checkpoint per token.")] = 0,
    generate_window: Annotated[int, typer.Option(help="Sequences per generation call and per generated window.")] = 8,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (from each sequence's start) that generation "
                                                 "continues.")] = 16,
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
    for name, value in (("--window", window), ("--generate-window", generate_window), ("--prompt-len", prompt_len)):
        if value < 1:
            raise RQError(f"{name} must be at least 1, got {value}")
    if generate < 0:
        raise RQError(f"--generate must be 0 or more new tokens, got {generate}")
    if generate and not streamed.keep:
        console.print(f"recording {generate} generated tokens per sequence: {generate} more passes over the streamed "
                      f"checkpoint (--generate 0 skips them; `rq plan` then fits the calibration text, unhedged)")
    stats = run(streamed, streamed.adapter, token_data, batch_size=batch_size, group_size=group_size, seed=seed,
                window=window, generate=generate, generate_window=generate_window, prompt_len=prompt_len)
    stats.save(out)
    total = sum(int(s.load.sum()) for s in stats.layers)
    w = stats.windows
    extra = f", {w.generated} windows of {w.generated_tokens} generated tokens per sequence" if w and w.generated else ""
    console.print(f"calibrated {len(stats.layers)} MoE layers on {token_data.tokens:,} tokens "
                  f"({total:,} assignments{extra}) -> {out}")
    if not generate:
        console.print("no decode routing recorded: `rq plan` fits the calibration text, which can lose to no balancing "
                      "on decode; --generate 33 records it and the plan hedges (docs/spec.md §6)")


@command()
def plan(
    stats_dir: Annotated[Path, typer.Argument(help="Output folder of `rq calibrate`.")],
    out: Annotated[Path, typer.Option("--out", help="File: the plan.json to write.")] = Path("plan.json"),
    budget: Annotated[float, typer.Option(
        help="Memory budget as a multiple of the original expert bytes, per layer.")] = 1.0,
    importance: Annotated[str, typer.Option(
        help="frequency, gate_mass, contribution or quant_sensitivity.")] = "quant_sensitivity",
    max_quantized_fraction: Annotated[float, typer.Option(
        help="At most this fraction of a layer's experts go INT4.")] = 0.5,
    max_replicas: Annotated[int, typer.Option(help="At most this many INT4 replicas per expert.")] = 7,
    lis_tolerance: Annotated[float, typer.Option(help="Keep the fewest replicas whose predicted LIS is within "
                                                      "(1 + this) of the best: trades a little balance for accuracy."
                                                 )] = 0.0,
    precisions: Annotated[str, typer.Option(help="Quantized formats copies may use: int4, int8 or int4,int8 (with "
                                                 "int8: the exact per-layer solver, least predicted error).")] = "int4",
    hedge: Annotated[Optional[bool], typer.Option(
        "--hedge/--no-hedge", help="Plan for the worst traffic window of the stats (calibration chunks and generations) "
                                   "so that none gets worse than no balancing, or fit their sum. Default: hedge when "
                                   "the stats record generations (`rq calibrate --generate`).",
        show_default=False)] = None,
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
                                          lis_tolerance=lis_tolerance, precisions=parse_precisions(precisions),
                                          hedge=hedge))
    save_plan(result, out)
    console.print(plan_table(result))
    console.print(f"plan written to {out}")


@command("eval")
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="The checkpoint the plan was made for.")],
    plan_path: Annotated[Path, typer.Option("--plan", help="plan.json from `rq plan`.")],
    data: Annotated[Path, typer.Option("--data", help="Held-out text file or folder.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluation sequence.")] = 256,
    sequences: Annotated[int, typer.Option(help="Number of evaluation sequences (max).")] = 64,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes (sequences per call) for batch LIS.")] = "1,4,16,64",
    stream_batch: Annotated[int, typer.Option(
        help="Concurrent sequences in streaming generation (tokens per decode step).")] = 16,
    stream_steps: Annotated[int, typer.Option(help="Decode steps of streaming generation (0 to skip).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed that picks which sequences are used.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="File: also write the numbers here as JSON.")] = None,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow checkpoints that ship their own modeling code.")] = False,
    device: Annotated[str, typer.Option(help="Where to run both models: cpu, cuda, cuda:1, ... (one decoder layer "
                                             "of each there at a time)")] = "cpu",
    stream: Annotated[str, typer.Option(help=STREAM_HELP)] = "auto",
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
