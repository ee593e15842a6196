"""ONNX Runtime's fused route (``model.ort.onnx``), its portable fallback, plans that change nothing, and exports
whose check fails (nothing at ``--out``; ``--keep-failed`` keeps the attempt)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import TokenData
from rq.errors import RQError
from rq.export import export_model
from rq.export.api import ExportCheckFailed
from rq.export.function import DOMAIN, OP_NAME
from rq.export.ort_fused import MS_DOMAIN
from rq.models.adapters import load_model
from rq.plan.planner import PlanOptions, make_plan
from rq.plan.schema import save_plan


def _initializers(path):
    proto = onnx.load(path, load_external_data=False)
    return proto, {t.name: t for t in proto.graph.initializer}


def _location(tensor) -> str | None:
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def _plan(model_dir, out, group_size=64, **options):
    model, adapter = load_model(model_dir)
    tokens = torch.randint(2, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, adapter, TokenData(tokens, "seeded random tokens"), batch_size=4, group_size=group_size,
                      show_progress=False)
    save_plan(make_plan(stats, PlanOptions(**options)), out)
    return out


def test_fused_route_replaces_every_node_with_the_kernels(exported, tmp_path):
    result = exported("qwen3_moe")
    build, manifest = result.out_dir, result.manifest
    assert manifest["graphs"]["decoder"]["ort_file"] == "model.ort.onnx"
    assert all(layer["onnxruntime"] == {"route": "fused"} for layer in manifest["moe_layers"])
    assert any(line.startswith("ONNX Runtime route") for line in manifest["notes"])
    proto, inits = _initializers(build / "model.ort.onnx")
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    assert (DOMAIN, OP_NAME) not in ops and OP_NAME not in {f.name for f in proto.functions}
    assert ops.count((MS_DOMAIN, "QMoE")) == ops.count((MS_DOMAIN, "MoE")) == len(manifest["moe_layers"])
    # an original-precision class's gate/up weights reach MoE through one node, the interleave: each node on a
    # weight is one more copy of it while ONNX Runtime folds them at session creation
    producer = {o: n for n in proto.graph.node for o in n.output}
    for moe in (n for n in proto.graph.node if n.op_type == "MoE"):
        interleave = producer[moe.input[2]]
        assert interleave.op_type == "Gather" and interleave.input[0] in inits, interleave
    # every initializer is model.onnx's: the folder stores each weight once
    locations = {_location(t) for t in inits.values()} - {None}
    assert locations == {"model.onnx.data"} and not (build / "model.ort.onnx.data").exists()
    # the kernels' INT4 weights, as ONNX Runtime folds them at session creation, are model.onnx's bytes XOR 0x88
    # with gate/up rows interleaved (never re-quantized)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    ort.InferenceSession(str(build / "model.ort.onnx"), options)
    optimized, optimized_inits = _initializers(tmp_path / "optimized.onnx")
    qmoe = [n for n in optimized.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == len(manifest["moe_layers"]) and all(n.input[2] in optimized_inits for n in qmoe)
    fused = numpy_helper.to_array(optimized_inits[qmoe[0].input[2]], base_dir=str(tmp_path))
    portable, portable_inits = _initializers(build / "model.onnx")
    layer0 = manifest["moe_layers"][0]
    packed = numpy_helper.to_array(portable_inits[layer0["weights"]["w_in_q"]], base_dir=str(build)).view(np.uint8)
    # each expert's INT4 copies hold the same bytes: the kernel gets them once, the expert's first INT4 slot
    owner = np.repeat(np.arange(len(layer0["copies"])), layer0["copies"])[np.asarray(layer0["precision"]) == 1]
    experts, first = np.unique(owner, return_index=True)
    assert len(experts) < len(owner) and all(np.array_equal(packed[i], packed[first[e == experts][0]])
                                             for i, e in enumerate(owner))
    packed = packed[first]
    inter = packed.shape[1] // 2
    assert fused.dtype == np.uint8 and fused.shape == packed.shape
    assert np.array_equal(fused[:, 0::2] ^ 0x88, packed[:, :inter]) and np.array_equal(fused[:, 1::2] ^ 0x88, packed[:, inter:])
    assert result.parity.passed and {r.file for r in result.parity.outputs} == {"model.ort.onnx", "model.onnx"}


def test_partial_blocks_keep_the_portable_body(tiny, tmp_path):
    """hidden 64 with group size 128: INT4 copies with a partial last block, which QMoE cannot take."""
    model_dir, _ = tiny("mixtral")
    plan = _plan(model_dir, tmp_path / "plan.json", group_size=128)
    result = export_model(model_dir, plan, tmp_path / "build", show_progress=False)
    assert result.parity.passed, result.parity.summary()
    routes = [layer["onnxruntime"] for layer in result.manifest["moe_layers"]]
    assert all(r["route"] == "portable" and "multiples of the group size" in r["reason"] for r in routes)
    proto, _ = _initializers(result.out_dir / "model.ort.onnx")
    assert sum(n.op_type == OP_NAME for n in proto.graph.node) == len(routes)
    assert any("keep the portable body" in note for note in result.manifest["notes"])


def test_a_plan_that_changes_nothing_exports_and_says_so(tiny, tmp_path):
    """No room for a replica means no INT4 copy either (quantization is lazy): an identity plan, with empty INT4
    weight tensors, which used to fail inside ONNX Runtime."""
    model_dir, _ = tiny("qwen3_moe")
    plan = _plan(model_dir, tmp_path / "plan.json", max_replicas=0)
    layers = json.loads(plan.read_text())["layers"]
    assert all(e["precision"] == "original" and e["replicas"] == 0 for l in layers for e in l["experts"])
    result = export_model(model_dir, plan, tmp_path / "build", show_progress=False)
    assert result.parity.passed, result.parity.summary()
    assert "the plan changes nothing" in result.manifest["notes"][0]


def _break_fused_layout(monkeypatch):
    """A wrong gate/up layout in the fused route: the export runs, and its check must fail."""
    from rq.export import ort_fused

    monkeypatch.setattr(ort_fused, "_interleave", lambda b, name, inter: name)


def test_failed_check_leaves_nothing_at_out(tiny, tmp_path, monkeypatch):
    _break_fused_layout(monkeypatch)
    model_dir, plan = tiny("qwen3_moe")
    out = tmp_path / "build"
    with pytest.raises(ExportCheckFailed) as err:
        export_model(model_dir, plan, out, show_progress=False)
    message = str(err.value)
    assert "\n" not in message and "does not match the PyTorch reference" in message and "--keep-failed" in message
    assert not err.value.report.passed and any(r.file == "model.ort.onnx" for r in err.value.report.failures())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_keep_failed_keeps_the_attempt_and_says_where(tiny, tmp_path, monkeypatch):
    _break_fused_layout(monkeypatch)
    model_dir, plan = tiny("qwen3_moe")
    out = tmp_path / "build"
    with pytest.raises(RQError) as err:
        export_model(model_dir, plan, out, show_progress=False, keep_failed=True)
    kept = tmp_path / "build.failed"
    assert str(kept) in str(err.value) and not out.exists()
    assert (kept / "model.ort.onnx").is_file() and (kept / "manifest.json").is_file()
