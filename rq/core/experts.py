"""One expert MLP in the canonical form of the adapters: ``w_in [I_in, H]``, ``w_out [H, I]``.

The single definition of what an expert computes, shared by calibration (SPEC §3) and the R&Q
reference model (``rq.core.op``), for every activation of docs/op.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rq.core.op import apply_activation

def expert_forward(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> torch.Tensor:
    """``x [T, H]`` -> ``[T, H]``. Gated: ``act(x W_gate^T) * (x W_up^T)``, gate rows first in ``w_in``."""
    h = apply_activation(F.linear(x, w_in.to(x.dtype)), activation)  # (T, I)
    return F.linear(h, w_out.to(x.dtype))  # (T, H)
