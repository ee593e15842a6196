"""``export_model``: R&Q model -> ``build/`` (ONNX graphs, manifest, tokenizer, plan, parity data).

The output folder is assembled in a temporary sibling folder and renamed into place at the end, so a
failure never leaves a half-written export behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rq import __version__
from rq.models.adapters import load_model
from rq.atomic import check_out_dir, failed_dir, staged_dir
from rq.calibrate.data import load_tokenizer
from rq.errors import RQError
from rq.memory import release_freed_memory
from rq.export import function, genai, graphs, onnx_file, ort_fused, reference
from rq.export import streamed as streamed_export
from rq.export.attention import use_rq_attention
from rq.export.parity import ParityReport, check_export, checks_layerwise, tolerances
from rq.export.patches import export_patches
from rq.export.runtime import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION
from rq.progress import progress_bar
from rq.rqmodel.model import RQExperts, apply_plan, set_backend
from rq.plan.schema import load_plan

DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_OPSET = function.MIN_OPSET


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: the folder, its manifest, files with sizes, time, parity report."""

    out_dir: Path
    manifest: dict
    files: list[str]  # relative to out_dir
    seconds: float
    parity: ParityReport | None = None  # None when check=False
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes

    @property
    def passed(self) -> bool:
        """True when the parity check ran and passed (False when it was skipped)."""
        return self.parity is not None and self.parity.passed


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _generation_ids(model, tokenizer) -> dict:
    config = model.config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    start = getattr(config, "decoder_start_token_id", None)
    return {"eos_token_id": eos, "pad_token_id": pad if pad is not None else eos,
            "decoder_start_token_id": start if start is not None else pad}


def _manifest(model, adapter, specs: list[graphs.GraphSpec], kv: list[graphs.KVSpec], moe_paths: list[str],
              rq_layers, dtype: str,
              opset: int, tokenizer, plan=None, plan_path: Path | None = None) -> dict:
    """Everything a runtime needs, written before the graphs are traced (I/O names come from the specs).
    ``plan=None`` describes a baseline export of the original model (no R&Q, no ``rq::RQMoE`` nodes)."""
    config = model.config
    num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    layer_graph = {l: spec.name for spec in specs for l in spec.moe_layers}
    plan_info = None if plan is None else {
        "file": "plan.json", "sha256": _sha256(plan_path), "model_fingerprint": plan.model.fingerprint,
        "group_size": plan.quantization.group_size, "budget_factor": plan.budget.budget_factor}
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "tool_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "architecture": config.model_type, "encoder_decoder": adapter.encoder_decoder,
        "dtype": dtype, "opset": opset, "vocab_size": int(config.vocab_size),
        "num_layers": int(num_layers),
        "num_decoder_layers": int(getattr(config, "num_decoder_layers", None) or num_layers),
        "num_moe_layers": len(moe_paths), "rq": plan is not None, "plan": plan_info,
        "op": {"domain": function.DOMAIN, "name": function.OP_NAME, "version": function.VERSION,
               "function": True, "plugin_namespace": function.DOMAIN, "plugin_version": str(function.VERSION)},
        "graphs": {spec.name: {"file": spec.file, "data": spec.file + ".data", "moe_layers": spec.moe_layers,
                               "inputs": [], "outputs": []} for spec in specs},
        "moe_layers": [{
            "index": l, "module": path, "graph": layer_graph[l], "node": f"rq_moe_{l}", **rq.layer.attributes(),
            "offsets_input": f"rq_offsets.{l}", "counts_output": f"expert_counts.{l}",
        } for l, (path, rq) in enumerate(zip(moe_paths, rq_layers))],
        "kv_cache": {
            "num_layers": len(kv), "seq_axis": 2, "layout": "[batch, heads, seq, dim]",
            "layers": [{"key_heads": s.key_heads, "key_dim": s.key_dim, "value_heads": s.value_heads,
                        "value_dim": s.value_dim} for s in kv],
            "past_names": graphs.past_names(len(kv), "past_key_values"),
            "present_names": graphs.past_names(len(kv), "present"),
            "cross_attention": "recomputed from encoder_hidden_states each step" if adapter.encoder_decoder else None,
        },
        "tokenizer": {"dir": ".", "class": type(tokenizer).__name__},
        "generation": _generation_ids(model, tokenizer),
        "tolerances": tolerances(dtype),
    }


