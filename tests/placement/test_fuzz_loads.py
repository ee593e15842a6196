"""Random edits to valid files that `rq import-loads` reads (SGLang, vLLM and
TensorRT-LLM load dumps, and the TensorRT-LLM load balancer YAML that maps slot ids). Whatever the edit, the
import either succeeds and writes loadable stats, or fails with one RQError line and writes nothing: never
another exception, never a partial output folder."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from rq.calibrate.stats import CalibrationStats
from rq.errors import RQError
from rq.placement.run import import_stats
from rq.testing.fuzz import edited

N, LAYERS = 8, 3
CONFIG = {"model_type": "qwen3_moe", "num_hidden_layers": LAYERS, "num_experts": N, "num_experts_per_tok": 2,
          "hidden_size": 64, "moe_intermediate_size": 32, "torch_dtype": "bfloat16"}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)

# valid documents, as the engines write them (JSON-able structures)
PHY2LOG = [list(range(N)) + [0, 3] for _ in range(LAYERS)]
SGLANG_STAT = {"logical_count": [[[(3 * s + li + e) % 7 for e in range(N)] for li in range(LAYERS)] for s in range(2)]}
SGLANG_PASS = {"records": [{"global_physical_count": [[(li + p) % 5 for p in range(N + 2)] for li in range(LAYERS)]}],
               "last_physical_to_logical_map": PHY2LOG}
VLLM = {"expert_load_window": [[[(w + li + p) % 9 for p in range(N + 2)] for li in range(LAYERS)] for w in range(2)],
        "physical_to_logical_map": PHY2LOG}
TRT_META = {"num_experts": N + 2, "num_experts_per_token": 2}
TRT_COUNTS = {f"{it}_{li}": [(it + li + p) % 6 for p in range(N + 2)] for it in (100, 101) for li in range(LAYERS)}
TRT_LB = {"num_slots": N + 2, "layer_updates_per_iter": 0,
          "initial_global_assignments": {li: [5, 1, 7, 0, 3, 2, 6, 4, 5, 1] for li in range(LAYERS)}}

def _outcome(engine: str, inputs: list[Path], root: Path, placement: Path | None = None) -> None:
    (root / "config.json").write_text(json.dumps(CONFIG))
    out = root / "stats"
    try:
        stats = import_stats(engine, inputs, root / "config.json", out, placement=placement)
    except RQError as err:
        message = str(err)
        assert message and "\n" not in message, message
        assert not out.exists(), "a failed import left output behind"
        return
    back = CalibrationStats.load(out)
    assert len(back.layers) == LAYERS and all(bool((s.load >= 0).all()) for s in back.layers)
    assert [s.load.tolist() for s in back.layers] == [s.load.tolist() for s in stats.layers]


def _as_file(doc, path: Path, kind: str) -> Path:
    if kind == "json":
        path.write_text(json.dumps(doc))
    else:
        torch.save(doc, path)
    return path


@pytest.mark.parametrize("base", [SGLANG_STAT, SGLANG_PASS], ids=["stat", "per_pass"])
@pytest.mark.parametrize("kind", ["json", "pt"])
@FUZZ
@given(data=st.data())
def test_sglang_dump_edits(base, kind, data):
    doc = data.draw(edited(base))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _outcome("sglang", [_as_file(doc, root / f"dump.{kind}", kind)], root)


@pytest.mark.parametrize("kind", ["json", "pt"])
@FUZZ
@given(data=st.data())
def test_vllm_dump_edits(kind, data):
    doc = data.draw(edited(VLLM))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _outcome("vllm", [_as_file(doc, root / f"eplb.{kind}", kind)], root)


def _trtllm_folder(root: Path, meta, counts) -> Path:
    folder = root / "expert_statistic"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps(meta))
    tensors = {}
    for key, value in counts.items() if isinstance(counts, dict) else []:
        try:
            tensors[str(key)] = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            continue  # safetensors holds tensors only: an edit that is no tensor cannot be written
    save_file(tensors, str(folder / "rank0.safetensors"))
    return folder


@FUZZ
@given(data=st.data())
def test_trtllm_statistic_edits(data):
    meta = data.draw(edited(TRT_META)) if data.draw(st.booleans()) else TRT_META
    counts = data.draw(edited(TRT_COUNTS))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lb = root / "lb.yaml"
        lb.write_text(yaml.safe_dump(TRT_LB))
        _outcome("trtllm", [_trtllm_folder(root, meta, counts)], root, placement=lb)


@FUZZ
@given(data=st.data())
def test_trtllm_load_balancer_yaml_edits(data):
    doc = data.draw(edited(TRT_LB))
    if isinstance(doc, dict) and isinstance(doc.get("initial_global_assignments"), dict):
        table = doc["initial_global_assignments"]  # JSON made the layer keys strings; most stay ints as YAML writes
        doc["initial_global_assignments"] = {int(k) if str(k).isdigit() and data.draw(st.booleans()) else k: v
                                             for k, v in table.items()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lb = root / "lb.yaml"
        lb.write_text(yaml.safe_dump(doc))
        _outcome("trtllm", [_trtllm_folder(root, TRT_META, TRT_COUNTS)], root, placement=lb)


@pytest.mark.parametrize("name", ["dump.pt", "dump.json", "rank0.safetensors", "meta_info.json", "lb.yaml"])
@FUZZ
@given(data=st.data())
def test_byte_edits(name, data):
    """Truncated, overwritten or padded files of every kind rq import-loads opens."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = _trtllm_folder(root, TRT_META, TRT_COUNTS)
        lb = root / "lb.yaml"
        lb.write_text(yaml.safe_dump(TRT_LB))
        files = {"dump.pt": _as_file(SGLANG_STAT, root / "dump.pt", "pt"),
                 "dump.json": _as_file(VLLM, root / "dump.json", "json"),
                 "rank0.safetensors": folder / "rank0.safetensors", "meta_info.json": folder / "meta_info.json",
                 "lb.yaml": lb}
        target = files[name]
        raw = bytearray(target.read_bytes())
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
            op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
            if op == "flip" and raw:
                raw[pos] ^= data.draw(st.integers(1, 255))
            elif op == "truncate":
                del raw[pos:]
            else:
                raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        target.write_bytes(bytes(raw))
        engine = {"dump.pt": "sglang", "dump.json": "vllm"}.get(name, "trtllm")
        inputs = [files[name]] if engine != "trtllm" else [folder]
        _outcome(engine, inputs, root, placement=lb if engine == "trtllm" else None)


def test_the_unedited_documents_import():
    """The fuzzers start from files that import: an edit is what makes them fail."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "config.json").write_text(json.dumps(CONFIG))
        for engine, doc in (("sglang", SGLANG_STAT), ("sglang", SGLANG_PASS), ("vllm", VLLM)):
            out = root / f"s-{engine}-{len(doc)}"
            import_stats(engine, [_as_file(doc, root / f"{engine}.pt", "pt")], root / "config.json", out)
            assert CalibrationStats.load(out).layers[0].load.sum() > 0
        lb = root / "lb.yaml"
        lb.write_text(yaml.safe_dump(TRT_LB))
        stats = import_stats("trtllm", [_trtllm_folder(root, TRT_META, TRT_COUNTS)], root / "config.json",
                             root / "s-trt", placement=lb)
        slots = torch.tensor([sum(TRT_COUNTS[f"{it}_0"][p] for it in (100, 101)) for p in range(N + 2)])
        expected = torch.zeros(N, dtype=torch.int64).scatter_add_(0, torch.tensor(TRT_LB["initial_global_assignments"][0]),
                                                                  slots)
        assert torch.equal(stats.layers[0].load, expected.double()) and not math.isnan(float(stats.layers[0].load.sum()))
