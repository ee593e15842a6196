"""Run an rq export with ONNX Runtime: greedy token-by-token generation over the KV-cache graph.

Dependency-light on purpose (numpy, onnxruntime, and tokenizers only for text), so a Triton Python backend
can import it, or copy this one file next to ``model.py``. Everything it needs is in ``build/manifest.json``.
By default it runs the export's fused route (``model.ort.onnx``: ONNX Runtime's own MoE kernels);
``flavour="portable"`` runs ``model.onnx`` (the ``rq::RQMoE`` function body) and ``flavour="genai"`` runs
``model.genai.onnx``, the graph onnxruntime-genai runs, feeding it what onnxruntime-genai feeds (no offsets, no
positions: the graph derives them, so this reproduces onnxruntime-genai's calls exactly).

Replica offsets follow docs/spec.md §4: in streaming mode (default) each MoE layer's ``rq_offsets.{l}`` input starts
at zero and advances by that layer's ``expert_counts.{l}`` output after every call (prefill and each decode
step), so replicas rotate across steps; ``streaming=False`` keeps them at zero (batch mode).
Offsets persist across :meth:`OrtGenerator.generate` calls, like a long-running server; :meth:`reset` zeroes.
The ``genai`` flavour uses the graph's own rule instead: every offset is the call's ``past_seq``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:
    from rq.errors import RQError
except ImportError:  # copied without the rq package (e.g. into a Triton model repository)
    class RQError(Exception):
        """An error caused by the user's input, with the fix in the message."""

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "rq-onnx-export"
MANIFEST_VERSION = 1
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def load_manifest(build_dir: str | Path) -> dict:
    """Read and check ``build_dir/manifest.json``; one-line :class:`RQError` when it is not an rq export."""
    path = Path(build_dir) / MANIFEST
    if not path.is_file():
        raise RQError(f"{build_dir} is not an rq export (no {MANIFEST}); create one with `rq-export MODEL_DIR "
                      f"--plan plan.json --out {build_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RQError(f"{path} is not valid JSON ({err}); re-run rq-export") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise RQError(f"{path} is not a version-{MANIFEST_VERSION} {MANIFEST_FORMAT} manifest; re-run this rq's "
                      f"rq-export")
    return manifest


FLAVOURS = ("onnxruntime", "portable", "genai")


def graph_file(graph: dict, flavour: str = "onnxruntime", genai: dict | None = None) -> str:
    """The file of one exported graph that ONNX Runtime runs: its fused route (``model.ort.onnx``) when the
    export has one and ``flavour`` is ``"onnxruntime"``, onnxruntime-genai's graph (``genai``: the manifest's
    ``genai`` entry) for ``"genai"``, else the portable ``model.onnx``."""
    if flavour == "genai":
        if not genai or "file" not in genai:
            raise RQError("this export has no onnxruntime-genai graph (encoder-decoder models have none, and exports "
                          "made by an older rq-export neither); re-run rq-export, or use flavour='onnxruntime'")
        return genai["file"]
    return graph.get("ort_file", graph["file"]) if flavour == "onnxruntime" else graph["file"]


def open_session(path: str | Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    """An ONNX Runtime session, with what its creation freed handed back to the operating system.

    Creating a fused-route session folds the kernels' weight layouts (export/ort_fused.py), and the folding's
    freed intermediates are mostly smaller than the mmap threshold glibc has raised by then, so glibc keeps them
    in its heap, resident: 380 MiB on the mid-size model (benchmarks/RESULTS.md), more than the session's INT4
    experts. ``malloc_trim`` returns them (glibc only; elsewhere nothing happens). Here and not in
    ``rq.memory`` because this file runs alone in Triton's Python backend."""
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        trim = None
    if trim is not None:
        trim(0)
    return session


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Positions of left-padded rows, as Hugging Face ``generate`` makes them: ``cumsum(mask) - 1``, pads 1."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


def empty_past(kv_cache: dict, batch: int, dtype, length: int = 0) -> list[np.ndarray]:
    """Zero KV caches of ``length`` positions, in the order of the manifest's ``past_names`` (key, value per
    layer); ``length=0``: the empty cache a prefill starts from."""
    past = []
    for layer in kv_cache["layers"]:
        past.append(np.zeros((batch, layer["key_heads"], length, layer["key_dim"]), dtype))
        past.append(np.zeros((batch, layer["value_heads"], length, layer["value_dim"]), dtype))
    return past


def last_logits(logits: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """``[B, V]`` logits of each row's last real token: the last column, or with ``attention_mask`` (a
    right-padded prompt, as onnxruntime-genai's tokenizer pads batches) the last column whose mask is 1."""
    if attention_mask is None:
        return logits[:, -1, :]
    mask = np.asarray(attention_mask)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] != 0, axis=1)
    return logits[np.arange(logits.shape[0]), last, :]


