"""Property-based tests: random edits to valid plan and stats files. Loading (and applying) them either succeeds
with a valid document or fails with one-line :class:`RQError` — never another exception, never a partial file."""

from __future__ import annotations

import json
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
from rq.testing.fuzz import edited

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

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


def _one_line_error(fn, *args):
    try:
        return fn(*args)
    except RQError as err:
        assert str(err) and "\n" not in str(err), f"not one line: {err!r}"
        return None


@FUZZ
@given(data=st.data())
def test_edited_plans_are_valid_or_refused_in_one_line(documents, tmp_path, data):
    model, adapter, root = documents
    doc = data.draw(edited(json.loads((root / "plan.json").read_text())))
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
        doc = data.draw(edited(json.loads((stats_dir / "stats.json").read_text())))
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
