"""Triton Inference Server deployment, tested against a live server on CPU (docs/tritonserver.md).

A tiny R&Q export (with replicas and INT4 copies) -> ``write_model_repository`` -> ``tritonserver`` from the
``nvidia-pytriton`` wheel, then with ``tritonclient`` over HTTP and gRPC: ``rq_forward`` outputs equal the offline
ONNX Runtime run, ``generate``'s streamed tokens (and per-token expert counts and replica offsets) equal offline
greedy generation with ``rq.export.runtime.OrtGenerator``, ``/metrics`` shows the expert-load counters moving by
exactly the replica rule, malformed requests get clear errors without hurting the server, and 500 requests at
concurrency 16 all come back correct (p50/p99 latency printed and written for benchmarks/bench_tritonserver.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest

from rq.engines.tritonserver import (FORWARD_MODEL, GENERATE, ONNX_MODEL, TRT_MODEL, ServingOptions, validate_model_config,
                                     write_model_repository)
from rq.errors import RQError
from rq.engines.tritonserver_client import generate_inputs, run_load, scrape_metrics, stream_generate
from rq.testing.tritonserver import SMOKE_PROMPTS, TritonInstall, model_backends, servable_models

if importlib.util.find_spec("pytest_timeout") is not None:  # the dev extra installs it
    pytestmark = pytest.mark.timeout(600)

PROMPTS = SMOKE_PROMPTS
MAX_TOKENS = 8
LOAD_REQUESTS, LOAD_CONCURRENCY = 500, 16


def _expected(offline, ids, max_tokens=MAX_TOKENS, ignore_eos=False):
    """Offline greedy generation of one sequence, replica offsets starting at zero (the server's default)."""
    offline.reset()
    return offline.generate(np.asarray([ids], dtype=np.int64), max_new_tokens=max_tokens,
                            eos_token_id=-1 if ignore_eos else None)


def _ids(offline, prompt):
    return offline.tokenizer.encode(prompt).ids


def _check_stream(result, gen, layers):
    """Streamed tokens, per-token expert counts and replica offsets == the offline generation's."""
    assert result.error is None, result.error
    assert result.tokens == gen.tokens[0].tolist()
    assert len(result.expert_counts) == len(gen.steps) == len(result.tokens)
    for counts, offsets, step in zip(result.expert_counts, result.offsets, gen.steps):
        for row, layer in enumerate(layers):
            n = step.expert_counts[layer].size
            np.testing.assert_array_equal(counts[row, :n], step.expert_counts[layer].reshape(-1))
            np.testing.assert_array_equal(offsets[row, :n], step.offsets[layer].reshape(-1))


# --------------------------------------------------------------------------------------------------------------
# repository
# --------------------------------------------------------------------------------------------------------------
def test_repository_layout_and_configs(model_repo, rq_build):
    manifest = json.loads((rq_build / "manifest.json").read_text())
    configs = {p.parent.name: validate_model_config(p) for p in sorted(model_repo.glob("*/config.pbtxt"))}
    assert set(configs) == {ONNX_MODEL, FORWARD_MODEL, GENERATE}
    for name, config in configs.items():
        assert config.name == name and (model_repo / name / "1").is_dir()

    onnx_cfg = configs[ONNX_MODEL]
    assert onnx_cfg.platform == "onnxruntime_onnx" and onnx_cfg.backend == "onnxruntime"
    # the served file is ONNX Runtime's fused route, which reads its shared weights from model.onnx.data
    assert onnx_cfg.max_batch_size == 0 and onnx_cfg.default_model_filename == "model.ort.onnx"
    version = model_repo / ONNX_MODEL / "1"
    for f in ("model.onnx", "model.onnx.data", "model.ort.onnx", "manifest.json", "plan.json",
              "tokenizer.json"):
        assert (version / f).is_file(), f
    # the config's tensors are exactly the ONNX graph's (names, element types, ranks; fixed dims kept)
    proto = onnx.load(version / "model.ort.onnx", load_external_data=False)
    from tritonclient.grpc import model_config_pb2 as mc

    elem = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
            onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.INT32: mc.TYPE_INT32}
    for values, tensors in ((proto.graph.input, onnx_cfg.input), (proto.graph.output, onnx_cfg.output)):
        assert [v.name for v in values] == [t.name for t in tensors]
        for v, t in zip(values, tensors):
            assert elem[v.type.tensor_type.elem_type] == t.data_type, v.name
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            assert dims == list(t.dims), v.name
    # the fused route runs ONNX Runtime's MoE kernels; the portable file keeps rq::RQMoE with its function body
    assert any(n.domain == "com.microsoft" and n.op_type in ("QMoE", "MoE") for n in proto.graph.node)
    portable = onnx.load(version / "model.onnx", load_external_data=False)
    assert any(n.domain == "rq" and n.op_type == "RQMoE" for n in portable.graph.node)
    assert any(f.domain == "rq" and f.name == "RQMoE" for f in portable.functions)

    forward = configs[FORWARD_MODEL]
    assert forward.backend == "python" and list(forward.input) == list(onnx_cfg.input)
    assert list(forward.output) == list(onnx_cfg.output)
    gen = configs[GENERATE]
    assert gen.backend == "python" and gen.model_transaction_policy.decoupled
    assert {t.name for t in gen.input} == {"text_input", "input_ids", "max_tokens", "ignore_eos"}
    assert all(t.optional for t in gen.input)
    assert {t.name for t in gen.output} == {"text_output", "token_id", "expert_counts", "rq_offsets"}
    assert list(next(t for t in gen.output if t.name == "expert_counts").dims) == [
        len(manifest["moe_layers"]), max(l["num_experts"] for l in manifest["moe_layers"])]
    assert gen.parameters["rq_build_dir"].string_value == f"{ONNX_MODEL}/{{version}}"
    for f in ("model.py", "rq_runtime.py", "rq_telemetry.py"):
        assert (model_repo / GENERATE / "1" / f).is_file()
    info = json.loads((model_repo / "rq_repository.json").read_text())
    assert info["tensorrt_model"] is None and info["generate"] == GENERATE
    # readable by a container running as another user (mkdtemp makes 0700 folders)
    assert (model_repo.stat().st_mode & 0o755) == 0o755


