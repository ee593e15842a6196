"""Expert-parallel placement (docs/spec.md §7): packing invariants, the engine files checked against the rules each
engine applies when loading them, the EPLB baseline, importers of engine load dumps, constraint errors."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from rq.errors import RQError
from rq.placement.place import (balanced_packing, colocated, device_lis, device_loads, eplb_rebalance, fit_logcnt,
                          lpt_bound, place, place_layer, replicate_experts, trivial_placement,
                          unavoidable_colocated)
from rq.cli.main import app
from rq.placement.run import import_stats, place_plan
from rq.placement import FILENAMES
from rq.placement.formats import model_shape, write_vllm_ascend
from rq.placement.loads import read_sglang_loads, read_vllm_loads
from rq.plan.planner import PlanOptions, make_plan
from rq.core.replica import copy_index, phy2log, split_load
from rq.plan.schema import save_plan
from rq.calibrate.stats import CalibrationStats
from rq.testing.synthetic import synthetic_stats


def _random_layer(seed: int, max_experts: int = 64, max_gpus: int = 8):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, max_experts, (1,), generator=gen))
    gpus = int(torch.randint(1, max_gpus + 1, (1,), generator=gen))
    load = (torch.empty(n).exponential_(generator=gen) ** 2 * 100).round()
    logcnt = 1 + torch.randint(0, 5, (n,), generator=gen) * (torch.rand(n, generator=gen) < 0.3)
    num_phy = min(math.ceil(int(logcnt.sum()) / gpus) * gpus, n * gpus)
    return load, fit_logcnt(load, logcnt, num_phy, gpus), gpus


# ----------------------------------------------------------------------------- packing invariants

@pytest.mark.parametrize("seed", range(40))
def test_placement_invariants_single_node(seed):
    load, fitted, gpus = _random_layer(seed)
    slots, log2phy, logcnt = place_layer(load, fitted, gpus)
    num_phy = int(logcnt.sum())
    assert num_phy == int(fitted.sum()) and int(logcnt.min()) >= 1 and int(logcnt.max()) <= gpus
    owner, copy = phy2log(logcnt), copy_index(logcnt)
    # every copy placed exactly once: log2phy is a bijection from copies onto slots, consistent with phy2log
    assert sorted(log2phy[owner, copy].tolist()) == list(range(num_phy))
    assert torch.equal(slots[log2phy[owner, copy]], owner)
    assert int((log2phy >= 0).sum(-1).sub(logcnt).abs().sum()) == 0
    # equal copies per device, by construction of device-major slots with P % G == 0
    assert num_phy % gpus == 0
    # no device beyond the list-scheduling (LPT) bound on the per-copy loads of the replica rule
    dev = device_loads(load[None], log2phy[None], logcnt[None], gpus)[0]
    assert float(dev.max()) <= lpt_bound(split_load(load, logcnt).double(), gpus) + 1e-9
    assert float(dev.sum()) == pytest.approx(float(load.sum()))
    # two copies of an expert share a device only where unavoidable (more copies than devices)
    assert colocated(slots, gpus) == unavoidable_colocated(logcnt, gpus)
    # moving replicas never leaves the devices less balanced than packing the fitted counts
    fixed = place_layer(load, fitted, gpus, rebalance=False)
    assert float(dev.max()) <= float(device_loads(load[None], fixed[1][None], fitted[None], gpus)[0].max()) + 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_placement_invariants_hierarchical(seed):
    load, logcnt, gpus = _random_layer(seed, max_gpus=8)
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    nodes = divisors[seed % len(divisors)]
    slots, log2phy, logcnt = place_layer(load, logcnt, gpus, nodes)
    owner, copy = phy2log(logcnt), copy_index(logcnt)
    assert sorted(log2phy[owner, copy].tolist()) == list(range(int(logcnt.sum())))
    assert colocated(slots, gpus) <= unavoidable_colocated(logcnt, gpus)


@pytest.mark.parametrize("seed", range(5))
def test_router_groups_keep_their_primaries_on_one_node(seed):
    gen = torch.Generator().manual_seed(seed)
    n, gpus, nodes, groups = 64, 8, 2, 8
    load = (torch.empty(n).exponential_(generator=gen) ** 2 * 100).round()
    logcnt = fit_logcnt(load, torch.ones(n, dtype=torch.int64), 80, gpus)
    slots, log2phy, logcnt = place_layer(load, logcnt, gpus, nodes, groups)
    per_node = slots.numel() // nodes
    primary_node = log2phy[:, 0] // per_node  # [N]
    for g in range(groups):
        assert primary_node[g * 8:(g + 1) * 8].unique().numel() == 1
    assert colocated(slots, gpus) == 0
    assert torch.bincount(primary_node, minlength=nodes).tolist() == [n // nodes] * nodes


def test_original_precision_primaries_are_spread_over_devices():
    gen = torch.Generator().manual_seed(7)
    n, gpus = 32, 4
    load = (torch.empty(n).exponential_(generator=gen) ** 2 * 100).round()
    logcnt = fit_logcnt(load, torch.ones(n, dtype=torch.int64), 48, gpus)
    original = torch.arange(n) % 3 == 0  # 11 primaries at original precision, the other copies INT4
    slots, log2phy, logcnt = place_layer(load, logcnt, gpus, original=original)
    per_device = torch.bincount(log2phy[original, 0] // (48 // gpus), minlength=gpus)
    assert int(per_device.max()) <= math.ceil(11 / gpus)
    assert colocated(slots, gpus) == 0


def test_balanced_packing_cardinality_and_eplb_mode():
    weight = torch.tensor([9.0, 7, 6, 5, 4, 3, 2, 1])
    pack = balanced_packing(weight, 4, refine=False)
    assert torch.bincount(pack, minlength=4).tolist() == [2, 2, 2, 2]
    loads = torch.zeros(4).index_add_(0, pack, weight)
    assert float(loads.max()) <= lpt_bound(weight, 4)


def test_refinement_never_worsens_the_greedy():
    for seed in range(10):
        w = torch.empty(48).exponential_(generator=torch.Generator().manual_seed(seed))
        greedy = torch.zeros(6).index_add_(0, balanced_packing(w, 6, refine=False), w).max()
        refined = torch.zeros(6).index_add_(0, balanced_packing(w, 6), w).max()
        assert float(refined) <= float(greedy) + 1e-12


def test_fit_logcnt_pads_trims_and_caps():
    load = torch.tensor([800.0, 100, 60, 40])
    assert fit_logcnt(load, torch.tensor([1, 1, 1, 1]), 8, 4).tolist() == [4, 2, 1, 1]
    assert fit_logcnt(load, torch.tensor([6, 1, 1, 1]), 8, 4).tolist() == [4, 2, 1, 1]  # capped at G, refilled
    assert fit_logcnt(load, torch.tensor([4, 3, 2, 1]), 6, 4).tolist() == [3, 1, 1, 1]
    with pytest.raises(ValueError):
        fit_logcnt(load, torch.ones(4, dtype=torch.int64), 20, 4)


# ----------------------------------------------------------------------------- EPLB baseline

def test_replicate_experts_is_greedy_by_per_copy_load():
    weight = torch.tensor([90.0, 30, 20, 10])
    assert replicate_experts(weight, 7).tolist() == [4, 1, 1, 1]  # 90/4 = 22.5 > 20 only after 3 replicas
    assert replicate_experts(weight, 8).tolist() == [4, 2, 1, 1]


@pytest.mark.parametrize("groups,nodes", [(1, 1), (4, 2), (3, 2)])
def test_eplb_rebalance_shapes_and_consistency(groups, nodes):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 500, (3, 24), generator=gen).double()
    phy2log, log2phy, logcnt = eplb_rebalance(weight, 32, groups, nodes, 8)
    assert phy2log.shape == (3, 32) and logcnt.shape == (3, 24)
    assert logcnt.sum(-1).tolist() == [32, 32, 32]
    for li in range(3):
        assert torch.equal(torch.bincount(phy2log[li], minlength=24), logcnt[li])
        for e in range(24):
            slots = log2phy[li, e][log2phy[li, e] >= 0]
            assert slots.numel() == logcnt[li, e] and bool((phy2log[li, slots] == e).all())


# ----------------------------------------------------------------------------- engine files

@pytest.fixture(scope="module")
def deepseek_like(tmp_path_factory):
    """DeepSeek-V3 shapes (256 experts, top-8, 8 router groups) on 2 MoE layers, and a matching config."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("deepseek")
    stats = synthetic_stats("deepseek_v3", num_layers=2, tokens=8192)
    stats.save(root / "calib")
    plan = make_plan(stats, PlanOptions(max_replicas=3))
    save_plan(plan, root / "plan.json")
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 5, "first_k_dense_replace": 3, "moe_layer_freq": 1,
              "n_routed_experts": 256, "num_experts_per_tok": 8, "hidden_size": 7168, "moe_intermediate_size": 2048,
              "intermediate_size": 18432, "hidden_act": "silu", "n_group": 8, "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(config))
    return root, plan