def _validate_options(dtype: str, opset: int) -> None:
    if dtype not in DTYPES:
        raise RQError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
    if opset < function.MIN_OPSET:
        raise RQError(f"--opset {opset} is too old: the RQMoE function needs opset >= {function.MIN_OPSET} "
                      f"(INT4 DequantizeLinear)")


def _to_dtype(model, rq_layers, dtype: str) -> None:
    if dtype != "float32":  # Module.to would also cast the float16 INT4 scales: put them back (exact)
        model.to(DTYPES[dtype])
        for rq in rq_layers:
            rq.w_in_scales, rq.w_out_scales = rq.w_in_scales.half(), rq.w_out_scales.half()


WHOLE_MODEL_COPIES = 3  # the whole-model path's peak, in float32 models: the model, its R&Q copies, the trace


def streams(model_dir: Path, stream: str) -> bool:
    """Whether ``rq export --stream`` streams: ``always``/``never``, or ``auto``: stream unless
    :data:`WHOLE_MODEL_COPIES` float32 copies of the model take under half the memory available now (as
    calibrate and eval decide, :meth:`rq.models.streaming.StreamedModel.keep_layers`)."""
    from rq.models.checkpoint import Checkpoint
    from rq.models.streaming import available_memory

    if stream not in ("auto", "always", "never"):
        raise RQError(f"--stream must be auto, always or never, got '{stream}'")
    if stream != "auto":
        return stream == "always"
    # the checkpoint's headers, not a model skeleton: building one (and the allocator setting streaming makes)
    # cost the whole-model path 18 % of its time on the demo and mid-size models
    float32_bytes = 4 * Checkpoint(model_dir).numel()
    available = available_memory()
    return available is None or WHOLE_MODEL_COPIES * float32_bytes >= available // 2


def _write_graphs(model, specs, wrappers, manifest: dict, tmp: Path, opset: int, meta: dict, advance,
                  lazy=None) -> None:
    """Trace and save every graph; ``lazy(ir_model)`` gives a graph traced on fake weights its lazy initializers
    (:mod:`rq.export.streamed`)."""
    for spec in specs:
        with graphs.export_experts(model, wrappers), export_patches(model):
            ir_model = onnx_file.trace(spec, opset, lazy=lazy)
        onnx_file.save(onnx_file.finalize(ir_model, spec, opset, meta), tmp / spec.file)
        manifest["graphs"][spec.name].update(onnx_file.describe_io(tmp / spec.file))
        for layer, names in onnx_file.rq_node_weights(tmp / spec.file).items():
            manifest["moe_layers"][layer]["weights"] = names
        advance(1 / len(specs))


def _write_rest(tokenizer, manifest: dict, tmp: Path, plan_path: Path | None) -> None:
    """The tokenizer (at the top of the folder, where onnxruntime-genai's tokenizer looks) and the plan; the
    manifest records the tokenizer's files."""
    written = tokenizer.save_pretrained(tmp)
    manifest["tokenizer"]["files"] = sorted(Path(p).name for p in written if Path(p).is_file())
    if plan_path is not None:
        shutil.copyfile(plan_path, tmp / "plan.json")


def _write_manifest(manifest: dict, tmp: Path) -> None:
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _result(out_dir: Path, manifest: dict, start: float, parity: ParityReport | None) -> ExportResult:
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    sizes = {f: (out_dir / f).stat().st_size for f in files}
    return ExportResult(out_dir, manifest, files, time.perf_counter() - start, parity, sizes)


