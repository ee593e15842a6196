"""Rich progress bars for every pass over data, silent when disabled (tests, nested runs)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

console = Console(stderr=True, width=None if sys.stderr.isatty() else 130)


@contextmanager
def progress_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; a no-op when ``enabled`` is False."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextmanager
def layer_progress(label: str, total_bytes: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(nbytes)`` for a pass that reads a model layer by layer: bytes read, read rate, time left
    (``total_bytes`` None: unknown, no time left shown)."""
    if not enabled:
        yield lambda n=0: None
        return
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total_bytes)
        yield lambda n=0: progress.advance(task, n)
