"""Versioned JSON documents that rq writes and reads back, and the parts they share.

Every stage hands the next one a document: ``stats.json`` (calibration), ``plan.json`` (plan), the export's
``manifest.json``, the Triton repository's ``rq_repository.json``, ``placement.json``. Each carries a
``format``/``version`` pair, so a foreign file or one from another rq version is refused rather than misread,
and the pydantic ones forbid unknown fields (:class:`Strict`), so a hand-mangled file is refused with a message
naming the field (:func:`first_error`). Reading one is always the same three steps, written once here:
:func:`read_json` (the file exists and is JSON), :func:`check_format` (the ``format``/``version`` pair), then
validation. The description of the model and of the calibration data (:class:`ModelInfo`,
:class:`CalibrationInfo`) is shared by stats and plans, so it lives here too, below every stage.

``rq.export.runtime.load_manifest`` is the one reader that does not use this module: the runtime is copied
standalone into Triton model repositories and imports only numpy and onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rq.errors import RQError

PositiveInt = Annotated[int, Field(ge=1)]


class Strict(BaseModel):
    """A document part that refuses unknown fields and cannot be changed once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(Strict):
    architecture: str  # Hugging Face model_type
    num_moe_layers: PositiveInt
    num_experts: PositiveInt
    top_k: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    dtype: str  # dtype of the original expert weights
    fingerprint: str  # sha256 over config and router weights


class CalibrationInfo(Strict):
    data: str  # description of the calibration data (paths, sizes)
    sequences: int = Field(ge=0)
    seq_len: int = Field(ge=0)
    tokens: int = Field(ge=0)
    seed: int


def first_error(err: ValidationError) -> str:
    """``at 'layers.0.experts.3.replicas': <message>`` of a pydantic error: one line naming the field."""
    first = err.errors()[0]
    where = ".".join(_one_line(str(p)) for p in first["loc"])  # a hand-edited key may hold a newline
    message = _one_line(first["msg"])
    return f"at '{where}': {message}" if where else f"({message})"


def _one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``), so an error stays one line whatever a file holds."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def read_json(path: str | Path, *, missing: str, fix: str) -> Any:
    """The JSON value in ``path``. ``missing``: the whole message when the file is not there; ``fix``: what to do
    when it is not readable JSON. Both failures are one-line :class:`RQError`."""
    path = Path(path)
    if not path.is_file():
        raise RQError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise RQError(f"{path} is not valid JSON ({str(err).splitlines()[0]}); {fix}") from None


def check_format(raw: Any, path: str | Path, *, format: str, version: int, what: str, fix: str) -> dict:
    """``raw`` as a ``format`` document of ``version``, else a one-line :class:`RQError` saying which it is not
    (``what``: how a user calls it, e.g. "an rq plan")."""
    if not isinstance(raw, dict) or raw.get("format") != format:
        raise RQError(f"{path} is not {what} (format is not '{format}'); {fix}")
    if raw.get("version") != version:
        raise RQError(f"{path} has {what.split()[-1]} version {raw.get('version')!r}, this rq reads version "
                      f"{version}; {fix}")
    return raw


def validate(model: type[BaseModel], raw: dict, path: str | Path, fix: str) -> Any:
    """``model.model_validate(raw)``, a validation failure as one line naming the field."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise RQError(f"{path} is malformed {first_error(err)}; {fix}") from None
