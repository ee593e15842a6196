"""docs/spec.md §5 exactness: hand-computed bytes, scales, rounding, partial blocks and round trips."""

import pytest
import torch

from rq.core import int4


def test_pack_layout_low_nibble_first_twos_complement():
    values = torch.tensor([[1, -1, 7, -8]], dtype=torch.int8)
    # element 0 -> low nibble of byte 0, element 1 -> high nibble; -1 = 0xF, -8 = 0x8
    assert int4.pack(values).tolist() == [[0xF1, 0x87]]
    assert int4.unpack(int4.pack(values)).tolist() == values.tolist()


def test_hand_computed_block():
    # one row, one block of 64: max |w| = 3.5 -> scale = 0.5 exactly in float16
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([3.5, -3.5, 0.75, -0.25])
    q = int4.quantize(w, 64)
    assert q.scales.dtype == torch.float16 and q.scales.tolist() == [[0.5]]
    # 0.75 / 0.5 = 1.5 -> 2 (half to even); -0.25 / 0.5 = -0.5 -> -0 (half to even)
    assert int4.unpack(q.packed)[0, :4].tolist() == [7, -7, 2, 0]
    assert q.packed[0, :2].tolist() == [0x97, 0x02]
    assert int4.dequantize(q, torch.float32)[0, :4].tolist() == [3.5, -3.5, 1.0, 0.0]


def test_zero_block_gets_scale_one_and_nbytes():
    w = torch.zeros(3, 128)
    q = int4.quantize(w, 64)
    assert q.scales.tolist() == [[1.0, 1.0]] * 3
    assert q.nbytes == int4.int4_nbytes((3, 128), 64) == 3 * 64 + 3 * 2 * 2


@pytest.mark.parametrize("group", [64, 128])
def test_round_trip_error_bounded_by_half_scale(group):
    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.1
    q = int4.quantize(w, group)
    deq = int4.dequantize(q, torch.float32)
    scale = q.scales.float().repeat_interleave(group, 1)
    assert torch.all((deq - w).abs() <= scale / 2 + 1e-3 * scale)
    # re-quantizing dequantized weights is a fixed point on the bytes
    assert torch.equal(int4.quantize(deq, group).packed, q.packed)


def test_dequantize_is_the_exact_product():
    """q * scale_f16 without rounding in float32; float16 rounds that product once (docs/spec.md §5)."""
    torch.manual_seed(1)
    w = torch.randn(8, 128)
    q = int4.quantize(w, 128)
    v = int4.unpack(q.packed)
    assert v.min() >= -8 and v.max() <= 7
    exact = v.double() * q.scales.double().repeat_interleave(128, 1)  # float64: certainly exact
    assert torch.equal(int4.dequantize(q).double(), exact)
    assert torch.equal(int4.dequantize(q, torch.float16), exact.float().half())


def test_partial_last_block_hand_computed():
    """in = 70, G = 64: two scales per row, the second over the 6 trailing inputs only."""
    w = torch.zeros(1, 70)
    w[0, 0], w[0, 63] = 7.0, -1.0  # block 0: max 7 -> scale 1
    w[0, 64], w[0, 69] = 0.35, -0.7  # block 1 (6 inputs): max 0.7 -> scale 0.1 in float16
    q = int4.quantize(w, 64)
    assert q.packed.shape == (1, 35) and q.scales.shape == (1, 2)
    assert q.scales[0, 0].item() == 1.0 and q.scales[0, 1].item() == torch.tensor(0.1).half().item()
    values = int4.unpack(q.packed, 70)[0]
    assert values[0].item() == 7 and values[63].item() == -1 and values[64].item() == 4 and values[69].item() == -7
    assert q.nbytes == int4.int4_nbytes((1, 70), 64) == 35 + 2 * 2


def test_odd_width_pads_the_last_high_nibble_with_zero():
    values = torch.tensor([[1, -2, 3]], dtype=torch.int8)
    packed = int4.pack(values)
    assert packed.tolist() == [[0xE1, 0x03]]
    assert int4.unpack(packed, 3).tolist() == values.tolist()
    q = int4.quantize(torch.tensor([[1.0, -2.0, 3.0]]), 64)
    assert q.shape == (1, 3) and int4.dequantize(q).shape == (1, 3)


@pytest.mark.parametrize("shape", [(3, 688), (5, 1376), (2, 65), (4, 1)])
def test_any_width_round_trips(shape):
    torch.manual_seed(2)
    w = torch.randn(*shape)
    for group in (64, 128):
        q = int4.quantize(w, group)
        assert q.scales.shape == (shape[0], -(-shape[1] // group)) and q.packed.shape == (shape[0], -(-shape[1] // 2))
        deq = int4.dequantize(q)
        assert torch.equal(int4.quantize(deq, group).packed, q.packed)
        assert q.nbytes == int4.int4_nbytes(shape, group)


def test_bad_group_size_and_shape():
    with pytest.raises(ValueError, match="group size"):
        int4.quantize(torch.zeros(2, 96), 32)
    with pytest.raises(ValueError, match="non-empty"):
        int4.quantize(torch.zeros(2, 0), 64)
    assert int4.can_quantize((2, 96)) and not int4.can_quantize((2, 0)) and not int4.can_quantize((96,))
