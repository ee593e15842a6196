"""The R&Q reference model: apply a plan to a loaded Hugging Face model, in place.

Each MoE layer's experts module is replaced by :class:`RQExperts`, which stores every physical copy
(original-precision primaries, INT4 primaries, INT4 replicas) in the stacked layout of ``rq::RQMoE``
(docs/op.md) and runs the replica rule of SPEC §4. The router is untouched. This plain PyTorch path is
the *reference* that ONNX Runtime, the Triton kernels and the TensorRT plugin are checked against, so it
is written to be obviously right rather than fast: each copy's weights are dequantized when it runs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rq.core import int4
from rq.models.adapters import Adapter, MoELayer, replace_module
from rq.errors import RQError
from rq.models.fingerprint import model_fingerprint
from rq.core.op import rq_moe_reference
from rq.core.replica import physical_ids
from rq.plan.schema import LayerPlan, Plan

Mode = Literal["batch", "streaming"]


class RQExperts(nn.Module):
    """Replica-aware experts of one layer: ``forward(hidden [T, H], ids [T, K], weights [T, K]) -> [T, H]``.

    Buffers (docs/op.md): ``w_in [P_orig, I_in, H]``, ``w_out [P_orig, H, I]`` original-precision copies;
    ``w_in_q``/``w_in_scales``/``w_out_q``/``w_out_scales`` the INT4 copies (SPEC §5 bytes);
    ``logcnt [N]`` copies per expert, ``precision [P]`` 0/1 per physical copy, ``offsets [N]`` replica
    offsets (advanced after each call in streaming mode).
    Telemetry: ``last_counts [N]`` of the latest call, ``total_copy_loads [P]`` since the last reset, and,
    when ``record`` is on, ``history`` (one ``[P]`` copy-load vector per call).
    """

    def __init__(self, *, num_experts: int, top_k: int, activation: str, group_size: int, logcnt: torch.Tensor,
                 precision: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, w_in_q: torch.Tensor,
                 w_in_scales: torch.Tensor, w_out_q: torch.Tensor, w_out_scales: torch.Tensor):
        super().__init__()
        self.num_experts, self.top_k, self.activation, self.group_size = num_experts, top_k, activation, group_size
        assert logcnt.shape == (num_experts,), f"logcnt must be [N={num_experts}], got {tuple(logcnt.shape)}"
        assert precision.numel() == int(logcnt.sum()), "precision needs one entry per physical copy"
        self.register_buffer("logcnt", logcnt.to(torch.int64))
        self.register_buffer("precision", precision.to(torch.int64))
        self.register_buffer("offsets", torch.zeros(num_experts, dtype=torch.int64))
        for name, value in (("w_in", w_in), ("w_out", w_out), ("w_in_q", w_in_q), ("w_in_scales", w_in_scales),
                            ("w_out_q", w_out_q), ("w_out_scales", w_out_scales)):
            self.register_buffer(name, value)
        self.mode: Mode = "batch"
        self.backend = "auto"  # "auto": Triton kernels on CUDA, the PyTorch reference elsewhere
        self.record = False
        self.reset_telemetry()

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` must not change the SPEC §5 bytes: INT4 scales stay float16, packed stays uint8."""
        super()._apply(fn, recurse)
        for name in ("w_in_scales", "w_out_scales"):
            setattr(self, name, getattr(self, name).to(torch.float16))
        return self

    @property
    def num_copies(self) -> int:
        return self.precision.numel()

    def weight_nbytes(self) -> int:
        """Bytes of all stored expert weights (what the plan's budget bounds)."""
        return sum(b.numel() * b.element_size() for b in
                   (self.w_in, self.w_out, self.w_in_q, self.w_in_scales, self.w_out_q, self.w_out_scales))

    def reset_telemetry(self) -> None:
        self.offsets.zero_()
        self.last_counts = torch.zeros(self.num_experts, dtype=torch.int64)
        self.total_copy_loads = torch.zeros(self.num_copies, dtype=torch.int64)
        self.history: list[torch.Tensor] = []

    def _implementation(self, hidden: torch.Tensor):
        if self.backend == "triton" or (self.backend == "auto" and hidden.is_cuda):
            from rq.kernels.moe import rq_moe  # needs the `triton` package

            return rq_moe
        return rq_moe_reference

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        offsets = self.offsets if self.mode == "streaming" else None
        y, counts = self._implementation(hidden)(
            hidden, ids, weights.to(hidden.dtype), offsets, self.logcnt, self.precision, self.w_in, self.w_out,
            self.w_in_q, self.w_in_scales, self.w_out_q, self.w_out_scales, self.activation, self.group_size)
        self._record(counts, physical_ids(ids, self.logcnt, offsets))
        return y

    def _record(self, counts: torch.Tensor, phys: torch.Tensor) -> None:
        copy_loads = torch.bincount(phys[phys >= 0].reshape(-1), minlength=self.num_copies).cpu()
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
        quantized = None
        if expert.precision == "int4" or expert.replicas:
            quantized = (int4.quantize(w_in, group_size), int4.quantize(w_out, group_size))
        if expert.precision == "original":
            orig_in.append(w_in.clone())
            orig_out.append(w_out.clone())
        else:
            q_in.append(quantized[0])
            q_out.append(quantized[1])
        q_in.extend([quantized[0]] * expert.replicas) if expert.replicas else None
        q_out.extend([quantized[1]] * expert.replicas) if expert.replicas else None
    dtype = layer.experts.parameters().__next__().dtype if list(layer.experts.parameters()) else torch.float32
    i_in, hidden = layer.w_in_shape
    inter = layer.intermediate_size

    def stack(items, empty_shape, dt):
        return torch.stack(items) if items else torch.zeros((0, *empty_shape), dtype=dt)

    return RQExperts(
        num_experts=layer.num_experts, top_k=layer.top_k, activation=layer.activation, group_size=group_size,
        logcnt=torch.tensor(layer_plan.logcnt), precision=torch.tensor(layer_plan.precision),
        w_in=stack(orig_in, (i_in, hidden), dtype), w_out=stack(orig_out, (hidden, inter), dtype),
        w_in_q=stack([q.packed for q in q_in], (i_in, hidden // 2), torch.uint8),
        w_in_scales=stack([q.scales for q in q_in], (i_in, hidden // group_size), torch.float16),
        w_out_q=stack([q.packed for q in q_out], (hidden, inter // 2), torch.uint8),
        w_out_scales=stack([q.scales for q in q_out], (hidden, inter // group_size), torch.float16),
    )


def check_plan_matches(model: nn.Module, adapter: Adapter, plan: Plan) -> list[MoELayer]:
    layers = adapter.moe_layers(model)
    fingerprint = model_fingerprint(model, adapter)
    if fingerprint != plan.model.fingerprint:
        raise RQError(f"the plan was made for another model (fingerprint {plan.model.fingerprint[:19]}..., this model "
                      f"{fingerprint[:19]}...); calibrate and plan on this model")
    if [l.path for l in layers] != [l.module for l in plan.layers]:
        raise RQError("the plan's MoE layers do not match this model's; calibrate and plan on this model")
    return layers


def apply_plan(model: nn.Module, adapter: Adapter, plan: Plan) -> list[RQExperts]:
    """Replace every MoE layer's experts by :class:`RQExperts` built from ``plan``; returns them in layer order."""
    layers = check_plan_matches(model, adapter, plan)
    rq_layers = []
    for layer, layer_plan in zip(layers, plan.layers):
        rq_experts = build_rq_experts(adapter, layer, layer_plan, plan.quantization.group_size)
        replace_module(model, layer.path, adapter.wrap_experts(layer, rq_experts))
        rq_layers.append(rq_experts)
    return rq_layers


def rq_layers_of(model: nn.Module) -> list[RQExperts]:
    return [m for m in model.modules() if isinstance(m, RQExperts)]


def set_mode(model: nn.Module, mode: Mode, record: bool = False) -> None:
    """Batch mode (offsets stay 0) or streaming mode (offsets rotate per call, SPEC §4); resets telemetry."""
    for layer in rq_layers_of(model):
        layer.mode, layer.record = mode, record
        layer.reset_telemetry()
