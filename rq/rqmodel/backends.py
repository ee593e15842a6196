"""The one dispatch point for what R&Q experts compute: a string-keyed registry of implementations of the
``rq::RQMoE`` signature ``(hidden, topk_ids, topk_weights, layer, offsets) -> (y, expert_counts)``
(docs/spec.md §8), after transformers' ``ExpertsInterface``.

- ``reference``: :func:`rq.core.op.rq_moe_reference`, plain PyTorch, the semantics every other one is tested
  against (and what export parity data is computed with);
- ``fast``: :func:`rq.rqmodel.fast.rq_moe_fast`, weights materialized once per distinct version and grouped
  matrix products, as fast as the original model's experts;
- ``triton``: :func:`rq.kernels.moe.rq_moe`, the Triton kernels (CUDA; CPU only under the interpreter).

``auto`` picks ``triton`` for CUDA tensors and ``fast`` elsewhere. Implementations are imported when
first resolved, so the registry itself needs neither Triton nor a GPU.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from rq.core.op import RQLayerWeights

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RQLayerWeights, "torch.Tensor | None"],
                     tuple[torch.Tensor, torch.Tensor]]

_IMPLEMENTATIONS: dict[str, str] = {
    "reference": "rq.core.op:rq_moe_reference",
    "fast": "rq.rqmodel.fast:rq_moe_fast",
    "triton": "rq.kernels.moe:rq_moe",
}


def register(name: str, target: str) -> None:
    """Add an implementation as ``"module:function"`` (imported on first use)."""
    _IMPLEMENTATIONS[name] = target


def names() -> list[str]:
    return sorted(_IMPLEMENTATIONS)


def resolve(name: str, device: torch.device) -> ExpertsFn:
    """The implementation called ``name`` (``auto``: by device, see the module doc)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "fast"
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown experts backend {name!r}: expected 'auto' or one of {names()}")
    module, _, function = _IMPLEMENTATIONS[name].partition(":")
    return getattr(importlib.import_module(module), function)
