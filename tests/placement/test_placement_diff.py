"""`rq place --previous`: the copies each device would load and drop when a new plan replaces an old one."""

import json

import pytest
import torch

from rq.errors import RQError
from rq.placement.diff import device_copies, diff_document, placement_diff
from rq.placement.run import place_plan
from rq.plan.planner import make_plan
from rq.plan.schema import save_plan
from rq.testing.synthetic import synthetic_stats


def test_diff_is_the_multiset_difference_per_device():
    old = torch.tensor([[0, 1, 2, 0, 3, 1]])
    new = torch.tensor([[0, 1, 1, 3, 3, 1]])  # device 0 swaps a copy of 2 for a copy of 1; device 1 a 0 for a 3
    diff = placement_diff(old, new, 2)
    assert diff == [[{"added": {1: 1}, "removed": {2: 1}}, {"added": {3: 1}, "removed": {0: 1}}]]
    assert placement_diff(old, old[:, [1, 0, 2, 4, 3, 5]], 2) == [[{"added": {}, "removed": {}}] * 2]  # slots only
    doc = diff_document(diff, [5], "old")
    assert doc["copies_loaded_per_device"] == [1, 1] and doc["layers"][0]["decoder_layer"] == 5
    # replaying the diff turns the old devices' copies into the new ones
    for g, (before, after) in enumerate(zip(device_copies(old[0], 2), device_copies(new[0], 2))):
        assert before - _counter(diff[0][g]["removed"]) + _counter(diff[0][g]["added"]) == after


def _counter(d):
    from collections import Counter
    return Counter(d)


def test_place_against_previous_placement(tmp_path):
    calib = synthetic_stats("mixtral", num_layers=2, tokens=4096)
    drifted = synthetic_stats("mixtral", num_layers=2, tokens=4096, drift=0.5, sample_seed=3)
    save_plan(make_plan(calib), tmp_path / "old.json")
    save_plan(make_plan(drifted), tmp_path / "new.json")
    old = place_plan(tmp_path / "old.json", devices=4, out_dir=tmp_path / "p_old", plots=False, echo=None)
    lines = []
    new = place_plan(tmp_path / "new.json", devices=4, out_dir=tmp_path / "p_new", plots=False, echo=lines.append,
                     previous=tmp_path / "p_old")
    diff = new["diff"]
    expected = placement_diff(torch.tensor(old["phy2log"]), torch.tensor(new["phy2log"]), 4)
    assert diff["copies_loaded_per_device"] == [sum(sum(d[g]["added"].values()) for d in expected) for g in range(4)]
    assert sum(diff["copies_loaded_per_device"]) > 0
    assert json.loads((tmp_path / "p_new" / "placement.json").read_text())["diff"] == diff
    assert "Changes against the previous placement" in (tmp_path / "p_new" / "report.md").read_text()
    assert any("copies to load" in line for line in lines)
    same = place_plan(tmp_path / "old.json", devices=4, out_dir=tmp_path / "p_same", plots=False, echo=None,
                      previous=tmp_path / "p_old")
    assert sum(same["diff"]["copies_loaded_per_device"]) == 0
    with pytest.raises(RQError, match="another device count"):
        place_plan(tmp_path / "new.json", devices=2, out_dir=tmp_path / "p_two", plots=False, echo=None,
                   previous=tmp_path / "p_old")
    with pytest.raises(RQError, match="no readable placement.json"):
        place_plan(tmp_path / "new.json", devices=4, out_dir=tmp_path / "p_x", plots=False, echo=None,
                   previous=tmp_path / "nowhere")
    assert not (tmp_path / "p_x").exists() and not (tmp_path / "p_two").exists()
