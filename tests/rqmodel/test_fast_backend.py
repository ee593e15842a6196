"""The ``fast`` experts backend against the reference (docs/spec.md §9 float32 tolerance; counts exact)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rq.core import int4
from rq.core.op import RQLayerWeights, rq_moe_reference
from rq.rqmodel import fast
from rq.rqmodel.fast import build_versions, rq_moe_fast


def _layer(logcnt, precision, hidden=64, inter=48, activation="silu_glu", group=64, same_replicas=True, seed=0,
           dtype=torch.float32):
    """A random layer in the op layout; INT4 copies of one expert share bytes when ``same_replicas``."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * inter if activation.endswith("_glu") else inter
    orig_in, orig_out, q_in, q_out = [], [], [], []
    p = 0
    for copies in logcnt:
        shared = None
        for _ in range(copies):
            if precision[p] == 0:
                orig_in.append(torch.randn(rows, hidden, generator=gen) * 0.1)
                orig_out.append(torch.randn(hidden, inter, generator=gen) * 0.1)
            else:
                if shared is None or not same_replicas:
                    shared = (int4.quantize(torch.randn(rows, hidden, generator=gen) * 0.1, group),
                              int4.quantize(torch.randn(hidden, inter, generator=gen) * 0.1, group))
                q_in.append(shared[0])
                q_out.append(shared[1])
            p += 1

    def stack(items, shape, dt=dtype):
        return torch.stack(items).to(dt) if items else torch.zeros(0, *shape, dtype=dt)

    return RQLayerWeights(
        2, activation, group, tuple(logcnt), tuple(precision), stack(orig_in, (rows, hidden)),
        stack(orig_out, (hidden, inter)),
        stack([q.packed for q in q_in], (rows, int4.packed_width(hidden)), torch.uint8),
        stack([q.scales for q in q_in], (rows, int4.num_blocks(hidden, group)), torch.float16),
        stack([q.packed for q in q_out], (hidden, int4.packed_width(inter)), torch.uint8),
        stack([q.scales for q in q_out], (hidden, int4.num_blocks(inter, group)), torch.float16))


def _routing(tokens, num_experts, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:2] for _ in range(tokens)])
    if tokens > 3:
        ids[1, 0], ids[3, 1] = -1, num_experts  # dropped assignments
    return ids, torch.softmax(torch.randn(tokens, 2, generator=gen), -1)


LAYOUTS = [
    ((1, 1, 1, 1), (0, 0, 0, 0)),  # original precision only: one version per copy
    ((1, 3, 2, 1), (1, 1, 1, 1, 1, 1, 1)),  # INT4 only, replicas share a version
    ((2, 1, 3, 1), (0, 1, 1, 0, 1, 1, 1)),  # original primaries with INT4 replicas
]


@pytest.mark.parametrize("activation", ["silu_glu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_fast_equals_reference(layout, tokens, activation):
    logcnt, precision = LAYOUTS[layout]
    layer = _layer(logcnt, precision, activation=activation, hidden=70, inter=46)  # partial blocks, odd widths
    ids, w = _routing(tokens, len(logcnt))
    offsets = torch.arange(len(logcnt)) * 5
    x = torch.randn(tokens, 70, generator=torch.Generator().manual_seed(2))
    y, counts = rq_moe_fast(x, ids, w, layer, offsets)
    y_ref, counts_ref = rq_moe_reference(x, ids, w, layer, offsets)
    assert torch.equal(counts, counts_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)


def test_replicas_share_one_version_only_when_their_bytes_agree():
    logcnt, precision = LAYOUTS[2]
    # expert 0: original + INT4 replica, 1: INT4, 2: original + two INT4 replicas sharing bytes, 3: INT4
    assert build_versions(_layer(logcnt, precision), torch.float32, torch.device("cpu")).num_versions == 6
    # copies whose bytes differ are never merged (the op does not assume replicas are identical)
    different = _layer(logcnt, precision, same_replicas=False)
    versions = build_versions(different, torch.float32, torch.device("cpu"))
    assert versions.num_versions == 7 and sorted(versions.version.tolist()) == list(range(8))
    ids, w = _routing(40, len(logcnt))
    x = torch.randn(40, 64)
    torch.testing.assert_close(rq_moe_fast(x, ids, w, different)[0], rq_moe_reference(x, ids, w, different)[0],
                               atol=1e-5, rtol=1e-4)


def test_cached_versions_follow_in_place_edits():
    logcnt, precision = LAYOUTS[1]
    layer = _layer(logcnt, precision)
    ids, w = _routing(9, len(logcnt))
    x = torch.randn(9, 64)
    before = rq_moe_fast(x, ids, w, layer)[0]
    assert rq_moe_fast(x, ids, w, layer)[0].equal(before)  # the cached versions are reused
    layer.w_in_scales.mul_(2)  # e.g. a tampered file: the cached version must not be reused
    after = rq_moe_fast(x, ids, w, layer)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, rq_moe_reference(x, ids, w, layer)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_route_is_the_replica_rule(seed):
    """``replica.route`` (one sort) gives the integers of ``physical_ids`` and ``expert_counts`` exactly."""
    from rq.core import replica

    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 10, (1,), generator=gen))
    logcnt = torch.randint(1, 5, (n,), generator=gen)
    offsets = torch.randint(0, 2**40, (n,), generator=gen)
    ids = torch.randint(-1, n + 1, (int(torch.randint(0, 40, (1,), generator=gen)), 3), generator=gen)
    phys, counts = replica.route(ids, logcnt, offsets if seed % 2 else None)
    assert torch.equal(phys, replica.physical_ids(ids, logcnt, offsets if seed % 2 else None))
    assert torch.equal(counts, replica.expert_counts(ids, n))