def test_python_models_need_no_rq(model_repo):
    """The repository's Python code runs where rq is not installed (NVIDIA's container): numpy, onnxruntime and
    tokenizers only. Checked in a subprocess whose imports of ``rq`` fail."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'rq' or name.startswith('rq.'):\n"
        "            raise ImportError('rq is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import rq_runtime, rq_telemetry\n"
        "g = rq_runtime.OrtGenerator(sys.argv[2])\n"
        "print(g.generate([g.tokenizer.encode('hello').ids], max_new_tokens=3).tokens.shape)\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(model_repo / GENERATE / "1"),
                          str(model_repo / ONNX_MODEL / "1")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("(1, ")


def test_servable_models_follow_the_backends(model_repo, tmp_path):
    """Each model's backend is read from its parsed config; a server offers only the backends it has folders for."""
    assert model_backends(model_repo) == {ONNX_MODEL: "onnxruntime", FORWARD_MODEL: "python", GENERATE: "python"}
    (tmp_path / "backends" / "python").mkdir(parents=True)
    python_only = TritonInstall(binary=tmp_path / "tritonserver", backends=tmp_path / "backends")
    assert servable_models(model_repo, python_only) == ([GENERATE, FORWARD_MODEL], {ONNX_MODEL: "onnxruntime"})


