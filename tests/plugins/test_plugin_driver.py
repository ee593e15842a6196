"""The IPluginV3 driver (plugins/tests/rqMoePluginDriver.cpp, benchmarks/gpu/plugin_driver.py) on this machine:
its build-phase path needs no GPU, so CI runs creator -> output types/shapes -> format combinations ->
configurePlugin (partial INT4 blocks included) -> workspace -> serialization round trip for every case. The
runtime half (attachToContext, onShapeChange, enqueue, CUDA graph) runs on a GPU: benchmarks/gpu/run.sh."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.gpu import plugin_driver as driver

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", driver.CASES, ids=lambda c: c.name)
def test_build_phase_of_every_case(rq_plugin, tmp_path, case):
    layer, call = driver.make_call(case)
    driver.write_case(tmp_path, layer, call)
    passed, output = driver.run_driver(rq_plugin.driver, rq_plugin.library, tmp_path, build_only=True)
    assert passed, output
    assert "PASS: configurePlugin accepts the case (T dynamic)" in output
    assert "PASS: serialized fields recreate the plugin (runtime phase)" in output


def test_the_partial_block_case_is_one(rq_plugin):
    case = next(c for c in driver.CASES if "688" in c.name)
    assert case.inter % case.group_size != 0 and case.inter % 16 == 0


def test_int8_cases_cover_the_class():
    """The GPU run checks the plugin's INT8 path on layers mixing all three precisions, INT8 replicas, a partial last
    block, 64-row tiles, both float types, and an INT8 class with no INT8 copy (docs/spec.md §5a, §8)."""
    int8_cases = [c for c in driver.CASES if c.int8_class]
    assert any({0, 1, 2} <= set(c.precision) for c in int8_cases)
    assert any(c.inter % c.group_size for c in int8_cases if 2 in c.precision)
    assert {c.dtype for c in int8_cases if 2 in c.precision} == {"f16", "f32"}
    assert any(c.tokens * c.top_k > 16 * len(c.precision) for c in int8_cases if 2 in c.precision)  # 64-row tiles
    assert any(2 not in c.precision for c in int8_cases)
    for case in int8_cases:
        layer, call = driver.make_call(case)
        assert layer.has_int8_class and layer.num_int8 == case.precision.count(2)
        replicas = [c > 1 and 2 in case.precision[sum(case.copies[:e]) + 1: sum(case.copies[:e + 1])]
                    for e, c in enumerate(case.copies)]
        if 2 in case.precision and case.rotate_offsets:
            assert any(replicas), case.name  # an INT8 replica, served in rotation


def test_runtime_phase_without_a_gpu_fails_cleanly(rq_plugin, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: benchmarks/gpu/run.sh runs the runtime phase")
    case = driver.CASES[0]
    driver.write_case(tmp_path, *driver.make_call(case))
    run = subprocess.run([str(rq_plugin.driver), str(rq_plugin.library), str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "FAILED: cudaSetDevice" in run.stdout, run.stdout + run.stderr


def test_comparison_passes_the_reference_and_catches_an_error(tmp_path):
    """The harness that judges the GPU run: the reference itself passes, a wrong element or count fails."""
    case = next(c for c in driver.CASES if c.name == "mixed_replicas_f16")
    layer, call = driver.make_call(case)
    y, counts = driver.rq_moe_reference(call["hidden"].float(), call["topk_ids"], call["topk_weights"].float(), layer,
                                        call["offsets"])
    y16 = y.to(torch.float16).numpy()
    y16.tofile(tmp_path / "y.bin")
    counts.numpy().tofile(tmp_path / "expert_counts.bin")
    rows = driver.compare(tmp_path, case, layer, call)
    assert [r.output for r in rows] == ["y", "expert_counts"] and all(r.passed for r in rows)
    assert rows[1].exact and rows[0].atol == 2e-2 and rows[0].rtol == 1e-2  # docs/spec.md §9, float16
    y16.ravel()[7] += np.float16(0.5)
    y16.tofile(tmp_path / "y.bin")
    (counts.numpy() + np.eye(len(counts), dtype=np.int64)[0]).tofile(tmp_path / "expert_counts.bin")
    assert [r.passed for r in driver.compare(tmp_path, case, layer, call)] == [False, False]
