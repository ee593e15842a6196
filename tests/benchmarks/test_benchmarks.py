"""Issue-7 benchmarks: the baselines are what they claim, and `run_all --quick` runs end to end on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import baselines, run_all  # noqa: E402
from rq.core.replica import copy_loads  # noqa: E402


def test_eplb_gives_each_replica_to_the_highest_load_per_copy():
    load = torch.tensor([100.0, 10.0, 40.0, 40.0])
    # 100 -> 50 (2 copies) -> 40/40 tie: lower id first -> 33.3 ...
    assert baselines.eplb_logcnt(load, 0).tolist() == [1, 1, 1, 1]
    assert baselines.eplb_logcnt(load, 1).tolist() == [2, 1, 1, 1]
    assert baselines.eplb_logcnt(load, 2).tolist() == [3, 1, 1, 1]  # 50 > 40
    assert baselines.eplb_logcnt(load, 3).tolist() == [3, 1, 2, 1]  # 33.3 < 40: expert 2 (lower id of the tie)
    assert baselines.eplb_logcnt(load, 10, max_copies=2).tolist() == [2, 2, 2, 2]


def test_equal_memory_replicas():
    sizes = [1000] * 16
    assert baselines.equal_memory_replicas(0.75, sizes) == 0
    assert baselines.equal_memory_replicas(1.0, sizes) == 0
    assert baselines.equal_memory_replicas(1.125, sizes) == 2
    assert baselines.equal_memory_replicas(1.25, sizes) == 4


def test_random_plan_keeps_counts_and_bytes():
    from rq.plan.planner import PlanOptions, make_plan
    from rq.testing.synthetic import synthetic_stats

    stats = synthetic_stats("mixtral", num_layers=3)
    plan = make_plan(stats, PlanOptions())
    rand = baselines.random_plan(plan, stats, seed=0, max_replicas=7)
    assert baselines.plan_counts(rand) == baselines.plan_counts(plan)
    assert [l.planned_bytes for l in rand.layers] == [l.planned_bytes for l in plan.layers]
    assert rand.budget.planned_bytes == plan.budget.planned_bytes


def test_sum_stats_adds_every_metric_and_bytes_relabel():
    from rq.testing.synthetic import synthetic_stats

    a, b = synthetic_stats("mixtral", num_layers=2, seed=0), synthetic_stats("mixtral", num_layers=2, seed=1)
    total = baselines.sum_stats([a, b])
    for metric in ("load", "gate_mass", "contribution", "quant_sensitivity"):
        torch.testing.assert_close(getattr(total.layers[1], metric),
                                   getattr(a.layers[1], metric) + getattr(b.layers[1], metric))
    assert total.calibration.tokens == a.calibration.tokens + b.calibration.tokens
    fp32 = baselines.with_bytes_per_param(a, 4)
    assert fp32.layers[0].original_bytes[0] == 2 * a.layers[0].original_bytes[0]  # synthetic stats are bf16


@pytest.fixture
def one_thread():
    """One intra-op thread (as the benchmark runs): two threads on a busy 2-core machine are 1000x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_run_pass_accuracy_matches_rq_evaluate(tiny_checkpoints, one_thread):
    """The benchmark's per-sequence accuracy terms add up to rq.eval.evaluate.accuracy's totals."""
    import copy

    from benchmarks.bench_lis import accuracy_summary, batch_points, run_pass, summarize
    from rq.models.adapters import load_model
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import TokenData
    from rq.eval.evaluate import accuracy, batch_lis, trace_batches
    from rq.plan.planner import PlanOptions, make_plan
    from rq.rqmodel.model import apply_plan, set_mode

    original, adapter = load_model(tiny_checkpoints("qwen3_moe"))
    layers = adapter.moe_layers(original)
    seqs = torch.randint(2, 300, (6, 24), generator=torch.Generator().manual_seed(0))
    stats = calibrate(original, adapter, TokenData(seqs, "random ids"), group_size=64, show_progress=False)
    rq_model = copy.deepcopy(original)
    rq_layers = apply_plan(rq_model, adapter, make_plan(stats, PlanOptions()))
    ref = run_pass(original, adapter, layers, seqs, 4, 6, None)
    set_mode(rq_model, "batch")  # resets the copy-load telemetry
    got = run_pass(rq_model, adapter, layers, seqs, 4, 6, ref)
    # the replica rule on the recorded routing gives exactly the copy loads the R&Q layers counted
    for layer_ids, rq in zip(got.ids, rq_layers):
        expected_loads = sum(copy_loads(layer_ids[i:i + 4].reshape(-1, layer_ids.shape[-1]), rq.logcnt)
                             for i in range(0, layer_ids.shape[0], 4))
        assert torch.equal(expected_loads, rq.total_copy_loads)
    summary = accuracy_summary(ref, got, bootstrap=50, seed=0)
    ids_o, logits_o = trace_batches(original, adapter, layers, seqs, 4, "o", show_progress=False)
    ids_r, logits_r = trace_batches(rq_model, adapter, layers, seqs, 4, "r", show_progress=False)
    expected = accuracy(adapter, seqs, logits_o, logits_r, 4)
    assert summary["ppl_change_pct"] == pytest.approx(expected.ppl_change_pct, abs=1e-6)
    assert summary["kl_mean"] == pytest.approx(expected.kl_mean, rel=1e-4, abs=1e-8)
    assert summary["top1_agreement"] == pytest.approx(expected.top1_agreement)
    for mine, core in zip(got.ids, ids_r):
        assert torch.equal(mine, core)
    # the benchmark's vectorised batch LIS is rq.eval.evaluate.batch_lis
    logcnts = [rq.logcnt for rq in rq_layers]
    for batch_size in (1, 4, 6):
        fast = batch_points(ref.counts, got.counts, logcnts, batch_size)
        core = summarize([batch_lis(b, a, layer.num_experts, c, batch_size)
                          for b, a, layer, c in zip(ref.ids, got.ids, layers, logcnts)])
        assert json.dumps(fast, sort_keys=True) == json.dumps(core, sort_keys=True)


