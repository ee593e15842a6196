"""Triton Inference Server deployment of an R&Q export (docs/triton.md).

- :func:`write_model_repository` ``(build_dir, repo_dir, ...)``: an ``rq-export`` build folder -> a Triton model
  repository (``config.pbtxt`` + versioned folders), written atomically:

  ``rq_onnx``      the R&Q ONNX graph for Triton's ONNX Runtime backend (``platform: "onnxruntime_onnx"``); the
                   ``rq::RQMoE`` nodes run through the file's model-local function, which stock ONNX Runtime
                   executes. Its version folder also holds the export's manifest, plan and tokenizer, which the
                   Python models below read (``rq_build_dir``), so the weights are stored once.
  ``generate``     Python backend, decoupled: tokenize -> prefill/decode with the KV cache through ONNX Runtime ->
                   detokenize, one streamed response per token; replica offsets rotate per docs/spec.md §4 across the
                   decode steps; per-layer expert loads and LIS exported as Triton custom metrics on ``/metrics``.
  ``rq_forward``   Python backend, same tensors as ``rq_onnx`` (one graph call through ONNX Runtime), for Triton
                   builds without the onnxruntime backend (such as the ``nvidia-pytriton`` wheel's server).
  ``rq_trt``       the TensorRT engine (``platform: "tensorrt_plan"``) with the ``RQMoE`` plugin library next to
                   it, only when an engine file is given.

  Encoder-decoder exports (Switch Transformers) get one ONNX/forward model per graph (``rq_onnx_encoder``,
  ``rq_onnx_decoder``, ...); ``generate`` runs both.
- :func:`validate_model_config`: parse a ``config.pbtxt`` with Triton's own ``ModelConfig`` protobuf.
- :class:`TritonServer`: start a local ``tritonserver`` (the one the ``nvidia-pytriton`` wheel ships, or one on
  ``PATH``) on free ports, wait until it is ready, stop it (its whole process group) - used by the tests and
  ``benchmarks/bench_triton.py``.
- :func:`stream_generate`, :func:`run_load`, :func:`scrape_metrics`: client helpers (``tritonclient``).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rq.atomic import staged_dir
from rq.errors import RQError

TEMPLATES = Path(__file__).resolve().parent / "tritonserver_models"
REPOSITORY_INFO = "rq_repository.json"
GENERATE = "generate"
ONNX_MODEL = "rq_onnx"
FORWARD_MODEL = "rq_forward"
TRT_MODEL = "rq_trt"

_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                  "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                  "bool": "TYPE_BOOL"}


# --------------------------------------------------------------------------------------------------------------
# config.pbtxt
# --------------------------------------------------------------------------------------------------------------
class _Enum(str):
    """A protobuf enum value: written without quotes."""


def _scalar(value: Any) -> str:
    if isinstance(value, _Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a valid protobuf text-format string literal for printable text


def _pbtxt(fields: dict, indent: int = 0) -> str:
    """Protobuf text format for nested dicts/lists; ``parameters`` dicts become ``map<string, ModelParameter>``."""
    pad = "  " * indent
    lines = []
    for key, value in fields.items():
        if value is None:
            continue
        if key == "parameters" and isinstance(value, dict):
            for k, v in value.items():
                lines.append(f'{pad}parameters {{ key: {_scalar(k)} value {{ string_value: {_scalar(v)} }} }}')
        elif isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            blocks = [f"{pad}  {{\n{_pbtxt(v, indent + 2)}{pad}  }}" for v in value]
            lines.append(f"{pad}{key} [\n" + ",\n".join(blocks) + f"\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


def _tensor(spec: dict, optional: bool = False) -> dict:
    dtype = _TRITON_DTYPES.get(spec["dtype"])
    if dtype is None:
        raise RQError(f"tensor {spec['name']} has dtype {spec['dtype']}, which Triton configs cannot express")
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in spec["shape"]]
    out = {"name": spec["name"], "data_type": _Enum(dtype), "dims": dims}
    if optional:
        out["optional"] = True
    return out


def validate_model_config(text_or_path: str | Path):
    """Parse a ``config.pbtxt`` into Triton's ``ModelConfig`` protobuf (from ``tritonclient``) and return it.

    Raises :class:`RQError` naming the problem when the text does not parse; :class:`ImportError` when
    ``tritonclient[grpc]`` is not installed.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = Path(text_or_path).read_text() if isinstance(text_or_path, Path) else str(text_or_path)
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise RQError(f"invalid Triton model config ({err})") from None


