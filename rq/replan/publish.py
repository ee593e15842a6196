"""Publish a new export into a serving Triton model repository as the next model version, and roll it back.

A repository written by ``rq tritonserver`` keeps the export of version N in ``rq_onnx/N`` and the Python models
read the export of their own version (``rq_build_dir = rq_onnx/{version}``). :func:`publish_version` writes every
model's version N+1 whole in a temporary repository next to the served one (same file system: the export's files
are hard links), checks that no ``config.pbtxt`` changes, then renames each version folder into place (one atomic
rename per model, the export first, ``generate`` last), so a server never sees part of a version.
:func:`load_models` then asks the server to load them through Triton's repository API (``--model-control-mode
explicit``); with the default ``version_policy`` (latest) Triton loads N+1 beside N, sends new requests to N+1
once it is ready and unloads N when N's requests in flight have finished. A server polling its repository
(``--model-control-mode poll``) picks the new versions up by itself.

:func:`rollback` moves the latest version of every model aside (``rolled_back_N``, a name Triton ignores) and
loads again: the previous version serves.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path

from rq.atomic import atomic_write_text
from rq.engines.tritonserver import (GENERATE, REPOSITORY_INFO, ServingOptions, VERSION_FIELD, repository_info,
                                     write_model_repository)
from rq.errors import RQError

ROLLED_BACK = "rolled_back_"


def _versions(model_dir: Path) -> list[int]:
    """Numeric version folders of one model, as Triton counts them (no leading zeros)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0")


def _repo_models(repo: Path, info: dict) -> list[str]:
    """The repository's models in the order a version is published and loaded: the export's home (ONNX) models
    first, ``generate`` last, so whatever reads an export finds it."""
    first = list(info["onnx_models"]) + list(info.get("forward_models", []))
    return first + [m for m in info["models"] if m not in first and m != GENERATE] + [GENERATE]


def served_version(repo: str | Path) -> int:
    """The newest version of ``generate`` in ``repo``: what a server with the default version policy serves."""
    versions = _versions(Path(repo) / GENERATE)
    if not versions:
        raise RQError(f"{repo}/{GENERATE} has no version folder; write the repository with `rq tritonserver`")
    return versions[-1]


def home_model(info: dict) -> str:
    """The model whose version folders hold the exports (``rq_onnx``)."""
    return info.get("home_model") or str(info["rq_build_dir"]).split("/")[0]


def version_build(repo: str | Path, version: int) -> Path:
    """The export folder version ``version`` of the repository's models serve."""
    repo = Path(repo)
    return repo / home_model(repository_info(repo)) / str(version)


def _versioned_config(text: str, home: str) -> str:
    """A config written before versioned exports names ``<home>/1``; the same config with ``{version}``."""
    return text.replace(f'string_value: "{home}/1"', f'string_value: "{home}/{VERSION_FIELD}"')


def _check_configs(repo: Path, staged: Path, models: list[str], home: str) -> dict[str, str]:
    """Configs that must be rewritten (older repositories: ``{version}``); refuses any other change."""
    rewrite = {}
    for model in models:
        old = (repo / model / "config.pbtxt").read_text()
        new = (staged / model / "config.pbtxt").read_text()
        if old == new:
            continue
        if _versioned_config(old, home) != new:
            raise RQError(f"the new export changes {model}/config.pbtxt (its inputs, outputs or options), which a "
                          f"running model cannot take as a new version; write a new repository with "
                          f"`rq tritonserver BUILD --out NEW_REPO` and restart the server on it")
        rewrite[model] = new
    return rewrite


