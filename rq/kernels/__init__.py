"""GPU kernels of ``rq::RQMoE`` (Triton) and their PyTorch reference.

Public API (imported lazily so that ``rq.core.op`` works without Triton, and so that
``TRITON_INTERPRET=1`` set by a test before first use still takes effect):

- :func:`rq_moe_reference` — pure-PyTorch semantics of the op (docs/op.md).
- :func:`rq_moe` — the same signature on the Triton kernels (CUDA, or CPU under the interpreter).
- :func:`rq_experts_forward` / :class:`RQLayerWeights` — device-aware entry for the PyTorch R&Q model.
- :func:`dispatch_assignments`, :func:`dequantize_int4` — the building blocks, for tests and tools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "rq_moe_reference": "rq.core.op",
    "ACTIVATIONS": "rq.core.op",
    "activation_code": "rq.core.op",
    "copy_tables": "rq.core.op",
    "rq_moe": "moe",
    "rq_experts_forward": "moe",
    "RQLayerWeights": "moe",
    "EXPERT_BACKENDS": "moe",
    "launch_config": "moe",
    "dispatch_assignments": "dispatch",
    "device_tables": "dispatch",
    "dequantize_int4": "gemm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rq.kernels' has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if module.startswith("rq.") else f".{module}", __name__), name)
