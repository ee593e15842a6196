"""SGLang's static dispatch balanced by the layout (rq.placement.static): the layout keeps every copy and device
slot count, its static device loads are what SGLang's tables (rq's exact replay) give, and they are balanced
where the placement for the even split was not."""

import numpy as np
import pytest
import torch

from rq.placement.dispatch import device_loads, sglang_static_table
from rq.placement.formats import sglang_rows
from rq.placement.place import device_lis, place
from rq.placement.static import balance_static, static_device_loads


def _case(seed: int, n: int, layers: int, gpus: int, per_gpu: int):
    gen = torch.Generator().manual_seed(seed)
    load = ((torch.empty(layers, n).exponential_(generator=gen) + 0.3) * 1000).round().to(torch.int64)
    extra = gpus * per_gpu - n
    logcnt = torch.ones(layers, n, dtype=torch.int64)
    for li in range(layers):
        for _ in range(extra):  # replicas to the highest load per copy, at most one per device
            per_copy = torch.where(logcnt[li] < gpus, load[li] / logcnt[li], torch.zeros(n, dtype=torch.float64))
            logcnt[li, int(per_copy.argmax())] += 1
    return load, logcnt


def _static_lis(load, phy2log, decoder, num_hidden, gpus, nodes):
    n = load.shape[1]
    tables = sglang_static_table(sglang_rows(phy2log, decoder, num_hidden, n), gpus, nodes)[:, decoder]
    return device_lis(device_loads("sglang-static", load.to(torch.float64), phy2log, gpus, static_tables=tables))


@pytest.mark.parametrize("gpus,nodes,groups", [(4, 1, 1), (8, 1, 1), (8, 2, 1), (8, 2, 4)])
def test_static_layout_balances_static_dispatch(gpus, nodes, groups):
    n, layers = 32, 3
    load, logcnt = _case(gpus + nodes, n, layers, gpus, 6)
    phy2log, _, placed = place(load, logcnt, gpus, nodes, groups)
    decoder, num_hidden = [1, 2, 4], 5  # dense decoder layers draw from the ranks' streams too
    grouped = nodes > 1 and groups > 1
    static = balance_static(load, phy2log, decoder, num_hidden, gpus, nodes, node_locked=grouped)
    per_gpu = phy2log.shape[1] // gpus
    for li in range(layers):  # same copies; every device keeps its slot count and its copies apart
        assert torch.equal(torch.bincount(static[li], minlength=n), placed[li])
        for d in range(gpus):
            block = static[li, d * per_gpu:(d + 1) * per_gpu]
            assert block.unique().numel() == block.numel()
        if grouped:  # copies stay on their node
            half = phy2log.shape[1] // nodes
            for nd in range(nodes):
                assert sorted(static[li, nd * half:(nd + 1) * half].tolist()) == \
                    sorted(phy2log[li, nd * half:(nd + 1) * half].tolist())
    before = _static_lis(load, phy2log, decoder, num_hidden, gpus, nodes)
    after = _static_lis(load, static, decoder, num_hidden, gpus, nodes)
    assert float(after.mean()) <= min(float(before.mean()), 1.05)
    if not grouped:  # copies pinned to their node (16 experts per node here) leave the search less room
        assert float(after.max()) <= 1.05


def test_static_device_loads_follow_the_tables():
    load, logcnt = _case(0, 16, 1, 4, 6)
    phy2log, _, _ = place(load, logcnt, 4)
    table = sglang_static_table(phy2log, 4, 1)[:, 0]
    mine = static_device_loads(table, load[0].to(torch.float64).numpy(), phy2log.shape[1])
    ref = device_loads("sglang-static", load.to(torch.float64), phy2log, 4, static_tables=table[:, None])[0]
    assert np.allclose(mine, ref.numpy())


