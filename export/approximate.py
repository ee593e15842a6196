"""The approximate parity rule (docs/spec.md §9) for a fused route whose ``QMoE`` nodes quantize activations to
int8 (``rq export --ort-int8-activations``).

Int8 activations move logits by about 1e-2 of their scale, far outside the float32 element-wise tolerance, and
now and then a router's choice with them: an element-wise comparison cannot tell such a file from a broken one.
What can is what a user of the model sees: the next-token distribution (mean KL divergence per call, and top-1
agreement), the KV cache as a whole (relative L2 error) and the routing (the same number of assignments per
call, at most a small share routed the other way). Pure functions over numpy arrays (``rq check`` runs without
PyTorch, so not :class:`rq.eval.evaluate.AccuracyAccumulator`); :mod:`rq.export.parity` turns their verdicts into
report rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KL_LIMIT = 5e-3
"""Largest mean KL(reference ‖ runtime) of the next-token distributions of one call, in nats."""
TOP1_MIN = 0.95
"""Smallest share of positions of one call whose most likely token is the reference's."""
REL_L2_LIMIT = 5e-2
"""Largest ``‖runtime − reference‖ / ‖reference‖`` of any other float output (the KV cache) in one call."""
MOVED_SHARE = 0.05
"""Share of one call's assignments that may be routed to other experts, beyond the reference's near-ties."""


@dataclass(frozen=True)
class Verdict:
    """One output over all calls: ``passed``, its worst ``value`` against ``limit`` and a one-line ``rule``."""

    passed: bool
    value: float
    limit: float
    rule: str


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(reference: np.ndarray, runtime: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) ‖ softmax(runtime)) along the last axis, in nats."""
    ref, run = log_softmax(reference), log_softmax(runtime)
    return float((np.exp(ref) * (ref - run)).sum(-1).mean())


def top1_agreement(reference: np.ndarray, runtime: np.ndarray) -> float:
    """Share of positions whose argmax along the last axis agrees."""
    return float((np.asarray(reference).argmax(-1) == np.asarray(runtime).argmax(-1)).mean())


def relative_l2(reference: np.ndarray, runtime: np.ndarray) -> float:
    ref = np.asarray(reference, np.float64)
    norm = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(np.asarray(runtime, np.float64) - ref))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def logits_verdict(calls: list[tuple[np.ndarray, np.ndarray]]) -> Verdict:
    """``calls``: (reference, runtime) logits per call."""
    kl = max((mean_kl(r, o) for r, o in calls), default=math.inf)
    top1 = min((top1_agreement(r, o) for r, o in calls), default=0.0)
    passed = bool(calls) and kl <= KL_LIMIT and top1 >= TOP1_MIN
    return Verdict(passed, kl, KL_LIMIT, f"mean KL {kl:.2e} (<= {KL_LIMIT:g})  top-1 {top1:.1%} (>= {TOP1_MIN:.0%})")


def tensor_verdict(calls: list[tuple[np.ndarray, np.ndarray]]) -> Verdict:
    """Any other float output (the KV cache): relative L2 error per call."""
    err = max((relative_l2(r, o) for r, o in calls), default=math.inf)
    return Verdict(bool(calls) and err <= REL_L2_LIMIT, err, REL_L2_LIMIT,
                   f"rel L2 {err:.2e} (<= {REL_L2_LIMIT:g})")


def counts_verdict(calls: list[tuple[np.ndarray, np.ndarray]], near_ties: list[int] | None) -> Verdict:
    """``expert_counts``: every call the same total, and over all calls at most ``MOVED_SHARE`` of the
    assignments moved beyond the reference's near-tie swaps (``near_ties``, per call). Summed over the calls
    because a decode step has only a handful of assignments; ``value`` is the moved share."""
    if not calls:
        return Verdict(False, math.inf, MOVED_SHARE, "no calls")
    moved = ties = total = 0
    for i, (ref, ours) in enumerate(calls):
        ref, ours = np.asarray(ref, np.int64), np.asarray(ours, np.int64)
        if ref.shape != ours.shape or ref.sum() != ours.sum():
            return Verdict(False, math.inf, MOVED_SHARE, f"call {i}: assignments lost or added (totals differ)")
        moved += int(np.maximum(ours - ref, 0).sum())
        ties += near_ties[i] if near_ties is not None and i < len(near_ties) else 0
        total += int(ref.sum())
    share = moved / max(total, 1)
    return Verdict(moved <= ties + math.floor(MOVED_SHARE * total), share, MOVED_SHARE,
                   f"moved {moved}/{total} ({share:.2%}; <= {MOVED_SHARE:.0%} + {ties} near-ties)")


def verdict(name: str, calls: list[tuple[np.ndarray, np.ndarray]], near_ties: list[int] | None = None) -> Verdict:
    """The rule for output ``name`` (``logits``, ``expert_counts.*``, anything else: the KV cache)."""
    if name.startswith("expert_counts"):
        return counts_verdict(calls, near_ties)
    if name.startswith("logits"):
        return logits_verdict(calls)
    return tensor_verdict(calls)
