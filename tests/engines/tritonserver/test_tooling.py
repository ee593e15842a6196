"""The server tooling of ``rq.testing.tritonserver`` and the client's pure parts (``rq.engines.tritonserver_client``)
without a server: stopping a process group, reading Prometheus text, latency percentiles. (The live tests in
test_serving.py drive the same code against tritonserver.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from rq.engines.tritonserver_client import LoadResult, parse_metrics
from rq.testing.tritonserver import group_members, stop_group


def _group(script: str) -> subprocess.Popen:
    """``sh -c script`` as the leader of a new process group; returns once its children are running."""
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_members(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("script, code", [
    ("sleep 300 & sleep 300 & wait", -15),  # everyone exits on SIGTERM
    ("trap '' TERM; sleep 300 & sleep 300 & wait", -9),  # nobody does: SIGKILL after the timeout
    ("(trap '' TERM; sleep 300) & sleep 300 & wait", -15),  # the leader exits, an orphan ignores SIGTERM
])
def test_stop_group_leaves_no_member(script, code):
    proc = _group(script)
    members = group_members(proc.pid)
    assert proc.pid in [p.pid for p in members] and len(members) >= 3
    try:
        assert stop_group(proc, timeout=1.0) == code
        assert group_members(proc.pid) == []
    finally:
        if group_members(proc.pid):  # a failed check must not leave sleeps behind
            os.killpg(proc.pid, signal.SIGKILL)


def test_parse_metrics_labels_prefix_and_counter_names():
    text = "\n".join([
        "# HELP rq_moe_expert_load_total assignments served by each copy",
        "# TYPE rq_moe_expert_load_total counter",
        'rq_moe_expert_load_total{model="generate",layer="0",expert="1",copy="0"} 7',
        'rq_moe_expert_load_total{model="generate",layer="0",expert="1",copy="1"} 6',
        "# TYPE rq_moe_lis gauge",
        'rq_moe_lis{model="a \\"quoted\\", name",instance="x\\\\y",layer="0",units="copies",scope="window"} 1.25',
        "# HELP nv_inference_request_success Number of successful inference requests",
        "# TYPE nv_inference_request_success counter",
        'nv_inference_request_success{model="generate",version="1"} 3',
        "",
    ])
    rq = parse_metrics(text, "rq_moe_")
    assert rq == {
        ("rq_moe_expert_load_total", (("copy", "0"), ("expert", "1"), ("layer", "0"), ("model", "generate"))): 7.0,
        ("rq_moe_expert_load_total", (("copy", "1"), ("expert", "1"), ("layer", "0"), ("model", "generate"))): 6.0,
        ("rq_moe_lis", (("instance", "x\\y"), ("layer", "0"), ("model", 'a "quoted", name'), ("scope", "window"),
                        ("units", "copies"))): 1.25,
    }
    everything = parse_metrics(text)
    # counters read with their OpenMetrics name
    assert everything[("nv_inference_request_success_total", (("model", "generate"), ("version", "1")))] == 3.0
    assert len(everything) == 4


def test_load_summary_percentiles():
    result = LoadResult(requests=4, concurrency=2, errors=0, mismatches=0, wall_s=2.0,
                        latencies_s=[0.04, 0.01, 0.03, 0.02], first_token_s=[], tokens=32)
    summary = result.summary()
    # linear interpolation between closest ranks: p = x[k] + (x[k+1] - x[k]) * frac, k + frac = q / 100 * (n - 1)
    assert summary["latency_ms"] == {"p50": 25.0, "p90": 37.0, "p99": 39.7, "max": 40.0}
    assert summary["first_token_ms"] == {"p50": None, "p99": None}
    assert summary["throughput_rps"] == 2.0 and summary["tokens_per_s"] == 16.0
