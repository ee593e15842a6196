"""Calibration (docs/spec.md §3): run data through the unmodified model and accumulate, per MoE layer and
logical expert, load, gate mass, output contribution and the output error of INT4 and of INT8 (one pass).

Forward pre-hooks on each experts module see exactly what the router chose (the model is not
changed); accumulators are float64 ``[N]`` vectors, so memory does not grow with the data.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from rq.core import int4, int8
from rq.models.adapters import Adapter, MoELayer
from rq.calibrate.data import TokenData, batches
from rq.core.experts import expert_forward
from rq.models.fingerprint import model_fingerprint
from rq.models.routing import record_calls
from rq.models.streaming import StreamedModel
from rq.progress import progress_bar
from rq.documents import CalibrationInfo, ModelInfo
from rq.calibrate.stats import CalibrationStats, LayerStats, WindowsInfo


class _LayerAccumulator:
    """Streaming float64 sums for one layer. The INT4 version of an expert is quantized and dequantized when
    the expert is called and dropped right after: holding one for every expert would add up to the model's
    expert bytes again, while re-quantizing costs a few passes over one expert's weights per call (about 1 %
    of the call's matrix products at calibration batch sizes)."""

    def __init__(self, adapter: Adapter, layer: MoELayer, group_size: int):
        self.adapter, self.layer, self.group_size = adapter, layer, group_size
        n = layer.num_experts
        self.load = torch.zeros(n, dtype=torch.float64)
        self.gate_mass = torch.zeros(n, dtype=torch.float64)
        self.contribution = torch.zeros(n, dtype=torch.float64)
        self.quant_sensitivity = torch.zeros(n, dtype=torch.float64)
        self.quant_sensitivity_int8 = torch.zeros(n, dtype=torch.float64)
        self.quantizable = int4.can_quantize(layer.w_in_shape) and int4.can_quantize(layer.w_out_shape)
        self.call_loads: list[torch.Tensor] = []  # [N] loads of each call (one batch), for the traffic windows

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        routing = self.adapter.routing_from_call(self.layer, args, kwargs)
        hidden = routing.hidden.reshape(-1, routing.hidden.shape[-1]).to(torch.float32)
        ids = routing.ids.reshape(hidden.shape[0], -1).cpu()
        weights = routing.weights.reshape(ids.shape).to(torch.float64).cpu()
        valid = (ids >= 0) & (ids < self.layer.num_experts)
        flat_ids = ids[valid].to(torch.int64)
        counts = torch.bincount(flat_ids, minlength=self.layer.num_experts).to(torch.float64)
        self.load += counts
        self.call_loads.append(counts)
        self.gate_mass.index_add_(0, flat_ids, weights[valid])
        for expert in flat_ids.unique().tolist():
            token, slot = (ids == expert).nonzero(as_tuple=True)
            x, g = hidden[token.to(hidden.device)], weights[token, slot]  # (n, H), (n,)
            w_in, w_out = self.adapter.get_expert_weights(self.layer, expert)
            y = expert_forward(x, w_in.to(torch.float32), w_out.to(torch.float32), self.layer.activation)
            self.contribution[expert] += (g * y.to(torch.float64).norm(dim=-1).cpu()).sum()
            if self.quantizable:
                for fmt, sums in ((int4, self.quant_sensitivity), (int8, self.quant_sensitivity_int8)):
                    q_in, q_out = (fmt.dequantize(fmt.quantize(w, self.group_size)) for w in (w_in, w_out))
                    err = (y - expert_forward(x, q_in, q_out, self.layer.activation)).to(torch.float64)
                    sums[expert] += (g.square() * err.square().sum(-1).cpu()).sum()

    def result(self, windows: torch.Tensor | None = None) -> LayerStats:
        layer = self.layer
        per_expert = [sum(w.numel() * w.element_size() for w in self.adapter.get_expert_weights(layer, e))
                      for e in range(layer.num_experts)]
        return LayerStats(index=layer.index, path=layer.path, num_experts=layer.num_experts, top_k=layer.top_k,
                          activation=layer.activation, w_in_shape=layer.w_in_shape, w_out_shape=layer.w_out_shape,
                          original_bytes=per_expert, quantizable=self.quantizable, load=self.load,
                          gate_mass=self.gate_mass, contribution=self.contribution,
                          quant_sensitivity=self.quant_sensitivity, quant_sensitivity_int8=self.quant_sensitivity_int8,
                          load_windows=windows)


