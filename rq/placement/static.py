"""Placement that balances SGLang's static dispatch (``--moe-a2a-backend deepep``): which device each copy sits on,
chosen so that the static tables SGLang builds from the layout send every device its share.

SGLang's static table (:func:`rq.placement.dispatch.static_layer_table`) is a function of the physical layout:
a rank holding a copy of an expert sends its tokens to that copy, a rank on a node with a copy (when that narrows
the choice) to the node's first one, and every other rank to a copy drawn from its own ``random.Random(42)``
stream. Those draws are not fair across ranks, so a layout that balances an even split of each expert over its
copies (:func:`rq.placement.place.place`) leaves some devices with several ranks' worth of a hot expert more than
others (device LIS 1.1-1.3). The draws are deterministic, so the static device loads of a layout can be computed
exactly, and the layout is the lever: this module searches it. Layer by layer in decoder order (each rank's
stream runs on through the layers), swaps of two copies between devices are tried on the most loaded device under
static dispatch, ranked by the loads they would move, and the swap whose exact static loads are best is kept; the
search restarts from relabelled devices while it ends more than ``RESTART_TOLERANCE`` above the mean. The layout
serves static dispatch only (``rq place`` writes it beside the even-split one): moving copies takes the even split
off balance, which static dispatch does not see. Pure functions over arrays.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from rq.placement.dispatch import SGLANG_SEED, _static_entries, static_layer_table

# Starts of the local search per MoE layer: the layout as placed, then its devices relabelled (seeded; within nodes
# when router groups pin copies to nodes). Relabelling keeps every device's copies, so the even split stays as it
# was, while the static tables (the ranks' streams, the candidates' order) are drawn anew.
RESTARTS = 8
# Stop a search once static dispatch's most loaded device is within this fraction of the mean, and start no other
# once a start has reached RESTART_TOLERANCE (closer than that the loads' own sampling noise decides).
STATIC_TOLERANCE = 0.002
RESTART_TOLERANCE = 0.01
# Exact evaluations of the static tables per MoE layer, and candidate swaps evaluated per step.
MAX_EVALS = 400
CANDIDATES = 48
# Exact evaluations for the whole model, shared by its MoE layers (at least MIN_EVALS each): each costs two ranks'
# draws over a layer, so a model with many layers and ranks gets fewer restarts instead of hours.
EVAL_BUDGET = 20000
MIN_EVALS = 100


def static_device_loads(table: np.ndarray, load: np.ndarray, num_phy: int) -> np.ndarray:
    """``[G]`` device loads of one layer when every rank sends ``1/G`` of ``load [N]`` along its table ``[G, N]``."""
    g = table.shape[0]
    per_gpu = num_phy // g
    return np.bincount((table // per_gpu).reshape(-1), weights=np.tile(load / g, g), minlength=g)


class _Layer:
    """One MoE layer's copies (owner, device) and the ranks' streams at the layer's start: exact static loads of
    any assignment of the copies to devices."""

    def __init__(self, owner: np.ndarray, load: np.ndarray, num_gpus: int, num_nodes: int, states: list):
        self.owner, self.load, self.g, self.nodes, self.states = owner, load, num_gpus, num_nodes, states
        self.num_phy = owner.size
        self.rngs = [random.Random() for _ in range(num_gpus)]

    def row(self, device: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row [P], order [P])``: the layout (device-major, a device's copies by expert) and the copy in each slot."""
        order = np.lexsort((self.owner, device))
        return self.owner[order], order

    def _entries(self, device: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """``(order [P], single [N], {expert: entry})``: :func:`_static_entries` of the layout, slots as in ``order``."""
        row, order = self.row(device)
        single, entries = _static_entries(row, self.g, self.nodes)
        return order, single, {entry[0]: entry for entry in entries}

    def _rank(self, r: int, entry: tuple, order: np.ndarray, rng: random.Random | None, cache: dict) -> int:
        """Copy rank ``r`` sends expert ``entry[0]`` to. A rank left without a pick draws (``rng``: SGLang's
        ``_fair_choices`` over candidate positions, the same draws as over the slots) or, with ``rng`` None, reuses
        the positions it drew before (``cache``): the draws depend only on the counts, not on which copies."""
        e, cand, own, node_first, left = entry
        if r in own:
            return int(order[own[r]])
        if r // (self.g // self.nodes) in node_first:
            return int(order[node_first[r // (self.g // self.nodes)]])
        if rng is not None:
            quotient, remainder = divmod(len(left), len(cand))
            positions = list(range(len(cand)))
            ans = positions * quotient + rng.sample(positions, k=remainder)
            rng.shuffle(ans)
            cache[e] = ans
        return int(order[cand[cache[e][left.index(r)]]])

    def _loads(self, device: np.ndarray, pick: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_copy = np.bincount(pick.reshape(-1), weights=np.tile(self.load / self.g, self.g), minlength=self.num_phy)
        return np.bincount(device, weights=per_copy, minlength=self.g), per_copy

    def evaluate(self, device: np.ndarray, state: tuple | None = None,
                 swap: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, tuple]:
        """``(device loads [G], load of each copy [P], state)`` under static dispatch. With the ``state`` of the
        layout before and ``swap = (a, b, p, q)`` (experts a on device p and b on q traded a copy, p and q on one
        node, neither device holding the other's expert before nor a second copy of its own) only ranks p and q
        draw anew: every other rank keeps its draws (its counts are unchanged) and its picks
        but for experts a and b."""
        order, single, entries = self._entries(device)
        if state is None or swap is None:
            pick = np.repeat(np.where(single >= 0, order[np.maximum(single, 0)], -1)[None, :], self.g, axis=0)
            caches = [{} for _ in range(self.g)]
            for r, (rng, start) in enumerate(zip(self.rngs, self.states)):
                rng.setstate(start)
                for e, entry in entries.items():
                    pick[r, e] = self._rank(r, entry, order, rng, caches[r])
            return (*self._loads(device, pick), (pick, caches))
        a, b, p, q = swap
        pick, caches = state[0].copy(), list(state[1])
        for r in (p, q):
            rng, caches[r] = self.rngs[r], {}
            rng.setstate(self.states[r])
            for e, entry in entries.items():
                pick[r, e] = self._rank(r, entry, order, rng, caches[r])
        for e in {a, b}:
            if e in entries:
                for r in range(self.g):
                    if r != p and r != q:
                        pick[r, e] = self._rank(r, entries[e], order, None, caches[r])
            else:
                pick[:, e] = order[single[e]]
        return (*self._loads(device, pick), (pick, caches))


def _score(loads: np.ndarray) -> tuple[float, float]:
    return float(loads.max()), float(np.square(loads).sum())


def balance_layer(layer: _Layer, device: np.ndarray, node_locked: bool, max_evals: int = MAX_EVALS,
                  even_slack: float = np.inf) -> tuple[np.ndarray, tuple[float, float], int]:
    """Local search over swaps of copies between devices (module docstring): ``(device of each copy, score,
    exact evaluations used)``.
    ``node_locked``: swaps stay within a node (router groups are placed node by node); ``even_slack``: how far above
    its mean (or its start) the even split's most loaded device may rise."""
    g, owner, load = layer.g, layer.owner, layer.load
    per_node = g // layer.nodes
    counts = np.bincount(owner, minlength=load.size)
    weight = load[owner] / counts[owner]  # even split of each expert over its copies
    even = np.bincount(device, weights=weight, minlength=g)
    mean = float(load.sum()) / g
    if mean <= 0:
        return device, (0.0, 0.0), 0
    bound = max(float(even.max()), mean * (1 + even_slack))
    held = np.zeros((g, load.size), dtype=np.int64)
    np.add.at(held, (device, owner), 1)
    static, per_copy, state = layer.evaluate(device)
    best = _score(static)
    evals, tried = 1, set()
    while evals < max_evals and best[0] > mean * (1 + STATIC_TOLERANCE):
        p = int(np.argmax(static))
        mine = np.flatnonzero(device == p)
        others = np.flatnonzero(device != p)
        if node_locked:
            others = others[device[others] // per_node == p // per_node]
        if mine.size == 0 or others.size == 0:
            break
        q = device[others]
        delta = per_copy[mine][:, None] - per_copy[others][None, :]
        predicted = np.maximum(static[p] - delta, static[q][None, :] + delta)
        moved = weight[mine][:, None] - weight[others][None, :]
        ok = owner[mine][:, None] != owner[others][None, :]
        ok &= held[q[None, :], owner[mine][:, None]] == 0
        ok &= held[p, owner[others]][None, :] == 0
        ok &= (even[p] - moved <= bound) & (even[q][None, :] + moved <= bound)
        predicted[~ok] = np.inf
        ranked = np.argsort(predicted, axis=None, kind="stable")
        trial = None
        looked = 0
        for flat in ranked:
            if looked >= CANDIDATES or evals >= max_evals or not np.isfinite(predicted.flat[flat]):
                break
            a, b = np.unravel_index(int(flat), predicted.shape)
            i, j = int(mine[a]), int(others[b])
            cand = device.copy()
            cand[i], cand[j] = device[j], device[i]
            key = cand.tobytes()
            if key in tried:
                continue
            tried.add(key)
            looked += 1
            p_, q_ = int(device[i]), int(device[j])
            # redraw two ranks only where every expert keeps its device count (no copy leaves a colocated pair)
            same_node = p_ // per_node == q_ // per_node and held[p_, owner[i]] == 1 and held[q_, owner[j]] == 1
            loads, copies, after = layer.evaluate(cand, state, (int(owner[i]), int(owner[j]), p_, q_) if same_node else None)
            evals += 1
            if _score(loads) < (best if trial is None else trial[0]):
                trial = (_score(loads), cand, loads, copies, i, j, after)
        if trial is None:
            break
        best, new, static, per_copy, i, j, state = trial
        for c, src, dst in ((i, device[i], new[i]), (j, device[j], new[j])):
            held[src, owner[c]] -= 1
            held[dst, owner[c]] += 1
            even[src] -= weight[c]
            even[dst] += weight[c]
        device = new
    return device, best, evals


def balance_static(load: torch.Tensor, phy2log: torch.Tensor, decoder: list[int], num_hidden: int, num_gpus: int,
                   num_nodes: int, node_locked: bool = False, max_evals: int = MAX_EVALS, restarts: int = RESTARTS,
                   even_slack: float = np.inf) -> torch.Tensor:
    """``phy2log [L, P]`` re-laid so that SGLang's static dispatch balances the devices for ``load [L, N]`` (MoE
    layer ``l`` at decoder index ``decoder[l]`` of ``num_hidden``; SGLang's other rows are ``p % N`` and draw too).
    Every device keeps its slot count and every layer its copies; a copy shares a device with another copy of its
    expert only where the input had that. ``restarts`` starts per layer (:data:`RESTARTS`), each with ``max_evals``
    exact evaluations, all within the layer's share of :data:`EVAL_BUDGET`; ``even_slack``: see
    :func:`balance_layer` (unbounded: the layout serves static dispatch)."""
    num_layers, num_phy = phy2log.shape
    n = load.shape[1]
    per_gpu = num_phy // num_gpus
    rngs = [random.Random(SGLANG_SEED) for _ in range(num_gpus)]
    where = {d: li for li, d in enumerate(decoder)}
    out = phy2log.clone().to(torch.int64)
    for h in range(num_hidden):
        if h not in where:
            static_layer_table(np.arange(num_phy) % n, num_gpus, num_nodes, rngs)
            continue
        li = where[h]
        owner = out[li].numpy().copy()
        layer = _Layer(owner, load[li].to(torch.float64).numpy(), num_gpus, num_nodes, [r.getstate() for r in rngs])
        base = np.arange(num_phy) // per_gpu
        shuffle = np.random.default_rng(li)
        best = None
        budget, used = max(MIN_EVALS, min(max(restarts, 1) * max_evals, EVAL_BUDGET // max(len(decoder), 1))), 0
        for start in range(max(restarts, 1)):
            if used >= budget:
                break
            label = np.arange(num_gpus)
            if start:
                per_node = num_gpus // num_nodes
                blocks = label.reshape(num_nodes, per_node) if node_locked else label[None, :]
                label = np.concatenate([shuffle.permutation(b) for b in blocks])
            found = balance_layer(layer, label[base], node_locked, min(max_evals, budget - used), even_slack)
            used += found[2]
            if best is None or found[1] < best[1]:
                best = found[:2]
            if best[1][0] <= float(layer.load.sum()) / num_gpus * (1 + RESTART_TOLERANCE):
                break
        row, _ = layer.row(best[0])
        out[li] = torch.from_numpy(row)
        static_layer_table(row, num_gpus, num_nodes, rngs)
    return out

