"""docs/spec.md §9 near-ties: ``expert_counts`` are exact but for assignments the reference's router scores leave
open within the check's tolerance; the reference records how many per call, the check allows no more."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rq.export import check_export
from rq.export.parity import compare_run_results, polygraphy_quiet
from rq.export.reference import near_tie_swaps

SCORES = torch.tensor([[5.0, 4.0, 3.0, 2.999, 0.0]])


@pytest.mark.parametrize(("ids", "atol", "rtol", "swaps"), [
    ([[0, 1, 2]], 2e-2, 1e-2, 1),  # experts 2 and 3 within 2e-2 + 1e-2 * 3: one swap
    ([[0, 1, 3]], 2e-2, 1e-2, 1),  # the other way round
    ([[0, 1, 2]], 1e-6, 0.0, 0),  # 1e-3 apart is no tie at this tolerance
    ([[0, 1, 2, -1]], 2e-2, 1e-2, 1),  # a dropped slot (outside [0, N)) is no choice: experts 2 and 3 still tie
    ([[0, 1]], 2e-2, 1e-2, 0),  # 4 against 3: far apart
])
def test_near_tie_swaps_by_hand(ids, atol, rtol, swaps):
    assert near_tie_swaps(SCORES, torch.tensor(ids), atol, rtol) == swaps


def test_near_tie_swaps_count_every_open_slot():
    """Four equal scores, two chosen: either chosen one can leave and either other can enter, two swaps; a
    token that chose every expert has nothing to swap."""
    assert near_tie_swaps(torch.ones(1, 4), torch.tensor([[0, 1]]), 1e-4, 1e-3) == 2
    assert near_tie_swaps(torch.ones(3, 4), torch.tensor([[0, 1]] * 3), 1e-4, 1e-3) == 6
    assert near_tie_swaps(torch.ones(1, 2), torch.tensor([[0, 1]]), 1e-4, 1e-3) == 0
    assert near_tie_swaps(torch.ones(2, 2), torch.tensor([[0, 1], [0, -1]]), 1e-4, 1e-3) == 1  # per token


def _results(runner: str, counts: list[list[int]]):
    from polygraphy.comparator import IterationResult, RunResults

    results = RunResults()
    results.append((runner, [IterationResult(outputs={"expert_counts.0": np.array(c, np.int64)}, runtime=0.0,
                                             runner_name=runner) for c in counts]))
    return results


@pytest.mark.parametrize(("candidate", "ties", "passed", "swaps"), [
    ([[3, 1, 0], [2, 2, 0]], None, False, 0),  # no near-ties recorded: exact
    ([[3, 1, 0], [2, 2, 0]], [{}, {"expert_counts.0": 0}], False, 0),
    ([[3, 1, 0], [2, 2, 0]], [{}, {"expert_counts.0": 1}], True, 1),  # one assignment moved, one allowed
    ([[3, 1, 0], [1, 3, 0]], [{}, {"expert_counts.0": 1}], False, 0),  # two moved, one allowed
    ([[3, 1, 0], [2, 1, 0]], [{}, {"expert_counts.0": 4}], False, 0),  # one lost: not a swap
])
def test_counts_comparison_allows_only_the_reference_near_ties(candidate, ties, passed, swaps):
    reference = _results("reference", [[3, 1, 0], [3, 1, 0]])
    [row] = compare_run_results(reference, _results("candidate", candidate), ["expert_counts.0"], "float16",
                                "streaming", "generator", near_ties=ties)
    assert (row.passed, row.near_tie_swaps, row.exact) == (passed, swaps, True)
    assert ("near-tie swap" in row.line()) == (swaps > 0)


def test_reference_records_near_ties_per_call(exported):
    """Every prefill feed and streaming step has a near-tie count for each of its ``expert_counts`` outputs."""
    manifest = exported("mixtral", "float16").manifest
    parity, ties = manifest["parity"], manifest["parity"]["near_ties"]
    counts = [o["name"] for o in manifest["graphs"]["decoder"]["outputs"] if o["name"].startswith("expert_counts")]
    assert len(ties["prefill"]["decoder"]) == parity["prefill"]["decoder"]["feeds"]
    assert len(ties["streaming"]) == parity["streaming"]["steps"] + 1  # the prompt's prefill, then each step
    for call in ties["prefill"]["decoder"] + ties["streaming"]:
        assert sorted(call) == sorted(counts) and all(isinstance(v, int) and v >= 0 for v in call.values())
    assert sum(v for call in ties["prefill"]["decoder"] + ties["streaming"] for v in call.values()) > 0  # float16


def test_check_excuses_a_swap_on_a_recorded_near_tie_only(exported, tmp_path):
    """One assignment of one decode step moved in the saved reference: the check fails when the reference
    recorded no near-tie there, and passes, reporting the swap, when it recorded one."""
    from polygraphy.comparator import RunResults

    build = tmp_path / "build"
    shutil.copytree(exported("mixtral").out_dir, build)
    path = build / "parity" / "streaming_reference.json"
    with polygraphy_quiet():
        reference = RunResults.load(str(path))
    step = reference[0][1][3]
    counts = np.array(step["expert_counts.0"])
    source = int(np.argmax(counts))
    counts[source] -= 1
    counts[(source + 1) % counts.size] += 1
    step["expert_counts.0"] = counts
    with polygraphy_quiet():
        reference.save(str(path))
    manifest_path = build / "manifest.json"
    for allowed, passed in ((0, False), (1, True)):
        manifest = json.loads(manifest_path.read_text())
        manifest["parity"]["near_ties"]["streaming"][3]["expert_counts.0"] = allowed
        manifest_path.write_text(json.dumps(manifest))
        report = check_export(build, write=False)
        rows = [r for r in report.outputs if r.phase == "streaming" and r.output == "expert_counts.0"]
        assert report.passed is passed and all(r.passed is passed for r in rows), report.summary()
        assert all(r.near_tie_swaps == (1 if passed else 0) for r in rows)
