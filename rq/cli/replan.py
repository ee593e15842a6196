"""``rq replan``: re-plan a served model from the loads its Triton Inference Server served, and publish it as the
next model version (docs/tritonserver.md, "Re-planning from served traffic"); ``rq import-loads tritonserver``
reads the same loads into stats (dispatched from :mod:`rq.cli.placement`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rq.cli.app import command

_HELP = {
    "metrics": "Triton's metrics: http://HOST:8002/metrics, or a scrape saved with --save-scrape",
    "since": "a scrape saved earlier (--save-scrape): the window starts there (default: since the server started)",
    "save": "save this scrape here, to start the next window with --since",
    "stats": "the calibration stats the running plan was made from (shapes, bytes, importance)",
    "model": "the Hugging Face checkpoint the repository serves (the new plan is exported from it)",
    "server": "the server's HTTP host:port (e.g. localhost:8000): load the new version through Triton's repository "
              "API (--model-control-mode=explicit)",
    "margin": "publish only when the new plan's mean LIS on the window is below the running plan's / (1 + margin)",
    "blend": "weight of the served loads against the calibration loads (1: served only)",
}


@command("replan")
def replan(
    repo: Annotated[Path, typer.Argument(help="the Triton model repository the server serves (rq tritonserver)")],
    metrics: Annotated[Optional[str], typer.Option(help=_HELP["metrics"])] = None,
    stats_dir: Annotated[Optional[Path], typer.Option("--stats", help=_HELP["stats"])] = None,
    model_dir: Annotated[Optional[Path], typer.Option("--model", help=_HELP["model"])] = None,
    since: Annotated[Optional[Path], typer.Option(help=_HELP["since"])] = None,
    save_scrape: Annotated[Optional[Path], typer.Option(help=_HELP["save"])] = None,
    server: Annotated[Optional[str], typer.Option(help=_HELP["server"])] = None,
    margin: Annotated[float, typer.Option(help=_HELP["margin"])] = 0.05,
    blend: Annotated[float, typer.Option(help=_HELP["blend"])] = 1.0,
    dry_run: Annotated[bool, typer.Option(help="decide and report, publish nothing")] = False,
    rollback: Annotated[bool, typer.Option(help="serve the previous version again (with --server: load it now)")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow checkpoints that ship their own modeling code")] = False,
) -> None:
    """Re-plan from the traffic the server served (same budget and model), and publish the new plan as the next
    model version only if it lowers LIS on that traffic by the margin and its export passes the parity check;
    requests in flight finish on the old version. --rollback goes back to the previous version."""
    from rq.errors import RQError

    if rollback:
        from rq.replan.publish import load_models, rollback as roll_back

        latest, target = roll_back(repo)
        if server is not None:
            load_models(server, repo, target)
        typer.echo(f"version {latest} moved aside; {repo} serves version {target}"
                   + ("" if server else " once the server loads it (--server, or a polling server)"))
        return
    missing = [name for name, value in (("--metrics", metrics), ("--stats", stats_dir), ("--model", model_dir))
               if value is None]
    if missing:
        raise RQError(f"rq replan needs {', '.join(missing)} (or --rollback); see `rq replan --help`")
    from rq.replan.run import replan as run_replan

    result = run_replan(repo, metrics, stats_dir, model_dir, since=since, save_scrape=save_scrape, server=server,
                        margin=margin, blend=blend, dry_run=dry_run, trust_remote_code=trust_remote_code,
                        echo=typer.echo)
    typer.echo(result.summary())


def import_tritonserver(inputs: list[Path], config: Path, out: Path, group_size: int, quiet: bool) -> None:
    """``rq import-loads tritonserver SCRAPE [SCRAPE]``: one scrape (since server start) or two (a window)."""
    from rq.replan.run import import_served

    stats = import_served(inputs, config, out, group_size)
    if not quiet:
        typer.echo(f"{len(stats.layers)} MoE layers x {stats.model.num_experts} experts, {stats.calibration.tokens} "
                   f"tokens served by Triton -> {out} (importance metrics are the load: plan with frequency, or "
                   f"`rq replan` to keep the calibration importance)")