def graph_files(graph: dict) -> list[str]:
    """Every file of one exported graph: the portable ``model.onnx``, ONNX Runtime's fused ``model.ort.onnx``
    (which reads the shared weights from ``model.onnx.data``), and their data files."""
    keys = ("file", "data", "ort_file", "ort_data")
    return [graph[k] for k in keys if k in graph]


def _onnx_config(name: str, graph: dict, filename: str, instances: int) -> str:
    config = {
        "name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime", "max_batch_size": 0,
        "default_model_filename": filename,
        "input": [_tensor(t) for t in graph["inputs"]],
        "output": [_tensor(t) for t in graph["outputs"]],
        # KIND_AUTO-like default: one instance per visible GPU, or CPU without one
        "instance_group": [{"count": instances}],
    }
    return ("# rq: the R&Q ONNX graph for Triton's ONNX Runtime backend: the fused route (ONNX Runtime's own MoE\n"
            "# kernels) where the export has one, else rq::RQMoE nodes through their model-local function; the\n"
            "# external weights files sit next to it.\n" + _pbtxt(config))


def _forward_config(name: str, graph_name: str, graph: dict, build_rel: str, opts: "_Options") -> str:
    config = {
        "name": name, "backend": "python", "max_batch_size": 0,
        "input": [_tensor(t) for t in graph["inputs"]],
        "output": [_tensor(t) for t in graph["outputs"]],
        "instance_group": [{"count": opts.instances, "kind": _Enum("KIND_CPU")}],
        "parameters": {"rq_build_dir": build_rel, "graph": graph_name, **opts.runtime_parameters()},
    }
    return ("# rq: one call of the R&Q graph through ONNX Runtime in the Python backend (same tensors as the\n"
            "# ONNX Runtime backend model), with live expert-load metrics.\n" + _pbtxt(config))


def _generate_config(manifest: dict, build_rel: str, opts: "_Options") -> str:
    layers = manifest["moe_layers"]
    width = max(int(layer["num_experts"]) for layer in layers)
    config = {
        "name": GENERATE, "backend": "python", "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [
            {"name": "text_input", "data_type": _Enum("TYPE_STRING"), "dims": [1], "optional": True},
            {"name": "input_ids", "data_type": _Enum("TYPE_INT64"), "dims": [-1], "optional": True},
            {"name": "max_tokens", "data_type": _Enum("TYPE_INT32"), "dims": [1], "optional": True},
            {"name": "ignore_eos", "data_type": _Enum("TYPE_BOOL"), "dims": [1], "optional": True},
        ],
        "output": [
            {"name": "text_output", "data_type": _Enum("TYPE_STRING"), "dims": [1]},
            {"name": "token_id", "data_type": _Enum("TYPE_INT64"), "dims": [1]},
            {"name": "expert_counts", "data_type": _Enum("TYPE_INT64"), "dims": [len(layers), width]},
            {"name": "rq_offsets", "data_type": _Enum("TYPE_INT64"), "dims": [len(layers), width]},
        ],
        "instance_group": [{"count": opts.instances, "kind": _Enum("KIND_CPU")}],
        "parameters": {
            "rq_build_dir": build_rel, **opts.runtime_parameters(),
            "default_max_tokens": str(opts.default_max_tokens), "max_tokens_limit": str(opts.max_tokens_limit),
            "max_context": str(opts.max_context), "offsets_scope": opts.offsets_scope,
        },
    }
    return ("# rq: streaming greedy generation (decoupled: one response per token). Send text_input (or input_ids),\n"
            "# optional max_tokens / ignore_eos; each response carries token_id, the text_output delta and the\n"
            "# expert_counts [moe_layers, num_experts] and replica offsets rq_offsets [moe_layers, num_experts]\n"
            "# of the forward call that produced the token (offsets advance by the counts after each call: the replica rule).\n"
            + _pbtxt(config))


