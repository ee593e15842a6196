"""The three user commands end to end, and bad input: one line, exit 2, no traceback, no partial output."""

import json

import pytest
from typer.testing import CliRunner

from rq.cli.main import app

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def planned(tiny_checkpoints, text_file, tmp_path_factory):
    ckpt = tiny_checkpoints("qwen2_moe")
    work = tmp_path_factory.mktemp("cli")
    code, out = _run("calibrate", ckpt, "--data", text_file, "--out", work / "stats", "--seq-len", 32,
                     "--sequences", 8, "--group-size", 64)
    assert code == 0, out
    code, out = _run("plan", work / "stats", "--out", work / "plan.json")
    assert code == 0, out
    return ckpt, work


def test_calibrate_plan_eval(planned, text_file):
    ckpt, work = planned
    plan = json.loads((work / "plan.json").read_text())
    assert plan["format"] == "rq-plan" and plan["version"] == 1 and plan["model"]["fingerprint"].startswith("sha256:")
    code, out = _run("eval", ckpt, "--plan", work / "plan.json", "--data", text_file, "--seq-len", 32, "--sequences",
                     8, "--batch-sizes", "1,4", "--stream-batch", 4, "--stream-steps", 2, "--out", work / "eval.json")
    assert code == 0, out
    assert "perplexity" in out
    numbers = json.loads((work / "eval.json").read_text())
    assert set(numbers["batch"]) == {"1", "4"} and numbers["accuracy"]["tokens"] > 0


def _assert_clean_error(code, out, needle):
    assert code == 2, out
    assert needle in out
    assert "Traceback" not in out


