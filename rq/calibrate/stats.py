"""Calibration statistics (docs/spec.md §3) and their on-disk form: ``stats.json`` + ``stats.safetensors``.

Per MoE layer and logical expert, float64: ``load`` (integer-valued counts), ``gate_mass``,
``contribution``, ``quant_sensitivity`` (INT4) and ``quant_sensitivity_int8``; plus the real byte sizes the
planner budgets with. Stats written before the INT8 metric existed load with it missing (``None``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rq import __version__
from rq.atomic import staged_dir
from rq.core.experts import ACTIVATIONS
from rq.errors import RQError
from rq.documents import CalibrationInfo, ModelInfo, PositiveInt, Strict, check_format, read_json, validate

METRICS = ("load", "gate_mass", "contribution", "quant_sensitivity")
OPTIONAL_METRICS = ("quant_sensitivity_int8",)
"""Metrics a stats file may lack (written before they existed); a planner that needs one says so."""
WINDOWS = "load_windows"
"""Optional ``[W, N]`` loads of separate traffic windows (docs/spec.md §3): chunks of the calibration text and of
the model's own generations; the hedged planner (§6) plans for the worst of them."""
IMPORTANCE_METRICS = ("frequency", "gate_mass", "contribution", "quant_sensitivity")


STATS_VERSION = 1
RECALIBRATE = "rerun `rq calibrate`"
Shape = tuple[PositiveInt, PositiveInt]


class StatsLayerMeta(Strict):
    """One MoE layer's entry in ``stats.json`` (its metrics are in ``stats.safetensors``)."""

    index: Annotated[int, Field(ge=0)]
    path: str
    num_experts: PositiveInt
    top_k: PositiveInt
    activation: Literal[ACTIVATIONS]
    w_in_shape: Shape
    w_out_shape: Shape
    original_bytes: list[PositiveInt]
    quantizable: bool

    @model_validator(mode="after")
    def _consistent(self) -> "StatsLayerMeta":
        if len(self.original_bytes) != self.num_experts:
            raise ValueError(f"original_bytes lists {len(self.original_bytes)} experts, num_experts is {self.num_experts}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        return self


class WindowsInfo(Strict):
    """How the traffic windows of ``load_windows`` were cut (docs/spec.md §3)."""

    teacher_forced: Annotated[int, Field(ge=0)]  # windows of calibration text, teacher-forced
    sequences_per_window: PositiveInt
    generated: Annotated[int, Field(ge=0)] = 0  # windows of the model's own greedy generations
    generated_tokens: Annotated[int, Field(ge=0)] = 0  # new tokens per sequence
    generated_sequences_per_window: Annotated[int, Field(ge=0)] = 0
    prompt_len: Annotated[int, Field(ge=0)] = 0


class StatsMeta(Strict):
    """``stats.json``: what was calibrated, on which data, and the layers' shapes and byte sizes."""

    format: Literal["rq-stats"] = "rq-stats"
    version: int
    tool_version: str
    created: str
    model: ModelInfo
    calibration: CalibrationInfo
    group_size: Literal[64, 128]
    layers: list[StatsLayerMeta]
    windows: WindowsInfo | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "StatsMeta":
        if [layer.index for layer in self.layers] != list(range(self.model.num_moe_layers)):
            raise ValueError(f"layers must be listed 0..{self.model.num_moe_layers - 1} in order")
        if any(layer.num_experts != self.model.num_experts for layer in self.layers):
            raise ValueError(f"every layer must have the model's {self.model.num_experts} experts")
        return self


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
    quant_sensitivity_int8: torch.Tensor | None = field(default=None, repr=False)
    load_windows: torch.Tensor | None = field(default=None, repr=False)  # [W, N] float64, or None

    def sensitivity(self, precision: str) -> torch.Tensor | None:
        """``[N]`` float64 output error of each expert at ``precision`` (``int4``, ``int8``; ``None`` if not measured)."""
        return {"int4": self.quant_sensitivity, "int8": self.quant_sensitivity_int8}[precision]

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
    windows: WindowsInfo | None = None

    def save(self, out_dir: str | Path) -> None:
        """Write both files into a temp folder that then replaces ``out_dir``: no partial output on failure."""
        out_dir = Path(out_dir)
        meta = StatsMeta(
            version=STATS_VERSION, tool_version=__version__, created=dt.datetime.now(dt.timezone.utc).isoformat(),
            model=self.model, calibration=self.calibration, group_size=self.group_size,
            layers=[StatsLayerMeta(index=s.index, path=s.path, num_experts=s.num_experts, top_k=s.top_k,
                                   activation=s.activation, w_in_shape=s.w_in_shape, w_out_shape=s.w_out_shape,
                                   original_bytes=s.original_bytes, quantizable=s.quantizable) for s in self.layers],
            windows=self.windows,
        )
        tensors = {f"layer{s.index}.{m}": getattr(s, m).to(torch.float64).contiguous()
                   for s in self.layers for m in METRICS + OPTIONAL_METRICS + (WINDOWS,) if getattr(s, m) is not None}
        with staged_dir(out_dir) as tmp:
            (tmp / "stats.json").write_text(meta.model_dump_json(indent=2) + "\n")
            save_file(tensors, str(tmp / "stats.safetensors"))

    @staticmethod
    def load(stats_dir: str | Path) -> "CalibrationStats":
        """Read and validate both files; every failure is a one-line :class:`RQError` naming the field."""
        stats_dir = Path(stats_dir)
        meta_path, tensor_path = stats_dir / "stats.json", stats_dir / "stats.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise RQError(f"{stats_dir} has no stats.json/stats.safetensors; create it with "
                          f"`rq calibrate MODEL_DIR --data FILE --out {stats_dir}`")
        raw = read_json(meta_path, missing="", fix=RECALIBRATE)
        check_format(raw, meta_path, format="rq-stats", version=STATS_VERSION, what="rq stats", fix=RECALIBRATE)
        meta = validate(StatsMeta, raw, meta_path, RECALIBRATE)
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise RQError(f"{tensor_path} is not readable ({str(err).splitlines()[0]}); {RECALIBRATE}") from None
        layers = [LayerStats(index=e.index, path=e.path, num_experts=e.num_experts, top_k=e.top_k,
                             activation=e.activation, w_in_shape=e.w_in_shape, w_out_shape=e.w_out_shape,
                             original_bytes=e.original_bytes, quantizable=e.quantizable,
                             **_layer_metrics(tensors, e, tensor_path)) for e in meta.layers]
        return CalibrationStats(meta.model, meta.calibration, meta.group_size, layers, meta.windows)


