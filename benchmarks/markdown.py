"""Markdown for the benchmark reports: one table writer and one number format, so every table in
``RESULTS.md`` and every script's printout looks the same and prints a missing value the same way."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

MISSING = "n/a"


def fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    """``x`` with ``digits`` decimals and ``suffix``; ``n/a`` for None and NaN (a measurement that does not exist,
    e.g. the per-step LIS of a decode step with fewer assignments than copies)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return f"{x:.{digits}f}{suffix}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table. ``align``: one letter per column, ``l`` (default) or ``r`` for
    numbers; None writes plain ``---`` separators. Cells are ``str()``-ed as given: format numbers first."""
    if align is not None and len(align) != len(header):
        raise ValueError(f"align has {len(align)} letters for {len(header)} columns")
    rule = ["---" if align is None or a == "l" else "---:" for a in (align or "l" * len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
