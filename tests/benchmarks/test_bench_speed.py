"""bench_speed's reporting: each ratio divides the engines its name says, memory against what the target names."""

from __future__ import annotations


import pytest

from benchmarks import bench_speed

MIB = 2**20


def test_ratios_pair_the_engines_they_name_and_skip_missing_ones():
    speeds = {"decode B=1": {"PyTorch, original": 100.0, "PyTorch, R&Q (fast)": 90.0,
                             "ONNX Runtime, original (fused MoE)": 200.0,
                             "ONNX Runtime, R&Q fused (model.ort.onnx)": 300.0,
                             "ONNX Runtime, R&Q portable (model.onnx)": 50.0,
                             "onnxruntime-genai, original (fused MoE)": 250.0,
                             "onnxruntime-genai, R&Q (model.genai.onnx)": 330.0,
                             bench_speed.INT8_ORT: 360.0, bench_speed.INT8_GENAI: 400.0}}
    r = bench_speed.ratios(speeds)["decode B=1"]
    assert r == pytest.approx({"ORT R&Q fused / ORT original": 1.5, "ORT R&Q fused / PyTorch original": 3.0,
                               "PyTorch R&Q (fast) / PyTorch original": 0.9, "ORT R&Q portable / ORT original": 0.25,
                               "onnxruntime-genai R&Q / onnxruntime-genai original": 1.32,
                               "onnxruntime-genai R&Q / ORT R&Q fused (rq's runtime)": 1.1,
                               "ORT R&Q fused, int8 activations / ORT original": 1.8,
                               "onnxruntime-genai R&Q, int8 activations / onnxruntime-genai original": 1.6})


def _run(peak: int, imported: int = 300 * MIB, **extra) -> dict:
    return {"peak": peak, "imported": imported, **extra}


def test_memory_ratios_subtract_the_imports_and_divide_by_the_named_sizes():
    mem = {"checkpoint_bytes": 1000 * MIB, "export": _run(1800 * MIB),
           "session: original (fused MoE)": _run(1300 * MIB, file_bytes=1000 * MIB),
           "session: R&Q fused": _run(1500 * MIB, file_bytes=1200 * MIB),
           "session: R&Q portable": _run(1700 * MIB, file_bytes=1000 * MIB),
           "pytorch: original": _run(2600 * MIB, peak_after_imports=2300 * MIB),
           "pytorch: R&Q (fast)": _run(4900 * MIB, peak_after_imports=4900 * MIB),
           "calibrate": {"peak": 2600 * MIB, "loaded": 1300 * MIB, "model_bytes": 1000 * MIB,
                         "calibration_peak": 1500 * MIB},
           "eval_32": _run(1400 * MIB), "eval_8": _run(1400 * MIB)}
    r = bench_speed.memory_ratios(mem)
    assert r["rq-export peak / checkpoint"] == pytest.approx(1.8)
    assert r["rq-export peak above imports / checkpoint"] == pytest.approx(1.5)
    assert r["ORT session peak above imports: R&Q fused / its file's weights"] == pytest.approx(1.0)
    assert r["ORT session peak above imports: R&Q portable / original"] == pytest.approx(1.4)
    assert r["PyTorch peak above imports: R&Q (fast) / original"] == pytest.approx(4600 / 2000)
    assert r["calibration peak after loading, above the loaded model / model bytes"] == pytest.approx(0.2)
    assert r["calibration peak / PyTorch original peak"] == pytest.approx(1.0)
    assert r["rq-export peak / PyTorch original peak"] == pytest.approx(1800 / 2600)
    assert r["rq eval peak: 8 seqs vs 32 seqs"] == "1400 MiB vs 1400 MiB"


@pytest.mark.parametrize("argv", [["--runtimes", "ort,tensorrt"], ["--runtimes", ","], ["--runtimes", "ort", "--mixed"]])
def test_runtimes_option_names_the_engine_families(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_speed.main(argv)
    assert exit_info.value.code == 2
    assert "--runtimes" in capsys.readouterr().err.splitlines()[-1]


def test_memory_ratios_of_the_sessions_alone():
    """``--runtimes`` without pytorch and no stored run: only the export and the sessions are reported."""
    mem = {"checkpoint_bytes": 1000 * MIB, "export": _run(1800 * MIB),
           "session: original (fused MoE)": _run(1300 * MIB, file_bytes=1000 * MIB),
           "session: R&Q fused": _run(1500 * MIB, file_bytes=1200 * MIB),
           "session: R&Q portable": _run(1700 * MIB, file_bytes=1000 * MIB)}
    r = bench_speed.memory_ratios(mem)
    assert r["ORT session peak above imports: R&Q fused / original"] == pytest.approx(1.2)
    assert not any(key.startswith(("PyTorch", "calibration", "rq eval")) for key in r)