def _trt_config(plugin_name: str | None) -> str:
    config = {"name": TRT_MODEL, "platform": "tensorrt_plan", "backend": "tensorrt", "max_batch_size": 0,
              "default_model_filename": "model.plan", "instance_group": [{"count": 1, "kind": _Enum("KIND_GPU")}]}
    plugin = (f"#   tritonserver --model-repository=/models --backend-config=tensorrt,plugins=/models/{TRT_MODEL}/"
              f"{plugin_name}\n#   (or LD_PRELOAD=/models/{TRT_MODEL}/{plugin_name} tritonserver ...)\n"
              if plugin_name else "#   (no plugin library was given: load librq_moe_plugin.so with "
                                  "--backend-config=tensorrt,plugins=PATH or LD_PRELOAD)\n")
    return ("# rq: the TensorRT engine of the R&Q model; inputs/outputs are auto-completed from the engine.\n"
            "# The RQMoE plugin must be registered before the engine deserializes:\n" + plugin + _pbtxt(config))


# --------------------------------------------------------------------------------------------------------------
# model repository
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    instances: int
    intra_op_threads: int
    providers: str
    max_context: int
    default_max_tokens: int
    max_tokens_limit: int
    offsets_scope: str
    metrics: bool

    def runtime_parameters(self) -> dict[str, str]:
        return {"providers": self.providers, "intra_op_threads": str(self.intra_op_threads),
                "metrics": "true" if self.metrics else "false", "lis_window": "64", "metrics_flush_every": "16"}


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (exports are never modified in place), copy across file systems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _runtime_source() -> str:
    try:
        import rq.export.runtime as runtime
    except ImportError as err:  # pragma: no cover - rq.export is part of the package
        raise RQError(f"rq.export.runtime is not importable ({err}); reinstall rq") from None
    return inspect.getsource(runtime)


def _check_repo_dir(repo_dir: Path, force: bool) -> None:
    if repo_dir.exists() and not repo_dir.is_dir():
        raise RQError(f"{repo_dir} exists and is not a folder; pass another --out")
    if repo_dir.is_dir() and any(repo_dir.iterdir()) and not force:
        raise RQError(f"{repo_dir} already exists and is not empty; pass --force to replace it or choose another --out")


SMOKE_PROMPTS = [  # short mixed code/prose prompts for live checks and the load benchmark
    "def forward(self, hidden_states):",
    "The quick brown fox",
    "Mixture of experts models route tokens",
    "import torch\nfor i in range(10):",
    "print(i * 2)",
    "return self.experts(x)",
    "The lazy dog jumps over",
    "tokens to experts.",
]


