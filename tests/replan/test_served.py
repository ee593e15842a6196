"""Served loads -> stats (rq.replan.served) and the re-plan decision's math (rq.replan.run), without a server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rq.core.lis import lis_value
from rq.core.replica import split_load
from rq.errors import RQError
from rq.plan.planner import PlanOptions, make_plan
from rq.replan.run import plan_lis_on, replan_options
from rq.replan.served import read_scrape, served_stats, window_loads
from rq.testing.synthetic import synthetic_stats


def _scrape(values: dict[tuple[str, int, int, int], float], model: str = "generate") -> str:
    """Prometheus text as Triton writes rq's counter: ``{(version, layer, expert, copy): value}``."""
    lines = ["# HELP rq_moe_expert_load_total Assignments served per physical expert copy",
             "# TYPE rq_moe_expert_load_total counter"]
    for (version, layer, expert, copy), value in values.items():
        lines.append(f'rq_moe_expert_load_total{{copy="{copy}",expert="{expert}",layer="{layer}",model="{model}",'
                     f'version="{version}"}} {value}')
    lines.append('nv_inference_count{model="generate",version="1"} 7')
    return "\n".join(lines) + "\n"


def test_window_sums_copies_and_versions_and_differences_scrapes(tmp_path):
    before = tmp_path / "before.prom"
    before.write_text(_scrape({("1", 0, 0, 0): 5, ("1", 0, 0, 1): 4, ("1", 0, 1, 0): 2, ("1", 1, 0, 0): 3}))
    after = tmp_path / "after.prom"
    # version 2 appeared in between (counts from 0); layer 1 expert 0's series of version 1 is gone (unloaded)
    after.write_text(_scrape({("1", 0, 0, 0): 9, ("1", 0, 0, 1): 6, ("1", 0, 1, 0): 2, ("2", 0, 1, 0): 10,
                              ("2", 0, 1, 1): 11, ("2", 1, 1, 0): 1}))
    window = window_loads(read_scrape(after), read_scrape(before), 2, 2)
    assert window.tolist() == [[4 + 2, 0 + 21], [0, 1]]
    since_start = window_loads(read_scrape(after), None, 2, 2)
    assert since_start.tolist() == [[15, 23], [0, 1]]
    # another model's series are not ours
    assert window_loads(read_scrape(after), None, 2, 2, model="generate").dtype == torch.int64
    with pytest.raises(RQError, match="no rq_moe_expert_load_total"):
        window_loads(read_scrape(after), None, 2, 2, model="other")


def test_bad_scrapes_are_one_line_errors(tmp_path):
    path = tmp_path / "after.prom"
    path.write_text(_scrape({("1", 0, 0, 0): 5}))
    with pytest.raises(RQError, match="no assignments were served"):
        window_loads(read_scrape(path), read_scrape(path), 1, 1)
    with pytest.raises(RQError, match="not the model the server serves"):
        window_loads(read_scrape(path), None, 1, 0)
    with pytest.raises(RQError, match="neither a metrics URL nor a saved scrape"):
        read_scrape(tmp_path / "missing.prom")
    with pytest.raises(RQError, match="cannot read metrics"):
        read_scrape("http://127.0.0.1:1/metrics")


def test_served_stats_keep_importance_per_assignment():
    cal = synthetic_stats("mixtral", seed=1, tokens=4096, num_layers=2)
    n = cal.model.num_experts
    served = torch.zeros(2, n, dtype=torch.int64)
    served[:, :4] = torch.tensor([400, 300, 200, 100])
    served[0, 5] = 7
    cal.layers[0].load[5] = 0  # an expert calibration never saw
    out = served_stats(cal, served, "test")
    for s, c, load in zip(out.layers, cal.layers, served):
        assert torch.equal(s.load, load.to(torch.float64))
        assert s.original_bytes == c.original_bytes and s.w_in_shape == c.w_in_shape
        seen = (c.load > 0) & (load > 0)
        for metric in ("gate_mass", "contribution", "quant_sensitivity"):
            per = getattr(s, metric)[seen] / s.load[seen]
            assert torch.allclose(per, getattr(c, metric)[seen] / c.load[seen])
            assert bool((getattr(s, metric)[load == 0] == 0).all())
    mean = cal.layers[0].gate_mass[cal.layers[0].load > 0].sum() / cal.layers[0].load.sum()
    assert math.isclose(float(out.layers[0].gate_mass[5]), float(mean) * 7)
    # blend 0: the calibration loads, rescaled to the served total
    half = served_stats(cal, served, "test", blend=0.0)
    assert math.isclose(float(half.layers[1].load.sum()), float(served[1].sum()), rel_tol=1e-3)
    with pytest.raises(RQError, match="--blend"):
        served_stats(cal, served, "test", blend=1.5)
    with pytest.raises(RQError, match="not the model"):
        served_stats(cal, served[:1], "test")


