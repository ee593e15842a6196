"""INT4 weight-only format of SPEC §5: symmetric, signed, per output row, blocks of G input features.

Pure functions over tensors. The packed layout is ONNX's INT4 layout (element ``2j`` in the low nibble,
``2j+1`` in the high nibble, two's complement), so the bytes produced here are consumed unchanged by
ONNX ``DequantizeLinear`` (opset 21, ``block_size=G``), ONNX Runtime ``MatMulNBits`` (after
``packed ^ 0x88``), the Triton kernels and the TensorRT plugin. Nothing downstream ever re-quantizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALLOWED_GROUP_SIZES = (64, 128)
QMIN, QMAX = -8, 7


@dataclass(frozen=True)
class Int4Weight:
    """One quantized ``W[out, in]``: ``packed`` uint8 ``[out, in/2]``, ``scales`` float16 ``[out, in/G]``."""

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()


def check_group_size(group_size: int) -> None:
    if group_size not in ALLOWED_GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported: use one of {ALLOWED_GROUP_SIZES} (SPEC §5)")


def can_quantize(shape: tuple[int, ...], group_size: int) -> bool:
    """A ``[out, in]`` weight is quantizable when ``in`` is a multiple of the group size (SPEC §5)."""
    return len(shape) == 2 and shape[1] % group_size == 0


def int4_nbytes(shape: tuple[int, int], group_size: int) -> int:
    """Exact bytes of the packed weight plus its float16 scales, without quantizing anything."""
    out_features, in_features = shape
    return out_features * (in_features // 2) + out_features * (in_features // group_size) * 2


def compute_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float16 ``[out, in/G]``: ``max|W| / 7`` per block in float32, then rounded; all-zero blocks get 1."""
    out_features, in_features = weight.shape
    blocks = weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    scales = (blocks.abs().amax(dim=-1) / QMAX).to(torch.float16)
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def quantize_values(weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 ``[out, in]`` in [-8, 7]: ``clamp(round_half_even(W / scale_f16))``, computed in float32."""
    out_features, in_features = weight.shape
    blocks = weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    q = torch.round(blocks / scales.to(torch.float32).unsqueeze(-1))  # torch.round is half-to-even
    return q.clamp(QMIN, QMAX).to(torch.int8).reshape(out_features, in_features)


def pack(values: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in]`` in [-8, 7] -> uint8 ``[out, in/2]``; element 2j low nibble, 2j+1 high nibble."""
    if values.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even input dimension, got {tuple(values.shape)}")
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, in/2]`` -> int8 ``[out, in]`` in [-8, 7] (inverse of :func:`pack`)."""
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    values = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(values >= 8, values - 16, values).to(torch.int8)


def quantize(weight: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """Quantize ``W[out, in]`` per SPEC §5. Raises when ``in`` is not a multiple of ``group_size``."""
    check_group_size(group_size)
    if weight.dim() != 2 or not can_quantize(tuple(weight.shape), group_size):
        raise ValueError(
            f"cannot quantize weight of shape {tuple(weight.shape)} with group size {group_size}: "
            f"the input dimension must be a multiple of it (try --group-size 64)"
        )
    scales = compute_scales(weight, group_size)
    return Int4Weight(pack(quantize_values(weight, scales, group_size)), scales, group_size)


def dequantize(q: Int4Weight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``q * scale_f16`` exactly: the product of an int in [-8, 7] and a float16 is exact in float32,
    and the float16 result is what every implementation agrees on (SPEC §5)."""
    values = unpack(q.packed).to(torch.float32)
    out_features, in_features = values.shape
    scales = q.scales.to(torch.float32).repeat_interleave(q.group_size, dim=-1)
    assert scales.shape == (out_features, in_features), f"scales {tuple(q.scales.shape)} do not fit {q.shape}"
    return (values * scales).to(torch.float16).to(dtype)
