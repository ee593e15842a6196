"""Device loads under each serving engine's own dispatch rule: which copy of an expert a token's assignment reaches
(docs/multi-gpu.md, "Dispatch: which copy serves a token"). Pure functions over tensors, read from the engines'
code (SGLang 0.5.23, vLLM 0.33.0, TensorRT-LLM's load-balancer routing kernel):

* ``rq`` -- docs/spec.md §4 with streaming offsets: the even split of :func:`rq.core.replica.split_load`, exact;
* ``sglang-dynamic`` -- SGLang without an all-to-all backend: every rank runs the same tokens and token row ``t``
  of a forward pass takes copy ``t % C`` (``_topk_ids_logical_to_physical_dynamic``, rank-invariant);
* ``sglang-static`` -- SGLang with ``--moe-a2a-backend deepep``: each rank sends its tokens to the copy its
  table names (``compute_logical_to_rank_dispatch_physical_map``): its own copy, else the first copy on its node
  when that narrows the choice, else a pick drawn from ``random.Random(42)``. Each rank draws from its own
  stream over a map already narrowed for it, so the picks are not fair across ranks; rq replays the exact draws;
* ``vllm`` -- vLLM's EPLB mapping kernel: token row ``t`` of a rank's batch takes copy
  ``((t * 2654435769) mod 2^32) mod C``;
* ``trtllm`` -- TensorRT-LLM's ``moeComputeRouteKernel``: within each block of 1024 routed ids the ``n``-th id
  of an expert takes copy ``(n + block + ep_rank) mod C`` (attention DP offsets by the rank).

Loads are counts; tokens are assumed to reach every rank and row alike (routing independent of the row and
the rank), so the row rules give each copy its share of ``batch_tokens`` rows and SGLang's static rule gives
each rank ``1/G`` of an expert's load. Copies of an expert are taken in slot order, as every engine lists them.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from rq.core.replica import split_load

DISPATCH_MODES = ("rq", "sglang-dynamic", "sglang-static", "vllm", "trtllm")
ENGINE_MODES = {"rq": ("rq",), "sglang": ("sglang-dynamic", "sglang-static"), "vllm": ("vllm",),
                "trtllm": ("trtllm",)}
# Tokens of one forward pass on one rank (SGLang's and vLLM's default chunked prefill size).
DEFAULT_BATCH_TOKENS = 8192
KNUTH_MULTIPLIER = 2654435769  # vLLM's hash: floor(2^32 / phi)
TRTLLM_BLOCK = 1024  # routed ids per thread block of moeComputeRouteKernel (256 threads x 4)
SGLANG_SEED = 42


def row_shares(mode: str, batch_tokens: int, num_copies: int) -> np.ndarray:
    """``[C]`` fraction of a forward pass's ``batch_tokens`` rows whose tokens take each copy (row rules)."""
    rows = np.arange(batch_tokens, dtype=np.int64)
    if mode == "vllm":
        rows = (rows * KNUTH_MULTIPLIER) & 0xFFFFFFFF
    return np.bincount(rows % num_copies, minlength=num_copies) / batch_tokens


