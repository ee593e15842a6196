"""INT8 weight-only format (docs/spec.md §5a): symmetric, signed, per output row, blocks of G input features.

The INT8 class beside INT4: the same blocks (``G`` consecutive inputs per scale, a partial last block when
``in`` is not a multiple of ``G``) and the same float16 scales, with ``scale = max|w| / 127`` and values in
``[-127, 127]`` stored one per byte as ``int8`` — no packing, so the bytes are what ONNX ``DequantizeLinear``
(INT8 data, zero point 0, ``block_size=G``) and TensorRT's blocked INT8 dequantize consume unchanged. The
dequantized value is the exact product ``q * scale`` (an 8-bit integer times a float16 has at most 19
significant bits, exact in float32); an implementation computing in float16 rounds it once.

Pure functions over tensors; the block arithmetic is :mod:`rq.core.int4`'s with the other range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rq.core import int4
from rq.core.int4 import can_quantize, check_group_size, num_blocks

QMAX = 127
QMIN = -QMAX  # symmetric: -128 is never produced


@dataclass(frozen=True)
class Int8Weight:
    """One quantized ``W[out, in]``: ``values`` int8 ``[out, in]``, ``scales`` float16 ``[out, ceil(in/G)]``."""

    values: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.numel() + self.scales.numel() * self.scales.element_size()


def int8_nbytes(shape: tuple[int, int], group_size: int) -> int:
    """Exact bytes of the int8 values plus their float16 scales, without quantizing anything."""
    out_features, in_features = shape
    return out_features * in_features + out_features * num_blocks(in_features, group_size) * 2


def compute_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float16 ``[out, ceil(in/G)]``: ``max|W| / 127`` per block in float32, then rounded; all-zero blocks get 1."""
    return int4.compute_scales(weight, group_size, qmax=QMAX)


def quantize_values(weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 ``[out, in]`` in [-127, 127]: ``clamp(round_half_even(W / scale_f16))``, computed in float32."""
    return int4.quantize_values(weight, scales, group_size, qmin=QMIN, qmax=QMAX)


def quantize(weight: torch.Tensor, group_size: int = 128) -> Int8Weight:
    """Quantize ``W[out, in]`` (docs/spec.md §5a), any ``in``: the last block may be partial."""
    check_group_size(group_size)
    if weight.dim() != 2 or not can_quantize(tuple(weight.shape)):
        raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)}: INT8 takes a non-empty [out, in] matrix")
    if weight.is_meta:  # a skeleton's weight: the shapes only (as int4.quantize)
        return Int8Weight(int4.meta_empty(tuple(weight.shape), torch.int8), int4.meta_scales(weight, group_size),
                          group_size)
    scales = compute_scales(weight, group_size)
    return Int8Weight(quantize_values(weight, scales, group_size).contiguous(), scales, group_size)


def dequantize_values(values: torch.Tensor, scales: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., out, in]`` values ``q * scale`` of int8 ``[..., out, in]`` and scales ``[..., out, ceil(in/G)]``:
    exact in float32, then cast to ``dtype`` (one rounding for float16). Any leading dimensions."""
    in_features = values.shape[-1]
    nb = num_blocks(in_features, group_size)
    assert scales.shape[-1] == nb and values.dtype == torch.int8, (
        f"values {tuple(values.shape)} {values.dtype} / scales {tuple(scales.shape)} do not fit G={group_size}")
    blocks = F.pad(values.to(torch.float32), (0, nb * group_size - in_features)).unflatten(-1, (nb, group_size))
    exact = (blocks * scales.to(torch.float32).unsqueeze(-1)).flatten(-2)[..., :in_features]
    return exact if dtype == torch.float32 else exact.to(dtype)


def dequantize(q: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale_f16``, exact in float32 (docs/spec.md §5a); ``dtype`` float16 rounds it once."""
    return dequantize_values(q.values, q.scales, q.group_size, dtype)
