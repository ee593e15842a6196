"""What rq needs to know about an MoE architecture, behind one small interface.

An adapter says where the MoE blocks are, what the experts call looks like (the seam where R&Q plugs
in: ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])`` in Hugging Face's fused
families), and how to read and write each expert's weights. The router is never touched: R&Q only
replaces what runs *after* the router has chosen.

Expert weights are exchanged in one canonical per-expert form, whatever the checkpoint stores:
``w_in [I_in, H]`` (gate rows ``[0, I)`` then up rows ``[I, 2I)`` for gated activations, as Hugging
Face's ``gate_up_proj``) and ``w_out [H, I]`` (``nn.Linear`` convention: ``[out, in]``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rq.errors import RQError

# Hugging Face ``hidden_act`` -> the op's activation names (docs/spec.md §8), for gated and plain MLPs.
GATED_ACTIVATIONS = {"silu": "silu_glu", "swish": "silu_glu", "gelu": "gelu_glu",
                     "gelu_new": "gelu_tanh_glu", "gelu_pytorch_tanh": "gelu_tanh_glu"}
PLAIN_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def activation_name(hidden_act: str, gated: bool) -> str:
    table = GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS
    if hidden_act not in table:
        raise RQError(f"expert activation '{hidden_act}' is not supported; supported: {sorted(table)}")
    return table[hidden_act]


@dataclass
class MoELayer:
    """One sparse MoE layer of a loaded model."""

    index: int  # ordinal among the model's MoE layers (0..L-1)
    path: str  # dotted module path of the experts module (what R&Q replaces)
    experts: nn.Module
    router_weight: torch.Tensor  # [N, H]: hashed into the model fingerprint
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str  # docs/spec.md §8 names

    @property
    def gated(self) -> bool:
        return self.activation.endswith("_glu")

    @property
    def w_in_shape(self) -> tuple[int, int]:
        return (2 if self.gated else 1) * self.intermediate_size, self.hidden_size

    @property
    def w_out_shape(self) -> tuple[int, int]:
        return self.hidden_size, self.intermediate_size


@dataclass
class Routing:
    """The normalized experts call: what the router chose for ``T`` flattened tokens."""

    hidden: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, K] logical ids; outside [0, N) = dropped assignment
    weights: torch.Tensor  # [T, K]


class Adapter:
    """Base class of architecture adapters. Subclasses are registered with :func:`rq.models.adapters.register`."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    encoder_decoder: ClassVar[bool] = False

    # --- discovery -----------------------------------------------------------------------------
    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        raise NotImplementedError

    # --- the experts call ------------------------------------------------------------------------
    def routing_from_call(self, layer: MoELayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Routing:
        """Normalize the arguments the model passes to ``layer.experts`` into a :class:`Routing`."""
        hidden, ids, weights = _call_arguments(args, kwargs, ("hidden_states", "top_k_index", "top_k_weights"))
        return Routing(hidden, ids, weights)

    def wrap_experts(self, layer: MoELayer, rq_experts: nn.Module) -> nn.Module:
        """A module with the original experts' call signature that runs ``rq_experts(hidden, ids, weights)``."""
        return rq_experts

    # --- expert weights --------------------------------------------------------------------------
    def get_expert_weights(self, layer: MoELayer, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_in [I_in, H], w_out [H, I])`` of one expert, as stored (no copy where possible)."""
        raise NotImplementedError

    def set_expert_weights(self, layer: MoELayer, expert: int, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        raise NotImplementedError

    # --- loading and running the model -----------------------------------------------------------
    def load_context(self) -> "contextlib.AbstractContextManager":
        """Context the checkpoint is built in (remote-code models may need a workaround while loading)."""
        return contextlib.nullcontext()

    def forward_logits(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, S, V]`` for ``input_ids [B, S]`` (causal LMs; seq2seq overrides)."""
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _call_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]) -> list[Any]:
    values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    if len(values) != len(names):
        raise RQError(f"unexpected experts call: expected arguments {names}, got {len(args)} positional "
                      f"and {sorted(kwargs)}; the installed transformers may be unsupported")
    return values


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
