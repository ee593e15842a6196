"""A plan checked against the model it is applied to (docs/spec.md §6): the fingerprint, the MoE layers, the
sizes, and every layer's bytes recomputed from the model's real weight shapes with the plan's own group size.

A hand-edited plan (a replica count, a group size, a precision changed by hand) no longer adds up and is
refused with one line naming the layer and the field, before any memory is spent on it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from rq.core.int4 import int4_nbytes
from rq.core.int8 import int8_nbytes
from rq.errors import RQError
from rq.models.adapters import Adapter, MoELayer
from rq.models.fingerprint import model_fingerprint
from rq.plan.planner import copies_bytes
from rq.plan.schema import Plan

REGENERATE = "regenerate it with `rq calibrate` and `rq plan` on this model"


def element_bytes(dtype_name: str) -> int:
    """Bytes per weight of the dtype a plan's model info names (``float32``, ``bfloat16``, ...)."""
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise RQError(f"the plan's model.dtype '{dtype_name}' is not a torch dtype; {REGENERATE}")
    return dtype.itemsize


def check_plan_matches(model: nn.Module, adapter: Adapter, plan: Plan,
                       router_weight: Callable[[MoELayer], torch.Tensor] | None = None) -> list[MoELayer]:
    """The model's MoE layers, after checking that ``plan`` was made for this model and adds up on its shapes
    (``router_weight``: see :func:`rq.models.fingerprint.model_fingerprint`)."""
    layers = adapter.moe_layers(model)
    fingerprint = model_fingerprint(model, adapter, router_weight)
    if fingerprint != plan.model.fingerprint:
        raise RQError(f"the plan was made for another model (fingerprint {plan.model.fingerprint[:19]}..., this model "
                      f"{fingerprint[:19]}...); calibrate and plan on this model")
    if [l.path for l in layers] != [l.module for l in plan.layers]:
        raise RQError(f"the plan's MoE layers do not match this model's; {REGENERATE}")
    elem = element_bytes(plan.model.dtype)
    group = plan.quantization.group_size
    reference = 0
    for layer, layer_plan in zip(layers, plan.layers):
        if len(layer_plan.experts) != layer.num_experts:
            raise RQError(f"plan layer {layer_plan.layer} lists {len(layer_plan.experts)} experts, the model's layer "
                          f"{layer.path} has {layer.num_experts}; {REGENERATE}")
        orig = elem * (layer.w_in_shape[0] * layer.w_in_shape[1] + layer.w_out_shape[0] * layer.w_out_shape[1])
        q = int4_nbytes(layer.w_in_shape, group) + int4_nbytes(layer.w_out_shape, group)
        n = layer.num_experts
        q8 = int8_nbytes(layer.w_in_shape, group) + int8_nbytes(layer.w_out_shape, group)
        expected = copies_bytes([orig] * n, q, q8, [e.copy_precisions for e in layer_plan.experts])
        if expected != layer_plan.planned_bytes:
            raise RQError(f"plan layer {layer_plan.layer}: planned_bytes {layer_plan.planned_bytes:,} but its copies take "
                          f"{expected:,} B at this model's shapes with group size {group} (a replica count, "
                          f"precision or group size was edited); {REGENERATE}")
        if layer_plan.planned_bytes > plan.budget.budget_factor * n * orig:
            raise RQError(f"plan layer {layer_plan.layer}: {layer_plan.planned_bytes:,} B exceed the budget "
                          f"{plan.budget.budget_factor:g} x {n * orig:,} B; {REGENERATE}")
        reference += n * orig
    if reference != plan.budget.reference_bytes:
        raise RQError(f"the plan's budget.reference_bytes {plan.budget.reference_bytes:,} is not this model's "
                      f"{reference:,} B of experts; {REGENERATE}")
    return layers
