"""Bad input: one-line RQError, and never a half-written output folder."""

from __future__ import annotations

import pytest

from rq.errors import RQError
from rq.export import check_export, export_model


def _assert_clean(parent, name):
    assert not list(parent.glob(f".{name}.tmp-*")), "temporary folder left behind"


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


def test_plan_for_another_model(tiny, tmp_path):
    model_dir, _ = tiny("qwen3_moe")
    _, other_plan = tiny("mixtral")
    with pytest.raises(RQError) as err:
        export_model(model_dir, other_plan, tmp_path / "build", show_progress=False)
    assert "plan" in _one_line(err)
    assert not (tmp_path / "build").exists()
    _assert_clean(tmp_path, "build")


def test_existing_output_needs_force(tiny, tmp_path):
    model_dir, plan = tiny("mixtral")
    out = tmp_path / "build"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RQError) as err:
        export_model(model_dir, plan, out, show_progress=False)
    assert "--force" in _one_line(err)
    assert (out / "keep.txt").read_text() == "mine"
    # with --force a failing export still leaves the old folder as it was
    with pytest.raises(RQError):
        export_model(model_dir, tmp_path / "missing-plan.json", out, force=True, show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    _assert_clean(tmp_path, "build")


def test_model_without_moe_layers(tiny, tmp_path):
    """A dense model (same family, every layer an MLP) is refused for having no MoE layers."""
    from transformers import AutoModelForCausalLM

    from rq.testing.tiny import tiny_config, tiny_tokenizer

    _, plan = tiny("qwen2_moe")
    config = tiny_config("qwen2_moe")
    config.mlp_only_layers = list(range(config.num_hidden_layers))
    model_dir = tmp_path / "dense"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    with pytest.raises(RQError) as err:
        export_model(model_dir, plan, tmp_path / "build", show_progress=False)
    assert "no MoE layers" in _one_line(err)
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize("kwargs, needle", [({"dtype": "bfloat16"}, "--dtype"), ({"opset": 18}, "--opset")])
def test_bad_options(tiny, tmp_path, kwargs, needle):
    model_dir, plan = tiny("mixtral")
    with pytest.raises(RQError) as err:
        export_model(model_dir, plan, tmp_path / "build", show_progress=False, **kwargs)
    assert needle in _one_line(err)


def test_failure_midway_leaves_nothing(tiny, tmp_path, monkeypatch):
    from rq.export import onnx_file

    def broken(*args, **kwargs):
        raise RQError("simulated exporter failure")

    monkeypatch.setattr(onnx_file, "trace", broken)
    model_dir, plan = tiny("mixtral")
    with pytest.raises(RQError, match="simulated"):
        export_model(model_dir, plan, tmp_path / "build", show_progress=False)
    assert not (tmp_path / "build").exists()
    _assert_clean(tmp_path, "build")


def test_check_of_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(RQError) as err:
        check_export(tmp_path)
    assert "not an rq export" in _one_line(err)