@dataclass
class StepOutput:
    """One call of the model: ``logits [B, S, V]`` (S = prompt length at prefill, 1 after) and the loads."""

    logits: np.ndarray
    expert_counts: dict[int, np.ndarray]  # MoE layer index -> int64 [N] loads of this call
    offsets: dict[int, np.ndarray]  # the replica offsets this call used

    def counts_by_name(self) -> dict[str, np.ndarray]:
        return {f"expert_counts.{layer}": counts for layer, counts in self.expert_counts.items()}


@dataclass
class Generation:
    tokens: np.ndarray  # [B, new] int64 generated tokens (pad after a row's EOS)
    steps: list[StepOutput] = field(default_factory=list)  # prefill, then one per decode step


class OrtGenerator:
    """Greedy decoding of an rq export with ONNX Runtime.

    ``prefill(input_ids [B, S], attention_mask [B, S] | None)`` then ``step(tokens [B])`` repeatedly; or
    ``generate(...)`` for both; ``generate_text(prompts)`` with the exported tokenizer. Every call returns
    a :class:`StepOutput` with that call's per-layer ``expert_counts`` (load telemetry).
    Left and right padding are supported (positions as Hugging Face ``generate`` computes them, from the mask).
    """

    def __init__(self, build_dir: str | Path, *, streaming: bool = True, providers: list | None = None,
                 session_options: ort.SessionOptions | None = None, intra_op_num_threads: int | None = None,
                 flavour: str = "onnxruntime"):
        self.build_dir = Path(build_dir)
        self.manifest = load_manifest(self.build_dir)
        self.streaming = streaming
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be 'onnxruntime' (the fused route), 'portable' or 'genai', got {flavour!r}")
        self.flavour = flavour
        self.encoder_decoder = bool(self.manifest["encoder_decoder"])
        options = session_options or ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        providers = providers or ["CPUExecutionProvider"]
        self.files = {name: graph_file(graph, flavour, self.manifest.get("genai"))
                      for name, graph in self.manifest["graphs"].items()}
        self.sessions = {name: open_session(self.build_dir / file, options, providers)
                         for name, file in self.files.items()}
        self.dtype = NP_DTYPES[self.manifest["dtype"]]
        self.kv = self.manifest["kv_cache"]
        self.moe_layers = {layer["index"]: layer for layer in self.manifest["moe_layers"]}
        self._tokenizer = None
        self.reset()

    # --- state --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero every replica offset and forget the current sequences."""
        self.offsets = {l: np.zeros(layer["num_experts"], dtype=np.int64) for l, layer in self.moe_layers.items()}
        self._past: list[np.ndarray] = []
        self._mask = self._positions = self._encoder_hidden = self._encoder_mask = None

    def _run(self, graph: str, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray],
                                                                     dict[int, np.ndarray]]:
        spec = self.manifest["graphs"][graph]
        if self.flavour == "genai":  # the graph's rule (docs/spec.md §4): every offset is past_seq
            feed.pop("position_ids")
            past = feed["attention_mask"].shape[1] - feed["input_ids"].shape[1]
            used = {l: np.full_like(self.offsets[l], past) for l in spec["moe_layers"]}
        else:
            used = {l: self.offsets[l].copy() for l in spec["moe_layers"]}
            for l in spec["moe_layers"]:
                feed[f"rq_offsets.{l}"] = used[l]
        names = [o["name"] for o in spec["outputs"]]
        outputs = dict(zip(names, self.sessions[graph].run(names, feed)))
        counts = {l: outputs[f"expert_counts.{l}"] for l in spec["moe_layers"]}
        if self.streaming and self.flavour != "genai":  # docs/spec.md §4: o_e += load_e after each call
            for l, c in counts.items():
                self.offsets[l] = self.offsets[l] + c
        return outputs, counts, used

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return empty_past(self.kv, batch, self.dtype)

    def _decoder_call(self, tokens: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray]]:
        feed = dict(zip(self.kv["past_names"], self._past))
        if self.encoder_decoder:
            feed.update(decoder_input_ids=tokens, encoder_hidden_states=self._encoder_hidden,
                        encoder_attention_mask=self._encoder_mask)
        else:
            feed.update(input_ids=tokens, attention_mask=self._mask, position_ids=self._positions)
        outputs, counts, used = self._run("decoder", feed)
        self._past = [outputs[name] for name in self.kv["present_names"]]
        return outputs["logits"], counts, used

    # --- calls ----------------------------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> StepOutput:
        """Start ``B`` sequences from their (left-padded) prompts; returns the prompt's logits and loads.
        For encoder-decoder models this runs the encoder and the first decoder step (start token)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {input_ids.shape}")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, got {mask.shape}")
        batch = input_ids.shape[0]
        self._past = self._empty_past(batch)
        if self.encoder_decoder:
            outputs, enc_counts, enc_used = self._run("encoder", {"input_ids": input_ids, "attention_mask": mask})
            self._encoder_hidden, self._encoder_mask = outputs["encoder_hidden_states"], mask
            start = np.full((batch, 1), self.manifest["generation"]["decoder_start_token_id"], dtype=np.int64)
            logits, counts, used = self._decoder_call(start)
            return StepOutput(logits, {**enc_counts, **counts}, {**enc_used, **used})
        self._mask = mask
        self._positions = position_ids_from_mask(mask)
        logits, counts, used = self._decoder_call(input_ids)
        return StepOutput(logits, counts, used)

    def step(self, tokens: np.ndarray) -> StepOutput:
        """Feed one token per sequence (``[B]``); returns logits ``[B, 1, V]`` and this step's loads."""
        if not self._past:
            raise RuntimeError("call prefill() before step()")
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if not self.encoder_decoder:
            self._positions = self._mask.sum(axis=1, keepdims=True)  # the real tokens so far: any padding side
            self._mask = np.concatenate([self._mask, np.ones((tokens.shape[0], 1), np.int64)], axis=1)
        logits, counts, used = self._decoder_call(tokens)
        return StepOutput(logits, counts, used)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
                 max_new_tokens: int = 16, eos_token_id: int | None = None,
                 forced_tokens: np.ndarray | None = None) -> Generation:
        """Greedy generation. ``forced_tokens [B, n]`` feeds given tokens instead of the argmax (teacher
        forcing, used by the parity check); a row stops at ``eos_token_id`` and is fed pad tokens after."""
        if eos_token_id is None:
            eos_token_id = self.manifest["generation"].get("eos_token_id")
        pad = self.manifest["generation"].get("pad_token_id") or 0
        out = self.prefill(input_ids, attention_mask)
        steps, chosen = [out], []
        done = np.zeros(out.logits.shape[0], dtype=bool)
        n = max_new_tokens if forced_tokens is None else forced_tokens.shape[1]
        for i in range(n):
            nxt = last_logits(out.logits, attention_mask if i == 0 and not self.encoder_decoder else None)
            nxt = nxt.argmax(-1).astype(np.int64)
            if forced_tokens is not None:
                nxt = np.asarray(forced_tokens[:, i], dtype=np.int64)
            nxt = np.where(done, pad, nxt)
            chosen.append(nxt)
            if eos_token_id is not None and forced_tokens is None:
                done |= nxt == eos_token_id
            if forced_tokens is None and (i == n - 1 or done.all()):
                break  # the last chosen token needs no forward pass
            out = self.step(nxt)  # teacher forcing also runs the last token: its logits are compared
            steps.append(out)
        tokens = np.stack(chosen, axis=1) if chosen else np.zeros((out.logits.shape[0], 0), np.int64)
        return Generation(tokens, steps)

    # --- text -----------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The exported ``tokenizers.Tokenizer`` (from ``build/tokenizer.json``)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.build_dir / self.manifest["tokenizer"]["dir"] / "tokenizer.json"
            if not path.is_file():
                raise RQError(f"{path} is missing; re-run rq-export with a model that has a fast tokenizer")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def generate_text(self, prompts: str | list[str], max_new_tokens: int = 16) -> list[str]:
        """Tokenize, left-pad, generate greedily and decode the new tokens of each prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self.tokenizer.encode(p).ids for p in prompts]
        width = max(1, max(len(e) for e in encoded))
        pad = self.manifest["generation"].get("pad_token_id") or 0
        ids = np.full((len(encoded), width), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encoded):
            if e:
                ids[row, width - len(e):], mask[row, width - len(e):] = e, 1
        mask[:, -1] = 1  # an empty prompt still needs one visible position
        result = self.generate(ids, mask, max_new_tokens=max_new_tokens)
        eos = self.manifest["generation"].get("eos_token_id")
        texts = []
        for row in result.tokens.tolist():
            row = row[:row.index(eos)] if eos in row else row
            texts.append(self.tokenizer.decode(row))
        return texts
