"""Write outputs so that a failure never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def failed_dir(out_dir: str | Path) -> Path:
    """Where :func:`staged_dir` keeps a failed attempt at ``out_dir`` when asked to: ``<out_dir>.failed``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".failed")


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, keep_failed: bool = False) -> Iterator[Path]:
    """A temporary sibling folder that replaces ``out_dir`` when the block succeeds and is removed otherwise
    (``keep_failed``: moved to :func:`failed_dir` instead, for debugging). ``out_dir`` is never touched
    by a failure."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        if keep_failed:
            kept = failed_dir(out_dir)
            shutil.rmtree(kept, ignore_errors=True)
            os.replace(tmp, kept)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
