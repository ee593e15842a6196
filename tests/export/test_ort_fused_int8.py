"""ONNX Runtime's fused route for layers with INT8 copies (rq.export.ort_fused): the INT8 class on exactly
dequantized weights in a ``MoE`` node, beside ``QMoE`` (INT4) and ``MoE`` (original), against the float32
reference within docs/spec.md §9; and why not ONNX Runtime's own 8-bit ``QMoE`` (measured here, so a later
ONNX Runtime that fixes it shows up)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from rq.core import int8
from rq.core.op import CALL_INPUTS, rq_moe_reference
from rq.export.function import DOMAIN, OP_NAME, node_attributes, rq_functions
from rq.export.ort_fused import MS_DOMAIN, write_ort_file
from rq.testing.layers import random_layer, random_routing

FLOATS = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def _write_layer_model(layer, hidden: int, dtype: torch.dtype, path) -> None:
    """One ``rq::RQMoE`` node as the exporter writes it (node name ``rq_moe_0``, INT4 bytes INT8-typed)."""
    names = CALL_INPUTS + layer.weight_names
    node = helper.make_node(OP_NAME, list(names), ["y", "expert_counts"], domain=DOMAIN, name="rq_moe_0",
                            **node_attributes(layer))
    inits = [numpy_helper.from_array(t.numpy().view(np.int8) if n in ("w_in_q", "w_out_q") else t.numpy(), n)
             for n, t in zip(layer.weight_names, layer.tensors())]
    n, f = layer.num_experts, FLOATS[dtype]
    graph = helper.make_graph(
        [node], "layer",
        [helper.make_tensor_value_info("hidden", f, ["T", hidden]),
         helper.make_tensor_value_info("topk_ids", TensorProto.INT64, ["T", layer.top_k]),
         helper.make_tensor_value_info("topk_weights", f, ["T", layer.top_k]),
         helper.make_tensor_value_info("offsets", TensorProto.INT64, [n])],
        [helper.make_tensor_value_info("y", f, ["T", hidden]),
         helper.make_tensor_value_info("expert_counts", TensorProto.INT64, [n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                              functions=rq_functions(layer.activation, int8=layer.has_int8_class))
    model.ir_version = 10
    onnx.save_model(model, path)


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_fused_route_runs_int8_copies_within_the_spec(tmp_path_factory, data):
    """Fuzz: random copies at random precisions with at least one INT8 copy, replicas of either quantized format,
    gated and plain activations, float32 and float16, INT8 rows with a partial last block: model.ort.onnx fuses the
    layer (no portable body) and agrees with the reference (§9; counts exact)."""
    logcnt = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=5), label="logcnt"))
    precision = list(data.draw(st.lists(st.integers(0, 2), min_size=sum(logcnt), max_size=sum(logcnt))))
    precision[data.draw(st.integers(0, len(precision) - 1), label="int8 copy")] = 2
    activation = data.draw(st.sampled_from(["silu_glu", "relu", "gelu_tanh"]), label="activation")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    # INT4 copies need whole blocks (QMoE); INT8-only layers may have a partial one (I = 48, G = 64)
    inter = 64 if 1 in precision else data.draw(st.sampled_from([48, 64]), label="inter")
    seed = data.draw(st.integers(0, 1000), label="seed")
    layer = random_layer(logcnt, tuple(precision), hidden=64, inter=inter, activation=activation, seed=seed,
                         dtype=dtype, int8_class=True)
    hidden, ids, weights = random_routing(data.draw(st.integers(1, 40), label="tokens"), 2, len(logcnt), seed=seed,
                                          dtype=dtype)
    offsets = torch.tensor(data.draw(st.lists(st.integers(0, 9), min_size=len(logcnt), max_size=len(logcnt))))
    folder = tmp_path_factory.mktemp("ort_int8")
    _write_layer_model(layer, 64, dtype, folder / "model.onnx")
    path, routes = write_ort_file(folder / "model.onnx", {0: (64, inter)}, "float32" if dtype == torch.float32
                                  else "float16")
    assert [r.fused for r in routes] == [True], routes
    proto = onnx.load(path)
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    assert (DOMAIN, OP_NAME) not in ops
    assert ops.count((MS_DOMAIN, "MoE")) == (0 in precision) + 1 and ops.count((MS_DOMAIN, "QMoE")) == (1 in precision)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, counts = sess.run(None, {"hidden": hidden.numpy(), "topk_ids": ids.numpy(), "topk_weights": weights.numpy(),
                                "offsets": offsets.numpy()})
    expected, want_counts = rq_moe_reference(hidden.float(), ids, weights.float(), layer, offsets)
    atol, rtol = (1e-4, 1e-3) if dtype == torch.float32 else (2e-2, 1e-2)  # docs/spec.md §9
    np.testing.assert_allclose(y.astype(np.float32), expected.numpy(), atol=atol, rtol=rtol)
    np.testing.assert_array_equal(counts, want_counts.numpy())


def _qmoe_8bit_error(hidden: int = 128, inter: int = 128, group: int = 64, tokens: int = 8) -> tuple[float, float]:
    """One expert (relu) through ONNX Runtime's 8-bit ``QMoE`` with the §5a values (``XOR 0x80``: its zero point is
    128) vs the exact ``q * scale`` in float64: ``(max abs error, max |y|)``."""
    gen = torch.Generator().manual_seed(0)
    q1 = int8.quantize(torch.randn(inter, hidden, generator=gen) / hidden ** 0.5, group)
    q2 = int8.quantize(torch.randn(hidden, inter, generator=gen) / inter ** 0.5, group)
    x = torch.randn(tokens, hidden, generator=gen)
    ref = torch.relu(x.double() @ int8.dequantize(q1).double().T) @ int8.dequantize(q2).double().T
    as_u8 = lambda q: (q.values.numpy().view(np.uint8) ^ 0x80)[None]  # noqa: E731
    inits = [numpy_helper.from_array(as_u8(q1), "q1"), numpy_helper.from_array(q1.scales.float().numpy()[None], "s1"),
             numpy_helper.from_array(as_u8(q2), "q2"), numpy_helper.from_array(q2.scales.float().numpy()[None], "s2")]
    node = helper.make_node("QMoE", ["x", "p", "q1", "s1", "", "q2", "s2", "", "", "", "", "", "", "", "p"], ["y"],
                            domain=MS_DOMAIN, k=1, expert_weight_bits=8, block_size=group, activation_type="relu",
                            normalize_routing_weights=0)
    graph = helper.make_graph([node], "q8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden]),
                                             helper.make_tensor_value_info("p", TensorProto.FLOAT, [tokens, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.numpy(), "p": np.ones((tokens, 1), np.float32)})[0]
    return float(np.abs(y - ref.numpy()).max()), float(ref.abs().max())


def test_onnx_runtime_8bit_qmoe_is_outside_the_float32_tolerance(monkeypatch):
    """Why the INT8 class does not use ``QMoE`` with ``expert_weight_bits=8``: ONNX Runtime's CPU kernel quantizes the
    activations to int8 for block-wise 8-bit experts (MLAS n-bit GEMM), whatever the node's ``accuracy_level``;
    only the process-wide ``ORT_QMOE_CPU_QNBIT_GEMM=fp32`` makes it exact, and a file cannot set that."""
    monkeypatch.delenv("ORT_QMOE_CPU_QNBIT_GEMM", raising=False)
    error, scale = _qmoe_8bit_error()
    if error <= 1e-4:
        pytest.fail(f"ONNX Runtime {ort.__version__}'s 8-bit QMoE is now exact ({error:.2g}): route the INT8 class "
                    "through it (rq.export.ort_fused) and update docs/spec.md §8")
    assert error > 1e-3 * scale, (error, scale)
    monkeypatch.setenv("ORT_QMOE_CPU_QNBIT_GEMM", "fp32")  # read when the session is created
    exact, _ = _qmoe_8bit_error()
    assert exact <= 1e-5, exact