def trtllm_shares(p: np.ndarray | float, batch_tokens: int, top_k: int, num_copies: int, num_ranks: int) -> np.ndarray:
    """``[E, C]`` (``[C]`` for a scalar ``p``) expected fraction of an expert's ids that reach each copy under
    TensorRT-LLM's block round robin, for experts a token picks with probability ``p [E]``, ``batch_tokens``
    tokens per rank, ranks offset by rank.

    Within a block of ``t`` tokens the ``n``-th id of an expert exists with probability ``P(X > n)``,
    ``X ~ Binomial(t, p)``, and goes to copy ``(n + block + rank) mod C``: per block size, the survival function
    folded modulo ``C`` and convolved with how often each offset ``block + rank`` occurs (all experts at once)."""
    scalar = np.ndim(p) == 0
    prob = np.atleast_1d(np.asarray(p, dtype=np.float64))
    c = num_copies
    elements = batch_tokens * top_k
    blocks = -(-elements // TRTLLM_BLOCK)
    per_block = [(min(elements, (b + 1) * TRTLLM_BLOCK) - b * TRTLLM_BLOCK) // top_k for b in range(blocks)]
    live = prob > 0
    out = np.zeros((prob.size, c))
    for tokens in sorted({t for t in per_block if t > 0}):
        if not live.any():
            break
        probs = torch.from_numpy(np.minimum(prob[live], 1.0)[:, None])
        pmf = torch.distributions.Binomial(tokens, probs=probs).log_prob(
            torch.arange(tokens + 1, dtype=torch.float64)).exp().numpy()
        survive = 1.0 - np.cumsum(pmf, axis=1)[:, :-1]  # P(X > n), n = 0 .. tokens-1
        folded = np.zeros((survive.shape[0], c))
        np.add.at(folded.T, np.arange(tokens) % c, survive.T)
        offsets = np.array([b + r for b, t in enumerate(per_block) if t == tokens for r in range(num_ranks)])
        weight = np.bincount(offsets % c, minlength=c).astype(np.float64)
        shift = (np.arange(c)[:, None] - np.arange(c)[None, :]) % c  # [k, j]: copy k takes folded (k - j) mod C
        out[live] += np.einsum("j,ekj->ek", weight, folded[:, shift])
    total = out.sum(-1, keepdims=True)
    shares = np.where(total > 0, out / np.where(total > 0, total, 1.0), 1.0 / c)
    return shares[0] if scalar else shares


def _static_entries(row: np.ndarray, num_gpus: int, num_nodes: int) -> tuple[np.ndarray, list[tuple]]:
    """One ``physical_to_logical_map`` row ``[P]`` -> (``[N]`` the slot every rank takes for an expert with one
    copy, -1 elsewhere; per expert with several copies ``(e, candidate slots ascending, {rank: its own first copy},
    {node: the node's first copy where that narrows the choice}, ranks left without a pick)``)."""
    num_phy = row.size
    n = int(row.max()) + 1
    per_gpu = num_phy // num_gpus
    per_node = num_gpus // num_nodes
    order = np.argsort(row, kind="stable")
    counts = np.bincount(row, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)])
    single = np.full(n, -1, dtype=np.int64)
    ones = np.flatnonzero(counts == 1)
    single[ones] = order[starts[ones]]
    entries = []
    slots, bounds = order.tolist(), starts.tolist()
    for e in np.flatnonzero(counts > 1).tolist():
        cand = slots[bounds[e]:bounds[e + 1]]
        own: dict[int, int] = {}
        for s in cand:
            own.setdefault(s // per_gpu, s)  # a device's first copy wins
        node_first: dict[int, int] = {}
        if num_nodes > 1:
            node_count = np.bincount(np.asarray(cand) // per_gpu // per_node, minlength=num_nodes)
            for s in cand:
                nd = s // per_gpu // per_node
                if node_count[nd] < len(cand):
                    node_first.setdefault(nd, s)
        left = [r for r in range(num_gpus) if r not in own and r // per_node not in node_first]
        entries.append((e, cand, own, node_first, left))
    return single, entries


def static_layer_table(row: np.ndarray, num_gpus: int, num_nodes: int, rngs: list[random.Random]) -> np.ndarray:
    """``[G, N]`` slot each EP rank's static table names for one decoder layer's row ``[P]``; ``rngs`` (one
    ``random.Random`` per rank, advanced in place) carry each rank's draws from layer to layer."""
    per_node = num_gpus // num_nodes
    single, entries = _static_entries(np.asarray(row, dtype=np.int64), num_gpus, num_nodes)
    table = np.repeat(single[None, :], num_gpus, axis=0)
    for e, cand, own, node_first, left in entries:
        for me in range(num_gpus):
            if me in own:
                table[me, e] = own[me]
            elif me // per_node in node_first:
                table[me, e] = node_first[me // per_node]
        if left:  # SGLang draws the fair choices of every rank left without a pick; each rank keeps its own
            quotient, remainder = divmod(len(left), len(cand))
            for i, me in enumerate(left):
                rng = rngs[me]
                ans = cand * quotient + rng.sample(cand, k=remainder)
                rng.shuffle(ans)
                table[me, e] = ans[i]
    return table


def sglang_static_table(rows: torch.Tensor, num_gpus: int, num_nodes: int) -> np.ndarray:
    """``[G, H, N]`` slot each EP rank's static table names, for SGLang's ``physical_to_logical_map`` rows
    ``[H, P]`` (every decoder layer, as the file holds them), replayed from SGLang's rule: per rank, the map
    narrowed to the rank's own copy (or its node's first copy when that narrows the choice), then the fair
    choices of ``random.Random(42)`` for the ranks left without one, over layers and experts in order."""
    phy = rows.to(torch.int64).numpy()
    rngs = [random.Random(SGLANG_SEED) for _ in range(num_gpus)]
    return np.stack([static_layer_table(r, num_gpus, num_nodes, rngs) for r in phy], axis=1)


def static_slot_loads(load: torch.Tensor, table: np.ndarray, num_phy: int) -> torch.Tensor:
    """``[P]`` slot loads of one layer under static tables ``[G, N]``: each rank sends ``1/G`` of every load."""
    g = table.shape[0]
    share = np.repeat(load.to(torch.float64).numpy()[None, :] / g, g, axis=0)
    return torch.from_numpy(np.bincount(table.reshape(-1), weights=share.reshape(-1), minlength=num_phy))


def slot_loads(mode: str, load: torch.Tensor, phy2log: torch.Tensor, *, num_gpus: int, top_k: int = 1,
               tokens: float | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
               static_table: np.ndarray | None = None) -> torch.Tensor:
    """``[P]`` float64 load of each slot of one layer (``load [N]``, ``phy2log [P]``) under ``mode``.

    tokens: tokens behind ``load`` (TensorRT-LLM's rule needs each expert's pick probability ``load / tokens``;
    default ``sum(load) / top_k``); static_table: ``[G, N]`` for ``sglang-static`` (:func:`sglang_static_table`).
    Experts are handled by copy count, all experts of one count at once.
    """
    num_phy = phy2log.numel()
    if mode == "sglang-static":
        assert static_table is not None, "sglang-static needs the ranks' static tables"
        return static_slot_loads(load, static_table, num_phy)
    if mode not in DISPATCH_MODES:
        raise ValueError(f"unknown dispatch mode '{mode}'; choose one of {', '.join(DISPATCH_MODES)}")
    owner = phy2log.to(torch.int64).numpy()
    n = load.numel()
    counts = np.bincount(owner, minlength=n)
    order = np.argsort(owner, kind="stable")  # slots grouped by expert, ascending: copy c of e is its c-th slot
    owner_sorted = owner[order]
    copy = np.arange(num_phy) - np.concatenate([[0], np.cumsum(counts)])[owner_sorted]
    c_of = counts[owner_sorted]
    value = load.to(torch.float64).numpy()
    out = np.zeros(num_phy)
    if mode == "rq":
        rounded = load.round().to(torch.int64)
        held = torch.from_numpy(counts)
        shares = split_load(rounded[held > 0], held[held > 0]).to(torch.float64).numpy()
        out[order] = shares
        return torch.from_numpy(out)
    total_tokens = float(load.sum()) / max(top_k, 1) if tokens is None else tokens
    for c in np.unique(counts[counts > 0]).tolist():
        at = c_of == c
        slots, e, k = order[at], owner_sorted[at], copy[at]
        if c == 1:
            out[slots] = value[e]
        elif mode in ("sglang-dynamic", "vllm"):
            out[slots] = row_shares(mode, batch_tokens, c)[k] * value[e]
        else:  # trtllm
            experts = np.flatnonzero(counts == c)
            p = value[experts] / total_tokens if total_tokens else np.zeros(experts.size)
            frac = trtllm_shares(p, batch_tokens, top_k, c, num_gpus)
            index = np.searchsorted(experts, e)
            out[slots] = frac[index, k] * value[e]
    return torch.from_numpy(out)


def device_loads(mode: str, load: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, *, top_k: int = 1,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, static_tables: np.ndarray | None = None) -> torch.Tensor:
    """``[L, G]`` device loads of ``load [L, N]`` on ``phy2log [L, P]`` under ``mode``; static_tables:
    ``[G, L, N]`` (the MoE layers' rows of :func:`sglang_static_table`) for ``sglang-static``."""
    rows = []
    for li in range(load.shape[0]):
        per_slot = slot_loads(mode, load[li], phy2log[li], num_gpus=num_gpus, top_k=top_k, batch_tokens=batch_tokens,
                              static_table=None if static_tables is None else static_tables[:, li])
        device = torch.arange(per_slot.numel()) * num_gpus // per_slot.numel()
        rows.append(torch.zeros(num_gpus, dtype=torch.float64).index_add_(0, device, per_slot))
    return torch.stack(rows)
