"""GPU kernels of ``rq::RQMoE`` in OpenAI Triton (run on CPU under ``TRITON_INTERPRET=1``), and their
ahead-of-time build for the TensorRT plugin (``python -m rq.kernels.aot``). The op's reference semantics are
:func:`rq.core.op.rq_moe_reference`; :func:`rq_moe` has the same signature.

Imported lazily so that ``TRITON_INTERPRET=1`` set by a test before first use still takes effect:

- :func:`rq_moe` — the whole op (dispatch, grouped GEMMs, combine), docs/kernels.md;
- :func:`dispatch_assignments`, :func:`device_tables`, :func:`dequantize_int4`, :func:`launch_config` — the
  building blocks, for tests and tools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "rq_moe": "moe",
    "launch_config": "moe",
    "dispatch_assignments": "dispatch",
    "device_tables": "dispatch",
    "dequantize_int4": "gemm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rq.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
