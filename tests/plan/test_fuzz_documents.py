"""Property-based tests: random edits to valid plan and stats files. Loading (and applying) them either succeeds
with a valid document or fails with one-line :class:`RQError` — never another exception, never a partial file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import load_token_data, load_tokenizer
from rq.calibrate.stats import CalibrationStats
from rq.errors import RQError
from rq.models.adapters import load_model
from rq.plan.planner import PlanOptions, make_plan
from rq.plan.schema import load_plan, save_plan
from rq.plan.validate import check_plan_matches

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.sampled_from([0, -1, 1, 63, 64, 10**9]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.just([]), st.just({}),
                   st.lists(st.integers(-3, 3), max_size=3))


@pytest.fixture(scope="module")
def documents(tiny_checkpoints, text_file, tmp_path_factory):
    """A tiny model with its stats folder and plan.json, all valid."""
    ckpt = tiny_checkpoints("qwen3_moe")
    model, adapter = load_model(ckpt)
    data = load_token_data(load_tokenizer(ckpt), text_file, seq_len=32, max_sequences=8)
    stats = calibrate(model, adapter, data, batch_size=4, group_size=64, show_progress=False)
    root = tmp_path_factory.mktemp("docs")
    stats.save(root / "stats")
    save_plan(make_plan(stats, PlanOptions()), root / "plan.json")
    return model, adapter, root


def _paths(node, prefix=()):
    """Every path (keys / indices) into a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _edit(doc, path, action, value):
    """Apply one edit at ``path``: replace the value, delete it, or duplicate a list element."""
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(last, json.loads(json.dumps(parent[last])))
    else:
        parent[last] = value
    return doc


def _one_line_error(fn, *args):
    try:
        return fn(*args)
    except RQError as err:
        assert str(err) and "\n" not in str(err), f"not one line: {err!r}"
        return None


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


@FUZZ
@given(data=st.data())
def test_edited_plans_are_valid_or_refused_in_one_line(documents, tmp_path, data):
    model, adapter, root = documents
    doc = json.loads((root / "plan.json").read_text())
    paths = list(_paths(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
        try:
            doc = _edit(doc, path, action, _json_safe(data.draw(VALUES)))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this path
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    plan = _one_line_error(load_plan, path)
    if plan is not None:
        _one_line_error(check_plan_matches, model, adapter, plan)


@FUZZ
@given(data=st.data())
def test_edited_stats_are_valid_or_refused_in_one_line(documents, tmp_path, data):
    _, _, root = documents
    stats_dir = tmp_path / "stats"
    shutil.rmtree(stats_dir, ignore_errors=True)
    shutil.copytree(root / "stats", stats_dir)
    target = data.draw(st.sampled_from(["json", "tensors"]))
    if target == "json":
        doc = json.loads((stats_dir / "stats.json").read_text())
        path = data.draw(st.sampled_from(list(_paths(doc))))
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
        try:
            doc = _edit(doc, path, action, _json_safe(data.draw(VALUES)))
        except (KeyError, IndexError, TypeError):
            pass
        (stats_dir / "stats.json").write_text(json.dumps(doc))
    else:
        blob = bytearray((stats_dir / "stats.safetensors").read_bytes())
        position = data.draw(st.integers(0, len(blob) - 1))
        if data.draw(st.booleans()):
            blob[position] ^= data.draw(st.integers(1, 255))
        else:
            del blob[position:]
        (stats_dir / "stats.safetensors").write_bytes(bytes(blob))
    stats = _one_line_error(CalibrationStats.load, stats_dir)
    if stats is not None:
        out = tmp_path / "plan.json"
        out.unlink(missing_ok=True)
        plan = _one_line_error(make_plan, stats)
        if plan is not None:
            save_plan(plan, out)
            assert load_plan(out) == plan
        assert not list(Path(tmp_path).glob(".plan.json.*")), "a partial plan file was left behind"
