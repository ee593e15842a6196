"""The Triton models' load telemetry (engines/tritonserver_models/rq_telemetry.py) without a server.

Per-copy loads from ``(expert_counts, offsets)`` must equal the replica rule applied assignment by assignment
(``rq.core.replica.assign_copies``), and the LIS gauges must follow docs/spec.md §2 (no instantaneous LIS for calls with
fewer assignments than units, none for empty layers).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

from rq.engines.tritonserver import TEMPLATES
from rq.core.lis import lis_value
from rq.core.replica import assign_copies, phys_base


def _telemetry():
    spec = importlib.util.spec_from_file_location("rq_telemetry", TEMPLATES / "rq_telemetry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Metric:
    def __init__(self):
        self.value, self.sets, self.increments = 0.0, 0, 0

    def increment(self, v):
        self.value += v
        self.increments += 1

    def set(self, v):
        self.value = v
        self.sets += 1


class _Family:
    COUNTER, GAUGE = "counter", "gauge"
    registry: dict = {}

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self, labels):  # noqa: N802 - pb_utils' name
        return _Family.registry.setdefault((self.name, tuple(sorted(labels.items()))), _Metric())


class _PbUtils:
    MetricFamily = _Family


def test_copy_loads_follow_the_replica_rule():
    tel = _telemetry()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, k, t = 6, 2, int(torch.randint(1, 40, (1,), generator=gen))
        logcnt = torch.randint(1, 5, (n,), generator=gen)
        offsets = torch.randint(0, 30, (n,), generator=gen)
        ids = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(t)])
        copies = assign_copies(ids, logcnt, offsets)
        phys = (phys_base(logcnt)[ids] + copies).reshape(-1)
        expected = torch.bincount(phys, minlength=int(logcnt.sum())).numpy()
        counts = torch.bincount(ids.reshape(-1), minlength=n).numpy()
        np.testing.assert_array_equal(tel.copy_loads(counts, offsets.numpy(), logcnt.numpy()), expected)


def test_lis_gauges_and_counters():
    tel = _telemetry()
    _Family.registry = {}
    layers = [{"index": 0, "copies": [2, 1, 1]}, {"index": 1, "copies": [1, 1, 1]}]
    t = tel.LoadTelemetry(_PbUtils, "generate", "generate_0_0", layers, window=2, flush_every=100)

    def key(name, **labels):
        versioned = {} if name in ("rq_moe_calls_total", "rq_moe_unbalanceable_calls_total") else {"version": "1"}
        return name, tuple(sorted({"model": "generate", **versioned, **labels}.items()))

    def metric(name, **labels):
        return _Family.registry[key(name, **labels)]

    # an instance that has served nothing exports no LIS series at all (Triton's gauges would read 0)
    assert not [k for k in _Family.registry if k[0] == "rq_moe_lis"]

    # a big call: 8 assignments >= 4 copies and >= 3 experts -> instantaneous LIS set
    t.record({0: np.array([4, 2, 2]), 1: np.array([0, 0, 0])}, {0: np.array([1, 0, 0]), 1: np.zeros(3, np.int64)})
    inst = metric("rq_moe_lis", instance="generate_0_0", layer="0", units="copies", scope="instantaneous")
    assert math.isclose(inst.value, lis_value(torch.tensor([2, 2, 2, 2])))  # 4 over 2 copies: balanced
    experts = metric("rq_moe_lis", instance="generate_0_0", layer="0", units="experts", scope="instantaneous")
    assert math.isclose(experts.value, lis_value(torch.tensor([4, 2, 2])))
    # layer 1 had no load: no LIS at all (never 0 or 1)
    assert not [k for k in _Family.registry if k[0] == "rq_moe_lis" and ("layer", "1") in k[1]]
    # a decode step of one token (K = 2): fewer assignments than units -> counted apart, gauge untouched
    t.record({0: np.array([1, 1, 0])}, {0: np.array([5, 2, 2])})
    assert inst.sets == 1
    t.flush()
    assert metric("rq_moe_unbalanceable_calls_total", layer="0", units="copies").value == 1
    assert metric("rq_moe_unbalanceable_calls_total", layer="0", units="experts").value == 1
    loads = [metric("rq_moe_expert_load_total", layer="0", expert=str(e), copy=str(c)).value
             for e, c in [(0, 0), (0, 1), (1, 0), (2, 0)]]
    # call 1: expert 0 offset 1 -> copies 1,0,1,0; call 2: expert 0 offset 5 -> copy 1
    assert loads == [2, 3, 3, 2]
    cumulative = metric("rq_moe_lis", instance="generate_0_0", layer="0", units="copies", scope="cumulative")
    assert math.isclose(cumulative.value, lis_value(torch.tensor(loads)))
    window = metric("rq_moe_lis", instance="generate_0_0", layer="0", units="copies", scope="window")
    assert math.isclose(window.value, cumulative.value)  # both calls are in the window of 2
    assert metric("rq_moe_calls_total").value == 2
    assert key("rq_moe_lis", instance="generate_0_0", layer="1", units="copies", scope="cumulative") not in _Family.registry
    assert all(m.value >= 1.0 for k, m in _Family.registry.items() if k[0] == "rq_moe_lis")


class _Logger:
    warnings: list = []

    @classmethod
    def log_warn(cls, text):
        cls.warnings.append(text)


class _PbUtilsLogged(_PbUtils):
    Logger = _Logger


def test_plan_drift_gauge_and_one_warning_per_layer(tmp_path):
    """The plan's predicted LIS is exported; windowed LIS over copies / prediction is the drift gauge, and a layer
    that drifts past the threshold logs one warning naming ``rq replan``, re-armed once it is back below."""
    import json

    tel = _telemetry()
    _Family.registry, _Logger.warnings = {}, []
    (tmp_path / "plan.json").write_text(json.dumps({"layers": [{"layer": 0, "lis_after": 1.0},
                                                               {"layer": 1, "lis_after": None}]}))
    assert tel.plan_predictions(tmp_path) == {0: 1.0} and tel.plan_predictions(tmp_path / "none") == {}
    layers = [{"index": 0, "copies": [1, 1]}, {"index": 1, "copies": [1, 1]}]
    t = tel.LoadTelemetry(_PbUtilsLogged, "generate", "generate_0_0", layers, window=1, flush_every=100,
                          version="3", predicted=tel.plan_predictions(tmp_path), drift_threshold=1.5)

    def gauge(name, **labels):
        return _Family.registry[(name, tuple(sorted({"model": "generate", "version": "3", **labels}.items())))]

    assert gauge("rq_moe_plan_lis", layer="0").value == 1.0
    zero = {0: np.zeros(2, np.int64), 1: np.zeros(2, np.int64)}
    t.record({0: np.array([2, 0]), 1: np.array([1, 1])}, zero)  # LIS 2 but only 2 assignments: no warning yet
    t.flush()
    drift = gauge("rq_moe_plan_drift", instance="generate_0_0", layer="0")
    assert drift.value == 2.0 and _Logger.warnings == []
    for _ in range(2):  # a big skewed window: one warning, not one per flush
        t.record({0: np.array([40, 0]), 1: np.array([20, 20])}, zero)
        t.flush()
    assert len(_Logger.warnings) == 1 and "layer 0" in _Logger.warnings[0] and "rq replan" in _Logger.warnings[0]
    t.record({0: np.array([20, 20])}, zero)  # balanced again: re-armed
    t.flush()
    assert drift.value == 1.0
    t.record({0: np.array([40, 0])}, zero)
    t.flush()
    assert len(_Logger.warnings) == 2
    assert not [k for k in _Family.registry if k[0] == "rq_moe_plan_drift" and ("layer", "1") in k[1]]
