"""A local safetensors checkpoint read one tensor at a time, through its index, never as a whole.

``model.safetensors.index.json`` (sharded) or a single ``model.safetensors`` says which file holds each
tensor; every file's header is read (and checked) when the checkpoint is opened, so a missing shard, a
truncated file or an index naming a file that is not there is a one-line :class:`~rq.errors.RQError` before
any work starts. Tensors are read from the files' memory maps: the pages read are file-backed (the kernel
drops them under pressure), only the copies rq makes count as process memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rq.errors import RQError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """Tensor names -> shard files of one checkpoint folder, with lazily opened readers."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._readers: dict[str, object] = {}
        self.weight_map = self._weight_map()
        for file in sorted(set(self.weight_map.values())):
            names = set(self._reader(file).keys())
            missing = [k for k, f in self.weight_map.items() if f == file and k not in names]
            if missing:
                raise RQError(f"{self.model_dir / file} lacks {missing[0]!r} that {INDEX} puts there (and "
                              f"{len(missing) - 1} more); the shard is from another checkpoint: copy it again")

    def _weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise RQError(f"{index} is not a safetensors index ({str(err).splitlines()[0]}); "
                              f"copy the checkpoint again") from None
            for file in sorted(set(weight_map.values())):
                if not (self.model_dir / file).is_file():
                    raise RQError(f"{index} names shard {file}, which is not in {self.model_dir}; "
                                  f"copy the missing shard next to the index")
            return dict(weight_map)
        single = self.model_dir / SINGLE
        if single.is_file():
            return {key: SINGLE for key in self._reader(SINGLE).keys()}
        raise RQError(f"{self.model_dir} has no {SINGLE} or {INDEX}; rq reads safetensors checkpoints "
                      f"(save the model with save_pretrained(safe_serialization=True))")

    def _reader(self, file: str):
        reader = self._readers.get(file)
        if reader is None:
            path = self.model_dir / file
            try:
                reader = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise RQError(f"{path} is truncated or not a safetensors file ({str(err).splitlines()[0]}); "
                              f"copy it again") from None
            self._readers[file] = reader
        return reader

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def tensor(self, key: str) -> torch.Tensor:
        """A fresh tensor with the stored bytes of ``key`` (a copy out of the file's memory map)."""
        try:
            return self._reader(self.weight_map[key]).get_tensor(key)
        except SafetensorError as err:
            raise RQError(f"cannot read {key!r} from {self.model_dir / self.weight_map[key]} "
                          f"({str(err).splitlines()[0]}); the file is damaged: copy it again") from None

    def dtype_of(self, key: str) -> torch.dtype | None:
        """The stored dtype of ``key`` (None for one torch has no name for)."""
        return _DTYPES.get(self._reader(self.weight_map[key]).get_slice(key).get_dtype())

    def nbytes(self, key: str) -> int:
        piece = self._reader(self.weight_map[key]).get_slice(key)
        dtype = _DTYPES.get(piece.get_dtype(), torch.uint8)
        return math.prod(piece.get_shape()) * dtype.itemsize

    def numel(self) -> int:
        """Elements of every stored tensor, read from the files' headers (no tensor is read)."""
        return sum(math.prod(self._reader(self.weight_map[key]).get_slice(key).get_shape()) for key in self.keys())


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
