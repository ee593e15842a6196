"""Hand-edited plans are refused with one line naming the field (docs/spec.md §6): against themselves when they
are read, against the model's real shapes when they are applied; the commands leave nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import load_token_data, load_tokenizer
from rq.cli.main import app
from rq.errors import RQError
from rq.models.adapters import load_model
from rq.plan.planner import PlanOptions, make_plan
from rq.plan.schema import load_plan, save_plan
from rq.rqmodel.model import apply_plan

GROUP = 64


def _wide_checkpoint(root):
    """A tiny Qwen3-MoE 128 wide: there group sizes 64 and 128 give different bytes (at 64 wide they coincide)."""
    from transformers import AutoModelForCausalLM

    from rq.testing.tiny import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    config = tiny_config("qwen3_moe")
    config.hidden_size, config.moe_intermediate_size, config.intermediate_size = 128, 128, 128
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def planned(text_file, tmp_path_factory):
    """``(checkpoint, plan.json)`` of a tiny Qwen3-MoE with INT4 primaries and replicas."""
    ckpt = _wide_checkpoint(tmp_path_factory.mktemp("wide"))
    model, adapter = load_model(ckpt)
    data = load_token_data(load_tokenizer(ckpt), text_file, seq_len=32, max_sequences=8)
    stats = calibrate(model, adapter, data, batch_size=4, group_size=GROUP, show_progress=False)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    save_plan(make_plan(stats, PlanOptions()), path)
    return ckpt, path


def _edited(path, tmp_path, edit) -> "Path":  # noqa: F821
    doc = json.loads(path.read_text())
    edit(doc)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(doc))
    return out


def _first_replicated(doc) -> dict:
    return next(e for layer in doc["layers"] for e in layer["experts"] if e["replicas"])


@pytest.mark.parametrize("replicas", [100_000, 10**9])
def test_absurd_replica_counts_are_refused_when_read(planned, tmp_path, replicas):
    _, path = planned
    edited = _edited(path, tmp_path, lambda d: _first_replicated(d).update(replicas=replicas))
    with pytest.raises(RQError, match=r"replicas.*less than or equal to 63") as err:
        load_plan(edited)
    assert "\n" not in str(err.value)


def test_replicas_above_the_plans_own_cap_are_refused(planned, tmp_path):
    _, path = planned
    edited = _edited(path, tmp_path, lambda d: _first_replicated(d).update(replicas=40))
    with pytest.raises(RQError, match="more than the plan's max_replicas 7"):
        load_plan(edited)


@pytest.mark.parametrize("what", ["replicas", "precision", "group_size"])
def test_edits_that_change_the_bytes_are_refused_against_the_model(planned, tmp_path, what):
    ckpt, path = planned

    def edit(doc):
        if what == "replicas":
            _first_replicated(doc)["replicas"] += 1
        elif what == "precision":
            expert = next(e for l in doc["layers"] for e in l["experts"] if e["precision"] == "original")
            expert["precision"] = "int4"
        else:
            doc["quantization"]["group_size"] = 128 if doc["quantization"]["group_size"] == 64 else 64

    plan = load_plan(_edited(path, tmp_path, edit))  # self-consistent: only the model's shapes tell
    model, adapter = load_model(ckpt)
    with pytest.raises(RQError, match="planned_bytes .* but its copies take") as err:
        apply_plan(model, adapter, plan)
    assert "\n" not in str(err.value) and "rq plan" in str(err.value)


def test_commands_refuse_an_edited_plan_and_write_nothing(planned, text_file, tmp_path):
    ckpt, path = planned
    edited = _edited(path, tmp_path, lambda d: _first_replicated(d).update(replicas=_first_replicated(d)["replicas"] + 1))
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(ckpt), "--plan", str(edited), "--data", str(text_file),
                                 "--out", str(tmp_path / "eval.json"), "--sequences", "2", "--stream-steps", "0"])
    assert result.exit_code == 2 and "planned_bytes" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(ckpt), "--plan", str(edited), "--out", str(tmp_path / "build")])
    assert result.exit_code == 2 and "planned_bytes" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.json"]