def test_bad_inputs(planned, tiny_checkpoints, text_file, tmp_path):
    ckpt, work = planned
    # plan made for another model
    other = tiny_checkpoints("mixtral")
    _assert_clean_error(*_run("eval", other, "--plan", work / "plan.json", "--data", text_file), "another model")
    # malformed and foreign plans
    (tmp_path / "bad.json").write_text("{not json")
    _assert_clean_error(*_run("eval", ckpt, "--plan", tmp_path / "bad.json", "--data", text_file), "not valid JSON")
    (tmp_path / "v9.json").write_text(json.dumps({"format": "rq-plan", "version": 9}))
    _assert_clean_error(*_run("eval", ckpt, "--plan", tmp_path / "v9.json", "--data", text_file), "version 9")
    broken = json.loads((work / "plan.json").read_text())
    broken["layers"][0]["experts"][0]["replicas"] = -1
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    _assert_clean_error(*_run("eval", ckpt, "--plan", tmp_path / "broken.json", "--data", text_file), "malformed")
    # missing files / folders
    _assert_clean_error(*_run("plan", tmp_path / "nothing", "--out", tmp_path / "p.json"), "rq calibrate")
    _assert_clean_error(*_run("calibrate", tmp_path, "--data", text_file, "--out", tmp_path / "s"), "config.json")
    _assert_clean_error(*_run("calibrate", ckpt, "--data", tmp_path / "nope.txt", "--out", tmp_path / "s"),
                        "does not exist")
    # empty calibration data
    (tmp_path / "empty.txt").write_text("")
    _assert_clean_error(*_run("calibrate", ckpt, "--data", tmp_path / "empty.txt", "--out", tmp_path / "s"), "no text")
    # group size that does not divide / is not allowed
    _assert_clean_error(*_run("calibrate", ckpt, "--data", text_file, "--out", tmp_path / "s", "--group-size", 32),
                        "group size")
    # budget below what quantizing can meet
    _assert_clean_error(*_run("plan", work / "stats", "--budget", 0.05, "--out", tmp_path / "p.json"), "raise --budget")
    # nothing half-written by any of the failures above
    assert not (tmp_path / "s").exists() and not (tmp_path / "p.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "broken.json", "empty.txt", "v9.json"]


def _copy_checkpoint(ckpt, dest):
    import shutil

    shutil.copytree(ckpt, dest)
    return dest


def test_truncated_or_missing_shard_is_one_line(planned, text_file, tmp_path):
    """A checkpoint copy that stopped early: every command that loads the model names the file and the fix."""
    original, work = planned
    ckpt = _copy_checkpoint(original, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    for args in (("calibrate", ckpt, "--data", text_file, "--out", out / "stats"),
                 ("eval", ckpt, "--plan", work / "plan.json", "--data", text_file),
                 ("export", ckpt, "--plan", work / "plan.json", "--out", out / "build")):
        code, text = _run(*args)
        _assert_clean_error(code, text, "model.safetensors is truncated")
        assert "copy it again" in text
    # a sharded checkpoint whose index names a shard that is not there
    weights.unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    _assert_clean_error(*_run("calibrate", ckpt, "--data", text_file, "--out", out / "stats"),
                        "names shard model-00002-of-00002.safetensors, which is not in")
    assert not out.exists()


def test_out_of_the_wrong_kind_is_one_line(planned, text_file, tmp_path):
    """``--out`` naming a file where a folder is written (or a folder where a file is), or lying below a file."""
    ckpt, work = planned
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    for args, needle in [
        (("calibrate", ckpt, "--data", text_file, "--out", a_file), "is an existing file"),
        (("calibrate", ckpt, "--data", text_file, "--out", a_file / "stats"), "notes.txt is a file, not a folder"),
        (("plan", work / "stats", "--out", a_folder), "is an existing folder"),
        (("eval", ckpt, "--plan", work / "plan.json", "--data", text_file, "--out", a_folder), "is an existing folder"),
        (("export", ckpt, "--plan", work / "plan.json", "--out", a_file), "is an existing file"),
        (("demo", "--out", a_file), "is an existing file"),
    ]:
        _assert_clean_error(*_run(*args), needle)
    assert a_file.read_text() == "keep me" and not any(a_folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt"]


def test_writers_refuse_the_wrong_kind(tmp_path):
    """The atomic writers themselves refuse, so a command that forgot its early check still ends in one line."""
    from rq.atomic import atomic_write_text, staged_dir
    from rq.errors import RQError

    (tmp_path / "f").write_text("x")
    with pytest.raises(RQError, match="is an existing file"):
        with staged_dir(tmp_path / "f"):
            pass
    with pytest.raises(RQError, match="is an existing folder"):
        atomic_write_text(tmp_path, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_plan_precisions(planned, tmp_path):
    """`rq plan --precisions int4,int8`: the mixed solver's plan (INT8 copies, predicted error) and its table;
    a bad list is one clean line."""
    _, work = planned
    code, out = _run("plan", work / "stats", "--precisions", "int4,int8", "--out", tmp_path / "p.json")
    assert code == 0, out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["options"]["precisions"] == "int4,int8"
    assert all(layer["predicted_error"] is not None for layer in plan["layers"])
    if any(e.get("int8_replicas") or e["precision"] == "int8" for layer in plan["layers"] for e in layer["experts"]):
        assert "INT8 copies" in out
    _assert_clean_error(*_run("plan", work / "stats", "--precisions", "int3", "--out", tmp_path / "q.json"),
                        "--precisions")
    assert not (tmp_path / "q.json").exists()


def test_group_size_not_dividing_the_weights_still_quantizes(tiny_checkpoints, text_file, tmp_path):
    """hidden 64 with group size 128: one partial block per row (docs/spec.md §5), so R&Q still applies."""
    ckpt = tiny_checkpoints("mixtral")
    assert _run("calibrate", ckpt, "--data", text_file, "--out", tmp_path / "s", "--seq-len", 32, "--sequences", 4)[0] == 0
    code, out = _run("plan", tmp_path / "s", "--out", tmp_path / "p.json")
    assert code == 0, out
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["quantization"]["group_size"] == 128 and not any(layer["warnings"] for layer in plan["layers"])
    assert any(e["replicas"] for layer in plan["layers"] for e in layer["experts"])
    assert any(e["precision"] == "int4" for layer in plan["layers"] for e in layer["experts"])


def test_importing_the_cli_loads_no_stage():
    """`rq --help` must stay instant: the command modules import their stages (torch, transformers) lazily."""
    import subprocess
    import sys

    code = ("import sys, rq.cli.main; heavy = [m for m in ('torch', 'transformers', 'onnx', 'numpy') if m in sys.modules];"
            " print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import rq.cli.main loaded {out}"


def test_renamed_commands_keep_their_former_names():
    """``rq tritonserver`` (formerly ``rq triton``) and ``rq export --tritonserver`` (formerly ``--triton``)."""
    code, out = _run("--help")
    assert code == 0 and "tritonserver" in out and " triton " not in out
    for args in (("tritonserver", "--help"), ("triton", "--help")):
        code, out = _run(*args)
        assert code == 0 and "Triton Inference Server model repository" in out, out
    code, out = _run("export", "--help")
    assert code == 0 and "--tritonserver" in out and "--triton" in out


def test_every_command_has_quiet(planned, tmp_path):
    """``--quiet`` on every command; with it a successful command prints nothing."""
    import typer.main

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert any("--quiet" in p.opts for p in cmd.params), f"rq {name} has no --quiet"
    _, work = planned
    code, out = _run("plan", work / "stats", "--out", tmp_path / "p.json", "--quiet")
    assert code == 0 and out.strip() == "", out
    assert (tmp_path / "p.json").is_file()
