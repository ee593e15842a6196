"""`rq place` output run through the engines' own code (SGLang, vLLM), where they are installed.

The engines are not rq dependencies (vLLM pulls a CUDA torch), so each check runs in an interpreter that has the
engine: the test interpreter when it imports it, else the one named by ``RQ_SGLANG_PYTHON`` / ``RQ_VLLM_PYTHON``
(a throw-away venv; docs/multi-gpu.md says how it was built). Without either the test is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rq.placement.dispatch import sglang_static_table, static_slot_loads
from rq.placement.servers import SGLANG_MODELS, VLLM_MODELS
from rq.placement.place import device_lis
from rq.placement.formats import model_shape
from rq.placement.loads import stats_from_loads
from rq.placement.fit import plan_loads
from rq.placement.run import place_plan
from rq.plan.planner import make_plan
from rq.plan.schema import load_plan, save_plan

CHECKS = Path(__file__).parent / "engine_checks"


def _python(module: str, env: str) -> str:
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    if os.environ.get(env):
        return os.environ[env]
    pytest.skip(f"{module} is not importable here and {env} names no interpreter that has it "
                f"(see docs/multi-gpu.md, 'What was verified against the engines')")


def _run(python: str, script: str, *args: str, extra_env: dict | None = None) -> dict:
    proc = subprocess.run([python, str(CHECKS / script), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(extra_env or {})})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RQ-RESULT ")), None)
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(line.removeprefix("RQ-RESULT "))


CONFIGS = {
    "deepseek_v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 5,
                    "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_routed_experts": 16, "num_experts_per_tok": 4,
                    "hidden_size": 256, "moe_intermediate_size": 128, "intermediate_size": 512, "hidden_act": "silu",
                    "n_group": 4, "topk_group": 2, "torch_dtype": "bfloat16", "vocab_size": 1000,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64, "q_lora_rank": None,
                    "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 32, "max_position_embeddings": 2048,
                    "rms_norm_eps": 1e-6, "n_shared_experts": 1, "routed_scaling_factor": 1.0,
                    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 3,
                "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": 256, "intermediate_size": 512,
                "hidden_act": "silu", "torch_dtype": "bfloat16", "vocab_size": 1000, "num_attention_heads": 4,
                "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
}


def _placement(tmp_path: Path, arch: str, devices: int, nodes: int = 1) -> tuple[Path, Path]:
    """A small model folder (config.json only) and `rq place`'s output for a plan of its shape."""
    torch.set_num_threads(1)
    cfg = CONFIGS[arch]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(model / "config.json")
    gen = torch.Generator().manual_seed(0)
    loads = (torch.empty(len(shape.moe_layers), shape.num_experts).exponential_(generator=gen) * 500).round()
    stats = stats_from_loads(loads.to(torch.int64), shape, "test loads")
    plan = make_plan(stats)
    save_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "placement"
    place_plan(tmp_path / "plan.json", devices=devices, nodes=nodes, out_dir=out, config=model / "config.json",
               stats_dir=None, plots=False, echo=None)
    return out, model


def _lis_from_tables(manifest: dict, plan_loads: torch.Tensor, tables: np.ndarray) -> float:
    """Mean device LIS of the calibration loads under SGLang's own static tables ``[G, H, N]``."""
    g, p = manifest["devices"], manifest["num_physical_experts"]
    loads = torch.stack([static_slot_loads(plan_loads[li], tables[:, d], p).view(g, -1).sum(-1)
                         for li, d in enumerate(manifest["decoder_layers"])])
    return float(device_lis(loads).mean())


