"""``rq build`` for real: TensorRT engines of the demo export and of every architecture's tiny export, built on this
machine (TensorRT-RTX's ahead-of-time build needs no GPU) with the session's plugin (tests/conftest.py).

Each engine must have one RQMoE plugin layer per MoE layer (TensorRT's own layer information) and carry the plugin
library. Running an engine needs a GPU: ``rq check --trt`` is exercised end to end by benchmarks/gpu/run.sh; here
its comparison and report run with ONNX Runtime standing in for the engine.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from rq.cli.main import app
from rq.engines import tensorrt as trt_engine
from rq.errors import RQError
from rq.testing.tiny import TINY_ARCHS

TARGETS = [80, 86]  # 8.x: the session plugin's sm_80 cubins run there
SMALL = trt_engine.ProfileLimits(max_batch=4, max_seq=128, max_cache=128)


@pytest.fixture(scope="module")
def tensorrt():
    try:
        return trt_engine.load_tensorrt()
    except RQError as err:
        pytest.skip(str(err))


def _check(build: trt_engine.EngineBuild, moe_layers: int) -> None:
    assert build.path.is_file() and build.path.stat().st_size == build.size
    assert build.layers is not None, "TensorRT printed no layer information"
    assert len(build.rq_nodes) == moe_layers
    assert sorted(n for l in build.plugin_layers() for n in l.onnx_nodes) == sorted(build.rq_nodes)
    assert len(build.plugin_layers()) == moe_layers, [l.name for l in build.plugin_layers()]
    assert build.plugin_embedded


def test_demo_engine(demo_export, rq_plugin, tensorrt, tmp_path):
    result, _plan = demo_export
    out = tmp_path / "engine.plan"
    cli = CliRunner().invoke(app, ["build", str(result.out_dir / "model.onnx"), "--plugin", str(rq_plugin.library),
                                   "--out", str(out), "--target", "sm80,sm86,sm89"])
    assert cli.exit_code == 0, cli.output
    n = result.manifest["num_moe_layers"]
    assert f"{n} RQMoE plugin layers for {n} MoE layers; plugin library embedded" in cli.output
    assert "for sm80, sm86, sm89" in cli.output and out.is_file()
    library = rq_plugin.library.read_bytes()
    assert library[len(library) // 3: len(library) // 3 + 65536] in out.read_bytes(), "the plan carries the plugin"


@pytest.mark.parametrize("arch,dtype", [(a, "float32") for a in TINY_ARCHS] + [("mixtral", "float16")])
def test_tiny_engines(arch, dtype, exported, rq_plugin, tensorrt, tmp_path):
    """Strongly typed: the float16 export gives an FP16 engine, with the plugin's FP16 kernels."""
    result = exported(arch, dtype)
    for graph in result.manifest["graphs"].values():
        onnx_path = result.out_dir / graph["file"]
        build = trt_engine.build_engine(onnx_path, tmp_path / f"{graph['file']}.plan", rq_plugin.library,
                                        targets=TARGETS, limits=SMALL)
        _check(build, len(graph["moe_layers"]))
        assert build.targets == TARGETS and build.runtime == str(tensorrt)


def test_mixed_precision_engine(mixed_export, rq_plugin, tensorrt, tmp_path):
    """A plan mixing original, INT8 and INT4 copies: every node carries the INT8 class (14 inputs), and each MoE
    layer becomes one RQMoE plugin layer, through `rq build` as for INT4-only plans."""
    plan, result = mixed_export
    assert 2 in rq_plugin.info["precisions"]
    assert any(2 in layer.precision for layer in plan.layers) and any(1 in layer.precision for layer in plan.layers)
    for graph in result.manifest["graphs"].values():
        onnx_path = result.out_dir / graph["file"]
        build = trt_engine.build_engine(onnx_path, tmp_path / f"{graph['file']}.plan", rq_plugin.library,
                                        targets=TARGETS, limits=SMALL)
        _check(build, len(graph["moe_layers"]))
    out = tmp_path / "engine.plan"
    cli = CliRunner().invoke(app, ["build", str(result.out_dir / "model.onnx"), "--plugin", str(rq_plugin.library),
                                   "--out", str(out), "--target", "sm80", "--max-batch", "2", "--max-seq", "64"])
    assert cli.exit_code == 0, cli.output
    n = result.manifest["num_moe_layers"]
    assert f"{n} RQMoE plugin layers for {n} MoE layers; plugin library embedded" in cli.output and out.is_file()


