"""The R&Q reference model: apply a plan to a loaded Hugging Face model, in place.

Each MoE layer's experts module is replaced by :class:`RQExperts`, which stores every physical copy
(original-precision primaries, INT4 primaries, INT4 replicas) in the stacked layout of ``rq::RQMoE``
(docs/spec.md §8) and runs the replica rule of §4. The router is untouched. With the ``reference`` backend
this is the PyTorch reference that ONNX Runtime, the Triton kernels and the TensorRT plugin are checked
against.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rq.core import int4
from rq.models.adapters import Adapter, MoELayer, replace_module
from rq.core.op import WEIGHT_INPUTS, RQLayerWeights
from rq.core.replica import copy_split, split_load
from rq.rqmodel import backends
from rq.plan.schema import LayerPlan, Plan
from rq.plan.validate import check_plan_matches

Mode = Literal["batch", "streaming"]


class RQExperts(nn.Module):
    """Replica-aware experts of one layer: ``forward(hidden [T, H], ids [T, K], weights [T, K]) -> [T, H]``.

    Buffers are the op's weight inputs (docs/spec.md §8): ``w_in [P_orig, I_in, H]``, ``w_out [P_orig, H, I]``
    original-precision copies; ``w_in_q``/``w_in_scales``/``w_out_q``/``w_out_scales`` the INT4 copies (§5
    bytes); ``offsets [N]`` replica offsets (advanced after each call in streaming mode). :attr:`layer` is
    the :class:`~rq.core.op.RQLayerWeights` bundle every implementation takes; :attr:`backend` names the one
    that runs (:mod:`rq.rqmodel.backends`).
    Telemetry: ``last_counts [N]`` of the latest call, ``total_copy_loads [P]`` since the last reset, and,
    when ``record`` is on, ``history`` (one ``[P]`` copy-load vector per call).
    """

    def __init__(self, layer: RQLayerWeights):
        super().__init__()
        layer.sizes  # validates attributes and shapes once
        self.top_k, self.activation, self.group_size = layer.top_k, layer.activation, layer.group_size
        self.copies, self.copy_precision = tuple(layer.logcnt), tuple(layer.precision)
        self.register_buffer("logcnt", torch.tensor(layer.logcnt, dtype=torch.int64))
        self.register_buffer("offsets", torch.zeros(layer.num_experts, dtype=torch.int64))
        for name, value in zip(WEIGHT_INPUTS, layer.tensors()):
            self.register_buffer(name, value)
        self.mode: Mode = "batch"
        self.backend = "auto"  # see rq.rqmodel.backends
        self.record = False
        self.reset_telemetry()

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` must not change the §5 bytes: INT4 scales stay float16, packed stays uint8."""
        super()._apply(fn, recurse)
        for name in ("w_in_scales", "w_out_scales"):
            setattr(self, name, getattr(self, name).to(torch.float16))
        return self

    @property
    def num_experts(self) -> int:
        return len(self.copies)

    @property
    def num_copies(self) -> int:
        return len(self.copy_precision)

    @property
    def precision(self) -> torch.Tensor:
        """``[P]`` 0 original / 1 INT4 per physical copy."""
        return torch.tensor(self.copy_precision, dtype=torch.int64)

    def weight_tensors(self) -> tuple[torch.Tensor, ...]:
        """The six weight buffers in op order (docs/spec.md §8), as they are now."""
        return tuple(getattr(self, name) for name in WEIGHT_INPUTS)

    @property
    def layer(self) -> RQLayerWeights:
        """The op's view of this layer: built (and validated) again only when a weight buffer was replaced,
        e.g. by ``model.to(dtype)``, so a call pays no per-call checks of the weights."""
        tensors = self.weight_tensors()
        cached = self.__dict__.get("_layer")
        if cached is None or any(a is not b for a, b in zip(cached.tensors(), tensors)):
            cached = RQLayerWeights(self.top_k, self.activation, self.group_size, self.copies, self.copy_precision,
                                    *tensors)
            cached.sizes  # noqa: B018 -- validates once
            self.__dict__["_layer"] = cached
        return cached

    def weight_nbytes(self) -> int:
        """Bytes of all stored expert weights (what the plan's budget bounds)."""
        return sum(t.numel() * t.element_size() for t in self.weight_tensors())

    def reset_telemetry(self) -> None:
        self.offsets.zero_()
        self.last_counts = torch.zeros(self.num_experts, dtype=torch.int64)
        self.total_copy_loads = torch.zeros(self.num_copies, dtype=torch.int64)
        self.history: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        offsets = self.offsets if self.mode == "streaming" else None
        run = backends.resolve(self.backend, hidden.device)
        y, counts = run(hidden, ids, weights.to(hidden.dtype), self.layer, offsets)
        self._record(counts, offsets)
        return y

    def _record(self, counts: torch.Tensor, offsets: torch.Tensor | None) -> None:
        # the replica rule gives each copy's load from the experts' loads and the offsets (docs/spec.md §4)
        split = self.__dict__.get("_split")
        if split is None:
            split = self.__dict__["_split"] = copy_split(self.logcnt.cpu())
        copy_loads = split_load(counts.cpu(), self.logcnt, None if offsets is None else offsets.cpu(), split)
        self.last_counts = counts.cpu()
        self.total_copy_loads += copy_loads
        if self.record:
            self.history.append(copy_loads)
        if self.mode == "streaming":
            self.offsets += counts


