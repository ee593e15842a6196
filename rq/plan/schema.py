"""The ``plan.json`` document (docs/spec.md §6), validated.

Pydantic models with ``extra="forbid"`` (:class:`rq.documents.Strict`) so a foreign or hand-mangled file is
refused with a message naming the field, and a ``format``/``version`` pair so future versions are refused, not
misread; reading follows :mod:`rq.documents`, whose model and calibration descriptions the plan shares with the
stats files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_serializer, model_validator

from rq.atomic import atomic_write_text
from rq.documents import CalibrationInfo, ModelInfo, Strict, check_format, read_json, validate

__all__ = ["load_plan", "save_plan"]

PLAN_VERSION = 1
MAX_REPLICAS = 63
"""Replicas per expert a plan may hold (64 copies): more never balances a layer (a copy per device of the
largest expert-parallel deployments) and would only multiply memory; hand-edited plans are refused above it."""


class QuantizationInfo(Strict):
    bits: Literal[4] = 4
    group_size: Literal[64, 128] = 128
    symmetric: Literal[True] = True
    scale_dtype: Literal["float16"] = "float16"


class BudgetInfo(Strict):
    reference_bytes: int  # every expert at original precision
    planned_bytes: int
    budget_factor: float

    @model_validator(mode="after")
    def _within(self) -> "BudgetInfo":
        if self.planned_bytes > self.budget_factor * self.reference_bytes:
            raise ValueError(f"planned_bytes {self.planned_bytes} exceed budget_factor x reference_bytes")
        return self


class ExpertPlan(Strict):
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


class LayerPlan(Strict):
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


class Plan(Strict):
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
    fix = "regenerate it with `rq plan`"
    raw = read_json(path, missing=f"plan file {path} does not exist; create one with `rq plan STATS_DIR --out {path}`",
                    fix=fix)
    check_format(raw, path, format="rq-plan", version=PLAN_VERSION, what="an rq plan", fix=fix)
    return validate(Plan, raw, path, fix)
