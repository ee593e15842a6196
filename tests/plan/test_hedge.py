"""Hedged planner (docs/spec.md §6, "Hedged plans"): no traffic window worse than no balancing, the budget kept,
and the stats' windows recorded by calibration, teacher-forced and generated (§3)."""

import pytest
import torch

from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import load_token_data, load_tokenizer
from rq.calibrate.stats import CalibrationStats
from rq.core.lis import lis_value
from rq.core.replica import split_load
from rq.errors import RQError
from rq.models.adapters import load_model
from rq.plan.planner import PlanOptions, layer_bytes, make_plan, plan_layer
from rq.plan.robust import hedged_layer, window_ratios


def _ratio(window: torch.Tensor, logcnt: torch.Tensor) -> float:
    return lis_value(split_load(window.to(torch.int64), logcnt)) / lis_value(window)


@pytest.mark.parametrize("seed", range(8))
def test_window_ratios_are_the_replica_rule_lis(seed):
    gen = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, 50, (5, 12), generator=gen).to(torch.float64)
    logcnt = torch.randint(1, 5, (12,), generator=gen)
    expected = torch.tensor([_ratio(w, logcnt) for w in windows], dtype=torch.float64)
    assert torch.allclose(window_ratios(windows, logcnt), expected, rtol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_no_window_worse_than_no_balancing_and_budget_exact(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 16
    hot = torch.distributions.Pareto(1.0, 1.1).sample((6, n)) * 20  # windows with different heavy hitters
    windows = (hot * torch.rand(6, n, generator=gen)).round().to(torch.float64)
    orig, q = [1000] * n, [130] * n
    order = torch.randperm(n, generator=gen).tolist()[: n // 2]
    factor = float(torch.empty(1).uniform_(0.8, 1.1, generator=gen))
    quantized, copies, worst = hedged_layer(windows, order, orig, q, budget=factor * sum(orig), max_replicas=7)
    logcnt = torch.tensor(copies)
    assert layer_bytes(orig, q, quantized, [c - 1 for c in copies]) <= factor * sum(orig)
    assert sum(quantized) <= n // 2 and all(quantized[e] for e in order[: sum(quantized)])
    ratios = [_ratio(w, logcnt) for w in windows if w.sum() > 0]
    assert max(ratios) <= 1 + 1e-12 and max(ratios) == pytest.approx(worst)
    again = hedged_layer(windows.clone(), order, orig, q, budget=factor * sum(orig), max_replicas=7)
    assert again == (quantized, copies, worst)


def test_hedge_keeps_the_window_the_sum_hides():
    """The sum's heavy hitter is expert 0; one window in five routes most of its load to expert 5. The greedy fitted
    to the sum makes that window worse than no balancing; the hedged plan does not, and still balances the sum."""
    n = 8
    common = torch.tensor([400, 60, 50, 50, 40, 40, 30, 30], dtype=torch.float64)
    other = torch.tensor([10, 10, 10, 10, 10, 200, 10, 10], dtype=torch.float64)
    windows = torch.stack([common] * 4 + [other])
    total = windows.sum(0)
    greedy = plan_layer(total, torch.arange(n, 0, -1, dtype=torch.float64), torch.full((n,), 1000),
                        torch.full((n,), 130), quantizable=True, budget_factor=1.0, max_quantized=4, max_replicas=7)
    assert _ratio(other, greedy.logcnt) > 1
    _, copies, worst = hedged_layer(torch.cat([total.unsqueeze(0), windows]), [7, 6, 5, 4], [1000] * n, [130] * n,
                                    budget=8000, max_replicas=7)
    assert worst <= 1 and _ratio(other, torch.tensor(copies)) <= 1
    assert _ratio(total, torch.tensor(copies)) < 0.5


@pytest.fixture(scope="module")
def tiny_stats(tiny_checkpoints, text_file):
    ckpt = tiny_checkpoints("qwen3_moe")
    model, adapter = load_model(ckpt)
    data = load_token_data(load_tokenizer(ckpt), text_file, seq_len=32, max_sequences=12)
    plain = calibrate(model, adapter, data, batch_size=4, group_size=64, show_progress=False, window=8)
    generated = calibrate(model, adapter, data, batch_size=4, group_size=64, show_progress=False, window=8,
                          generate=5, generate_window=4, prompt_len=6)
    return plain, generated


def test_calibration_records_teacher_forced_and_generated_windows(tiny_stats, tmp_path):
    plain, generated = tiny_stats
    w = generated.windows
    assert (plain.windows.teacher_forced, plain.windows.sequences_per_window, plain.windows.generated) == (2, 8, 0)
    assert (w.teacher_forced, w.generated, w.generated_tokens, w.generated_sequences_per_window, w.prompt_len) == \
        (2, 3, 5, 4, 6)
    for p, g in zip(plain.layers, generated.layers):
        k = p.top_k
        assert p.load_windows.shape == (2, p.num_experts) and g.load_windows.shape == (5, p.num_experts)
        assert torch.equal(p.load_windows.sum(0), p.load)  # teacher-forced windows partition the calibration
        assert torch.equal(g.load, p.load)  # generation leaves the teacher-forced metrics alone
        # generated windows: 4 sequences x 4 decode steps (the first new token comes from the prefill) x K
        assert g.load_windows[2:].sum(1).tolist() == [4 * 4 * k] * 3
    generated.save(tmp_path / "stats")
    back = CalibrationStats.load(tmp_path / "stats")
    assert back.windows == generated.windows
    assert all(torch.equal(a.load_windows, b.load_windows) for a, b in zip(back.layers, generated.layers))


def test_hedged_plan_meets_its_windows_and_budget(tiny_stats):
    _, stats = tiny_stats
    plan = make_plan(stats, PlanOptions(hedge=True))
    assert plan.budget.planned_bytes <= plan.budget.reference_bytes and plan.options["hedge"] == "worst window"
    for layer, s in zip(plan.layers, stats.layers):
        ratios = window_ratios(torch.cat([s.load.unsqueeze(0), s.load_windows]), torch.tensor(layer.logcnt))
        assert float(ratios[~ratios.isnan()].max()) <= 1 + 1e-12


def test_hedge_refuses_stats_without_windows(tiny_stats):
    _, stats = tiny_stats
    old = CalibrationStats(stats.model, stats.calibration, stats.group_size,
                           [type(s)(**{**s.__dict__, "load_windows": None}) for s in stats.layers])
    with pytest.raises(RQError, match="no traffic windows"):
        make_plan(old, PlanOptions(hedge=True))
    with pytest.raises(RQError, match="INT4 copies only"):
        make_plan(stats, PlanOptions(hedge=True, precisions=("int4", "int8")))


def test_bad_windows_in_a_stats_file_are_refused(tiny_stats, tmp_path):
    from safetensors.torch import load_file, save_file

    _, stats = tiny_stats
    stats.save(tmp_path / "stats")
    path = tmp_path / "stats" / "stats.safetensors"
    tensors = load_file(str(path))
    tensors["layer0.load_windows"] = tensors["layer0.load_windows"][:, :3].contiguous()
    save_file(tensors, str(path))
    with pytest.raises(RQError, match="load_windows' must be a float"):
        CalibrationStats.load(tmp_path / "stats")


def test_streamed_generation_records_the_same_windows(tiny_checkpoints, text_file):
    """One decoder layer at a time (the CLI's model) generates and routes exactly as the whole model does."""
    from rq.models.streaming import open_streamed

    ckpt = tiny_checkpoints("mixtral")
    model, adapter = load_model(ckpt)
    data = load_token_data(load_tokenizer(ckpt), text_file, seq_len=32, max_sequences=8)
    kwargs = dict(batch_size=4, group_size=64, show_progress=False, window=4, generate=4, generate_window=4,
                  prompt_len=8)
    whole = calibrate(model, adapter, data, **kwargs)
    streamed_model = open_streamed(ckpt, show_progress=False)
    reads = []
    load = streamed_model.load
    streamed_model.load = lambda group: (reads.append(group), load(group))
    streamed = calibrate(streamed_model, streamed_model.adapter, data, **kwargs)
    assert whole.windows == streamed.windows
    # both generation calls share one layer-major pass: each layer is read once for the calibration text and
    # once per generated token, not once per token and call
    assert sorted(reads) == sorted(list(range(len(streamed_model.blocks))) * (1 + 4))
    assert all(torch.equal(a.load_windows, b.load_windows) for a, b in zip(whole.layers, streamed.layers))


def test_default_objective_hedges_exactly_when_the_stats_hold_generations(tiny_stats):
    """docs/spec.md §6: without --hedge/--no-hedge an INT4 plan is hedged when the stats record the model's own
    generations, fitted to the sum otherwise; an explicit choice wins either way."""
    plain, generated = tiny_stats

    def objective(stats, **options):
        plan = make_plan(stats, PlanOptions(**options))
        return plan.options.get("hedge"), [layer.logcnt for layer in plan.layers]

    hedged, fitted = objective(generated, hedge=True), objective(generated, hedge=False)
    assert objective(generated) == hedged and hedged[0] == "worst window"
    assert fitted[0] is None and objective(plain) == objective(plain, hedge=False) == (None, fitted[1])
    # the exact mixed-precision solver has no hedged form: the default falls back to it rather than refusing
    assert make_plan(generated, PlanOptions(precisions=("int4", "int8"))).options.get("hedge") is None
