"""Trace-time rewrites of Hugging Face code that ``torch.onnx`` cannot convert, numerically equivalent.

Applied only while a graph is traced (:func:`export_patches`); the PyTorch reference runs the original
code, so the parity check also covers each rewrite.

- DeepSeek-V2 rotary embeddings use complex tensors (``torch.polar`` / ``view_as_complex``), which ONNX
  has no type for: the same rotation in real arithmetic, ``(a + ib)(c + is) = (ac - bs) + i(as + bc)``.
- The Switch Transformers router casts its classifier with ``Module.to`` inside ``forward`` (to its
  float32 router dtype), which ``torch.export`` refuses: the cast is done once before tracing and the
  in-forward ``to`` becomes a no-op.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn


def _real_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, S, d/2, 2]`` (cos, sin) * scaling instead of the complex ``freqs_cis [B, S, d/2]``."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def _real_apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor,
                           freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = freqs.unsqueeze(1)  # (B, 1, S, d/2, 2)
    cos, sin = freqs[..., 0], freqs[..., 1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, H, S, d/2, 2): (real, imaginary)
        re, im = pairs[..., 0], pairs[..., 1]
        return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def cast_router(module: nn.Module) -> None:
    """The Switch Transformers router's classifier in its router dtype (what its forward's ``to`` would do); a
    no-op when it has it (a fake-weight model, :mod:`rq.export.streamed`, is cast on the meta device first)."""
    if module.classifier.weight.dtype != module.dtype:
        module.classifier.to(module.dtype)


def cast_routers(model: nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__ == "SwitchTransformersTop1Router":
            cast_router(module)


@contextlib.contextmanager
def export_patches(model: nn.Module) -> Iterator[None]:
    """Apply the rewrites that ``model`` needs for the duration of the ``with`` block."""
    undo = []
    try:
        for module in model.modules():
            if type(module).__name__ == "DeepseekV2RotaryEmbedding":
                module.forward = types.MethodType(_real_rotary_forward, module)
                undo.append(lambda m=module: delattr(m, "forward"))
            if type(module).__name__ == "SwitchTransformersTop1Router":
                cast_router(module)
                module.classifier.to = lambda *args, c=module.classifier, **kwargs: c
                undo.append(lambda c=module.classifier: delattr(c, "to"))
        if any(type(m).__name__ == "DeepseekV2RotaryEmbedding" for m in model.modules()):
            from transformers.models.deepseek_v2 import modeling_deepseek_v2

            original = modeling_deepseek_v2.apply_rotary_emb
            modeling_deepseek_v2.apply_rotary_emb = _real_apply_rotary_emb
            undo.append(lambda: setattr(modeling_deepseek_v2, "apply_rotary_emb", original))
        yield
    finally:
        for fn in reversed(undo):
            fn()
