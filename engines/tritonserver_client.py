"""Talking to a running Triton Inference Server that serves an rq model repository (``rq tritonserver``).

What a user of the deployment calls, with ``tritonclient`` (the ``tritonserver`` extra):

- :func:`stream_generate`: one streamed ``generate`` request over gRPC (tokens, text, and per token the MoE
  layers' ``expert_counts`` and the replica offsets that served it);
- :func:`run_load`: many such requests at a given concurrency, checked against expected tokens, with latency
  percentiles and throughput (a load test of a deployment, bounded in count and time);
- :func:`scrape_metrics` / :func:`parse_metrics`: Triton's Prometheus ``/metrics`` as
  ``{(name, labels): value}`` (``prometheus_client``'s parser), e.g. the ``rq_moe_*`` load metrics.

Starting and stopping a local server for tests and benchmarks is :mod:`rq.testing.tritonserver`.
"""

from __future__ import annotations

import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rq.engines.tritonserver import GENERATE


@dataclass
class Streamed:
    """One ``generate`` request's streamed responses."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    expert_counts: list[Any] = field(default_factory=list)  # np.ndarray [moe_layers, num_experts] per token
    offsets: list[Any] = field(default_factory=list)  # replica offsets of the call that produced each token
    error: str | None = None
    latency_s: float = 0.0
    first_token_s: float | None = None
    model_version: str | None = None  # the version that served it (its responses say so)


def _client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as mod
    elif protocol == "http":
        import tritonclient.http as mod
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return mod


def generate_inputs(prompt: str | Sequence[int], max_tokens: int | None = None, ignore_eos: bool = False,
                    protocol: str = "grpc") -> list:
    """``tritonclient`` inputs of one ``generate`` request (``prompt``: text, or token ids)."""
    mod = _client_module(protocol)

    def tensor(name: str, value: np.ndarray, dtype: str):
        t = mod.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    if isinstance(prompt, str):
        inputs = [tensor("text_input", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES")]
    else:
        inputs = [tensor("input_ids", np.asarray(prompt, dtype=np.int64).reshape(-1), "INT64")]
    if max_tokens is not None:
        inputs.append(tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"))
    if ignore_eos:
        inputs.append(tensor("ignore_eos", np.array([True]), "BOOL"))
    return inputs


class _StreamSession:
    """One gRPC client with an open bidirectional stream; requests are answered one after the other."""

    def __init__(self, url: str, model: str = GENERATE, timeout: float = 60.0):
        import tritonclient.grpc as grpcclient

        self.model, self.timeout = model, timeout
        self.client = grpcclient.InferenceServerClient(url)
        self.queue: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.queue.put((result, error, time.perf_counter())))
        self._n = 0

    def request(self, inputs: list, request_id: str | None = None) -> Streamed:
        self._n += 1
        rid = request_id or f"rq-{id(self)}-{self._n}"
        out = Streamed()
        start = time.perf_counter()
        self.client.async_stream_infer(self.model, inputs, request_id=rid, enable_empty_final_response=True)
        while True:
            try:
                result, error, at = self.queue.get(timeout=self.timeout)
            except queue.Empty:
                out.error = f"no response within {self.timeout} s"
                break
            if error is not None:
                out.error = str(error)
                break
            token = result.as_numpy("token_id")
            out.model_version = result.get_response().model_version or out.model_version
            if token is not None:
                if out.first_token_s is None:
                    out.first_token_s = at - start
                out.tokens.append(int(token.reshape(-1)[0]))
                text = result.as_numpy("text_output")
                out.text += text.reshape(-1)[0].decode("utf-8") if text is not None else ""
                out.expert_counts.append(result.as_numpy("expert_counts"))
                out.offsets.append(result.as_numpy("rq_offsets"))
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        out.latency_s = time.perf_counter() - start
        return out

    def close(self) -> None:
        try:
            self.client.stop_stream()
        finally:
            self.client.close()


def stream_generate(url: str, prompt: str | Sequence[int], max_tokens: int | None = None, *,
                    ignore_eos: bool = False, model: str = GENERATE, timeout: float = 60.0) -> Streamed:
    """Run one ``generate`` request over gRPC streaming (``url`` = host:grpc_port) and collect its tokens."""
    session = _StreamSession(url, model, timeout)
    try:
        return session.request(generate_inputs(prompt, max_tokens, ignore_eos))
    finally:
        session.close()


def _percentiles_ms(seconds: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    """``{"p50": ms, ...}`` by linear interpolation between closest ranks (``numpy.percentile``'s default);
    None for every key when there is no sample."""
    if not seconds:
        return {f"p{q}": None for q in qs}
    values = np.percentile(np.asarray(seconds) * 1e3, qs)
    return {f"p{q}": round(float(v), 2) for q, v in zip(qs, values)}


@dataclass
class LoadResult:
    """What :func:`run_load` saw: counts, wall time and one latency per answered request."""

    requests: int
    concurrency: int
    errors: int
    mismatches: int
    wall_s: float
    latencies_s: list[float]
    first_token_s: list[float]
    tokens: int
    error_samples: list[str] = field(default_factory=list)
    responses: list[tuple[int, Streamed]] = field(default_factory=list)  # (case index, response) with keep=True

    @property
    def versions(self) -> dict[str, int]:
        """Answered requests per model version that served them (with ``keep=True``)."""
        out: dict[str, int] = {}
        for _, r in self.responses:
            if r.error is None:
                out[str(r.model_version)] = out.get(str(r.model_version), 0) + 1
        return out

    def summary(self) -> dict:
        """The JSON-able numbers ``benchmarks/bench_tritonserver.py`` tabulates (milliseconds, per second)."""
        latency = _percentiles_ms(self.latencies_s, (50, 90, 99))
        latency["max"] = round(max(self.latencies_s) * 1e3, 2) if self.latencies_s else None
        return {
            "requests": self.requests, "concurrency": self.concurrency, "errors": self.errors,
            "mismatches": self.mismatches, "wall_s": round(self.wall_s, 3),
            "throughput_rps": round(self.requests / self.wall_s, 2) if self.wall_s else None,
            "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else None,
            "latency_ms": latency, "first_token_ms": _percentiles_ms(self.first_token_s, (50, 99)),
            "tokens": self.tokens, "error_samples": self.error_samples[:5],
        }


def run_load(url: str, cases: Sequence[tuple[str | Sequence[int], int, Sequence[int] | None]], *,
             requests: int = 500, concurrency: int = 16, model: str = GENERATE, ignore_eos: bool = False,
             timeout: float = 60.0, stop: threading.Event | None = None, keep: bool = False) -> LoadResult:
    """``requests`` streamed ``generate`` requests from ``concurrency`` clients (one gRPC stream each).

    cases: ``(prompt, max_tokens, expected_tokens or None)``, used round-robin; a response whose tokens differ
    from ``expected_tokens`` counts as a mismatch. Latency is request sent -> final response. ``stop``: once
    set, no new request starts (those in flight finish); ``keep``: keep every response (``LoadResult.responses``),
    e.g. to check each against the model version that served it.
    """
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    first: list[float] = []
    errors: list[str] = []
    mismatches = [0]
    tokens = [0]
    kept: list[tuple[int, Streamed]] = []

    def worker():
        session = _StreamSession(url, model, timeout)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= requests or (stop is not None and stop.is_set()):
                        return
                    next_index[0] += 1
                prompt, max_tokens, expected = cases[i % len(cases)]
                result = session.request(generate_inputs(prompt, max_tokens, ignore_eos), request_id=f"load-{i}")
                with lock:
                    if keep:
                        kept.append((i % len(cases), result))
                    if result.error:
                        errors.append(result.error)
                        continue
                    latencies.append(result.latency_s)
                    if result.first_token_s is not None:
                        first.append(result.first_token_s)
                    tokens[0] += len(result.tokens)
                    if expected is not None and list(result.tokens) != list(expected):
                        mismatches[0] += 1
        finally:
            session.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    answered = len(latencies) + len(errors)
    return LoadResult(answered, concurrency, len(errors), mismatches[0], wall, latencies, first, tokens[0], errors,
                      kept)


# --------------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------------
MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str, prefix: str = "") -> dict[MetricKey, float]:
    """Prometheus text format -> ``{(sample name, sorted label pairs): value}`` for the samples named ``prefix...``.

    Parsed by ``prometheus_client.parser`` (label escapes, ``# HELP``/``# TYPE`` lines). Sample names are that
    parser's OpenMetrics names: a counter's samples always end in ``_total``, so rq's ``rq_moe_expert_load_total``
    reads as on the wire and Triton's ``nv_inference_request_success`` as ``nv_inference_request_success_total``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def scrape_metrics(metrics_url: str, prefix: str = "") -> dict[MetricKey, float]:
    """Fetch Triton's ``/metrics`` (``metrics_url``) and :func:`parse_metrics` it."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        return parse_metrics(response.read().decode("utf-8", errors="replace"), prefix)
