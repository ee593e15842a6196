"""Deployment commands: ``rq export`` (also installed as ``rq-export``), ``rq check``, ``rq build``, ``rq tritonserver``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rq.cli.app import command, quiet_transformers
from rq.errors import RQError

export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                         help="Trace the R&Q model to ONNX (the same as `rq export`).")


@command("export")
def export(
    model_dir: Path = typer.Argument(..., help="Local Hugging Face checkpoint the plan was made for."),
    plan: Path = typer.Option(..., "--plan", help="plan.json from `rq plan`."),
    out: Path = typer.Option(
        Path("build"), "--out", help="Folder: the build (model.onnx, model.ort.onnx, genai_config.json, manifest, parity)."),
    force: bool = typer.Option(False, help="Replace a non-empty --out folder."),
    dtype: str = typer.Option("float32", help="Activation dtype of the exported graphs: float32 or float16."),
    check: bool = typer.Option(True, help="Run the Polygraphy parity check (ONNX Runtime vs PyTorch) after export."),
    keep_failed: bool = typer.Option(False, help="On failure keep the attempt at OUT.failed for debugging."),
    tritonserver: Optional[Path] = typer.Option(None, "--tritonserver", "--triton",
                                                help="Also write a Triton Inference Server model repository here "
                                                     "(folder; --triton is its former name)."),
    trust_remote_code: bool = typer.Option(False, help="Allow checkpoints that ship their own modeling code."),
) -> None:
    """Trace the R&Q model to ONNX with one rq::RQMoE node per MoE layer (plus ONNX Runtime's fused route), and
    check both files against PyTorch; nothing is written to OUT unless all of it succeeds."""
    from rq.export import export_model
    from rq.export.api import ExportCheckFailed

    quiet_transformers()
    try:
        result = export_model(model_dir, plan, out, force=force, dtype=dtype, check=check,
                              trust_remote_code=trust_remote_code, keep_failed=keep_failed)
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
    build: Path = typer.Argument(Path("build"), help="Output folder of rq-export."),
    trt: bool = typer.Option(False, "--trt", help="Check the TensorRT engines (BUILD/engine.plan) instead of ONNX Runtime."),
    plugin: Optional[Path] = typer.Option(None, help="With --trt: load this librq_moe_plugin.so instead of the one "
                                                     "the engine carries."),
    engine: Optional[Path] = typer.Option(None, help="With --trt: the plan to run (default BUILD/engine.plan)."),
) -> None:
    """Polygraphy parity: ONNX Runtime (or TensorRT with --trt, on a GPU) vs the PyTorch R&Q reference (docs/spec.md §9)."""
    if trt:
        from rq.engines.tensorrt import check_engines

        report = check_engines(build, plugin, engine)
    else:
        from rq.export import check_export

        report = check_export(build)
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
    onnx_path: Path = typer.Argument(Path("build/model.onnx"), help="The exported model.onnx (or encoder/decoder.onnx)."),
    out: Optional[Path] = typer.Option(None, "--out", help="File: the engine to write (default: engine.plan beside model.onnx)."),
    plugin: Path = typer.Option(Path("build/plugins/librq_moe_plugin.so"), help="The RQMoE plugin library (plugins/)."),
    target: Optional[str] = typer.Option(None, help="TensorRT-RTX only: compute capabilities to build for, e.g. "
                                                    "sm86,sm89 (default: every one the plugin's cubins run on)."),
    max_batch: int = typer.Option(8, help="Largest batch the engine accepts."),
    max_seq: int = typer.Option(2048, help="Most new tokens per call (prefill length; encoder input length)."),
    max_cache: int = typer.Option(2048, help="Most cached tokens (past_seq)."),
    dim: list[str] = typer.Option([], help="Range of any dynamic dimension of the file: NAME=MIN:OPT:MAX (repeatable)."),
    workspace_gib: Optional[float] = typer.Option(None, help="Builder workspace limit in GiB."),
    verbose: bool = typer.Option(False, help="Print TensorRT's warnings and errors."),
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
    build_dir: Path = typer.Argument(Path("build"), help="Output folder of rq-export."),
    out: Path = typer.Option(Path("model_repository"), "--out", help="Folder: the Triton model repository to write."),
    force: bool = typer.Option(False, help="Replace a non-empty --out folder."),
    engine: Optional[Path] = typer.Option(None, help="TensorRT engine to serve as well (rq build)."),
    plugin: Optional[Path] = typer.Option(None, help="Plugin library shipped beside the engine."),
    instances: int = typer.Option(1, help="Model instances per Python-backend model."),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads per instance (0 = default)."),
    providers: str = typer.Option("CPUExecutionProvider", help="ONNX Runtime providers, comma separated."),
    max_context: int = typer.Option(2048, help="Longest prompt + generation the generate model accepts."),
    offsets_scope: str = typer.Option("request", help="Replica offsets rotate per request or per instance."),
) -> None:
    """Write a Triton Inference Server model repository (ONNX Runtime model, streaming generate model)."""
    from rq.engines.tritonserver import ServingOptions, write_model_repository

    options = ServingOptions(instances=instances, intra_op_threads=threads, providers=providers,
                             max_context=max_context, offsets_scope=offsets_scope)
    repo = write_model_repository(build_dir, out, options, force=force, engine_plan=engine, plugin_lib=plugin)
    typer.echo(f"model repository written to {repo}")


command(target=export_app)(export)