@pytest.mark.slow
@pytest.mark.parametrize("devices,nodes", [(4, 1), (8, 1), (8, 2)])
def test_sglang_starts_from_every_printed_flag_set(tmp_path, devices, nodes):
    """Both SGLang flag sets (recommended dispatch and the other) through ServerArgs + resolve_once, the widths the
    model runner derives, the metadata of every EP rank; SGLang's own static tables equal rq's replay, so the
    device LIS rq reports for static dispatch is SGLang's."""
    python = _python("sglang", "RQ_SGLANG_PYTHON")
    out, model = _placement(tmp_path, "deepseek_v3", devices, nodes)
    manifest = json.loads((out / "placement.json").read_text())
    res = _run(python, "sglang_check.py", str(out), str(model),
               ",".join(cls for cls, _ in SGLANG_MODELS.values() if cls is not None))
    print("SGLang", res["version"], {k: v["argv"] for k, v in res["runs"].items()})
    rows = res["file_rows"]
    assert len(rows) == CONFIGS["deepseek_v3"]["num_hidden_layers"]
    modes = {}
    for key, run in res["runs"].items():
        assert run["tp"] == run["ep"] == devices and run["nnodes"] == nodes
        assert run["moe_tp_size"] >= 1 and run["moe_ep_size"] == devices
        assert run["metadata"] and run["map"] == run["file_rows"]
        assert len(run["file_rows"]) == len(rows)
        modes[key] = run["dispatch"]
    recommended = manifest["dispatch"]["recommended"]["sglang"].removeprefix("sglang-")
    assert modes["sglang"] == recommended and set(modes.values()) == {"dynamic", "static"}
    static = next(run for run in res["runs"].values() if run["dispatch"] == "static")
    theirs = np.array(static["static_tables"])
    assert (sglang_static_table(torch.tensor(static["file_rows"]), devices, nodes) == theirs).all()
    plan = load_plan(tmp_path / "plan.json")
    reported = next(r for r in manifest["dispatch"]["modes"] if r["mode"] == "sglang-static")
    measured = _lis_from_tables(manifest, plan_loads(plan, None).to(torch.float64), theirs)
    assert abs(reported["rq"]["calibration"]["device_lis_mean"] / measured - 1) < 0.01
    assert res["models"] == {cls: ok for cls, ok in SGLANG_MODELS.values() if cls is not None}, \
        "engines.SGLANG_MODELS is out of date"


@pytest.mark.slow
def test_sglang_mixtral_takes_no_placement(tmp_path):
    python = _python("sglang", "RQ_SGLANG_PYTHON")
    out, model = _placement(tmp_path, "mixtral", 4)
    res = _run(python, "sglang_check.py", str(out), str(model))
    assert not res["takes_placement_flags"]
    assert res.get("dispatch_error") == "Expert dispatch requires placement metadata" or \
        not res["runs"]["forced"]["metadata"]


@pytest.mark.slow
@pytest.mark.parametrize("devices,nodes", [(4, 1), (8, 1), (8, 2)])
def test_vllm_config_accepts_the_flags_and_cannot_load_the_map(tmp_path, devices, nodes):
    python = _python("vllm", "RQ_VLLM_PYTHON")
    out, model = _placement(tmp_path, "deepseek_v3", devices, nodes)
    manifest = json.loads((out / "placement.json").read_text())
    archs = [cls for cls, _ in VLLM_MODELS.values() if cls is not None]
    res = _run(python, "vllm_check.py", str(out), str(model), ",".join(archs),
               extra_env={"VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cpu")})
    print("vLLM", res["version"], res["parallel"])
    par = res["parallel"]
    assert par["eplb"] and par["ep_enabled"] and par["tp"] * par["dp"] == devices
    assert par["dp_local"] == devices // nodes and par["redundant"] == manifest["num_redundant_experts"]
    assert res["initial_map_refused"], "vLLM now takes initial_expert_map_path: update engines.py and the docs"
    n, r = manifest["num_logical_experts"], manifest["num_redundant_experts"]
    assert res["initial_map"] == list(range(n)) + [i % n for i in range(r)]
    assert res["moe"] == {cls: ok for cls, ok in VLLM_MODELS.values() if cls is not None}, \
        "engines.VLLM_MODELS is out of date"
