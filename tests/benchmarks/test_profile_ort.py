"""profile_ort's accounting: each kernel event counts in the call it falls in, experts apart from the rest."""

from __future__ import annotations

import json

from benchmarks.profile_ort import _per_call


def _node(op: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_kernel_times_are_summed_per_call_and_class(tmp_path):
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50},
              _node("QMoE", 10, 30), _node("MoE", 50, 20), _node("MatMul", 60, 5), _node("MoE", 210, 7),
              _node("Add", 400, 9)]  # outside every call: not counted
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    first, second = _per_call(path)
    assert (first["wall"], first["experts"], first["rest"], first["op:QMoE"]) == (100, 50, 5, 30)
    assert (second["wall"], second["experts"], second["rest"]) == (50, 7, 0)
