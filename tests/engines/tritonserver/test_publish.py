"""Publishing an export into a model repository as the next version, and rolling back (rq.replan.publish),
without a server: what a server would see in the repository after each step."""

from __future__ import annotations

import json

import pytest

from rq.engines.tritonserver import FORWARD_MODEL, GENERATE, ONNX_MODEL, ServingOptions, write_model_repository
from rq.errors import RQError
from rq.replan.publish import publish_version, rollback, served_version, version_build


@pytest.fixture()
def repo(rq_build, tmp_path):
    return write_model_repository(rq_build, tmp_path / "repo", ServingOptions(max_context=64))


def _tree(repo):
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))


def test_publish_adds_whole_versions_and_rollback_returns(repo, rq_build):
    configs = {m: (repo / m / "config.pbtxt").read_text() for m in (GENERATE, ONNX_MODEL, FORWARD_MODEL)}
    assert served_version(repo) == 1
    assert publish_version(repo, rq_build, {"why": "test"}) == 2
    assert served_version(repo) == 2 and version_build(repo, 2) == repo / ONNX_MODEL / "2"
    for model in (GENERATE, ONNX_MODEL, FORWARD_MODEL):
        assert (repo / model / "1").is_dir() and (repo / model / "2").is_dir()
        assert (repo / model / "config.pbtxt").read_text() == configs[model]  # configs untouched
    assert (repo / GENERATE / "2" / "model.py").is_file() and (repo / ONNX_MODEL / "2" / "plan.json").is_file()
    assert (repo / ONNX_MODEL / "2" / "manifest.json").read_bytes() == (rq_build / "manifest.json").read_bytes()
    info = json.loads((repo / "rq_repository.json").read_text())
    assert info["versions"]["2"]["why"] == "test" and info["versions"]["2"]["plan"] == info["plan"]
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(f".{repo.name}.")]  # no staging left behind
    assert publish_version(repo, rq_build) == 3
    assert rollback(repo) == (3, 2)
    assert served_version(repo) == 2 and (repo / GENERATE / "rolled_back_3").is_dir()
    assert rollback(repo) == (2, 1)
    with pytest.raises(RQError, match="nothing to roll back"):
        rollback(repo)


def test_publish_upgrades_a_repository_written_before_versioned_exports(repo, rq_build):
    """Older repositories name rq_onnx/1 in the Python models' configs: publishing rewrites it to {version} (which
    version 1 reads as rq_onnx/1 still)."""
    for model in (GENERATE, FORWARD_MODEL):
        path = repo / model / "config.pbtxt"
        path.write_text(path.read_text().replace(f"{ONNX_MODEL}/{{version}}", f"{ONNX_MODEL}/1"))
    assert publish_version(repo, rq_build) == 2
    assert f'"{ONNX_MODEL}/{{version}}"' in (repo / GENERATE / "config.pbtxt").read_text()


def test_publish_refuses_a_changed_config_and_changes_nothing(repo, rq_build):
    path = repo / GENERATE / "config.pbtxt"
    path.write_text(path.read_text().replace('key: "max_context" value { string_value: "64" }',
                                             'key: "max_context" value { string_value: "99" }'))
    before = _tree(repo)
    with pytest.raises(RQError, match="changes generate/config.pbtxt"):
        publish_version(repo, rq_build)
    assert _tree(repo) == before
    with pytest.raises(RQError, match="not an rq Triton repository"):
        publish_version(repo / GENERATE, rq_build)
