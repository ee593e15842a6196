"""bench_hedge's report: one row per calibration set, seed and plan, counting the layers a plan makes worse."""

from benchmarks.bench_hedge import markdown, plot


def _entry(prose_after: list[float]) -> dict:
    split = {"batch64": [[3.0, 1.5]] * 4, "ppl_change_pct": 0.3, "losses": []}
    return {"planned_bytes": 98, "reference_bytes": 100,
            "heldout_prose@0": {**split, "streaming": [[3.0, a] for a in prose_after]},
            "heldout_code@0": {**split, "streaming": [[2.0, 1.0]] * 4}}


def test_markdown_counts_layers_worse_and_plot_writes(tmp_path):
    result = {"heldout_seeds": [0], "runs": [{"calibration": "both", "seed": 0, "plans": {
        "fitted (--no-hedge)": _entry([3.3, 2.0, 2.0, 6.0]), "hedged (default)": _entry([2.0, 2.0, 1.5, 1.5])}}]}
    rows = [line for line in markdown(result).splitlines() if line.startswith("| both")]
    assert len(rows) == 2
    assert "| 2 of 4 | 2.00 |" in rows[0] and "| 0 of 4 | 0.67 |" in rows[1]
    assert "| 2.00x |" in rows[0] and "0.980x" in rows[0]  # code decode 2.0 -> 1.0; memory 98 / 100
    plot(result, tmp_path / "hedge.png")
    assert (tmp_path / "hedge.png").stat().st_size > 10_000