def test_place_writes_the_static_layout_and_reports_it(tmp_path):
    """`rq place` on a DeepSeek-V3-shaped model: SGLang's static flags read their own layout, whose rows hold the
    same copies as the main file; the static row of the report is that layout's replayed device LIS."""
    import json

    from rq.placement import FILENAMES, SGLANG_STATIC_FILENAME
    from rq.placement.fit import plan_loads
    from rq.placement.formats import model_shape
    from rq.placement.loads import stats_from_loads
    from rq.placement.run import place_plan
    from rq.plan.planner import make_plan
    from rq.plan.schema import load_plan, save_plan

    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 4,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 32, "num_experts_per_tok": 4,
           "hidden_size": 64, "moe_intermediate_size": 32, "intermediate_size": 128, "n_group": 4, "topk_group": 2,
           "torch_dtype": "bfloat16", "vocab_size": 100, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(tmp_path / "config.json")
    gen = torch.Generator().manual_seed(3)
    loads = ((torch.empty(len(shape.moe_layers), 32).exponential_(generator=gen) + 0.3) * 800).round()
    save_plan(make_plan(stats_from_loads(loads.to(torch.int64), shape, "test loads")), tmp_path / "plan.json")
    out = tmp_path / "placement"
    manifest = place_plan(tmp_path / "plan.json", devices=8, out_dir=out, config=tmp_path / "config.json",
                          plots=False, echo=None)
    flags = manifest["engine_flags"]
    static_flags = next(v for k, v in flags.items() if k.startswith("sglang") and "deepep" in v)
    assert str(out / SGLANG_STATIC_FILENAME) in static_flags
    dynamic_flags = next(v for k, v in flags.items() if k.startswith("sglang") and "deepep" not in v)
    assert str(out / FILENAMES["sglang"]) in dynamic_flags
    assert manifest["files"]["sglang-static"] == SGLANG_STATIC_FILENAME
    main = torch.tensor(json.loads((out / FILENAMES["sglang"]).read_text())["physical_to_logical_map"])
    rows = torch.tensor(json.loads((out / SGLANG_STATIC_FILENAME).read_text())["physical_to_logical_map"])
    assert rows.shape == main.shape and torch.equal(rows[0], main[0])  # the dense layer's trivial row
    for h in range(rows.shape[0]):
        assert torch.equal(torch.bincount(rows[h], minlength=32), torch.bincount(main[h], minlength=32))
    decoder = manifest["decoder_layers"]
    plan_load = plan_loads(load_plan(tmp_path / "plan.json"), None).to(torch.float64)
    tables = sglang_static_table(rows, 8, 1)[:, decoder]
    lis = device_lis(device_loads("sglang-static", plan_load, rows[decoder], 8, static_tables=tables))
    reported = next(r for r in manifest["dispatch"]["modes"] if r["mode"] == "sglang-static")["rq"]["calibration"]
    assert reported["device_lis_mean"] == pytest.approx(float(lis.mean()), rel=1e-9)
    assert reported["device_lis_worst"] <= 1.05
    report = (out / "report.md").read_text()
    assert "## Recommended dispatch per engine" in report and "engine_flags.sglang-alternative" in report
    assert len(manifest["dispatch"]["advice"]) == 4


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (8, 2)])
def test_incremental_static_loads_equal_the_full_replay(gpus, nodes):
    """The search's exact static loads: from scratch they are SGLang's tables (rq's replay); after a swap within a
    node, redrawing only the two ranks whose copies moved gives the same loads as drawing every rank anew."""
    import random

    from rq.placement.dispatch import SGLANG_SEED, static_layer_table
    from rq.placement.static import _Layer

    load, logcnt = _case(5, 24, 1, gpus, 5)
    phy2log, _, _ = place(load, logcnt, gpus, nodes)
    owner = phy2log[0].numpy().copy()
    rngs = [random.Random(SGLANG_SEED) for _ in range(gpus)]
    static_layer_table(np.arange(owner.size) % 24, gpus, nodes, rngs)  # a dense layer before it
    layer = _Layer(owner, load[0].to(torch.float64).numpy(), gpus, nodes, [r.getstate() for r in rngs])
    device = np.arange(owner.size) // (owner.size // gpus)
    loads, _, state = layer.evaluate(device)
    table = static_layer_table(layer.row(device)[0], gpus, nodes, [_state(s) for s in layer.states])
    assert np.allclose(loads, static_device_loads(table, layer.load, owner.size))
    rng = np.random.default_rng(1)
    per_node = gpus // nodes
    checked = 0
    while checked < 20:
        i, j = rng.integers(0, owner.size, size=2)
        p, q = device[i], device[j]
        if p == q or p // per_node != q // per_node or owner[i] == owner[j]:
            continue
        held = {(int(d), int(e)) for d, e in zip(device, owner)}
        if (int(q), int(owner[i])) in held or (int(p), int(owner[j])) in held:
            continue  # the search keeps copies of an expert apart
        cand = device.copy()
        cand[i], cand[j] = q, p
        full = layer.evaluate(cand)
        fast = layer.evaluate(cand, state, (int(owner[i]), int(owner[j]), int(p), int(q)))
        assert np.allclose(full[0], fast[0]) and np.allclose(full[1], fast[1])
        assert (full[2][0] == fast[2][0]).all()
        if checked % 3 == 0:  # walk on: the next swap starts from this layout's state
            device, state = cand, fast[2]
        checked += 1


def _state(state):
    import random

    rng = random.Random()
    rng.setstate(state)
    return rng
