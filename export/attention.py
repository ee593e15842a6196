"""One attention implementation for the PyTorch reference and the traced graph.

Padded query rows (left padding) have every key masked. PyTorch's fused SDPA and the exported graph
disagree on what such a row yields (zeros vs a uniform mix), and although the row is meaningless its
token is still routed, so it moves other tokens' replica copies (docs/spec.md §4 ranks count every
assignment). ``rq_sdpa`` is Hugging Face's SDPA with fully masked rows opened to every key, so both
sides compute the same well-defined values. Rows with at least one visible key are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "rq_sdpa"


def rq_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = attention_mask | ~attention_mask.any(dim=-1, keepdim=True)  # (B, 1, q, kv)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_rq_attention(model: nn.Module) -> str:
    """Switch ``model`` to ``rq_sdpa`` where it uses the attention interface; returns the implementation used
    (models with their own attention code, e.g. Switch Transformers, keep it: it is plain ops either way)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, rq_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError):
        return model.config._attn_implementation
    return NAME
