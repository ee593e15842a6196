"""The vectorised dispatch simulation (rq.placement.dispatch) against the per-expert loops it replaced, kept here
as the reference: same slot loads (to float rounding) in every mode and the same SGLang static tables."""

import random

import numpy as np
import pytest
import torch

from rq.core.replica import split_load
from rq.placement.dispatch import (DISPATCH_MODES, SGLANG_SEED, TRTLLM_BLOCK, row_shares, sglang_static_table,
                                   slot_loads, static_slot_loads)


def _trtllm_loop(p: float, batch_tokens: int, top_k: int, num_copies: int, num_ranks: int) -> np.ndarray:
    elements = batch_tokens * top_k
    out = np.zeros(num_copies)
    for b in range(-(-elements // TRTLLM_BLOCK)):
        tokens = (min(elements, (b + 1) * TRTLLM_BLOCK) - b * TRTLLM_BLOCK) // top_k
        if tokens <= 0 or p <= 0:
            continue
        pmf = torch.distributions.Binomial(tokens, probs=torch.tensor(min(p, 1.0), dtype=torch.float64)).log_prob(
            torch.arange(tokens + 1, dtype=torch.float64)).exp().numpy()
        survive = 1.0 - np.cumsum(pmf)[:-1]
        for r in range(num_ranks):
            np.add.at(out, (np.arange(tokens) + b + r) % num_copies, survive)
    total = out.sum()
    return out / total if total > 0 else np.full(num_copies, 1.0 / num_copies)


def _slot_loads_loop(mode, load, phy2log, num_gpus, top_k, batch_tokens):
    out = torch.zeros(phy2log.numel(), dtype=torch.float64)
    owner = phy2log.to(torch.int64)
    counts = torch.bincount(owner, minlength=load.numel())
    total_tokens = float(load.sum()) / top_k
    for e in torch.nonzero(counts).flatten().tolist():
        slots = torch.nonzero(owner == e).flatten()
        c, value = slots.numel(), float(load[e])
        if mode == "rq":
            out[slots] = split_load(load[e:e + 1].round().to(torch.int64), counts[e:e + 1]).to(torch.float64)
        elif c == 1:
            out[slots] = value
        elif mode in ("sglang-dynamic", "vllm"):
            out[slots] = torch.from_numpy(row_shares(mode, batch_tokens, c) * value)
        else:
            out[slots] = torch.from_numpy(_trtllm_loop(value / total_tokens, batch_tokens, top_k, c, num_gpus) * value)
    return out


def _static_loop(phy: np.ndarray, num_gpus: int, num_nodes: int) -> np.ndarray:
    """rq's first replay of SGLang's compute_logical_to_rank_dispatch_physical_map, rank by rank."""
    num_layers, num_phy = phy.shape
    n = int(phy.max()) + 1
    per_gpu, per_node = num_phy // num_gpus, num_gpus // num_nodes
    table = np.full((num_gpus, num_layers, n), -1, dtype=np.int64)
    for me in range(num_gpus):
        rng = random.Random(SGLANG_SEED)
        for li in range(num_layers):
            for e in range(n):
                cand = np.flatnonzero(phy[li] == e)
                if cand.size == 0:
                    continue
                if cand.size == 1:
                    table[me, li, e] = cand[0]
                    continue
                device = cand // per_gpu
                own = {int(d): int(s) for d, s in zip(device[::-1], cand[::-1])}
                node_count = np.bincount(device // per_node, minlength=num_nodes)
                node_first = {int(d // per_node): int(s) for d, s in zip(device[::-1], cand[::-1])
                              if num_nodes > 1 and node_count[d // per_node] < cand.size}
                left = [r for r in range(num_gpus) if r not in own and r // per_node not in node_first]
                if me in own:
                    table[me, li, e] = own[me]
                elif me // per_node in node_first:
                    table[me, li, e] = node_first[me // per_node]
                else:
                    cands = cand.tolist()
                    quotient, remainder = divmod(len(left), len(cands))
                    ans = cands * quotient + rng.sample(cands, k=remainder)
                    rng.shuffle(ans)
                    table[me, li, e] = ans[left.index(me)]
    return table


def _random_rows(rng, layers, n, gpus, per_gpu):
    rows = []
    for _ in range(layers):
        extra = rng.integers(0, n, size=gpus * per_gpu - n)
        rows.append(rng.permutation(np.concatenate([np.arange(n), extra])))
    return np.stack(rows)


@pytest.mark.parametrize("gpus,nodes,n,per_gpu", [(4, 1, 8, 3), (8, 1, 16, 3), (8, 2, 16, 4), (4, 2, 6, 2)])
def test_static_tables_equal_the_rank_by_rank_replay(gpus, nodes, n, per_gpu):
    rows = _random_rows(np.random.default_rng(gpus + nodes), 4, n, gpus, per_gpu)
    assert (sglang_static_table(torch.from_numpy(rows), gpus, nodes) == _static_loop(rows, gpus, nodes)).all()


@pytest.mark.parametrize("top_k,batch", [(2, 512), (8, 1000), (1, 300)])
def test_slot_loads_equal_the_per_expert_loops(top_k, batch):
    rng = np.random.default_rng(top_k)
    n, gpus = 12, 4
    row = torch.from_numpy(_random_rows(rng, 1, n, gpus, 5)[0])
    load = torch.from_numpy(rng.integers(0, 3000, size=n).astype(np.float64))
    load[3] = 0.0  # an expert without load
    for mode in DISPATCH_MODES:
        if mode == "sglang-static":
            continue
        mine = slot_loads(mode, load, row, num_gpus=gpus, top_k=top_k, batch_tokens=batch)
        ref = _slot_loads_loop(mode, load, row, gpus, top_k, batch)
        assert torch.allclose(mine, ref, rtol=1e-12, atol=1e-9), mode


def test_trtllm_shares_batched_equal_one_at_a_time():
    from rq.placement.dispatch import trtllm_shares

    p = np.array([0.0, 1e-4, 0.03, 0.2, 0.5, 1.0])
    batched = trtllm_shares(p, 700, 4, 3, 5)
    for i, pi in enumerate(p):
        assert np.allclose(batched[i], _trtllm_loop(float(pi), 700, 4, 3, 5), rtol=1e-12, atol=1e-15)
        assert np.allclose(trtllm_shares(float(pi), 700, 4, 3, 5), batched[i], rtol=1e-12, atol=1e-15)


def test_static_slot_loads_sum_to_the_load():
    rows = _random_rows(np.random.default_rng(0), 2, 8, 4, 3)
    table = sglang_static_table(torch.from_numpy(rows), 4, 1)
    load = torch.arange(8, dtype=torch.float64) * 10
    assert float(static_slot_loads(load, table[:, 1], 12).sum()) == pytest.approx(float(load.sum()))
