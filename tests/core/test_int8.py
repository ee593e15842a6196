"""docs/spec.md §5a exactness (hand-computed values, scales, rounding, partial blocks) and the INT8 class of the
op bundle (§8: precision code 2, slots per class, the reference against a float64 computation)."""

import pytest
import torch

from rq.core import int4, int8, op


def test_hand_computed_block():
    # one row, one block of 64: max |w| = 63.5 -> scale = 0.5 exactly in float16
    w = torch.zeros(1, 64)
    w[0, :5] = torch.tensor([63.5, -63.5, 0.75, -0.25, 1.25])
    q = int8.quantize(w, 64)
    assert q.scales.dtype == torch.float16 and q.scales.tolist() == [[0.5]]
    assert q.values.dtype == torch.int8
    # 0.75/0.5 = 1.5 -> 2, -0.25/0.5 = -0.5 -> -0, 1.25/0.5 = 2.5 -> 2 (half to even)
    assert q.values[0, :5].tolist() == [127, -127, 2, 0, 2]
    assert int8.dequantize(q)[0, :5].tolist() == [63.5, -63.5, 1.0, 0.0, 1.0]


def test_scale_is_rounded_to_float16_before_dividing():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = 1.0, 0.3
    q = int8.quantize(w, 64)
    scale = torch.tensor(1.0 / 127, dtype=torch.float32).to(torch.float16)
    assert q.scales[0, 0] == scale
    expected = torch.round(torch.tensor([1.0, 0.3]) / scale.float()).clamp(-127, 127)
    assert q.values[0, :2].tolist() == expected.tolist()


def test_zero_block_partial_block_and_nbytes():
    w = torch.zeros(3, 70)
    w[1, 65] = -2.0  # only in the partial second block of row 1
    q = int8.quantize(w, 64)
    assert q.scales.shape == (3, 2) and q.scales[0].tolist() == [1.0, 1.0]
    assert float(q.scales[1, 1]) == pytest.approx(2 / 127, rel=1e-3) and int(q.values[1, 65]) == -127
    assert q.nbytes == int8.int8_nbytes((3, 70), 64) == 3 * 70 + 3 * 2 * 2


@pytest.mark.parametrize("group", [64, 128])
def test_exact_product_and_error_bound(group):
    torch.manual_seed(0)
    w = torch.randn(16, 200) * 0.1
    q = int8.quantize(w, group)
    deq = int8.dequantize(q)
    blocks = torch.repeat_interleave(q.scales.float(), group, dim=1)[:, :200]
    assert torch.equal(deq, q.values.float() * blocks)  # q * scale_f16 exactly, no rounding
    assert bool(((deq - w).abs() <= blocks / 2 + 1e-7).all())
    assert int(q.values.min()) >= -127
    assert torch.equal(int8.dequantize(q, torch.float16), deq.to(torch.float16))
    # finer than INT4 on the same blocks
    assert (deq - w).norm() < (int4.dequantize(int4.quantize(w, group)) - w).norm() / 8


def test_group_size_and_shape_are_checked():
    with pytest.raises(ValueError, match="group size 32"):
        int8.quantize(torch.ones(2, 64), 32)
    with pytest.raises(ValueError, match="shape"):
        int8.quantize(torch.ones(64), 64)


