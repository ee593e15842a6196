"""Triton Inference Server deployment of an R&Q export (docs/tritonserver.md).

- :func:`write_model_repository` ``(build_dir, repo_dir, ...)``: an ``rq-export`` build folder -> a Triton model
  repository (``config.pbtxt`` + versioned folders), written atomically:

  ``rq_onnx``      the R&Q ONNX graph for Triton's ONNX Runtime backend (``platform: "onnxruntime_onnx"``); the
                   ``rq::RQMoE`` nodes run through the file's model-local function, which stock ONNX Runtime
                   executes. Its version folder also holds the export's manifest, plan and tokenizer, which the
                   Python models below read (``rq_build_dir`` = ``rq_onnx/{version}``: version N of a Python model
                   reads version N of ``rq_onnx``, so a re-plan publishes as N+1 beside N, :mod:`rq.replan`), so
                   the weights are stored once.
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
- :func:`repository_info`: what :func:`write_model_repository` wrote.

Starting a local ``tritonserver`` and talking to it (tests, benchmarks) is :mod:`rq.testing.tritonserver`.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rq.atomic import check_out_dir, staged_dir
from rq.documents import check_format, read_json
from rq.errors import RQError

TEMPLATES = Path(__file__).resolve().parent / "tritonserver_models"
REPOSITORY_INFO = "rq_repository.json"
REPOSITORY_FORMAT, REPOSITORY_VERSION = "rq-triton-repository", 1
GENERATE = "generate"
ONNX_MODEL = "rq_onnx"
FORWARD_MODEL = "rq_forward"
TRT_MODEL = "rq_trt"
VERSION_FIELD = "{version}"  # in ``rq_build_dir``: replaced by the model version that reads it

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
    keys = ("file", "data", "ort_file", "ort_data")  # ort_data: exports made before model.ort.onnx shared the data
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


def _forward_config(name: str, graph_name: str, graph: dict, build_rel: str, opts: ServingOptions) -> str:
    config = {
        "name": name, "backend": "python", "max_batch_size": 0,
        "input": [_tensor(t) for t in graph["inputs"]],
        "output": [_tensor(t) for t in graph["outputs"]],
        "instance_group": [{"count": opts.instances, "kind": _Enum("KIND_CPU")}],
        "parameters": {"rq_build_dir": build_rel, "graph": graph_name, **opts.runtime_parameters()},
    }
    return ("# rq: one call of the R&Q graph through ONNX Runtime in the Python backend (same tensors as the\n"
            "# ONNX Runtime backend model), with live expert-load metrics.\n" + _pbtxt(config))


def _generate_config(manifest: dict, build_rel: str, opts: ServingOptions) -> str:
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
class ServingOptions:
    """How the repository's models serve; checked when made, so a bad value fails before anything is written.

    instances: model instances of each Python model (each is a process with its own ONNX Runtime session);
    intra_op_threads: ONNX Runtime threads per instance (0: its default); providers: ONNX Runtime execution
    providers of the Python models (e.g. ``("CUDAExecutionProvider", "CPUExecutionProvider")``; a comma-separated
    string from a command line is split); max_context: prompt + generated tokens per request;
    default_max_tokens / max_tokens_limit: the ``generate`` model's default and largest ``max_tokens``;
    offsets_scope: ``"request"`` (replica offsets restart at zero per request: reproducible) or ``"instance"``
    (they keep rotating across requests); forward_model: also write ``rq_forward``; metrics: export load
    telemetry (docs/tritonserver.md); drift_threshold: windowed LIS over copies / the plan's predicted LIS above
    which an instance logs that traffic has drifted (``rq_moe_plan_drift``).
    """

    instances: int = 1
    intra_op_threads: int = 0
    providers: tuple[str, ...] | str = ("CPUExecutionProvider",)
    max_context: int = 2048
    default_max_tokens: int = 16
    max_tokens_limit: int = 512
    offsets_scope: str = "request"
    forward_model: bool = True
    metrics: bool = True
    drift_threshold: float = 1.25

    def __post_init__(self) -> None:
        if isinstance(self.providers, str):
            object.__setattr__(self, "providers", tuple(p.strip() for p in self.providers.split(",") if p.strip()))
        if self.offsets_scope not in ("request", "instance"):
            raise RQError(f"offsets_scope must be 'request' or 'instance', got {self.offsets_scope!r}")
        if (self.instances < 1 or self.intra_op_threads < 0 or self.max_context < 2
                or not 1 <= self.default_max_tokens <= self.max_tokens_limit or not self.providers
                or not self.drift_threshold >= 1.0):
            raise RQError(f"invalid serving options (instances {self.instances}, intra_op_threads "
                          f"{self.intra_op_threads}, max_context {self.max_context}, default_max_tokens "
                          f"{self.default_max_tokens}, max_tokens_limit {self.max_tokens_limit}, providers "
                          f"{list(self.providers)}, drift_threshold {self.drift_threshold}): need instances >= 1, threads >= 0, "
                          f"max_context >= 2, 1 <= default_max_tokens <= max_tokens_limit, at least one provider, "
                          f"drift_threshold >= 1")

    def runtime_parameters(self) -> dict[str, str]:
        return {"providers": ",".join(self.providers), "intra_op_threads": str(self.intra_op_threads),
                "metrics": "true" if self.metrics else "false", "lis_window": "64", "metrics_flush_every": "16",
                "drift_threshold": repr(float(self.drift_threshold))}


@dataclass(frozen=True)
class _Export:
    """What of an ``rq-export`` folder a repository serves, checked complete."""

    build_dir: Path
    manifest: dict
    payload: list[str]  # files of the export placed in the repository (graphs, data, manifest, plan)
    tokenizer_dir: Path

    @property
    def graphs(self) -> dict:
        return self.manifest["graphs"]


@dataclass(frozen=True)
class _Layout:
    """Model names of one repository: one ONNX (and forward) model per graph; the export lives once, in the
    version folder of the decoder's ONNX model (``build_rel``)."""

    onnx: dict[str, str]
    forward: dict[str, str]
    home_graph: str

    @classmethod
    def of(cls, graphs: dict) -> _Layout:
        encoder_decoder = len(graphs) > 1
        return cls(onnx={g: (f"{ONNX_MODEL}_{g}" if encoder_decoder else ONNX_MODEL) for g in graphs},
                   forward={g: (f"{FORWARD_MODEL}_{g}" if encoder_decoder else FORWARD_MODEL) for g in graphs},
                   home_graph="decoder" if "decoder" in graphs else next(iter(graphs)))

    @property
    def build_rel(self) -> str:
        """Where the first version's export lives, relative to the repository root."""
        return f"{self.onnx[self.home_graph]}/1"

    @property
    def build_parameter(self) -> str:
        """The Python models' ``rq_build_dir`` parameter: ``{version}`` is each model's own version, so version
        N of ``generate`` reads the export in version N of the home ONNX model (a published re-plan,
        :mod:`rq.replan`)."""
        return f"{self.onnx[self.home_graph]}/{VERSION_FIELD}"


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


