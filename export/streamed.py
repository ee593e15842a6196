"""``rq export`` of a model bigger than memory: the graphs traced without weights, every initializer written from
the checkpoint one decoder layer at a time, the parity reference computed one layer at a time.

- **Tracing.** The R&Q model is built as a skeleton (:mod:`rq.models.streaming`), its R&Q experts shaped by the
  plan on the meta device, cast to the export's float type exactly as the whole-model path casts it, and every
  weight is then a fake tensor (``FakeTensorMode``): ``torch.onnx.export`` sees the same module, the same shapes
  and dtypes, and produces the same graph, with no weight in memory.
- **Initializers.** Each initializer of the traced graph becomes an :class:`onnx_ir.LazyTensor` that reads its
  value when ``ir.save`` writes it into the external-data file (:class:`ExportWeights`): a plain weight is one
  tensor read from the checkpoint and cast; an R&Q buffer comes from its layer's R&Q experts, built from the
  checkpoint by the plan when the first of its buffers is written and dropped when the next layer's is needed
  (the buffers are written layer after layer). The exporter's optimizer folds some weights (``Transpose`` of a
  projection); it runs on the lazy values, and each folded value is recorded as a lazy computation of its node
  on its lazy inputs (:func:`lazy_folding`), so the saved bytes are the folded bytes of the whole-model path.
- **Reference.** :class:`ReferenceLayers` fills a third skeleton's decoder layers from :class:`ExportWeights`
  when a forward reaches them and empties them after (the R&Q buffers read back from the written data file, so
  a layer is quantized once), through :class:`rq.models.layerwise.LayerScheduler`.

Peak memory is one decoder layer (its checkpoint tensors and its R&Q copies) plus what stays resident
(embeddings, final norm).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from rq.export.onnx_file import external_locations
from rq.export.patches import cast_routers
from rq.models.adapters import MoELayer, replace_module
from rq.models.layerwise import LayerScheduler
from rq.models.streaming import StreamedModel, set_tensor
from rq.plan.schema import Plan
from rq.rqmodel.model import RQExperts, build_rq_experts


def rq_skeleton(streamed: StreamedModel, plan: Plan, dtype: torch.dtype) -> tuple[nn.Module, list[RQExperts]]:
    """A fresh skeleton of ``streamed``'s model (parameters on the meta device) with ``plan`` applied (R&Q experts
    on the meta device, shaped by the plan) and cast to ``dtype`` as :func:`rq.export.api._to_dtype` casts the
    loaded model (the INT4/INT8 scales stay float16). Returns the model and its R&Q experts in layer order."""
    model = streamed._build()
    model.tie_weights()  # as from_pretrained does: tied embeddings are one tensor (one initializer)
    adapter = streamed.adapter
    int8_class = any(2 in layer.precision for layer in plan.layers)
    rq_layers = []
    for layer in adapter.moe_layers(model):
        rq = build_rq_experts(adapter, layer, plan.layers[layer.index], plan.quantization.group_size, int8_class)
        replace_module(model, layer.path, adapter.wrap_experts(layer, rq))
        rq_layers.append(rq)
    model.to(torch.float32)  # the whole-model path loads float32 (buffers computed at build time included)
    if dtype != torch.float32:
        model.to(dtype)
    cast_routers(model)  # what export_patches does to the loaded model, here while the weights are meta tensors
    return model, rq_layers


def fake_weights(model: nn.Module) -> torch._subclasses.fake_tensor.FakeTensorMode:
    """Replace every meta tensor of ``model`` by a CPU fake tensor of the same shape and dtype (tied tensors stay
    tied); returns the fake mode (it accepts real inputs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in made:
                    with mode:
                        fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    made[id(tensor)] = nn.Parameter(fake, requires_grad=False) if store is module._parameters \
                        else fake
                store[name] = made[id(tensor)]
    return mode


class ExportWeights:
    """Every tensor of the R&Q export model (by its name in :func:`rq_skeleton`'s model), in the export's types,
    read from the checkpoint when asked for (module doc)."""

    def __init__(self, streamed: StreamedModel, plan: Plan, skeleton: nn.Module, dtype: torch.dtype):
        self.streamed, self.plan, self.dtype = streamed, plan, dtype
        self.int8_class = any(2 in layer.precision for layer in plan.layers)
        self.moe = {layer.path: layer.index for layer in streamed.adapter.moe_layers(streamed.model)}
        self.rq_paths = {path: self._moe_index(path) for path, m in skeleton.named_modules() if isinstance(m, RQExperts)}
        self._alias = self._aliases(skeleton)
        self._built: tuple[int, dict[str, torch.Tensor]] | None = None
        self._files: dict[int, dict[str, Callable[[], torch.Tensor]]] = {}

    def _moe_index(self, rq_path: str) -> int:
        return next(i for p, i in self.moe.items() if rq_path == p or rq_path.startswith(p + "."))

    def _aliases(self, skeleton: nn.Module) -> dict[str, str]:
        """Name -> the name the checkpoint holds it under (tied weights appear under several names)."""
        sources = self.streamed._sources
        by_id: dict[int, list[str]] = {}
        for name, tensor in list(skeleton.named_parameters(remove_duplicate=False)) + \
                list(skeleton.named_buffers(remove_duplicate=False)):
            by_id.setdefault(id(tensor), []).append(name)
        alias = {}
        for names in by_id.values():
            known = next((n for n in names if n in sources), None)
            for name in names:
                alias[name] = known or name
        return alias

    def rq_of(self, name: str) -> tuple[int, str] | None:
        """``(MoE layer, buffer)`` when ``name`` is an R&Q experts buffer."""
        path, _, attr = name.rpartition(".")
        index = self.rq_paths.get(path)
        return None if index is None else (index, attr)

    def tensor(self, name: str) -> torch.Tensor:
        rq = self.rq_of(name)
        if rq is not None:
            return self._rq_buffer(*rq)
        value = self.streamed.read(self._alias.get(name, name))
        return value.to(self.dtype) if value.is_floating_point() else value

    def _rq_buffer(self, index: int, attr: str) -> torch.Tensor:
        if attr in self._files.get(index, {}):
            return self._files[index][attr]()
        if self._built is None or self._built[0] != index:
            self._built = None  # the previous layer's copies go before the next are made
            self._built = (index, self._build(index))
        return self._built[1][attr]

    def _build(self, index: int) -> dict[str, torch.Tensor]:
        """MoE layer ``index``'s R&Q buffers in the export's types: its decoder layer read, the plan applied."""
        streamed = self.streamed
        path = next(p for p, i in self.moe.items() if i == index)
        group = next(g for g, block in enumerate(streamed.block_paths) if path.startswith(block + "."))
        streamed.load(group)
        try:
            layer: MoELayer = next(l for l in streamed.moe_layers_of(group) if l.index == index)
            rq = build_rq_experts(streamed.adapter, layer, self.plan.layers[index], self.plan.quantization.group_size,
                                  self.int8_class)
        finally:
            streamed.release(group)
        rq.to(self.dtype)  # RQExperts keeps its scales float16
        return dict(zip(rq.weight_names, rq.weight_tensors()))

    def read_back(self, index: int, buffers: dict[str, Callable[[], torch.Tensor]]) -> None:
        """From now on MoE layer ``index``'s buffers come from ``buffers`` (readers of the written data file)."""
        self._files[index] = buffers
        if self._built is not None and self._built[0] == index:
            self._built = None

    def drop(self) -> None:
        self._built = None


class _Weight(ir.LazyTensor):
    """An initializer whose value is computed when it is written (never cached)."""


def lazy_initializers(model: ir.Model, weights: ExportWeights, wrapped: list[str], prefix: str = "model.") -> None:
    """Give every initializer of the traced ``model`` that holds a fake tensor a lazy value from ``weights``;
    ``wrapped``: module paths of the export wrappers (their R&Q experts sit at ``<path>.rq``); ``prefix``: the
    traced graph module's attribute path of the model."""
    from torch._subclasses.fake_tensor import FakeTensor

    for name, value in model.graph.initializers.items():
        const = value.const_value
        if const is None or not isinstance(getattr(const, "raw", None), FakeTensor):
            continue
        key = name[len(prefix):] if name.startswith(prefix) else name
        for path in wrapped:
            if key.startswith(path + ".rq."):
                key = path + "." + key[len(path) + 4:]
        like = const.raw.dtype  # a tensor cast after the export's own cast (a router in its dtype): cast again
        value.const_value = _lazy(lambda key=key, like=like: weights.tensor(key).to(like), const.dtype, const.shape,
                                  name)


def lazy_program(program, weights: ExportWeights, wrapped: list[str]) -> None:
    """A ``torch.onnx.ONNXProgram`` traced on fake weights and not yet optimized: lazy initializers
    (:func:`lazy_initializers`), then the exporter's own optimizer (what ``torch.onnx.export(optimize=True)``
    runs), with the values it folds from weights kept lazy (:func:`lazy_folding`)."""
    lazy_initializers(program.model, weights, wrapped)
    with lazy_folding():
        program.optimize()


def _lazy(read: Callable[[], torch.Tensor], dtype: ir.DataType, shape: ir.Shape, name: str) -> _Weight:
    def func():
        from torch.onnx._internal.exporter._core import TorchTensor

        return TorchTensor(read().contiguous(), name)

    return _Weight(func, dtype=dtype, shape=shape, name=name, cache=False)


@contextlib.contextmanager
def lazy_folding() -> Iterator[None]:
    """While inside, a value onnxscript's constant folder computes from lazy weights is itself lazy: the node is
    evaluated again, by the folder's own evaluator, on its inputs' lazy values when the value is written."""
    from onnxscript.optimizer import _constant_folding as folding

    evaluator = folding._reference_evaluator
    original_evaluate, original_prepare = evaluator.evaluate, folding.FoldConstantsPass._prepare_folded_tensor
    last: dict[int, tuple] = {}

    def evaluate(domain, op_type, version, *args, **kwargs):
        last["call"] = (domain, op_type, version, kwargs)
        return original_evaluate(domain, op_type, version, *args, **kwargs)

    def prepare(self, node, output_name, output_array):
        tensor = original_prepare(self, node, output_name, output_array)
        inputs = [v.const_value if v is not None else None for v in node.inputs]
        if tensor is None or not any(isinstance(t, _Weight) for t in inputs):
            return tensor
        domain, op_type, version, kwargs = last["call"]

        def func():
            arrays = [t.numpy() if t is not None else None for t in inputs]
            return ir.tensor(np.asarray(original_evaluate(domain, op_type, version, *arrays, **kwargs)),
                             name=output_name)

        return _Weight(func, dtype=tensor.dtype, shape=tensor.shape, name=output_name, cache=False)

    evaluator.evaluate = evaluate
    folding.FoldConstantsPass._prepare_folded_tensor = prepare
    try:
        yield
    finally:
        evaluator.evaluate = original_evaluate
        folding.FoldConstantsPass._prepare_folded_tensor = original_prepare


def data_file_readers(onnx_path: Path, names: dict[str, str], dtypes: dict[str, torch.dtype],
                      shapes: dict[str, tuple[int, ...]]) -> dict[str, Callable[[], torch.Tensor]]:
    """``{buffer: reader}`` of tensors written to ``onnx_path``'s external data (``names``: buffer -> initializer);
    each reader maps the bytes from the file (file-backed pages, not process memory)."""
    locations = external_locations(onnx_path, set(names.values()))
    readers = {}
    for buffer, initializer in names.items():
        if initializer not in locations:
            continue
        file, offset, length = locations[initializer]
        dtype, shape = dtypes[buffer], shapes[buffer]

        def read(file=file, offset=offset, length=length, dtype=dtype, shape=shape):
            if length == 0:
                return torch.empty(shape, dtype=dtype)
            data = np.memmap(file, dtype=np.uint8, mode="c", offset=offset, shape=(length,))  # copy-on-write
            return torch.frombuffer(data, dtype=dtype).reshape(shape)

        readers[buffer] = read
    return readers


class ReferenceLayers:
    """The R&Q reference model with its decoder layers filled from :class:`ExportWeights` while a forward is in
    them (:class:`~rq.models.layerwise.LayerScheduler`'s groups)."""

    def __init__(self, model: nn.Module, weights: ExportWeights, block_paths: list[str]):
        self.model, self.weights, self.block_paths = model, weights, block_paths
        names = [n for n, _ in list(model.named_parameters(remove_duplicate=False)) +
                 list(model.named_buffers(remove_duplicate=False))]
        metas = [n for n in names if _get(model, n).is_meta]  # buffers computed at build time stay as they are
        self._names = [[n for n in metas if n.startswith(path + ".")] for path in block_paths]
        for name in [n for n in metas if not any(n.startswith(p + ".") for p in block_paths)]:
            if _get(model, name).is_meta:  # resident: embeddings, final norm (a tied head once)
                set_tensor(model, name, weights.tensor(name))
        self._like = {n: (_get(model, n).shape, _get(model, n).dtype) for group in self._names for n in group}
        self.scheduler = LayerScheduler(self, [model.get_submodule(p) for p in block_paths], range(len(block_paths)))

    def load(self, group: int) -> None:
        for name in self._names[group]:
            set_tensor(self.model, name, self.weights.tensor(name))
        self._forget_derived(group)

    def release(self, group: int) -> None:
        for name in self._names[group]:
            shape, dtype = self._like[name]
            set_tensor(self.model, name, torch.empty(shape, dtype=dtype, device="meta"))
        self._forget_derived(group)
        self.weights.drop()

    def _forget_derived(self, group: int) -> None:
        block = self.model.get_submodule(self.block_paths[group])
        for module in block.modules():
            if isinstance(module, RQExperts):
                module.__dict__.pop("_layer", None)

    def close(self) -> None:
        self.scheduler.close()


def _get(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(path) if path else model, attr)
