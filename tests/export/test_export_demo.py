"""Export + parity of the built-in demo model (rq/demo/checkpoint), when it is present."""

from __future__ import annotations


def test_demo_export_parity(demo_export):
    result, plan = demo_export  # tests/conftest.py: calibrated, planned and exported once per session
    assert any(e.replicas for layer in plan.layers for e in layer.experts)
    assert result.parity.passed, result.parity.summary()
    assert result.manifest["num_moe_layers"] == len(plan.layers)
