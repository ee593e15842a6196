"""Measure what R&Q changes (docs/spec.md §2, §9): LIS before/after for batch inference at several batch sizes
and for streaming generation, and accuracy parity against the original model.

Routing of every evaluation sequence is recorded once per model (original, R&Q). Because routing of a
token does not depend on which other sequences share its batch, batch LIS for any batch size ``B`` is
then computed exactly from those traces: sequences are grouped ``B`` at a time in row-major token order
(docs/spec.md §1) and the replica rule (§4, offsets 0) maps the R&Q model's assignments to copies. Streaming
runs real greedy generation of ``B`` concurrent sequences with the KV cache; each decode step is one
call with ``T = B`` tokens and the R&Q model's offsets rotate (§4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rq.models.adapters import Adapter, MoELayer
from rq.models.routing import record_routing
from rq.calibrate.data import batches
from rq.core.lis import InstantSummary, lis_value, model_lis
from rq.progress import progress_bar
from rq.core.replica import expert_counts, split_load
from rq.eval.streamed import StreamedPair
from rq.rqmodel.model import RQExperts, rq_layers_of, set_mode


LOSS_MARGIN = 1e-9
"""Relative margin above no balancing's LIS at which a plan counts as losing (only float noise is forgiven)."""


@dataclass
class LISPoint:
    """One layer (or the model) at one batch size: cumulative LIS and the instantaneous summary."""

    before: float
    after: float
    inst_before: InstantSummary
    inst_after: InstantSummary

    @property
    def reduction(self) -> float:
        return self.before / self.after if self.after and not math.isnan(self.after) else math.nan


@dataclass
class Accuracy:
    ppl_original: float
    ppl_rq: float
    top1_agreement: float
    kl_mean: float
    tokens: int

    @property
    def ppl_change_pct(self) -> float:
        return 100.0 * (self.ppl_rq / self.ppl_original - 1.0)


@dataclass
class EvalReport:
    layers: list[str]
    batch: dict[int, list[LISPoint]]  # batch size -> per-layer points
    streaming: list[LISPoint] | None  # per layer, over decode steps
    stream_batch: int
    stream_steps: int
    accuracy: Accuracy | None
    bytes_before: int
    bytes_after: int
    extra: dict = field(default_factory=dict)

    def model_point(self, points: list[LISPoint]) -> tuple[float, float, float, float]:
        """(mean before, worst before, mean after, worst after) over layers."""
        before = model_lis([p.before for p in points])
        after = model_lis([p.after for p in points])
        return before[0], before[1], after[0], after[1]

    def losses(self) -> list[dict]:
        """Every (mode, layer) where the plan's cumulative LIS exceeds no balancing's on the same tokens: the plan
        loses to doing nothing there (its copies were fitted to other traffic)."""
        modes = [(f"batch {b}", pts) for b, pts in sorted(self.batch.items())]
        if self.streaming is not None:
            modes.append((f"streaming {self.stream_batch}", self.streaming))
        return [{"mode": mode, "layer": name, "before": p.before, "after": p.after}
                for mode, points in modes for name, p in zip(self.layers, points)
                if not math.isnan(p.before) and not math.isnan(p.after) and p.after > p.before * (1 + LOSS_MARGIN)]

    def to_json(self) -> dict:
        def point(p: LISPoint) -> dict:
            return {"before": p.before, "after": p.after, "reduction": p.reduction,
                    "inst_before": asdict(p.inst_before), "inst_after": asdict(p.inst_after)}
        return {
            "layers": self.layers,
            "batch": {str(b): [point(p) for p in pts] for b, pts in self.batch.items()},
            "streaming": None if self.streaming is None else [point(p) for p in self.streaming],
            "stream_batch": self.stream_batch, "stream_steps": self.stream_steps,
            "accuracy": None if self.accuracy is None else {**asdict(self.accuracy),
                                                            "ppl_change_pct": self.accuracy.ppl_change_pct},
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "loses_to_no_balancing": self.losses(), **self.extra,
        }


# ---------------------------------------------------------------------------------------------------
# routing traces