def test_repository_refuses_and_tensorrt(model_repo, rq_build, tmp_path):
    with pytest.raises(RQError, match="not empty; pass --force") as err:
        write_model_repository(rq_build, model_repo)
    assert "\n" not in str(err.value)
    with pytest.raises(RQError, match="not an rq export"):
        write_model_repository(tmp_path, tmp_path / "repo")
    with pytest.raises(RQError, match="without an engine"):
        write_model_repository(rq_build, tmp_path / "repo", plugin_lib=tmp_path / "lib.so")
    with pytest.raises(RQError, match="does not exist"):
        write_model_repository(rq_build, tmp_path / "repo", engine_plan=tmp_path / "missing.plan")
    for bad in ({"instances": 0}, {"default_max_tokens": 64, "max_tokens_limit": 32}, {"providers": ""}):
        with pytest.raises(RQError, match="invalid serving options"):
            ServingOptions(**bad)
    with pytest.raises(RQError, match="offsets_scope"):
        ServingOptions(offsets_scope="global")
    assert ServingOptions(providers="CUDAExecutionProvider, CPUExecutionProvider").providers == (
        "CUDAExecutionProvider", "CPUExecutionProvider")
    assert not (tmp_path / "repo").exists()  # nothing half-written

    engine, plugin = tmp_path / "rq.plan", tmp_path / "librq_moe_plugin.so"
    engine.write_bytes(b"engine"), plugin.write_bytes(b"plugin")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "old").write_text("x")
    repo = write_model_repository(rq_build, tmp_path / "repo", force=True, engine_plan=engine, plugin_lib=plugin)
    assert not (repo / "old").exists()
    trt = validate_model_config(repo / TRT_MODEL / "config.pbtxt")
    assert trt.platform == "tensorrt_plan" and trt.default_model_filename == "model.plan"
    assert (repo / TRT_MODEL / "1" / "model.plan").read_bytes() == b"engine"
    assert (repo / TRT_MODEL / plugin.name).read_bytes() == b"plugin"
    text = (repo / TRT_MODEL / "config.pbtxt").read_text()
    assert f"--backend-config=tensorrt,plugins=/models/{TRT_MODEL}/{plugin.name}" in text and "LD_PRELOAD" in text
    assert json.loads((repo / "rq_repository.json").read_text())["plugin_library"] == plugin.name


# --------------------------------------------------------------------------------------------------------------
# live server
# --------------------------------------------------------------------------------------------------------------
def test_models_ready(triton_server, triton_install):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    # clients are closed after use: Triton waits for open HTTP connections when it shuts down
    with httpclient.InferenceServerClient(triton_server.http_url) as http, \
            grpcclient.InferenceServerClient(triton_server.grpc_url) as grpc:
        assert http.is_server_live() and http.is_server_ready() and grpc.is_server_ready()
        index = {m["name"]: m for m in http.get_model_repository_index()}
        assert set(index) == {ONNX_MODEL, FORWARD_MODEL, GENERATE}
        assert triton_server.models and {GENERATE, FORWARD_MODEL} <= set(triton_server.models)
        for name in triton_server.models:  # every model the server was asked to load: READY
            assert index[name].get("state") == "READY", index[name]
            assert http.is_model_ready(name) and grpc.is_model_ready(name)
        config = grpc.get_model_config(GENERATE, as_json=True)["config"]
        assert config["model_transaction_policy"]["decoupled"] is True
    assert "python" in triton_install.backend_names


def _forward_feed(offline, ids, offsets, past=None, past_len=0):
    kv = offline.manifest["kv_cache"]
    s = len(ids)
    feed = {"input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past_len + s), dtype=np.int64),
            "position_ids": np.arange(past_len, past_len + s, dtype=np.int64)[None, :]}
    if past is None:
        past = []
        for layer in kv["layers"]:
            past.append(np.zeros((1, layer["key_heads"], 0, layer["key_dim"]), np.float32))
            past.append(np.zeros((1, layer["value_heads"], 0, layer["value_dim"]), np.float32))
    feed.update(zip(kv["past_names"], past))
    feed.update({f"rq_offsets.{l}": np.asarray(o, dtype=np.int64) for l, o in offsets.items()})
    return feed


