"""Export + parity of the built-in demo model (rq/demo/checkpoint), when it is present."""

from __future__ import annotations

from pathlib import Path

import pytest

import rq

DEMO = Path(rq.__file__).parent / "demo" / "checkpoint"


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="rq/demo/checkpoint is not built")
def test_demo_export_parity(tmp_path):
    from rq.models.adapters import load_model
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.demo import corpus
    from rq.export import export_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import save_plan

    model, adapter = load_model(DEMO)
    data = load_token_data(load_tokenizer(DEMO), corpus.split_path("calibration"), seq_len=128, max_sequences=8)
    stats = calibrate(model, adapter, data, group_size=64, show_progress=False)
    plan = make_plan(stats, PlanOptions(budget_factor=1.0))
    assert any(e.replicas for layer in plan.layers for e in layer.experts)
    save_plan(plan, tmp_path / "plan.json")
    result = export_model(DEMO, tmp_path / "plan.json", tmp_path / "build", show_progress=False)
    assert result.parity.passed, result.parity.summary()
    assert result.manifest["num_moe_layers"] == len(plan.layers)