@torch.no_grad()
def trace_batches(model: nn.Module, adapter: Adapter, layers: list[MoELayer], sequences: torch.Tensor,
                  batch_size: int, label: str, show_progress: bool = True, keep_logits: bool = True):
    """Run ``sequences [n, S]``; returns (per-layer ids ``[n, S_layer, K]``, list of logits per batch, or
    an empty list without ``keep_logits``: logits are ``[B, S, V]`` floats, the largest thing in a pass)."""
    logits = []
    with record_routing(model, adapter, layers) as recorders, \
            progress_bar(label, total=sequences.shape[0], enabled=show_progress) as advance:
        device = next(model.parameters()).device
        for batch in batches(sequences, batch_size):
            batch = batch.to(device)
            out = adapter.forward_logits(model, batch, torch.ones_like(batch))
            if keep_logits:
                logits.append(out.float().cpu())
            advance(batch.shape[0])
    n = sequences.shape[0]
    traces = [torch.cat(r.calls).reshape(n, -1, r.calls[0].shape[-1]) for r in recorders]
    return traces, logits


def _drain_loads(recorder, batch_size: int, num_experts: int) -> torch.Tensor:
    """``[B, N]`` per-sequence loads of the calls ``recorder`` saw for one batch of ``B`` sequences; forgets them."""
    ids = torch.cat(recorder.calls).reshape(batch_size, -1, recorder.calls[0].shape[-1])
    recorder.calls.clear()
    return sequence_loads(ids, num_experts)


@torch.no_grad()
def paired_pass(original: nn.Module, rq_model: nn.Module, adapter: Adapter, layers: list[MoELayer],
                sequences: torch.Tensor, batch_size: int, show_progress: bool = True):
    """Both models on the same batches, one batch at a time: per-layer per-sequence loads ``[n, N]`` of each
    model and the accuracy metrics, accumulated as the batches go — logits live one batch at a time, so
    memory does not grow with the data size or the vocabulary beyond ``n x N`` load counts."""
    accuracy = AccuracyAccumulator(adapter.encoder_decoder)
    loads_o: list[list[torch.Tensor]] = [[] for _ in layers]
    loads_r: list[list[torch.Tensor]] = [[] for _ in layers]
    device = next(original.parameters()).device
    with record_routing(original, adapter, layers) as rec_o, record_routing(rq_model, adapter, layers) as rec_r, \
            progress_bar("original and R&Q", total=sequences.shape[0], enabled=show_progress) as advance:
        for batch in batches(sequences, batch_size):
            batch = batch.to(device)
            mask = torch.ones_like(batch)
            accuracy.add(batch.cpu(), adapter.forward_logits(original, batch, mask).cpu(),
                         adapter.forward_logits(rq_model, batch, mask).cpu())
            for i, layer in enumerate(layers):
                loads_o[i].append(_drain_loads(rec_o[i], batch.shape[0], layer.num_experts))
                loads_r[i].append(_drain_loads(rec_r[i], batch.shape[0], layer.num_experts))
            advance(batch.shape[0])
    return [torch.cat(x) for x in loads_o], [torch.cat(x) for x in loads_r], accuracy.result()


