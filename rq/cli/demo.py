"""The ``rq demo`` command."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from rq.cli.app import command, quiet_transformers


@command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder: plan, stats, demo.json and the PNG plots.")] = Path("rq-demo"),
    quick: Annotated[bool, typer.Option(help="Reduced sizes (seconds): same steps, fewer tokens.")] = False,
    model_dir: Annotated[Optional[Path], typer.Option(
        help="Another checkpoint to run the demo on (default: built-in).")] = None,
) -> None:
    """Calibrate, plan and evaluate the built-in demo MoE (trained on Python's stdlib): LIS tables + plots."""
    import os

    import torch

    from rq.demo.pipeline import DemoSettings, run_demo

    quiet_transformers()
    # the demo model is tiny: one thread avoids oversubscription on shared cores (RQ_THREADS overrides)
    torch.set_num_threads(int(os.environ.get("RQ_THREADS", "1")))
    run_demo(out, DemoSettings.quick() if quick else DemoSettings(), model_dir)