def write_model_repository(build_dir: str | Path, repo_dir: str | Path, *, force: bool = False,
                           engine_plan: str | Path | None = None, plugin_lib: str | Path | None = None,
                           instances: int = 1, intra_op_threads: int = 0,
                           providers: Sequence[str] | str = ("CPUExecutionProvider",), max_context: int = 2048,
                           default_max_tokens: int = 16, max_tokens_limit: int = 512,
                           offsets_scope: str = "request", forward_model: bool = True,
                           metrics: bool = True) -> Path:
    """Write a Triton model repository for the ``rq-export`` folder ``build_dir`` into ``repo_dir``.

    engine_plan / plugin_lib: a TensorRT engine (``.plan``) and the ``RQMoE`` plugin library, added as model
    ``rq_trt`` (the library next to it, loaded with ``--backend-config=tensorrt,plugins=...`` or ``LD_PRELOAD``).
    instances: model instances of each Python model (each is a process with its own ONNX Runtime session);
    intra_op_threads: ONNX Runtime threads per instance (0: its default); providers: ONNX Runtime execution
    providers of the Python models (e.g. ``("CUDAExecutionProvider", "CPUExecutionProvider")``);
    max_context: prompt + generated tokens per request; default_max_tokens / max_tokens_limit: the ``generate``
    model's default and largest ``max_tokens``; offsets_scope: ``"request"`` (replica offsets restart at zero
    per request: reproducible) or ``"instance"`` (they keep rotating across requests); forward_model: also write
    ``rq_forward``; metrics: export load telemetry. The folder is assembled next to ``repo_dir`` and renamed
    into place; an existing non-empty ``repo_dir`` is refused without ``force``. Returns ``repo_dir``.
    """
    from rq.export.runtime import graph_file, load_manifest

    build_dir, repo_dir = Path(build_dir), Path(repo_dir)
    manifest = load_manifest(build_dir)
    if offsets_scope not in ("request", "instance"):
        raise RQError(f"offsets_scope must be 'request' or 'instance', got {offsets_scope!r}")
    if instances < 1 or intra_op_threads < 0 or max_context < 2 or not 1 <= default_max_tokens <= max_tokens_limit:
        raise RQError(f"invalid serving options (instances {instances}, intra_op_threads {intra_op_threads}, "
                      f"max_context {max_context}, default_max_tokens {default_max_tokens}, max_tokens_limit "
                      f"{max_tokens_limit}): need instances >= 1, threads >= 0, max_context >= 2, "
                      f"1 <= default_max_tokens <= max_tokens_limit")
    if plugin_lib is not None and engine_plan is None:
        raise RQError("a TensorRT plugin library was given without an engine; pass the engine (.plan) too, "
                      "or drop the plugin")
    engine_plan = Path(engine_plan) if engine_plan is not None else None
    plugin_lib = Path(plugin_lib) if plugin_lib is not None else None
    for path, what in ((engine_plan, "TensorRT engine"), (plugin_lib, "plugin library")):
        if path is not None and not path.is_file():
            raise RQError(f"{what} {path} does not exist; build it first (docs/tensorrt.md)")
    graphs = manifest["graphs"]
    payload = ["manifest.json"]
    for graph in graphs.values():
        payload += graph_files(graph)
    if (build_dir / "plan.json").is_file():
        payload.append("plan.json")
    missing = [f for f in payload if not (build_dir / f).is_file()]
    tokenizer_dir = build_dir / manifest["tokenizer"]["dir"]
    if not (tokenizer_dir / "tokenizer.json").is_file():
        missing.append(f"{manifest['tokenizer']['dir']}/tokenizer.json")
    if missing:
        raise RQError(f"{build_dir} is incomplete (missing {', '.join(missing)}); re-run rq-export")
    templates = [TEMPLATES / f for f in ("generate.py", "forward.py", "rq_telemetry.py")]
    if not all(t.is_file() for t in templates):
        raise RQError(f"rq's Triton model templates are missing from {TEMPLATES}; reinstall rq "
                      f"(they are package data of rq.engines)")
    _check_repo_dir(repo_dir, force)
    if isinstance(providers, str):  # "CUDAExecutionProvider,CPUExecutionProvider" from a command line
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    opts = _Options(instances, intra_op_threads, ",".join(providers), max_context, default_max_tokens,
                    max_tokens_limit, offsets_scope, metrics)

    encoder_decoder = len(graphs) > 1
    onnx_names = {g: (f"{ONNX_MODEL}_{g}" if encoder_decoder else ONNX_MODEL) for g in graphs}
    forward_names = {g: (f"{FORWARD_MODEL}_{g}" if encoder_decoder else FORWARD_MODEL) for g in graphs}
    home_graph = "decoder" if "decoder" in graphs else next(iter(graphs))
    build_rel = f"{onnx_names[home_graph]}/1"  # where the full export lives inside the repository
    runtime_source = _runtime_source()

    repo_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(repo_dir) as tmp:
        # the export: once, in the version folder of the decoder's ONNX model
        home = tmp / build_rel
        for name in payload:
            _place(build_dir / name, home / name)
        for src in sorted(p for p in tokenizer_dir.rglob("*") if p.is_file()):
            _place(src, home / manifest["tokenizer"]["dir"] / src.relative_to(tokenizer_dir))
        models = {}
        for g, graph in graphs.items():
            if g != home_graph:
                for name in graph_files(graph):
                    _place(build_dir / name, tmp / onnx_names[g] / "1" / name)
            models[onnx_names[g]] = _onnx_config(onnx_names[g], graph, graph_file(graph), 1)
            if forward_model:
                models[forward_names[g]] = _forward_config(forward_names[g], g, graph, build_rel, opts)
                version = tmp / forward_names[g] / "1"
                version.mkdir(parents=True)
                shutil.copyfile(TEMPLATES / "forward.py", version / "model.py")
                shutil.copyfile(TEMPLATES / "rq_telemetry.py", version / "rq_telemetry.py")
        models[GENERATE] = _generate_config(manifest, build_rel, opts)
        version = tmp / GENERATE / "1"
        version.mkdir(parents=True)
        shutil.copyfile(TEMPLATES / "generate.py", version / "model.py")
        shutil.copyfile(TEMPLATES / "rq_telemetry.py", version / "rq_telemetry.py")
        (version / "rq_runtime.py").write_text(runtime_source)
        plugin_name = None
        if engine_plan is not None:
            _place(engine_plan, tmp / TRT_MODEL / "1" / "model.plan")
            if plugin_lib is not None:
                plugin_name = plugin_lib.name
                _place(plugin_lib, tmp / TRT_MODEL / plugin_name)
            models[TRT_MODEL] = _trt_config(plugin_name)
        for name, text in models.items():
            try:
                validate_model_config(text)
            except ImportError:
                pass  # tritonclient absent: the text is still generated from typed fields
            (tmp / name).mkdir(parents=True, exist_ok=True)
            (tmp / name / "config.pbtxt").write_text(text)
        info = {
            "format": "rq-triton-repository", "version": 1, "build_dir": str(build_dir.resolve()),
            "architecture": manifest["architecture"], "plan": manifest.get("plan"),
            "models": sorted(models), "onnx_models": [onnx_names[g] for g in graphs], "generate": GENERATE,
            "forward_models": [forward_names[g] for g in graphs] if forward_model else [],
            "tensorrt_model": TRT_MODEL if engine_plan is not None else None, "plugin_library": plugin_name,
            "rq_build_dir": build_rel, "options": opts.__dict__,
            "python_requirements": ["numpy", "onnxruntime (or onnxruntime-gpu)", "tokenizers"],
        }
        (tmp / REPOSITORY_INFO).write_text(json.dumps(info, indent=2) + "\n")
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp is 0700: make the repository readable in containers
            if path.is_dir():
                path.chmod(0o755)
    return repo_dir


