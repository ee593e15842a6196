"""``rq export --ort-int8-activations``: the fused route's ``QMoE`` nodes on int8 activations, checked by the
approximate rule of docs/spec.md §9 (:mod:`rq.export.approximate`), the portable ``model.onnx`` still exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from rq.cli.main import app
from rq.export import approximate
from rq.export.ort_fused import INT8_ACTIVATIONS_LEVEL
from rq.export.runtime import OrtGenerator

DEMO = Path(__file__).resolve().parents[2] / "rq" / "demo" / "checkpoint"


def qmoe_levels(path: Path) -> list[int | None]:
    """``accuracy_level`` of every ``QMoE`` node of ``path`` (None where unset)."""
    levels = []
    for node in onnx.load(path, load_external_data=False).graph.node:
        if node.op_type == "QMoE":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            levels.append(attrs.get("accuracy_level"))
    return levels


@pytest.fixture(scope="module")
def int8_build(demo_export, tmp_path_factory):
    """The demo plan of ``demo_export`` exported again by the CLI with ``--ort-int8-activations``."""
    result, _ = demo_export
    out = tmp_path_factory.mktemp("int8") / "build"
    cli = CliRunner().invoke(app, ["export", str(DEMO), "--plan", str(result.out_dir / "plan.json"), "--out", str(out),
                                   "--ort-int8-activations"])
    assert cli.exit_code == 0, cli.output
    return out, cli.output


def test_export_sets_int8_activations_on_every_qmoe_node(int8_build, demo_export):
    out, output = int8_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ort_int8_activations"] is True
    for name in ("model.ort.onnx", "model.genai.onnx"):
        levels = qmoe_levels(out / name)
        assert levels and set(levels) == {INT8_ACTIVATIONS_LEVEL}
    exact = demo_export[0].out_dir
    assert set(qmoe_levels(exact / "model.ort.onnx")) == {None}  # the default stays exact
    assert json.loads((exact / "manifest.json").read_text())["ort_int8_activations"] is False
    assert "QMoE on int8 activations" in output


def test_replan_exports_the_next_version_as_the_running_one(int8_build, demo_export):
    from rq.replan.run import _export_options

    assert _export_options(int8_build[0]) == ("float32", True)
    assert _export_options(demo_export[0].out_dir) == ("float32", False)


def test_check_uses_the_approximate_rule_for_the_fused_file_only(int8_build):
    out, output = int8_build
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"]
    fused = [r for r in parity["outputs"] if r["file"] == "model.ort.onnx"]
    portable = [r for r in parity["outputs"] if r["file"] == "model.onnx"]
    assert fused and all(r["rule"] for r in fused)
    assert portable and not any(r["rule"] for r in portable)
    logits = [r for r in fused if r["output"] == "logits"]
    assert logits and all(r["max_abs"] <= approximate.KL_LIMIT for r in logits)
    assert "checked by the approximate rule" in output


def test_int8_activations_change_logits_within_the_rule(int8_build, demo_export):
    """The path is really taken (logits move beyond the float32 tolerance) and stays close (KL, top-1)."""
    out, _ = int8_build
    ids = np.random.default_rng(0).integers(2, 400, size=(2, 48))
    exact = OrtGenerator(demo_export[0].out_dir, streaming=True).prefill(ids).logits
    fast = OrtGenerator(out, streaming=True).prefill(ids).logits
    assert np.abs(exact - fast).max() > 1e-3
    assert approximate.mean_kl(exact, fast) < approximate.KL_LIMIT
    assert approximate.top1_agreement(exact, fast) >= approximate.TOP1_MIN


def test_onnxruntime_genai_runs_the_int8_export(int8_build):
    og = pytest.importorskip("onnxruntime_genai")
    out, _ = int8_build
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(og.Tokenizer(model).encode_batch(["def main():"]))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert len(tokens) > 4
    assert int(generator.get_output("expert_counts.0").sum()) > 0


# --- the rule itself ---------------------------------------------------------------------------------------

def test_logits_rule_passes_small_noise_and_fails_a_different_distribution():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 7, 50)) * 3
    assert approximate.logits_verdict([(ref, ref)]).value == pytest.approx(0.0, abs=1e-12)
    assert approximate.logits_verdict([(ref, ref + rng.standard_normal(ref.shape) * 1e-2)]).passed
    verdict = approximate.logits_verdict([(ref, ref), (ref, rng.standard_normal(ref.shape) * 3)])
    assert not verdict.passed and verdict.value > approximate.KL_LIMIT  # the worst call decides
    assert not approximate.logits_verdict([]).passed


def test_counts_rule_allows_a_few_moves_and_no_lost_assignment():
    ref = np.array([10, 0, 5, 5])
    one_move = np.array([9, 1, 5, 5])
    assert approximate.counts_verdict([(ref, one_move)] * 3, None).passed  # 3 of 60 moved: 5 %
    assert not approximate.counts_verdict([(ref, one_move)] * 3 + [(ref, np.array([8, 2, 5, 5]))],
                                          None).passed  # 5 of 80
    assert approximate.counts_verdict([(ref, np.array([5, 5, 5, 5]))], [5]).passed  # near-ties explain it
    lost = approximate.counts_verdict([(ref, np.array([9, 0, 5, 5]))], None)
    assert not lost.passed and "totals differ" in lost.rule


def test_kv_rule_is_relative():
    ref = np.full((2, 3), 100.0)
    assert approximate.tensor_verdict([(ref, ref * 1.01)]).passed
    assert not approximate.tensor_verdict([(ref, ref * 1.2)]).passed
