"""Whole ``rq::RQMoE`` on the Triton kernels vs the float32 PyTorch reference (docs/spec.md §9 tolerances)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rq.core.experts import ACTIVATIONS
from rq.core.op import WEIGHT_INPUTS, RQLayerWeights, rq_moe_reference
from rq.kernels import rq_moe
from rq.rqmodel import backends

TOLERANCE = {  # docs/spec.md §9: (atol, rtol)
    torch.float32: (1e-4, 1e-3),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (2e-2, 1e-2),  # bf16 is not in docs/spec.md §9; held to the float16 bar here
}

LAYOUTS = [
    # (copies per expert, precision per copy)
    ([1, 1, 1, 1], [0, 0, 0, 0]),  # original precision only
    ([1, 2, 1, 3], [1, 1, 1, 1, 1, 1, 1]),  # INT4 only
    ([2, 1, 1, 3, 1], [0, 1, 1, 0, 1, 1, 0, 1]),  # mixed, replicas INT4
]


def bundle(layer: dict, top_k: int) -> RQLayerWeights:
    """The op's layer bundle of a :func:`make_layer` dict."""
    return RQLayerWeights(top_k, layer["activation"], layer["group_size"], tuple(layer["logcnt"].tolist()),
                          tuple(layer["precision"].tolist()), *(layer[name] for name in WEIGHT_INPUTS))


def _run(fn, hidden, ids, weights, offsets, layer):
    return fn(hidden, ids, weights, bundle(layer, ids.shape[1]), offsets)


