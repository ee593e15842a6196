"""Calibration statistics (docs/spec.md §3) and their on-disk form: ``stats.json`` + ``stats.safetensors``.

Per MoE layer and logical expert, float64: ``load`` (integer-valued counts), ``gate_mass``,
``contribution``, ``quant_sensitivity``; plus the real byte sizes the planner budgets with.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from rq import __version__
from rq.atomic import staged_dir
from rq.errors import RQError
from rq.plan.schema import STATS_VERSION, CalibrationInfo, ModelInfo, StatsMeta

METRICS = ("load", "gate_mass", "contribution", "quant_sensitivity")
IMPORTANCE_METRICS = ("frequency", "gate_mass", "contribution", "quant_sensitivity")


@dataclass
class LayerStats:
    index: int
    path: str
    num_experts: int
    top_k: int
    activation: str
    w_in_shape: tuple[int, int]
    w_out_shape: tuple[int, int]
    original_bytes: list[int]  # per expert, from the real tensors
    quantizable: bool  # both weight shapes divisible by the group size
    load: torch.Tensor = field(repr=False)  # [N] float64
    gate_mass: torch.Tensor = field(repr=False)
    contribution: torch.Tensor = field(repr=False)
    quant_sensitivity: torch.Tensor = field(repr=False)

    def importance(self, metric: str) -> torch.Tensor:
        """``[N]`` float64 importance by ``metric`` (``frequency`` is the load)."""
        if metric not in IMPORTANCE_METRICS:
            raise RQError(f"unknown importance metric '{metric}'; choose one of {', '.join(IMPORTANCE_METRICS)}")
        return self.load if metric == "frequency" else getattr(self, metric)


@dataclass
class CalibrationStats:
    model: ModelInfo
    calibration: CalibrationInfo
    group_size: int
    layers: list[LayerStats]

    def save(self, out_dir: str | Path) -> None:
        """Write both files into a temp folder that then replaces ``out_dir``: no partial output on failure."""
        out_dir = Path(out_dir)
        meta = StatsMeta(
            version=STATS_VERSION, tool_version=__version__, created=dt.datetime.now(dt.timezone.utc).isoformat(),
            model=self.model, calibration=self.calibration, group_size=self.group_size,
            layers=[{"index": s.index, "path": s.path, "num_experts": s.num_experts, "top_k": s.top_k,
                     "activation": s.activation, "w_in_shape": list(s.w_in_shape),
                     "w_out_shape": list(s.w_out_shape), "original_bytes": s.original_bytes,
                     "quantizable": s.quantizable} for s in self.layers],
        )
        tensors = {f"layer{s.index}.{m}": getattr(s, m).to(torch.float64).contiguous()
                   for s in self.layers for m in METRICS}
        with staged_dir(out_dir) as tmp:
            (tmp / "stats.json").write_text(meta.model_dump_json(indent=2) + "\n")
            save_file(tensors, str(tmp / "stats.safetensors"))

    @staticmethod
    def load(stats_dir: str | Path) -> "CalibrationStats":
        stats_dir = Path(stats_dir)
        meta_path, tensor_path = stats_dir / "stats.json", stats_dir / "stats.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise RQError(f"{stats_dir} has no stats.json/stats.safetensors; create it with "
                          f"`rq calibrate MODEL_DIR --data FILE --out {stats_dir}`")
        try:
            raw = json.loads(meta_path.read_text())
            if raw.get("format") != "rq-stats" or raw.get("version") != STATS_VERSION:
                raise RQError(f"{meta_path} is not rq stats version {STATS_VERSION}; rerun `rq calibrate`")
            meta = StatsMeta.model_validate(raw)
            tensors = load_file(str(tensor_path))
        except (json.JSONDecodeError, ValidationError, OSError) as err:
            raise RQError(f"{stats_dir} holds unreadable stats ({str(err).splitlines()[0]}); rerun `rq calibrate`") from None
        layers = []
        for entry in meta.layers:
            i = int(entry["index"])
            try:
                metrics = {m: tensors[f"layer{i}.{m}"] for m in METRICS}
            except KeyError as err:
                raise RQError(f"{tensor_path} lacks {err}; rerun `rq calibrate`") from None
            layers.append(LayerStats(
                index=i, path=str(entry["path"]), num_experts=int(entry["num_experts"]), top_k=int(entry["top_k"]),
                activation=str(entry["activation"]), w_in_shape=tuple(entry["w_in_shape"]),
                w_out_shape=tuple(entry["w_out_shape"]), original_bytes=list(entry["original_bytes"]),
                quantizable=bool(entry["quantizable"]), **metrics))
        return CalibrationStats(meta.model, meta.calibration, meta.group_size, layers)