def repository_info(repo_dir: str | Path) -> dict:
    """The ``rq_repository.json`` that :func:`write_model_repository` wrote (models, options, source build)."""
    path = Path(repo_dir) / REPOSITORY_INFO
    if not path.is_file():
        raise RQError(f"{repo_dir} is not an rq Triton repository (no {REPOSITORY_INFO}); write one with "
                      f"`rq triton BUILD_DIR --out {repo_dir}`")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------------------
# local server
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonInstall:
    """A ``tritonserver`` binary with its backends folder (and, for the pytriton wheel, its libs and stubs)."""

    binary: Path
    backends: Path
    libs: Path | None = None
    stubs: Path | None = None  # python_backend_stubs/<major.minor>/triton_python_backend_stub

    @property
    def backend_names(self) -> list[str]:
        return sorted(p.name for p in self.backends.iterdir() if p.is_dir()) if self.backends.is_dir() else []


def find_tritonserver() -> TritonInstall | None:
    """The ``tritonserver`` of the ``nvidia-pytriton`` wheel, else ``$RQ_TRITONSERVER`` / ``tritonserver`` on
    PATH with ``<prefix>/backends`` (the layout of NVIDIA's containers); None when there is none."""
    try:
        import pytriton
        root = Path(pytriton.__file__).resolve().parent / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            libs = root.parent.parent / "nvidia_pytriton.libs"
            return TritonInstall(binary, root / "backends", libs if libs.is_dir() else None,
                                 root / "python_backend_stubs")
    except ImportError:
        pass
    found = os.environ.get("RQ_TRITONSERVER") or shutil.which("tritonserver")
    if found:
        binary = Path(found).resolve()
        return TritonInstall(binary, binary.parent.parent / "backends")
    return None


_PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch",
                      "tensorflow_savedmodel": "tensorflow", "tensorflow_graphdef": "tensorflow"}


def model_backends(repo_dir: str | Path) -> dict[str, str]:
    """``{model: backend}`` of every model folder in ``repo_dir`` (from its ``config.pbtxt``)."""
    out = {}
    for config in sorted(Path(repo_dir).glob("*/config.pbtxt")):
        backend = platform = ""
        for line in config.read_text().splitlines():
            key, _, value = line.strip().partition(":")
            if key == "backend":
                backend = json.loads(value.strip())
            elif key == "platform":
                platform = json.loads(value.strip())
        out[config.parent.name] = backend or _PLATFORM_BACKENDS.get(platform, platform)
    return out


def servable_models(repo_dir: str | Path, install: TritonInstall) -> tuple[list[str], dict[str, str]]:
    """Models of ``repo_dir`` whose backend ``install`` has, and ``{model: missing backend}`` for the others."""
    have = set(install.backend_names)
    backends = model_backends(repo_dir)
    return ([m for m, b in backends.items() if b in have], {m: b for m, b in backends.items() if b not in have})


