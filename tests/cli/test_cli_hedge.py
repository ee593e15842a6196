"""`rq calibrate --generate` (the streamed model generates), `rq plan --hedge/--no-hedge` (hedged by default for
such stats), and `rq eval`'s losses in its JSON."""

import json

from typer.testing import CliRunner

from rq.calibrate.stats import CalibrationStats
from rq.cli.main import app

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_generate_hedge_and_eval_losses(tiny_checkpoints, text_file, tmp_path):
    ckpt = tiny_checkpoints("qwen2_moe")
    code, out = _run("calibrate", ckpt, "--data", text_file, "--out", tmp_path / "stats", "--seq-len", 32,
                     "--sequences", 8, "--batch-size", 4, "--group-size", 64, "--generate", 4,
                     "--generate-window", 4, "--window", 4)
    assert code == 0, out
    assert "generated tokens per sequence" in out
    stats = CalibrationStats.load(tmp_path / "stats")
    assert (stats.windows.teacher_forced, stats.windows.generated) == (2, 2)
    k = stats.model.top_k
    assert all(s.load_windows[2:].sum(1).tolist() == [4 * 3 * k] * 2 for s in stats.layers)  # 3 decode steps
    for flag, objective in (("--hedge", "worst window"), ("--no-hedge", None), (None, "worst window")):
        code, out = _run("plan", tmp_path / "stats", "--out", tmp_path / "plan.json", *([flag] if flag else []))
        assert code == 0, out
        assert json.loads((tmp_path / "plan.json").read_text())["options"].get("hedge") == objective, flag
    code, out = _run("eval", ckpt, "--plan", tmp_path / "plan.json", "--data", text_file, "--seq-len", 32,
                     "--sequences", 8, "--batch-sizes", "4", "--stream-batch", 4, "--stream-steps", 2,
                     "--out", tmp_path / "eval.json")
    assert code == 0, out
    numbers = json.loads((tmp_path / "eval.json").read_text())
    assert isinstance(numbers["loses_to_no_balancing"], list)
    assert out.count("raises LIS above no balancing") == len(numbers["loses_to_no_balancing"])


def test_bad_generate_options_are_one_line_errors(tiny_checkpoints, text_file, tmp_path):
    ckpt = tiny_checkpoints("qwen2_moe")
    for args, needle in ((("--generate", -1), "--generate must be 0 or more"), (("--window", 0), "--window must be")):
        code, out = _run("calibrate", ckpt, "--data", text_file, "--out", tmp_path / "s", *args)
        assert code == 2 and needle in out and "Traceback" not in out, out
        assert not (tmp_path / "s").exists()