def _mixed_layer(activation="silu_glu", hidden=70, inter=40, group=64, int8_class=False, precision=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logcnt = (1, 3, 2, 1)
    precision = precision or (0, 2, 1, 2, 2, 1, 1)
    i_in = 2 * inter if op.is_glu(activation) else inter
    experts = [(torch.randn(i_in, hidden, generator=gen) * 0.2, torch.randn(hidden, inter, generator=gen) * 0.2)
               for _ in logcnt]
    copies = [experts[e] for e, c in enumerate(logcnt) for _ in range(c)]
    return op.stack_layer(2, activation, group, logcnt, precision, copies, int8_class=int8_class), experts


def test_bundle_int8_class_slots_and_validation():
    layer, _ = _mixed_layer()
    assert layer.has_int8_class and (layer.num_orig, layer.num_int4, layer.num_int8) == (1, 3, 3)
    assert layer.tables.slot.tolist() == [0, 0, 0, 1, 2, 1, 2]
    assert layer.weight_names == op.WEIGHT_INPUTS + op.INT8_INPUTS and len(layer.tensors()) == 10
    assert layer.w_in_q8.shape == (3, 80, 70) and layer.w_out_scales8.shape == (3, 70, 1)
    no_int8, _ = _mixed_layer(precision=(0, 1, 1, 1, 0, 1, 1))
    assert not no_int8.has_int8_class and len(no_int8.tensors()) == 6
    assert _mixed_layer(precision=(0, 1, 1, 1, 0, 1, 1), int8_class=True)[0].w_in_q8.shape == (0, 80, 70)
    bad = op.RQLayerWeights(**{**{k: getattr(no_int8, k) for k in ("top_k", "activation", "group_size", "logcnt")},
                               "precision": (0, 2, 1, 1, 0, 1, 1), **dict(zip(op.WEIGHT_INPUTS, no_int8.tensors()))})
    with pytest.raises(ValueError, match="no INT8 weights"):
        bad.sizes
    with pytest.raises(ValueError, match="0 \\(original\\), 1 \\(int4\\) or 2 \\(int8\\)"):
        op.copy_tables(torch.tensor([1, 1]), torch.tensor([0, 3]))


@pytest.mark.parametrize("activation", ["silu_glu", "gelu"])
def test_reference_runs_each_copy_at_its_precision(activation):
    """Every assignment against a float64 computation with that copy's own dequantized weights."""
    layer, experts = _mixed_layer(activation)
    gen = torch.Generator().manual_seed(3)
    tokens = 23
    hidden = torch.randn(tokens, 70, generator=gen)
    ids = torch.randint(0, 4, (tokens, 2), generator=gen)
    ids[2, 1] = -1
    weights = torch.rand(tokens, 2, generator=gen)
    offsets = torch.tensor([0, 2, 1, 0])
    y, counts = op.rq_moe_reference(hidden, ids, weights, layer, offsets)
    from rq.core import replica
    phys = replica.physical_ids(ids, torch.tensor(layer.logcnt), offsets)
    expected = torch.zeros(tokens, 70, dtype=torch.float64)
    for t in range(tokens):
        for k in range(2):
            p = int(phys[t, k])
            if p < 0:
                continue
            e = int(ids[t, k])
            fmt = {0: None, 1: int4, 2: int8}[layer.precision[p]]
            w_in, w_out = (w if fmt is None else fmt.dequantize(fmt.quantize(w, 64)) for w in experts[e])
            h = op.apply_activation(hidden[t:t + 1].double() @ w_in.double().T, activation)
            expected[t] += float(weights[t, k]) * (h @ w_out.double().T)[0]
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-3)
    assert counts.tolist() == torch.bincount(ids[ids >= 0], minlength=4).tolist()


@pytest.mark.parametrize("shape", [(96, 64), (33, 130), (8, 257)])
@pytest.mark.parametrize("group", [64, 128])
def test_meta_weights_quantize_to_the_shapes_of_real_ones(shape, group):
    """A skeleton's meta weight (the streamed export traces without data) gets the tensors' shapes and dtypes
    the real weight would, without the arithmetic, in both formats."""
    weight = torch.randn(shape)
    for module in (int4, int8):
        real, meta = module.quantize(weight, group), module.quantize(weight.to("meta"), group)
        for name in real.__dataclass_fields__:
            a, b = getattr(real, name), getattr(meta, name)
            if isinstance(a, torch.Tensor):
                assert (b.is_meta, b.shape, b.dtype) == (True, a.shape, a.dtype), name
            else:
                assert a == b, name