def test_replan_on_drifted_loads_beats_the_running_plan_within_its_budget():
    """A plan fitted to calibration traffic, judged on drifted traffic, against the plan re-made from it."""
    cal = synthetic_stats("deepseek_v3", seed=2, tokens=8192, num_layers=3)
    running = make_plan(cal, PlanOptions(budget_factor=1.0, importance="gate_mass"))
    drifted = synthetic_stats("deepseek_v3", seed=3, tokens=8192, num_layers=3)  # other hot experts
    loads = torch.stack([s.load for s in drifted.layers]).to(torch.int64)
    options = replan_options(running)
    assert options.budget_factor == 1.0 and options.importance == "gate_mass"
    assert options.hedge is False  # a fitted plan re-plans fitted, whatever windows the served stats carry
    new = make_plan(served_stats(cal, loads, "test"), options)
    before, after = plan_lis_on(running, loads), plan_lis_on(new, loads)
    for layer, load, value in zip(new.layers, loads, after):
        logcnt = torch.tensor([1 + e.replicas for e in layer.experts])
        assert value == lis_value(split_load(load, logcnt))
        assert math.isclose(value, layer.lis_after, rel_tol=1e-9)  # the planner's own prediction on these loads
    assert sum(after) / 3 < sum(before) / 3
    assert new.budget.planned_bytes <= new.budget.budget_factor * new.budget.reference_bytes
    assert new.model.fingerprint == running.model.fingerprint


def test_copy_loads_by_version(tmp_path):
    from rq.replan.served import copy_loads_by_version

    before = read_scrape_text_file(tmp_path, "b", {("1", 0, 0, 0): 5, ("1", 0, 0, 1): 4})
    after = read_scrape_text_file(tmp_path, "a", {("1", 0, 0, 0): 9, ("1", 0, 0, 1): 4, ("1", 0, 1, 0): 3,
                                                  ("2", 0, 0, 0): 2})
    out = copy_loads_by_version(after, before)
    assert out["1"][0].tolist() == [4, 0, 3] and out["2"][0].tolist() == [2]


def read_scrape_text_file(tmp_path, name, values):
    path = tmp_path / f"{name}.prom"
    path.write_text(_scrape(values))
    return read_scrape(path)


def test_cli_import_loads_tritonserver_and_replan_errors(tmp_path):
    """`rq import-loads tritonserver` reads saved scrapes into stats; `rq replan` errors are one line, exit 2."""
    import rq
    from typer.testing import CliRunner

    from rq.calibrate.stats import CalibrationStats
    from rq.cli.main import app

    config = Path(rq.__file__).parent / "demo" / "checkpoint" / "config.json"
    layers, experts = 4, 16
    before = {("1", l, e, 0): float(e) for l in range(layers) for e in range(experts)}
    after = {k: v + (30 if k[2] == 3 else 2) for k, v in before.items()}
    (tmp_path / "a.prom").write_text(_scrape(before))
    (tmp_path / "b.prom").write_text(_scrape(after))
    runner = CliRunner()
    result = runner.invoke(app, ["import-loads", "tritonserver", str(tmp_path / "a.prom"), str(tmp_path / "b.prom"),
                                 "--config", str(config), "--out", str(tmp_path / "stats"), "--group-size", "64"])
    assert result.exit_code == 0, result.output
    stats = CalibrationStats.load(tmp_path / "stats")
    assert stats.layers[2].load.tolist() == [30.0 if e == 3 else 2.0 for e in range(experts)]
    result = runner.invoke(app, ["replan", str(tmp_path)])
    assert result.exit_code == 2 and "needs --metrics, --stats, --model" in result.output
    result = runner.invoke(app, ["replan", str(tmp_path), "--rollback"])
    assert result.exit_code == 2 and "not an rq Triton repository" in result.output


def test_replan_of_a_hedged_plan_hedges_on_the_served_window():
    """A hedged running plan re-plans hedged: the served loads are the new stats' one traffic window."""
    cal = synthetic_stats("deepseek_v3", seed=2, tokens=8192, num_layers=2)
    for s in cal.layers:
        s.load_windows = s.load.unsqueeze(0)
    running = make_plan(cal, PlanOptions(hedge=True))
    options = replan_options(running)
    assert options.hedge is True
    drifted = synthetic_stats("deepseek_v3", seed=3, tokens=8192, num_layers=2)
    loads = torch.stack([s.load for s in drifted.layers]).to(torch.int64)
    new = make_plan(served_stats(cal, loads, "test"), options)
    for value, load in zip(plan_lis_on(new, loads), loads):
        assert value <= lis_value(load) + 1e-12  # never above no balancing on the window it was fitted to
    assert new.options["hedge"] == "worst window"
