"""Placement memory accounting counts INT8 copies at their own size (docs/spec.md §5a)."""

import torch

from rq.placement.fit import copy_bytes, rq_bytes
from rq.plan.planner import PlanOptions, make_plan
from rq.testing.synthetic import synthetic_stats


def test_placed_bytes_of_a_mixed_plan_are_its_planned_bytes():
    stats = synthetic_stats("mixtral", num_layers=3)
    for precisions in (("int4",), ("int4", "int8")):
        plan = make_plan(stats, PlanOptions(precisions=precisions))
        logcnt = torch.tensor([layer.logcnt for layer in plan.layers])
        for with_stats in (stats, None):
            orig, q = copy_bytes(plan, with_stats)
            placed = rq_bytes(plan, logcnt, orig, q)
            planned = torch.tensor([float(layer.planned_bytes) for layer in plan.layers], dtype=torch.float64)
            torch.testing.assert_close(placed, planned, rtol=1e-3 if with_stats is None else 1e-12, atol=0)
    assert any(2 in layer.precision for layer in plan.layers)
