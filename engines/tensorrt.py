"""TensorRT engine build and check for an exported R&Q model (docs/tensorrt.md).

``rq::RQMoE`` nodes resolve to the C++ plugin (plugins/, ``librq_moe_plugin.so``) whose library is
serialized into the engine (``plugins_to_serialize``), so the plan file runs without shipping the
library separately. TensorRT and Polygraphy are optional: without them every entry point raises one
clear :class:`TensorRTUnavailable` line saying how to get them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

INSTALL_HINT = (
    "TensorRT is not installed: `pip install tensorrt` (NVIDIA's wheels, CUDA 12/13 builds) or run inside the "
    "NGC container nvcr.io/nvidia/tensorrt; see docs/tensorrt.md"
)
POLYGRAPHY_HINT = "Polygraphy is not installed: `pip install polygraphy` (it ships with the NGC TensorRT container)"

Range = tuple[int, int, int]
DEFAULT_PROFILES: list[dict[str, Range]] = [
    {"batch": (1, 1, 8), "seq": (1, 1, 8)},  # decode: a few tokens per step
    {"batch": (1, 1, 8), "seq": (1, 512, 4096)},  # prefill
]
"""One optimization profile per dict: symbolic ONNX dimension name -> (min, opt, max)."""


class TensorRTUnavailable(ImportError):
    """TensorRT (or Polygraphy) is missing; the message says how to install it."""


def _tensorrt() -> Any:
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as exc:
        raise TensorRTUnavailable(INSTALL_HINT) from exc
    return trt


def input_dim_names(onnx_path: str | Path) -> dict[str, list[str | int]]:
    """Per graph input, each dimension as its symbolic name (``dim_param``) or fixed size (weights not loaded)."""
    import onnx  # noqa: PLC0415

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    dims: dict[str, list[str | int]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims[value.name] = [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
    return dims


def profile_shapes(dims: Mapping[str, Sequence[str | int]], profile: Mapping[str, Any]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) shape of every input for one profile.

    ``profile`` maps a symbolic dimension name to ``(min, opt, max)``, or an input name to three full shapes.
    """
    shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for name, ds in dims.items():
        if name in profile:
            lo, opt, hi = profile[name]
            shapes[name] = (list(lo), list(opt), list(hi))
            continue
        missing = [d for d in ds if isinstance(d, str) and d not in profile]
        if missing:
            raise ValueError(f"profile {dict(profile)} has no range for dimension(s) {missing} of input {name!r} "
                             f"(shape {list(ds)})")
        shapes[name] = tuple([d if isinstance(d, int) else profile[d][i] for d in ds] for i in range(3))  # type: ignore[assignment]
    return shapes


def build_engine(
    onnx_path: str | Path,
    out_path: str | Path,
    plugin_lib: str | Path,
    fp16: bool = True,
    profiles: Sequence[Mapping[str, Any]] | None = None,
    workspace_gib: float | None = None,
    verbose: bool = False,
) -> Path:
    """Build a serialized TensorRT engine (``.plan``) from an R&Q ONNX file.

    onnx_path: the TensorRT flavour of the export (``rq::RQMoE`` nodes with ``plugin_namespace="rq"``);
    plugin_lib: ``librq_moe_plugin.so``, loaded into the registry and serialized with the engine;
    profiles: optimization profiles (see :data:`DEFAULT_PROFILES`). Returns ``out_path``.
    """
    trt = _tensorrt()
    onnx_path, out_path, plugin_lib = Path(onnx_path), Path(out_path), Path(plugin_lib)
    if not plugin_lib.is_file():
        raise FileNotFoundError(f"plugin library {plugin_lib} not found: build it with cmake (docs/tensorrt.md)")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    trt.get_plugin_registry().load_library(str(plugin_lib))
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    override = getattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE", None)
    if override is not None:  # prefer the registered plugin over the model-local function
        parser.set_flag(override)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.plugins_to_serialize = [str(plugin_lib)]
    dims = input_dim_names(onnx_path)
    for spec in profiles if profiles is not None else DEFAULT_PROFILES:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(dims, spec).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (rerun with verbose=True)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(serialized))
    return out_path


@dataclass(frozen=True)
class OutputComparison:
    """One output of a TensorRT run vs its saved reference, read like Polygraphy's comparator."""

    name: str
    passed: bool
    max_abs: float
    mean_abs: float
    max_rel: float
    atol: float
    rtol: float
    min_atol: float  # smallest atol that passes with this rtol

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"{verdict} | {self.name}: max abs {self.max_abs:.3g}, mean abs {self.mean_abs:.3g}, max rel "
                f"{self.max_rel:.3g} (atol {self.atol:g}, rtol {self.rtol:g}; passes from atol {self.min_atol:.3g})")