def _layer_metrics(tensors: dict[str, torch.Tensor], entry: StatsLayerMeta, path: Path) -> dict[str, torch.Tensor]:
    """The ``[N]`` float64 metrics of one layer, checked: present (optional ones may be missing), shaped, finite
    and non-negative."""
    metrics = {}
    for metric in METRICS + OPTIONAL_METRICS:
        key = f"layer{entry.index}.{metric}"
        value = tensors.get(key)
        if value is None and metric in OPTIONAL_METRICS:
            continue
        if value is None:
            raise RQError(f"{path} lacks '{key}'; {RECALIBRATE}")
        if tuple(value.shape) != (entry.num_experts,) or not value.is_floating_point():
            raise RQError(f"{path}: '{key}' must be a float [{entry.num_experts}] vector, got {value.dtype} "
                          f"{list(value.shape)}; {RECALIBRATE}")
        value = value.to(torch.float64)
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise RQError(f"{path}: '{key}' holds negative or non-finite values; {RECALIBRATE}")
        metrics[metric] = value
    if not bool((metrics["load"] == metrics["load"].round()).all()):
        raise RQError(f"{path}: 'layer{entry.index}.load' must hold whole assignment counts; {RECALIBRATE}")
    windows = tensors.get(f"layer{entry.index}.{WINDOWS}")
    if windows is not None:
        key = f"layer{entry.index}.{WINDOWS}"
        if windows.dim() != 2 or windows.shape[1] != entry.num_experts or not windows.is_floating_point():
            raise RQError(f"{path}: '{key}' must be a float [W, {entry.num_experts}] matrix, got {windows.dtype} "
                          f"{list(windows.shape)}; {RECALIBRATE}")
        windows = windows.to(torch.float64)
        if not bool(torch.isfinite(windows).all()) or bool((windows < 0).any()) or \
                not bool((windows == windows.round()).all()):
            raise RQError(f"{path}: '{key}' must hold whole, non-negative assignment counts; {RECALIBRATE}")
        metrics[WINDOWS] = windows
    return metrics