def _read_export(build_dir: Path) -> _Export:
    """The export's manifest and the files a repository needs from it; one line naming what is missing."""
    from rq.export.runtime import load_manifest

    manifest = load_manifest(build_dir)
    payload = ["manifest.json"]
    for graph in manifest["graphs"].values():
        payload += graph_files(graph)
    if (build_dir / "plan.json").is_file():
        payload.append("plan.json")
    missing = [f for f in payload if not (build_dir / f).is_file()]
    tokenizer_dir = build_dir / manifest["tokenizer"]["dir"]
    if not (tokenizer_dir / "tokenizer.json").is_file():
        missing.append(f"{manifest['tokenizer']['dir']}/tokenizer.json")
    if missing:
        raise RQError(f"{build_dir} is incomplete (missing {', '.join(missing)}); re-run rq-export")
    return _Export(build_dir, manifest, payload, tokenizer_dir)


def _check_engine(engine_plan: str | Path | None, plugin_lib: str | Path | None) -> tuple[Path | None, Path | None]:
    if plugin_lib is not None and engine_plan is None:
        raise RQError("a TensorRT plugin library was given without an engine; pass the engine (.plan) too, "
                      "or drop the plugin")
    engine_plan = Path(engine_plan) if engine_plan is not None else None
    plugin_lib = Path(plugin_lib) if plugin_lib is not None else None
    for path, what in ((engine_plan, "TensorRT engine"), (plugin_lib, "plugin library")):
        if path is not None and not path.is_file():
            raise RQError(f"{what} {path} does not exist; build it first (docs/tensorrt.md)")
    return engine_plan, plugin_lib


def _place_export(export: _Export, layout: _Layout, tmp: Path) -> None:
    """The export once, in the home ONNX model's version folder; other graphs' files in their own models."""
    home = tmp / layout.build_rel
    for name in export.payload:
        _place(export.build_dir / name, home / name)
    tokenizer_rel = export.manifest["tokenizer"]["dir"]
    for name in export.manifest["tokenizer"].get("files", []):  # the tokenizer's own files, not the whole folder
        _place(export.tokenizer_dir / name, home / tokenizer_rel / name)
    for g, graph in export.graphs.items():
        if g != layout.home_graph:
            for name in graph_files(graph):
                _place(export.build_dir / name, tmp / layout.onnx[g] / "1" / name)


def _python_model(version: Path, template: str, runtime_source: str | None = None) -> None:
    """A Python-backend model's version folder: the template as ``model.py`` beside the telemetry it imports."""
    version.mkdir(parents=True)
    shutil.copyfile(TEMPLATES / template, version / "model.py")
    shutil.copyfile(TEMPLATES / "rq_telemetry.py", version / "rq_telemetry.py")
    if runtime_source is not None:
        (version / "rq_runtime.py").write_text(runtime_source)


