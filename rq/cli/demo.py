"""The ``rq demo`` command."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from rq.cli.app import command, quiet_transformers
from rq.errors import RQError


@command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder: plan, stats, demo.json and the PNG plots.")] = Path("rq-demo"),
    quick: Annotated[bool, typer.Option(help="Reduced sizes (seconds): same steps, fewer tokens.")] = False,
    model_dir: Annotated[Optional[Path], typer.Option(
        help="Another checkpoint to run the demo on (default: built-in).")] = None,
    generate: Annotated[int, typer.Option(help="Calibration also records routing on this many generated tokens per "
                                               "sequence, and the plan hedges for them (docs/spec.md §6); 0: none, "
                                               "the plan fits the calibration text.")] = 33,
) -> None:
    """Calibrate, plan and evaluate the built-in demo MoE (trained on Python's stdlib): LIS tables + plots."""
    import dataclasses
    import os

    import torch

    from rq.demo.pipeline import DemoSettings, run_demo

    quiet_transformers()
    # the demo model is tiny: one thread avoids oversubscription on shared cores (RQ_THREADS overrides)
    torch.set_num_threads(int(os.environ.get("RQ_THREADS", "1")))
    if generate < 0:
        raise RQError(f"--generate must be 0 or more new tokens, got {generate}")
    settings = DemoSettings.quick() if quick else DemoSettings()
    run_demo(out, dataclasses.replace(settings, generate=generate), model_dir)