def _infer(protocol, url, feed, names):
    if protocol == "http":
        import tritonclient.http as client
    else:
        import tritonclient.grpc as client
    inputs = []
    for name, value in feed.items():
        t = client.InferInput(name, list(value.shape), "INT64" if value.dtype == np.int64 else "FP32")
        t.set_data_from_numpy(value)
        inputs.append(t)
    with client.InferenceServerClient(url) as c:
        result = c.infer(FORWARD_MODEL, inputs, outputs=[client.InferRequestedOutput(n) for n in names])
        return {n: result.as_numpy(n) for n in names}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_forward_equals_offline_onnxruntime(triton_server, offline, protocol):
    """Prefill and one decode step through rq_forward == the same feeds through ONNX Runtime offline."""
    graph = offline.manifest["graphs"]["decoder"]
    names = [o["name"] for o in graph["outputs"]]
    session = offline.sessions["decoder"]
    ids = _ids(offline, PROMPTS[0])
    layers = graph["moe_layers"]
    rng = np.random.default_rng(0)
    offsets = {l: rng.integers(0, 10, offline.moe_layers[l]["num_experts"]) for l in layers}  # non-zero: rotation
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    past = None
    for step, tokens in enumerate([ids, [ids[-1]]]):
        feed = _forward_feed(offline, tokens, offsets, past, 0 if past is None else len(ids))
        served = _infer(protocol, url, feed, names)
        reference = dict(zip(names, session.run(names, feed)))
        for name in names:
            if name.startswith("expert_counts"):
                np.testing.assert_array_equal(served[name], reference[name], err_msg=name)
            else:
                np.testing.assert_allclose(served[name], reference[name], rtol=1e-5, atol=1e-5, err_msg=name)
        past = [served[n] for n in offline.manifest["kv_cache"]["present_names"]]
        offsets = {l: offsets[l] + served[f"expert_counts.{l}"] for l in layers}  # docs/spec.md §4 streaming update


def test_stream_equals_offline_generation(triton_server, offline):
    layers = sorted(offline.moe_layers)
    for prompt in PROMPTS[:4]:
        result = stream_generate(triton_server.grpc_url, prompt, MAX_TOKENS)
        gen = _expected(offline, _ids(offline, prompt))
        _check_stream(result, gen, layers)
        assert result.text == offline.tokenizer.decode(gen.tokens[0].tolist())
    # offsets really rotate: each call's offsets = previous offsets + previous counts (docs/spec.md §4)
    for prev_c, prev_o, o in zip(result.expert_counts, result.offsets, result.offsets[1:]):
        np.testing.assert_array_equal(o, prev_o + prev_c)
    assert np.all(result.offsets[0] == 0)
    # token ids in, eos ignored: exactly max_tokens tokens
    ids = _ids(offline, PROMPTS[4])
    result = stream_generate(triton_server.grpc_url, ids, 12, ignore_eos=True)
    assert len(result.tokens) == 12
    _check_stream(result, _expected(offline, ids, 12, ignore_eos=True), layers)


def test_http_generate_stream(triton_server, offline):
    """HTTP streaming (Triton's generate_stream SSE endpoint) of the decoupled model."""
    prompt = PROMPTS[1]
    body = json.dumps({"text_input": prompt, "max_tokens": MAX_TOKENS}).encode()
    request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/{GENERATE}/generate_stream",
                                     data=body, headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert events and all("error" not in e for e in events), events
    tokens = [int(np.asarray(e["token_id"]).reshape(-1)[0]) for e in events]
    gen = _expected(offline, _ids(offline, prompt))
    assert tokens == gen.tokens[0].tolist()
    assert "".join(e["text_output"] for e in events) == offline.tokenizer.decode(tokens)


def _layer_copy_loads(counts, offsets, copies):
    """Per-copy loads by enumerating assignments one by one (independent of rq_telemetry's closed form)."""
    out = []
    for load, off, c in zip(counts, offsets, copies):
        per = [0] * c
        for n in range(int(load)):
            per[(int(off) + n) % c] += 1
        out.extend(per)
    return out