def _models(export: _Export, layout: _Layout, opts: ServingOptions, engine_plan: Path | None,
            plugin_lib: Path | None, tmp: Path) -> dict[str, str]:
    """Every model's ``config.pbtxt`` text, with the Python models' code and the engine placed beside them."""
    from rq.export.runtime import graph_file

    models, runtime = {}, _runtime_source()
    for g, graph in export.graphs.items():
        models[layout.onnx[g]] = _onnx_config(layout.onnx[g], graph, graph_file(graph), 1)
        if opts.forward_model:
            models[layout.forward[g]] = _forward_config(layout.forward[g], g, graph, layout.build_parameter, opts)
            _python_model(tmp / layout.forward[g] / "1", "forward.py", runtime)
    models[GENERATE] = _generate_config(export.manifest, layout.build_parameter, opts)
    _python_model(tmp / GENERATE / "1", "generate.py", runtime)
    if engine_plan is not None:
        _place(engine_plan, tmp / TRT_MODEL / "1" / "model.plan")
        if plugin_lib is not None:
            _place(plugin_lib, tmp / TRT_MODEL / plugin_lib.name)
        models[TRT_MODEL] = _trt_config(plugin_lib.name if plugin_lib is not None else None)
    return models


def _write_configs(models: dict[str, str], tmp: Path) -> None:
    for name, text in models.items():
        try:
            validate_model_config(text)
        except ImportError:
            pass  # tritonclient absent: the text is still generated from typed fields
        (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / name / "config.pbtxt").write_text(text)


def _repository_document(export: _Export, layout: _Layout, opts: ServingOptions, models: dict[str, str],
                         engine_plan: Path | None, plugin_lib: Path | None) -> dict:
    """``rq_repository.json``: what was written from which export, read back by :func:`repository_info`."""
    return {
        "format": REPOSITORY_FORMAT, "version": REPOSITORY_VERSION, "build_dir": str(export.build_dir.resolve()),
        "architecture": export.manifest["architecture"], "plan": export.manifest.get("plan"),
        "models": sorted(models), "onnx_models": [layout.onnx[g] for g in export.graphs], "generate": GENERATE,
        "forward_models": [layout.forward[g] for g in export.graphs] if opts.forward_model else [],
        "tensorrt_model": TRT_MODEL if engine_plan is not None else None,
        "plugin_library": plugin_lib.name if plugin_lib is not None else None,
        "rq_build_dir": layout.build_parameter, "home_model": layout.onnx[layout.home_graph],
        "options": {**asdict(opts), "providers": ",".join(opts.providers)},
        "python_requirements": ["numpy", "onnxruntime (or onnxruntime-gpu)", "tokenizers"],
    }


def write_model_repository(build_dir: str | Path, repo_dir: str | Path, options: ServingOptions = ServingOptions(),
                           *, force: bool = False, engine_plan: str | Path | None = None,
                           plugin_lib: str | Path | None = None) -> Path:
    """Write a Triton model repository for the ``rq-export`` folder ``build_dir`` into ``repo_dir``.

    options: how the models serve (:class:`ServingOptions`). engine_plan / plugin_lib: a TensorRT engine
    (``.plan``) and the ``RQMoE`` plugin library, added as model ``rq_trt`` (the library next to it, loaded with
    ``--backend-config=tensorrt,plugins=...`` or ``LD_PRELOAD``). Every input is checked first; the folder is
    assembled next to ``repo_dir`` and renamed into place; an existing non-empty ``repo_dir`` is refused without
    ``force``. Returns ``repo_dir``.
    """
    build_dir, repo_dir = Path(build_dir), Path(repo_dir)
    export = _read_export(build_dir)
    engine_plan, plugin_lib = _check_engine(engine_plan, plugin_lib)
    templates = [TEMPLATES / f for f in ("generate.py", "forward.py", "rq_telemetry.py")]
    if not all(t.is_file() for t in templates):
        raise RQError(f"rq's Triton model templates are missing from {TEMPLATES}; reinstall rq "
                      f"(they are package data of rq.engines)")
    check_out_dir(repo_dir, force)
    layout = _Layout.of(export.graphs)
    with staged_dir(repo_dir) as tmp:
        _place_export(export, layout, tmp)
        models = _models(export, layout, options, engine_plan, plugin_lib, tmp)
        _write_configs(models, tmp)
        document = _repository_document(export, layout, options, models, engine_plan, plugin_lib)
        (tmp / REPOSITORY_INFO).write_text(json.dumps(document, indent=2) + "\n")
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp is 0700: make the repository readable in containers
            if path.is_dir():
                path.chmod(0o755)
    return repo_dir


def repository_info(repo_dir: str | Path) -> dict:
    """The ``rq_repository.json`` that :func:`write_model_repository` wrote (models, options, source build)."""
    path = Path(repo_dir) / REPOSITORY_INFO
    fix = f"write it again with `rq tritonserver BUILD_DIR --out {repo_dir}`"
    raw = read_json(path, missing=f"{repo_dir} is not an rq Triton repository (no {REPOSITORY_INFO}); write one with "
                                  f"`rq tritonserver BUILD_DIR --out {repo_dir}`", fix=fix)
    return check_format(raw, path, format=REPOSITORY_FORMAT, version=REPOSITORY_VERSION,
                        what="an rq Triton repository", fix=fix)