class ExportCheckFailed(RQError):
    """The export ran but does not match the PyTorch reference; ``report`` holds the comparison."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report


def _fused_routes(tmp: Path, manifest: dict, shapes: dict[int, tuple[int, int]], int8_activations: bool) -> None:
    """Write ``<graph>.ort.onnx`` (ONNX Runtime's fused route, :mod:`rq.export.ort_fused`) for every graph with
    MoE layers and record the route of each layer in the manifest. Reads only the written files, so it runs
    after the model is gone; ``shapes``: MoE layer -> ``(H, I)``; ``int8_activations``: ``QMoE`` on int8
    activations (recorded as ``ort_int8_activations``, which selects the approximate check, docs/spec.md §9)."""
    manifest["ort_int8_activations"] = int8_activations
    for graph in manifest["graphs"].values():
        if not graph["moe_layers"]:
            continue
        path, routes = ort_fused.write_ort_file(tmp / graph["file"], shapes, manifest["dtype"], int8_activations)
        graph["ort_file"] = path.name  # its initializers are model.onnx's (one data file, each weight once)
        for route in routes:
            manifest["moe_layers"][route.layer]["onnxruntime"] = route.to_json()


def _route_notes(manifest: dict) -> list[str]:
    """What a user should know about the export: the plan's effect and the ONNX Runtime route of each layer."""
    notes = []
    layers = manifest["moe_layers"]
    if layers and all(set(l["copies"]) == {1} and set(l["precision"]) == {0} for l in layers):
        notes.append("the plan changes nothing (no INT4 copy, no replica): the export computes the original model")
    portable = [(l["index"], l["onnxruntime"]["reason"]) for l in layers if l.get("onnxruntime", {}).get("route") ==
                "portable"]
    if layers:
        fused = len(layers) - len(portable)
        line = f"ONNX Runtime route (model.ort.onnx): {fused} of {len(layers)} MoE layers on its fused MoE kernels"
        if portable:
            reasons = sorted({r for _, r in portable})
            line += f"; layers {', '.join(str(i) for i, _ in portable)} keep the portable body ({'; '.join(reasons)})"
        if manifest.get("ort_int8_activations"):
            line += "; QMoE on int8 activations (--ort-int8-activations: approximate, docs/spec.md §9)"
        notes.append(line)
    genai_entry = manifest.get("genai") or {}
    if "file" in genai_entry:
        notes.append(f"onnxruntime-genai: og.Model(folder) runs {genai_entry['file']} (genai_config.json, "
                     f"model.type {genai_entry['type']!r}; replica offsets derived from the step)")
    elif "unsupported" in genai_entry:
        notes.append(f"no onnxruntime-genai model: {genai_entry['unsupported']}")
    return notes


def router_weight_names(model: nn.Module, adapter) -> list[str | None]:
    """Per MoE layer of ``model`` (before the plan replaces its experts), its router weight's parameter name;
    None where the adapter derives the weight from several tensors."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [names.get(id(layer.router_weight)) for layer in adapter.moe_layers(model)]


def _router_weights(model: nn.Module, names: list[str | None]) -> Callable[[int], torch.Tensor | None]:
    """MoE layer ``l``'s router weight as ``model`` holds it when a forward reaches the layer (a streamed
    reference fills each decoder layer on the way), for the reference's near-ties (docs/spec.md §9)."""
    return lambda index: None if names[index] is None else model.get_parameter(names[index])


