"""Token->copy mapping, loads and copy-sorted permutation of the Triton dispatch vs rq.core.replica (exact)."""

from __future__ import annotations

import pytest
import torch

from rq.core import replica
from rq.kernels.dispatch import device_tables, dispatch_assignments

CASES = [
    # (tokens, top_k, copies per expert, offsets or None, block_m)
    (1, 1, [1], None, 16),
    (1, 2, [2, 1, 3], [5, 0, 7], 16),
    (7, 2, [1, 3, 1, 2], [0, 5, 2, 1], 16),
    (37, 4, [1, 1, 4, 1, 2, 1, 1, 3], None, 64),
    (300, 3, [1] * 5 + [2] * 5, list(range(10)), 16),  # several dispatch blocks (BLOCK_A = 128)
    (129, 8, [3] * 70, [2**40 + i for i in range(70)], 64),  # N > BLOCK_N, huge streaming offsets
]


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("tokens,top_k,copies,offsets,block_m", CASES)
def test_dispatch_matches_replica_rule(device, random_routing, tokens, top_k, copies, offsets, block_m, ids_dtype):
    num_experts = len(copies)
    logcnt = torch.tensor(copies)
    num_phys = int(logcnt.sum())
    gen = torch.Generator().manual_seed(tokens)
    precision = torch.randint(0, 3, (num_phys,), generator=gen)
    ids, _ = random_routing(tokens, top_k, num_experts, torch.float32, ids_dtype, device, seed=tokens)
    offs = None if offsets is None else torch.tensor(offsets, dtype=torch.int64)
    d = dispatch_assignments(ids, None if offs is None else offs.to(device), device_tables(logcnt, precision, device), block_m)

    ids_cpu = ids.cpu()
    want_phys = replica.physical_ids(ids_cpu, logcnt, offs)
    assert torch.equal(d.phys.cpu().long(), want_phys)
    assert torch.equal(d.expert_counts.cpu(), replica.expert_counts(ids_cpu, num_experts))
    assert d.expert_counts.dtype == torch.int64
    loads = replica.copy_loads(ids_cpu, logcnt, offs)
    copy_start = d.copy_start.cpu().long()
    assert torch.equal(copy_start.diff(), loads)
    # rows sorted by physical copy, token-major inside each copy
    flat = want_phys.reshape(-1)
    valid = int((flat >= 0).sum())
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_phys))
    want_order = torch.argsort(key, stable=True)[:valid]
    assert torch.equal(d.sorted_assign.cpu()[:valid].long(), want_order)
    pos = d.assign_pos.cpu().long()
    assert torch.equal(pos[want_order], torch.arange(valid))
    assert bool((pos[flat < 0] == -1).all())
    # row tiles per precision class
    tiles = (loads + block_m - 1) // block_m
    for cls in (0, 1, 2):
        per = torch.where(precision == cls, tiles, torch.zeros_like(tiles))
        want = torch.cat([torch.zeros(1, dtype=torch.int64), per.cumsum(0)])
        assert torch.equal(d.tile_start[cls].cpu().long(), want)


def test_dispatch_all_dropped(device):
    ids = torch.full((5, 2), -1, dtype=torch.int64, device=device)
    ids[0, 0] = 3  # == N: dropped too
    logcnt = torch.tensor([2, 1, 1])
    d = dispatch_assignments(ids, None, device_tables(logcnt, torch.zeros(4, dtype=torch.int64), device), 16)
    assert d.expert_counts.cpu().tolist() == [0, 0, 0]
    assert d.copy_start.cpu().tolist() == [0] * 5
    assert bool((d.phys.cpu() == -1).all())
