"""The mixed-precision solver (docs/spec.md §6): exact against brute force, within budget and caps, and wired into
``make_plan`` / ``plan.json`` / validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rq.errors import RQError
from rq.plan.planner import PlanOptions, make_plan
from rq.plan.schema import Plan
from rq.plan.solver import assign_precisions, parse_precisions, predicted_error, solve_layer
from rq.testing.synthetic import synthetic_stats


def _brute_force(logcnt, s4, s8, total, bytes_of, budget, min_original, precisions):
    """Every per-copy assignment (original only on primaries) -> least (error, bytes)."""
    b0, b4, b8 = bytes_of
    per_expert = []
    for c in logcnt:
        options = [(o, j) for o in (0, 1) for j in range(c - o + 1)
                   if ("int8" in precisions or j == 0) and ("int4" in precisions or j == c - o)]
        per_expert.append(options)
    best = None
    for combo in itertools.product(*per_expert):
        size = sum(o * b0 + j * b8 + (c - o - j) * b4 for c, (o, j) in zip(logcnt, combo))
        if size > budget or sum(o for o, _ in combo) < min_original:
            continue
        err = sum((j * float(s8[e]) + (c - o - j) * float(s4[e])) / (c * total)
                  for e, (c, (o, j)) in enumerate(zip(logcnt, combo)))
        if best is None or (err, size) < best:
            best = (err, size)
    return best


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_assignment_is_exact_against_brute_force(data):
    n = data.draw(st.integers(1, 4))
    logcnt = data.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    s4 = torch.tensor(data.draw(st.lists(st.floats(0, 10), min_size=n, max_size=n)), dtype=torch.float64)
    s8 = s4 * torch.tensor(data.draw(st.lists(st.floats(0, 1.5), min_size=n, max_size=n)), dtype=torch.float64)
    precisions = data.draw(st.sampled_from([("int4",), ("int8",), ("int4", "int8")]))
    bytes_of = (16, 3, 5)
    budget = data.draw(st.floats(0, 16 * n * 1.5))
    min_original = data.draw(st.integers(0, n))
    got = assign_precisions(logcnt, s4, s8, 10.0, bytes_of, budget, min_original, precisions)
    want = _brute_force(logcnt, s4, s8, 10.0, bytes_of, budget, min_original, precisions)
    if want is None:
        assert got is None
        return
    chosen, err, size = got
    assert err == pytest.approx(want[0], rel=1e-9, abs=1e-12)
    assert size <= budget and sum(o for o, _ in chosen) >= min_original
    recomputed = sum((j * float(s8[e]) + (c - o - j) * float(s4[e])) / (c * 10.0)
                     for e, (c, (o, j)) in enumerate(zip(logcnt, chosen)))
    assert recomputed == pytest.approx(err, rel=1e-9, abs=1e-12)


def test_solver_keeps_the_greedys_lis_and_never_predicts_more_error():
    stats = synthetic_stats("mixtral", num_layers=3)
    for budget in (0.75, 1.0, 1.25):
        int4 = make_plan(stats, PlanOptions(budget_factor=budget))
        mixed = make_plan(stats, PlanOptions(budget_factor=budget, precisions=("int4", "int8")))
        assert mixed.options["precisions"] == "int4,int8" and int4.options["precisions"] == "int4"
        for a, b in zip(int4.layers, mixed.layers):
            assert b.lis_after == pytest.approx(a.lis_after)
            assert b.predicted_error <= a.predicted_error * (1 + 1e-9)
            assert b.planned_bytes <= budget * sum(stats.layers[0].original_bytes)
        Plan.model_validate_json(mixed.model_dump_json())  # round trip
        assert any(2 in layer.precision for layer in mixed.layers)


def test_predicted_error_formula():
    load = torch.tensor([6.0, 2.0])
    sens = {1: torch.tensor([3.0, 1.0], dtype=torch.float64), 2: torch.tensor([0.5, 0.1], dtype=torch.float64)}
    # expert 0: 3 copies (INT8 primary, INT8 replica, INT4 replica); expert 1: original primary only
    err = predicted_error(load, sens, torch.tensor([3, 1]), [[2, 2, 1], [0]])
    assert err == pytest.approx((0.5 + 0.5 + 3.0) / (3 * 8))
    assert math.isnan(predicted_error(torch.zeros(2), sens, torch.tensor([1, 1]), [[1], [1]]))


def test_int4_only_solver_and_options_errors():
    d = solve_layer(torch.tensor([90.0, 5.0, 5.0]), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), None,
                    [100] * 3, 20, 40, precisions=("int4",), quantizable=True, budget_factor=1.0, max_quantized=2,
                    max_replicas=7)
    assert int(d.int8_replicas.sum()) == 0 and 2 not in d.primary.tolist() and d.planned_bytes <= 300
    assert d.lis_after < d.lis_before
    with pytest.raises(RQError, match="--precisions"):
        parse_precisions("int4,fp8")
    assert parse_precisions("int8, int4") == ("int4", "int8")


def test_stats_without_int8_sensitivity_are_refused_for_int8():
    stats = synthetic_stats("mixtral", num_layers=1)
    stats.layers[0].quant_sensitivity_int8 = None
    make_plan(stats, PlanOptions())  # INT4-only still plans
    with pytest.raises(RQError, match="no INT8 sensitivity"):
        make_plan(stats, PlanOptions(precisions=("int4", "int8")))
