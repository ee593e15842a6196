"""``rq export --stream always`` (one decoder layer in memory at a time) writes the whole-model export's files:
the same graphs node for node, the same initializers byte for byte, and they pass the same parity check."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

from rq.errors import RQError
from rq.export import export_model
from rq.export import onnx_file



def _graph_files(out_dir) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.name.endswith(".onnx"))


def _value(info: onnx.ValueInfoProto) -> bytes:
    """A graph input/output without the tracer's debug notes (``pkg.torch.onnx.original_node_name``: the FX node
    an output came from, which the optimizer may carry over from another node of the same value)."""
    info = onnx.ValueInfoProto.FromString(info.SerializeToString())
    kept = [p for p in info.metadata_props if not p.key.startswith("pkg.torch.onnx.")]
    del info.metadata_props[:]
    info.metadata_props.extend(kept)
    return info.SerializeToString()


def _structure(proto: onnx.ModelProto) -> dict:
    """Everything of a graph file but its initializers' bytes and storage places."""
    graph = proto.graph
    return {"nodes": [n.SerializeToString() for n in graph.node],
            "inputs": [_value(v) for v in graph.input],
            "outputs": [_value(v) for v in graph.output],
            "functions": [f.SerializeToString() for f in proto.functions],
            "opsets": sorted((o.domain, o.version) for o in proto.opset_import),
            "metadata": sorted((p.key, p.value) for p in proto.metadata_props if p.key != "rq.created"),
            "initializers": [(t.name, tuple(t.dims), t.data_type) for t in graph.initializer]}


def _values(proto: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer}


def assert_same_export(whole, streamed) -> None:
    files = _graph_files(whole.out_dir)
    assert files == _graph_files(streamed.out_dir) and ("model.onnx" in files or "decoder.onnx" in files)
    for name in files:
        a = onnx.load(whole.out_dir / name, load_external_data=False)
        b = onnx.load(streamed.out_dir / name, load_external_data=False)
        assert _structure(a) == _structure(b), f"{name}: the streamed graph differs"
        a, b = onnx.load(whole.out_dir / name), onnx.load(streamed.out_dir / name)
        values_a, values_b = _values(a), _values(b)
        differ = [k for k in values_a if values_a[k] != values_b[k]]
        assert not differ, f"{name}: initializers {differ[:3]} differ"
    for data in (f for f in files if (whole.out_dir / (f + ".data")).is_file()):
        assert (whole.out_dir / (data + ".data")).stat().st_size == (streamed.out_dir / (data + ".data")).stat().st_size
    same = ("graphs", "moe_layers", "kv_cache", "generation", "tolerances", "genai", "notes", "parity")
    assert {k: whole.manifest[k] for k in same} == {k: streamed.manifest[k] for k in same}
    for file in ("parity/streaming_reference.json", "parity/decoder_reference.json", "parity/decoder_inputs.json"):
        assert (whole.out_dir / file).read_bytes() == (streamed.out_dir / file).read_bytes(), file


@pytest.mark.parametrize("arch,dtype", [("qwen3_moe", "float32"), ("mixtral", "float16"), ("qwen2_moe", "float32"),
                                        ("olmoe", "float32"), ("deepseek_v2", "float32"), ("deepseek_v3", "float32"),
                                        ("switch_transformers", "float32")])
def test_streamed_export_is_the_whole_model_export(arch, dtype, exported, tiny, tmp_path):
    whole = exported(arch, dtype)
    model_dir, plan = tiny(arch, router_std=1.0 if dtype == "float16" else 0.2)
    streamed = export_model(model_dir, plan, tmp_path / "build", dtype=dtype, show_progress=False, stream="always")
    assert streamed.passed, streamed.parity.summary()
    assert_same_export(whole, streamed)


def _bf16_copy(model_dir, out):
    """``model_dir`` with its float tensors stored as bfloat16 (as real checkpoints ship) and a plan made on it."""
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import TokenData
    from rq.models.adapters import load_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import save_plan

    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    model, adapter = load_model(out)
    tokens = torch.randint(2, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, adapter, TokenData(tokens, "seeded random tokens"), batch_size=4, group_size=64,
                      show_progress=False)
    save_plan(make_plan(stats, PlanOptions(budget_factor=1.0)), out / "plan.json")
    return out, out / "plan.json"


def test_streamed_export_reads_bfloat16_checkpoints_as_stored(tiny, tmp_path):
    """A bfloat16 checkpoint streams in bfloat16 (half the memory of float32) and exports exactly what the
    whole-model path, which loads it as float32, exports."""
    model_dir, plan = _bf16_copy(tiny("qwen3_moe")[0], tmp_path / "bf16")
    whole = export_model(model_dir, plan, tmp_path / "whole", show_progress=False, stream="never")
    streamed = export_model(model_dir, plan, tmp_path / "streamed", show_progress=False, stream="always")
    assert whole.passed and streamed.passed, streamed.parity.summary()
    assert_same_export(whole, streamed)


def test_disk_too_small_is_one_line_and_writes_nothing(monkeypatch, tiny, tmp_path):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    model_dir, plan = tiny("qwen3_moe")
    with pytest.raises(RQError, match=r"has 0\.00 GiB free, the export writes 0\.00 GiB; free space there or pass "
                                      r"--out on a larger disk") as err:
        export_model(model_dir, plan, tmp_path / "build", show_progress=False, stream="always", check=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "build").exists() and not list(tmp_path.glob(".build*"))
    onnx_file.check_free_space(tmp_path, 999)


def test_stream_option_is_checked(tiny, tmp_path):
    model_dir, plan = tiny("qwen3_moe")
    with pytest.raises(RQError, match="--stream must be auto, always or never"):
        export_model(model_dir, plan, tmp_path / "build", show_progress=False, stream="sometimes")
    assert not (tmp_path / "build").exists()