def build_rq_experts(adapter: Adapter, layer: MoELayer, layer_plan: LayerPlan, group_size: int) -> RQExperts:
    """Quantize and copy the weights of ``layer`` into the physical layout ``layer_plan`` asks for."""
    orig_in, orig_out, q_in, q_out = [], [], [], []
    for expert in layer_plan.experts:
        w_in, w_out = (w.detach() for w in adapter.get_expert_weights(layer, expert.expert))
        if expert.precision == "original":
            orig_in.append(w_in)  # torch.stack below copies: no clone, the layer is held once more, not twice
            orig_out.append(w_out)
        if expert.precision == "int4" or expert.replicas:
            quantized = int4.quantize(w_in, group_size), int4.quantize(w_out, group_size)
            copies = expert.replicas + (expert.precision == "int4")
            q_in.extend([quantized[0]] * copies)
            q_out.extend([quantized[1]] * copies)
    dtype = next(layer.experts.parameters()).dtype if list(layer.experts.parameters()) else torch.float32
    i_in, hidden = layer.w_in_shape
    inter = layer.intermediate_size

    def stack(items, empty_shape, dt):
        return torch.stack(items) if items else torch.zeros((0, *empty_shape), dtype=dt)

    return RQExperts(RQLayerWeights(
        top_k=layer.top_k, activation=layer.activation, group_size=group_size, logcnt=tuple(layer_plan.logcnt),
        precision=tuple(layer_plan.precision),
        w_in=stack(orig_in, (i_in, hidden), dtype), w_out=stack(orig_out, (hidden, inter), dtype),
        w_in_q=stack([q.packed for q in q_in], (i_in, int4.packed_width(hidden)), torch.uint8),
        w_in_scales=stack([q.scales for q in q_in], (i_in, int4.num_blocks(hidden, group_size)), torch.float16),
        w_out_q=stack([q.packed for q in q_out], (hidden, int4.packed_width(inter)), torch.uint8),
        w_out_scales=stack([q.scales for q in q_out], (hidden, int4.num_blocks(inter, group_size)), torch.float16),
    ))


def apply_plan(model: nn.Module, adapter: Adapter, plan: Plan) -> list[RQExperts]:
    """Replace every MoE layer's experts by :class:`RQExperts` built from ``plan``; returns them in layer order.

    The plan is checked against the model first (:func:`rq.plan.validate.check_plan_matches`). Layers are
    replaced one at a time and each original experts module is released as soon as its copies exist, so the
    peak is the model plus one layer, not two models."""
    layers = check_plan_matches(model, adapter, plan)
    rq_layers = []
    for i, layer_plan in enumerate(plan.layers):
        layer, layers[i] = layers[i], None
        rq_experts = build_rq_experts(adapter, layer, layer_plan, plan.quantization.group_size)
        replace_module(model, layer.path, adapter.wrap_experts(layer, rq_experts))
        rq_layers.append(rq_experts)
        del layer
    return rq_layers


def rq_layers_of(model: nn.Module) -> list[RQExperts]:
    return [m for m in model.modules() if isinstance(m, RQExperts)]


def set_mode(model: nn.Module, mode: Mode, record: bool = False) -> None:
    """Batch mode (offsets stay 0) or streaming mode (offsets rotate per call, docs/spec.md §4); resets telemetry."""
    for layer in rq_layers_of(model):
        layer.mode, layer.record = mode, record
        layer.reset_telemetry()


def set_backend(model: nn.Module, backend: str) -> None:
    """Run every R&Q layer of ``model`` on ``backend`` (a name of :mod:`rq.rqmodel.backends`, or ``auto``)."""
    if backend != "auto" and backend not in backends.names():
        raise ValueError(f"unknown experts backend {backend!r}: expected 'auto' or one of {backends.names()}")
    for layer in rq_layers_of(model):
        layer.backend = backend
