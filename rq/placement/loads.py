"""Engine load statistics -> rq stats (``rq import-loads``): SGLang's expert-distribution recorder dumps, vLLM's
EPLB load window and TensorRT-LLM's expert statistic folders, read as the engines write them (docs/multi-gpu.md,
"Importing engine load statistics"). TensorRT-LLM records *slot* ids while its load balancer is on; the
``MoeLoadBalancerConfig`` YAML the server ran with (:func:`read_trtllm_placement`) says which slot holds which
logical expert.

Every reader checks what it reads: a file an engine did not write, or one edited by hand, is refused with one
:class:`~rq.errors.RQError` line naming the file and the field, never another exception.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from rq.calibrate.stats import CalibrationStats, LayerStats
from rq.core.int4 import can_quantize
from rq.errors import RQError
from rq.placement import ENGINES
from rq.placement.formats import ModelShape, model_shape
from rq.documents import CalibrationInfo, ModelInfo

# TensorRT-LLM's per-rank bincounts; the same folder may hold rank{r}_raw.safetensors (raw token_selected_experts
# per iteration and layer, written by some versions next to the counts) and rank{r}_numtokens.json: not counts.
_TRTLLM_COUNTS = re.compile(r"rank(\d+)\.safetensors")
# ``--placement none``: the TensorRT-LLM server ran without a load balancer, so its statistics count expert ids.
NO_BALANCER = "none"
_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def _load_obj(path: Path):
    """A torch.save'd object (loaded with weights_only), a safetensors dict or a JSON document."""
    if not path.is_file():
        raise RQError(f"{path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any unreadable file is one user-facing error
        first = str(err).splitlines()[0] if str(err) else ""
        raise RQError(f"{path} is not a readable load dump ({type(err).__name__}: {first[:200]})") from None


def counts_tensor(value, path: Path, key: str, dims: tuple[int, ...]) -> torch.Tensor:
    """``value`` as an int64 tensor of one of the ranks ``dims``, every entry a finite integer >= 0 (a count);
    otherwise an RQError naming ``key`` in ``path``."""
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise RQError(f"{path}: '{key}' is not a numeric array; pass the file the engine wrote") from None
    if tensor.is_complex() or not (tensor.dtype.is_floating_point or tensor.dtype in _INTEGER):
        raise RQError(f"{path}: '{key}' holds {tensor.dtype} values, expected integer counts")
    if tensor.dim() not in dims:
        raise RQError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, expected {' or '.join(f'{d}-D' for d in dims)}")
    if tensor.dtype.is_floating_point:
        if not bool(torch.isfinite(tensor).all()) or not bool((tensor == tensor.round()).all()):
            raise RQError(f"{path}: '{key}' holds non-integer values, expected integer counts")
        if bool((tensor.abs() > 2**53).any()):
            raise RQError(f"{path}: '{key}' holds values beyond 2^53, not counts")
    tensor = tensor.to(torch.int64)
    if bool((tensor < 0).any()):
        raise RQError(f"{path}: '{key}' holds negative values, expected counts >= 0")
    return tensor


def id_tensor(value, path: Path, key: str, dims: tuple[int, ...], limit: int | None = None) -> torch.Tensor:
    """Expert ids (``-1`` allowed where ``limit`` is None: SGLang pads ``topk_ids`` with it)."""
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise RQError(f"{path}: '{key}' is not a numeric array; pass the file the engine wrote") from None
    if tensor.dtype not in _INTEGER or tensor.dtype == torch.bool:
        raise RQError(f"{path}: '{key}' holds {tensor.dtype} values, expected integer expert ids")
    if tensor.dim() not in dims:
        raise RQError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, expected {' or '.join(f'{d}-D' for d in dims)}")
    tensor = tensor.to(torch.int64)
    low = 0 if limit is not None else -1
    if tensor.numel() and (int(tensor.min()) < low or (limit is not None and int(tensor.max()) >= limit)):
        bound = f"0..{limit - 1}" if limit is not None else ">= -1"
        raise RQError(f"{path}: '{key}' holds ids outside {bound}")
    return tensor


def _physical_to_logical(count: torch.Tensor, phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``count [..., L, P]`` physical loads -> ``[..., L, N]`` logical loads via ``phy2log [L, P]``."""
    index = phy2log.to(torch.int64).expand_as(count)
    out = torch.zeros(*count.shape[:-1], num_experts, dtype=torch.int64)
    return out.scatter_add_(-1, index, count.to(torch.int64))


def _add(a: torch.Tensor | None, b: torch.Tensor, path: Path) -> torch.Tensor:
    if a is None:
        return b
    if a.shape != b.shape:
        raise RQError(f"{path} has loads of shape {tuple(b.shape)}, earlier files {tuple(a.shape)}: not the same model")
    return a + b


def _sglang_records(obj: dict, path: Path) -> torch.Tensor:
    """``per_pass`` / ``per_token`` dump of one rank: physical counts summed over records, mapped to logical."""
    phy2log = id_tensor(obj["last_physical_to_logical_map"], path, "last_physical_to_logical_map", (2,), 1 << 31)
    layers, num_phy = phy2log.shape
    records = obj["records"]
    if not isinstance(records, (list, tuple)) or num_phy == 0:
        raise RQError(f"{path}: 'records' must be a list of recorder records and the map non-empty")
    physical = torch.zeros(layers, num_phy, dtype=torch.int64)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise RQError(f"{path}: records[{i}] is a {type(rec).__name__}, expected a dict")
        if "global_physical_count" in rec:
            count = counts_tensor(rec["global_physical_count"], path, f"records[{i}].global_physical_count", (2,))
            if tuple(count.shape) != (layers, num_phy):
                raise RQError(f"{path}: records[{i}].global_physical_count has shape {tuple(count.shape)}, the map "
                              f"{(layers, num_phy)}")
            physical += count
        elif "topk_ids_of_layer" in rec:
            ids = id_tensor(rec["topk_ids_of_layer"], path, f"records[{i}].topk_ids_of_layer", (2, 3))
            if ids.shape[0] != layers:
                raise RQError(f"{path}: records[{i}].topk_ids_of_layer has {ids.shape[0]} layers, the map {layers}")
            ids = ids.reshape(layers, -1)
            for li in range(layers):
                valid = ids[li][(ids[li] >= 0) & (ids[li] < num_phy)]  # -1: no expert (padding)
                physical[li] += torch.bincount(valid, minlength=num_phy)
        else:
            raise RQError(f"{path}: records[{i}] has neither 'global_physical_count' nor 'topk_ids_of_layer'")
    return _physical_to_logical(physical, phy2log, int(phy2log.max()) + 1)


def read_sglang_loads(paths: list[str | Path]) -> torch.Tensor:
    """Logical loads ``[layers, N]`` int64 from SGLang expert-distribution recorder dumps (summed over files).

    ``stat`` mode (``--expert-distribution-recorder-mode stat``, written by rank 0):
    ``{"logical_count": [steps, layers, N]}`` (older SGLang: ``[layers, N]``); also the
    ``{"logical_count": ...}`` form SGLang's ``--init-expert-location`` reads. ``per_pass``/``per_token``
    modes (one file per rank): ``records`` with ``global_physical_count [layers, P]`` or
    ``topk_ids_of_layer [layers, tokens, K]`` (physical ids), mapped to logical experts with
    ``last_physical_to_logical_map [layers, P]``. Rows are SGLang's layer ids (decoder layers).
    """
    total = None
    for raw in paths:
        path = Path(raw)
        obj = _load_obj(path)
        if isinstance(obj, dict) and "logical_count" in obj:
            count = counts_tensor(obj["logical_count"], path, "logical_count", (2, 3))
            count = count.sum(0) if count.dim() == 3 else count
        elif isinstance(obj, dict) and "records" in obj and "last_physical_to_logical_map" in obj:
            count = _sglang_records(obj, path)
        else:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise RQError(f"{path} is not an SGLang expert-distribution dump (found {keys}; expected 'logical_count' "
                          f"or 'records' + 'last_physical_to_logical_map')")
        total = _add(total, count, path)
    if total is None:
        raise RQError("no SGLang dump files given")
    return total


def read_vllm_loads(paths: list[str | Path], num_experts: int) -> torch.Tensor:
    """Logical loads ``[num_moe_layers, N]`` int64 from vLLM EPLB state saved with ``torch.save`` (or as
    safetensors / JSON), summed over files. Accepted keys, after vLLM's ``EplbModelState``:
    ``expert_load_window [W, L, P]`` or ``expert_load_pass [L, P]`` with ``physical_to_logical_map [L, P]``
    (physical loads, summed over the window and mapped to logical experts as vLLM's ``rearrange`` does),
    ``logical_expert_load_window [W, L, N]``, ``global_expert_load [L, N]``; or a bare tensor
    ``[L, N]`` / ``[W, L, N]`` of logical loads."""
    total = None
    for raw in paths:
        path = Path(raw)
        obj = _load_obj(path)
        if isinstance(obj, (torch.Tensor, list)):
            obj = {"logical": obj}
        if not isinstance(obj, dict):
            raise RQError(f"{path} holds a {type(obj).__name__}, expected a tensor or a dict of EPLB state tensors")
        if "expert_load_window" in obj or "expert_load_pass" in obj:
            key = "expert_load_window" if "expert_load_window" in obj else "expert_load_pass"
            physical = counts_tensor(obj[key], path, key, (2, 3))
            physical = physical.sum(0) if physical.dim() == 3 else physical
            if "physical_to_logical_map" in obj:
                phy2log = id_tensor(obj["physical_to_logical_map"], path, "physical_to_logical_map", (2,), num_experts)
            elif physical.shape[-1] == num_experts:
                phy2log = torch.arange(num_experts).expand_as(physical)
            else:
                raise RQError(f"{path}: '{key}' has {physical.shape[-1]} physical experts but no "
                              f"'physical_to_logical_map' to map them to {num_experts} logical experts")
            if phy2log.shape != physical.shape:
                raise RQError(f"{path}: physical_to_logical_map {tuple(phy2log.shape)} does not match {key} "
                              f"{tuple(physical.shape)}")
            count = _physical_to_logical(physical, phy2log, num_experts)
        else:
            key = next((k for k in ("logical_expert_load_window", "global_expert_load", "logical") if k in obj), None)
            if key is None:
                raise RQError(f"{path} has keys {sorted(map(str, obj))}; expected expert_load_window + "
                              f"physical_to_logical_map, logical_expert_load_window or global_expert_load")
            count = counts_tensor(obj[key], path, key, (2, 3))
            count = count.sum(0) if count.dim() == 3 else count
        if count.shape[1] != num_experts:
            raise RQError(f"{path}: loads of shape {tuple(count.shape)}, expected [moe_layers, {num_experts}]")
        total = _add(total, count, path)
    if total is None:
        raise RQError("no vLLM dump files given")
    return total


_TRTLLM_LB_KEYS = {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}


def read_trtllm_placement(path: str | Path, num_experts: int) -> dict[int, torch.Tensor]:
    """``{decoder layer: slot_to_logical [num_slots]}`` from the ``MoeLoadBalancerConfig`` YAML a TensorRT-LLM
    server ran with (``moe_config.load_balancer``: rq's ``trtllm_moe_load_balancer.yaml`` or the output of
    TensorRT-LLM's ``generate_eplb_config.py``), checked as TensorRT-LLM checks it (a strict model: only
    ``num_slots``, ``initial_global_assignments``, ``layer_updates_per_iter``; one logical id per slot) plus
    ``layer_updates_per_iter: 0``: with updates the slots move while the server runs and no file maps them."""
    import yaml  # a dependency of transformers; only this reader needs it

    path = Path(path)
    if not path.is_file():
        raise RQError(f"{path} does not exist; pass the load balancer YAML the server ran with (moe_config.load_balancer)")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise RQError(f"{path} is not valid YAML ({type(err).__name__}: {first[:200]})") from None
    if not isinstance(doc, dict):
        raise RQError(f"{path} is not a MoeLoadBalancerConfig (a mapping with num_slots and initial_global_assignments)")
    extra = sorted(map(str, set(doc) - _TRTLLM_LB_KEYS))
    if extra:
        raise RQError(f"{path}: unknown key(s) {extra}; a MoeLoadBalancerConfig holds only {sorted(_TRTLLM_LB_KEYS)}")
    num_slots, updates = doc.get("num_slots"), doc.get("layer_updates_per_iter", 0)
    if type(num_slots) is not int or num_slots < num_experts:
        raise RQError(f"{path}: 'num_slots' must be an integer >= the {num_experts} experts, got {num_slots!r}")
    if type(updates) is not int or updates != 0:
        raise RQError(f"{path}: 'layer_updates_per_iter' is {updates!r}: with online updates the slots move while "
                      f"the server runs, so slot ids cannot be mapped back; record with layer_updates_per_iter: 0")
    table = doc.get("initial_global_assignments")
    if not isinstance(table, dict) or not table:
        raise RQError(f"{path}: 'initial_global_assignments' must map decoder layers to {num_slots} logical ids each")
    out: dict[int, torch.Tensor] = {}
    for key, ids in table.items():
        layer = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key  # pydantic's Dict[int, ...]
        if type(layer) is not int or layer < 0:
            raise RQError(f"{path}: initial_global_assignments key {key!r} is not a decoder layer index")
        if not isinstance(ids, list) or len(ids) != num_slots or any(type(v) is not int for v in ids):
            raise RQError(f"{path}: initial_global_assignments[{layer}] must be a list of {num_slots} integer ids")
        out[layer] = id_tensor(ids, path, f"initial_global_assignments[{layer}]", (1,), num_experts)
    return out


def read_trtllm_loads(path: str | Path, placement: dict[int, torch.Tensor] | None = None,
                      num_experts: int = 0) -> dict[int, torch.Tensor]:
    """``{decoder layer: [K] int64}`` from a TensorRT-LLM expert statistic folder (``EXPERT_STATISTIC_PATH``):
    ``meta_info.json`` and ``rank<r>.safetensors`` with keys ``"<iteration>_<layer>"`` (bincounts), summed over
    iterations and ranks; other files (``rank<r>_raw.safetensors``, ``rank<r>_numtokens.json``) are not counts
    and are left alone. With the load balancer on, TensorRT-LLM counts *slot* ids (``K = num_slots``): pass
    ``placement`` (:func:`read_trtllm_placement`) and each layer's slot counts become counts of its ``num_experts``
    logical experts."""
    folder = Path(path)
    files = sorted((p for p in folder.glob("rank*.safetensors") if _TRTLLM_COUNTS.fullmatch(p.name)),
                   key=lambda p: int(_TRTLLM_COUNTS.fullmatch(p.name).group(1)))
    if not (folder / "meta_info.json").is_file() or not files:
        raise RQError(f"{folder} is not a TensorRT-LLM expert statistic folder (meta_info.json + rank<r>.safetensors)")
    meta = _load_obj(folder / "meta_info.json")
    width = meta.get("num_experts") if isinstance(meta, dict) else None
    if type(width) is not int or width < 1:
        raise RQError(f"{folder / 'meta_info.json'}: 'num_experts' must be a positive integer, got {width!r}")
    out: dict[int, torch.Tensor] = {}
    for file in files:
        for key, value in _load_obj(file).items():
            match = re.fullmatch(r"(\d+)_(\d+)", key)
            if not match:
                raise RQError(f"{file}: key '{key}' is not '<iteration>_<layer>'")
            count = counts_tensor(value, file, key, (1,))
            if count.numel() != width:
                raise RQError(f"{file}: '{key}' has {count.numel()} counts, meta_info.json num_experts {width}")
            layer = int(match.group(2))
            out[layer] = out.get(layer, 0) + count
    if placement is None:
        return out
    mapped = {}
    for layer, count in out.items():
        if layer not in placement:
            raise RQError(f"{folder} has statistics for layer {layer}, the load balancer YAML none; pass the YAML the "
                          f"server ran with")
        slots = placement[layer]
        if count.numel() != slots.numel():
            raise RQError(f"{folder}: layer {layer} has {count.numel()} counts, the load balancer YAML {slots.numel()} "
                          f"slots: not the placement these statistics were recorded with")
        mapped[layer] = torch.zeros(num_experts, dtype=torch.int64).scatter_add_(0, slots, count)
    return mapped


def stats_from_loads(loads: torch.Tensor, shape: ModelShape, source: str, group_size: int = 128) -> CalibrationStats:
    """``loads [num_moe_layers, N]`` -> :class:`CalibrationStats` with the model's shapes and bf16/fp16 byte
    sizes. ``gate_mass``, ``contribution`` and ``quant_sensitivity`` are copies of the load (an engine records
    nothing else), so planning by any importance metric plans by frequency. ``tokens`` is the largest layer
    total divided by top-k."""
    num_layers = len(shape.moe_layers)
    if tuple(loads.shape) != (num_layers, shape.num_experts):
        raise RQError(f"loads have shape {tuple(loads.shape)}, the config describes {num_layers} MoE layers x "
                      f"{shape.num_experts} experts: wrong --config or dump")
    loads = loads.to(torch.float64)
    quantizable = can_quantize(shape.w_in_shape) and can_quantize(shape.w_out_shape)
    layers = [LayerStats(index=i, path=f"model.layers.{d}.mlp.experts", num_experts=shape.num_experts,
                         top_k=shape.top_k, activation=shape.activation, w_in_shape=shape.w_in_shape,
                         w_out_shape=shape.w_out_shape, original_bytes=[shape.expert_bytes] * shape.num_experts,
                         quantizable=quantizable, load=loads[i].clone(), gate_mass=loads[i].clone(),
                         contribution=loads[i].clone(), quant_sensitivity=loads[i].clone())
              for i, d in enumerate(shape.moe_layers)]
    model = ModelInfo(architecture=shape.architecture, num_moe_layers=num_layers, num_experts=shape.num_experts,
                      top_k=shape.top_k, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                      dtype=shape.dtype, fingerprint=shape.fingerprint)
    tokens = int(round(float(loads.sum(-1).max()) / shape.top_k))
    calibration = CalibrationInfo(data=f"{source}; importance metrics are copies of the load (frequency)",
                                  sequences=0, seq_len=0, tokens=tokens, seed=0)
    return CalibrationStats(model, calibration, group_size, layers)


def import_loads(engine: str, inputs: list[str | Path], config: str | Path, group_size: int = 128,
                 placement: str | Path | None = None) -> CalibrationStats:
    """Engine load dumps -> rq stats, for a model calibrated where it runs (``engine``: sglang, vllm, trtllm).

    SGLang rows are decoder layers (dense layers hold zeros) and are reduced to the MoE layers of the
    config; vLLM rows are MoE layers; TensorRT-LLM keys are decoder layers. ``placement``: TensorRT-LLM only,
    the load balancer YAML the server ran with, whose slots the statistics count (:func:`read_trtllm_loads`), or
    ``none`` when it ran without one; required when the counts are as wide as the expert count (then slot and
    expert ids cannot be told apart).
    """
    shape = model_shape(config)
    if placement is not None and engine != "trtllm":
        raise RQError(f"--placement maps TensorRT-LLM slot ids; {engine} dumps name their own map (leave it out)")
    if engine == "sglang":
        loads = read_sglang_loads(inputs)
        if loads.shape[0] == shape.num_hidden_layers:
            loads = loads[list(shape.moe_layers)]
    elif engine == "vllm":
        loads = read_vllm_loads(inputs, shape.num_experts)
    elif engine == "trtllm":
        if len(inputs) != 1:
            raise RQError("TensorRT-LLM statistics are one folder (EXPERT_STATISTIC_PATH); pass exactly one")
        no_balancer = placement is not None and str(placement) == NO_BALANCER
        slots = read_trtllm_placement(placement, shape.num_experts) if placement is not None and not no_balancer else None
        per_layer = read_trtllm_loads(inputs[0], slots, shape.num_experts)
        missing = [d for d in shape.moe_layers if d not in per_layer]
        if missing:
            raise RQError(f"{inputs[0]} has no statistics for MoE layer(s) {missing[:5]}; record every layer")
        widths = {int(per_layer[d].numel()) for d in shape.moe_layers}
        if widths != {shape.num_experts}:
            raise RQError(f"{inputs[0]} counts {sorted(widths)} ids per layer, {config} has {shape.num_experts} experts: "
                          f"TensorRT-LLM counts slots while its load balancer is on; pass --placement with the "
                          f"load balancer YAML the server ran with")
        if placement is None and widths == {shape.num_experts}:
            raise RQError(f"{inputs[0]} counts {shape.num_experts} ids per layer, as many as {config} has experts: a "
                          f"server without a load balancer (expert ids) and one with num_slots == {shape.num_experts} "
                          f"(slot ids) write the same; pass --placement with the load balancer YAML the server ran "
                          f"with, or --placement {NO_BALANCER} if it ran without one")
        loads = torch.stack([per_layer[d] for d in shape.moe_layers])
    else:
        raise RQError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if loads.shape[-1] != shape.num_experts:
        raise RQError(f"the dump has {loads.shape[-1]} experts per layer, {config} says {shape.num_experts}")
    if float(loads.sum()) == 0:
        raise RQError("the dump holds no routed tokens; record while the server handles traffic")
    names = ", ".join(Path(p).name for p in inputs)
    return stats_from_loads(loads, shape, f"{engine} expert loads from {names}", group_size)
