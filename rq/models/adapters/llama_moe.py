"""LLaMA-MoE v1 (pjlab-sys4nlp/llama-moe, model_type ``llama_moe``), loaded with ``--trust-remote-code``.

The checkpoints' own modeling code (``modeling_llama_moe_hf.py``) builds each ``mlp`` as a
``LinearGLUMoELayer``: ``gate`` (``TopKBalancedNoisyGate``), then ``calculator(x, **gate_outputs)``,
a ``UniversalCalculator`` that owns the ``LinearGLUExperts`` (``weight_gate``/``weight_up``
``[I_e, H]`` and ``weight_down`` ``[H, I_e]`` ParameterLists, one entry per expert). The calculator call
is the seam: it receives the flattened hidden states ``[T, H]``, ``topK_indices [T, K]`` and
``topK_scores [T, K]`` exactly as the gate returned them (top-(k+1) then the first k, in descending
logit order), and returns a ``CalculatorOutput`` whose ``hidden_states`` the block adds back. R&Q hooks and
replaces ``<block>.calculator``; the router is untouched.

Routing weights: the calculator multiplies each expert output by ``topK_scores * score_scale_factor``
(``score_scale_factor``: a constant per layer, a float or a per-layer list in config.json), or by nothing when
``multiply_gate_scores`` is off. :meth:`LlamaMoeAdapter.routing_from_call` reports exactly that factor as
the routing weight (the same tensor op, so R&Q reproduces the original bit for bit before summation), so
calibration's gate mass and sensitivities are what the layer output really sees.

Loading under transformers 5: ``from_pretrained`` builds the model on the meta device, and the released
``TopKBalancedNoisyGate.__init__`` creates ``torch.distributions.Normal(0.0, 1.0)``, whose argument
validation calls ``.item()`` on a meta tensor and aborts the load. :func:`load_context` (also
``LlamaMoeAdapter.load_context``) turns that validation off while the model is built; wrap
``rq.models.adapters.load_model`` in it. The ``Normal`` is only used for the training-time noisy gating.

Refused (:class:`RQError`): experts with biases or unequal ``size_experts`` (the canonical per-expert form
has neither), and calculators other than ``UniversalCalculator`` (e.g. the capacity-dropping
``SwitchDropTokenCalculator`` of the training code base, or ``mlp_norm``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

from rq.models.adapters.base import Adapter, MoELayer, Routing, _call_arguments, activation_name
from rq.errors import RQError

_CALL_ARGS = ("x", "topK_indices", "topK_scores")


@dataclass
class LlamaMoeLayer(MoELayer):
    """A LLaMA-MoE layer, plus the calculator's score scaling (what turns gate scores into routing weights)."""

    multiply_gate_scores: bool = True
    score_scale_factor: float = 1.0


@contextmanager
def load_context() -> Iterator[None]:
    """Build the remote-code model with ``torch.distributions`` argument validation off (see the module doc)."""
    distribution = torch.distributions.Distribution
    previous = distribution._validate_args
    distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        distribution.set_default_validate_args(previous)


