"""Write outputs so that a failure never leaves a half-written file or folder behind.

Every command that writes a folder (``rq calibrate``, ``rq-export``, ``rq tritonserver``, ``rq place``, ...) checks it
with :func:`check_out_dir` before any work and assembles it with :func:`staged_dir`; a command that writes a file
checks it with :func:`check_out_file` and writes it with :func:`atomic_path`. So refusing a file where a folder
is asked for (and the other way round), refusing an occupied folder and replacing it on ``--force`` read the
same everywhere, and both writers check again, so no command ends in a traceback over its ``--out``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from rq.errors import RQError


def _check_parent(path: Path) -> None:
    """Refuse a path below an existing file (``--out notes.txt/stats``): no folder can be made there."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RQError(f"cannot write {path}: {parent} is a file, not a folder; pass another --out")
            return


def check_out_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse ``out_dir`` when it is a file (or lies below one), or a non-empty folder without ``force``.

    Called before any work starts, so a user who forgot ``--force`` learns it in a second, not after an
    export; :func:`staged_dir` then does the replacing. Raises :class:`RQError` naming the folder and the fix.
    Commands that always replace their folder (``rq calibrate``) pass ``force=True``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RQError(f"--out {out_dir} is an existing file, and this command writes a folder there; "
                      f"pass a folder path (new or existing) as --out")
    _check_parent(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise RQError(f"{out_dir} already exists and is not empty; pass --force to replace it or choose another --out")


def check_out_file(path: str | Path) -> None:
    """Refuse a file output ``path`` that is an existing folder (or lies below a file), before any work starts."""
    path = Path(path)
    if path.is_dir():
        raise RQError(f"--out {path} is an existing folder, and this command writes a file there; "
                      f"pass a file path such as {path / 'out.json'}")
    _check_parent(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path in ``path``'s folder for a writer that wants a file name (safetensors, matplotlib); it is
    renamed to ``path`` when the block succeeds (with the permissions a plain write would give: mkstemp
    makes 0600) and removed otherwise."""
    path = Path(path)
    check_out_file(path)
    made = _make_parents(path)
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
        _remove_empty(made)
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
    check_out_dir(out_dir, force=True)
    made = _make_parents(out_dir)
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
            _remove_empty(made)
        raise


def _make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders; return them, deepest first, so a failure can take them back."""
    missing = [parent for parent in path.parents if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders :func:`_make_parents` made, deepest first, as long as nothing else was put in them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
