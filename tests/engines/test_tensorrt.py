"""engines/tensorrt.py without TensorRT: clear errors, profile shapes and the output comparison."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    try:
        return importlib.import_module("rq.engines.tensorrt")
    except ImportError:  # not installed as a package: load the file
        spec = importlib.util.spec_from_file_location("rq_engines_tensorrt", ROOT / "engines" / "tensorrt.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


trt_engine = _load()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_build_without_tensorrt_says_how_to_install(tmp_path):
    with pytest.raises(trt_engine.TensorRTUnavailable, match="pip install tensorrt"):
        trt_engine.build_engine(tmp_path / "m.onnx", tmp_path / "e.plan", tmp_path / "lib.so")
    with pytest.raises(ImportError, match="NGC"):
        trt_engine.check_engine(tmp_path / "e.plan", {}, {})


def test_profile_shapes():
    dims = {"input_ids": ["batch", "seq"], "mask": ["batch", 4]}
    shapes = trt_engine.profile_shapes(dims, {"batch": (1, 2, 8), "seq": (1, 64, 512)})
    assert shapes["input_ids"] == ([1, 1], [2, 64], [8, 512])
    assert shapes["mask"] == ([1, 4], [2, 4], [8, 4])
    with pytest.raises(ValueError, match=r"no range for dimension\(s\) \['seq'\]"):
        trt_engine.profile_shapes(dims, {"batch": (1, 2, 8)})


def test_compare_outputs():
    ref = {"logits": np.array([1.0, 2.0]), "expert_counts": np.array([3, 1])}
    got = {"logits": np.array([1.001, 2.05]), "expert_counts": np.array([3, 1])}
    res = {r.name: r for r in trt_engine.compare_outputs(got, ref, atol=1e-2, rtol=1e-2, exact=["expert_counts"])}
    assert not res["logits"].passed and str(res["logits"]).startswith("FAILED | logits")
    assert res["logits"].min_atol == pytest.approx(0.05 - 0.02)
    assert res["expert_counts"].passed
