"""bench_int8_activations end to end on the demo at a small size: three exports, perplexity on both splits."""

from __future__ import annotations

import math

from benchmarks import bench_int8_activations
from rq.export.approximate import KL_LIMIT


def test_bench_int8_activations_small(tmp_path, capsys):
    results = bench_int8_activations.main(["--sequences", "8", "--seq-len", "32", "--calibration-sequences", "4",
                                           "--workdir", str(tmp_path), "--json", str(tmp_path / "out.json")])
    assert set(results["splits"]) == {"heldout_code", "heldout_prose"}
    for entry in results["splits"].values():
        for name in ("R&Q exact", "R&Q int8 activations", "int8 vs exact"):
            assert math.isfinite(entry[name]["ppl"]) and 0.0 <= entry[name]["top1_agreement"] <= 1.0
        assert entry["R&Q exact"]["ppl_base"] == entry["R&Q int8 activations"]["ppl_base"]  # the same original
        assert 0.0 < entry["int8 vs exact"]["mean_kl"] < KL_LIMIT  # a different path, close to the exact one
    assert (tmp_path / "out.json").is_file()
    assert "int8 vs exact" in capsys.readouterr().out