class _LoadRecorder:
    """Forward pre-hook that keeps only the ``[N]`` loads of each call (decode steps of a generation), per
    generation: the generations of a streamed model run as threads of one layer-major pass, so each call is
    filed under the generation its thread says it belongs to (:data:`_generation`)."""

    def __init__(self, adapter: Adapter, layer: MoELayer, generations: int):
        self.adapter, self.layer = adapter, layer
        self.calls: list[list[torch.Tensor]] = [[] for _ in range(generations)]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = self.adapter.routing_from_call(self.layer, args, kwargs).ids.reshape(-1).cpu().to(torch.int64)
        ids = ids[(ids >= 0) & (ids < self.layer.num_experts)]
        self.calls[_generation.index].append(torch.bincount(ids, minlength=self.layer.num_experts).to(torch.float64))


_generation = threading.local()  # .index: which generation the calls on this thread belong to


def group_windows(call_loads: list[torch.Tensor], calls_per_window: int) -> torch.Tensor:
    """``[W, N]`` sums of ``calls_per_window`` consecutive calls (the last window may hold fewer)."""
    stacked = torch.stack(call_loads)
    return torch.stack([chunk.sum(0) for chunk in stacked.split(calls_per_window)])


def model_info(model: nn.Module | StreamedModel, adapter: Adapter, layers: list[MoELayer]) -> ModelInfo:
    first = layers[0]
    dtype = adapter.get_expert_weights(first, 0)[0].dtype
    if isinstance(model, StreamedModel):
        fingerprint = model_fingerprint(model.model, adapter, model.router_weight)
    else:
        fingerprint = model_fingerprint(model, adapter)
    config = model.model.config if isinstance(model, StreamedModel) else model.config
    return ModelInfo(architecture=config.model_type, num_moe_layers=len(layers),
                     num_experts=first.num_experts, top_k=first.top_k, hidden_size=first.hidden_size,
                     intermediate_size=first.intermediate_size, dtype=str(dtype).removeprefix("torch."),
                     fingerprint=fingerprint)