def test_float16_within_the_float16_tolerance():
    logcnt, precision = LAYOUTS[2]
    layer = _layer(logcnt, precision, dtype=torch.float16)
    ids, w = _routing(33, len(logcnt))
    x = torch.randn(33, 64)
    y, _ = rq_moe_fast(x.half(), ids, w.half(), layer)
    half_free = dataclasses.replace(layer, w_in=layer.w_in.float(), w_out=layer.w_out.float())
    torch.testing.assert_close(y.float(), rq_moe_reference(x, ids, w, half_free)[0], atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("in_place", [True, False])
def test_original_precision_copies_in_place_above_the_threshold_else_one_stacked_group(monkeypatch, in_place):
    monkeypatch.setattr(fast, "VIEW_BYTES", 0 if in_place else 1 << 40)
    logcnt, precision = LAYOUTS[2]
    layer = _layer(logcnt, precision)
    versions = build_versions(layer, torch.float32, torch.device("cpu"))
    if in_place:  # the layer's own storage, transposed: no copy
        assert len(versions.w_in_t) == 2 and versions.w_in_t[0].shape[0] == precision.count(0)
        assert versions.w_in_t[0].data_ptr() == layer.w_in.data_ptr()
        assert versions.w_out_t[0].data_ptr() == layer.w_out.data_ptr()
    else:  # one tensor, one grouped product per projection
        assert len(versions.w_in_t) == 1 and versions.w_in_t[0].is_contiguous()
    assert versions.num_versions == 6
    ids, w = _routing(40, len(logcnt))
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    y, counts = rq_moe_fast(x, ids, w, layer)
    y_ref, counts_ref = rq_moe_reference(x, ids, w, layer)
    assert torch.equal(counts, counts_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    # another dtype casts once (the stored weights are not changed)
    assert build_versions(layer, torch.float64, torch.device("cpu")).w_in_t[0].dtype == torch.float64


@pytest.mark.parametrize("view_bytes", [0, 1 << 40])
def test_no_assignment_with_a_copy_gives_zeros_and_the_counts(monkeypatch, view_bytes):
    monkeypatch.setattr(fast, "VIEW_BYTES", view_bytes)
    logcnt, precision = LAYOUTS[2]
    layer = _layer(logcnt, precision)
    ids = torch.full((5, 2), len(logcnt))  # every id out of range: dropped
    y, counts = rq_moe_fast(torch.randn(5, 64), ids, torch.ones(5, 2), layer)
    y_ref, counts_ref = rq_moe_reference(torch.randn(5, 64), ids, torch.ones(5, 2), layer)
    assert torch.equal(y, torch.zeros(5, 64)) and torch.equal(y_ref, y) and torch.equal(counts, counts_ref)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_fast_matches_reference_on_plans_mixing_three_precisions(data):
    """Fuzz: random copies, each at a random precision (original / INT4 / INT8), random offsets and routing."""
    from rq.testing.layers import random_layer, random_routing

    logcnt = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=5), label="logcnt"))
    precision = tuple(data.draw(st.lists(st.integers(0, 2), min_size=sum(logcnt), max_size=sum(logcnt)),
                                label="precision"))
    activation = data.draw(st.sampled_from(["silu_glu", "gelu", "relu"]), label="activation")
    seed = data.draw(st.integers(0, 1000), label="seed")
    layer = random_layer(logcnt, precision, hidden=70, inter=40, activation=activation, seed=seed)
    hidden, ids, weights = random_routing(data.draw(st.integers(0, 40)), 2, len(logcnt), seed=seed, hidden=70)
    offsets = torch.tensor(data.draw(st.lists(st.integers(0, 9), min_size=len(logcnt), max_size=len(logcnt))))
    y_ref, c_ref = rq_moe_reference(hidden, ids, weights, layer, offsets)
    y, c = rq_moe_fast(hidden, ids, weights, layer, offsets)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-3)
    assert torch.equal(c, c_ref)
    kinds = {(int(e), p) for e, p in zip(layer.tables.phy2log, layer.precision) if p}
    assert build_versions(layer, torch.float32, torch.device("cpu")).num_versions == layer.num_orig + len(kinds)
