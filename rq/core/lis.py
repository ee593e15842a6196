"""Load-Imbalance Score (docs/spec.md §2). Pure functions over load tensors.

``LIS = max_u L_u / (S / U)``; a layer with no load has no LIS and is returned as NaN (reports print it
as "n/a", never as 0 or 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lis(loads: torch.Tensor) -> torch.Tensor:
    """LIS over the last dimension: ``loads [..., U]`` -> ``[...]`` float64, NaN where the total is 0."""
    loads = loads.to(torch.float64)
    total = loads.sum(-1)
    units = loads.shape[-1]
    value = loads.amax(-1) * units / total
    return torch.where(total > 0, value, torch.full_like(value, math.nan))


def lis_value(loads: torch.Tensor) -> float:
    """LIS of one layer's ``[U]`` loads as a Python float (NaN when empty)."""
    return float(lis(loads))


@dataclass(frozen=True)
class InstantSummary:
    """Instantaneous LIS over calls (batches or decode steps): mean, p95, max, and how many calls
    could not be balanced at all (``T*K < U``: fewer assignments than units), which are reported apart."""

    mean: float
    p95: float
    max: float
    calls: int
    unbalanceable: int

    @staticmethod
    def of(per_call_loads: torch.Tensor) -> "InstantSummary":
        """per_call_loads: ``[calls, U]``. Calls with fewer assignments than units are excluded from the
        statistics and counted in ``unbalanceable``; empty calls are ignored."""
        totals = per_call_loads.sum(-1)
        units = per_call_loads.shape[-1]
        balanceable = totals >= units
        values = lis(per_call_loads[balanceable])
        values = values[~torch.isnan(values)]
        unbalanceable = int(((totals > 0) & ~balanceable).sum())
        if values.numel() == 0:
            return InstantSummary(math.nan, math.nan, math.nan, int(per_call_loads.shape[0]), unbalanceable)
        return InstantSummary(
            mean=float(values.mean()),
            p95=float(torch.quantile(values, 0.95)),
            max=float(values.max()),
            calls=int(per_call_loads.shape[0]),
            unbalanceable=unbalanceable,
        )


def model_lis(per_layer: list[float]) -> tuple[float, float]:
    """Model LIS = mean over layers with a defined LIS, and the worst layer's LIS (docs/spec.md §2)."""
    defined = [v for v in per_layer if not math.isnan(v)]
    if not defined:
        return math.nan, math.nan
    return sum(defined) / len(defined), max(defined)


def fmt(value: float, digits: int = 2) -> str:
    """Human-readable LIS: NaN prints as n/a."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
