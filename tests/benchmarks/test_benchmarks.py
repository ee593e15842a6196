"""The R&Q-vs-baselines benchmark: the baselines are what they claim, its statistics are the textbook ones, the
report renders RESULTS.md from the stored run, and `run_all --quick` runs end to end on a tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import baselines, markdown, report
from rq.core.replica import copy_loads

REPO = Path(__file__).resolve().parents[2]


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
    for recorded, core in zip(got.ids, ids_r):
        assert torch.equal(recorded, core)
    # the benchmark's vectorised batch LIS is rq.eval.evaluate.batch_lis
    logcnts = [rq.logcnt for rq in rq_layers]
    for batch_size in (1, 4, 6):
        fast = batch_points(ref.counts, got.counts, logcnts, batch_size)
        core = summarize([batch_lis(b, a, layer.num_experts, c, batch_size)
                          for b, a, layer, c in zip(ref.ids, got.ids, layers, logcnts)])
        assert json.dumps(fast, sort_keys=True) == json.dumps(core, sort_keys=True)


def test_results_md_update_keeps_other_sections(tmp_path):
    md = tmp_path / "RESULTS.md"
    report.update_results_md(md, f"{report.BEGIN}\nfirst\n{report.END}")
    md.write_text(md.read_text() + "\n## Kernels (written by hand)\nkeep me\n")
    report.update_results_md(md, f"{report.BEGIN}\nsecond\n{report.END}")
    text = md.read_text()
    assert "second" in text and "first" not in text and "keep me" in text and "## Placement" in text
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1


def test_results_md_is_the_stored_run_rendered():
    """The generated section of benchmarks/RESULTS.md is exactly what the committed raw numbers render to, so every
    number in it traces back to benchmarks/plots/rq_vs_baselines.json (re-render: run_all --from-json)."""
    plots, md = REPO / "benchmarks" / "plots", REPO / "benchmarks" / "RESULTS.md"
    results = json.loads((plots / report.RESULTS_JSON).read_text())
    text = md.read_text()
    start, end = text.index(report.BEGIN), text.index(report.END) + len(report.END)
    assert report.render(results, plots, md) == text[start:end]


def test_markdown_table():
    assert markdown.table(["a", "b"], [[1, "x"], ["", 2.5]]) == "| a | b |\n|---|---|\n| 1 | x |\n|  | 2.5 |"
    assert markdown.table(["name", "ms"], [["p50", "1.0"]], align="lr").splitlines()[1] == "|---|---:|"
    with pytest.raises(ValueError, match="2 columns"):
        markdown.table(["a", "b"], [], align="r")
    assert markdown.fmt(float("nan")) == markdown.fmt(None) == "n/a" and markdown.fmt(1.234, 1, "x") == "1.2x"


def test_bootstrap_interval_is_the_paired_percentile_bootstrap():
    """accuracy_summary's 95 % CI: resample sequences (paired, numpy's generator seeded with ``seed``), take each
    resample's perplexity change, 2.5 / 97.5 percentiles; the same seed gives the same interval."""
    import numpy as np

    from benchmarks.bench_lis import Pass, accuracy_summary

    gen = torch.Generator().manual_seed(0)
    n, per = 20, 31
    nll_o = torch.rand(n, generator=gen, dtype=torch.float64) * 50 + 100
    nll_r = nll_o + torch.randn(n, generator=gen, dtype=torch.float64)

    def make(nll):
        return Pass(ids=[], counts=[], nll=nll, kl=torch.zeros(n), agree=torch.full((n,), float(per)),
                    predicted_per_sequence=per)

    summary = accuracy_summary(make(nll_o), make(nll_r), bootstrap=400, seed=3)
    idx = np.random.default_rng(3).integers(0, n, (400, n))
    changes = 100 * np.expm1((nll_r.numpy()[idx].sum(-1) - nll_o.numpy()[idx].sum(-1)) / (n * per))
    np.testing.assert_allclose(summary["ppl_change_ci95"], np.percentile(changes, [2.5, 97.5]), rtol=1e-12)
    lo, hi = summary["ppl_change_ci95"]
    assert lo < summary["ppl_change_pct"] < hi
    assert summary["ppl_change_pct"] == pytest.approx(100 * (math.exp(float(nll_r.sum() - nll_o.sum()) / (n * per)) - 1))
    assert accuracy_summary(make(nll_o), make(nll_r), bootstrap=400, seed=3) == summary


def test_run_all_quick_smoke(tmp_path):
    """`python -m benchmarks.run_all --quick` on a tiny random model writes every plot, the JSON and the section."""
    md = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(tmp_path),
                           "--results-md", str(md)], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("lis_vs_budget.png", "lis_vs_batch.png", "importance_accuracy.png", "calibration_size.png",
                 "planner_scale.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    res = json.loads((tmp_path / report.RESULTS_JSON).read_text())
    lis = res["lis"]
    head = lis["headline"]
    assert lis["plans"][head]["memory"] <= 1.0
    assert lis["accuracy"]["heldout_code"]["none"]["ppl_change_pct"] == 0.0
    # every importance metric gives the same copy counts (equal memory and equal LIS inputs)
    copies = {json.dumps(lis["plans"][n]["copies"]) for n in lis["plans"] if n.startswith("rq[") and n.endswith("@1")}
    assert len(copies) == 1
    assert {c["shape"] for c in res["planner"]["cases"]} == {"deepseek_v3", "mixtral"}
    text = md.read_text()
    assert report.BEGIN in text and f"## {report.TITLE}" in text and "Goal check" in text
