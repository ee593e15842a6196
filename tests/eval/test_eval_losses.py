"""`rq eval` says where a plan loses to no balancing: one warning per (mode, layer) with the fix, and in its JSON."""

import json
import math

import torch

from rq.core.lis import InstantSummary
from rq.eval.evaluate import EvalReport, batch_lis_from_loads
from rq.eval.report import loss_warnings


def _report() -> EvalReport:
    # layer a: the plan's copies fit the traffic; layer b: copies on expert 0 while expert 1 is hot
    before_a = torch.tensor([[30, 10, 10, 10]])
    before_b = torch.tensor([[5, 40, 5, 10]])
    a = batch_lis_from_loads(before_a, before_a, torch.tensor([3, 1, 1, 1]), 1)
    b = batch_lis_from_loads(before_b, before_b, torch.tensor([3, 1, 1, 1]), 1)
    empty = InstantSummary.of(torch.zeros(0, 1))
    stream = [a, type(a)(math.nan, math.nan, empty, empty)]
    return EvalReport(["layer.a", "layer.b"], {1: [a, b]}, stream, 2, 3, None, 100, 90)


def test_losses_name_mode_and_layer_and_go_to_json():
    report = _report()
    losses = report.losses()
    assert [(x["mode"], x["layer"]) for x in losses] == [("batch 1", "layer.b")]
    assert losses[0]["after"] > losses[0]["before"]
    assert json.loads(json.dumps(report.to_json()))["loses_to_no_balancing"] == losses
    lines = loss_warnings(report)
    assert len(lines) == 1 and "layer.b" in lines[0] and "batch 1" in lines[0] and "rq replan" in lines[0]
    assert "\n" not in lines[0]


def test_no_warning_when_the_plan_never_loses():
    report = _report()
    report.batch[1] = report.batch[1][:1]
    report.layers = report.layers[:1]
    report.streaming = report.streaming[:1]
    assert report.losses() == [] and loss_warnings(report) == []
