"""A plan mixing original, INT8 and INT4 copies end to end on a tiny checkpoint: applied in PyTorch, exported
with the INT8 class on every node, checked by ONNX Runtime on both files (the export's own parity check), and
refused by the TensorRT build in one line."""

from __future__ import annotations

import onnx
import pytest
import torch

from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import TokenData
from rq.core.op import INPUTS, INPUTS_INT8
from rq.errors import RQError
from rq.export import export_model
from rq.export.onnx_file import rq_nodes
from rq.models.adapters import load_model
from rq.plan.planner import PlanOptions, make_plan
from rq.plan.schema import save_plan


@pytest.fixture(scope="module")
def mixed_export(tiny_checkpoints, tmp_path_factory):
    model_dir = tiny_checkpoints("qwen3_moe")
    model, adapter = load_model(model_dir)
    tokens = torch.randint(2, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, adapter, TokenData(tokens, "seeded random tokens"), batch_size=4, group_size=64,
                      show_progress=False)
    assert all(s.quant_sensitivity_int8 is not None for s in stats.layers)
    assert all(bool((s.quant_sensitivity_int8 <= s.quant_sensitivity).all()) for s in stats.layers)
    plan = make_plan(stats, PlanOptions(budget_factor=1.0, precisions=("int4", "int8")))
    codes = {p for layer in plan.layers for p in layer.precision}
    assert codes == {0, 1, 2}, f"the tiny plan should mix all three precisions, got {codes}"
    out = tmp_path_factory.mktemp("mixed")
    save_plan(plan, out / "plan.json")
    return plan, export_model(model_dir, out / "plan.json", out / "build", show_progress=False)


def test_mixed_plan_exports_and_passes_parity(mixed_export):
    plan, result = mixed_export
    proto = onnx.load(result.out_dir / "model.onnx", load_external_data=False)
    nodes = rq_nodes(proto)
    assert nodes and all(len(n.input) == len(INPUTS_INT8) for n in nodes)  # every node has the INT8 class
    moe = next(f for f in proto.functions if f.name == "RQMoE")
    assert list(moe.input) == list(INPUTS_INT8)
    int8_layers = [l.layer for l in plan.layers if 2 in l.precision]
    routes = {l["index"]: l["onnxruntime"]["route"] for l in result.manifest["moe_layers"]}
    assert all(routes[i] != "fused" for i in int8_layers)  # INT8 layers stay on the portable body
    assert len(INPUTS_INT8) > len(INPUTS)


def test_tensorrt_build_refuses_int8_copies(mixed_export):
    from rq.engines.tensorrt import refuse_int8

    _, result = mixed_export
    with pytest.raises(RQError, match="INT8 expert copies"):
        refuse_int8(result.out_dir / "model.onnx")
