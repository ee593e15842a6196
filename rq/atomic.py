"""Write outputs so that a failure never leaves a half-written file or folder behind.

Every command that writes a folder (``rq-export``, ``rq triton``) checks it with :func:`check_out_dir` first
and assembles it with :func:`staged_dir`, so refusing an occupied folder and replacing it on ``--force`` read
the same everywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from rq.errors import RQError


def check_out_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse ``out_dir`` when it is a file, or a non-empty folder without ``force``.

    Called before any work starts, so a user who forgot ``--force`` learns it in a second, not after an
    export; :func:`staged_dir` then does the replacing. Raises :class:`RQError` naming the folder and the fix.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RQError(f"{out_dir} exists and is not a folder; pass another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise RQError(f"{out_dir} already exists and is not empty; pass --force to replace it or choose another --out")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path in ``path``'s folder for a writer that wants a file name (safetensors, matplotlib); it is
    renamed to ``path`` when the block succeeds (with the permissions a plain write would give: mkstemp
    makes 0600) and removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder, then rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text via a temp file in the same folder, then rename."""
    atomic_write_bytes(path, text.encode())


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