def _check(y, counts, y_ref, counts_ref, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert y.dtype == dtype
    assert torch.equal(counts.cpu(), counts_ref.cpu())
    torch.testing.assert_close(y.float().cpu(), y_ref.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_activations(device, make_layer, random_routing, activation, dtype):
    copies, precision = LAYOUTS[2]
    layer = make_layer(copies, precision, 64, 64, activation, 64, dtype, device, seed=1)
    ids, w = random_routing(9, 2, len(copies), dtype, torch.int64, device, seed=2)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    y, counts = _run(rq_moe, x, ids, w, None, layer)
    y_ref, counts_ref = _run(rq_moe_reference, x.float(), ids, w.float(), None,
                             {**layer, "w_in": layer["w_in"].float(), "w_out": layer["w_out"].float()})
    _check(y, counts, y_ref, counts_ref, dtype)


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize(
    "tokens,top_k,hidden,inter,group_size,ids_dtype",
    [
        (1, 1, 64, 64, 64, torch.int32),  # one token
        (13, 3, 64, 128, 64, torch.int64),  # T*K not a multiple of any tile
        (70, 2, 128, 128, 128, torch.int32),  # A > 16 * P: 64-row tiles
    ],
)
def test_shapes_and_layouts(device, make_layer, random_routing, layout, tokens, top_k, hidden, inter, group_size, ids_dtype):
    copies, precision = LAYOUTS[layout]
    dtype = torch.float16
    layer = make_layer(copies, precision, hidden, inter, "silu_glu", group_size, dtype, device, seed=layout)
    ids, w = random_routing(tokens, top_k, len(copies), dtype, ids_dtype, device, seed=tokens)
    offsets = torch.arange(len(copies), dtype=torch.int64, device=device) * 3
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype).to(device)
    y, counts = _run(rq_moe, x, ids, w, offsets, layer)
    y_ref, counts_ref = _run(rq_moe_reference, x.float(), ids, w.float(), offsets,
                             {**layer, "w_in": layer["w_in"].float(), "w_out": layer["w_out"].float()})
    _check(y, counts, y_ref, counts_ref, dtype)


def test_original_precision_odd_sizes(device, make_layer, random_routing):
    """H and I that are multiples of no tile (original-precision copies have no group-size constraint)."""
    layer = make_layer([1, 2, 1], [0, 0, 0, 0], 80, 96, "gelu_glu", 64, torch.float32, device)
    ids, w = random_routing(11, 2, 3, torch.float32, torch.int32, device, seed=5)
    x = torch.randn(11, 80, device=device)
    _check(*_run(rq_moe, x, ids, w, None, layer), *_run(rq_moe_reference, x, ids, w, None, layer), torch.float32)


def test_bfloat16_and_empty_batch(device, make_layer, random_routing):
    copies, precision = LAYOUTS[2]
    layer = make_layer(copies, precision, 64, 64, "gelu_tanh_glu", 64, torch.bfloat16, device)
    ids, w = random_routing(5, 2, len(copies), torch.bfloat16, torch.int64, device)
    x = torch.randn(5, 64).to(torch.bfloat16).to(device)
    y, counts = _run(rq_moe, x, ids, w, None, layer)
    y_ref, counts_ref = _run(rq_moe_reference, x.float(), ids, w.float(), None,
                             {**layer, "w_in": layer["w_in"].float(), "w_out": layer["w_out"].float()})
    _check(y, counts, y_ref, counts_ref, torch.bfloat16)
    y0, c0 = _run(rq_moe, x[:0], ids[:0], w[:0], None, layer)
    assert y0.shape == (0, 64) and c0.tolist() == [0] * len(copies)


def test_all_dropped_gives_zero(device, make_layer):
    layer = make_layer([1, 2], [0, 1, 1], 64, 64, "relu", 64, torch.float32, device)
    ids = torch.tensor([[-1, 2], [5, -3]], device=device)
    y, counts = _run(rq_moe, torch.randn(2, 64, device=device), ids, torch.ones(2, 2, device=device), None, layer)
    assert counts.tolist() == [0, 0] and bool((y == 0).all())


def test_shape_errors_name_expected_and_got(device, make_layer, random_routing):
    layer = make_layer([1, 1], [0, 1], 64, 64, "silu_glu", 64, torch.float16, device)
    ids, w = random_routing(3, 2, 2, torch.float16, torch.int64, device)
    x = torch.randn(3, 64).half().to(device)
    bad = {**layer, "w_in": layer["w_in"][:, :64]}
    with pytest.raises(ValueError, match=r"w_in must be \[1, 128, 64\].*got \[1, 64, 64\]"):
        _run(rq_moe, x, ids, w, None, bad)
    with pytest.raises(ValueError, match=r"topk_weights must be \[T, K\]"):
        _run(rq_moe, x, ids, w[:, :1], None, layer)
    with pytest.raises(ValueError, match="unknown activation"):
        _run(rq_moe, x, ids, w, None, {**layer, "activation": "swish"})


def test_experts_backend_registry(device, make_layer, random_routing):
    raw = make_layer([1, 2], [0, 1, 1], 64, 64, "silu_glu", 64, torch.float32, device)
    ids, w = random_routing(4, 2, 2, torch.float32, torch.int64, device)
    layer = bundle(raw, 2)
    x = torch.randn(4, 64, device=device)
    y_ref, c_ref = backends.resolve("reference", x.device)(x, ids, w, layer, None)
    y, c = backends.resolve("triton", x.device)(x, ids, w, layer, None)
    _check(y, c, y_ref, c_ref, torch.float32)
    y_auto, _ = backends.resolve("auto", x.device)(x, ids, w, layer, None)  # CPU -> reference, CUDA -> Triton
    _check(y_auto, c, y_ref, c_ref, torch.float32)
    with pytest.raises(ValueError, match="unknown experts backend"):
        backends.resolve("cuda", x.device)


@pytest.mark.parametrize("hidden,inter,group_size", [(80, 48, 64), (176, 144, 128)])
def test_partial_last_block(device, make_layer, random_routing, hidden, inter, group_size):
    """Widths no group size divides (LLaMA-MoE v1's 688): ``ceil(in/G)`` scales, the last block partial."""
    copies, precision = LAYOUTS[2]
    layer = make_layer(copies, precision, hidden, inter, "silu_glu", group_size, torch.float32, device, seed=7)
    ids, w = random_routing(19, 2, len(copies), torch.float32, torch.int64, device, seed=8)
    x = torch.randn(19, hidden, generator=torch.Generator().manual_seed(9)).to(device)
    _check(*_run(rq_moe, x, ids, w, None, layer), *_run(rq_moe_reference, x, ids, w, None, layer), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_realistic_shape(make_layer, random_routing, dtype):
    """A DeepSeek-like slice on a real GPU: 32 experts, top-8, replicas, H=1024, I=512."""
    copies = [1] * 24 + [2] * 6 + [3] * 2
    precision = [0 if i % 3 == 0 else 1 for i in range(sum(copies))]
    layer = make_layer(copies, precision, 1024, 512, "silu_glu", 128, dtype, "cuda")
    for tokens in (1, 7, 200, 2048):
        ids, w = random_routing(tokens, 8, len(copies), dtype, torch.int32, "cuda", seed=tokens, drop=0.02)
        x = torch.randn(tokens, 1024, device="cuda").to(dtype)
        y, counts = _run(rq_moe, x, ids, w, None, layer)
        y_ref, counts_ref = _run(rq_moe_reference, x.float(), ids, w.float(), None,
                                 {**layer, "w_in": layer["w_in"].float(), "w_out": layer["w_out"].float()})
        _check(y, counts, y_ref, counts_ref, dtype)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_plans_mixing_three_precisions(device, data):  # `device` is the same for every example
    """Fuzz: INT8 copies (docs/spec.md §5a) beside original and INT4 ones, partial last blocks, random offsets:
    the kernels against the reference (counts exact, outputs within the float32 tolerance)."""
    from rq.core.op import rq_moe_reference
    from rq.kernels.moe import rq_moe
    from rq.testing.layers import random_layer, random_routing as routing

    logcnt = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=4), label="logcnt"))
    precision = tuple(data.draw(st.lists(st.integers(0, 2), min_size=sum(logcnt), max_size=sum(logcnt))))
    activation = data.draw(st.sampled_from(["silu_glu", "gelu"]), label="activation")
    width = data.draw(st.sampled_from([64, 96]), label="width")
    seed = data.draw(st.integers(0, 1000), label="seed")
    layer = random_layer(logcnt, precision, hidden=width, inter=width - 32, activation=activation, seed=seed)
    hidden, ids, weights = routing(data.draw(st.integers(1, 24)), 2, len(logcnt), seed=seed, hidden=width)
    offsets = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=len(logcnt), max_size=len(logcnt))))
    y_ref, c_ref = rq_moe_reference(hidden, ids, weights, layer, offsets)
    on = {name: t.to(device) for name, t in zip(layer.weight_names, layer.tensors())}
    layer_dev = dataclasses.replace(layer, **on)
    y, c = rq_moe(hidden.to(device), ids.to(device), weights.to(device), layer_dev, offsets.to(device))
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-4, rtol=1e-3)
    assert torch.equal(c.cpu(), c_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_realistic_shape_three_precisions(dtype):
    """The INT8 class on a real GPU beside original and INT4 copies (the same kernels the TensorRT plugin embeds):
    32 experts, top-8, INT8 and INT4 replicas, H=1024, I=512, decode to 64-row-tile prefill sizes."""
    from rq.testing.layers import random_layer, random_routing as routing

    copies = (1,) * 24 + (2,) * 6 + (3,) * 2
    precision = tuple((0, 2, 1)[i % 3] for i in range(sum(copies)))
    layer = random_layer(copies, precision, hidden=1024, inter=512, group_size=128, top_k=8, dtype=dtype, seed=3)
    on = {name: t.to("cuda") for name, t in zip(layer.weight_names, layer.tensors())}
    layer_dev = dataclasses.replace(layer, **on)
    layer_ref = dataclasses.replace(layer, w_in=layer.w_in.float(), w_out=layer.w_out.float())
    for tokens in (1, 7, 200, 2048):
        hidden, ids, weights = routing(tokens, 8, len(copies), seed=tokens, hidden=1024, dtype=dtype)
        y_ref, c_ref = rq_moe_reference(hidden.float(), ids, weights.float(), layer_ref)
        y, c = rq_moe(hidden.cuda(), ids.cuda(), weights.cuda(), layer_dev)
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(y.float().cpu(), y_ref, atol=atol, rtol=rtol)
        assert torch.equal(c.cpu(), c_ref)