def _write_rq_export(model_dir: Path, plan, plan_path: Path, tmp: Path, dtype: str, opset: int,
                     trust_remote_code: bool, show_progress: bool) -> tuple[dict, dict[int, tuple[int, int]]]:
    """Load, apply the plan, trace and write the files that need the model into ``tmp``; returns the manifest
    (not yet written) and the ``(H, I)`` of every MoE layer.

    Everything that holds the model lives in this function, so its memory is released before the steps that
    only read the written files (ONNX Runtime's fused route, the parity check's sessions)."""
    model, adapter = load_model(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    attention = use_rq_attention(model)  # reference and graph agree on fully padded rows too
    moe_paths = [layer.path for layer in adapter.moe_layers(model)]
    routers = router_weight_names(model, adapter)
    rq_layers = apply_plan(model, adapter, plan)  # quantizes from the float32 weights the plan was made on
    # the op's definition for every forward here (shape probes, parity data); the fast backend would also
    # keep a float copy of every INT4 version for the rest of the export
    set_backend(model, "reference")
    _to_dtype(model, rq_layers, dtype)
    with progress_bar("exporting", total=3, enabled=show_progress) as advance:
        kv = graphs.kv_specs(model, adapter.encoder_decoder)
        with graphs.export_experts(model) as wrappers:
            specs = graphs.graph_specs(model, wrappers, moe_paths, adapter.encoder_decoder, DTYPES[dtype])
        manifest = _manifest(model, adapter, specs, kv, moe_paths, rq_layers, dtype, opset, tokenizer, plan, plan_path)
        manifest["attention"] = attention
        manifest["parity"] = reference.write_parity_data(model, rq_layers, manifest, tmp / "parity",
                                                         router_weight=_router_weights(model, routers))
        advance(1)
        meta = {"rq.tool_version": __version__, "rq.plan_sha256": manifest["plan"]["sha256"],
                "rq.model_fingerprint": plan.model.fingerprint, "rq.architecture": manifest["architecture"]}
        _write_graphs(model, specs, wrappers, manifest, tmp, opset, meta, advance)
        _write_rest(tokenizer, manifest, tmp, plan_path)
        advance(1)
    return manifest, {l: rq.layer.sizes for l, rq in enumerate(rq_layers)}


@contextlib.contextmanager
def _symbolic_experts():
    """Forward passes of a model with fake weights: its export wrappers emit the ``rq::RQMoE`` call (zeros of the
    right shapes) as they do while traced, instead of running the reference on weights that are not there."""
    saved = torch.onnx.is_in_onnx_export
    torch.onnx.is_in_onnx_export = lambda: True
    try:
        yield
    finally:
        torch.onnx.is_in_onnx_export = saved


EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)
"""Checkpoint types the streamed export reads as they are: float32 holds them exactly, so the plan's INT4 bytes
(quantized in float32, :mod:`rq.core.int4`) and every cast come out as from the float32 model the whole-model
path loads, at a half of its memory for 16-bit checkpoints."""