def test_results_md_update_keeps_other_sections(tmp_path):
    md = tmp_path / "RESULTS.md"
    run_all.update_results_md(md, f"{run_all.BEGIN}\nfirst\n{run_all.END}")
    md.write_text(md.read_text() + "\n## Kernels (appended by another engineer)\nkeep me\n")
    run_all.update_results_md(md, f"{run_all.BEGIN}\nsecond\n{run_all.END}")
    text = md.read_text()
    assert "second" in text and "first" not in text and "keep me" in text and "## Placement" in text


def test_run_all_quick_smoke(tmp_path):
    """`python benchmarks/run_all.py --quick` on a tiny random model writes every plot, the JSON and the section."""
    md = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--out", str(tmp_path),
                           "--results-md", str(md)], cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("lis_vs_budget.png", "lis_vs_batch.png", "importance_accuracy.png", "calibration_size.png",
                 "planner_scale.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    res = json.loads((tmp_path / "issue7_results.json").read_text())
    lis = res["lis"]
    head = lis["headline"]
    assert lis["plans"][head]["memory"] <= 1.0
    assert lis["accuracy"]["heldout_code"]["none"]["ppl_change_pct"] == 0.0
    # every importance metric gives the same copy counts (equal memory and equal LIS inputs)
    copies = {json.dumps(lis["plans"][n]["copies"]) for n in lis["plans"] if n.startswith("rq[") and n.endswith("@1")}
    assert len(copies) == 1
    assert {c["shape"] for c in res["planner"]["cases"]} == {"deepseek_v3", "mixtral"}
    text = md.read_text()
    assert run_all.BEGIN in text and "## R&Q vs baselines (issue 7)" in text and "Goal check" in text