class LlamaMoeAdapter(Adapter):
    name = "llama_moe"
    model_types = ("llama_moe",)
    def load_context(self):
        return load_context()

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        layers: list[MoELayer] = []
        for path, block in model.named_modules():
            calculator, gate = getattr(block, "calculator", None), getattr(block, "gate", None)
            experts = getattr(calculator, "experts", None)
            if not (isinstance(calculator, nn.Module) and hasattr(experts, "weight_gate") and gate is not None):
                continue
            _check_supported(path, calculator, experts)
            layers.append(LlamaMoeLayer(
                index=len(layers), path=f"{path}.calculator", experts=experts,
                router_weight=_router_weight(path, gate), num_experts=int(experts.num_experts),
                top_k=int(gate.num_selects), hidden_size=int(experts.in_features),
                intermediate_size=int(experts.size_experts[0]),
                activation=activation_name(experts.hidden_act, gated=True),
                multiply_gate_scores=bool(calculator.multiply_gate_scores),
                score_scale_factor=calculator.score_scale_factor,
            ))
        return layers

    def routing_from_call(self, layer: MoELayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Routing:
        hidden, ids, scores = _call_arguments(args, kwargs, _CALL_ARGS)
        return Routing(hidden, ids, _routing_weights(layer.multiply_gate_scores, layer.score_scale_factor, scores))

    def wrap_experts(self, layer: MoELayer, rq_experts: nn.Module) -> nn.Module:
        return _CalculatorCall(layer.multiply_gate_scores, layer.score_scale_factor, rq_experts)

    def get_expert_weights(self, layer: MoELayer, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        experts = layer.experts
        return torch.cat([experts.weight_gate[expert], experts.weight_up[expert]], dim=0), experts.weight_down[expert]

    def set_expert_weights(self, layer: MoELayer, expert: int, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        experts, inter = layer.experts, layer.intermediate_size
        with torch.no_grad():
            experts.weight_gate[expert].copy_(w_in[:inter])
            experts.weight_up[expert].copy_(w_in[inter:])
            experts.weight_down[expert].copy_(w_out)

    def forward_logits(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # return_dict explicitly: the remote code falls back to the deprecated ``config.use_return_dict``
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits


def _check_supported(path: str, calculator: nn.Module, experts: nn.Module) -> None:
    kind = type(calculator).__name__
    if not hasattr(calculator, "score_scale_factor") or getattr(calculator, "mlp_norm", None) is not None:
        raise RQError(f"llama_moe: {path} uses calculator {kind}; only UniversalCalculator without mlp_norm "
                      f"is supported")
    if getattr(experts, "bias_gate", None) is not None:
        raise RQError(f"llama_moe: the experts at {path} have biases, which R&Q's expert form has not")
    if len(set(experts.size_experts)) != 1:
        raise RQError(f"llama_moe: the experts at {path} have unequal sizes {sorted(set(experts.size_experts))}; "
                      f"R&Q needs one intermediate size per layer")


def _router_weight(path: str, gate: nn.Module) -> torch.Tensor:
    """The gate network's weights for the fingerprint: ``[N, H]`` for a linear gate; for the default
    ``mlp`` gate (Linear [N, H], Tanh, Linear [N, N]) both matrices side by side, ``[N, H + N]``."""
    linears = [m for m in gate.gate_network.modules() if isinstance(m, nn.Linear)] \
        if isinstance(gate.gate_network, nn.Module) else []
    if not linears:
        raise RQError(f"llama_moe: no gate network weights at {path}.gate; unsupported layout")
    if len(linears) == 1:
        return linears[0].weight
    return torch.cat([m.weight.detach() for m in linears], dim=1)


def _routing_weights(multiply_gate_scores: bool, score_scale_factor: float, scores: torch.Tensor) -> torch.Tensor:
    """The factor each expert output is multiplied by, exactly as ``UniversalCalculator`` computes it."""
    if not multiply_gate_scores:
        return torch.ones_like(scores)
    return scores * score_scale_factor


@dataclass
class _CalculatorOutput(ModelOutput):
    """Same fields as the remote code's ``CalculatorOutput`` (what ``LinearGLUMoELayer`` reads)."""

    hidden_states: Optional[torch.FloatTensor] = None
    num_dropped_tokens: Optional[torch.Tensor] = None


class _CalculatorCall(nn.Module):
    """Takes the calculator's place: same call (``x, topK_indices=, topK_scores=, **gate extras``), same output
    type; runs ``rq(x, ids, weights)`` with the weights the original calculator would have applied."""

    def __init__(self, multiply_gate_scores: bool, score_scale_factor: float, rq_experts: nn.Module):
        super().__init__()
        self.multiply_gate_scores = multiply_gate_scores
        self.score_scale_factor = score_scale_factor
        self.rq = rq_experts

    def forward(self, x, topK_indices, topK_scores, expert_batch_size=None, **kwargs):
        weights = _routing_weights(self.multiply_gate_scores, self.score_scale_factor, topK_scores)
        y = self.rq(x, topK_indices, weights)
        return _CalculatorOutput(hidden_states=y, num_dropped_tokens=torch.tensor(-1.0))