def test_metrics_expert_loads_move(triton_server, offline):
    layers = sorted(offline.moe_layers)
    before = scrape_metrics(triton_server.metrics_url, "rq_moe_")
    result = stream_generate(triton_server.grpc_url, PROMPTS[2], MAX_TOKENS)
    assert result.error is None
    after = scrape_metrics(triton_server.metrics_url, "rq_moe_")

    def load(metrics, layer, expert, copy):
        key = ("rq_moe_expert_load_total", (("copy", str(copy)), ("expert", str(expert)), ("layer", str(layer)),
                                            ("model", GENERATE), ("version", "1")))
        return metrics.get(key, 0.0)

    for row, layer in enumerate(layers):
        copies = offline.moe_layers[layer]["copies"]
        expected = np.zeros(sum(copies), dtype=np.int64)
        for counts, offsets in zip(result.expert_counts, result.offsets):
            n = len(copies)
            expected += np.asarray(_layer_copy_loads(counts[row, :n], offsets[row, :n], copies))
        moved, p = [], 0
        for e, c in enumerate(copies):
            for k in range(c):
                moved.append(load(after, layer, e, k) - load(before, layer, e, k))
                p += 1
        assert np.array_equal(np.asarray(moved, dtype=np.int64), expected), (layer, moved, expected.tolist())
        assert sum(moved) == sum(int(c[row].clip(0).sum()) for c in result.expert_counts) > 0
    calls = ("rq_moe_calls_total", (("model", GENERATE),))
    assert after[calls] - before.get(calls, 0.0) == len(result.tokens)
    gauges = {k: v for k, v in after.items() if k[0] == "rq_moe_lis" and dict(k[1])["model"] == GENERATE}
    scopes = {(dict(k[1])["scope"], dict(k[1])["units"]) for k in gauges}
    assert {("window", "copies"), ("cumulative", "copies"), ("cumulative", "experts")} <= scopes
    assert all(v >= 1.0 for v in gauges.values())


def _stream_error(url, inputs, model=GENERATE):
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    q = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, request_id="bad", enable_empty_final_response=True)
        result, error = q.get(timeout=30)
        return None if error is None else str(error)
    finally:
        client.stop_stream()
        client.close()


def test_malformed_requests_get_clear_errors(triton_server, offline, model_repo, request):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url = triton_server.grpc_url
    max_context = int(validate_model_config(model_repo / GENERATE / "config.pbtxt").parameters["max_context"]
                      .string_value)

    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, list(np.shape(value)), dtype)
        t.set_data_from_numpy(np.asarray(value))
        return t

    cases = {
        "data-type is 'FP32', but model 'generate' expects 'BYTES'":
            [tensor("text_input", np.array([1.0], np.float32), "FP32")],
        "unexpected shape for input 'text_input'": [tensor("text_input", np.array([b"a", b"b"], object), "BYTES")],
        "unexpected shape for input 'input_ids'": [tensor("input_ids", np.array([[5, 6]], np.int64), "INT64")],
        "text_input is empty": generate_inputs(""),
        "text_input is empty; send a non-empty prompt": generate_inputs("   \n"),
        "input_ids is empty": [tensor("input_ids", np.zeros(0, np.int64), "INT64")],
        f"more than this deployment's limit of {max_context - 1}": generate_inputs("experts " * 200),
        "outside [0, 320)": generate_inputs([5, 320]),
        "max_tokens must be in [1, 32], got 0": generate_inputs("hello", 0),
        "max_tokens must be in [1, 32], got 1000": generate_inputs("hello", 1000),
        "send exactly one of text_input": [*generate_inputs("hello"), tensor("input_ids", np.array([5], np.int64),
                                                                             "INT64")],
        "send exactly one of text_input (BYTES [1]) and input_ids": [tensor("max_tokens", np.array([3], np.int32),
                                                                            "INT32")],
    }
    for expected, inputs in cases.items():
        message = _stream_error(url, inputs)
        assert message is not None and expected in message, (expected, message)
    # rq_forward: a missing input (Triton core) and inconsistent shapes (ONNX Runtime, reported by the model)
    ids = _ids(offline, PROMPTS[0])
    layers = offline.manifest["graphs"]["decoder"]["moe_layers"]
    feed = _forward_feed(offline, ids, {l: np.zeros(offline.moe_layers[l]["num_experts"], np.int64) for l in layers})
    client = grpcclient.InferenceServerClient(url)
    request.addfinalizer(client.close)
    missing = {k: v for k, v in feed.items() if k != "position_ids"}
    with pytest.raises(InferenceServerException, match="position_ids"):
        client.infer(FORWARD_MODEL, [tensor(k, v, "INT64" if v.dtype == np.int64 else "FP32")
                                     for k, v in missing.items()])
    bad = dict(feed, input_ids=np.asarray([ids], np.int32))
    with pytest.raises(InferenceServerException, match="expects 'INT64'"):
        client.infer(FORWARD_MODEL, [tensor(k, v, {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}.get(
            v.dtype, "FP32")) for k, v in bad.items()])
    bad = dict(feed, position_ids=np.zeros((1, len(ids) + 3), np.int64))
    with pytest.raises(InferenceServerException, match="rq_forward: ONNX Runtime rejected the inputs"):
        client.infer(FORWARD_MODEL, [tensor(k, v, "INT64" if v.dtype == np.int64 else "FP32")
                                     for k, v in bad.items()])
    # the server is still up and later requests are answered correctly
    assert triton_server.alive() and client.is_server_ready()
    result = stream_generate(url, PROMPTS[3], MAX_TOKENS)
    _check_stream(result, _expected(offline, _ids(offline, PROMPTS[3])), sorted(offline.moe_layers))


