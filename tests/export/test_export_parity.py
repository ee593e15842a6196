"""Export + parity of every supported architecture's tiny checkpoint, and the structure of what is written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rq.models.adapters import load_model
from rq.core.op import CALL_INPUTS, INPUTS, WEIGHT_INPUTS
from rq.export.function import DOMAIN, MAP_NAME, OP_NAME
from rq.export.onnx_file import rq_nodes
from rq.export.runtime import OrtGenerator
from rq.rqmodel.model import apply_plan
from rq.plan.schema import load_plan
from rq.testing.tiny import TINY_ARCHS


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_export_parity(arch, exported):
    result = exported(arch)
    report = result.parity
    assert report.passed, report.summary()
    phases = {(row.phase, row.output.split(".")[0]) for row in report.outputs}
    assert ("prefill", "logits") in phases and ("streaming", "logits") in phases
    assert ("streaming", "expert_counts") in phases
    assert all(row.exact for row in report.outputs if row.output.startswith("expert_counts"))
    decode = next(r for r in report.outputs if r.phase == "streaming" and r.output == "logits")
    assert decode.iterations == 17  # prefill + 16 decode steps
    assert report.summary().splitlines()[-1].startswith("PASSED |")
    saved = json.loads((result.out_dir / "parity.json").read_text())
    assert saved["passed"] and saved["build_dir"] == str(result.out_dir)

    manifest = result.manifest
    assert manifest["architecture"] == arch and manifest["num_moe_layers"] == len(manifest["moe_layers"])
    for graph in manifest["graphs"].values():
        assert (result.out_dir / graph["file"]).is_file() and (result.out_dir / graph["data"]).is_file()
    assert (result.out_dir / "tokenizer.json").is_file()
    assert (result.out_dir / "plan.json").read_bytes() == (result.out_dir / "plan.json").read_bytes()
    assert not list(result.out_dir.parent.glob(f".{result.out_dir.name}.tmp-*")), "temporary folder left behind"


def test_rqmoe_node_structure(exported, tiny):
    result = exported("mixtral")
    path = result.out_dir / "model.onnx"
    proto = onnx.load(path, load_external_data=False)
    plan = load_plan(tiny("mixtral")[1])
    nodes = rq_nodes(proto)
    assert len(nodes) == len(plan.layers)
    assert {(i.domain, i.version) for i in proto.opset_import} >= {("", 21), (DOMAIN, 1)}
    assert {(f.domain, f.name) for f in proto.functions} == {(DOMAIN, OP_NAME), (DOMAIN, MAP_NAME)}
    graph_inputs = {i.name for i in proto.graph.input}
    graph_outputs = {o.name for o in proto.graph.output}
    initializers = {t.name: t for t in proto.graph.initializer}
    for layer, (node, layer_plan) in enumerate(zip(nodes, plan.layers)):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"rq" and attrs["plugin_version"] == b"1"
        assert attrs["activation"] == b"silu_glu" and attrs["group_size"] == 64
        assert attrs["num_experts"] == 8 and attrs["top_k"] == 2
        assert attrs["copies"] == layer_plan.logcnt and attrs["precision"] == layer_plan.precision
        assert len(node.input) == len(INPUTS) and len(node.output) == 2
        assert node.input[3] == f"rq_offsets.{layer}" and f"rq_offsets.{layer}" in graph_inputs
        assert node.output[1] == f"expert_counts.{layer}" and f"expert_counts.{layer}" in graph_outputs
        assert all(name in initializers for name in node.input[4:]), "expert weights must be initializers"
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in (initializers[n] for n in node.input[6:]))
        assert result.manifest["moe_layers"][layer]["weights"] == dict(zip(WEIGHT_INPUTS, node.input[len(CALL_INPUTS):]))


def test_int4_bytes_are_the_reference_buffers(exported, tiny):
    """The exported INT4 data and scales are RQExperts' docs/spec.md §5 bytes, never re-quantized; the packed
    bytes are INT8-typed initializers (so TensorRT's parser passes them to the plugin unchanged)."""
    result = exported("qwen3_moe")
    model_dir, plan_path = tiny("qwen3_moe")
    model, adapter = load_model(model_dir)
    layers = apply_plan(model, adapter, load_plan(plan_path))
    proto = onnx.load(result.out_dir / "model.onnx")
    initializers = {t.name: t for t in proto.graph.initializer}
    for layer, node in zip(layers, rq_nodes(proto)):
        for name, init_name in zip(WEIGHT_INPUTS, node.input[len(CALL_INPUTS):]):
            exported_array = numpy_helper.to_array(initializers[init_name])
            expected = getattr(layer, name).numpy()
            if name in ("w_in_q", "w_out_q"):
                assert initializers[init_name].data_type == onnx.TensorProto.INT8, name
                exported_array = exported_array.view(np.uint8)
            assert exported_array.dtype == expected.dtype, name
            np.testing.assert_array_equal(exported_array, expected, err_msg=name)


def test_float16_export(exported):
    result = exported("mixtral", "float16")
    assert result.parity.passed, result.parity.summary()
    assert result.manifest["tolerances"]["atol"] == 2e-2
    proto = onnx.load(result.out_dir / "model.onnx", load_external_data=False)
    logits = next(o for o in proto.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_generator_offsets_rotate_and_counts(exported):
    build = exported("mixtral").out_dir
    gen = OrtGenerator(build)
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=np.int64)
    out = gen.generate(ids, mask, max_new_tokens=5)
    assert out.tokens.shape == (2, 5) and len(out.steps) == 5  # prefill + 4 decode steps
    total = {l: sum(s.expert_counts[l] for s in out.steps) for l in gen.offsets}
    for layer, offsets in gen.offsets.items():
        np.testing.assert_array_equal(offsets, total[layer])  # docs/spec.md §4: o_e += load_e after every call
        assert int(out.steps[0].expert_counts[layer].sum()) == ids.size * 2  # T*K assignments, pads included
        assert int(out.steps[1].expert_counts[layer].sum()) == 2 * 2
        np.testing.assert_array_equal(out.steps[1].offsets[layer], out.steps[0].expert_counts[layer])
    batch = OrtGenerator(build, streaming=False)
    batch.generate(ids, mask, max_new_tokens=3)
    assert all(not o.any() for o in batch.offsets.values())
    texts = gen.generate_text(["def forward(self", "The quick"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    gen.reset()
    assert all(not o.any() for o in gen.offsets.values())


def test_runtime_is_dependency_light():
    """rq.export.runtime is copied into Triton Python backends: numpy, onnxruntime, tokenizers only."""
    import ast
    from pathlib import Path

    import rq.export.runtime as runtime

    tree = ast.parse(Path(runtime.__file__).read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert modules <= {"__future__", "ctypes", "json", "dataclasses", "pathlib", "numpy", "onnxruntime", "tokenizers", "rq"}
    rq_imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("rq")}
    assert rq_imports == {"rq.errors"}  # optional: falls back to a local class when copied alone
