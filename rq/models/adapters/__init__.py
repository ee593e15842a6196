"""Architecture adapters: a string-keyed registry from Hugging Face ``model_type`` to an :class:`Adapter`.

Adding an architecture is one small file with an ``Adapter`` subclass, registered below.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rq.models.adapters.base import Adapter, MoELayer, Routing, replace_module
from rq.models.adapters.deepseek_moe import DeepseekMoeAdapter
from rq.models.adapters.fused import DeepseekAdapter, MixtralAdapter, OlmoeAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter
from rq.models.adapters.llama_moe import LlamaMoeAdapter
from rq.models.adapters.switch import SwitchAdapter
from rq.models.checkpoint import Checkpoint
from rq.errors import RQError
from rq.memory import own_parameters

_REGISTRY: dict[str, type[Adapter]] = {}


def register(adapter: type[Adapter]) -> type[Adapter]:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


for _adapter in (MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekAdapter, SwitchAdapter,
                 LlamaMoeAdapter, DeepseekMoeAdapter):
    register(_adapter)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model_type: str) -> Adapter:
    if model_type not in _REGISTRY:
        raise RQError(f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}")
    return _REGISTRY[model_type]()


def read_config(model_dir: str | Path, trust_remote_code: bool = False):
    """``(config, adapter)`` of a local Hugging Face checkpoint directory (never a hub download)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RQError(f"{model_dir} is not a Hugging Face checkpoint directory (no config.json); "
                      f"pass the folder that holds config.json and the safetensors files")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise RQError(f"{model_dir} ships its own modeling code; rerun with --trust-remote-code "
                          f"if you trust it") from None
        raise RQError(f"cannot read {model_dir / 'config.json'}: {str(err).splitlines()[0]}") from None
    return config, adapter_for(config.model_type)


def load_model(model_dir: str | Path, *, dtype: torch.dtype | str = torch.float32,
               trust_remote_code: bool = False) -> tuple[nn.Module, Adapter]:
    """Load a whole local checkpoint (``dtype="auto"``: its own dtype) and its adapter. Stages that must work
    on models bigger than memory use :func:`rq.models.streaming.open_streamed` instead."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model_dir = Path(model_dir)
    config, adapter = read_config(model_dir, trust_remote_code)
    Checkpoint(model_dir)  # a truncated or missing shard is one line, before any weight is read
    auto = AutoModelForSeq2SeqLM if adapter.encoder_decoder else AutoModelForCausalLM
    try:
        with adapter.load_context():
            model = auto.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                         local_files_only=True)
    except OSError as err:
        raise RQError(f"cannot load weights from {model_dir}: {str(err).splitlines()[0]}") from None
    model.eval()
    own_parameters(model)  # release the checkpoint's memory map (rq.memory)
    if not adapter.moe_layers(model):
        raise RQError(f"{model_dir} ({config.model_type}) has no MoE layers to balance")
    return model, adapter


__all__ = ["Adapter", "MoELayer", "Routing", "adapter_for", "load_model", "read_config", "register", "replace_module",
           "supported_model_types"]
