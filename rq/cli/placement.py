"""Expert-parallel placement commands: ``rq place`` and ``rq import-loads`` (docs/multi-gpu.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rq.cli.app import command
from rq.placement import ENGINES, FORMATS

_HELP = {
    "stats": "the calibration stats the plan was made from (exact loads and bytes)",
    "heldout": "stats on held-out data, to judge the placement on loads it was not fitted to",
    "config": "the model's Hugging Face config.json (layer count, router groups)",
    "groups": "router expert groups kept on one node (default: config n_group, else 1)",
    "slots": "engine slots per device (default: from --pad)",
    "pad": "one P for all layers: 'replicate' up to the largest layer, 'trim' down to the smallest "
           "(stays within the plan's bytes), 'error' refuse",
    "inputs": "dump file(s): SGLang recorder .pt, vLLM EPLB state .pt/.safetensors/.json, or the TensorRT-LLM "
              "statistic folder",
    "placement": "TensorRT-LLM only: the load balancer YAML the server ran with (moe_config.load_balancer); its "
                 "statistics then count slot ids, which this maps to logical experts; 'none' if it ran without one "
                 "(required when the statistics count as many ids as there are experts)",
}


@command("place")
def place(
    plan_path: Annotated[Path, typer.Argument(help="plan.json made by `rq plan`")],
    devices: Annotated[int, typer.Option("--devices", "-g", help="expert-parallel devices (EP size)")],
    nodes: Annotated[int, typer.Option(help="nodes; > 1 packs copies per node first, then per device")] = 1,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("placement"),
    stats_dir: Annotated[Optional[Path], typer.Option("--stats", help=_HELP["stats"])] = None,
    heldout_stats: Annotated[Optional[Path], typer.Option("--heldout", help=_HELP["heldout"])] = None,
    config: Annotated[Optional[Path], typer.Option(help=_HELP["config"])] = None,
    groups: Annotated[Optional[int], typer.Option(help=_HELP["groups"])] = None,
    slots_per_device: Annotated[Optional[int], typer.Option(help=_HELP["slots"])] = None,
    pad: Annotated[str, typer.Option(help=_HELP["pad"])] = "replicate",
    formats: Annotated[str, typer.Option(help=f"comma-separated subset of {','.join(FORMATS)}")] = ",".join(FORMATS),
    plots: Annotated[bool, typer.Option(help="write PNG plots (one per layer and a summary)")] = True,
    batch_tokens: Annotated[int, typer.Option(help="tokens of one forward pass on one rank, for the engines' "
                                                   "row-based dispatch rules")] = 8192,
    quiet: Annotated[bool, typer.Option(help="print nothing")] = False,
    previous: Annotated[Optional[Path], typer.Option(help="an earlier `rq place` output of this model: report the "
                                                          "copies each device would load and drop")] = None,
) -> None:
    """Place an R&Q plan's copies on DEVICES GPUs and write the placement for SGLang, vLLM, TensorRT-LLM and
    DeepSeek EPLB, with a device-balance simulation against EPLB (report.md, plots/)."""
    from rq.placement.run import place_plan, single_thread

    with single_thread():
        place_plan(plan_path, devices=devices, nodes=nodes, out_dir=out_dir, stats_dir=stats_dir,
                   heldout_stats=heldout_stats, config=config, groups=groups, slots_per_device=slots_per_device,
                   pad=pad, formats=formats, plots=plots, batch_tokens=batch_tokens,
                   echo=None if quiet else typer.echo, warn=None if quiet else (lambda line: typer.echo(line, err=True)),
                   previous=previous)


@command("import-loads")
def import_loads(
    engine: Annotated[str, typer.Argument(help=f"engine that recorded the loads: {', '.join(ENGINES)}, tritonserver")],
    inputs: Annotated[list[Path], typer.Argument(help=_HELP["inputs"])],
    config: Annotated[Path, typer.Option(help="the model's Hugging Face config.json")],
    out: Annotated[Path, typer.Option("--out", help="stats folder to write (stats.json + stats.safetensors)")],
    group_size: Annotated[int, typer.Option(help="INT4 group size the plan will use (64 or 128)")] = 128,
    placement: Annotated[Optional[Path], typer.Option(help=_HELP["placement"])] = None,
    quiet: Annotated[bool, typer.Option(help="print nothing")] = False,
) -> None:
    """Turn per-expert loads recorded by a serving engine into rq stats, for `rq plan` (importance = frequency).
    `tritonserver`: rq's own Triton metrics, one scrape (a /metrics URL or saved file) or two (the window between)."""
    if engine == "tritonserver":
        from rq.cli.replan import import_tritonserver

        return import_tritonserver(inputs, config, out, group_size, quiet)
    from rq.placement.run import import_stats

    stats = import_stats(engine, inputs, config, out, group_size, placement)
    if not quiet:
        typer.echo(f"{len(stats.layers)} MoE layers x {stats.model.num_experts} experts, {stats.calibration.tokens} "
                   f"tokens from {engine} -> {out} (importance metrics are the load: plan with frequency)")