@torch.no_grad()
def calibrate(model: nn.Module | StreamedModel, adapter: Adapter, data: TokenData, *, batch_size: int = 8,
              group_size: int = 128, seed: int = 0, show_progress: bool = True, window: int = 16,
              generate: int = 0, generate_window: int = 8, prompt_len: int = 16) -> CalibrationStats:
    """Run ``data`` through ``model`` and return the docs/spec.md §3 statistics of every MoE layer.

    Traffic windows (``load_windows``): the loads of every ``window`` consecutive sequences (rounded up to whole
    batches) and, with ``generate > 0``, of the model's own greedy generation of ``generate`` new tokens from the
    first ``prompt_len`` tokens of each sequence, ``generate_window`` sequences at a time (decode steps only: decode
    routes differently from teacher-forced text). The other metrics stay teacher-forced.

    A :class:`~rq.models.streaming.StreamedModel` runs the same batches layer-major (one decoder layer in
    memory at a time); every layer sees the same tensors as in the whole model, so the statistics are the same."""
    int4.check_group_size(group_size)
    module = model.model if isinstance(model, StreamedModel) else model
    layers = adapter.moe_layers(module)
    accumulators = [_LayerAccumulator(adapter, layer, group_size) for layer in layers]
    info = model_info(model, adapter, layers)
    if isinstance(model, StreamedModel):
        device = model.device
        jobs = [_forward_job(adapter, module, batch.to(device)) for batch in batches(data.sequences, batch_size)]
        with record_calls(module, layers, accumulators):
            model.run(jobs, label="calibrating", on_done=lambda index, logits: None)
    else:
        with record_calls(module, layers, accumulators), \
                progress_bar("calibrating", total=data.sequences.shape[0], enabled=show_progress) as advance:
            device = next(module.parameters()).device
            for batch in batches(data.sequences, batch_size):
                batch = batch.to(device)
                adapter.forward_logits(module, batch, torch.ones_like(batch))
                advance(batch.shape[0])
    calibration = CalibrationInfo(data=data.description, sequences=data.sequences.shape[0],
                                  seq_len=data.sequences.shape[1], tokens=data.tokens, seed=seed)
    calls_per_window = max(1, -(-window // batch_size))
    windows = [group_windows(acc.call_loads, calls_per_window) for acc in accumulators]
    info_windows = WindowsInfo(teacher_forced=int(windows[0].shape[0]),
                               sequences_per_window=min(calls_per_window * batch_size, data.sequences.shape[0]))
    if generate > 0:
        prompt = max(1, min(prompt_len, data.sequences.shape[1]))
        generated = generated_windows(model, adapter, layers, data.sequences[:, :prompt], generate, generate_window)
        windows = [torch.cat([w, g]) for w, g in zip(windows, generated)]
        info_windows = info_windows.model_copy(update={
            "generated": int(generated[0].shape[0]), "generated_tokens": generate,
            "generated_sequences_per_window": min(generate_window, data.sequences.shape[0]), "prompt_len": prompt})
    return CalibrationStats(info, calibration, group_size, [acc.result(w) for acc, w in zip(accumulators, windows)],
                            info_windows)


@torch.no_grad()
def generated_windows(model: nn.Module | StreamedModel, adapter: Adapter, layers: list[MoELayer],
                      prompts: torch.Tensor, steps: int, per_window: int) -> list[torch.Tensor]:
    """Per layer ``[W, N]``: the decode-step loads (the prefill call left out) of greedy generation of ``steps``
    tokens from ``prompts [n, p]``, ``per_window`` sequences per generation call and per window.

    A streamed model runs every generation call in one layer-major pass, so the checkpoint is read ``steps``
    times in all (once per decode step), not once per step and call; what stays resident meanwhile is every
    call's KV cache (``n x (p + steps)`` positions per layer), small beside one decoder layer's weights."""
    module = model.model if isinstance(model, StreamedModel) else model
    device = model.device if isinstance(model, StreamedModel) else next(module.parameters()).device
    pad = getattr(module.config, "pad_token_id", None) or 0
    calls = list(batches(prompts, per_window))
    recorders = [_LoadRecorder(adapter, layer, len(calls)) for layer in layers]

    def generation(index: int, batch: torch.Tensor):
        def job() -> None:
            _generation.index = index
            batch_on = batch.to(device)
            module.generate(batch_on, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True,
                            attention_mask=torch.ones_like(batch_on), pad_token_id=pad)
        return job

    jobs = [generation(i, batch) for i, batch in enumerate(calls)]
    with record_calls(module, layers, recorders):
        if isinstance(model, StreamedModel):
            model.run(jobs, label="generating", passes=steps, on_done=lambda index, result: None)
        else:
            for job in jobs:
                job()
    windows = []
    for layer, rec in zip(layers, recorders):
        decode = [per_call[1:] for per_call in rec.calls]
        windows.append(torch.stack([torch.stack(d).sum(0) if d else
                                    torch.zeros(layer.num_experts, dtype=torch.float64) for d in decode]))
    return windows


def _forward_job(adapter: Adapter, model: nn.Module, batch: torch.Tensor):
    """One batch's forward pass, as a job for :meth:`StreamedModel.run` (its logits are dropped)."""
    def job() -> None:
        adapter.forward_logits(model, batch, torch.ones_like(batch))
    return job