def _write_rq_export_streamed(model_dir: Path, plan, plan_path: Path, tmp: Path, dtype: str, opset: int,
                              trust_remote_code: bool,
                              show_progress: bool) -> tuple[dict, dict[int, tuple[int, int]]]:
    """:func:`_write_rq_export` with one decoder layer in memory at a time (:mod:`rq.export.streamed`): the same
    files, the graphs traced on fake weights and every initializer written from the checkpoint."""
    from rq.models.streaming import open_streamed
    from rq.plan.validate import check_plan_matches

    streamed = open_streamed(model_dir, dtype="auto", trust_remote_code=trust_remote_code, show_progress=False)
    if streamed.dtype not in EXACT_IN_FLOAT32:
        streamed = open_streamed(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                 show_progress=False)
    adapter = streamed.adapter
    check_plan_matches(streamed.model, adapter, plan, streamed.router_weight)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    torch_dtype = DTYPES[dtype]
    trace_model, trace_rq = streamed_export.rq_skeleton(streamed, plan, torch_dtype)
    ref_model, ref_rq = streamed_export.rq_skeleton(streamed, plan, torch_dtype)
    weights = streamed_export.ExportWeights(streamed, plan, ref_model, torch_dtype)
    streamed.drop_resident()  # the export's own copies (in the export's type) are read from the checkpoint
    reference_layers = streamed_export.ReferenceLayers(ref_model, weights, streamed.block_paths)
    attention = use_rq_attention(trace_model)
    use_rq_attention(ref_model)
    set_backend(ref_model, "reference")
    streamed_export.fake_weights(trace_model)
    moe_paths = [layer.path for layer in adapter.moe_layers(streamed.model)]
    try:
        with progress_bar("exporting", total=3, enabled=show_progress) as advance:
            # the trace-time rewrites too: Switch's router casts its classifier in forward, which fake weights refuse
            with graphs.export_experts(trace_model) as wrappers, _symbolic_experts(), export_patches(trace_model):
                kv = graphs.kv_specs(trace_model, adapter.encoder_decoder)
                specs = graphs.graph_specs(trace_model, wrappers, moe_paths, adapter.encoder_decoder, torch_dtype)
            manifest = _manifest(trace_model, adapter, specs, kv, moe_paths, trace_rq, dtype, opset, tokenizer, plan,
                                 plan_path)
            manifest["attention"] = attention
            advance(1)
            meta = {"rq.tool_version": __version__, "rq.plan_sha256": manifest["plan"]["sha256"],
                    "rq.model_fingerprint": plan.model.fingerprint, "rq.architecture": manifest["architecture"]}
            wrapped = [p for p, m in trace_model.named_modules() if isinstance(m, RQExperts)]  # the wrappers' places
            lazy = functools.partial(streamed_export.lazy_program, weights=weights, wrapped=wrapped)
            _write_graphs(trace_model, specs, wrappers, manifest, tmp, opset, meta, advance, lazy=lazy)
            for spec in specs:  # the reference reads the R&Q bytes back from the written file: quantized once
                for layer, names in onnx_file.rq_node_weights(tmp / spec.file).items():
                    rq = ref_rq[layer]
                    buffers = {b: getattr(rq, b) for b in names}
                    weights.read_back(layer, streamed_export.data_file_readers(
                        tmp / spec.file, names, {b: t.dtype for b, t in buffers.items()},
                        {b: tuple(t.shape) for b, t in buffers.items()}))
            manifest["parity"] = reference.write_parity_data(ref_model, ref_rq, manifest, tmp / "parity",
                                                             router_weight=_router_weights(
                                                                 ref_model, router_weight_names(streamed.model, adapter)))
            _write_rest(tokenizer, manifest, tmp, plan_path)
            advance(1)
    finally:
        reference_layers.close()
    return manifest, {l: rq.layer.sizes for l, rq in enumerate(trace_rq)}


def export_model(model_dir: str | Path, plan_path: str | Path, out_dir: str | Path, *, force: bool = False,
                 dtype: str = "float32", check: bool = True, trust_remote_code: bool = False,
                 show_progress: bool = True, opset: int = DEFAULT_OPSET, keep_failed: bool = False,
                 stream: str = "auto", ort_int8_activations: bool = False) -> ExportResult:
    """Export the R&Q model (``model_dir`` with ``plan_path`` applied) to ONNX in ``out_dir``.

    Writes ``model.onnx`` (+ ``.data``; ``encoder.onnx``/``decoder.onnx`` for encoder-decoder models) with
    ``rq::RQMoE`` nodes and their portable body (TensorRT and any ONNX runtime), ``model.ort.onnx`` (ONNX
    Runtime's fused route, reading ``model.onnx.data``), ``model.genai.onnx`` + ``genai_config.json``
    (onnxruntime-genai, decoder-only models), ``manifest.json``, ``plan.json``, the tokenizer files and
    ``parity/`` (reference outputs), then, when ``check``, runs :func:`rq.export.check_export` on both files
    (writes ``parity.json``). All of it is assembled in a staged folder and renamed to ``out_dir`` only when
    it succeeded: a failure (bad input, an export or ONNX Runtime error, a failed parity check:
    :class:`ExportCheckFailed`) raises :class:`RQError` and leaves ``out_dir`` untouched; ``keep_failed``
    keeps the attempt at ``<out_dir>.failed`` for debugging. ``stream``: ``always`` keeps one decoder layer in
    memory at a time (:mod:`rq.export.streamed`; the same files), ``never`` loads the whole model, ``auto``
    streams unless the model fits in memory several times over (:func:`streams`). The check runs one decoder
    layer's sessions at a time (:mod:`rq.export.layerwise`) when the export does not fit in memory twice over
    (:func:`rq.export.parity.checks_layerwise`). ``ort_int8_activations``: the fused route's ``QMoE`` nodes
    quantize their activations to int8 (faster prefill on CPU, approximate: :data:`rq.export.ort_fused.INT8_ACTIVATIONS_LEVEL`).
    """
    start = time.perf_counter()
    model_dir, plan_path, out_dir = Path(model_dir), Path(plan_path), Path(out_dir)
    _validate_options(dtype, opset)
    check_out_dir(out_dir, force)
    plan = load_plan(plan_path)
    write = _write_rq_export_streamed if streams(model_dir, stream) else _write_rq_export
    kept = f"; the attempt is kept at {failed_dir(out_dir)}" if keep_failed else \
        f"; nothing was written to {out_dir} (--keep-failed keeps the attempt for debugging)"
    try:
        with staged_dir(out_dir, keep_failed=keep_failed) as tmp:
            manifest, shapes = write(model_dir, plan, plan_path, tmp, dtype, opset, trust_remote_code, show_progress)
            release_freed_memory()  # the model: the rest only reads the files
            _fused_routes(tmp, manifest, shapes, ort_int8_activations)
            manifest["genai"] = genai.write_genai(tmp, manifest, model_dir)
            manifest["notes"] = _route_notes(manifest)
            _write_manifest(manifest, tmp)
            parity = check_export(tmp, label=out_dir, layerwise=checks_layerwise(tmp, "auto"),
                                  show_progress=show_progress) if check else None
            if parity is not None and not parity.passed:
                failed = len(parity.failures())
                raise ExportCheckFailed(f"the export does not match the PyTorch reference ({failed} of "
                                        f"{len(parity.outputs)} outputs out of tolerance){kept}", parity)
    except ExportCheckFailed:
        raise
    except RQError as err:
        raise RQError(f"{err}{kept if keep_failed else ''}") from None
    return _result(out_dir, manifest, start, parity)


