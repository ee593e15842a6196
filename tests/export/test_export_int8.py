"""A plan mixing original, INT8 and INT4 copies end to end on a tiny checkpoint (tests/conftest.py's
``mixed_export``): applied in PyTorch, exported with the INT8 class on every node, every layer on ONNX Runtime's
fused route, checked by ONNX Runtime on both files (the export's own parity check). Its TensorRT engine:
tests/engines/test_tensorrt_build.py."""

from __future__ import annotations

import onnx

from rq.core.op import INPUTS, INPUTS_INT8
from rq.export.onnx_file import rq_nodes


def test_mixed_plan_exports_and_passes_parity(mixed_export):
    plan, result = mixed_export
    proto = onnx.load(result.out_dir / "model.onnx", load_external_data=False)
    nodes = rq_nodes(proto)
    assert nodes and all(len(n.input) == len(INPUTS_INT8) for n in nodes)  # every node has the INT8 class
    moe = next(f for f in proto.functions if f.name == "RQMoE")
    assert list(moe.input) == list(INPUTS_INT8)
    int8_layers = [l.layer for l in plan.layers if 2 in l.precision]
    routes = {l["index"]: l["onnxruntime"]["route"] for l in result.manifest["moe_layers"]}
    assert int8_layers and all(routes[i] == "fused" for i in int8_layers)  # the INT8 class on the fused route too
    assert len(INPUTS_INT8) > len(INPUTS)
    assert result.parity.passed and {r.file for r in result.parity.outputs} == {"model.ort.onnx", "model.onnx"}
