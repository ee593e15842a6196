"""Engine file formats for expert placement (docs/spec.md §7), and the model shapes placement reads from config.json.

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

The model's Hugging Face ``config.json`` (:func:`model_shape`) gives placement and ``rq import-loads``
(:mod:`rq.placement.loads`) the layer count, MoE layers, shapes and router groups.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rq.atomic import atomic_path, atomic_write_text
from rq.documents import read_json
from rq.errors import RQError
from rq.models.adapters.base import activation_name
from rq.placement import FILENAMES, FORMATS
from rq.plan.schema import Plan

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
    raw = read_json(path, missing=f"{path} does not exist; pass --config with the model's Hugging Face config.json",
                    fix="pass the model's own config.json")
    if not isinstance(raw, dict):
        raise RQError(f"{path} is not a Hugging Face config (a JSON object); pass the model's own config.json")
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


def sglang_rows(phy2log: torch.Tensor, decoder: list[int], num_hidden_layers: int, num_experts: int) -> torch.Tensor:
    """SGLang's ``physical_to_logical_map [num_hidden_layers, P]``: the MoE layers' rows of ``phy2log [L, P]`` at
    their decoder index ``decoder [L]``, the trivial ``p % N`` in every other row."""
    num_phy = phy2log.shape[1]
    if max(decoder) >= num_hidden_layers:
        raise RQError(f"MoE layer at decoder index {max(decoder)} but the model has {num_hidden_layers} layers; "
                      f"pass --config with the model's config.json")
    rows = (torch.arange(num_phy) % num_experts).repeat(num_hidden_layers, 1)
    rows[torch.tensor(decoder)] = phy2log.to(torch.int64)
    return rows


def write_sglang(path: Path, phy2log: torch.Tensor, decoder: list[int], num_hidden_layers: int,
                 num_experts: int) -> None:
    """SGLang ``--init-expert-location`` JSON: ``physical_to_logical_map [num_hidden_layers, P]``
    (:func:`sglang_rows`)."""
    rows = sglang_rows(phy2log, decoder, num_hidden_layers, num_experts).tolist()
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
    tensors = {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt, "decoder_layer": torch.tensor(decoder)}
    with atomic_path(path) as tmp:
        save_file({k: v.to(torch.int64).contiguous() for k, v in tensors.items()}, str(tmp))


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
