"""Engine file formats for expert placement (docs/spec.md §7), and importers of engine load statistics.

Writers (tensors from :mod:`rq.placement.place` in, one file out; shapes as the engines load them):

* SGLang ``--init-expert-location FILE.json``: ``{"physical_to_logical_map": [[...]]}`` with one row per
  *decoder* layer (``num_hidden_layers`` rows; rows of dense layers get the trivial ``p % N`` map) and
  ``P`` columns. SGLang passes the dict's keys to ``ExpertLocationMetadata.init_by_mapping`` as keyword
  arguments, so the file holds that one key and nothing else; SGLang derives ``logical_to_all_physical_map``
  and the per-rank dispatch map itself.
* vLLM: ``[[...]]``, the physical-to-logical map of each *MoE* layer (vLLM's
  ``EplbModelState.physical_to_logical_map``, ``[num_moe_layers, num_physical_experts]``), and the
  vLLM-Ascend ``expert_map_path`` document ``{"moe_layer_count", "layer_list": [{"layer_id",
  "device_count", "device_list": [{"device_id", "device_expert": [...]}]}]}``.
* TensorRT-LLM ``MoeLoadBalancerConfig`` YAML: ``num_slots``, ``initial_global_assignments`` (decoder layer
  index -> ``num_slots`` logical ids, rank-major) and ``layer_updates_per_iter: 0`` (static).
* DeepSeek EPLB tensors (safetensors): ``phy2log [L, P]``, ``log2phy [L, N, X]`` (-1 padded),
  ``logcnt [L, N]`` (int64, MoE layers), plus ``decoder_layer [L]``.

Importers turn per-expert loads recorded where a model runs into rq :class:`~rq.calibrate.stats.CalibrationStats`
(:func:`import_loads`): SGLang's expert-distribution recorder dumps, vLLM's EPLB load window, and
TensorRT-LLM's expert statistic files. Shapes and bytes come from the model's Hugging Face ``config.json``
(:func:`model_shape`). Only loads are recorded by engines: ``gate_mass``, ``contribution`` and
``quant_sensitivity`` are set equal to the load, so every importance metric is frequency.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rq.models.adapters.base import activation_name
from rq.errors import RQError
from rq.core.int4 import can_quantize
from rq.plan.schema import CalibrationInfo, ModelInfo, Plan, atomic_write_text
from rq.calibrate.stats import CalibrationStats, LayerStats
from rq.placement import ENGINES, FILENAMES, FORMATS

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


# ----------------------------------------------------------------------------- model shapes

@dataclass(frozen=True)
class ModelShape:
    """What placement and import need from a Hugging Face ``config.json``."""

    architecture: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]  # decoder index of each MoE layer, ascending
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int  # per routed expert
    dtype: str
    activation: str  # docs/spec.md §8 names; all engine-served families are gated
    num_groups: int  # router expert groups (DeepSeek n_group), 1 when ungrouped
    fingerprint: str  # "config-sha256:<hex>": the config only (router weights are not available)

    @property
    def w_in_shape(self) -> tuple[int, int]:
        return 2 * self.intermediate_size, self.hidden_size

    @property
    def w_out_shape(self) -> tuple[int, int]:
        return self.hidden_size, self.intermediate_size

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert at the checkpoint's precision."""
        if self.dtype not in DTYPE_BYTES:
            raise RQError(f"config dtype '{self.dtype}' is not one of {sorted(DTYPE_BYTES)}; "
                          f"set torch_dtype in config.json")
        n_in, n_out = self.w_in_shape, self.w_out_shape
        return (n_in[0] * n_in[1] + n_out[0] * n_out[1]) * DTYPE_BYTES[self.dtype]


_VOLATILE = {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "architectures", "auto_map",
             "_commit_hash", "use_cache"}


def _first(cfg: dict, keys: tuple[str, ...], path: Path, what: str):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise RQError(f"{path} has no {what} ({' / '.join(keys)}); pass the model's Hugging Face config.json")


