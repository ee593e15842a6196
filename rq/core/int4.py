"""INT4 weight-only format (docs/spec.md §5): symmetric, signed, per output row, blocks of G input features.

Pure functions over tensors. The packed layout is ONNX's INT4 layout (element ``2j`` in the low nibble,
``2j+1`` in the high nibble, two's complement), so the bytes produced here are consumed unchanged by
ONNX ``DequantizeLinear`` (opset 21, ``block_size=G``), ONNX Runtime ``MatMulNBits``/``QMoE`` (after
``packed ^ 0x88``), the Triton kernels and the TensorRT plugin. Nothing downstream ever re-quantizes.

Any input width is quantizable: when ``in`` is not a multiple of ``G`` the last block is partial
(``ceil(in/G)`` scales), and an odd ``in`` pads the last byte's high nibble with 0 (LLaMA-MoE v1's experts
are 688 wide). The dequantized value is the exact product ``q * scale`` (an integer in [-8, 7] times a
float16 is exact in float32); an implementation computing in float16 rounds it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALLOWED_GROUP_SIZES = (64, 128)
QMIN, QMAX = -8, 7


@dataclass(frozen=True)
class Int4Weight:
    """One quantized ``W[out, in]``: ``packed`` uint8 ``[out, ceil(in/2)]``, ``scales`` float16 ``[out, ceil(in/G)]``."""

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[-2], self.in_features

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()


def check_group_size(group_size: int) -> None:
    """Raises ``ValueError`` unless ``group_size`` is one of the block sizes TensorRT's INT4 accepts (64, 128)."""
    if group_size not in ALLOWED_GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported: INT4 blocks are {' or '.join(map(str, ALLOWED_GROUP_SIZES))}"
                         f" input features (the block sizes TensorRT accepts)")


def num_blocks(in_features: int, group_size: int) -> int:
    """Scales per output row: ``ceil(in / G)`` (the last block may be partial)."""
    return -(-in_features // group_size)


def packed_width(in_features: int) -> int:
    """Bytes per output row: ``ceil(in / 2)``."""
    return -(-in_features // 2)


def can_quantize(shape: tuple[int, ...]) -> bool:
    """A weight is quantizable when it is a non-empty ``[out, in]`` matrix (partial last blocks allowed)."""
    return len(shape) == 2 and shape[0] > 0 and shape[1] > 0


def int4_nbytes(shape: tuple[int, int], group_size: int) -> int:
    """Exact bytes of the packed weight plus its float16 scales, without quantizing anything."""
    out_features, in_features = shape
    return out_features * packed_width(in_features) + out_features * num_blocks(in_features, group_size) * 2


def _blocks(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 ``[out, nb, G]``: ``W`` zero-padded to whole blocks (zeros change no block maximum)."""
    out_features, in_features = weight.shape
    nb = num_blocks(in_features, group_size)
    padded = F.pad(weight.detach().to(torch.float32), (0, nb * group_size - in_features))
    return padded.reshape(out_features, nb, group_size)


def compute_scales(weight: torch.Tensor, group_size: int, qmax: int = QMAX) -> torch.Tensor:
    """float16 ``[out, ceil(in/G)]``: ``max|W| / qmax`` per block in float32 (7 here, 127 for INT8, §5a), then
    rounded; all-zero blocks get 1."""
    scales = (_blocks(weight, group_size).abs().amax(dim=-1) / qmax).to(torch.float16)
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def quantize_values(weight: torch.Tensor, scales: torch.Tensor, group_size: int, qmin: int = QMIN,
                    qmax: int = QMAX) -> torch.Tensor:
    """int8 ``[out, in]`` in [qmin, qmax] ([-8, 7] here, [-127, 127] for INT8):
    ``clamp(round_half_even(W / scale_f16))``, computed in float32."""
    out_features, in_features = weight.shape
    q = torch.round(_blocks(weight, group_size) / scales.to(torch.float32).unsqueeze(-1))  # half-to-even
    return q.clamp(qmin, qmax).to(torch.int8).reshape(out_features, -1)[:, :in_features]


def pack(values: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., in]`` in [-8, 7] -> uint8 ``[..., ceil(in/2)]``; element 2j low nibble, 2j+1 high nibble
    (an odd ``in`` pads the last high nibble with 0)."""
    if values.shape[-1] % 2:
        values = F.pad(values, (0, 1))
    nibbles = values.to(torch.uint8) & 0xF  # two's complement: -1 -> 0b1111
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack(packed: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """uint8 ``[..., ceil(in/2)]`` -> int8 ``[..., in]`` in [-8, 7] (inverse of :func:`pack`); ``in_features``
    drops the padding nibble of an odd width (default: ``2 * packed.shape[-1]``)."""
    low = ((packed & 0xF).to(torch.int8) ^ 8) - 8  # sign-extend a 4-bit two's complement value
    high = ((packed >> 4).to(torch.int8) ^ 8) - 8
    values = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return values if in_features is None else values[..., :in_features]


def quantize(weight: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """Quantize ``W[out, in]`` (docs/spec.md §5), any ``in``: the last block may be partial."""
    check_group_size(group_size)
    if weight.dim() != 2 or not can_quantize(tuple(weight.shape)):
        raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)}: INT4 takes a non-empty [out, in] matrix")
    out_features, in_features = weight.shape
    if weight.is_meta:  # a skeleton's weight (export traces without data): the shapes, none of the arithmetic
        return Int4Weight(meta_empty((out_features, packed_width(in_features)), torch.uint8),
                          meta_scales(weight, group_size), group_size, in_features)
    scales = compute_scales(weight, group_size)
    return Int4Weight(pack(quantize_values(weight, scales, group_size)), scales, group_size, in_features)


def meta_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def meta_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The meta tensor :func:`compute_scales` would return for a meta ``weight``."""
    return meta_empty((weight.shape[0], num_blocks(weight.shape[1], group_size)), torch.float16)


def dequantize_values(packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., out, in]`` values ``q * scale`` of packed ``[..., out, ceil(in/2)]`` and scales
    ``[..., out, ceil(in/G)]``: exact in float32 (a 4-bit integer times a float16), then cast to ``dtype``
    (one rounding for float16, as docs/spec.md §5 allows). Any leading dimensions (stacked copies)."""
    nb = num_blocks(in_features, group_size)
    assert scales.shape[-1] == nb and packed.shape[-1] == packed_width(in_features), (
        f"packed {tuple(packed.shape)} / scales {tuple(scales.shape)} do not fit in={in_features}, G={group_size}")
    values = unpack(packed).to(torch.float32)
    values = F.pad(values, (0, nb * group_size - values.shape[-1])).unflatten(-1, (nb, group_size))
    exact = (values * scales.to(torch.float32).unsqueeze(-1)).flatten(-2)[..., :in_features]
    return exact if dtype == torch.float32 else exact.to(dtype)


def dequantize(q: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale_f16``, exact in float32 (docs/spec.md §5); ``dtype`` float16 rounds it once."""
    return dequantize_values(q.packed, q.scales, q.group_size, q.in_features, dtype)
