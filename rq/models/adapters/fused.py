"""Hugging Face MoE families whose routed experts are fused 3-D tensors.

``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]``, called as
``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])`` right after the router
(transformers >= 5). Each family is a few lines: where the router sits and what the config calls
its sizes. Shared experts (Qwen2-MoE, DeepSeek) sit beside the routed ones and are left alone.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rq.models.adapters.base import Adapter, MoELayer, activation_name
from rq.errors import RQError


class FusedExpertsAdapter(Adapter):
    """Finds every module with 3-D ``gate_up_proj``/``down_proj``; its parent block holds the router."""

    router_attr: ClassVar[str] = "gate"

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        config = model.config
        layers = []
        for path, module in model.named_modules():
            gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
            if not (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and isinstance(down, torch.Tensor)):
                continue
            parent = model.get_submodule(path.rpartition(".")[0])
            router = getattr(parent, self.router_attr, None)
            if router is None or not hasattr(router, "weight"):
                raise RQError(f"{self.name}: no router '{self.router_attr}' next to {path}; unsupported layout")
            num_experts, i_in, hidden = gate_up.shape
            layers.append(MoELayer(
                index=len(layers), path=path, experts=module, router_weight=router.weight,
                num_experts=num_experts, top_k=self.top_k(config), hidden_size=hidden,
                intermediate_size=i_in // 2, activation=activation_name(config.hidden_act, gated=True),
            ))
        return layers

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def get_expert_weights(self, layer: MoELayer, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.experts.gate_up_proj[expert], layer.experts.down_proj[expert]

    def set_expert_weights(self, layer: MoELayer, expert: int, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        with torch.no_grad():
            layer.experts.gate_up_proj[expert].copy_(w_in)
            layer.experts.down_proj[expert].copy_(w_out)


class MixtralAdapter(FusedExpertsAdapter):
    name = "mixtral"
    model_types = ("mixtral",)


class Qwen2MoeAdapter(FusedExpertsAdapter):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)


class Qwen3MoeAdapter(FusedExpertsAdapter):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)


class OlmoeAdapter(FusedExpertsAdapter):
    name = "olmoe"
    model_types = ("olmoe",)


class DeepseekAdapter(FusedExpertsAdapter):
    """DeepSeek-V2/V3: grouped routing with a score-correction bias, all inside the router (untouched);
    the first ``first_k_dense_replace`` layers are dense and simply have no fused experts."""

    name = "deepseek"
    model_types = ("deepseek_v2", "deepseek_v3")