def export_baseline(model_dir: str | Path, out_dir: str | Path, *, force: bool = False, dtype: str = "float32",
                    trust_remote_code: bool = False, show_progress: bool = True,
                    opset: int = DEFAULT_OPSET) -> ExportResult:
    """The original model without R&Q, in the same layout (``model.onnx`` + ``manifest.json``; no parity data),
    for size and speed comparisons; its experts are Hugging Face's ``batched_mm`` implementation in plain ops.
    Decoder-only families with fused experts only. :class:`OrtGenerator` runs it (no loads are reported)."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _validate_options(dtype, opset)
    check_out_dir(out_dir, force)
    with staged_dir(out_dir) as tmp:
        manifest = _write_baseline(model_dir, tmp, dtype, opset, trust_remote_code, show_progress)
    return _result(out_dir, manifest, start, None)


def _write_baseline(model_dir: Path, tmp: Path, dtype: str, opset: int, trust_remote_code: bool,
                    show_progress: bool) -> dict:
    model, adapter = load_model(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if adapter.encoder_decoder:
        raise RQError(f"baseline export supports decoder-only models, not {model.config.model_type}")
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    attention = use_rq_attention(model)
    try:
        model.set_experts_implementation("batched_mm")  # the default (grouped_mm / eager loops) does not export
    except (ValueError, AttributeError) as err:
        raise RQError(f"{model.config.model_type} has no exportable experts implementation ({err})") from None
    _to_dtype(model, [], dtype)
    with progress_bar("exporting", total=2, enabled=show_progress) as advance:
        kv = graphs.kv_specs(model, False)
        specs = graphs.graph_specs(model, [], [], False, DTYPES[dtype])
        manifest = _manifest(model, adapter, specs, kv, [], [], dtype, opset, tokenizer)
        manifest["attention"] = attention
        meta = {"rq.tool_version": __version__, "rq.architecture": manifest["architecture"], "rq.baseline": "1"}
        _write_graphs(model, specs, [], manifest, tmp, opset, meta, advance)
        _write_rest(tokenizer, manifest, tmp, None)
        manifest["genai"] = genai.write_genai(tmp, manifest, model_dir)
        _write_manifest(manifest, tmp)
        advance(1)
    return manifest
