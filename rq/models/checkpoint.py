"""The safetensors files of a local Hugging Face checkpoint, checked before anything is loaded from them.

A checkpoint of hundreds of GB is copied in shards, and a copy that stopped early leaves a file whose header
promises more bytes than it holds. Loading such a file fails deep inside safetensors (``incomplete metadata,
file not fully covered``) or, worse, after an hour of work on the shards before it. :func:`checkpoint_files`
opens every shard's header once (``safetensors.safe_open`` reads the header and checks that the data it
describes covers the file exactly; no tensor is read) and turns every problem into one line naming the file
and the fix: a missing or truncated shard, an index that names a file that is not there, or no weights at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from rq.errors import RQError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _index_files(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise RQError(f"{index_path} is not a readable safetensors index ({type(err).__name__}); "
                      f"copy it again from the original checkpoint") from None
    files = [index_path.parent / name for name in names]
    for path in files:
        if not path.is_file():
            raise RQError(f"{index_path.name} names {path.name}, which is not in {index_path.parent}; "
                          f"copy the missing shard from the original checkpoint")
    return files


def check_safetensors_file(path: Path) -> None:
    """Raise a one-line :class:`RQError` if ``path``'s header is unreadable or its data does not cover the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size if path.exists() else 0
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RQError(f"{path} is incomplete or not a safetensors file ({size:,} bytes; {detail}); "
                      f"copy it again from the original checkpoint") from None


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of ``model_dir`` (the index's shards, or the one ``model.safetensors``), each checked
    with :func:`check_safetensors_file`. A folder with neither (e.g. ``pytorch_model.bin`` only) returns ``[]``:
    Hugging Face's loader then says what it found."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        files = _index_files(index_path)
    elif (model_dir / SINGLE_NAME).is_file():
        files = [model_dir / SINGLE_NAME]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    for path in files:
        check_safetensors_file(path)
    return files
