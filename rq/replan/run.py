"""``rq replan`` and ``rq import-loads tritonserver``: re-plan from the loads a server served, with guards.

:func:`replan`: the running plan (``plan.json`` of the version the repository serves) and the calibration stats it
was made from, plus a window of served loads (:mod:`rq.replan.served`) -> a new plan with the same budget,
importance metric and options (:func:`replan_options`), judged on the served loads by the replica rule
(:func:`plan_lis_on`). It is published only when its predicted LIS beats the running plan's by ``margin`` and its
export passes the parity check; then it becomes the next version of the repository (:mod:`rq.replan.publish`)
and, given the server's address, the server loads it. Otherwise nothing changes and the result says why.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rq.atomic import atomic_write_text
from rq.calibrate.stats import CalibrationStats
from rq.core.lis import lis_value, model_lis
from rq.core.replica import split_load
from rq.engines.tritonserver import GENERATE, repository_info
from rq.errors import RQError
from rq.plan.planner import PlanOptions, make_plan
from rq.plan.schema import Plan, load_plan, save_plan
from rq.replan.publish import load_models, publish_version, served_version, version_build
from rq.engines.tritonserver_client import parse_metrics
from rq.replan.served import read_scrape, read_scrape_text, served_stats, window_loads


def plan_lis_on(plan: Plan, loads: torch.Tensor) -> list[float]:
    """Per-layer LIS over the plan's copies when the layers receive ``loads [L, N]`` (docs/spec.md §2, §4)."""
    out = []
    for layer, load in zip(plan.layers, loads):
        logcnt = torch.tensor([1 + e.replicas for e in layer.experts], dtype=torch.int64)
        out.append(lis_value(split_load(load.to(torch.int64), logcnt)))
    return out


def replan_options(plan: Plan) -> PlanOptions:
    """The options the running plan was made with: budget factor, importance metric and the recorded options
    (those :class:`PlanOptions` knows)."""
    known = {f.name for f in dataclasses.fields(PlanOptions)}
    recorded = {k: v for k, v in plan.options.items() if k in known}
    recorded["hedge"] = bool(recorded.get("hedge"))  # recorded as the objective's name, absent when fitted (§6)
    return PlanOptions(**{**recorded, "budget_factor": plan.budget.budget_factor, "importance": plan.importance_metric})