def sequence_loads(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[n, S, K]`` ids -> ``[n, N]`` int64 loads of each sequence (dropped assignments excluded)."""
    n = ids.shape[0]
    flat = ids.reshape(n, -1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_experts)
    keys = torch.arange(n).unsqueeze(1) * num_experts + flat.clamp(0, num_experts - 1)
    return torch.bincount(keys[valid], minlength=n * num_experts).reshape(n, num_experts)


def group_calls(loads: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[n, N]`` per-sequence loads -> ``[ceil(n/B), N]`` loads of each call of ``B`` consecutive sequences."""
    n, units = loads.shape
    calls = -(-n // batch_size)
    padded = torch.zeros(calls * batch_size, units, dtype=loads.dtype)
    padded[:n] = loads
    return padded.reshape(calls, batch_size, units).sum(1)


def batch_lis(before_ids: torch.Tensor, after_ids: torch.Tensor, num_experts: int, logcnt: torch.Tensor,
              batch_size: int) -> LISPoint:
    """Pure: LIS of one layer when sequences run ``batch_size`` at a time. ids: ``[n, S, K]``."""
    return batch_lis_from_loads(sequence_loads(before_ids, num_experts), sequence_loads(after_ids, num_experts),
                                logcnt, batch_size)


def batch_lis_from_loads(before: torch.Tensor, after: torch.Tensor, logcnt: torch.Tensor, batch_size: int) -> LISPoint:
    """Pure: :func:`batch_lis` from per-sequence loads ``[n, N]``.

    In batch mode offsets are 0, so a call's copy loads follow from its per-expert loads
    (:func:`rq.core.replica.split_load`), exactly as the replica rule assigns them."""
    pre = group_calls(before, batch_size)
    post = split_load(group_calls(after, batch_size), logcnt)
    return LISPoint(lis_value(pre.sum(0)), lis_value(post.sum(0)), InstantSummary.of(pre), InstantSummary.of(post))


# ---------------------------------------------------------------------------------------------------
# streaming

@torch.no_grad()
def streamed_paired_pass(pair: StreamedPair, layers: list[MoELayer], sequences: torch.Tensor, batch_size: int):
    """:func:`paired_pass` with both models streamed: the batches of both go through each decoder layer while it
    is loaded (the original's batch ``b``, then the R&Q model's), and each batch's logits are added to the
    accuracy sums as soon as both exist. Every layer sees the calls of the resident loop in the same order."""
    original, rq_model = pair.models
    adapter = pair.adapter
    accuracy = AccuracyAccumulator(adapter.encoder_decoder)
    device = pair.original.device
    chunks = list(batches(sequences, batch_size))
    jobs = []
    for batch in chunks:
        batch = batch.to(device)
        jobs += [_logits_job(adapter, original, batch), _logits_job(adapter, rq_model, batch)]
    waiting: dict[int, torch.Tensor] = {}

    def done(index: int, logits: torch.Tensor) -> None:
        if index % 2 == 0:
            waiting[index // 2] = logits.cpu()
        else:
            accuracy.add(chunks[index // 2], waiting.pop(index // 2), logits.cpu())

    with record_routing(original, adapter, layers) as rec_o, record_routing(rq_model, adapter, layers) as rec_r:
        pair.run(jobs, label="original and R&Q", on_done=done)
    sizes = [batch.shape[0] for batch in chunks]
    loads = [[_call_loads(r.calls, sizes, layer.num_experts) for r, layer in zip(recs, layers)]
             for recs in (rec_o, rec_r)]
    return loads[0], loads[1], accuracy.result()


def _logits_job(adapter: Adapter, model: nn.Module, batch: torch.Tensor):
    return lambda: adapter.forward_logits(model, batch, torch.ones_like(batch))


def _call_loads(calls: list[torch.Tensor], sizes: list[int], num_experts: int) -> torch.Tensor:
    """``[n, N]`` per-sequence loads from one layer's calls, one call per batch of ``sizes[b]`` sequences."""
    return torch.cat([sequence_loads(ids.reshape(size, -1, ids.shape[-1]), num_experts)
                      for ids, size in zip(calls, sizes, strict=True)])


@torch.no_grad()
def streaming_lis(original: nn.Module, rq_model: nn.Module, adapter: Adapter, layers: list[MoELayer],
                  prompts: torch.Tensor, steps: int, pair: StreamedPair | None = None) -> list[LISPoint]:
    """Greedy generation of ``prompts [B, p]`` for ``steps`` tokens on both models; per-layer LIS over the
    decode steps (the prefill call is excluded). Encoder layers of encoder-decoder models see no decode
    step and get no streaming LIS. With ``pair`` (streamed models) both generations advance in lockstep,
    one decoder layer loaded at a time: every decode step reads each layer again (and builds its R&Q copies
    again); each generation keeps its own KV cache."""
    device = pair.original.device if pair is not None else next(original.parameters()).device
    prompts = prompts.to(device)
    gen = dict(max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, use_cache=True,
               attention_mask=torch.ones_like(prompts), pad_token_id=original.config.pad_token_id or 0)
    rq_experts = rq_layers_of(rq_model)
    with record_routing(original, adapter, layers) as recorders:
        set_mode(rq_model, "streaming", record=True)
        try:
            if pair is None:
                original.generate(prompts, **gen)
                rq_model.generate(prompts, **gen)
            else:
                pair.run([lambda: original.generate(prompts, **gen), lambda: rq_model.generate(prompts, **gen)],
                         label="streaming decode", passes=steps + 1)
            histories = [list(layer.history) for layer in rq_experts]
        finally:
            set_mode(rq_model, "batch")
    points = []
    for layer, recorder, rq_layer, history in zip(layers, recorders, rq_experts, histories):
        pre = [expert_counts(ids, layer.num_experts) for ids in recorder.calls[1:]]
        post = history[1:]
        if not pre or not post:
            empty = InstantSummary.of(torch.zeros(0, 1))
            points.append(LISPoint(math.nan, math.nan, empty, empty))
            continue
        pre_t, post_t = torch.stack(pre), torch.stack(post)
        points.append(LISPoint(lis_value(pre_t.sum(0)), lis_value(post_t.sum(0)),
                               InstantSummary.of(pre_t), InstantSummary.of(post_t)))
    return points


# ---------------------------------------------------------------------------------------------------
# accuracy (docs/spec.md §9)

class AccuracyAccumulator:
    """Perplexity of both models, next-token top-1 agreement and mean KL(original || R&Q), in float64 sums that
    batches are added to one at a time (nothing is kept of a batch's logits)."""

    def __init__(self, encoder_decoder: bool):
        self.encoder_decoder = encoder_decoder
        self.nll_o = self.nll_r = self.kl = self.agree = 0.0
        self.count = 0

    def add(self, batch: torch.Tensor, lo: torch.Tensor, lr: torch.Tensor) -> None:
        """``batch [B, S]`` tokens and both models' logits ``[B, S, V]`` for it."""
        if self.encoder_decoder:  # teacher-forced decoder: position t predicts token t
            targets = batch
        else:
            lo, lr, targets = lo[:, :-1], lr[:, :-1], batch[:, 1:]
        log_po = torch.log_softmax(lo.double(), -1)
        log_pr = torch.log_softmax(lr.double(), -1)
        self.nll_o += -log_po.gather(-1, targets.unsqueeze(-1)).sum().item()
        self.nll_r += -log_pr.gather(-1, targets.unsqueeze(-1)).sum().item()
        self.kl += (log_po.exp() * (log_po - log_pr)).sum().item()
        self.agree += (lo.argmax(-1) == lr.argmax(-1)).sum().item()
        self.count += targets.numel()

    def result(self) -> Accuracy:
        c = self.count
        return Accuracy(math.exp(self.nll_o / c), math.exp(self.nll_r / c), self.agree / c, self.kl / c, c)


def accuracy(adapter: Adapter, sequences: torch.Tensor, logits_original: list[torch.Tensor],
             logits_rq: list[torch.Tensor], batch_size: int) -> Accuracy:
    """:class:`AccuracyAccumulator` over logits computed elsewhere, one list entry per batch."""
    acc = AccuracyAccumulator(adapter.encoder_decoder)
    for batch, lo, lr in zip(batches(sequences, batch_size), logits_original, logits_rq):
        acc.add(batch, lo, lr)
    return acc.result()


# ---------------------------------------------------------------------------------------------------

def evaluate(original: nn.Module | StreamedPair, rq_model: nn.Module | None, adapter: Adapter,
             sequences: torch.Tensor, *, batch_sizes: list[int], run_batch: int = 8, stream_batch: int = 16,
             stream_steps: int = 32, prompt_len: int = 16, show_progress: bool = True) -> EvalReport:
    """Full comparison of ``original`` and ``rq_model`` (the same checkpoint with a plan applied), or of the
    two models of a :class:`~rq.eval.streamed.StreamedPair` (pass ``rq_model=None``): the same numbers,
    one decoder layer in memory at a time."""
    pair = original if isinstance(original, StreamedPair) else None
    if pair is not None:
        original, rq_model = pair.models
    layers = adapter.moe_layers(original)
    if pair is None:
        assert len(rq_layers_of(rq_model)) == len(layers), "the R&Q model must be the checkpoint with a plan applied"
        set_mode(rq_model, "batch")
        before, after, acc = paired_pass(original, rq_model, adapter, layers, sequences, run_batch, show_progress)
    else:
        before, after, acc = streamed_paired_pass(pair, layers, sequences, run_batch)
    rq_experts: list[RQExperts] = rq_layers_of(rq_model)
    batch = {b: [batch_lis_from_loads(bi, ai, rq.logcnt, b) for bi, ai, rq in zip(before, after, rq_experts)]
             for b in batch_sizes}
    streaming = None
    if stream_steps > 0:
        prompts = sequences[:stream_batch, :prompt_len]
        streaming = streaming_lis(original, rq_model, adapter, layers, prompts, stream_steps, pair)
    bytes_before = sum(sum(w.numel() * w.element_size() for w in adapter.get_expert_weights(layer, e))
                       for layer in layers for e in range(layer.num_experts))
    bytes_after = sum(rq.weight_nbytes() for rq in rq_experts)
    return EvalReport([layer.path for layer in layers], batch, streaming, min(stream_batch, sequences.shape[0]),
                      stream_steps, acc, bytes_before, bytes_after)
