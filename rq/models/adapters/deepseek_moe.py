"""DeepSeek-MoE v1 (``deepseek-ai/deepseek-moe-16b-*``, model_type ``deepseek``), loaded with
``--trust-remote-code``. (DeepSeek-V2/V3 are transformers-native and handled in :mod:`rq.models.adapters.fused`.)

The checkpoints' ``modeling_deepseek.py`` builds each sparse ``mlp`` as a ``DeepseekMoE``: ``gate``
(``MoEGate``: softmax, ``torch.topk(sorted=False)``, optional renormalisation), ``experts`` (ModuleList of
``DeepseekMLP`` with ``gate_proj``/``up_proj``/``down_proj``) and ``shared_experts`` (untouched). In eval
the block calls ``self.moe_infer(x [T, H], topk_idx.view(-1), topk_weight.view(-1, 1))`` — a *method*, not a
module, so there is no module whose call can be hooked (calibration) or replaced (``apply_plan``).

The seam: on first discovery, :meth:`DeepseekMoeAdapter.moe_layers` installs into each ``DeepseekMoE`` a
parameter-free child module ``_rq_experts_call`` and an instance-level ``moe_infer`` that reshapes the flat
ids/weights back to ``[T, K]`` (token-major, slot order as the gate returned them: the inverse of the
block's own ``.view(-1)``) and calls that child. The child's default forward runs the checkpoint's own
``moe_infer`` on the same tensors, so the model computes exactly what it computed before (bit for bit);
R&Q hooks the child with the usual ``(hidden_states, top_k_index, top_k_weights)`` call and
``apply_plan`` replaces it with :class:`rq.rqmodel.model.RQExperts`. Installing is idempotent (a replaced child is
kept), adds no parameters or state-dict keys, and survives ``copy.deepcopy``.

Limitations: the training path of ``DeepseekMoE`` does not call ``moe_infer`` and so never reaches R&Q
(R&Q is inference-only; ``load_model`` puts the model in eval mode). After ``apply_plan`` the original
routed experts stay in ``block.experts`` (the block's modules are left as the checkpoint built them), so
the PyTorch reference model holds both; exports only carry the R&Q copies.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from rq.models.adapters.base import Adapter, MoELayer, activation_name
from rq.errors import RQError

SEAM = "_rq_experts_call"


class DeepseekMoeAdapter(Adapter):
    name = "deepseek_moe"
    model_types = ("deepseek",)

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        blocks = [(path, module) for path, module in model.named_modules() if _is_moe_block(module)]
        layers = []
        for path, block in blocks:
            install_seam(block)
            first = block.experts[0]
            if not all(hasattr(first, p) for p in ("gate_proj", "up_proj", "down_proj")):
                raise RQError(f"deepseek: the experts at {path}.experts are not gate/up/down MLPs; unsupported layout")
            config = block.config if getattr(block, "config", None) is not None else model.config
            layers.append(MoELayer(
                index=len(layers), path=f"{path}.{SEAM}", experts=block.experts, router_weight=block.gate.weight,
                num_experts=len(block.experts), top_k=int(block.gate.top_k),
                hidden_size=first.gate_proj.in_features, intermediate_size=first.gate_proj.out_features,
                activation=activation_name(config.hidden_act, gated=True),
            ))
        return layers

    # routing_from_call / wrap_experts: the base class's, the seam already has the canonical call

    def get_expert_weights(self, layer: MoELayer, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = layer.experts[expert]
        return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0), mlp.down_proj.weight

    def set_expert_weights(self, layer: MoELayer, expert: int, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        mlp, inter = layer.experts[expert], layer.intermediate_size
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(w_in[:inter])
            mlp.up_proj.weight.copy_(w_in[inter:])
            mlp.down_proj.weight.copy_(w_out)

    def forward_logits(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits


def _is_moe_block(module: nn.Module) -> bool:
    gate = getattr(module, "gate", None)
    return (callable(getattr(module, "moe_infer", None)) and isinstance(getattr(module, "experts", None), nn.ModuleList)
            and isinstance(getattr(gate, "weight", None), torch.Tensor) and hasattr(gate, "top_k"))


def install_seam(block: nn.Module) -> None:
    """Route ``block.moe_infer`` through a hookable, replaceable child ``block._rq_experts_call`` (idempotent)."""
    if SEAM not in block._modules:
        block.add_module(SEAM, DeepseekExpertsCall(block))
    if not isinstance(vars(block).get("moe_infer"), functools.partial):
        block.moe_infer = functools.partial(_moe_infer_via_seam, block)


def _moe_infer_via_seam(block: nn.Module, x: torch.Tensor, flat_expert_indices: torch.Tensor,
                        flat_expert_weights: torch.Tensor) -> torch.Tensor:
    """The instance ``moe_infer``: the block flattened ``topk_idx [T, K]`` and ``topk_weight [T, K]`` token-major;
    undo exactly that and call the seam."""
    tokens, top_k = x.shape[0], int(block.gate.top_k)
    return getattr(block, SEAM)(x, flat_expert_indices.view(tokens, top_k), flat_expert_weights.view(tokens, top_k))


class DeepseekExpertsCall(nn.Module):
    """The default seam: ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``
    runs the checkpoint's own ``moe_infer`` of its block on the flattened views (behaviour-identical).

    The block is kept as a plain attribute, not a submodule (that would be a cycle in the module tree)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.__dict__["_block"] = block

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        block = self.__dict__["_block"]
        return type(block).moe_infer(block, hidden_states, top_k_index.reshape(-1), top_k_weights.reshape(-1, 1))