@dataclass
class ReplanResult:
    """What :func:`replan` decided, with the numbers it decided on."""

    running_version: int
    published: int | None  # the version published, None when nothing changed
    reason: str
    lis_running: list[float]  # per layer, the running plan on the served loads
    lis_new: list[float]  # per layer, the new plan on the same loads
    assignments: int  # in the window
    planned_bytes: tuple[int, int]  # running, new
    seconds: dict[str, float] = field(default_factory=dict)  # plan, export, publish, load

    @property
    def model_lis(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return model_lis(self.lis_running), model_lis(self.lis_new)

    def summary(self) -> str:
        (old_mean, old_worst), (new_mean, new_worst) = self.model_lis
        lines = [f"served window: {self.assignments} assignments; LIS on it (mean / worst layer): running plan "
                 f"(version {self.running_version}) {old_mean:.2f} / {old_worst:.2f}, new plan {new_mean:.2f} / "
                 f"{new_worst:.2f}; expert bytes {self.planned_bytes[0]} -> {self.planned_bytes[1]}"]
        lines.append(f"published version {self.published}: {self.reason}" if self.published is not None
                     else f"nothing published: {self.reason}")
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _check_stats(stats: CalibrationStats, plan: Plan, stats_dir: Path) -> None:
    if stats.model.fingerprint != plan.model.fingerprint:
        raise RQError(f"{stats_dir} is not from the model the repository serves (fingerprint "
                      f"{stats.model.fingerprint[:12]} vs the running plan's {plan.model.fingerprint[:12]}); pass the "
                      f"calibration stats the running plan was made from")
    if stats.group_size != plan.quantization.group_size:
        raise RQError(f"{stats_dir} has INT4 group size {stats.group_size}, the running plan "
                      f"{plan.quantization.group_size}; pass the stats the running plan was made from")


def _window(metrics: str, since: str | Path | None, save_scrape: Path | None, stats: CalibrationStats) -> torch.Tensor:
    text = read_scrape_text(metrics)
    if save_scrape is not None:
        atomic_write_text(save_scrape, text)  # the start of the next window
    after = parse_metrics(text, "rq_moe_")
    before = read_scrape(since) if since is not None else None
    return window_loads(after, before, len(stats.layers), stats.model.num_experts)


def replan(repo: str | Path, metrics: str, stats_dir: str | Path, model_dir: str | Path, *,
           since: str | Path | None = None, save_scrape: str | Path | None = None, server: str | None = None,
           margin: float = 0.05, blend: float = 1.0, dry_run: bool = False, trust_remote_code: bool = False,
           echo: Callable[[str], None] | None = None) -> ReplanResult:
    """Re-plan the model ``repo`` serves from the loads in ``metrics`` (a ``/metrics`` URL or a saved scrape;
    the window starts at the scrape ``since``, else at server start), and publish it when it is better.

    stats_dir: the calibration stats of the running plan; model_dir: the checkpoint to export from; server: the
    server's HTTP host:port, to load the new version (else a server polling ``repo`` picks it up); margin: the new
    plan's mean LIS on the window must be below the running plan's / (1 + margin); blend: weight of the served
    loads against the calibration loads (:func:`rq.replan.served.served_stats`); dry_run: decide, publish nothing.
    """
    from rq.export import export_model
    from rq.export.api import ExportCheckFailed

    repo, stats_dir, model_dir = Path(repo), Path(stats_dir), Path(model_dir)
    say = echo or (lambda line: None)
    if margin < 0:
        raise RQError(f"--margin must be >= 0, got {margin}")
    repository_info(repo)  # one line naming the fix when REPO is not an rq repository
    version = served_version(repo)
    build = version_build(repo, version)
    running = load_plan(build / "plan.json")
    stats = CalibrationStats.load(stats_dir)
    _check_stats(stats, running, stats_dir)
    start = time.perf_counter()
    loads = _window(metrics, since, Path(save_scrape) if save_scrape is not None else None, stats)
    new_plan = make_plan(served_stats(stats, loads, f"served by {GENERATE} (window of {metrics})", blend),
                         replan_options(running))
    seconds = {"plan": time.perf_counter() - start}
    result = ReplanResult(version, None, "", plan_lis_on(running, loads), plan_lis_on(new_plan, loads),
                          int(loads.sum()), (running.budget.planned_bytes, new_plan.budget.planned_bytes), seconds)
    (old_mean, _), (new_mean, _) = result.model_lis
    if math.isnan(old_mean) or not new_mean * (1.0 + margin) <= old_mean:
        result.reason = (f"the new plan's LIS {new_mean:.3f} does not beat the running plan's {old_mean:.3f} by the "
                         f"margin {margin:g} on the served loads")
        return result
    if dry_run:
        result.reason = "dry run: the new plan would be published"
        return result
    say(f"new plan: LIS {old_mean:.2f} -> {new_mean:.2f} on the served window; exporting and checking parity")
    dtype, int8_activations = _export_options(build)  # the running export's, so the new version computes alike
    with tempfile.TemporaryDirectory(dir=repo.parent, prefix=f".{repo.name}.replan-") as tmp:
        save_plan(new_plan, Path(tmp) / "plan.json")
        t0 = time.perf_counter()
        try:
            export_model(model_dir, Path(tmp) / "plan.json", Path(tmp) / "build", dtype=dtype, check=True,
                         trust_remote_code=trust_remote_code, show_progress=False,
                         ort_int8_activations=int8_activations)
        except ExportCheckFailed as err:
            result.reason = f"the new export failed its parity check ({err})"
            return result
        seconds["export"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        note = {"lis_on_window": {"running": old_mean, "new": new_mean}, "replaced": version}
        result.published = publish_version(repo, Path(tmp) / "build", note)
        seconds["publish"] = time.perf_counter() - t0
    if server is not None:
        t0 = time.perf_counter()
        load_models(server, repo, result.published)
        seconds["load"] = time.perf_counter() - t0
        result.reason = f"LIS {old_mean:.2f} -> {new_mean:.2f} on the served window; the server now serves it"
    else:
        result.reason = (f"LIS {old_mean:.2f} -> {new_mean:.2f} on the served window; load it with --server, "
                         f"or a server polling {repo} loads it by itself")
    return result


def _export_options(build: Path) -> tuple[str, bool]:
    """The running export's activation dtype and whether its fused route runs on int8 activations."""
    from rq.export.runtime import load_manifest

    manifest = load_manifest(build)
    return str(manifest.get("dtype", "float32")), bool(manifest.get("ort_int8_activations", False))


def import_served(inputs: list[str | Path], config: str | Path, out: str | Path, group_size: int = 128):
    """``rq import-loads tritonserver``: one scrape (loads since the server started) or two (the window between
    them: earlier first) -> rq stats in ``out``, importance = frequency like every engine import."""
    from rq.placement.formats import model_shape
    from rq.placement.loads import stats_from_loads

    if len(inputs) not in (1, 2):
        raise RQError("pass one scrape (a /metrics URL or saved file) or two (the window between them, earlier first)")
    if group_size not in (64, 128):
        raise RQError(f"--group-size must be 64 or 128, got {group_size}")
    shape = model_shape(config)
    before = read_scrape(inputs[0]) if len(inputs) == 2 else None
    after = read_scrape(inputs[-1])
    loads = window_loads(after, before, len(shape.moe_layers), shape.num_experts)
    names = " .. ".join(str(p) for p in inputs)
    stats = stats_from_loads(loads, shape, f"tritonserver expert loads from {names}", group_size)
    stats.save(out)
    return stats
