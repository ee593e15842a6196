"""Expert-parallel placement (docs/spec.md §7): which device holds each physical copy of an R&Q plan. Pure
functions over tensors, no I/O; the engine file formats live in :mod:`rq.placement.formats`.

Vocabulary (DeepSeek EPLB's, shared with :mod:`rq.core.replica`), per MoE layer with ``N`` logical experts,
``P`` physical copies and ``G`` devices (``P % G == 0``, ``P/G`` *slots* per device):

* ``logcnt [N]`` -- copies of each logical expert (``C_e``);
* ``phy2log [P]`` -- logical expert held by each *slot*. Slots are device-major: slot ``s`` lives on
  device ``s // (P/G)``; this is the "physical expert id" of SGLang, vLLM, TensorRT-LLM and EPLB;
* ``log2phy [N, X]`` -- slot of copy ``c`` of expert ``e`` (-1 padded). ``c`` is the docs/spec.md §1 copy index,
  so slot ``log2phy[e, c]`` receives what the docs/spec.md §4 rule sends to copy ``c`` and rq's logical-major
  physical id ``phys(e, c)`` maps to that slot.

The placement minimises the maximum device load: per-copy loads come from the replica rule
(:func:`rq.core.replica.split_load`), copies are packed onto devices with exactly ``P/G`` per device (greedy
longest-processing-time with a cardinality limit, then pairwise swaps off the most loaded device), and
two copies of one expert never share a device when it can be avoided; replicas then move between experts
where that balances devices better (:func:`rebalance_copies`). With ``num_nodes > 1`` and router groups that
split over the nodes the packing is hierarchical like EPLB: a group's primaries go to one node, then copies to
the node's devices; otherwise it is flat over all devices, EPLB's global policy.

:func:`eplb_rebalance` re-implements DeepSeek EPLB's published algorithm (greedy replication by
per-copy load, then balanced packing, hierarchical over nodes) as the baseline the simulation compares
against; :func:`device_loads` and :func:`device_lis` are the makespan simulation.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from rq.core.lis import lis
from rq.core.replica import copy_index, phy2log, split_load

# Device-aware copy counts may make a copy at most this much heavier than the heaviest copy of the fitted counts:
# fitting the calibration loads exactly with a few large copies would not survive loads that drift (held-out).
COPY_SLACK = 0.25
# ... and are not searched for once the most loaded device is within this fraction of the mean: closer than that
# the calibration loads' own sampling noise decides, not the placement.
BALANCE_TOLERANCE = 1e-3


def fit_logcnt(load: torch.Tensor, logcnt: torch.Tensor, num_phy: int, max_copies: int) -> torch.Tensor:
    """Adjust ``logcnt [N]`` to exactly ``num_phy`` copies with at most ``max_copies`` per expert.

    Copies beyond ``max_copies`` are dropped first; then one copy at a time is added to the expert with
    the highest per-copy load ``load/C`` (ties: lower id) or removed from the replicated expert whose
    per-copy load after removal ``load/(C-1)`` is lowest (ties: higher id). Engines need the same ``P``
    in every layer and ``P % G == 0``; for device balance a second copy on a device adds nothing, hence
    ``max_copies = G``. Returns int64 ``[N]``.
    """
    n = logcnt.numel()
    if not n <= num_phy <= n * max_copies:
        raise ValueError(f"{num_phy} copies cannot hold {n} experts with 1..{max_copies} copies each")
    load = load.to(torch.float64)
    cnt = logcnt.to(torch.int64).clamp(1, max_copies).clone()
    while int(cnt.sum()) < num_phy:
        per_copy = torch.where(cnt < max_copies, load / cnt, torch.full_like(load, -1.0))
        cnt[int(torch.argmax(per_copy))] += 1  # first maximum = lowest id
    while int(cnt.sum()) > num_phy:
        after = torch.where(cnt > 1, load / (cnt - 1).clamp(min=1), torch.full_like(load, torch.inf))
        best = torch.nonzero(after == after.min()).flatten()
        cnt[int(best[-1])] -= 1  # ties: the higher id loses its copy first
    return cnt


def _swap(pack: np.ndarray, w: np.ndarray, own: np.ndarray, load: np.ndarray, held: np.ndarray,
          i: int, j: int) -> None:
    """Exchange the packs of items i and j, keeping the pack loads and per-owner counts in step."""
    p, q = pack[i], pack[j]
    for item, src, dst in ((i, p, q), (j, q, p)):
        load[src] -= w[item]
        held[src, own[item]] -= 1
        load[dst] += w[item]
        held[dst, own[item]] += 1
        pack[item] = dst


def _spread(pack: np.ndarray, w: np.ndarray, own: np.ndarray, load: np.ndarray, held: np.ndarray,
            limit: int, movable: np.ndarray, kind: np.ndarray) -> None:
    """Repair by swaps: while a pack holds more than ``limit`` items of one owner and some pack holds fewer,
    swap the lightest such (movable) item with the movable item of another owner and the same ``kind`` whose
    exchange keeps both packs within the limit and the larger of the two pack loads lowest."""
    for p in range(held.shape[0]):
        for o in np.flatnonzero(held[p] > limit):
            while held[p, o] > limit and (held[:, o] < limit).any():
                mine = np.flatnonzero((pack == p) & (own == o) & movable)
                if mine.size == 0:
                    break
                i = int(mine[np.argmin(w[mine])])
                others = np.flatnonzero((pack != p) & (own != o) & movable)
                q = pack[others]
                ok = (held[q, o] < limit) & (held[p, own[others]] < limit) & (kind[others] == kind[i])
                if not ok.any():
                    break
                cost = np.maximum(load[p] - w[i] + w[others], load[q] - w[others] + w[i])
                cost[~ok] = np.inf
                _swap(pack, w, own, load, held, i, int(others[np.argmin(cost)]))


def _refine(pack: np.ndarray, w: np.ndarray, own: np.ndarray, load: np.ndarray, held: np.ndarray,
            limit: int, movable: np.ndarray, kind: np.ndarray) -> None:
    """Local search: repeatedly apply the swap of movable items of the same ``kind`` between the most loaded
    pack and another pack that lowers the larger of the two loads most, keeping every owner within ``limit``
    items per pack; stop when none helps. (Same-kind swaps keep each pack's count of every kind.)"""
    for _ in range(50 * load.size):
        p = int(np.argmax(load))
        mine, others = np.flatnonzero((pack == p) & movable), np.flatnonzero((pack != p) & movable)
        if mine.size == 0 or others.size == 0:
            return
        q = pack[others]
        delta = w[mine][:, None] - w[others][None, :]  # (k, n-k): load moved from p to q
        new_max = np.maximum(load[p] - delta, load[q][None, :] + delta)
        ok = (delta > 0) & (new_max < load[p] - 1e-9 * max(1.0, load[p]))
        ok &= own[mine][:, None] != own[others][None, :]
        ok &= kind[mine][:, None] == kind[others][None, :]
        ok &= held[q[None, :], own[mine][:, None]] < limit  # p's item may join q
        ok &= held[p, own[others]][None, :] < limit  # q's item may join p
        if not ok.any():
            return
        new_max[~ok] = np.inf
        a, b = np.unravel_index(int(np.argmin(new_max)), new_max.shape)
        _swap(pack, w, own, load, held, int(mine[a]), int(others[b]))


def balanced_packing(weight: torch.Tensor, num_packs: int, owner: torch.Tensor | None = None,
                     refine: bool = True, big: torch.Tensor | None = None) -> torch.Tensor:
    """Pack ``n`` weighted items into ``num_packs`` packs of exactly ``n/num_packs`` items each.

    weight: ``[n]``; owner: ``[n]`` logical expert of each item or None; big: ``[n]`` bool, items that
    take more memory (original-precision copies among INT4 ones), spread evenly: at most
    ``ceil(#big / num_packs)`` per pack where the greedy can. Greedy: items by weight descending (ties:
    lower index) each go to the least loaded pack with room (ties: lower pack), among packs not yet holding
    the item's owner when there is one. Then, where an owner still has two items on one pack and another
    pack lacks it, swaps fix that; with ``refine``, swaps between the most loaded pack and any other that
    lower the larger of the two loads are applied until none is left (swaps pair big with big items only).
    ``refine=False, owner=None`` is EPLB's ``balanced_packing``. Returns int64 ``[n]`` pack of each item.
    """
    n = weight.numel()
    assert n % num_packs == 0, f"{n} items do not split evenly over {num_packs} packs"
    cap = n // num_packs
    w = weight.detach().to(torch.float64).cpu().numpy()
    own = np.arange(n) if owner is None else np.unique(owner.cpu().numpy(), return_inverse=True)[1].reshape(-1)
    held = np.zeros((num_packs, int(own.max(initial=-1)) + 1), dtype=np.int64)  # [packs, owners]: items held
    load = np.zeros(num_packs)
    count = np.zeros(num_packs, dtype=np.int64)
    pack = np.full(n, -1, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int64) if big is None else big.cpu().numpy().astype(np.int64)
    big_count = np.zeros(num_packs, dtype=np.int64)
    big_cap = -(-int(kind.sum()) // num_packs)

    def put(i: int, p: int) -> None:
        pack[i] = p
        load[p] += w[i]
        count[p] += 1
        held[p, own[i]] += 1
        big_count[p] += kind[i]

    for i in np.lexsort((np.arange(n), -w)):
        free = count < cap
        if kind[i] and (free & (big_count < big_cap)).any():
            free &= big_count < big_cap
        apart = free & (held[:, own[i]] == 0)
        cand = np.flatnonzero(apart if apart.any() else free)
        put(int(i), int(cand[np.argmin(load[cand])]))

    everything = np.ones(n, dtype=bool)
    _spread(pack, w, own, load, held, 1, everything, kind)
    if refine and cap > 0:
        _refine(pack, w, own, load, held, 1, everything, kind)
    return torch.from_numpy(pack)


def _pack_nodes_grouped(weight: np.ndarray, owner: np.ndarray, copy: np.ndarray, group: np.ndarray,
                        num_nodes: int, per_node: int) -> np.ndarray:
    """Node of each item when router groups matter: groups go to nodes (equal groups per node, balanced by
    group load) with the primary copy of each of their experts, so a token's group-limited routing finds every
    chosen expert on its group's node; replicas go to their group's node while it has room, else to the least
    loaded node, and swaps/local search move replicas only. Returns ``[n]`` int64."""
    n = weight.size
    cap = n // num_nodes
    num_groups = int(group.max()) + 1
    group_load = np.bincount(group[owner], weights=weight, minlength=num_groups)
    home = balanced_packing(torch.from_numpy(group_load), num_nodes).numpy()
    node = np.full(n, -1, dtype=np.int64)
    load = np.zeros(num_nodes)
    count = np.zeros(num_nodes, dtype=np.int64)
    held = np.zeros((num_nodes, int(owner.max()) + 1), dtype=np.int64)

    def put(i: int, nd: int) -> None:
        node[i], load[nd], count[nd] = nd, load[nd] + weight[i], count[nd] + 1
        held[nd, owner[i]] += 1

    for i in np.flatnonzero(copy == 0):
        put(int(i), int(home[group[owner[i]]]))
    replicas = np.flatnonzero(copy > 0)
    for i in replicas[np.lexsort((replicas, -weight[replicas]))]:
        room = count < cap
        ok = room & (held[:, owner[i]] < per_node)
        nd = home[group[owner[i]]]
        if not ok[nd]:
            cand = np.flatnonzero(ok if ok.any() else room)
            nd = cand[np.argmin(load[cand])]
        put(int(i), int(nd))
    movable, same = copy > 0, np.zeros(n, dtype=np.int64)
    _spread(node, weight, owner, load, held, per_node, movable, same)
    _refine(node, weight, owner, load, held, per_node, movable, same)
    return node


def _grouped(n: int, num_nodes: int, num_groups: int) -> bool:
    """Whether router groups shape the placement: several nodes, and groups that split evenly over them."""
    return num_nodes > 1 and num_groups > 1 and num_groups % num_nodes == 0 and n % num_groups == 0


def _devices(load: torch.Tensor, logcnt: torch.Tensor, num_gpus: int, num_nodes: int, num_groups: int,
             original: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """``(device [P], device_load [G])`` of each rq copy (logical-major) for fixed ``logcnt``: balanced packing of
    the replica-rule loads, hierarchical (groups to nodes, then devices) when :func:`_grouped`, else flat over
    all devices, EPLB's global policy (balanced devices make balanced nodes)."""
    owner, copy = phy2log(logcnt), copy_index(logcnt)
    weight = split_load(load, logcnt).to(torch.float64)
    big = (copy == 0) & (original[owner] if original is not None else torch.zeros(owner.numel(), dtype=torch.bool))
    n = logcnt.numel()
    if not _grouped(n, num_nodes, num_groups):
        device = balanced_packing(weight, num_gpus, owner, big=big).numpy()
    else:
        per_node = num_gpus // num_nodes
        group = (torch.arange(n) // (n // num_groups)).numpy()
        node = _pack_nodes_grouped(weight.numpy(), owner.numpy(), copy.numpy(), group, num_nodes, per_node)
        device = np.empty(owner.numel(), dtype=np.int64)
        for nd in range(num_nodes):
            idx = np.flatnonzero(node == nd)
            device[idx] = nd * per_node + balanced_packing(weight[idx], per_node, owner[idx], big=big[idx]).numpy()
    return device, np.bincount(device, weights=weight.numpy(), minlength=num_gpus)


def _score(device_load: np.ndarray) -> tuple[float, float]:
    """Placements compare by the most loaded device, then by the sum of squared device loads."""
    return float(device_load.max()), float(np.square(device_load).sum())


def rebalance_copies(load: torch.Tensor, logcnt: torch.Tensor, num_gpus: int,
                     evaluate: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]], max_evals: int = 256,
                     givers: int = 4) -> tuple[torch.Tensor, np.ndarray]:
    """Move replicas between experts while that lowers the most loaded device: ``(logcnt [N], device [P])``.

    The replica greedy (the planner's, EPLB's, :func:`fit_logcnt`) picks copies by per-copy load, blind to how
    the copies then pack: with few experts per device its copies can be too coarse to fill every device evenly
    without putting two copies of one expert on a device (which EPLB does). Local search: from ``logcnt``, try
    moving one copy to an expert held by the most loaded device from one of the ``givers`` experts whose copies
    would stay lightest, repack with ``evaluate(logcnt) -> (device [P], device_load [G])``, keep the best move that lowers
    the score (:func:`_score`); stop when none does, when the most loaded device is within ``BALANCE_TOLERANCE``
    of the mean, or after ``max_evals`` packings.
    Every expert keeps 1..G copies, the total stays ``P``, and no copy gets heavier than ``1 + COPY_SLACK`` times
    the heaviest copy of ``logcnt``.
    """
    load = load.to(torch.int64)
    cnt = logcnt.to(torch.int64).clone()
    device, dev_load = evaluate(cnt)
    best = _score(dev_load)
    heaviest = float(split_load(load, cnt).max()) * (1 + COPY_SLACK)
    floor = math.ceil(float(load.sum()) / num_gpus * (1 + BALANCE_TOLERANCE))
    evals = 1
    while evals < max_evals and best[0] > floor:
        owner = phy2log(cnt).numpy()
        hot = np.unique(owner[device == int(np.argmax(dev_load))])
        takers = [int(b) for b in hot if cnt[b] < num_gpus]
        after = torch.where(cnt > 1, -(-load // (cnt - 1).clamp(min=1)), torch.full_like(load, 1 << 62))
        donors = [int(a) for a in torch.argsort(after.to(torch.float64), stable=True)[:givers]
                  if float(after[a]) <= heaviest]
        trial = None
        for b in takers:
            for a in donors:
                if a == b or evals >= max_evals:
                    continue
                cand = cnt.clone()
                cand[a] -= 1
                cand[b] += 1
                dev, dl = evaluate(cand)
                evals += 1
                if _score(dl) < (best if trial is None else trial[0]):
                    trial = (_score(dl), cand, dev, dl)
        if trial is None:
            break
        best, cnt, device, dev_load = trial
    return cnt, device


def place_layer(load: torch.Tensor, logcnt: torch.Tensor, num_gpus: int, num_nodes: int = 1,
                num_groups: int = 1, original: torch.Tensor | None = None,
                rebalance: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place one layer's copies on ``num_gpus`` devices.

    load: ``[N]`` assignment counts; logcnt: ``[N]`` copies per expert, ``P = sum(logcnt)`` a multiple of
    ``num_gpus``; num_nodes divides num_gpus; num_groups: router expert groups (DeepSeek ``n_group``): when
    ``num_nodes > 1`` and ``num_groups % num_nodes == 0``, the primary copies of a group's experts share a
    node (replicas may live elsewhere); otherwise the packing is flat. original: ``[N]`` bool, experts whose
    primary stays at original precision (the plan's ``precision``): those primaries are spread evenly over each
    node's devices, so per-copy precision does not pile bytes onto one device (engines store one precision;
    rq's runtime does not). rebalance: move replicas between experts where that balances devices better
    (:func:`rebalance_copies`). Returns ``phy2log [P]`` (slot -> logical, device-major, slots of a device ordered
    by expert then copy), ``log2phy [N, max(logcnt)]`` (slot of copy c of e) and the ``logcnt [N]`` placed.
    """
    n = logcnt.numel()
    num_phy = int(logcnt.sum())
    assert num_phy % num_gpus == 0, f"{num_phy} copies do not split evenly over {num_gpus} devices"
    assert num_gpus % num_nodes == 0, f"{num_gpus} devices do not split evenly over {num_nodes} nodes"

    def evaluate(cnt: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return _devices(load, cnt, num_gpus, num_nodes, num_groups, original)

    if rebalance:
        logcnt, device = rebalance_copies(load, logcnt, num_gpus, evaluate)
    else:
        logcnt, device = logcnt.to(torch.int64), evaluate(logcnt)[0]
    owner, copy = phy2log(logcnt), copy_index(logcnt)
    order = np.lexsort((copy.numpy(), owner.numpy(), device))
    slot = torch.empty(num_phy, dtype=torch.int64)
    slot[torch.from_numpy(order)] = torch.arange(num_phy)
    log2phy = torch.full((n, int(logcnt.max())), -1, dtype=torch.int64)
    log2phy[owner, copy] = slot
    return owner[torch.from_numpy(order)], log2phy, logcnt


def _stack(phy2logs: list[torch.Tensor], log2phys: list[torch.Tensor], logcnts: list[torch.Tensor]):
    width = max(t.shape[1] for t in log2phys)
    log2phy = torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in log2phys])
    return torch.stack(phy2logs), log2phy, torch.stack([c.to(torch.int64) for c in logcnts])


def place(load: torch.Tensor, logcnt: torch.Tensor, num_gpus: int, num_nodes: int = 1, num_groups: int = 1,
          original: torch.Tensor | None = None, rebalance: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`place_layer` for every layer. load, logcnt: ``[L, N]`` (every row of logcnt sums to the same
    ``P``); original: ``[L, N]`` bool or None. Returns ``phy2log [L, P]``, ``log2phy [L, N, X]`` (-1 padded),
    ``logcnt [L, N]`` as placed (the same ``P`` per layer; :func:`rebalance_copies` may move replicas)."""
    sums = logcnt.sum(-1)
    assert bool((sums == sums[0]).all()), f"every layer needs the same number of copies, got {sums.tolist()}"
    rows = [place_layer(load[i], logcnt[i], num_gpus, num_nodes, num_groups,
                        None if original is None else original[i], rebalance) for i in range(load.shape[0])]
    return _stack([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def trivial_placement(num_layers: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No replicas, expert e in slot e (devices hold contiguous ranges): what engines do without a placement.
    Returns ``phy2log [L, N]``, ``log2phy [L, N, 1]``, ``logcnt [L, N]``."""
    ids = torch.arange(num_experts)
    return ids.repeat(num_layers, 1), ids.view(1, -1, 1).repeat(num_layers, 1, 1), \
        torch.ones(num_layers, num_experts, dtype=torch.int64)


def replicate_experts(weight: torch.Tensor, num_phy: int) -> torch.Tensor:
    """EPLB's replication: ``num_phy - N`` extra copies, each to the expert with the highest per-copy load
    ``weight/C`` (ties: lower id). weight: ``[N]``. Returns int64 ``logcnt [N]``."""
    n = weight.numel()
    assert num_phy >= n, f"{num_phy} slots cannot hold {n} experts"
    weight = weight.to(torch.float64)
    cnt = torch.ones(n, dtype=torch.int64)
    for _ in range(num_phy - n):
        cnt[int(torch.argmax(weight / cnt))] += 1
    return cnt


def eplb_rebalance(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int,
                   num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB's ``rebalance_experts``, re-implemented from its description (the baseline).

    weight: ``[L, N]`` loads; num_phy: slots, a multiple of num_gpus; hierarchical when
    ``num_groups % num_nodes == 0``: router groups are packed onto nodes (equal groups per node, by group
    load), experts are replicated within each node to ``num_phy/num_nodes`` copies
    (:func:`replicate_experts`), and copies weighted ``load/C`` are packed onto the node's GPUs with equal
    counts and no anti-affinity; otherwise the same with one group and one node.
    Returns ``phy2log [L, num_phy]``, ``log2phy [L, N, X]`` (-1 padded; replica r of e -> slot),
    ``logcnt [L, N]``.
    """
    num_layers, n = weight.shape
    assert num_phy % num_gpus == 0 and num_gpus % num_nodes == 0, "EPLB needs num_phy % G == 0 and G % nodes == 0"
    if not (num_groups >= num_nodes and num_groups % num_nodes == 0 and n % num_groups == 0):
        num_groups, num_nodes = 1, 1
    per_node_gpus, per_node_phy, group_size = num_gpus // num_nodes, num_phy // num_nodes, n // num_groups
    phy2logs, log2phys, logcnts = [], [], []
    for li in range(num_layers):
        w = weight[li].to(torch.float64)
        group_node = balanced_packing(w.view(num_groups, group_size).sum(-1), num_nodes, refine=False)
        logcnt = torch.zeros(n, dtype=torch.int64)
        slot_owner, slot_rank, slot_weight, slot_device = [], [], [], []
        for nd in range(num_nodes):
            experts = torch.cat([torch.arange(g * group_size, (g + 1) * group_size)
                                 for g in torch.nonzero(group_node == nd).flatten().tolist()])
            cnt = replicate_experts(w[experts], per_node_phy)
            logcnt[experts] = cnt
            owner_local, rank = phy2log(cnt), copy_index(cnt)
            owner = experts[owner_local]
            per_copy = w[owner] / cnt[owner_local]
            device = nd * per_node_gpus + balanced_packing(per_copy, per_node_gpus, refine=False)
            slot_owner.append(owner), slot_rank.append(rank), slot_weight.append(per_copy), slot_device.append(device)
        owner, rank = torch.cat(slot_owner), torch.cat(slot_rank)
        per_copy, device = torch.cat(slot_weight), torch.cat(slot_device)
        order = torch.from_numpy(np.lexsort((rank.numpy(), owner.numpy(), -per_copy.numpy(), device.numpy())))
        slot = torch.empty(num_phy, dtype=torch.int64)
        slot[order] = torch.arange(num_phy)
        log2phy = torch.full((n, int(logcnt.max())), -1, dtype=torch.int64)
        log2phy[owner, rank] = slot
        phy2logs.append(owner[order]), log2phys.append(log2phy), logcnts.append(logcnt)
    return _stack(phy2logs, log2phys, logcnts)


def slot_loads(load: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """``[P]`` float64 load of each slot when ``load [N]`` assignments reach the layer and copy c of e (in
    slot ``log2phy[e, c]``) gets its docs/spec.md §4 share (:func:`rq.core.replica.split_load`)."""
    owner, copy = phy2log(logcnt), copy_index(logcnt)
    out = torch.zeros(owner.numel(), dtype=torch.float64)
    out[log2phy[owner, copy]] = split_load(load, logcnt).to(torch.float64)
    return out


def device_loads(load: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Makespan simulation: ``[L, G]`` float64 assignments each device serves. load, logcnt: ``[L, N]``;
    log2phy: ``[L, N, X]``. Slot s is on device ``s * G // P`` (``s // (P/G)`` when G divides P)."""
    rows = []
    for li in range(load.shape[0]):
        per_slot = slot_loads(load[li], log2phy[li], logcnt[li])
        device = torch.arange(per_slot.numel()) * num_gpus // per_slot.numel()
        rows.append(torch.zeros(num_gpus, dtype=torch.float64).index_add_(0, device, per_slot))
    return torch.stack(rows)


def device_lis(loads: torch.Tensor) -> torch.Tensor:
    """Device LIS (docs/spec.md §2 with devices as units): ``[L, G]`` -> ``[L]``, NaN for a layer without load."""
    return lis(loads)


def makespan_ratio(loads: torch.Tensor) -> float:
    """``sum_l max_d / sum_l mean_d`` of ``[L, G]`` device loads: the slowdown of a forward pass whose
    layers each wait for their slowest device, against perfect balance (1.0)."""
    return float(loads.amax(-1).sum() / loads.mean(-1).sum())


def colocated(phy2log: torch.Tensor, num_gpus: int) -> int:
    """How many slots hold an expert already held by another slot of the same device (``[L, P]`` or ``[P]``)."""
    rows = phy2log.reshape(-1, phy2log.shape[-1])
    per_gpu = rows.shape[-1] // num_gpus
    return sum(per_gpu - row[d * per_gpu:(d + 1) * per_gpu].unique().numel()
               for row in rows for d in range(num_gpus))


def unavoidable_colocated(logcnt: torch.Tensor, num_gpus: int) -> int:
    """Lower bound of :func:`colocated` on one node: copies beyond one per device, ``sum max(0, C_e - G)``."""
    return int((logcnt - num_gpus).clamp(min=0).sum())


def lpt_bound(weight: torch.Tensor, num_packs: int) -> float:
    """List-scheduling bound on the most loaded pack: mean pack load + the largest item."""
    weight = weight.to(torch.float64)
    return float(weight.sum() / num_packs + weight.max())
