"""Switch Transformers (encoder-decoder, top-1 with expert capacity), per-expert ``ModuleDict`` MLPs.

The experts are called as ``experts(hidden [T, H], dispatch_mask [T, 1, E], router_probs [T, 1])``,
where the router has already zeroed the mask of tokens over an expert's capacity. Those tokens are
*dropped* (no expert runs, the residual carries them); we keep them out of the loads by giving them
the id -1, which every R&Q implementation treats as a dropped assignment (docs/spec.md §8).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rq.models.adapters.base import Adapter, MoELayer, Routing, _call_arguments, activation_name


class SwitchAdapter(Adapter):
    name = "switch_transformers"
    model_types = ("switch_transformers",)
    encoder_decoder = True

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        config = model.config
        layers = []
        for path, module in model.named_modules():
            if type(module).__name__ != "SwitchTransformersSparseMLP":
                continue
            expert0 = module.experts["expert_0"]
            layers.append(MoELayer(
                index=len(layers), path=f"{path}.experts", experts=module.experts,
                router_weight=module.router.classifier.weight, num_experts=module.router.num_experts, top_k=1,
                hidden_size=expert0.wi.in_features, intermediate_size=expert0.wi.out_features,
                activation=activation_name(config.dense_act_fn, gated=False),
            ))
        return layers

    def routing_from_call(self, layer: MoELayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Routing:
        hidden, mask, probs = _call_arguments(args, kwargs, ("hidden_states", "selected_experts", "routing_weights"))
        return _routing(hidden, mask, probs, layer.num_experts)

    def wrap_experts(self, layer: MoELayer, rq_experts: nn.Module) -> nn.Module:
        return _SwitchCall(layer.num_experts, rq_experts)

    def get_expert_weights(self, layer: MoELayer, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = layer.experts[f"expert_{expert}"]
        return mlp.wi.weight, mlp.wo.weight

    def set_expert_weights(self, layer: MoELayer, expert: int, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        mlp = layer.experts[f"expert_{expert}"]
        with torch.no_grad():
            mlp.wi.weight.copy_(w_in)
            mlp.wo.weight.copy_(w_out)

    def forward_logits(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder over the same tokens, so both encoder and decoder MoE layers see them."""
        decoder_input_ids = model._shift_right(input_ids)
        return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                     use_cache=False).logits


def _routing(hidden: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor, num_experts: int) -> Routing:
    mask = mask.reshape(hidden.shape[0], num_experts)  # [T, E] one-hot, zero row = dropped
    ids = torch.where(mask.sum(-1) > 0, mask.argmax(-1), torch.full_like(mask[:, 0], -1)).unsqueeze(-1)
    return Routing(hidden, ids.to(torch.int64), probs.reshape(-1, 1))


class _SwitchCall(nn.Module):
    """Adapts Switch's (hidden, dispatch mask, probs) call to the R&Q experts' (hidden, ids, weights)."""

    def __init__(self, num_experts: int, rq_experts: nn.Module):
        super().__init__()
        self.num_experts = num_experts
        self.rq = rq_experts

    def forward(self, hidden_states, selected_experts, routing_weights):
        routing = _routing(hidden_states, selected_experts, routing_weights, self.num_experts)
        return self.rq(routing.hidden, routing.ids, routing.weights)
