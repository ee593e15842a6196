"""SPEC §5 exactness: hand-computed bytes, scales, rounding and round trips."""

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


def test_values_stay_in_range_and_dequantize_is_float16_exact():
    torch.manual_seed(1)
    w = torch.randn(8, 128)
    q = int4.quantize(w, 128)
    v = int4.unpack(q.packed)
    assert v.min() >= -8 and v.max() <= 7
    half = int4.dequantize(q, torch.float16)
    assert torch.equal(half.float(), (v.float() * q.scales.float().repeat_interleave(128, 1)).half().float())


def test_bad_group_size_and_shape():
    with pytest.raises(ValueError, match="group size"):
        int4.quantize(torch.zeros(2, 96), 32)
    with pytest.raises(ValueError, match="multiple"):
        int4.quantize(torch.zeros(2, 96), 64)
    assert not int4.can_quantize((2, 96), 64) and int4.can_quantize((2, 128), 64)
