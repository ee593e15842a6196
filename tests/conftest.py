"""Shared fixtures: tiny random checkpoints of every supported architecture, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to oversubscription


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{arch: checkpoint dir} for every tiny architecture (built lazily, cached for the session)."""
    from rq.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, str] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = str(save_tiny_checkpoint(arch, root / arch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A few hundred KB of real text (this package's own sources) for calibration in tests."""
    from pathlib import Path

    import rq

    src = "\n".join(p.read_text() for p in sorted(Path(rq.__file__).parent.rglob("*.py")))
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(src)
    return path
