"""In-register INT4 dequantization of the kernels vs rq.core.int4.dequantize: bit-exact, float32 (the exact
product ``q * scale``) and float16 (that product rounded once), full and partial last blocks."""

from __future__ import annotations

import pytest
import torch

from rq.core import int4
from rq.kernels.gemm import dequantize_int4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("shape", [(1, 128), (33, 256), (70, 384), (5, 688), (3, 129)])
def test_dequant_bit_exact(device, group_size, shape, dtype):
    gen = torch.Generator().manual_seed(shape[0] + group_size)
    w = torch.randn(*shape, generator=gen) * torch.logspace(-6, 3, shape[0]).unsqueeze(1)  # scales incl. subnormals
    w[0, :group_size] = 0  # all-zero block: scale 1
    q = int4.quantize(w, group_size)
    got = dequantize_int4(q.packed.to(device), q.scales.to(device), group_size, shape[1], dtype).cpu()
    want = int4.dequantize(q, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_dequant_every_nibble(device):
    """All 256 byte values with scales that make q * scale inexact in float16: float32 keeps the exact
    product, float16 rounds it once."""
    packed = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(4, 64)
    scales = torch.tensor([[1.0009765625], [65504 / 8], [6.1e-5], [1e-7]], dtype=torch.float16)  # [4, 128/128]
    q = int4.Int4Weight(packed, scales, 128, 128)
    for dtype in (torch.float32, torch.float16):
        got = dequantize_int4(packed.to(device), scales.to(device), 128, 128, dtype).cpu()
        assert torch.equal(got, int4.dequantize(q, dtype))
    exact = int4.dequantize(q)
    assert torch.equal(exact, int4.unpack(packed).float() * scales.float())  # no rounding at all
    assert not torch.equal(exact, exact.half().float())  # ...which float16 could not hold
