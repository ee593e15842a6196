"""The ``rq`` model-local functions on their own: replica mapping and RQMoE semantics vs the PyTorch reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from rq.core import int4, replica
from rq.core.experts import ACTIVATIONS
from rq.core.op import INPUTS, INPUTS_INT8, WEIGHT_INPUTS, RQLayerWeights, rq_moe_reference
from rq.export.function import DOMAIN, MAP_NAME, OP_NAME, node_attributes, rq_functions
from rq.rqmodel.model import RQExperts


def _session(nodes, inputs, outputs, initializers=(), activation="silu_glu", int8=False) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                              functions=rq_functions(activation, int8=int8))
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("seed", range(6))
def test_replica_map_matches_rq_replica(seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
    tokens = [0, 1, 7, 33][seed % 4]
    logcnt = torch.randint(1, 5, (n,), generator=gen)
    offsets = torch.randint(0, 50, (n,), generator=gen)
    ids = torch.randint(-1, n + 1, (tokens, k), generator=gen)  # -1 and n are dropped assignments
    node = helper.make_node(MAP_NAME, ["ids", "offsets"], ["phys", "counts"], domain=DOMAIN, num_experts=n,
                            copies=logcnt.tolist())
    sess = _session([node], [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", k]),
                             helper.make_tensor_value_info("offsets", TensorProto.INT64, [n])],
                    [helper.make_tensor_value_info("phys", TensorProto.INT64, ["T", k]),
                     helper.make_tensor_value_info("counts", TensorProto.INT64, [n])])
    phys, counts = sess.run(None, {"ids": ids.numpy(), "offsets": offsets.numpy()})
    np.testing.assert_array_equal(phys, replica.physical_ids(ids, logcnt, offsets).numpy())
    np.testing.assert_array_equal(counts, replica.expert_counts(ids, n).numpy())


def _random_experts(activation: str, seed: int, num_experts=6, hidden=64, inter=64, group=64) -> RQExperts:
    gen = torch.Generator().manual_seed(seed)
    i_in = 2 * inter if activation.endswith("_glu") else inter
    logcnt = [1, 3, 2, 1, 1, 2][:num_experts]
    precision = torch.randint(0, 2, (sum(logcnt),), generator=gen)
    precision[0], precision[1] = 0, 1  # both classes present

    def weight(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    n_orig, n_q = int((precision == 0).sum()), int(precision.sum())
    q_in = [int4.quantize(weight(i_in, hidden), group) for _ in range(n_q)]
    q_out = [int4.quantize(weight(hidden, inter), group) for _ in range(n_q)]
    return RQExperts(RQLayerWeights(
        top_k=2, activation=activation, group_size=group, logcnt=tuple(logcnt), precision=tuple(precision.tolist()),
        w_in=weight(n_orig, i_in, hidden), w_out=weight(n_orig, hidden, inter),
        w_in_q=torch.stack([q.packed for q in q_in]), w_in_scales=torch.stack([q.scales for q in q_in]),
        w_out_q=torch.stack([q.packed for q in q_out]), w_out_scales=torch.stack([q.scales for q in q_out])))


def _initializer(experts: RQExperts, name: str) -> onnx.TensorProto:
    """The weight input as rq-export stores it: packed INT4 bytes INT8-typed (docs/spec.md §5)."""
    array = getattr(experts, name).numpy()
    return numpy_helper.from_array(array.view(np.int8) if name.endswith("_q") else array, name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype, ids_dtype, width", [(torch.float32, torch.int64, 64), (torch.float16, torch.int32, 64),
                                                    (torch.float32, torch.int64, 70), (torch.float32, torch.int64, 69)])
def test_rqmoe_function_matches_rq_experts(activation, dtype, ids_dtype, width):
    """Also at widths no group size divides: 70 (partial last block) and 69 (odd rows: a padding nibble)."""
    experts = _random_experts(activation, seed=ACTIVATIONS.index(activation), hidden=width, inter=width - 6)
    n, tokens = experts.num_experts, 29
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, width, generator=gen).to(dtype)
    ids = torch.randint(0, n, (tokens, 2), generator=gen)
    ids[3, 1], ids[5, 0] = -1, n + 2  # dropped assignments
    weights = torch.rand(tokens, 2, generator=gen).to(dtype)
    offsets = torch.tensor([0, 5, 1, 0, 3, 7])
    experts.w_in, experts.w_out = experts.w_in.to(dtype), experts.w_out.to(dtype)
    experts.mode = "streaming"
    experts.offsets.copy_(offsets)
    expected = experts(hidden, ids, weights).to(torch.float32).numpy()

    onnx_float = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
    onnx_ids = TensorProto.INT64 if ids_dtype == torch.int64 else TensorProto.INT32
    node = helper.make_node(OP_NAME, list(INPUTS), ["y", "expert_counts"], domain=DOMAIN,
                            **node_attributes(experts.layer))
    weights_init = [_initializer(experts, name) for name in WEIGHT_INPUTS]
    sess = _session([node], [helper.make_tensor_value_info("hidden", onnx_float, ["T", width]),
                             helper.make_tensor_value_info("topk_ids", onnx_ids, ["T", 2]),
                             helper.make_tensor_value_info("topk_weights", onnx_float, ["T", 2]),
                             helper.make_tensor_value_info("offsets", TensorProto.INT64, [n])],
                    [helper.make_tensor_value_info("y", onnx_float, ["T", width]),
                     helper.make_tensor_value_info("expert_counts", TensorProto.INT64, [n])],
                    weights_init, activation)
    feed = {"hidden": hidden.numpy(), "topk_ids": ids.to(ids_dtype).numpy(), "topk_weights": weights.numpy(),
            "offsets": offsets.numpy()}
    y, counts = sess.run(None, feed)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(y.astype(np.float32), expected, atol=atol, rtol=1e-3 if atol < 1e-3 else 1e-2)
    np.testing.assert_array_equal(counts, experts.last_counts.numpy())
    # no tokens at all: zero rows, zero loads
    empty = {k: (v[:0] if k != "offsets" else v) for k, v in feed.items()}
    y0, c0 = sess.run(None, empty)
    assert y0.shape == (0, width) and not c0.any()


def test_functions_are_valid_onnx():
    functions = rq_functions("silu_glu")
    assert [(f.domain, f.name) for f in functions] == [(DOMAIN, MAP_NAME), (DOMAIN, OP_NAME)]
    moe = functions[1]
    assert list(moe.input) == list(INPUTS) and list(moe.output) == ["y", "expert_counts"]
    assert {"plugin_namespace", "plugin_version", "copies", "precision", "group_size"} <= set(moe.attribute)
    ops = {n.op_type for n in moe.node}
    assert {"Loop", MAP_NAME} <= ops
    body = onnx.helper.get_node_attr_value(next(n for n in moe.node if n.op_type == "Loop"), "body")
    branch = next(n for n in body.node if n.op_type == "If")
    then_nodes = onnx.helper.get_node_attr_value(branch, "then_branch").node
    dequantize = [n for n in then_nodes if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 2, "INT4 copies go through blocked DequantizeLinear (w_in and w_out)"
    assert all(any(a.name == "block_size" and a.ref_attr_name == "group_size" for a in n.attribute)
               for n in dequantize)
    casts_to_int4 = [n for n in then_nodes if n.op_type == "Cast"
                     and onnx.helper.get_node_attr_value(n, "to") == onnx.TensorProto.INT4]
    assert len(casts_to_int4) == 2, "DequantizeLinear reads INT4 data"
    with pytest.raises(ValueError, match="opset >= 21"):
        rq_functions("silu_glu", opset=18)


FUNCTION_SHA256 = {  # the body of files made before the INT8 class existed: a model without INT8 copies keeps it
    "silu_glu": "ed72f875ab92b4c94741ea809aeb020eb80427c46fbc15edb4458d2f24e589a7",
    "gelu_glu": "52650fbb7298a789b9bc98f403ffdf7545c1af13e08714775713e2db66597744",
    "gelu_tanh_glu": "f925061e5a69cf78a56fcdddeccdc6c6ccc4820a2ca968bec8c0958ea2153d57",
    "gelu": "507045c41ea06a8865c5bd38afbf1ad87fc7fc2e71b5c264d7479811f75b96c0",
    "gelu_tanh": "ca95981d73ba50fa462ca03e3b2566bf87e6e53a2e59eeed7a1ac304cadc267b",
    "relu": "50c6391893778f062c0457f0c20ce7ad5a449ca2e5bb1d089a5417b191e919eb",
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_function_without_int8_class_is_unchanged(activation):
    import hashlib

    body = b"".join(f.SerializeToString() for f in rq_functions(activation))
    assert hashlib.sha256(body).hexdigest() == FUNCTION_SHA256[activation]
    assert list(rq_functions(activation, int8=True)[1].input) == list(INPUTS_INT8)


def _mixed_session(layer, width, onnx_float):
    from rq.export.function import node_attributes as attrs

    names = INPUTS_INT8 if layer.has_int8_class else INPUTS
    node = helper.make_node(OP_NAME, list(names), ["y", "expert_counts"], domain=DOMAIN, **attrs(layer))
    inits = [numpy_helper.from_array(t.numpy().view(np.int8) if n in ("w_in_q", "w_out_q") else t.numpy(), n)
             for n, t in zip(layer.weight_names, layer.tensors())]
    n = layer.num_experts
    return _session([node], [helper.make_tensor_value_info("hidden", onnx_float, ["T", width]),
                             helper.make_tensor_value_info("topk_ids", TensorProto.INT64, ["T", 2]),
                             helper.make_tensor_value_info("topk_weights", onnx_float, ["T", 2]),
                             helper.make_tensor_value_info("offsets", TensorProto.INT64, [n])],
                    [helper.make_tensor_value_info("y", onnx_float, ["T", width]),
                     helper.make_tensor_value_info("expert_counts", TensorProto.INT64, [n])],
                    inits, layer.activation, int8=layer.has_int8_class)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_function_body_runs_plans_mixing_three_precisions(data):
    """Fuzz: random copies at random precisions (original / INT4 / INT8; sometimes the INT8 class with no INT8
    copy), widths with partial blocks, float32 and float16: the body against the reference (§9 tolerances)."""
    from rq.testing.layers import random_layer, random_routing

    logcnt = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=4), label="logcnt"))
    precision = tuple(data.draw(st.lists(st.integers(0, 2), min_size=sum(logcnt), max_size=sum(logcnt))))
    activation = data.draw(st.sampled_from(["silu_glu", "gelu_tanh", "relu"]), label="activation")
    width = data.draw(st.sampled_from([64, 70]), label="width")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    seed = data.draw(st.integers(0, 1000), label="seed")
    layer = random_layer(logcnt, precision, hidden=width, inter=width - 6, activation=activation, seed=seed,
                         int8_class=data.draw(st.booleans(), label="int8_class"))
    hidden, ids, weights = random_routing(data.draw(st.integers(0, 30)), 2, len(logcnt), seed=seed, hidden=width,
                                          dtype=dtype)
    offsets = torch.tensor(data.draw(st.lists(st.integers(0, 9), min_size=len(logcnt), max_size=len(logcnt))))
    expected, counts = rq_moe_reference(hidden, ids, weights, layer, offsets)
    sess = _mixed_session(layer, width, TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16)
    y, c = sess.run(None, {"hidden": hidden.numpy(), "topk_ids": ids.numpy(), "topk_weights": weights.numpy(),
                           "offsets": offsets.numpy()})
    atol, rtol = (1e-5, 1e-3) if dtype == torch.float32 else (2e-2, 1e-2)
    np.testing.assert_allclose(y.astype(np.float32), expected.float().numpy(), atol=atol, rtol=rtol)
    np.testing.assert_array_equal(c, counts.numpy())
