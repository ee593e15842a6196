"""What one routed expert computes, for every activation of ``rq::RQMoE`` (docs/spec.md §8).

The single definition, shared by calibration (§3), the op's reference (:mod:`rq.core.op`), the ONNX body,
the kernels and the plugin: :data:`ACTIVATIONS` is the op's ``activation`` attribute vocabulary and its index
is the integer code the Triton kernels and the TensorRT plugin switch on (their C++ table is generated from
it by ``python -m rq.kernels.aot``).

Expert weights come in the canonical form of the adapters: ``w_in [I_in, H]`` (gated activations: gate rows
``[0, I)`` then up rows ``[I, 2I)``, as Hugging Face's fused ``gate_up_proj``) and ``w_out [H, I]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu_glu", "gelu_glu", "gelu_tanh_glu", "gelu", "gelu_tanh", "relu")
"""Activation names; the index in this tuple is the integer code of the kernels and the plugin (their ABI)."""

GLU_ACTIVATIONS = ("silu_glu", "gelu_glu", "gelu_tanh_glu")


def activation_code(name: str) -> int:
    """Integer code of an activation (the ``act`` argument of the kernels and the plugin)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {ACTIVATIONS}")
    return ACTIVATIONS.index(name)


def is_glu(activation: str) -> bool:
    """Gated activations read ``w_in`` as ``[2I, H]``: gate rows ``[0, I)``, up rows ``[I, 2I)``."""
    activation_code(activation)
    return activation in GLU_ACTIVATIONS


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``[M, I_in] -> [M, I]``: the expert nonlinearity, gated or not."""
    if activation in GLU_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        if activation == "silu_glu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh_glu" else "none") * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return torch.relu(h)
    raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")


def expert_forward(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> torch.Tensor:
    """``x [T, H]`` -> ``[T, H]``. Gated: ``act(x W_gate^T) * (x W_up^T)``, gate rows first in ``w_in``."""
    h = apply_activation(F.linear(x, w_in.to(x.dtype)), activation)  # (T, I)
    return F.linear(h, w_out.to(x.dtype))  # (T, H)