def _check_map(rows, num_experts: int, num_gpus: int, num_phy: int):
    for row in rows:
        assert len(row) == num_phy and num_phy % num_gpus == 0
        assert all(isinstance(v, int) and 0 <= v < num_experts for v in row)
        assert set(row) == set(range(num_experts)), "every logical expert needs a slot in every layer"


def _check_files(out, plan, num_gpus: int, num_hidden: int, decoder: list[int]):
    n, num_moe = plan.model.num_experts, len(plan.layers)
    manifest = json.loads((out / "placement.json").read_text())
    num_phy = manifest["num_physical_experts"]
    assert manifest["num_redundant_experts"] == num_phy - n and manifest["decoder_layers"] == decoder

    # SGLang: init_by_mapping(server_args, model_config, **data) -> exactly one key; [num_hidden_layers, P]
    sglang = json.loads((out / FILENAMES["sglang"]).read_text())
    assert list(sglang) == ["physical_to_logical_map"]
    rows = sglang["physical_to_logical_map"]
    assert len(rows) == num_hidden
    _check_map(rows, n, num_gpus, num_phy)
    for d in set(range(num_hidden)) - set(decoder):
        assert rows[d] == [p % n for p in range(num_phy)]

    # vLLM: physical_to_logical_map [num_moe_layers, num_physical_experts]
    vllm = json.loads((out / FILENAMES["vllm"]).read_text())
    assert len(vllm) == num_moe
    _check_map(vllm, n, num_gpus, num_phy)
    assert [rows[d] for d in decoder] == vllm

    # vLLM-Ascend expert_map_path: equal experts per device (it builds a rectangular tensor), each once
    ascend = json.loads((out / FILENAMES["vllm-ascend"]).read_text())
    assert ascend["moe_layer_count"] == num_moe and len(ascend["layer_list"]) == num_moe
    for li, layer in enumerate(ascend["layer_list"]):
        assert layer["device_count"] == num_gpus == len(layer["device_list"])
        flat = []
        for dev in layer["device_list"]:
            assert len(dev["device_expert"]) == num_phy // num_gpus
            assert len(set(dev["device_expert"])) == len(dev["device_expert"])
            flat += dev["device_expert"]
        assert flat == vllm[li]

    # TensorRT-LLM MoeLoadBalancerConfig (strict model: these three keys), rank-major slots, decoder layer keys
    trt = yaml.safe_load((out / FILENAMES["trtllm"]).read_text())
    assert set(trt) == {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    assert trt["num_slots"] == num_phy and trt["num_slots"] % num_gpus == 0 and trt["layer_updates_per_iter"] == 0
    assert sorted(trt["initial_global_assignments"]) == decoder
    assert [trt["initial_global_assignments"][d] for d in decoder] == vllm

    # DeepSeek EPLB tensors
    t = load_file(str(out / FILENAMES["eplb"]))
    phy2log, log2phy, logcnt = t["phy2log"], t["log2phy"], t["logcnt"]
    assert phy2log.shape == (num_moe, num_phy) and logcnt.shape == (num_moe, n)
    assert log2phy.shape == (num_moe, n, int(logcnt.max()))
    assert t["decoder_layer"].tolist() == decoder and phy2log.tolist() == vllm
    assert bool((logcnt.sum(-1) == num_phy).all())
    for li in range(num_moe):
        for e in range(n):
            valid = log2phy[li, e, :int(logcnt[li, e])]
            assert bool((valid >= 0).all()) and bool((log2phy[li, e, int(logcnt[li, e]):] == -1).all())
            assert bool((phy2log[li, valid] == e).all())
    return manifest


def test_all_formats_for_mixtral_plan(mixtral_plan):
    root, plan = mixtral_plan
    out = root / "out"
    manifest = place_plan(root / "plan.json", devices=4, out_dir=out, stats_dir=root / "calib",
                             heldout_stats=root / "held", echo=None)
    _check_files(out, plan, 4, 3, [0, 1, 2])
    rows = {r["method"]: r for r in manifest["simulation"]}
    assert rows["rq"]["calibration"]["device_lis_mean"] < rows["before"]["calibration"]["device_lis_mean"]
    assert rows["eplb_same_slots"]["slots"] == rows["rq"]["slots"] == manifest["num_physical_experts"]
    assert "held-out" in rows["rq"]
    assert (out / "report.md").read_text().count("| R&Q placement |") == 1
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["layer_000.png", "layer_001.png", "layer_002.png",
                                                                 "summary.png"]


def test_all_formats_for_deepseek_shapes_on_two_nodes(deepseek_like):
    root, plan = deepseek_like
    out = root / "out"
    manifest = place_plan(root / "plan.json", devices=16, nodes=2, out_dir=out, config=root / "config.json",
                             plots=False, echo=None)
    assert manifest["groups"] == 8 and manifest["num_hidden_layers"] == 5
    _check_files(out, plan, 16, 5, [3, 4])
    rows = {r["method"]: r for r in manifest["simulation"]}
    assert rows["rq"]["calibration"]["device_lis_mean"] < rows["before"]["calibration"]["device_lis_mean"]


def test_pad_modes_and_slots_per_device(mixtral_plan):
    root, plan = mixtral_plan
    counts = [sum(layer.logcnt) for layer in plan.layers]
    trim = place_plan(root / "plan.json", devices=4, out_dir=root / "trim", pad="trim", plots=False, echo=None)
    assert trim["num_physical_experts"] == min(counts) // 4 * 4
    fixed = place_plan(root / "plan.json", devices=2, out_dir=root / "fixed", slots_per_device=6,
                          formats="trtllm", plots=False, echo=None)
    assert fixed["num_physical_experts"] == 12 and fixed["files"] == {"trtllm": FILENAMES["trtllm"]}


# ----------------------------------------------------------------------------- constraint errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(devices=6, nodes=4), "multiple of --nodes"),
    (dict(devices=4, slots_per_device=1), "every expert needs a slot"),
    (dict(devices=4, slots_per_device=9), "two copies of one expert"),
    (dict(devices=4, pad="error"), "same P in every layer"),
    (dict(devices=4, pad="sideways"), "--pad must be"),
    (dict(devices=4, formats="sglang,onnx"), "unknown format"),
    (dict(devices=4, groups=3), "must divide"),
])
def test_constraint_errors_are_one_line(mixtral_plan, kwargs, match):
    root, _ = mixtral_plan
    with pytest.raises(RQError, match=match) as err:
        place_plan(root / "plan.json", out_dir=root / "err", plots=False, echo=None, **kwargs)
    assert "\n" not in str(err.value)


