"""What the router chose, observed at the experts call (the seam of docs/design.md) without changing the model.

:func:`record_calls` attaches callbacks as forward pre-hooks on each MoE layer's experts module (calibration's
accumulators use it); :class:`RoutingRecorder` is the callback that keeps the ``[T, K]`` logical ids of every
call, which batch and streaming LIS are computed from.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from rq.models.adapters import Adapter, MoELayer


@contextmanager
def record_calls(model: nn.Module, layers: list[MoELayer], callbacks: list[Callable]) -> Iterator[None]:
    """Attach ``callbacks[i](module, args, kwargs)`` as forward pre-hooks on each layer's experts module."""
    handles = [model.get_submodule(layer.path).register_forward_pre_hook(cb, with_kwargs=True)
               for layer, cb in zip(layers, callbacks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class RoutingRecorder:
    """Forward pre-hook that keeps the logical ids ``[T, K]`` (on CPU) of every experts call of one layer."""

    def __init__(self, adapter: Adapter, layer: MoELayer):
        self.adapter, self.layer = adapter, layer
        self.calls: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        routing = self.adapter.routing_from_call(self.layer, args, kwargs)
        self.calls.append(routing.ids.reshape(routing.hidden.shape[0], -1).detach().cpu())


@contextmanager
def record_routing(model: nn.Module, adapter: Adapter, layers: list[MoELayer]) -> Iterator[list[RoutingRecorder]]:
    """``with record_routing(model, adapter, layers) as recorders:`` one :class:`RoutingRecorder` per layer."""
    recorders = [RoutingRecorder(adapter, layer) for layer in layers]
    with record_calls(model, layers, recorders):
        yield recorders
