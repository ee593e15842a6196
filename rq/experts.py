"""One expert MLP in the canonical form of the adapters: ``w_in [I_in, H]``, ``w_out [H, I]``.

The single definition of what an expert computes, shared by calibration (SPEC §3) and the R&Q
reference model, for every activation of docs/op.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu_glu", "gelu_glu", "gelu_tanh_glu", "gelu", "gelu_tanh", "relu")


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name.startswith("silu"):
        return F.silu(x)
    if name.startswith("gelu_tanh"):
        return F.gelu(x, approximate="tanh")
    if name.startswith("gelu"):
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation '{name}', expected one of {ACTIVATIONS}")


def expert_forward(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> torch.Tensor:
    """``x [T, H]`` -> ``[T, H]``. Gated: ``act(x W_gate^T) * (x W_up^T)``, gate rows first in ``w_in``."""
    h = F.linear(x, w_in.to(x.dtype))  # (T, I_in)
    if activation.endswith("_glu"):
        gate, up = h.chunk(2, dim=-1)  # (T, I) each
        h = _act(activation, gate) * up
    else:
        h = _act(activation, h)
    return F.linear(h, w_out.to(x.dtype))  # (T, H)