def _live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (Linux ``/proc``; [] elsewhere)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TritonServer:
    """A ``tritonserver`` process on 127.0.0.1 with free ports, in its own process group.

    ``models``: load only these (``--model-control-mode=explicit``), e.g. to leave out models whose backend
    the server lacks; None loads the whole repository. Use as a context manager or call :meth:`start` /
    :meth:`stop`; :meth:`stop` signals the whole process group (server and Python-backend stubs) and escalates
    to SIGKILL after ``stop_timeout`` seconds.
    """

    def __init__(self, repo_dir: str | Path, *, models: Iterable[str] | None = None,
                 install: TritonInstall | None = None, log_path: str | Path | None = None,
                 extra_args: Sequence[str] = (), stop_timeout: float = 20.0):
        self.repo_dir = Path(repo_dir).resolve()
        self.models = list(models) if models is not None else None
        self.install = install or find_tritonserver()
        if self.install is None:
            raise RQError("tritonserver is not installed: `pip install nvidia-pytriton` (ships a CPU-capable "
                          "server) or use NVIDIA's Triton container (docs/triton.md)")
        self.extra_args = list(extra_args)
        self.stop_timeout = stop_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix="rq-triton-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    # urls
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _backends(self) -> Path:
        """The backends folder, with the Python-backend stub of this interpreter where the wheel needs it."""
        install = self.install
        if install.stubs is None:
            return install.backends
        stub = install.stubs / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
        target = self._workdir / "backends"
        shutil.copytree(install.backends, target, ignore=shutil.ignore_patterns("__pycache__"))
        if stub.is_file() and (target / "python").is_dir():
            shutil.copy2(stub, target / "python" / "triton_python_backend_stub")
        return target

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the Python backend runs the `python3` found first on PATH: this interpreter's environment
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [str(p) for p in (self.install.libs, sysconfig.get_config_var("LIBDIR")) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def start(self, timeout: float = 120.0) -> "TritonServer":
        backends = self._backends()
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        args = [str(self.install.binary), f"--model-repository={self.repo_dir}", f"--backend-directory={backends}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--exit-timeout-secs=5", "--log-verbose=0"]
        if self.models is not None:
            args += ["--model-control-mode=explicit", *[f"--load-model={m}" for m in self.models]]
        args += self.extra_args
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=self._env(),
                                        start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RQError(f"tritonserver exited with code {self.process.returncode} while starting; "
                              f"log: {self.log_path}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        raise RQError(f"tritonserver was not ready after {timeout:.0f} s; log: {self.log_path}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def group_members(self) -> list[int]:
        """Live (non-zombie) processes of the server's process group: the server and its backend stubs."""
        return _live_group_members(self.process.pid) if self.process is not None else []

    def stop(self) -> int | None:
        """Stop the server's process group (SIGTERM, then SIGKILL); returns its exit code."""
        proc = self.process
        if proc is None:
            return None
        shm = self._shm_regions()
        try:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:  # stubs may outlive a killed server: clear the whole group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(10)
            deadline = time.monotonic() + 10
            while _live_group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            self._log.close()
            for name in shm:  # a killed stub leaves its shared-memory region behind
                Path("/dev/shm", name).unlink(missing_ok=True)
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            if proc.returncode == 0 and self.log_path.parent == self._workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)  # a clean run keeps no log behind
        return proc.returncode

    def _shm_regions(self) -> set[str]:
        """Names of the Python-backend shared-memory regions of this server's stubs (from their command lines)."""
        names = set()
        for pid in self.group_members():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            names.update(a.decode() for a in args if a.startswith(b"triton_python_backend_shm_region_"))
        return names

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------------------------------------------
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


def generate_inputs(prompt: str | Sequence[int], max_tokens: int | None = None, ignore_eos: bool = False,
                    protocol: str = "grpc") -> list:
    """``tritonclient`` inputs of one ``generate`` request (``prompt``: text, or token ids)."""
    import numpy as np

    mod = _client_module(protocol)
    inputs = []
    if isinstance(prompt, str):
        t = mod.InferInput("text_input", [1], "BYTES")
        t.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    else:
        ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
        t = mod.InferInput("input_ids", list(ids.shape), "INT64")
        t.set_data_from_numpy(ids)
    inputs.append(t)
    if max_tokens is not None:
        t = mod.InferInput("max_tokens", [1], "INT32")
        t.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
        inputs.append(t)
    if ignore_eos:
        t = mod.InferInput("ignore_eos", [1], "BOOL")
        t.set_data_from_numpy(np.array([True]))
        inputs.append(t)
    return inputs


def _client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as mod
    elif protocol == "http":
        import tritonclient.http as mod
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return mod


class _StreamSession:
    """One gRPC client with an open bidirectional stream; requests are answered one after the other."""

    def __init__(self, url: str, model: str = GENERATE, timeout: float = 60.0):
        import queue

        import tritonclient.grpc as grpcclient

        self.model, self.timeout = model, timeout
        self.client = grpcclient.InferenceServerClient(url)
        self.queue: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.queue.put((result, error, time.perf_counter())))
        self._n = 0

    def request(self, inputs: list, request_id: str | None = None) -> Streamed:
        import queue

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
            response = result.get_response()
            token = result.as_numpy("token_id")
            if token is not None:
                if out.first_token_s is None:
                    out.first_token_s = at - start
                out.tokens.append(int(token.reshape(-1)[0]))
                text = result.as_numpy("text_output")
                out.text += text.reshape(-1)[0].decode("utf-8") if text is not None else ""
                out.expert_counts.append(result.as_numpy("expert_counts"))
                out.offsets.append(result.as_numpy("rq_offsets"))
            final = response.parameters.get("triton_final_response")
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


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    errors: int
    mismatches: int
    wall_s: float
    latencies_s: list[float]
    first_token_s: list[float]
    tokens: int
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        ms = [v * 1e3 for v in self.latencies_s]
        ttft = [v * 1e3 for v in self.first_token_s]
        return {
            "requests": self.requests, "concurrency": self.concurrency, "errors": self.errors,
            "mismatches": self.mismatches, "wall_s": round(self.wall_s, 3),
            "throughput_rps": round(self.requests / self.wall_s, 2) if self.wall_s else None,
            "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else None,
            "latency_ms": {"p50": round(_percentile(ms, 50), 2), "p90": round(_percentile(ms, 90), 2),
                           "p99": round(_percentile(ms, 99), 2), "max": round(max(ms), 2) if ms else None},
            "first_token_ms": {"p50": round(_percentile(ttft, 50), 2), "p99": round(_percentile(ttft, 99), 2)},
            "tokens": self.tokens, "error_samples": self.error_samples[:5],
        }


