"""Versioned, validated documents: ``plan.json`` (docs/spec.md §6) and the model and calibration descriptions
it shares with the stats files (:mod:`rq.calibrate.stats`).

Pydantic models with ``extra="forbid"`` so a foreign or hand-mangled file is refused with a message
naming the field, and a ``format``/``version`` pair so future versions are refused, not misread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from rq.atomic import atomic_write_text
from rq.errors import RQError

__all__ = ["atomic_write_text", "load_plan", "save_plan"]

PLAN_VERSION = 1
STATS_VERSION = 1
MAX_REPLICAS = 63
"""Replicas per expert a plan may hold (64 copies): more never balances a layer (a copy per device of the
largest expert-parallel deployments) and would only multiply memory; hand-edited plans are refused above it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(ge=1)]


class ModelInfo(_Strict):
    architecture: str  # Hugging Face model_type
    num_moe_layers: PositiveInt
    num_experts: PositiveInt
    top_k: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    dtype: str  # dtype of the original expert weights
    fingerprint: str  # sha256 over config and router weights


class CalibrationInfo(_Strict):
    data: str  # description of the calibration data (paths, sizes)
    sequences: int = Field(ge=0)
    seq_len: int = Field(ge=0)
    tokens: int = Field(ge=0)
    seed: int


class QuantizationInfo(_Strict):
    bits: Literal[4] = 4
    group_size: Literal[64, 128] = 128
    symmetric: Literal[True] = True
    scale_dtype: Literal["float16"] = "float16"


class BudgetInfo(_Strict):
    reference_bytes: int  # every expert at original precision
    planned_bytes: int
    budget_factor: float

    @model_validator(mode="after")
    def _within(self) -> "BudgetInfo":
        if self.planned_bytes > self.budget_factor * self.reference_bytes:
            raise ValueError(f"planned_bytes {self.planned_bytes} exceed budget_factor x reference_bytes")
        return self


class ExpertPlan(_Strict):
    expert: int
    load_share: float
    importance: float
    precision: Literal["original", "int4", "int8"]  # of the primary copy
    replicas: int = Field(ge=0, le=MAX_REPLICAS)
    int8_replicas: int = Field(0, ge=0, le=MAX_REPLICAS)  # how many replicas are INT8; the others are INT4

    @model_validator(mode="after")
    def _replicas(self) -> "ExpertPlan":
        if self.int8_replicas > self.replicas:
            raise ValueError(f"expert {self.expert}: int8_replicas {self.int8_replicas} exceed replicas {self.replicas}")
        return self

    @model_serializer(mode="wrap")
    def _plain_when_int4_only(self, handler):
        """``int8_replicas`` is written only when non-zero: an INT4-only plan reads as before the INT8 class."""
        data = handler(self)
        if not self.int8_replicas:
            data.pop("int8_replicas", None)
        return data

    @property
    def copy_precisions(self) -> list[int]:
        """docs/spec.md §6 physical order: the primary, its INT8 replicas, its INT4 replicas (codes of §8)."""
        primary = {"original": 0, "int4": 1, "int8": 2}[self.precision]
        return [primary] + [2] * self.int8_replicas + [1] * (self.replicas - self.int8_replicas)


class LayerPlan(_Strict):
    layer: int
    module: str
    experts: list[ExpertPlan]
    lis_before: float | None  # None where the layer had no calibration load
    lis_after: float | None
    planned_bytes: int
    warnings: list[str] = []
    predicted_error: float | None = None  # docs/spec.md §6: mean squared output error per assignment from quantization

    @model_validator(mode="after")
    def _ordered(self) -> "LayerPlan":
        if [e.expert for e in self.experts] != list(range(len(self.experts))):
            raise ValueError(f"layer {self.layer}: experts must be listed 0..N-1 in order")
        return self

    @property
    def logcnt(self) -> list[int]:
        return [1 + e.replicas for e in self.experts]

    @property
    def precision(self) -> list[int]:
        """Per physical copy, logical-major: 0 original, 1 INT4, 2 INT8 (docs/spec.md §6, §8)."""
        return [p for e in self.experts for p in e.copy_precisions]


class Plan(_Strict):
    format: Literal["rq-plan"] = "rq-plan"
    version: int
    tool_version: str
    created: str
    model: ModelInfo
    calibration: CalibrationInfo
    quantization: QuantizationInfo
    importance_metric: str
    budget: BudgetInfo
    options: dict[str, float | int | str]
    layers: list[LayerPlan]

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        if len(self.layers) != self.model.num_moe_layers:
            raise ValueError(f"{len(self.layers)} layers listed, model has {self.model.num_moe_layers}")
        for layer in self.layers:
            if len(layer.experts) != self.model.num_experts:
                raise ValueError(f"layer {layer.layer} lists {len(layer.experts)} experts, the model has "
                                 f"{self.model.num_experts}")
        cap = self.options.get("max_replicas")
        if isinstance(cap, int):
            over = [(l.layer, e.expert, e.replicas) for l in self.layers for e in l.experts if e.replicas > cap]
            if over:
                raise ValueError(f"layer {over[0][0]} expert {over[0][1]} has {over[0][2]} replicas, more than the "
                                 f"plan's max_replicas {cap}")
        if sum(layer.planned_bytes for layer in self.layers) != self.budget.planned_bytes:
            raise ValueError("budget.planned_bytes is not the sum of the layers' planned_bytes")
        return self


def save_plan(plan: Plan, path: Path) -> None:
    atomic_write_text(path, plan.model_dump_json(indent=2) + "\n")


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan; every failure is a one-line :class:`RQError` naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise RQError(f"plan file {path} does not exist; create one with `rq plan STATS_DIR --out {path}`")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RQError(f"{path} is not valid JSON ({err}); regenerate it with `rq plan`") from None
    if not isinstance(raw, dict) or raw.get("format") != "rq-plan":
        raise RQError(f"{path} is not an rq plan (format is not 'rq-plan'); regenerate it with `rq plan`")
    if raw.get("version") != PLAN_VERSION:
        raise RQError(f"{path} has plan version {raw.get('version')!r}, this rq reads version {PLAN_VERSION}; "
                      f"regenerate it with this rq's `rq plan`")
    try:
        return Plan.model_validate(raw)
    except ValidationError as err:
        raise RQError(f"{path} is malformed {first_error(err)}; regenerate it with `rq plan`") from None


def first_error(err: ValidationError) -> str:
    """``at 'layers.0.experts.3.replicas': <message>`` of a pydantic error: one line naming the field."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"at '{where}': {first['msg']}" if where else f"({first['msg']})"