def test_vllm_ascend_refuses_an_expert_twice_on_a_device(tmp_path):
    with pytest.raises(RQError, match="at most once"):
        write_vllm_ascend(tmp_path / "x.json", torch.tensor([[0, 0, 1, 2]]), 2)


def test_stats_of_another_model_are_refused(mixtral_plan, deepseek_like):
    root, _ = mixtral_plan
    with pytest.raises(RQError, match="another model"):
        place_plan(root / "plan.json", devices=4, out_dir=root / "e2", stats_dir=deepseek_like[0] / "calib",
                      plots=False, echo=None)


def test_cli_prints_error_without_traceback(mixtral_plan):
    root, _ = mixtral_plan
    result = CliRunner().invoke(app, ["place", str(root / "plan.json"), "--devices", "6", "--nodes", "4",
                                      "--out", str(root / "cli")])
    assert result.exit_code == 2 and "must be a positive multiple of --nodes" in result.output
    assert "Traceback" not in result.output
    ok = CliRunner().invoke(app, ["place", str(root / "plan.json"), "--devices", "2", "--out", str(root / "cli"),
                                  "--no-plots", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert (root / "cli" / FILENAMES["sglang"]).is_file()


# ----------------------------------------------------------------------------- importers

@pytest.fixture()
def small_config(tmp_path):
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 4, "first_k_dense_replace": 1, "n_routed_experts": 16,
              "num_experts_per_tok": 4, "hidden_size": 256, "moe_intermediate_size": 128, "hidden_act": "silu",
              "n_group": 4, "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_model_shape_from_config(small_config, tmp_path):
    shape = model_shape(small_config)
    assert shape.moe_layers == (1, 2, 3) and shape.num_experts == 16 and shape.top_k == 4 and shape.num_groups == 4
    assert shape.expert_bytes == 3 * 256 * 128 * 2 and shape.fingerprint.startswith("config-sha256:")
    qwen = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [],
            "num_experts": 8, "num_experts_per_tok": 2, "hidden_size": 64, "moe_intermediate_size": 64}
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text(json.dumps(qwen))
    assert model_shape(tmp_path / "q").moe_layers == (1, 3)


def test_sglang_stat_dump_round_trip(small_config, tmp_path):
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (5, 4, 16), generator=gen, dtype=torch.int32)  # [steps, decoder layers, N]
    counts[:, 0] = 0  # the dense layer
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, tmp_path / "d.pt")
    stats = import_stats("sglang", [tmp_path / "d.pt"], config=small_config, out=tmp_path / "stats")
    back = CalibrationStats.load(tmp_path / "stats")
    expected = counts.sum(0)[1:].double()
    for i, layer in enumerate(back.layers):
        assert torch.equal(layer.load, expected[i]) and torch.equal(layer.quant_sensitivity, expected[i])
        assert layer.path == f"model.layers.{i + 1}.mlp.experts"
    assert back.model.fingerprint == stats.model.fingerprint and back.calibration.tokens > 0
    plan = make_plan(back)  # imported stats plan like calibrated ones, and place with the model's config
    save_plan(plan, tmp_path / "plan.json")
    manifest = place_plan(tmp_path / "plan.json", devices=4, nodes=2, out_dir=tmp_path / "out",
                             stats_dir=tmp_path / "stats", config=small_config, plots=False, echo=None)
    assert manifest["decoder_layers"] == [1, 2, 3] and manifest["groups"] == 4
    rows = json.loads((tmp_path / "out" / FILENAMES["sglang"]).read_text())["physical_to_logical_map"]
    assert len(rows) == 4 and rows[0] == [p % 16 for p in range(manifest["num_physical_experts"])]