def model_shape(config_path: str | Path) -> ModelShape:
    """Read a Hugging Face ``config.json`` (or a folder holding one): MoE layer indices (DeepSeek
    ``first_k_dense_replace``/``moe_layer_freq``, Qwen-MoE ``decoder_sparse_step``/``mlp_only_layers``,
    otherwise every layer), expert count, top-k, sizes, dtype, router groups."""
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise RQError(f"{path} does not exist; pass --config with the model's Hugging Face config.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RQError(f"{path} is not valid JSON ({err})") from None
    cfg = {**raw, **raw["text_config"]} if isinstance(raw.get("text_config"), dict) else raw
    num_layers = int(_first(cfg, ("num_hidden_layers", "num_layers", "n_layer"), path, "layer count"))
    if "first_k_dense_replace" in cfg:
        start, freq = int(cfg["first_k_dense_replace"]), int(cfg.get("moe_layer_freq") or 1)
        moe = [i for i in range(num_layers) if i >= start and i % freq == 0]
    elif "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:
        step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or [])
        moe = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    else:
        moe = list(range(num_layers))
    if not moe:
        raise RQError(f"{path} describes no MoE layer")
    digest = hashlib.sha256(json.dumps({k: v for k, v in raw.items() if k not in _VOLATILE},
                                       sort_keys=True, default=str).encode()).hexdigest()
    return ModelShape(
        architecture=str(cfg.get("model_type", "unknown")), num_hidden_layers=num_layers, moe_layers=tuple(moe),
        num_experts=int(_first(cfg, ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts"),
                               path, "routed expert count")),
        top_k=int(_first(cfg, ("num_experts_per_tok", "num_experts_per_token", "moe_top_k"), path, "top-k")),
        hidden_size=int(_first(cfg, ("hidden_size", "d_model"), path, "hidden size")),
        intermediate_size=int(_first(cfg, ("moe_intermediate_size", "intermediate_size"), path,
                                     "expert intermediate size")),
        dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch."),
        activation=activation_name(str(cfg.get("hidden_act", "silu")), gated=True),
        num_groups=int(cfg.get("n_group") or 1), fingerprint=f"config-sha256:{digest}")


def decoder_layers(plan: Plan) -> list[int]:
    """Decoder index of each MoE layer of ``plan``, from its module path (``...layers.<i>....``); the MoE
    ordinals when a path has none or two layers would share an index (encoder-decoder models)."""
    out = []
    for layer in plan.layers:
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", layer.module)
        out.append(int(match.group(1)) if match else None)
    if None in out or len(set(out)) != len(out):
        return [layer.layer for layer in plan.layers]
    return out


# ----------------------------------------------------------------------------- writers

def _rows_json(rows: list[list[int]]) -> str:
    return "[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + "\n]"


def write_sglang(path: Path, phy2log: torch.Tensor, decoder: list[int], num_hidden_layers: int,
                 num_experts: int) -> None:
    """SGLang ``--init-expert-location`` JSON: ``physical_to_logical_map [num_hidden_layers, P]``.

    phy2log: ``[L, P]`` (MoE layers); decoder: ``[L]`` decoder index of each; other rows get ``p % N``.
    """
    num_phy = phy2log.shape[1]
    if max(decoder) >= num_hidden_layers:
        raise RQError(f"MoE layer at decoder index {max(decoder)} but the model has {num_hidden_layers} layers; "
                      f"pass --config with the model's config.json")
    rows = [[p % num_experts for p in range(num_phy)] for _ in range(num_hidden_layers)]
    for li, d in enumerate(decoder):
        rows[d] = phy2log[li].tolist()
    atomic_write_text(path, '{"physical_to_logical_map": ' + _rows_json(rows) + "}\n")


def write_vllm(path: Path, phy2log: torch.Tensor) -> None:
    """vLLM ``physical_to_logical_map [num_moe_layers, P]`` as a JSON list of per-layer lists."""
    atomic_write_text(path, _rows_json(phy2log.tolist()) + "\n")


def vllm_ascend_document(phy2log: torch.Tensor, num_gpus: int) -> dict:
    """The vLLM-Ascend ``expert_map_path`` document for ``phy2log [L, P]``: per MoE layer and device, the
    logical ids of its slots. vLLM-Ascend indexes a device's experts by logical id, so an expert may appear
    once per device; a placement that repeats one is refused."""
    num_layers, num_phy = phy2log.shape
    per_gpu = num_phy // num_gpus
    layers = []
    for li in range(num_layers):
        devices = []
        for d in range(num_gpus):
            ids = phy2log[li, d * per_gpu:(d + 1) * per_gpu].tolist()
            if len(set(ids)) != len(ids):
                raise RQError(f"vLLM-Ascend needs each device to hold an expert at most once, but layer {li} "
                              f"device {d} holds {sorted(ids)}; use more devices or leave vllm-ascend out of --formats")
            devices.append({"device_id": d, "device_expert": ids})
        layers.append({"layer_id": li, "device_count": num_gpus, "device_list": devices})
    return {"moe_layer_count": num_layers, "layer_list": layers}


