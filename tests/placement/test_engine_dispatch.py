"""rq's dispatch simulation against re-implementations of the engines' token-level rules run on sampled tokens
(vLLM's row hash, TensorRT-LLM's block round robin, SGLang's dynamic row rule); SGLang's static tables are
compared with SGLang's own code in test_servers.py."""

import numpy as np
import torch

from rq.placement.dispatch import KNUTH_MULTIPLIER, TRTLLM_BLOCK, slot_loads
from rq.placement.place import device_lis


def _tokens(load: np.ndarray, top_k: int, tokens: int, rng) -> np.ndarray:
    """``[tokens, top_k]`` distinct expert ids per token, drawn with probability ~ load."""
    p = load / load.sum()
    return np.stack([rng.choice(load.size, size=top_k, replace=False, p=p) for _ in range(tokens)])


def _engine_counts(mode: str, ids: np.ndarray, phy2log: np.ndarray, batch: int, ranks: int) -> np.ndarray:
    """Slot counts from the engine's token-level rule; ``ids`` split into batches of ``batch`` rows per rank."""
    slots = {e: np.flatnonzero(phy2log == e) for e in np.unique(phy2log)}
    out = np.zeros(phy2log.size)
    k = ids.shape[1]
    for start in range(0, len(ids), batch * ranks):
        for rank in range(ranks):
            part = ids[start + rank * batch:start + (rank + 1) * batch]
            seen: dict[tuple[int, int], int] = {}
            for pos, e in enumerate(part.reshape(-1)):
                c = slots[int(e)].size
                if mode == "vllm":
                    copy = ((pos // k) * KNUTH_MULTIPLIER & 0xFFFFFFFF) % c
                elif mode == "sglang-dynamic":  # _topk_ids_logical_to_physical_dynamic, rank_invariant: row % C
                    copy = (pos // k) % c
                else:  # trtllm: n-th id of e in its block of 1024, offset by block and rank
                    block = pos // TRTLLM_BLOCK
                    n = seen.get((block, int(e)), 0)
                    seen[(block, int(e))] = n + 1
                    copy = (n + block + rank) % c
                out[slots[int(e)][copy]] += 1
    return out


def test_row_hash_and_block_round_robin_match_the_engines_rules():
    rng = np.random.default_rng(0)
    n, k, gpus, batch = 8, 2, 4, 256
    load = rng.exponential(size=n) + 0.2
    phy2log = np.array([0, 1, 2, 3, 0, 4, 5, 1, 6, 7, 0, 2])  # 12 slots, 3 per device
    ids = _tokens(load, k, 16384, rng)
    counts = torch.from_numpy(np.bincount(ids.reshape(-1), minlength=n).astype(np.float64))
    for mode in ("vllm", "trtllm", "sglang-dynamic"):
        engine = torch.from_numpy(_engine_counts(mode, ids, phy2log, batch, gpus)).view(gpus, -1).sum(-1)
        mine = slot_loads(mode, counts, torch.from_numpy(phy2log), num_gpus=gpus, top_k=k, tokens=len(ids),
                          batch_tokens=batch).view(gpus, -1).sum(-1)
        assert abs(float(device_lis(mine[None])[0]) / float(device_lis(engine[None])[0]) - 1) < 0.01, mode
        assert abs(float(mine.sum()) - float(engine.sum())) < 1e-6
