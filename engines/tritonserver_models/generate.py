"""rq ``generate``: streaming greedy text generation of an R&Q export, as a decoupled Triton Python model.

Written into ``<repo>/generate/1/model.py`` by ``rq.engines.tritonserver.write_model_repository`` together with
``rq_runtime.py`` (a copy of ``rq.export.runtime``: the same ``OrtGenerator`` the offline checks use) and
``rq_telemetry.py``. Needs numpy, onnxruntime and tokenizers in the Python backend's environment; rq itself
is not needed on the server.

Per request: tokenize ``text_input`` (or take ``input_ids``) -> prefill -> one decode step per new token
through ONNX Runtime with the KV cache -> one streamed response per token (``token_id``, the UTF-8-safe
``text_output`` delta, and the ``expert_counts [layers, N]`` and replica offsets ``rq_offsets [layers, N]``
of the forward call that produced the token), the last response flagged final. Replica offsets start at
zero for each request and advance by each call's ``expert_counts`` (docs/spec.md §4), so a request's tokens are
exactly those of offline ``OrtGenerator.reset(); generate(...)``, whatever else the server is doing
(``offsets_scope: request``); ``offsets_scope: instance`` keeps rotating across requests instead, like one
long stream.

Parameters (config.pbtxt, all strings): ``rq_build_dir`` (the export's files, relative to the repository
root), ``providers``, ``intra_op_threads``, ``default_max_tokens``, ``max_tokens_limit``, ``max_context``
(prompt + generated tokens), ``offsets_scope``, ``metrics``, ``lis_window``, ``metrics_flush_every``,
``drift_threshold``. Version N of this model serves the export in version N of ``rq_onnx`` (``{version}`` in
``rq_build_dir``), so a re-plan published as N+1 (``rq replan``) swaps both at once.
"""