def publish_version(repo: str | Path, build_dir: str | Path, note: dict | None = None) -> int:
    """Write ``build_dir`` (an ``rq-export`` folder) into ``repo`` as the next version of every model; returns it.

    ``note``: what to record about the version in ``rq_repository.json`` (``versions``), e.g. the LIS it was
    published for. Nothing in ``repo`` changes on a failure before the renames.
    """
    repo = Path(repo)
    info = repository_info(repo)
    if info.get("tensorrt_model"):
        raise RQError(f"{repo} also serves a TensorRT engine, which a new plan needs rebuilt (`rq build`); publish "
                      f"by writing a new repository with `rq tritonserver BUILD --engine ENGINE --out NEW_REPO`")
    options = ServingOptions(**{**info["options"]})
    models = _repo_models(repo, info)
    version = max(max(_versions(repo / m), default=0) for m in models) + 1
    home = home_model(info)
    staging = Path(tempfile.mkdtemp(dir=repo.parent, prefix=f".{repo.name}.v{version}-"))
    try:
        staged = write_model_repository(build_dir, staging / "repo", options)
        staged_models = sorted(p.parent.name for p in staged.glob("*/config.pbtxt"))
        if staged_models != sorted(models):
            raise RQError(f"the new export makes models {staged_models}, {repo} serves {sorted(models)}: not the same "
                          f"model; write a new repository with `rq tritonserver`")
        for model, text in _check_configs(repo, staged, models, home).items():
            atomic_write_text(repo / model / "config.pbtxt", text)  # {version}: version 1 still reads rq_onnx/1
        for model in models:
            if (staged / model / "1").is_dir():
                os.replace(staged / model / "1", repo / model / str(version))
        document = json.loads((repo / REPOSITORY_INFO).read_text())
        document.setdefault("versions", {})[str(version)] = {
            "build_dir": str(Path(build_dir).resolve()), "plan": json.loads((staged / REPOSITORY_INFO).read_text())["plan"],
            "published": dt.datetime.now(dt.timezone.utc).isoformat(), **(note or {})}
        atomic_write_text(repo / REPOSITORY_INFO, json.dumps(document, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version


def rollback(repo: str | Path) -> tuple[int, int]:
    """Move the newest version of every model aside so the previous one is the newest; returns ``(from, to)``."""
    repo = Path(repo)
    info = repository_info(repo)
    models = _repo_models(repo, info)
    latest = served_version(repo)
    previous = [v for v in _versions(repo / GENERATE) if v < latest]
    if not previous:
        raise RQError(f"{repo} has only version {latest} of {GENERATE}: nothing to roll back to")
    target = previous[-1]
    missing = [m for m in models if (repo / m / str(latest)).is_dir() and not (repo / m / str(target)).is_dir()]
    if missing:
        raise RQError(f"{', '.join(missing)} has no version {target} in {repo}; cannot roll back")
    for model in reversed(models):  # generate first: nothing serves the newest version's export after it
        if (repo / model / str(latest)).is_dir():
            aside = repo / model / f"{ROLLED_BACK}{latest}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(repo / model / str(latest), aside)
    return latest, target


def load_models(http_url: str, repo: str | Path, version: int, timeout: float = 600.0) -> list[str]:
    """Ask the server at ``http_url`` (host:port of its HTTP endpoint) to load the repository's models it serves,
    in publishing order, and wait until ``generate`` serves ``version``; returns the models loaded.

    Raises :class:`RQError` naming the fix when the server does not allow explicit model control."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    info = repository_info(repo)
    client = httpclient.InferenceServerClient(http_url, connection_timeout=timeout, network_timeout=timeout)
    try:
        try:
            loaded = {m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"}
        except InferenceServerException as err:
            raise RQError(f"cannot reach the server at {http_url} ({err.message()}); pass its HTTP host:port "
                          f"with --server") from None
        models = [m for m in _repo_models(Path(repo), info) if m in loaded] or [GENERATE]
        for model in models:
            try:
                client.load_model(model)
            except InferenceServerException as err:
                raise RQError(f"the server refused to load {model} ({err.message()}); start tritonserver with "
                              f"--model-control-mode=explicit (or poll, which loads new versions by itself)") from None
        if not client.is_model_ready(GENERATE, str(version)):
            raise RQError(f"{GENERATE} version {version} is not ready after loading; see the server's log")
        return models
    finally:
        client.close()
