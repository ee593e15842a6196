"""In-register INT4 dequantization of the kernels vs rq.core.int4.dequantize: bit-exact float16."""

from __future__ import annotations

import pytest
import torch

from rq.core import int4
from rq.kernels.gemm import dequantize_int4


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("shape", [(1, 128), (33, 256), (70, 384)])
def test_dequant_bit_exact(device, group_size, shape):
    gen = torch.Generator().manual_seed(shape[0] + group_size)
    w = torch.randn(*shape, generator=gen) * torch.logspace(-6, 3, shape[0]).unsqueeze(1)  # scales incl. subnormals
    w[0, :group_size] = 0  # all-zero block: scale 1
    q = int4.quantize(w, group_size)
    got = dequantize_int4(q.packed.to(device), q.scales.to(device), group_size).cpu()
    want = int4.dequantize(q)
    assert got.dtype == torch.float16
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_dequant_every_nibble(device):
    """All 256 byte values with a scale that makes q * scale inexact in float16 unless rounded once."""
    packed = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(4, 64)
    scales = torch.tensor([[1.0009765625], [65504 / 8], [6.1e-5], [1e-7]], dtype=torch.float16)  # [4, 128/128]
    q = int4.Int4Weight(packed, scales, 128)
    got = dequantize_int4(packed.to(device), scales.to(device), 128).cpu()
    assert torch.equal(got.view(torch.int16), int4.dequantize(q).view(torch.int16))
