"""rq.export: the R&Q model as ONNX, with one ``rq::RQMoE`` node per MoE layer (docs/export.md).

- :func:`export_model` ``(model_dir, plan_path, out_dir, ...) -> ExportResult``: trace and write ``build/``.
- :func:`export_baseline` ``(model_dir, out_dir, ...) -> ExportResult``: the original model, same layout, no R&Q.
- :func:`check_export` ``(build_dir) -> ParityReport``: ONNX Runtime vs the PyTorch reference (Polygraphy).
- :class:`OrtGenerator` (``rq.export.runtime``): greedy KV-cache generation in ONNX Runtime with rotating
  replica offsets and per-step ``expert_counts``; imports only numpy and onnxruntime.

Imports are lazy so that ``rq.export.runtime`` stays light (no torch) for serving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["ExportResult", "OrtGenerator", "ParityReport", "check_export", "export_baseline", "export_model"]

if TYPE_CHECKING:
    from rq.export.api import ExportResult, export_baseline, export_model
    from rq.export.parity import ParityReport, check_export
    from rq.export.runtime import OrtGenerator

_LAZY = {"export_model": "api", "export_baseline": "api", "ExportResult": "api", "check_export": "parity",
         "ParityReport": "parity", "OrtGenerator": "runtime"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"rq.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rq.export' has no attribute '{name}'")