def test_decoder_layers_fall_back_to_moe_ordinals(mixtral_plan):
    from rq.placement.formats import decoder_layers

    _, plan = mixtral_plan
    assert decoder_layers(plan) == [0, 1, 2]
    encdec = plan.model_copy(update={"layers": [
        layer.model_copy(update={"module": f"{side}.block.1.layer.1.mlp.experts"})
        for layer, side in zip(plan.layers, ("encoder", "decoder", "decoder"))]})
    assert decoder_layers(encdec) == [0, 1, 2]


def test_sglang_per_pass_dump_maps_physical_to_logical(tmp_path):
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 1]])
    rec = [{"forward_pass_id": i, "rank": 0, "gatherer_key": "primary",
            "global_physical_count": torch.tensor([[1, 2, 3, 4, 5, 6]])} for i in range(2)]
    torch.save({"records": rec, "last_physical_to_logical_map": phy2log}, tmp_path / "r0.pt")
    assert read_sglang_loads([tmp_path / "r0.pt"]).tolist() == [[12, 16, 6, 8]]


def test_vllm_window_round_trip(small_config, tmp_path):
    phy2log = torch.stack([torch.cat([torch.arange(16), torch.tensor([0, 5, 7, 9])])] * 3)  # 20 physical
    window = torch.randint(0, 30, (7, 3, 20), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    torch.save({"expert_load_window": window, "physical_to_logical_map": phy2log}, tmp_path / "v.pt")
    loads = read_vllm_loads([tmp_path / "v.pt"], 16)
    expected = torch.zeros(3, 16, dtype=torch.int64).scatter_add_(-1, phy2log, window.sum(0).long())
    assert torch.equal(loads, expected)
    stats = import_stats("vllm", [tmp_path / "v.pt"], config=small_config, out=tmp_path / "s")
    assert torch.equal(torch.stack([l.load for l in stats.layers]), expected.double())
    torch.save(expected, tmp_path / "logical.pt")  # a bare [L, N] logical tensor works too
    assert torch.equal(read_vllm_loads([tmp_path / "logical.pt"], 16), expected)


def test_trtllm_statistic_folder_round_trip(small_config, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "expert_statistic"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": 16, "num_experts_per_token": 4}))
    gen = torch.Generator().manual_seed(2)
    data = {r: {f"{it}_{layer}": torch.randint(0, 9, (16,), generator=gen, dtype=torch.int32)
                for it in (100, 101) for layer in (1, 2, 3)} for r in (0, 1)}
    for r, tensors in data.items():
        save_file(tensors, str(folder / f"rank{r}.safetensors"))
    stats = import_stats("trtllm", [folder], config=small_config, out=tmp_path / "s", placement=Path("none"))
    for i, layer in enumerate((1, 2, 3)):
        expected = sum(data[r][f"{it}_{layer}"].long() for r in (0, 1) for it in (100, 101))
        assert torch.equal(stats.layers[i].load, expected.double())


@pytest.mark.parametrize("engine,payload,match", [
    ("sglang", {"something": 1}, "not an SGLang expert-distribution dump"),
    ("vllm", {"expert_load_window": torch.zeros(2, 3, 20, dtype=torch.int32)}, "physical_to_logical_map"),
    ("vllm", torch.zeros(3, 16, dtype=torch.int64), "no routed tokens"),
    ("vllm", torch.ones(2, 16, dtype=torch.int64), "config describes 3 MoE layers"),
    ("onnx", torch.ones(3, 16), "unknown engine"),
])
def test_import_errors(small_config, tmp_path, engine, payload, match):
    torch.save(payload, tmp_path / "d.pt")
    with pytest.raises(RQError, match=match):
        import_stats(engine, [tmp_path / "d.pt"], config=small_config, out=tmp_path / "s")


# ----------------------------------------------------------------------------- synthetic shapes, simulation

def test_synthetic_shapes():
    ds = synthetic_stats("deepseek_v3", tokens=1024)
    assert len(ds.layers) == 58 and ds.model.num_experts == 256 and ds.model.top_k == 8
    assert ds.layers[0].path == "model.layers.3.mlp.experts" and ds.layers[-1].path == "model.layers.60.mlp.experts"
    assert ds.layers[0].original_bytes[0] == 3 * 7168 * 2048 * 2 and ds.layers[0].quantizable
    mx = synthetic_stats("mixtral", tokens=1024)
    assert (len(mx.layers), mx.model.num_experts, mx.model.top_k, mx.model.hidden_size) == (32, 8, 2, 4096)
    again = synthetic_stats("mixtral", tokens=1024)
    assert torch.equal(mx.layers[5].load, again.layers[5].load)  # seeded
    held = synthetic_stats("mixtral", tokens=1024, drift=0.25, sample_seed=1)
    assert not torch.equal(mx.layers[5].load, held.layers[5].load)


def test_simulation_trivial_and_rq_on_deepseek_shapes():
    stats = synthetic_stats("deepseek_v3", num_layers=2, tokens=8192)
    load = torch.stack([s.load for s in stats.layers])
    before = device_loads(load, *trivial_placement(2, 256)[1:], 32)
    logcnt = torch.stack([fit_logcnt(load[i], torch.ones(256, dtype=torch.int64), 288, 32) for i in range(2)])
    phy2log, log2phy, logcnt = place(load, logcnt, 32, 4, 8)
    after = device_loads(load, log2phy, logcnt, 32)
    assert torch.allclose(before.sum(-1), after.sum(-1))
    assert bool((device_lis(after) < device_lis(before)).all())
