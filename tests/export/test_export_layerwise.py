"""The parity check run one decoder layer at a time (``rq check --stream always``, and ``rq export`` when it
streams): each ONNX Runtime session holds one layer's weights, and the check gives the whole-file check's
verdict and errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from rq.cli.main import app
from rq.export.layerwise import LayerwiseRunner, LayerwiseUnsupported, Recurrence, _reads, segments
from rq.export.parity import check_export
from rq.testing.tiny import TINY_ARCHS


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layerwise_check_is_the_whole_check(arch, exported):
    result = exported(arch)
    whole = result.parity
    layerwise = check_export(result.out_dir, write=False, layerwise=True)
    assert layerwise.passed, layerwise.summary()
    assert [(r.file, r.phase, r.graph, r.output, r.iterations) for r in layerwise.outputs] == \
           [(r.file, r.phase, r.graph, r.output, r.iterations) for r in whole.outputs]
    atol = {"float32": 1e-4, "float16": 2e-2}[result.manifest["dtype"]]
    for a, b in zip(whole.outputs, layerwise.outputs):
        assert abs(a.max_abs - b.max_abs) <= atol, (a.output, a.max_abs, b.max_abs)
    assert layerwise.greedy_tokens == whole.greedy_tokens


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_each_session_holds_one_layer(arch, exported):
    """Every segment is one decoder layer (plus one for the embeddings, one for the head); none reads another
    layer's weights."""
    result = exported(arch)
    for graph in result.manifest["graphs"].values():
        for key in ("file", "ort_file"):
            if key not in graph:
                continue
            proto = onnx.load(result.out_dir / graph[key], load_external_data=False)
            parts = segments(proto.graph)
            blocks = [s.label for s in parts if s.label not in ("embeddings", "head")]
            assert len(blocks) == len(set(blocks)) >= 1
            # matrices only: the exporter stores equal tensors once (the norms' initial ones), under one layer's name
            matrices = {t.name for t in proto.graph.initializer if len(t.dims) >= 2}
            for part in parts:
                used = {r for n in part.nodes for r in _reads(n) if r in matrices}
                foreign = sorted(u for u in used for b in blocks if b != part.label and u.startswith(b + "."))
                assert not foreign, f"{graph[key]} {part.label} reads {foreign[:3]}"


def _scoped(op: str, inputs: list[str], outputs: list[str], scope: str) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, outputs, name=f"{scope}_{op}_{outputs[0]}")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=str(["", scope]))
    return node


def _two_layer_graph(tmp_path, state_read_by_layer0: str) -> LayerwiseRunner:
    """x -> layer 0 (+ its state s0) -> layer 1 (+ s1); ``state_read_by_layer0``: ``Shape`` or ``Add``, how
    layer 0 also reads layer 1's state."""
    f = TensorProto.FLOAT
    nodes = [_scoped("Add", ["x", "s0"], ["h0"], "m.layers.0"),
             _scoped(state_read_by_layer0, ["s1"] if state_read_by_layer0 == "Shape" else ["h0", "s1"], ["seen"],
                     "m.layers.0"),
             _scoped("Add", ["h0", "s1"], ["h1"], "m.layers.1"),
             _scoped("Identity", ["h0"], ["n0"], "m.layers.0"),
             _scoped("Identity", ["h1"], ["n1"], "m.layers.1")]
    inputs = [helper.make_tensor_value_info(n, f, [2]) for n in ("x", "s0", "s1")]
    outputs = [helper.make_tensor_value_info("h1", f, [2]), helper.make_tensor_value_info("n0", f, [2]),
               helper.make_tensor_value_info("n1", f, [2]),
               helper.make_tensor_value_info("seen", TensorProto.INT64 if state_read_by_layer0 == "Shape" else f, None)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    return LayerwiseRunner(path)


def test_runner_keeps_states_per_layer_and_refuses_cross_layer_reads(tmp_path):
    runner = _two_layer_graph(tmp_path, "Shape")
    assert [s.label for s in runner.segments] == ["m.layers.0", "m.layers.1"]
    calls = [{"x": np.full(2, float(t), np.float32)} for t in range(3)]
    rules = [Recurrence("s0", "n0"), Recurrence("s1", "n1", accumulate=True)]
    initial = {"s0": np.zeros(2, np.float32), "s1": np.ones(2, np.float32)}
    out = runner.run(calls, ["h1", "seen"], initial=initial, recurrences=rules,
                     placeholder=lambda name, call: np.zeros(2, np.float32))
    s0, s1, expected = initial["s0"], initial["s1"], []
    for call in calls:  # step-major reference of the same recurrences
        h0 = call["x"] + s0
        h1 = h0 + s1
        expected.append(h1)
        s0, s1 = h0, s1 + h1
    np.testing.assert_array_equal(np.stack([o["h1"] for o in out]), np.stack(expected))
    assert all(o["seen"].tolist() == [2] for o in out)

    runner = _two_layer_graph(tmp_path, "Add")
    with pytest.raises(LayerwiseUnsupported, match="s1 is read in m.layers.0"):
        runner.run(calls, ["h1"], initial=initial, recurrences=rules)


def test_check_cli_layer_by_layer(demo_export):
    result, _ = demo_export
    out = CliRunner().invoke(app, ["check", str(result.out_dir), "--stream", "always"])
    assert out.exit_code == 0, out.output
    assert out.output.strip().splitlines()[-1].startswith("PASSED |")
    bad = CliRunner().invoke(app, ["check", str(result.out_dir), "--stream", "sometimes"])
    assert bad.exit_code != 0 and "--stream must be auto, always or never" in bad.output
    assert "Traceback" not in bad.output
