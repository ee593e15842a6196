"""Model fingerprint (docs/spec.md §6): sha256 over the config and every router weight, so a plan or stats file
is never applied to another model. Bookkeeping keys of the config (versions, paths, dtype) are excluded;
router weights are hashed as float32 values of the loaded tensors."""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import torch
from torch import nn

from rq.models.adapters import Adapter, MoELayer

_VOLATILE = {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "architectures", "auto_map",
             "_commit_hash", "_attn_implementation", "_experts_implementation", "use_cache"}


def config_digest_source(model: nn.Module) -> str:
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE and not k.startswith("_")}
    return json.dumps(config, sort_keys=True, default=str)


def model_fingerprint(model: nn.Module, adapter: Adapter,
                      router_weight: Callable[[MoELayer], torch.Tensor] | None = None) -> str:
    """``router_weight(layer)``: where a layer's router weight comes from when the model does not hold it (a
    streamed model reads it from the checkpoint); the loaded tensor by default."""
    digest = hashlib.sha256(config_digest_source(model).encode())
    for layer in adapter.moe_layers(model):
        weight = layer.router_weight if router_weight is None else router_weight(layer)
        digest.update(layer.path.encode())
        digest.update(weight.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()
