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
    assert "hedge" not in json.loads((tmp_path / "plan.json").read_text())["options"]  # fitted without generations


def test_demo_generate_records_decode_and_hedges(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--generate", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert stats["windows"]["generated"] > 0 and stats["windows"]["generated_tokens"] == 4
    assert json.loads((tmp_path / "plan.json").read_text())["options"]["hedge"] == "worst window"
    bad = CliRunner().invoke(app, ["demo", "--quick", "--generate", "-1", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--generate must be 0 or more" in bad.output and not (tmp_path / "x").exists()