def write_vllm_ascend(path: Path, phy2log: torch.Tensor, num_gpus: int) -> None:
    """vLLM-Ascend ``expert_map_path`` JSON (:func:`vllm_ascend_document`)."""
    atomic_write_text(path, json.dumps(vllm_ascend_document(phy2log, num_gpus)) + "\n")


def write_trtllm(path: Path, phy2log: torch.Tensor, decoder: list[int]) -> None:
    """TensorRT-LLM ``MoeLoadBalancerConfig`` YAML (``moe_config.load_balancer``): ``num_slots``,
    ``initial_global_assignments {decoder layer: [logical id per slot]}``, ``layer_updates_per_iter: 0``."""
    lines = [f"num_slots: {phy2log.shape[1]}", "layer_updates_per_iter: 0", "initial_global_assignments:"]
    lines += [f"  {d}: [{', '.join(str(v) for v in row)}]" for d, row in zip(decoder, phy2log.tolist())]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_eplb(path: Path, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
               decoder: list[int]) -> None:
    """DeepSeek-EPLB-style tensors as safetensors: ``phy2log [L, P]``, ``log2phy [L, N, X]`` (-1 padded),
    ``logcnt [L, N]``, ``decoder_layer [L]`` (int64)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"phy2log": phy2log.to(torch.int64).contiguous(), "log2phy": log2phy.to(torch.int64).contiguous(),
                   "logcnt": logcnt.to(torch.int64).contiguous(),
                   "decoder_layer": torch.tensor(decoder, dtype=torch.int64)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_formats(formats: list[str]) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise RQError(f"unknown format(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(FORMATS)}")


def write_formats(out_dir: str | Path, formats: list[str], phy2log: torch.Tensor, log2phy: torch.Tensor,
                  logcnt: torch.Tensor, decoder: list[int], num_hidden_layers: int, num_gpus: int) -> dict[str, Path]:
    """Write every requested format into ``out_dir``; returns {format: path}. Shapes as in the writers.
    Every constraint is checked before the first file is written."""
    check_formats(formats)
    if "vllm-ascend" in formats:
        vllm_ascend_document(phy2log, num_gpus)
    out, written = Path(out_dir), {}
    for fmt in formats:
        path = out / FILENAMES[fmt]
        if fmt == "sglang":
            write_sglang(path, phy2log, decoder, num_hidden_layers, logcnt.shape[1])
        elif fmt == "vllm":
            write_vllm(path, phy2log)
        elif fmt == "vllm-ascend":
            write_vllm_ascend(path, phy2log, num_gpus)
        elif fmt == "trtllm":
            write_trtllm(path, phy2log, decoder)
        else:
            write_eplb(path, phy2log, log2phy, logcnt, decoder)
        written[fmt] = path
    return written


# ----------------------------------------------------------------------------- importers

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
        raise RQError(f"{path} is not a readable load dump ({type(err).__name__}: {first})") from None


def _tensor(value, path: Path, key: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value).to(torch.int64)
    except (TypeError, ValueError, RuntimeError):
        raise RQError(f"{path}: '{key}' is not a numeric array") from None


def _physical_to_logical(count: torch.Tensor, phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``count [..., L, P]`` physical loads -> ``[..., L, N]`` logical loads via ``phy2log [L, P]``."""
    index = phy2log.to(torch.int64).expand_as(count)
    out = torch.zeros(*count.shape[:-1], num_experts, dtype=torch.int64)
    return out.scatter_add_(-1, index, count.to(torch.int64))


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
            count = _tensor(obj["logical_count"], path, "logical_count")
            count = count.sum(0) if count.dim() == 3 else count
        elif isinstance(obj, dict) and "records" in obj and "last_physical_to_logical_map" in obj:
            phy2log = _tensor(obj["last_physical_to_logical_map"], path, "last_physical_to_logical_map")
            layers, num_phy = phy2log.shape
            physical = torch.zeros(layers, num_phy, dtype=torch.int64)
            for rec in obj["records"]:
                if "global_physical_count" in rec:
                    physical += _tensor(rec["global_physical_count"], path, "global_physical_count")
                elif "topk_ids_of_layer" in rec:
                    ids = _tensor(rec["topk_ids_of_layer"], path, "topk_ids_of_layer").reshape(layers, -1)
                    for li in range(layers):
                        valid = ids[li][ids[li] >= 0]
                        physical[li] += torch.bincount(valid, minlength=num_phy)[:num_phy]
            count = _physical_to_logical(physical, phy2log, int(phy2log.max()) + 1)
        else:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise RQError(f"{path} is not an SGLang expert-distribution dump (found {keys}; expected 'logical_count' "
                          f"or 'records' + 'last_physical_to_logical_map')")
        if count.dim() != 2:
            raise RQError(f"{path}: logical_count has shape {tuple(count.shape)}, expected [layers, experts]")
        total = count if total is None else _add(total, count, path)
    if total is None:
        raise RQError("no SGLang dump files given")
    return total


