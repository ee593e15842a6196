"""docs/spec.md §4 replica rule and §2 LIS on hand-computed cases, plus properties on random routing."""

import math

import torch

from rq.core import replica
from rq.core.lis import InstantSummary, lis, lis_value, model_lis


def test_replica_rule_hand_example():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [-1, 0]])  # -1 = dropped (Switch capacity)
    logcnt = torch.tensor([3, 1, 2])
    assert replica.assignment_ranks(ids, 3).tolist() == [[0, 0], [1, 0], [2, 1], [-1, 3]]
    assert replica.assign_copies(ids, logcnt).tolist() == [[0, 0], [1, 0], [2, 0], [-1, 0]]
    assert replica.assign_copies(ids, logcnt, torch.tensor([1, 0, 1])).tolist() == [[1, 0], [2, 1], [0, 0], [-1, 1]]
    assert replica.physical_ids(ids, logcnt).tolist() == [[0, 3], [1, 4], [2, 3], [-1, 0]]
    assert replica.expert_counts(ids, 3).tolist() == [4, 2, 1]
    assert replica.copy_loads(ids, logcnt).tolist() == [2, 1, 1, 2, 1, 0]
    assert replica.phy2log(logcnt).tolist() == [0, 0, 0, 1, 2, 2]


def test_split_load_matches_rule_and_copies_differ_by_at_most_one():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n, k, t = 6, 2, int(torch.randint(1, 50, (1,), generator=gen))
        ids = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(t)])
        logcnt = torch.randint(1, 4, (n,), generator=gen)
        offsets = torch.randint(0, 10, (n,), generator=gen)
        loads = replica.copy_loads(ids, logcnt, offsets)
        assert loads.tolist() == replica.split_load(replica.expert_counts(ids, n), logcnt, offsets).tolist()
        for e in range(n):
            copies = loads[replica.phy2log(logcnt) == e]
            assert copies.max() - copies.min() <= 1


def test_streaming_offsets_rotate_copies():
    logcnt, offsets = torch.tensor([2]), torch.zeros(1, dtype=torch.int64)
    chosen = []
    for _ in range(4):  # one assignment per decode step
        ids = torch.tensor([[0]])
        chosen.append(int(replica.assign_copies(ids, logcnt, offsets)[0, 0]))
        offsets += replica.expert_counts(ids, 1)
    assert chosen == [0, 1, 0, 1]


def test_lis_hand_values():
    assert lis_value(torch.tensor([1, 1, 1, 1])) == 1.0
    assert lis_value(torch.tensor([4, 0, 0, 0])) == 4.0
    assert lis_value(torch.tensor([3, 1, 1, 1])) == 2.0  # 3 / (6/4)
    assert math.isnan(lis_value(torch.tensor([0, 0])))
    assert lis(torch.tensor([[2, 2], [4, 0]])).tolist() == [1.0, 2.0]
    assert model_lis([1.5, 2.5, math.nan]) == (2.0, 2.5)


def test_instant_summary_sets_unbalanceable_calls_apart():
    calls = torch.tensor([[2, 2, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    s = InstantSummary.of(calls)
    assert s.unbalanceable == 1 and s.calls == 4
    assert s.mean == 1.5 and s.max == 2.0