def test_a_plugin_without_int8_is_refused_before_building(mixed_export, rq_plugin, monkeypatch, tmp_path):
    """A plugin library built before the INT8 class says so (no ``precisions`` field): one line with the fix."""
    _, result = mixed_export
    old = trt_engine.PluginLibrary(rq_plugin.library, {k: v for k, v in rq_plugin.info.items() if k != "precisions"})
    monkeypatch.setattr(trt_engine, "plugin_library", lambda path: old)
    out = tmp_path / "never.plan"
    cli = CliRunner().invoke(app, ["build", str(result.out_dir / "model.onnx"), "--plugin", str(rq_plugin.library),
                                   "--out", str(out)])
    assert cli.exit_code == 2 and "has int8 expert copies" in cli.output and "rebuild it" in cli.output, cli.output
    assert "Traceback" not in cli.output and not out.exists()


def test_default_targets_are_those_the_plugin_serves(exported, rq_plugin, tensorrt, tmp_path):
    build = trt_engine.build_engine(exported("mixtral").out_dir / "model.onnx", tmp_path / "e.plan", rq_plugin.library,
                                    limits=SMALL)
    supported = trt_engine.rtx_targets(tensorrt)
    plugin = trt_engine.plugin_library(rq_plugin.library)
    assert build.targets == [t for t in sorted(supported) if plugin.runs_on(t)] and build.targets


def test_build_errors_are_one_line(exported, rq_plugin, tensorrt, tmp_path):
    model = exported("qwen3_moe").out_dir / "model.onnx"
    cases = [
        (["--plugin", str(tmp_path / "missing.so")], "plugin library", "not found: build it with `cmake -S plugins"),
        (["--plugin", str(rq_plugin.host_test)], "is not rq's RQMoE plugin library", ""),
        (["--plugin", str(rq_plugin.library), "--target", "sm90"], "--target sm90 is not a target of TensorRT-RTX",
         "use full TensorRT on that GPU"),
        (["--plugin", str(rq_plugin.library), "--target", "sm120"], "has no cubins that run on sm120",
         "-DRQ_CUDA_ARCHS including 120"),
        (["--plugin", str(rq_plugin.library), "--dim", "seq=9:1:2"], "dimension seq: need 0 <= min <= opt <= max", ""),
    ]
    for args, problem, fix in cases:
        out = tmp_path / "never.plan"
        cli = CliRunner().invoke(app, ["build", str(model), "--out", str(out), *args])
        assert cli.exit_code == 2, cli.output
        assert problem in cli.output and fix in cli.output and "Traceback" not in cli.output, cli.output
        assert not out.exists() and not list(tmp_path.glob(".never.plan*")), "no partial output"
    cli = CliRunner().invoke(app, ["build", str(tmp_path / "none.onnx"), "--plugin", str(rq_plugin.library)])
    assert cli.exit_code == 2 and "does not exist; export first" in cli.output


def test_check_trt_compares_and_reports_like_onnx_runtime(exported, rq_plugin, tensorrt, monkeypatch, tmp_path):
    """``rq check --trt``'s feeds, comparison and report, with ONNX Runtime running model.onnx in the engine's place
    (no GPU here to run the engine itself)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    build = tmp_path / "build"
    shutil.copytree(exported("mixtral").out_dir, build)
    cli = CliRunner().invoke(app, ["check", str(build), "--trt"])
    assert cli.exit_code == 2 and "engine.plan does not exist; build it with `rq build" in cli.output, cli.output
    trt_engine.build_engine(build / "model.onnx", None, rq_plugin.library, targets=TARGETS, limits=SMALL)
    assert (build / "engine.plan").is_file()
    if not torch.cuda.is_available():  # the real thing: one line saying why, no traceback
        cli = CliRunner().invoke(app, ["check", str(build), "--trt"])
        assert cli.exit_code == 2 and "could not load" in cli.output and "GPU" in cli.output, cli.output

    def onnx_runtime_instead(rt, engine_path, plugin, name):
        assert engine_path == build / "engine.plan"
        return OnnxrtRunner(SessionFromOnnx(str(build / "model.onnx"), providers=["CPUExecutionProvider"]), name=name)

    monkeypatch.setattr(trt_engine, "_engine_runner", onnx_runtime_instead)
    report = trt_engine.check_engines(build)
    assert report.passed, report.summary()
    assert report.runtime == str(tensorrt) and report.summary().startswith(f"rq check {build}: {tensorrt} vs PyTorch")
    counts = [r for r in report.outputs if r.output.startswith("expert_counts")]
    assert counts and all(r.exact for r in counts)
    assert (build / "parity.tensorrt.json").is_file()