def _add(a: torch.Tensor, b: torch.Tensor, path: Path) -> torch.Tensor:
    if a.shape != b.shape:
        raise RQError(f"{path} has loads of shape {tuple(b.shape)}, earlier files {tuple(a.shape)}: not the same model")
    return a + b


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
        if isinstance(obj, torch.Tensor):
            obj = {"logical": obj}
        if not isinstance(obj, dict):
            raise RQError(f"{path} holds a {type(obj).__name__}, expected a tensor or a dict of EPLB state tensors")
        if "expert_load_window" in obj or "expert_load_pass" in obj:
            key = "expert_load_window" if "expert_load_window" in obj else "expert_load_pass"
            physical = _tensor(obj[key], path, key)
            physical = physical.sum(0) if physical.dim() == 3 else physical
            if "physical_to_logical_map" in obj:
                phy2log = _tensor(obj["physical_to_logical_map"], path, "physical_to_logical_map")
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
                raise RQError(f"{path} has keys {sorted(obj)}; expected expert_load_window + physical_to_logical_map, "
                              f"logical_expert_load_window or global_expert_load")
            count = _tensor(obj[key], path, key)
            count = count.sum(0) if count.dim() == 3 else count
        if count.dim() != 2 or count.shape[1] != num_experts:
            raise RQError(f"{path}: loads of shape {tuple(count.shape)}, expected [moe_layers, {num_experts}]")
        total = count if total is None else _add(total, count, path)
    if total is None:
        raise RQError("no vLLM dump files given")
    return total


def read_trtllm_loads(path: str | Path) -> dict[int, torch.Tensor]:
    """``{decoder layer: [N] int64}`` from a TensorRT-LLM expert statistic folder (``EXPERT_STATISTIC_PATH``):
    ``meta_info.json`` and ``rank*.safetensors`` with keys ``"<iteration>_<layer>"``, summed over
    iterations and ranks."""
    folder = Path(path)
    files = sorted(glob.glob(str(folder / "rank*.safetensors")))
    if not (folder / "meta_info.json").is_file() or not files:
        raise RQError(f"{folder} is not a TensorRT-LLM expert statistic folder (meta_info.json + rank*.safetensors)")
    out: dict[int, torch.Tensor] = {}
    for file in files:
        for key, value in _load_obj(Path(file)).items():
            match = re.fullmatch(r"(\d+)_(\d+)", key)
            if not match:
                raise RQError(f"{file}: key '{key}' is not '<iteration>_<layer>'")
            layer = int(match.group(2))
            out[layer] = out.get(layer, 0) + value.to(torch.int64).reshape(-1)
    return out


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


def import_loads(engine: str, inputs: list[str | Path], config: str | Path, group_size: int = 128) -> CalibrationStats:
    """Engine load dumps -> rq stats, for a model calibrated where it runs (``engine``: sglang, vllm, trtllm).

    SGLang rows are decoder layers (dense layers hold zeros) and are reduced to the MoE layers of the
    config; vLLM rows are MoE layers; TensorRT-LLM keys are decoder layers.
    """
    shape = model_shape(config)
    if engine == "sglang":
        loads = read_sglang_loads(inputs)
        if loads.shape[0] == shape.num_hidden_layers:
            loads = loads[list(shape.moe_layers)]
    elif engine == "vllm":
        loads = read_vllm_loads(inputs, shape.num_experts)
    elif engine == "trtllm":
        if len(inputs) != 1:
            raise RQError("TensorRT-LLM statistics are one folder (EXPERT_STATISTIC_PATH); pass exactly one")
        per_layer = read_trtllm_loads(inputs[0])
        missing = [d for d in shape.moe_layers if d not in per_layer]
        if missing:
            raise RQError(f"{inputs[0]} has no statistics for MoE layer(s) {missing[:5]}; record every layer")
        loads = torch.stack([per_layer[d] for d in shape.moe_layers])
    else:
        raise RQError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if loads.shape[-1] != shape.num_experts:
        raise RQError(f"the dump has {loads.shape[-1]} experts per layer, {config} says {shape.num_experts}")
    if float(loads.sum()) == 0:
        raise RQError("the dump holds no routed tokens; record while the server handles traffic")
    names = ", ".join(Path(p).name for p in inputs)
    return stats_from_loads(loads, shape, f"{engine} expert loads from {names}", group_size)
