"""Deployment commands: ``rq export`` (also installed as ``rq-export``), ``rq check``, ``rq build``, ``rq tritonserver``."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from rq.cli.app import command, quiet_transformers
from rq.errors import RQError

export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                         help="Trace the R&Q model to ONNX (the same as `rq export`).")


@command("export")
def export(
    model_dir: Annotated[Path, typer.Argument(help="Local Hugging Face checkpoint the plan was made for.")],
    plan: Annotated[Path, typer.Option("--plan", help="plan.json from `rq plan`.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Folder: the build (model.onnx, model.ort.onnx, genai_config.json, manifest, parity).")
    ] = Path("build"),
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    dtype: Annotated[str, typer.Option(help="Activation dtype of the exported graphs: float32 or float16.")] = "float32",
    check: Annotated[bool, typer.Option(
        help="Run the Polygraphy parity check (ONNX Runtime vs PyTorch) after export.")] = True,
    keep_failed: Annotated[bool, typer.Option(help="On failure keep the attempt at OUT.failed for debugging.")] = False,
    tritonserver: Annotated[Optional[Path], typer.Option("--tritonserver", "--triton",
                                                         help="Also write a Triton Inference Server model repository "
                                                              "here (folder; --triton is its former name).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow checkpoints that ship their own modeling code.")] = False,
    stream: Annotated[str, typer.Option(help="always: one decoder layer in memory at a time (same files); never: "
                                             "load the whole model; auto: stream unless the model fits in memory "
                                             "several times over. The check runs layer by layer where the export "
                                             "does not fit.")] = "auto",
    ort_int8_activations: Annotated[bool, typer.Option(
        help="ONNX Runtime's fused route (model.ort.onnx, model.genai.onnx) runs the INT4 experts on int8 "
             "activations (QMoE accuracy_level 4): faster prefill on CPU, approximate (checked by KL and top-1, "
             "docs/spec.md §9).")] = False,
) -> None:
    """Trace the R&Q model to ONNX with one rq::RQMoE node per MoE layer (plus ONNX Runtime's fused route), and
    check both files against PyTorch; nothing is written to OUT unless all of it succeeds."""
    from rq.export import export_model
    from rq.export.api import ExportCheckFailed

    quiet_transformers()
    try:
        result = export_model(model_dir, plan, out, force=force, dtype=dtype, check=check,
                              trust_remote_code=trust_remote_code, keep_failed=keep_failed, stream=stream,
                              ort_int8_activations=ort_int8_activations)
    except ExportCheckFailed as err:
        typer.echo(err.report.summary())
        raise
    size = sum(result.sizes.values())
    typer.echo(f"exported {len(result.files)} files ({size / 2**20:.1f} MiB) to {out} in {result.seconds:.0f} s")
    for note in result.manifest.get("notes", []):
        typer.echo(note)
    if result.parity is not None:
        typer.echo(result.parity.summary())
    if tritonserver is not None:
        from rq.engines.tritonserver import write_model_repository

        write_model_repository(out, tritonserver, force=force)
        typer.echo(f"Triton Inference Server model repository written to {tritonserver}")


@command()
def check(
    build: Annotated[Path, typer.Argument(help="Output folder of rq-export.")] = Path("build"),
    trt: Annotated[bool, typer.Option(
        "--trt", help="Check the TensorRT engines (BUILD/engine.plan) instead of ONNX Runtime.")] = False,
    plugin: Annotated[Optional[Path], typer.Option(help="With --trt: load this librq_moe_plugin.so instead of the one "
                                                        "the engine carries.")] = None,
    engine: Annotated[Optional[Path], typer.Option(
        help="With --trt: the plan to run (default BUILD/engine.plan).")] = None,
    stream: Annotated[str, typer.Option(help="always: one decoder layer's ONNX Runtime session at a time (a model "
                                             "bigger than memory); never: one session per file; auto: layer by "
                                             "layer unless the export fits in memory several times over.")] = "auto",
) -> None:
    """Polygraphy parity: ONNX Runtime (or TensorRT with --trt, on a GPU) vs the PyTorch R&Q reference (docs/spec.md §9)."""
    if trt:
        from rq.engines.tensorrt import check_engines

        report = check_engines(build, plugin, engine)
    else:
        from rq.export import check_export
        from rq.export.parity import checks_layerwise

        report = check_export(build, layerwise=checks_layerwise(build, stream), show_progress=True)
    typer.echo(report.summary())
    if not report.passed:
        raise typer.Exit(1)


def _parse_dims(items: list[str]) -> dict[str, tuple[int, int, int]]:
    dims = {}
    for item in items:
        name, _, spec = item.partition("=")
        parts = spec.split(":")
        if not name or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise RQError(f"--dim {item!r}: write NAME=MIN:OPT:MAX, e.g. past_seq=0:512:4096")
        dims[name] = tuple(int(p) for p in parts)
    return dims


@command()
def build(
    onnx_path: Annotated[Path, typer.Argument(
        help="The exported model.onnx (or encoder/decoder.onnx).")] = Path("build/model.onnx"),
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="File: the engine to write (default: engine.plan beside model.onnx).")] = None,
    plugin: Annotated[Path, typer.Option(
        help="The RQMoE plugin library (plugins/).")] = Path("build/plugins/librq_moe_plugin.so"),
    target: Annotated[Optional[str], typer.Option(help="TensorRT-RTX only: compute capabilities to build for, e.g. "
                                                       "sm86,sm89 (default: every one the plugin's cubins run on)."
                                                  )] = None,
    max_batch: Annotated[int, typer.Option(help="Largest batch the engine accepts.")] = 8,
    max_seq: Annotated[int, typer.Option(
        help="Most new tokens per call (prefill length; encoder input length).")] = 2048,
    max_cache: Annotated[int, typer.Option(help="Most cached tokens (past_seq).")] = 2048,
    dim: Annotated[list[str], typer.Option(
        help="Range of any dynamic dimension of the file: NAME=MIN:OPT:MAX (repeatable).")] = [],
    workspace_gib: Annotated[Optional[float], typer.Option(help="Builder workspace limit in GiB.")] = None,
    verbose: Annotated[bool, typer.Option(help="Print TensorRT's warnings and errors.")] = False,
) -> None:
    """Build a TensorRT engine with the RQMoE plugin inside (full TensorRT >= 10.7 on its GPU, or TensorRT-RTX >= 1.7
    ahead of time, no GPU needed; see docs/tensorrt.md)."""
    from rq.engines.tensorrt import ProfileLimits, build_engine, parse_targets
    from rq.atomic import check_out_file

    if out is not None:
        check_out_file(out)
    limits = ProfileLimits(max_batch, max_seq, max_cache, _parse_dims(dim))
    result = build_engine(onnx_path, out, plugin, targets=parse_targets(target), limits=limits,
                          workspace_gib=workspace_gib, verbose=verbose)
    typer.echo(result.summary())


@command("tritonserver", aliases=("triton",))
def tritonserver(
    build_dir: Annotated[Path, typer.Argument(help="Output folder of rq-export.")] = Path("build"),
    out: Annotated[Path, typer.Option(
        "--out", help="Folder: the Triton model repository to write.")] = Path("model_repository"),
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    engine: Annotated[Optional[Path], typer.Option(help="TensorRT engine to serve as well (rq build).")] = None,
    plugin: Annotated[Optional[Path], typer.Option(help="Plugin library shipped beside the engine.")] = None,
    instances: Annotated[int, typer.Option(help="Model instances per Python-backend model.")] = 1,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads per instance (0 = default).")] = 0,
    providers: Annotated[str, typer.Option(
        help="ONNX Runtime providers, comma separated.")] = "CPUExecutionProvider",
    max_context: Annotated[int, typer.Option(help="Longest prompt + generation the generate model accepts.")] = 2048,
    offsets_scope: Annotated[str, typer.Option(help="Replica offsets rotate per request or per instance.")] = "request",
) -> None:
    """Write a Triton Inference Server model repository (ONNX Runtime model, streaming generate model)."""
    from rq.engines.tritonserver import ServingOptions, write_model_repository

    options = ServingOptions(instances=instances, intra_op_threads=threads, providers=providers,
                             max_context=max_context, offsets_scope=offsets_scope)
    repo = write_model_repository(build_dir, out, options, force=force, engine_plan=engine, plugin_lib=plugin)
    typer.echo(f"model repository written to {repo}")


command(target=export_app)(export)
