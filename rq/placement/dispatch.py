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


def trtllm_shares(p: float, batch_tokens: int, top_k: int, num_copies: int, num_ranks: int) -> np.ndarray:
    """``[C]`` expected fraction of an expert's ids that reach each copy under TensorRT-LLM's block round robin,
    for an expert a token picks with probability ``p``, ``batch_tokens`` tokens per rank, ranks offset by rank."""
    elements = batch_tokens * top_k
    blocks = -(-elements // TRTLLM_BLOCK)
    out = np.zeros(num_copies)
    for b in range(blocks):
        tokens = (min(elements, (b + 1) * TRTLLM_BLOCK) - b * TRTLLM_BLOCK) // top_k
        if tokens <= 0 or p <= 0:
            continue
        pmf = torch.distributions.Binomial(tokens, probs=torch.tensor(min(p, 1.0), dtype=torch.float64)).log_prob(
            torch.arange(tokens + 1, dtype=torch.float64)).exp().numpy()
        survive = 1.0 - np.cumsum(pmf)[:-1]  # P(X > n), n = 0 .. tokens-1
        for r in range(num_ranks):
            np.add.at(out, (np.arange(tokens) + b + r) % num_copies, survive)
    total = out.sum()
    return out / total if total > 0 else np.full(num_copies, 1.0 / num_copies)


def sglang_static_table(rows: torch.Tensor, num_gpus: int, num_nodes: int) -> np.ndarray:
    """``[G, H, N]`` slot each EP rank's static table names, for SGLang's ``physical_to_logical_map`` rows
    ``[H, P]`` (every decoder layer, as the file holds them), replayed from SGLang's rule: per rank, the map
    narrowed to the rank's own copy (or its node's first copy when that narrows the choice), then the fair
    choices of ``random.Random(42)`` for the ranks left without one, over layers and experts in order."""
    phy = rows.to(torch.int64).numpy()
    num_layers, num_phy = phy.shape
    n = int(phy.max()) + 1
    per_gpu = num_phy // num_gpus
    per_node = num_gpus // num_nodes
    ranks = np.arange(num_gpus)
    # Per (layer, expert): candidate slots (ascending), what a rank holding none of them falls back to, and the
    # ranks the unnarrowed map leaves without a pick (they share the fair choices).
    entries = []
    for li in range(num_layers):
        row = []
        for e in range(n):
            cand = np.flatnonzero(phy[li] == e)
            if cand.size == 0:
                row.append(None)
                continue
            device = cand // per_gpu
            own = {int(d): int(s) for d, s in zip(device[::-1], cand[::-1])}  # a device's first copy wins
            node_first, node_count = {}, np.bincount(device // per_node, minlength=num_nodes)
            if num_nodes > 1:
                for d, s in zip(device[::-1], cand[::-1]):
                    if 0 < node_count[d // per_node] < cand.size:
                        node_first[int(d // per_node)] = int(s)
            left = [int(r) for r in ranks if r not in own and (r // per_node) not in node_first]
            row.append((cand.tolist(), own, node_first, left))
        entries.append(row)
    table = np.empty((num_gpus, num_layers, n), dtype=np.int64)
    for me in range(num_gpus):
        rng = random.Random(SGLANG_SEED)
        for li in range(num_layers):
            for e in range(n):
                entry = entries[li][e]
                if entry is None:
                    continue
                cand, own, node_first, left = entry
                if len(cand) == 1:
                    table[me, li, e] = cand[0]
                elif me in own:
                    table[me, li, e] = own[me]
                elif me // per_node in node_first:
                    table[me, li, e] = node_first[me // per_node]
                else:  # SGLang draws the fair choices of every rank left without a pick; this rank keeps its own
                    quotient, remainder = divmod(len(left), len(cand))
                    ans = cand * quotient + rng.sample(cand, k=remainder)
                    rng.shuffle(ans)
                    table[me, li, e] = ans[left.index(me)]
    return table


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
    """
    num_phy = phy2log.numel()
    if mode == "sglang-static":
        assert static_table is not None, "sglang-static needs the ranks' static tables"
        return static_slot_loads(load, static_table, num_phy)
    out = torch.zeros(num_phy, dtype=torch.float64)
    owner = phy2log.to(torch.int64)
    counts = torch.bincount(owner, minlength=load.numel())
    total_tokens = float(load.sum()) / max(top_k, 1) if tokens is None else tokens
    for e in torch.nonzero(counts).flatten().tolist():
        slots = torch.nonzero(owner == e).flatten()
        c, value = slots.numel(), float(load[e])
        if mode == "rq":
            share = split_load(load[e:e + 1].round().to(torch.int64), counts[e:e + 1]).to(torch.float64).numpy()
            out[slots] = torch.from_numpy(share)
            continue
        if c == 1:
            out[slots] = value
            continue
        if mode in ("sglang-dynamic", "vllm"):
            frac = row_shares(mode, batch_tokens, c)
        elif mode == "trtllm":
            frac = trtllm_shares(value / total_tokens if total_tokens else 0.0, batch_tokens, top_k, c, num_gpus)
        else:
            raise ValueError(f"unknown dispatch mode '{mode}'; choose one of {', '.join(DISPATCH_MODES)}")
        out[slots] = torch.from_numpy(frac * value)
    return out


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