def compare_outputs(outputs: Mapping[str, Any], references: Mapping[str, Any], atol: float = 2e-2,
                    rtol: float = 1e-2, exact: Sequence[str] = ()) -> list[OutputComparison]:
    """Compare arrays by name (``|out - ref| <= atol + rtol * |ref|``); names in ``exact`` must match exactly.

    Default tolerances are docs/spec.md §9's float16 ones; integer outputs such as ``expert_counts`` belong in ``exact``.
    """
    import numpy as np  # noqa: PLC0415

    results = []
    for name, ref in references.items():
        if name not in outputs:
            raise KeyError(f"engine has no output {name!r}; it has {sorted(outputs)}")
        out = np.asarray(outputs[name])
        ref = np.asarray(ref)
        if out.shape != ref.shape:
            raise ValueError(f"output {name!r}: expected shape {ref.shape}, got {out.shape}")
        a_tol, r_tol = (0.0, 0.0) if name in exact else (atol, rtol)
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        scale = np.abs(ref.astype(np.float64))
        finite = bool(np.isfinite(diff).all())
        max_abs = float(diff.max()) if diff.size else 0.0
        need = float((diff - r_tol * scale).max()) if diff.size else 0.0
        results.append(OutputComparison(
            name=name,
            passed=finite and bool((diff <= a_tol + r_tol * scale).all()),
            max_abs=max_abs if finite else math.inf,
            mean_abs=float(diff.mean()) if diff.size else 0.0,
            max_rel=float((diff / np.maximum(scale, 1e-12)).max()) if diff.size else 0.0,
            atol=a_tol,
            rtol=r_tol,
            min_atol=max(need, 0.0) if finite else math.inf,
        ))
    return results


def run_engine(engine_path: str | Path, plugin_lib: str | Path | None, feed: Mapping[str, Any]) -> dict[str, Any]:
    """Run a plan once with Polygraphy's ``TrtRunner``; returns its outputs as numpy arrays by name.

    The plugin library serialized in the engine is loaded by TensorRT itself (host code allowed); pass
    ``plugin_lib`` to load a specific build instead.
    """
    trt = _tensorrt()
    try:
        from polygraphy.backend.trt import TrtRunner  # noqa: PLC0415
    except ImportError as exc:
        raise TensorRTUnavailable(POLYGRAPHY_HINT) from exc
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin_lib is not None:
        trt.get_plugin_registry().load_library(str(plugin_lib))
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = True  # the engine carries librq_moe_plugin.so
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
    with TrtRunner(engine) as runner:
        return {k: v.copy() if hasattr(v, "copy") else v for k, v in runner.infer(feed_dict=dict(feed)).items()}


def check_engine(engine_path: str | Path, feed: Mapping[str, Any], references: Mapping[str, Any],
                 plugin_lib: str | Path | None = None, atol: float = 2e-2, rtol: float = 1e-2,
                 exact: Sequence[str] = ()) -> list[OutputComparison]:
    """``rq check --trt``: run the engine on saved inputs and compare with saved reference outputs."""
    return compare_outputs(run_engine(engine_path, plugin_lib, feed), references, atol, rtol, exact)


@dataclass
class EngineReport:
    """``rq check --trt`` result: one :class:`OutputComparison` per output and prefill feed."""

    passed: bool
    rows: list[str]

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return "\n".join([*self.rows, f"{verdict} | TensorRT vs PyTorch reference (float16 tolerances: atol 2e-2, rtol 1e-2)"])


def check_engine_export(build_dir: str | Path, plugin_lib: str | Path | None = None,
                        engine_path: str | Path | None = None) -> EngineReport:
    """Run ``build_dir/engine.plan`` on the prefill feeds rq-export saved and compare with the saved PyTorch
    reference outputs (``manifest.json``'s ``parity.prefill``); ``expert_counts`` must match exactly."""
    _tensorrt()  # fail first, with the install hint, where TensorRT is absent
    from polygraphy.comparator import RunResults  # noqa: PLC0415
    from polygraphy.json import load_json  # noqa: PLC0415

    build_dir = Path(build_dir)
    engine_path = Path(engine_path or build_dir / "engine.plan")
    if not engine_path.is_file():
        raise FileNotFoundError(f"{engine_path} does not exist; build it with `rq build {build_dir / 'model.onnx'}`")
    import json  # noqa: PLC0415

    manifest = json.loads((build_dir / "manifest.json").read_text())
    rows, passed = [], True
    for graph, entry in manifest["parity"]["prefill"].items():
        feeds = load_json(str(build_dir / entry["inputs"]))
        reference = RunResults.load(str(build_dir / entry["reference"]))[0][1]
        for feed, ref in zip(feeds, reference):
            refs = {name: ref[name] for name in ref.keys()}
            exact = [name for name in refs if "expert_counts" in name]
            for cmp in check_engine(engine_path, feed, refs, plugin_lib, exact=exact):
                rows.append(f"{graph}: {cmp}")
                passed &= cmp.passed
    return EngineReport(passed, rows)


__all__ = [
    "DEFAULT_PROFILES", "EngineReport", "check_engine_export", "INSTALL_HINT", "OutputComparison", "TensorRTUnavailable", "build_engine", "check_engine",
    "compare_outputs", "input_dim_names", "profile_shapes", "run_engine",
]