def run_load(url: str, cases: Sequence[tuple[str | Sequence[int], int, Sequence[int] | None]], *,
             requests: int = 500, concurrency: int = 16, model: str = GENERATE, ignore_eos: bool = False,
             timeout: float = 60.0) -> LoadResult:
    """``requests`` streamed ``generate`` requests from ``concurrency`` clients (one gRPC stream each).

    cases: ``(prompt, max_tokens, expected_tokens or None)``, used round-robin; a response whose tokens differ
    from ``expected_tokens`` counts as a mismatch. Latency is request sent -> final response.
    """
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    first: list[float] = []
    errors: list[str] = []
    mismatches = [0]
    tokens = [0]

    def worker():
        session = _StreamSession(url, model, timeout)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= requests:
                        return
                    next_index[0] += 1
                prompt, max_tokens, expected = cases[i % len(cases)]
                result = session.request(generate_inputs(prompt, max_tokens, ignore_eos), request_id=f"load-{i}")
                with lock:
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
    return LoadResult(requests, concurrency, len(errors), mismatches[0], wall, latencies, first, tokens[0], errors)


def scrape_metrics(metrics_url: str, prefix: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text from Triton's ``/metrics`` -> ``{(name, sorted label pairs): value}`` (names with ``prefix``)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode("utf-8", errors="replace")
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or not line.startswith(prefix):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, ()
        if "{" in head:
            name, _, rest = head.partition("{")
            pairs = []
            for item in _split_labels(rest.rstrip("}")):
                key, _, val = item.partition("=")
                pairs.append((key.strip(), json.loads(val)))
            labels = tuple(sorted(pairs))
        try:
            out[(name, labels)] = float(value)
        except ValueError:
            continue
    return out


def _split_labels(text: str) -> list[str]:
    items, current, quoted, escaped = [], "", False, False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == '"':
            current += ch
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        items.append(current)
    return items
