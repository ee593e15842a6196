"""A model bigger than memory: its skeleton on the meta device, each decoder layer's weights read from the
safetensors shards when a pass reaches it and released after.

:func:`open_streamed` builds the model from its config with every parameter on the meta device (buffers,
e.g. rotary frequencies, are computed as usual), loads the parameters outside the decoder layers (embeddings,
final norm, head: kept resident) and returns a :class:`StreamedModel`. Its :meth:`StreamedModel.run` runs
forward passes layer-major (:mod:`rq.models.layerwise`): a layer is read once per pass over the data, not
once per batch.

Checkpoint names are mapped to the model's parameters with transformers' own conversion tables (renamings,
per-expert tensors merged into the fused ``[E, ...]`` experts), so per-expert checkpoints (as Qwen, Mixtral
and DeepSeek ship them) and fused ones both load, into exactly the values ``from_pretrained`` gives. Merged
experts are written expert by expert into one preallocated tensor: a layer is held once, not once per step
of the merge. Remote-code models map names one to one.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from rq.errors import RQError
from rq.models.adapters import Adapter, MoELayer, read_config
from rq.models.checkpoint import Checkpoint
from rq.memory import map_large_allocations
from rq.models.layerwise import LayerScheduler
from rq.progress import layer_progress


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real (accelerate's
    ``init_empty_weights(include_buffers=False)``)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


@dataclass
class _Source:
    """Where one model tensor comes from: checkpoint keys, and the transformers converter that merges them."""

    keys: list[str]
    converter: Any = None


class StreamedModel:
    """A model whose decoder layers live on disk until a pass needs them (see the module doc).

    ``blocks`` are the decoder layers in the order a forward pass runs them (an encoder's, then a decoder's),
    and last the output head where it has weights of its own (it is as large as a layer of a real MoE model,
    and only the end of a pass needs it).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, checkpoint: Checkpoint, device: torch.device,
                 show_progress: bool = True, build: Callable[[], nn.Module] | None = None):
        self.model, self.adapter, self.checkpoint, self.device = model, adapter, checkpoint, device
        self._build = build
        self.show_progress = show_progress
        self._sources = _map_sources(model, checkpoint)
        self.blocks = _decoder_blocks(model) + _untied_head(model, self._sources)
        self.block_paths = [path for path, _ in self.blocks]
        self._block_keys = [self._tensor_names(path) for path in self.block_paths]
        self.block_bytes = [sum(self.source_bytes(name) for name in names) for names in self._block_keys]
        self._advance: Callable[[int], None] | None = None
        self.keep = False  # keep layers once loaded (a model that fits): see keep_layers
        self._loaded: set[int] = set()
        self._load_resident()
        self.scheduler = LayerScheduler(self, [module for _, module in self.blocks], range(len(self.blocks)))

    # --- names and sources -------------------------------------------------------------------------
    def _tensor_names(self, prefix: str) -> list[str]:
        """Model tensors (parameters and persistent buffers) under ``prefix`` that the checkpoint holds."""
        dot = prefix + "."
        return [name for name in self._sources if name.startswith(dot)]

    def source_bytes(self, name: str) -> int:
        return sum(self.checkpoint.nbytes(key) for key in self._sources[name].keys)

    def _in_block(self, name: str) -> bool:
        return any(name.startswith(path + ".") for path in self.block_paths)

    # --- materialising -----------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """Model tensor ``name`` read from the checkpoint, converted as ``from_pretrained`` converts it, on the
        model's device and in the dtype of the skeleton's tensor."""
        source, like = self._sources[name], self._meta_like(name)
        if source.converter is None:
            tensor = self.checkpoint.tensor(source.keys[0]).to(like.dtype)
        else:
            tensor = _merge(source, like, self.checkpoint)
        return tensor.to(self.device)

    def _meta_like(self, name: str) -> torch.Tensor:
        module_path, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module_path) if module_path else self.model, attr)

    def _set(self, name: str, value: torch.Tensor) -> None:
        set_tensor(self.model, name, value)

    def _load_resident(self) -> None:
        for name in self._sources:
            if not self._in_block(name):
                self._set(name, self.read(name))
        self.model.tie_weights()
        for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if tensor.is_meta and not self._in_block(name):
                raise RQError(f"{self.checkpoint.model_dir} has no tensor for {name}; the checkpoint does not "
                              f"match its config.json")
        for module in self.model.modules():  # buffers computed at build time (rotary frequencies): small
            for attr, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta and buffer.device != self.device:
                    module._buffers[attr] = buffer.to(self.device)

    @property
    def dtype(self) -> torch.dtype:
        """The float type the layers are read in (the skeleton's)."""
        return next((t.dtype for t in self.model.parameters() if t.is_floating_point()), torch.float32)

    def drop_resident(self) -> None:
        """Put the tensors outside the decoder layers back on the meta device, for a caller that keeps its own
        copies (:meth:`read` still reads them from the checkpoint)."""
        for name in self._sources:
            if not self._in_block(name):
                like = self._meta_like(name)
                self._set(name, torch.empty(like.shape, dtype=like.dtype, device="meta"))

    def twin(self) -> nn.Module:
        """A second skeleton of the same model that *shares* this one's resident tensors (no copy): the R&Q model
        of ``rq eval``, whose decoder layers are filled from this one's, layer by layer."""
        if self._build is None:
            raise RuntimeError("this StreamedModel was not built by open_streamed")
        twin = self._build()
        tensors = list(self.model.named_parameters(remove_duplicate=False)) + \
            list(self.model.named_buffers(remove_duplicate=False))
        for name, tensor in tensors:
            if not self._in_block(name):
                set_tensor(twin, name, tensor)
        return twin

    def share_block(self, group: int, twin: nn.Module, skip: Sequence[str] = ()) -> None:
        """Decoder layer ``group`` of ``twin`` made of this model's loaded tensors (the same objects), but for
        the modules at the paths ``skip`` (the twin has other modules there)."""
        for name in self._twin_names(group, skip):
            set_tensor(twin, name, self._meta_like(name))

    def unshare_block(self, group: int, twin: nn.Module, skip: Sequence[str] = ()) -> None:
        for name in self._twin_names(group, skip):
            like = self._meta_like(name)
            set_tensor(twin, name, torch.empty(like.shape, dtype=like.dtype, device="meta"))

    def _twin_names(self, group: int, skip: Sequence[str]) -> list[str]:
        return [n for n in self._block_keys[group] if not any(n.startswith(p + ".") for p in skip)]

    def load(self, group: int) -> None:
        """Read decoder layer ``group``'s weights (the scheduler's hook)."""
        if group in self._loaded:
            return
        self._loaded.add(group)
        for name in self._block_keys[group]:
            self._set(name, self.read(name))
        path, module = self.blocks[group]
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            raise RQError(f"{self.checkpoint.model_dir} has no tensor for {path}.{missing[0]}; the checkpoint "
                          f"does not match its config.json")
        if self._advance is not None:
            self._advance(self.block_bytes[group])

    def release(self, group: int) -> None:
        """Put decoder layer ``group``'s weights back on the meta device (memory is freed), unless :attr:`keep`."""
        if self.keep or group not in self._loaded:
            return
        self._loaded.discard(group)
        for name in self._block_keys[group]:
            like = self._meta_like(name)
            self._set(name, torch.empty(like.shape, dtype=like.dtype, device="meta"))

    def model_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the whole model in ``dtype`` (the skeleton's by default), resident part included."""
        total = 0
        for name in self._sources:
            like = self._meta_like(name)
            total += like.numel() * (dtype or like.dtype).itemsize
        return total

    def keep_layers(self, mode: str, copies: int = 1) -> bool:
        """Decide :attr:`keep`: ``always`` streams (release every layer after use), ``never`` keeps every layer
        once read, ``auto`` keeps them when ``copies`` times the model takes under half the memory available
        now, so a model that fits runs as fast as a loaded one (a layer is read once, not once per decode
        step)."""
        if mode not in ("auto", "always", "never"):
            raise RQError(f"--stream must be auto, always or never, got '{mode}'")
        if mode == "auto":
            available = available_memory()
            self.keep = available is not None and copies * self.model_bytes() < available // 2
        else:
            self.keep = mode == "never"
        return self.keep

    # --- running -----------------------------------------------------------------------------------
    def run(self, jobs: Sequence[Callable[[], Any]], *, label: str, passes: int | None = 1,
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Run ``jobs`` (forward passes over this model) layer-major with a per-layer progress bar of the bytes
        read (``passes``: how many times each layer will be visited, None if unknown)."""
        total = None if passes is None else passes * sum(self.block_bytes)
        with layer_progress(label, total, enabled=self.show_progress) as advance:
            self._advance = advance
            try:
                return self.scheduler.run(jobs, on_done=on_done, sequential=self.keep)
            finally:
                self._advance = None

    def moe_layers_of(self, group: int) -> list[MoELayer]:
        """The MoE layers inside decoder layer ``group`` (with the tensors loaded now)."""
        prefix = self.block_paths[group] + "."
        return [layer for layer in self.adapter.moe_layers(self.model) if layer.path.startswith(prefix)]

    def router_weight(self, layer: MoELayer) -> torch.Tensor:
        """``layer``'s router weight (for the fingerprint), read from the checkpoint without the rest of its
        decoder layer where it is one tensor of the model; where the adapter derives it from several, the
        decoder layer is read for it and released."""
        if not layer.router_weight.is_meta:
            return layer.router_weight
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        if id(layer.router_weight) in names:
            return self.read(names[id(layer.router_weight)])
        group = next(g for g, path in enumerate(self.block_paths) if layer.path.startswith(path + "."))
        self.load(group)
        try:
            found = next(l for l in self.adapter.moe_layers(self.model) if l.path == layer.path)
            return found.router_weight.detach().clone()
        finally:
            self.release(group)


def open_streamed(model_dir: str | Path, *, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False,
                  device: torch.device | str = "cpu", show_progress: bool = True) -> StreamedModel:
    """The :class:`StreamedModel` of a local checkpoint folder: config read, shards checked, skeleton built and
    the parameters outside the decoder layers loaded. ``dtype="auto"``: the checkpoint's own."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model_dir = Path(model_dir)
    config, adapter = read_config(model_dir, trust_remote_code)
    checkpoint = Checkpoint(model_dir)
    map_large_allocations()  # a released layer's memory goes back to the system, not to a heap
    dtype = resolve_dtype(dtype, config, checkpoint)
    auto = AutoModelForSeq2SeqLM if adapter.encoder_decoder else AutoModelForCausalLM

    def build() -> nn.Module:
        with adapter.load_context(), _parameters_on_meta():
            model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.eval()
        model.requires_grad_(False)
        if (model_dir / "generation_config.json").is_file():  # what from_pretrained reads too
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        return model

    model = build()
    if not adapter.moe_layers(model):
        raise RQError(f"{model_dir} ({config.model_type}) has no MoE layers to balance")
    return StreamedModel(model, adapter, checkpoint, torch.device(device), show_progress, build)


def available_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resolve_dtype(dtype: torch.dtype | str, config, checkpoint: Checkpoint) -> torch.dtype:
    """``auto``: the dtype config.json records, else the first floating tensor's; a dtype stays itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        raise RQError(f"dtype must be auto or a torch dtype, got {dtype!r}")
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded, None)
    if isinstance(recorded, torch.dtype) and recorded.is_floating_point:
        return recorded
    for key in checkpoint.keys():
        stored = checkpoint.dtype_of(key)
        if stored is not None and stored.is_floating_point:
            return stored
    return torch.float32


# ---------------------------------------------------------------------------------------------------
# the model's structure and the checkpoint's names

def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` at parameter or buffer ``name`` of ``model`` (a Parameter object is kept as is)."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value,
                                                                                              requires_grad=False)


def _decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated decoder layers (transformers' ``_no_split_modules`` classes), outermost only, in order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if type(module).__name__ in names and not any(path.startswith(p + ".") for p, _ in blocks):
            blocks.append((path, module))
    if not blocks:
        raise RQError(f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules); "
                      f"this architecture cannot be streamed")
    return blocks


def _untied_head(model: nn.Module, sources: dict[str, _Source]) -> list[tuple[str, nn.Module]]:
    """``[(path, head)]`` when the output head has its own weight in the checkpoint (not tied to the input
    embeddings), else ``[]``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return []
    path = next((p for p, m in model.named_modules() if m is head), None)
    if path is None or f"{path}.weight" not in sources:
        return []
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.weight is head.weight:
        return []
    return [(path, head)]


def _map_sources(model: nn.Module, checkpoint: Checkpoint) -> dict[str, _Source]:
    """Model tensor name -> :class:`_Source`, by transformers' renaming and conversion rules."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    meta = model.state_dict()
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    grouped: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    converter_of: dict[str, Any] = {}
    for key in sorted(checkpoint.keys(), key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = rename_source_key(key, [], [], prefix, meta)
        if target not in meta:
            continue  # not a tensor of this model (transformers ignores it too)
        grouped[target][pattern or key].append(key)
        if pattern is not None:
            converter_of[target] = by_pattern[pattern]
    sources = {}
    for target, by_source in grouped.items():
        converter = converter_of.get(target)
        if converter is None:
            sources[target] = _Source(next(iter(by_source.values())))
        else:
            sources[target] = _Source([k for p in converter.source_patterns for k in by_source.get(p, [])], converter)
    return sources


def _merge(source: _Source, like: torch.Tensor, checkpoint: Checkpoint) -> torch.Tensor:
    """A converted tensor. transformers' expert merge (``MergeModulelist(dim=0)``, then for gated experts
    ``Concatenate(dim=1)``) is done in place, expert by expert, into one preallocated tensor."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    converter = source.converter
    ops = converter.operations
    merge = (len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
             and (len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1)))
    patterns = converter.source_patterns
    per_pattern = len(source.keys) // len(patterns)
    if not merge or per_pattern != like.shape[0] or len(source.keys) != per_pattern * len(patterns):
        raise RQError(f"checkpoint conversion {[type(op).__name__ for op in ops]} for {source.keys[0]} is not "
                      f"supported when streaming; rq streams checkpoints with per-expert or fused expert tensors")
    out = torch.empty(like.shape, dtype=like.dtype)
    for expert in range(per_pattern):
        row = 0
        for part in range(len(patterns)):
            tensor = checkpoint.tensor(source.keys[part * per_pattern + expert])
            out[expert, row:row + tensor.shape[0]].copy_(tensor)
            row += tensor.shape[0]
        if row != like.shape[1]:
            raise RQError(f"checkpoint experts {source.keys[expert]} add up to {row} rows, the model expects "
                          f"{like.shape[1]}; the checkpoint does not match its config.json")
    return out