import json
import sys
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rq_runtime import OrtGenerator  # noqa: E402  (copied next to this file)
from rq_telemetry import LoadTelemetry, model_parameter, runtime_settings  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class RequestError(ValueError):
    """A malformed request: answered with a Triton error response, the model keeps serving."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        build, threads, providers = runtime_settings(args, config)
        self.gen = OrtGenerator(build, streaming=True, providers=providers,
                                intra_op_num_threads=threads if threads > 0 else None)
        self.tokenizer = self.gen.tokenizer
        manifest = self.gen.manifest
        self.vocab_size = int(manifest["vocab_size"])
        self.eos = manifest["generation"].get("eos_token_id")
        self.default_max_tokens = int(model_parameter(config, "default_max_tokens", "16"))
        self.max_tokens_limit = int(model_parameter(config, "max_tokens_limit", "512"))
        self.max_context = int(model_parameter(config, "max_context", "2048"))
        self.scope = model_parameter(config, "offsets_scope", "request")
        if self.scope not in ("request", "instance"):
            raise ValueError(f"offsets_scope must be 'request' or 'instance', got {self.scope!r}")
        self.layers = [int(layer["index"]) for layer in manifest["moe_layers"]]
        self.width = max(int(layer["num_experts"]) for layer in manifest["moe_layers"])
        self.telemetry = LoadTelemetry.from_config(pb_utils, config, self.model_name, args["model_instance_name"],
                                                   manifest["moe_layers"], version=args["model_version"], build=build)
        pb_utils.Logger.log_info(f"rq generate: version {args['model_version']}, {manifest['architecture']} export from {build}, "
                                 f"{len(self.layers)} MoE layers, providers {providers}, offsets per {self.scope}")

    # --- request parsing ------------------------------------------------------------------------------
    def _prompt(self, request) -> np.ndarray:
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if (text is None) == (ids is None):
            raise RequestError("send exactly one of text_input (BYTES [1]) and input_ids (INT64 [n])")
        if text is not None:
            raw = text.as_numpy().reshape(-1)[0]
            try:
                prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError as err:
                raise RequestError(f"text_input is not valid UTF-8 ({err})") from None
            if not prompt.strip():
                raise RequestError("text_input is empty; send a non-empty prompt")
            tokens = np.asarray(self.tokenizer.encode(prompt).ids, dtype=np.int64)
            if tokens.size == 0:
                raise RequestError("text_input encodes to no tokens; send a non-empty prompt")
        else:
            tokens = ids.as_numpy().astype(np.int64).reshape(-1)
            if tokens.size == 0:
                raise RequestError("input_ids is empty; send at least one token id")
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)]
            if bad.size:
                raise RequestError(f"input_ids holds {bad.size} id(s) outside [0, {self.vocab_size}) "
                                   f"(first: {int(bad[0])}); use this model's tokenizer")
        limit = self.max_context - 1
        if tokens.size > limit:
            raise RequestError(f"prompt has {tokens.size} tokens, more than this deployment's limit of {limit} "
                               f"(max_context {self.max_context} minus one generated token); shorten the prompt")
        return tokens

    def _max_tokens(self, request, prompt_len: int) -> int:
        tensor = pb_utils.get_input_tensor_by_name(request, "max_tokens")
        n = self.default_max_tokens if tensor is None else int(tensor.as_numpy().reshape(-1)[0])
        if not 1 <= n <= self.max_tokens_limit:
            raise RequestError(f"max_tokens must be in [1, {self.max_tokens_limit}], got {n}")
        return min(n, self.max_context - prompt_len)

    @staticmethod
    def _flag(request, name: str) -> bool:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return bool(tensor.as_numpy().reshape(-1)[0]) if tensor is not None else False

    # --- generation -----------------------------------------------------------------------------------
    def _matrix(self, per_layer: dict) -> np.ndarray:
        """``{layer: [N]}`` -> ``[moe_layers, max N]`` int64 (-1 where a layer has fewer experts)."""
        out = np.full((len(self.layers), self.width), -1, dtype=np.int64)
        for row, layer in enumerate(self.layers):
            values = per_layer.get(layer)
            if values is not None:
                out[row, :values.size] = np.asarray(values).reshape(-1)
        return out

    def _generate(self, request, sender) -> None:
        prompt = self._prompt(request)
        max_tokens = self._max_tokens(request, prompt.size)
        ignore_eos = self._flag(request, "ignore_eos")
        if self.scope == "request":
            self.gen.reset()
        out = self.gen.prefill(prompt[None, :])
        tokens: list[int] = []
        emitted = ""
        cancelled = getattr(sender, "is_cancelled", lambda: False)
        for i in range(max_tokens):
            self.telemetry.record(out.expert_counts, out.offsets)
            nxt = int(out.logits[0, -1, :].argmax(-1))
            tokens.append(nxt)
            last = i == max_tokens - 1 or (not ignore_eos and self.eos is not None and nxt == self.eos)
            text = self.tokenizer.decode(tokens)
            if last or not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
                delta, emitted = text[len(emitted):], text
            else:
                delta = ""
            response = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text_output", np.array([delta.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("token_id", np.array([nxt], dtype=np.int64)),
                pb_utils.Tensor("expert_counts", self._matrix(out.expert_counts)),
                pb_utils.Tensor("rq_offsets", self._matrix(out.offsets)),
            ])
            if last:
                self.telemetry.flush()  # before the final response: a client that then scrapes sees this request
                sender.send(response, flags=FINAL)
                return
            sender.send(response)
            if cancelled():
                self.telemetry.flush()
                sender.send(flags=FINAL)
                return
            out = self.gen.step(np.array([nxt], dtype=np.int64))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(request, sender)
            except RequestError as err:
                self.telemetry.flush()
                rid = request.request_id()
                prefix = f"[request id: {rid}] " if rid else ""
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{prefix}rq generate: {err}")),
                            flags=FINAL)
            except Exception as err:  # noqa: BLE001 - one bad request must not take the model down
                pb_utils.Logger.log_error(f"rq generate: {traceback.format_exc()}")
                self.telemetry.flush()
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"rq generate: internal error {type(err).__name__}: {err}")), flags=FINAL)
            finally:
                self.telemetry.flush()
        return None

    def finalize(self):
        self.telemetry.flush()
