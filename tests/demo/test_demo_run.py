"""`rq demo` end to end in its reduced mode on the committed demo model: tables, JSON and plots."""

import json

from typer.testing import CliRunner

from rq.cli.main import app

PLOTS = ("load_heatmap.png", "lis_vs_batch.png", "importance_vs_frequency.png", "lis_by_domain.png",
         "calibration_size.png")


def test_demo_quick_writes_numbers_and_plots(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "LIS before -> after" in result.output and "perplexity" in result.output
    for name in PLOTS:
        assert (tmp_path / name).stat().st_size > 10_000, name  # a real figure, not an empty canvas
    summary = json.loads((tmp_path / "demo.json").read_text())
    code = summary["reports"]["heldout_code"]
    assert set(code["batch"]) == {"1", "4", "16"} and code["streaming"] is not None
    # the trained model is skewed and the plan balances it (measured, not constructed)
    before = [p["before"] for p in code["batch"]["16"]]
    after = [p["after"] for p in code["batch"]["16"]]
    assert max(before) > 1.5 and sum(after) < sum(before)
    assert summary["plan"]["planned_bytes"] <= summary["plan"]["reference_bytes"]
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "stats" / "stats.json").is_file()
    assert summary["reports"]["heldout_prose"]["streaming"] is not None  # decode on the other domain is shown
    assert "layers worse" in result.output
    # by default calibration records the model's generations on both domains' prompts and the plan hedges
    stats = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert stats["windows"]["generated"] > 0 and stats["windows"]["generated_tokens"] == 33
    assert "calibration_prose" in stats["calibration"]["data"]
    assert json.loads((tmp_path / "plan.json").read_text())["options"]["hedge"] == "worst window"


def test_demo_generate_zero_fits_the_calibration_text(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--generate", "0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert stats["windows"]["generated"] == 0
    assert "hedge" not in json.loads((tmp_path / "plan.json").read_text())["options"]
    bad = CliRunner().invoke(app, ["demo", "--quick", "--generate", "-1", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--generate must be 0 or more" in bad.output and not (tmp_path / "x").exists()


def test_default_demo_plan_no_worse_than_no_balancing_in_any_layer(tmp_path):
    """The plan a new user gets from `rq demo` (full size, defaults) must not raise LIS above no balancing in any
    layer, in batches or in streaming decode, on held-out code or prose (measured: prose decode 3.56 -> 1.98; the
    closest layer, code decode layer 0, 2.51 -> 1.77; docs/demo.md)."""
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    reports = json.loads((tmp_path / "demo.json").read_text())["reports"]
    for name in ("heldout_code", "heldout_prose"):
        assert reports[name]["streaming"] is not None and len(reports[name]["streaming"]) == 4
        assert reports[name]["loses_to_no_balancing"] == [], name
        streamed = reports[name]["streaming"]
        assert all(layer["after"] < layer["before"] for layer in streamed), name
