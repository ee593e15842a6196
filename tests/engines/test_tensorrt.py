"""engines/tensorrt.py's logic that needs no engine: which TensorRT, profiles, targets, layer information."""

from __future__ import annotations

import importlib
import sys
import types

import pytest

from rq.engines import tensorrt as trt_engine
from rq.errors import RQError

TRT_RTX_LAYERS = """Layers:
Name: __myl_CastGath_myl1_1, LayerType: kgen, Inputs: [ { Name: input_ids, Dimensions: [-1,-1] }], Outputs: [], TacticName: , StreamId: 0, Metadata: [ONNX Layer: node_embedding]
Name: rq_moe_0_myl1_21, LayerType: custom_layer, Inputs: [ { Name: x, Dimensions: [-1,128] }], Outputs: [], TacticName: , StreamId: 0, Metadata: [ONNX Layer: rq_moe_0]
Name: rq_moe_1_myl1_40, LayerType: custom_layer, Inputs: [], Outputs: [], TacticName: , StreamId: 0, Metadata: [ONNX Layer: rq_moe_1]"""

TRT_10_LAYERS = ["Engine Layer Information:",  # one message per layer
                 "Layer(Gather): node_embedding, Tactic: 0x0000000000000000, input_ids (Int64[-1,-1]) -> x",
                 "Layer(PluginV3): rq_moe_0, Tactic: 0x0000000000000000, x (Float[-1,128]) -> y (Float[-1,128])",
                 "[MemUsageStats] Peak memory usage of TRT CPU/GPU memory allocators: CPU 0 MiB, GPU 8 MiB"]
INSPECTOR_JSON = (
    '{"Layers": [{"Name": "node_embedding", "LayerType": "Gather", "Metadata": "[ONNX Layer: node_embedding]"},'
    ' {"Name": "rq_moe_0", "LayerType": "PluginV3", "Inputs": [], "Metadata": "[ONNX Layer: rq_moe_0]"}],'
    ' "Bindings": ["input_ids"]}')


def test_engine_layers_from_either_log_format():
    layers = trt_engine.engine_layers(["[MemUsageChange] ...", TRT_RTX_LAYERS])
    assert [(l.name, l.kind, l.onnx_nodes, l.is_plugin) for l in layers] == [
        ("__myl_CastGath_myl1_1", "kgen", ("node_embedding",), False),
        ("rq_moe_0_myl1_21", "custom_layer", ("rq_moe_0",), True),
        ("rq_moe_1_myl1_40", "custom_layer", ("rq_moe_1",), True)]
    want = [("Gather", ("node_embedding",), False), ("PluginV3", ("rq_moe_0",), True)]
    for layers in (trt_engine.engine_layers(TRT_10_LAYERS), trt_engine.engine_layers(["\n".join(TRT_10_LAYERS)]),
                   trt_engine.inspector_layers(INSPECTOR_JSON)):
        assert [(l.kind, l.onnx_nodes, l.is_plugin) for l in layers] == want
    assert trt_engine.engine_layers(["no layer information here", "Layers:", "nothing"]) is None
    assert trt_engine.inspector_layers('{"Layers": ["node_embedding"]}') is None  # not detailed verbosity
    build = trt_engine.EngineBuild(None, "TensorRT-RTX 1.7", [86], 1.0, 1 << 20, ["rq_moe_0", "rq_moe_1"],
                                   trt_engine.engine_layers([TRT_RTX_LAYERS]), True)
    assert [l.name for l in build.plugin_layers()] == ["rq_moe_0_myl1_21", "rq_moe_1_myl1_40"]
    assert "2 RQMoE plugin layers for 2 MoE layers" in build.summary()


def test_profile_covers_the_export_dims():
    dims = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "total_seq"],
            "past_key_values.0.key": ["batch", 2, "past_seq", 32], "rq_offsets.0": [16]}
    shapes = trt_engine.profile_shapes(dims, trt_engine.ProfileLimits(max_batch=4, max_seq=64, max_cache=100).ranges())
    assert shapes["input_ids"] == ([1, 1], [1, 1], [4, 64])
    assert shapes["past_key_values.0.key"] == ([1, 2, 0, 32], [1, 2, 50, 32], [4, 2, 100, 32])
    assert shapes["attention_mask"] == ([1, 1], [1, 51], [4, 164])  # past + new tokens, at every point
    assert shapes["rq_offsets.0"] == ([16], [16], [16])
    with pytest.raises(RQError, match=r"no profile range for dimension\(s\) \['image_size'\].*--dim image_size="):
        trt_engine.profile_shapes({"pixels": ["batch", "image_size"]}, trt_engine.ProfileLimits().ranges())
    ranges = trt_engine.ProfileLimits(dims={"image_size": (1, 224, 448)}).ranges()
    assert trt_engine.profile_shapes({"pixels": ["batch", "image_size"]}, ranges)["pixels"][2] == [8, 448]
    with pytest.raises(RQError, match="min <= opt <= max"):
        trt_engine.ProfileLimits(dims={"seq": (4, 2, 8)}).ranges()
    with pytest.raises(RQError, match="max batch must be >= 1"):
        trt_engine.ProfileLimits(max_batch=0).ranges()


def test_parse_targets():
    assert trt_engine.parse_targets("sm86,sm89") == [86, 89]
    assert trt_engine.parse_targets("sm_120 8.6, 12.0") == [120, 86, 120]
    assert trt_engine.parse_targets(None) is None
    with pytest.raises(RQError, match="is not a compute capability"):
        trt_engine.parse_targets("ampere")


def test_default_engine_path(tmp_path):
    assert trt_engine.default_engine_path(tmp_path / "model.onnx") == tmp_path / "engine.plan"
    assert trt_engine.default_engine_path(tmp_path / "decoder.onnx") == tmp_path / "decoder.plan"


@pytest.fixture
def no_cached_tensorrt():
    trt_engine.load_tensorrt.cache_clear()
    yield
    trt_engine.load_tensorrt.cache_clear()


def test_without_tensorrt_the_install_hint(monkeypatch, no_cached_tensorrt):
    real = importlib.import_module

    def refuse(name, *args):
        if name in ("tensorrt", "tensorrt_rtx_bindings"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(trt_engine.importlib, "import_module", refuse)
    monkeypatch.setattr(trt_engine.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RQError, match=r"TensorRT is not installed: `pip install tensorrt-rtx-cu13-bindings"):
        trt_engine.load_tensorrt()


def test_tensorrt_before_10_7_is_refused(monkeypatch, no_cached_tensorrt):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0.26"))
    with pytest.raises(RQError, match=r"TensorRT 10.3.0.26 is installed, rq needs >= 10.7 \(older ONNX parsers inline"):
        trt_engine.load_tensorrt()


def test_full_tensorrt_is_preferred(monkeypatch, no_cached_tensorrt):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.1.0.3"))
    found = trt_engine.load_tensorrt()
    assert (found.name, found.version, found.rtx) == ("TensorRT", "11.1.0.3", False)


def test_missing_plugin_library(tmp_path):
    with pytest.raises(RQError, match=r"plugin library .*nope.so not found: build it with `cmake -S plugins"):
        trt_engine.plugin_library(tmp_path / "nope.so")
    (tmp_path / "junk.so").write_bytes(b"not an ELF file")
    with pytest.raises(RQError, match=r"junk.so is not rq's RQMoE plugin library"):
        trt_engine.plugin_library(tmp_path / "junk.so")