def _load_json_path(request, tmp_path) -> Path:
    """Where the load numbers go: $RQ_TRITON_LOAD_JSON, else pytest's cache (.pytest_cache/d/rq-triton/load.json),
    which ``benchmarks/bench_tritonserver.py --from-test`` reads."""
    if os.environ.get("RQ_TRITON_LOAD_JSON"):
        return Path(os.environ["RQ_TRITON_LOAD_JSON"])
    cache = getattr(request.config, "cache", None)
    return (cache.mkdir("rq-triton") if cache is not None else tmp_path) / "load.json"


def test_bounded_load(triton_server, offline, request, capsys, tmp_path):
    """500 streamed requests at concurrency 16: zero errors, every response equal to offline generation."""
    cases = []
    for prompt in PROMPTS:
        ids = _ids(offline, prompt)
        cases.append((prompt, MAX_TOKENS, _expected(offline, ids).tokens[0].tolist()))
    result = run_load(triton_server.grpc_url, cases, requests=LOAD_REQUESTS, concurrency=LOAD_CONCURRENCY)
    summary = result.summary()
    summary.update(server="tritonserver 2.51 (nvidia-pytriton wheel), CPU", model=GENERATE,
                   max_tokens=MAX_TOKENS, instances=2, intra_op_threads=1, cpu_count=os.cpu_count(),
                   architecture=offline.manifest["architecture"], build="tiny random qwen3_moe export (tests)")
    out = _load_json_path(request, tmp_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    with capsys.disabled():
        lat = summary["latency_ms"]
        print(f"\n[triton load] {LOAD_REQUESTS} requests x {MAX_TOKENS} tokens at concurrency {LOAD_CONCURRENCY}: "
              f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, {summary['throughput_rps']} req/s, "
              f"{summary['tokens_per_s']} tok/s, errors {result.errors}, mismatches {result.mismatches} -> {out}")
    assert result.errors == 0, result.error_samples[:3]
    assert result.mismatches == 0
    assert len(result.latencies_s) == LOAD_REQUESTS
    assert triton_server.alive()


def test_onnx_model_with_tritons_loader(triton_server, triton_install, capsys, request):
    """Triton's own loader on rq_onnx: READY where the onnxruntime backend exists; otherwise Triton must parse the
    config and stop only at the missing backend (the wheel's server has only the Python backend)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(triton_server.http_url)
    request.addfinalizer(client.close)
    if "onnxruntime" in triton_install.backend_names:  # a full Triton install: it is already loaded
        assert client.is_model_ready(ONNX_MODEL)
        return
    with pytest.raises(InferenceServerException) as err:
        client.load_model(ONNX_MODEL)
    assert re.search(r"unable to find backend library for backend 'onnxruntime'", str(err.value)), str(err.value)
    with capsys.disabled():
        print(f"\n[triton] note: {ONNX_MODEL} not served: this tritonserver has backends "
              f"{triton_install.backend_names} (no onnxruntime). Triton parsed its config and resolved it to the "
              f"onnxruntime backend; its tensors were checked against the ONNX file in "
              f"test_repository_layout_and_configs. Serve it with NVIDIA's Triton container (docs/tritonserver.md).")
    # the failed model only affects itself: the others stay READY and keep serving
    assert client.is_model_ready(GENERATE) and client.is_model_ready(FORWARD_MODEL)
    assert stream_generate(triton_server.grpc_url, PROMPTS[0], 2).error is None
