"""Reference outputs of the PyTorch R&Q model (:mod:`rq.rqmodel.model`), saved in Polygraphy's formats.

Written at export time into ``build/parity/`` so that ``rq check build/`` needs neither PyTorch nor the
checkpoint; the same files work with the Polygraphy CLI, e.g.
``polygraphy run build/model.onnx --onnxrt --load-inputs build/parity/decoder_inputs.json
--load-outputs build/parity/decoder_reference.json --atol 1e-4 --rtol 1e-3``.

Two sets, from a seeded generator and never the tracing sample:
- **prefill** (batch mode, offsets 0): a few feeds per graph of different batch/sequence sizes, one with
  padding; every graph output is recorded (logits, present keys/values, ``expert_counts.{l}``).
- **streaming**: ``B`` prompts (one left-padded), prefill plus :data:`DECODE_STEPS` greedy decode steps
  of the R&Q model in streaming mode (docs/spec.md §4 offsets rotating per call); per step the logits and each
  called layer's ``expert_counts``. The chosen tokens are saved so the ONNX Runtime generator can be
  teacher-forced along the same sequence.

With each call's ``expert_counts`` the reference also records its router's **near-ties** per layer
(:func:`near_tie_swaps`: assignments another runtime may route the other way within the dtype's tolerance,
docs/spec.md §9), in the manifest's parity entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from rq.export.runtime import position_ids_from_mask
from rq.rqmodel.model import RQExperts, set_backend, set_mode

PREFILL_SHAPES = ((2, 7), (1, 5), (3, 4))  # (batch, seq) of the prefill feeds
DECODE_BATCH, DECODE_PROMPT, DECODE_STEPS = 2, 6, 16
RUNNER = "pytorch-rq"
STREAM_RUNNER = "pytorch-rq-streaming"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _cache_arrays(cache) -> list[np.ndarray]:
    cache = getattr(cache, "self_attention_cache", cache)
    arrays = []
    for layer in cache.layers:
        arrays.extend([_np(layer.keys), _np(layer.values)])
    return arrays


def _counts(layers: list[RQExperts], which: list[int]) -> dict[str, np.ndarray]:
    return {f"expert_counts.{l}": _np(layers[l].last_counts) for l in which}


def near_tie_swaps(logits: torch.Tensor, ids: torch.Tensor, atol: float, rtol: float) -> int:
    """How many of a call's assignments a runtime computing within tolerance may route differently: per token
    (``logits [T, N]`` router scores, ``ids [T, K]`` chosen experts, outside ``[0, N)`` dropped), the selected
    experts that an unselected one comes within ``atol + rtol * |score|`` of, and the unselected ones within
    that of a selected one; the smaller count is how many swaps the token allows. Routers that choose by
    another score than these (a bias, groups) get no allowance where their choice is not near-tied here."""
    logits = logits.to(torch.float32)
    n = logits.shape[-1]
    valid = (ids >= 0) & (ids < n)
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    chosen = torch.zeros_like(logits, dtype=torch.bool)
    chosen[rows[valid], ids[valid].long()] = True  # (a scatter of the clamped ids would let a dropped slot win)
    tolerance = atol + rtol * logits.abs()
    low = torch.where(chosen, logits - tolerance, torch.inf).amin(-1, keepdim=True)  # weakest chosen, tolerant
    high = torch.where(chosen, -torch.inf, logits + tolerance).amax(-1, keepdim=True)  # strongest other, tolerant
    could_leave = chosen & (logits - tolerance <= high)
    could_enter = ~chosen & (logits + tolerance >= low)
    return int(torch.minimum(could_leave.sum(-1), could_enter.sum(-1)).sum())  # a token that chose all: 0


class NearTieRecorder:
    """Forward pre-hooks on the R&Q layers that keep, per layer, :func:`near_tie_swaps` of its latest call."""

    def __init__(self, layers: list[RQExperts], router_weight: Callable[[int], torch.Tensor | None], dtype: str):
        from rq.export.parity import TOLERANCES

        self.atol, self.rtol = TOLERANCES[dtype]
        self.router_weight = router_weight
        self.last: dict[int, int] = {}
        self.handles = [layer.register_forward_pre_hook(self._hook(l), with_kwargs=True)
                        for l, layer in enumerate(layers)]

    def _hook(self, index: int):
        def record(module, args, kwargs) -> None:
            hidden, ids = (list(args) + list(kwargs.values()))[:2]  # RQExperts.forward(hidden, ids, weights)
            weight = self.router_weight(index)
            if weight is None or weight.is_meta:  # a router weight derived from several tensors: exact counts
                self.last[index] = 0
                return
            scores = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().T
            self.last[index] = near_tie_swaps(scores, ids.reshape(scores.shape[0], -1), self.atol, self.rtol)
        return record

    def of(self, which: list[int]) -> dict[str, int]:
        return {f"expert_counts.{l}": self.last.get(l, 0) for l in which}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class ReferenceRunner:
    """Runs the plain R&Q model (no export wrappers) on the feeds the ONNX graphs get."""

    def __init__(self, model: nn.Module, rq_layers: list[RQExperts], manifest: dict, seed: int = 0,
                 router_weight: Callable[[int], torch.Tensor | None] | None = None):
        self.model, self.layers, self.manifest = model, rq_layers, manifest
        self.ties = None if router_weight is None else NearTieRecorder(rq_layers, router_weight, manifest["dtype"])
        self.near_ties: dict = {"prefill": {}, "streaming": []}  # per graph / step: {output name: swaps}
        self.rng = np.random.default_rng(seed)
        self.dtype = {"float32": np.float32, "float16": np.float16}[manifest["dtype"]]
        self.vocab = manifest["vocab_size"]
        self.pad = manifest["generation"].get("pad_token_id") or 0

    def _record_ties(self, where: list, which: list[int]) -> None:
        if self.ties is not None:
            where.append(self.ties.of(which))

    def _tokens(self, batch: int, seq: int) -> np.ndarray:
        return self.rng.integers(2, self.vocab, size=(batch, seq), dtype=np.int64)

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        kv = self.manifest["kv_cache"]
        feed = {}
        for i, layer in enumerate(kv["layers"]):
            feed[f"past_key_values.{i}.key"] = np.zeros((batch, layer["key_heads"], 0, layer["key_dim"]), self.dtype)
            feed[f"past_key_values.{i}.value"] = np.zeros((batch, layer["value_heads"], 0, layer["value_dim"]),
                                                          self.dtype)
        return feed

    def _offsets(self, graph: str) -> dict[str, np.ndarray]:
        layers = self.manifest["graphs"][graph]["moe_layers"]
        sizes = {m["index"]: m["num_experts"] for m in self.manifest["moe_layers"]}
        return {f"rq_offsets.{l}": np.zeros(sizes[l], np.int64) for l in layers}

    # --- prefill (batch mode) -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self) -> dict[str, tuple[list[dict], list[dict]]]:
        """``{graph: (feeds, reference outputs)}`` for every graph of the export."""
        set_mode(self.model, "batch")
        if self.manifest["encoder_decoder"]:
            return self._prefill_seq2seq()
        feeds, outs = [], []
        layers = self.manifest["graphs"]["decoder"]["moe_layers"]
        for n, (batch, seq) in enumerate(PREFILL_SHAPES):
            ids, mask = self._tokens(batch, seq), np.ones((batch, seq), np.int64)
            if n == 0:  # one left-padded row
                ids[0, :2], mask[0, :2] = self.pad, 0
            pos = position_ids_from_mask(mask)
            feeds.append({"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                          **self._empty_past(batch), **self._offsets("decoder")})
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             position_ids=torch.from_numpy(pos), use_cache=True)
            names = self.manifest["kv_cache"]["present_names"]
            outs.append({"logits": _np(out.logits), **dict(zip(names, _cache_arrays(out.cache))),
                         **_counts(self.layers, layers)})
            self._record_ties(self.near_ties["prefill"].setdefault("decoder", []), layers)
        return {"decoder": (feeds, outs)}

    def _encode(self, ids: np.ndarray, mask: np.ndarray):
        return self.model.get_encoder()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

    def _prefill_seq2seq(self) -> dict[str, tuple[list[dict], list[dict]]]:
        from transformers import DynamicCache, EncoderDecoderCache

        enc_layers = self.manifest["graphs"]["encoder"]["moe_layers"]
        dec_layers = self.manifest["graphs"]["decoder"]["moe_layers"]
        enc_feeds, enc_outs, dec_feeds, dec_outs = [], [], [], []
        for n, (batch, seq) in enumerate(PREFILL_SHAPES):
            ids, mask = self._tokens(batch, seq), np.ones((batch, seq), np.int64)
            if n == 0:  # one right-padded row, as seq2seq tokenizers pad
                ids[0, -2:], mask[0, -2:] = self.pad, 0
            encoded = self._encode(ids, mask)
            enc_feeds.append({"input_ids": ids, "attention_mask": mask, **self._offsets("encoder")})
            enc_outs.append({"encoder_hidden_states": _np(encoded.last_hidden_state),
                             **_counts(self.layers, enc_layers)})
            self._record_ties(self.near_ties["prefill"].setdefault("encoder", []), enc_layers)
            target = self._tokens(batch, seq - 1)
            dec_ids = np.concatenate(
                [np.full((batch, 1), self.manifest["generation"]["decoder_start_token_id"], np.int64), target], 1)
            dec_feeds.append({"decoder_input_ids": dec_ids, "encoder_hidden_states": _np(encoded.last_hidden_state),
                              "encoder_attention_mask": mask, **self._empty_past(batch), **self._offsets("decoder")})
            out = self.model(encoder_outputs=encoded, attention_mask=torch.from_numpy(mask),
                             decoder_input_ids=torch.from_numpy(dec_ids),
                             cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), use_cache=True)
            names = self.manifest["kv_cache"]["present_names"]
            dec_outs.append({"logits": _np(out.logits), **dict(zip(names, _cache_arrays(out.cache))),
                             **_counts(self.layers, dec_layers)})
            self._record_ties(self.near_ties["prefill"].setdefault("decoder", []), dec_layers)
        return {"encoder": (enc_feeds, enc_outs), "decoder": (dec_feeds, dec_outs)}

    # --- streaming decode -----------------------------------------------------------------------------
    @torch.no_grad()
    def streaming(self, steps: int = DECODE_STEPS) -> tuple[dict[str, np.ndarray], list[dict]]:
        """``(inputs, per-step outputs)``: inputs hold ``input_ids``, ``attention_mask`` and ``forced_tokens``
        ``[B, steps]``; outputs are the prefill then one dict per decode step (logits + loads)."""
        from transformers import DynamicCache, EncoderDecoderCache

        set_mode(self.model, "streaming")
        try:
            ids, mask = self._tokens(DECODE_BATCH, DECODE_PROMPT), np.ones((DECODE_BATCH, DECODE_PROMPT), np.int64)
            dec_layers = self.manifest["graphs"]["decoder"]["moe_layers"]
            if self.manifest["encoder_decoder"]:
                ids[1, -2:], mask[1, -2:] = self.pad, 0
                encoded = self._encode(ids, mask)
                start = self.manifest["generation"]["decoder_start_token_id"]

                def call(tokens, cache):
                    return self.model(encoder_outputs=encoded, attention_mask=torch.from_numpy(mask),
                                      decoder_input_ids=torch.from_numpy(tokens), cache=cache, use_cache=True)

                out = call(np.full((DECODE_BATCH, 1), start, np.int64), EncoderDecoderCache(DynamicCache(),
                                                                                          DynamicCache()))
                first_layers = list(range(len(self.layers)))
            else:
                ids[1, :2], mask[1, :2] = self.pad, 0
                pos = position_ids_from_mask(mask)
                state = {"mask": mask, "pos": pos}

                def call(tokens, cache):
                    if cache is not None:
                        state["mask"] = np.concatenate([state["mask"], np.ones((DECODE_BATCH, 1), np.int64)], 1)
                        state["pos"] = state["pos"][:, -1:] + 1
                    return self.model(input_ids=torch.from_numpy(tokens),
                                      attention_mask=torch.from_numpy(state["mask"]),
                                      position_ids=torch.from_numpy(state["pos"]), cache=cache, use_cache=True)

                out = call(ids, None)
                first_layers = dec_layers
            results = [{"logits": _np(out.logits), **_counts(self.layers, first_layers)}]
            self._record_ties(self.near_ties["streaming"], first_layers)
            forced = []
            for _ in range(steps):
                token = out.logits[:, -1, :].argmax(-1).to(torch.int64)
                forced.append(_np(token))
                out = call(_np(token)[:, None], out.cache)
                results.append({"logits": _np(out.logits), **_counts(self.layers, dec_layers)})
                self._record_ties(self.near_ties["streaming"], dec_layers)
        finally:
            set_mode(self.model, "batch")
        inputs = {"input_ids": ids, "attention_mask": mask, "forced_tokens": np.stack(forced, axis=1)}
        return inputs, results


def save_run_results(path: Path, runner: str, outputs: list[dict[str, np.ndarray]]) -> None:
    """Polygraphy ``RunResults`` JSON with one iteration per dict (``--load-outputs`` format)."""
    from polygraphy.comparator import IterationResult, RunResults

    from rq.export.parity import polygraphy_quiet

    results = RunResults()
    results.append((runner, [IterationResult(outputs=o, runtime=0.0, runner_name=runner) for o in outputs]))
    with polygraphy_quiet():
        results.save(str(path))


def save_inputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Polygraphy data-loader JSON (``--load-inputs`` format): a list of feed dicts."""
    from polygraphy.json import save_json

    from rq.export.parity import polygraphy_quiet

    with polygraphy_quiet():
        save_json(feeds, str(path))


