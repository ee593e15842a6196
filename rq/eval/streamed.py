"""The original model and its R&Q version, streamed in lockstep: one decoder layer of each in memory at a time.

The R&Q model is a second skeleton (:meth:`rq.models.streaming.StreamedModel.twin`) that shares the original's
resident tensors. When the passes reach decoder layer ``l``, the original's layer is read from the checkpoint,
the R&Q layer *is* that layer (the same tensors) with its experts replaced by :class:`~rq.rqmodel.model.RQExperts`
built from them by the plan, and both models' passes go through it; then both are released. Each
``RQExperts`` module stays in the R&Q model between visits (its weights go back to the meta device), so its
replica offsets and telemetry carry on across decode steps exactly as in a resident model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from rq.core.op import INT8_INPUTS, WEIGHT_INPUTS
from rq.models.adapters import replace_module
from rq.models.layerwise import LayerScheduler
from rq.models.streaming import StreamedModel
from rq.plan.schema import Plan
from rq.plan.validate import check_plan_matches
from rq.progress import layer_progress
from rq.rqmodel.model import RQExperts, build_rq_experts


class StreamedPair:
    """``original`` (a :class:`StreamedModel`) and ``rq_model`` (its twin with ``plan`` applied layer by layer)."""

    def __init__(self, original: StreamedModel, plan: Plan):
        check_plan_matches(original.model, original.adapter, plan, original.router_weight)
        self.original, self.plan, self.adapter = original, plan, original.adapter
        self.rq_model = original.twin()
        self.adapter.moe_layers(self.rq_model)  # installs the adapters' seams (DeepSeek-MoE v1) in the twin
        self._rq: dict[int, RQExperts] = {}
        self._loaded: set[int] = set()
        for layer in self.adapter.moe_layers(original.model):  # weights on the meta device until loaded
            rq_experts = self._build(layer)
            replace_module(self.rq_model, layer.path, self.adapter.wrap_experts(layer, rq_experts))
            self._rq[layer.index] = rq_experts
        self._replaced = [layer.path for layer in self.adapter.moe_layers(original.model)]
        self._groups = len(original.blocks)
        twin_blocks = [self.rq_model.get_submodule(path) for path in original.block_paths]
        original.scheduler.close()  # this pair's scheduler drives both models' layers
        self.scheduler = LayerScheduler(self, [b for _, b in original.blocks] + twin_blocks,
                                        list(range(self._groups)) * 2)

    def close(self) -> None:
        """Hand the original model back to its own scheduler."""
        self.scheduler.close()
        self.original.scheduler = LayerScheduler(self.original, [b for _, b in self.original.blocks],
                                                 range(self._groups))

    def load(self, group: int) -> None:
        if group in self._loaded:
            return
        self._loaded.add(group)
        self.original.load(group)
        self.original.share_block(group, self.rq_model, self._replaced)
        for layer in self.original.moe_layers_of(group):
            built, kept = self._build(layer), self._rq[layer.index]
            for name in WEIGHT_INPUTS + INT8_INPUTS:  # the INT8 class too, where the layer has one
                if built._buffers.get(name) is not None:
                    kept._buffers[name] = built._buffers[name].to(self.original.device)

    def _build(self, layer) -> RQExperts:
        """``layer``'s R&Q experts by the plan (on the meta device while the layer is)."""
        return build_rq_experts(self.adapter, layer, self.plan.layers[layer.index], self.plan.quantization.group_size)

    def release(self, group: int) -> None:
        if self.original.keep:
            return
        self._loaded.discard(group)
        prefix = self.original.block_paths[group] + "."
        for layer in self.adapter.moe_layers(self.original.model):
            if layer.path.startswith(prefix):
                kept = self._rq[layer.index]
                for name in WEIGHT_INPUTS + INT8_INPUTS:
                    buffer = kept._buffers.get(name)
                    if buffer is None:
                        continue
                    kept._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")
                kept.__dict__.pop("_layer", None)  # and what a backend derived from the weights
        self.original.unshare_block(group, self.rq_model, self._replaced)
        self.original.release(group)

    def rq_layers(self) -> list[RQExperts]:
        return [self._rq[i] for i in sorted(self._rq)]

    def run(self, jobs: Sequence[Callable[[], Any]], *, label: str, passes: int | None = 1,
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Run passes over either model layer-major (see :meth:`StreamedModel.run`)."""
        total = None if passes is None else passes * sum(self.original.block_bytes)
        with layer_progress(label, total, enabled=self.original.show_progress) as advance:
            self.original._advance = advance
            try:
                return self.scheduler.run(jobs, on_done=on_done, sequential=self.original.keep)
            finally:
                self.original._advance = None

    @property
    def models(self) -> tuple[nn.Module, nn.Module]:
        return self.original.model, self.rq_model