def write_parity_data(model: nn.Module, rq_layers: list[RQExperts], manifest: dict, parity_dir: Path,
                      seed: int = 0, router_weight: Callable[[int], torch.Tensor | None] | None = None) -> dict:
    """Run the reference and write ``parity_dir``; returns the manifest's ``parity`` entry (relative paths, and
    the near-ties of every call where ``router_weight(l)`` gives MoE layer ``l``'s router weight ``[N, H]``)."""
    parity_dir.mkdir(parents=True, exist_ok=True)
    set_backend(model, "reference")  # the op's definition (docs/spec.md §8), not a fast path
    runner = ReferenceRunner(model, rq_layers, manifest, seed, router_weight)
    try:
        entry = _write_reference(runner, parity_dir, seed)
    finally:
        if runner.ties is not None:
            runner.ties.close()
    if runner.ties is not None:
        entry["near_ties"] = runner.near_ties
    return entry


def _write_reference(runner: ReferenceRunner, parity_dir: Path, seed: int) -> dict:
    entry = {"seed": seed, "prefill": {}, "streaming": {}}
    for graph, (feeds, outputs) in runner.prefill().items():
        save_inputs(parity_dir / f"{graph}_inputs.json", feeds)
        save_run_results(parity_dir / f"{graph}_reference.json", RUNNER, outputs)
        entry["prefill"][graph] = {"inputs": f"parity/{graph}_inputs.json",
                                   "reference": f"parity/{graph}_reference.json", "runner": RUNNER,
                                   "feeds": len(feeds)}
    inputs, outputs = runner.streaming()
    save_inputs(parity_dir / "streaming_inputs.json", [inputs])
    save_run_results(parity_dir / "streaming_reference.json", STREAM_RUNNER, outputs)
    entry["streaming"] = {"inputs": "parity/streaming_inputs.json", "reference": "parity/streaming_reference.json",
                          "runner": STREAM_RUNNER, "batch": DECODE_BATCH, "prompt": DECODE_PROMPT,
                          "steps": DECODE_STEPS}
    return entry
