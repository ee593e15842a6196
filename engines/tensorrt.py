"""TensorRT engines of an exported R&Q model: ``rq build`` and ``rq check --trt`` (docs/tensorrt.md).

One code path serves full TensorRT (>= 10.7, 10.x and 11.x, on the GPU it builds for) and TensorRT-RTX
(>= 1.7, which also builds ahead of time on a machine without a GPU, for chosen compute capabilities):

- the ``rq::RQMoE`` nodes resolve to the C++ plugin (plugins/, ``librq_moe_plugin.so``), loaded into the
  plugin registry; the parser takes a registered plugin over the model-local function from TensorRT 10.7 on
  (from 10.15 the node's ``plugin_namespace`` attribute alone selects it), so no override flag is set: that
  flag would let any registered plugin replace a standard ONNX op of the same name;
- the network is strongly typed: precisions are the export's (``rq-export --dtype``), never builder flags
  (TensorRT 11 has none);
- one optimization profile covers every dynamic dimension of the file (:class:`ProfileLimits`);
- the plugin library is serialized into the plan (``plugins_to_serialize``; full TensorRT needs the
  version-compatible flag for it), so the plan is the only file to ship; the build checks that it is there,
  and that the engine has one plugin layer per MoE layer (TensorRT's own layer information).

``rq check --trt`` runs each plan with Polygraphy's ``TrtRunner`` through ``Comparator.run`` and compares with
the saved PyTorch reference by :func:`rq.export.parity.compare_run_results`: the same comparison and
:class:`~rq.export.parity.ParityReport` as ONNX Runtime's check. Every user error is an :class:`RQError`.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from rq.atomic import atomic_write_bytes, atomic_write_text
from rq.errors import RQError

MIN_TENSORRT = (10, 7)
MIN_TENSORRT_RTX = (1, 7)
INSTALL_HINT = (
    "TensorRT is not installed: `pip install tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs` (TensorRT-RTX, "
    "builds engines without a GPU; in rq's dev extras) or `pip install 'tensorrt>=10.7'` (needs a GPU); "
    "see docs/tensorrt.md")
PLUGIN_HINT = "build it with `cmake -S plugins -B build/plugins -DTensorRT_INCLUDE_DIR=DIR && cmake --build build/plugins`"
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "RQMoE", "1", "rq"


# --- which TensorRT -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRT:
    """The TensorRT in use: its Python module, product name and version."""

    trt: Any
    name: str  # "TensorRT" or "TensorRT-RTX"
    version: str

    @property
    def rtx(self) -> bool:
        return self.name == "TensorRT-RTX"

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _missing_unversioned(libdir: Path) -> list[Path]:
    """Libraries of ``libdir`` (``lib*.so.N``) that have no ``lib*.so`` beside them."""
    return [p for p in sorted(libdir.glob("*.so.*")) if not (libdir / (p.name.split(".so.")[0] + ".so")).exists()]


def _load_unversioned(libdir: Path) -> None:
    """Load ``libdir``'s libraries from a private folder that also has their unversioned names.

    TensorRT-RTX's parser ``dlopen``s ``libtensorrt_rtx.so``, searching its own folder first, but the wheel ships
    only ``libtensorrt_rtx.so.1``: the parse then aborts the process. Loading the libraries through symlinks in
    a private folder makes that folder the parser's own (``$ORIGIN``), and the name resolves to the library
    already loaded. Nothing in the user's environment changes; the folder is removed at exit.
    """
    versioned = sorted(libdir.glob("*.so.*"))
    shim = Path(tempfile.mkdtemp(prefix="rq-tensorrt-libs-"))
    atexit.register(shutil.rmtree, shim, True)
    for lib in versioned:
        (shim / lib.name).symlink_to(lib)
        unversioned = shim / (lib.name.split(".so.")[0] + ".so")
        if not unversioned.exists():
            unversioned.symlink_to(lib)
    for lib in sorted(versioned, key=lambda p: "onnxparser" in p.name):  # the core library before the parser
        ctypes.CDLL(str(shim / lib.name))


def _import_rtx() -> Any | None:
    spec = importlib.util.find_spec("tensorrt_rtx_bindings")
    libs = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None:
        return None
    libdir = Path(libs.origin).parent if libs is not None and libs.origin else None
    if libdir is not None and _missing_unversioned(libdir):
        if "tensorrt_rtx_bindings" in sys.modules:  # loaded before rq could arrange the names
            raise RQError("tensorrt_rtx_bindings was imported before rq.engines.tensorrt, so its ONNX parser cannot "
                          "find libtensorrt_rtx.so and would abort the process: import rq.engines.tensorrt first")
        _load_unversioned(libdir)
    trt = importlib.import_module("tensorrt_rtx_bindings")
    # Polygraphy runs TensorRT-RTX when asked to, under the module name of NVIDIA's metapackage.
    sys.modules.setdefault("tensorrt_rtx", trt)
    from polygraphy import config as polygraphy_config

    polygraphy_config.USE_TENSORRT_RTX = True
    return trt


@functools.lru_cache(maxsize=1)
def load_tensorrt() -> TensorRT:
    """Full TensorRT when it is installed, else TensorRT-RTX; :class:`RQError` when neither (or too old)."""
    try:
        full = importlib.import_module("tensorrt")
    except (ImportError, OSError):
        full = None
    if full is not None:
        if _version(full.__version__) < MIN_TENSORRT:
            raise RQError(f"TensorRT {full.__version__} is installed, rq needs >= 10.7 (older ONNX parsers inline the "
                          f"RQMoE function instead of taking the plugin, and its body has ops TensorRT lacks): "
                          f"pip install -U 'tensorrt>=10.7'")
        return TensorRT(full, "TensorRT", full.__version__)
    rtx = _import_rtx()
    if rtx is None:
        raise RQError(INSTALL_HINT)
    if _version(rtx.__version__) < MIN_TENSORRT_RTX:
        raise RQError(f"TensorRT-RTX {rtx.__version__} is installed, rq needs >= 1.7: "
                      f"pip install -U tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs")
    return TensorRT(rtx, "TensorRT-RTX", rtx.__version__)


class _Log:
    """TensorRT logger that keeps every message (the build's layer information is a VERBOSE one) and prints
    warnings and errors only when asked to."""

    def __init__(self, trt: Any, echo: bool = False):
        outer = self

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                outer.messages.append((severity, msg))
                if outer.echo and int(severity) <= int(trt.ILogger.WARNING):
                    print(f"[TensorRT] {msg}", file=sys.stderr)

        self.trt, self.echo = trt, echo
        self.messages: list[tuple[Any, str]] = []
        self.logger = Logger()

    def errors(self) -> list[str]:
        return [m for s, m in self.messages if int(s) <= int(self.trt.ILogger.ERROR)]


# --- the plugin library ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginLibrary:
    """``librq_moe_plugin.so`` and what it says of itself (``rqMoePluginInfo``, plugins/rqMoePlugin.h)."""

    path: Path
    info: dict

    @property
    def archs(self) -> list[int]:
        return list(self.info.get("archs", []))

    @property
    def precisions(self) -> list[int]:
        """Copy precisions the plugin runs (docs/spec.md §8 codes); a library that predates the field runs 0, 1."""
        return list(self.info.get("precisions", [0, 1]))

    def runs_on(self, arch: int) -> bool:
        """Whether the embedded cubins run on compute capability ``arch`` (asks the launcher: its own rule)."""
        return bool(_cdll(self.path).rqMoeSupportsArch(arch))


@functools.lru_cache(maxsize=8)
def _cdll(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.rqMoePluginInfo.restype = ctypes.c_char_p
    lib.rqMoeSupportsArch.restype = ctypes.c_int32
    lib.rqMoeSupportsArch.argtypes = [ctypes.c_int32]
    return lib


def plugin_library(path: str | Path) -> PluginLibrary:
    """Open the plugin library without TensorRT; :class:`RQError` when it is missing or not rq's plugin."""
    path = Path(path)
    if not path.is_file():
        raise RQError(f"plugin library {path} not found: {PLUGIN_HINT} (docs/tensorrt.md)")
    try:
        info = json.loads(_cdll(path.resolve()).rqMoePluginInfo().decode())
    except (OSError, AttributeError, ValueError) as err:
        raise RQError(f"{path} is not rq's RQMoE plugin library ({str(err).splitlines()[0]}): {PLUGIN_HINT}") from None
    return PluginLibrary(path.resolve(), info)


def _register_plugin(rt: TensorRT, plugin: PluginLibrary) -> None:
    registry = rt.trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        if registry.load_library(str(plugin.path)) is None:
            raise RQError(f"{rt} could not load the plugin library {plugin.path}: {PLUGIN_HINT}")
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise RQError(f"{plugin.path} registered no {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION} plugin in {rt}")


# --- optimization profile -------------------------------------------------------------------------------

Range = tuple[int, int, int]


@dataclass(frozen=True)
class ProfileLimits:
    """Largest shapes the engine accepts: batch, new tokens per call (``seq``, a prefill's length; also the
    encoder's input), and cached tokens (``past_seq``). ``dims`` sets any dimension's ``(min, opt, max)``
    directly, by its name in the ONNX file. The optimum is a decode step with a half-full cache."""

    max_batch: int = 8
    max_seq: int = 2048
    max_cache: int = 2048
    dims: Mapping[str, Range] = field(default_factory=dict)

    def ranges(self) -> dict[str, Range]:
        for name, value in (("max batch", self.max_batch), ("max sequence", self.max_seq)):
            if value < 1:
                raise RQError(f"{name} must be >= 1, got {value}")
        if self.max_cache < 0:
            raise RQError(f"max cache length must be >= 0, got {self.max_cache}")
        past = self.max_cache // 2
        known = {
            "batch": (1, 1, self.max_batch),
            "seq": (1, 1, self.max_seq),
            "encoder_seq": (1, min(128, self.max_seq), self.max_seq),
            "past_seq": (0, past, self.max_cache),
            "total_seq": (1, past + 1, self.max_seq + self.max_cache),  # attention mask: past + new tokens
        }
        for name, (lo, opt, hi) in self.dims.items():
            if not 0 <= lo <= opt <= hi:
                raise RQError(f"dimension {name}: need 0 <= min <= opt <= max, got {lo}:{opt}:{hi}")
        return {**known, **dict(self.dims)}


def input_dims(onnx_path: str | Path) -> dict[str, list[str | int]]:
    """Per graph input, each dimension as its symbolic name (``dim_param``) or fixed size (weights not loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return {v.name: [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input if v.name not in initializers}


def profile_shapes(dims: Mapping[str, Sequence[str | int]], ranges: Mapping[str, Range]) -> dict[str, tuple[list[int], ...]]:
    """``(min, opt, max)`` shape of every input; :class:`RQError` naming a dynamic dimension without a range."""
    missing = sorted({d for ds in dims.values() for d in ds if isinstance(d, str) and d not in ranges})
    if missing:
        raise RQError(f"no profile range for dimension(s) {missing} of the ONNX inputs: pass "
                      f"--dim {missing[0]}=MIN:OPT:MAX (known: {', '.join(sorted(ranges))})")
    return {name: tuple([d if isinstance(d, int) else ranges[d][i] for d in ds] for i in range(3))
            for name, ds in dims.items()}


# --- targets --------------------------------------------------------------------------------------------


def parse_targets(text: str | None) -> list[int] | None:
    """``"sm86,sm120"`` (or ``"86 12.0"``) -> ``[86, 120]``; None stays None."""
    if text is None:
        return None
    out = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d))?", item.lower())
        if m is None:
            raise RQError(f"--target {item!r} is not a compute capability: write e.g. sm86,sm120 or 8.6")
        out.append(int(m.group(1)) * 10 + int(m.group(2)) if m.group(2) is not None else int(m.group(1)))
    if not out:
        raise RQError("--target is empty: write e.g. sm86,sm89")
    return out


def rtx_targets(rt: TensorRT) -> dict[int, Any]:
    """Compute capabilities TensorRT-RTX can build for, from its ``ComputeCapability`` enum (SM80 -> 80)."""
    return {int(name[2:]): value for name, value in rt.trt.ComputeCapability.__members__.items()
            if re.fullmatch(r"SM\d+", name)}


def _sm(archs: Sequence[int]) -> str:
    return ", ".join(f"sm_{a}" for a in archs) or "none"


def _resolve_targets(rt: TensorRT, plugin: PluginLibrary, targets: list[int] | None) -> list[int]:
    """The compute capabilities to build for, each one the plugin's cubins run on."""
    if not rt.rtx:
        if targets is not None:
            raise RQError(f"--target picks TensorRT-RTX's ahead-of-time targets; {rt} builds for the GPU it runs "
                          f"on (install only TensorRT-RTX, or drop --target)")
        return []
    known = rtx_targets(rt)
    if targets is None:  # every target the plugin can serve
        targets = [t for t in sorted(known) if plugin.runs_on(t)]
        if not targets:
            raise RQError(f"the plugin {plugin.path} has cubins for {_sm(plugin.archs)} and none of {rt}'s targets "
                          f"{', '.join(f'sm{t}' for t in sorted(known))}: rebuild it with -DRQ_CUDA_ARCHS=\"80;86;89;120\"")
        return targets
    for t in targets:
        if t not in known:
            raise RQError(f"--target sm{t} is not a target of {rt} (it builds for "
                          f"{', '.join(f'sm{k}' for k in sorted(known))}); for sm{t} use full TensorRT on that GPU")
        if not plugin.runs_on(t):
            raise RQError(f"the plugin {plugin.path} has no cubins that run on sm{t} (it has {_sm(plugin.archs)}): "
                          f"rebuild it with -DRQ_CUDA_ARCHS including {t}")
    return targets


# --- layer information ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine as TensorRT describes it: name, type, and the ONNX nodes it came from."""

    name: str
    kind: str
    onnx_nodes: tuple[str, ...]

    @property
    def is_plugin(self) -> bool:
        return self.kind == "custom_layer" or "plugin" in self.kind.lower()


_ONNX_NODES = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


_LOG_FORMATS = (
    # TensorRT-RTX: "Layers:", then "Name: X, LayerType: T, ..., Metadata: [ONNX Layer: node]" per layer
    ("Layers:", re.compile(r"Name: (?P<name>.*?), LayerType: (?P<kind>[^,]+),")),
    # TensorRT 10: "Engine Layer Information:", then "Layer(T): X, Tactic: ..." per layer (layers are named by node)
    ("Engine Layer Information", re.compile(r"\s*Layer\((?P<kind>[^)]+)\): (?P<name>[^,]+),")),
)


def engine_layers(messages: Sequence[str]) -> list[EngineLayer] | None:
    """The engine's layers from the builder's VERBOSE log with detailed profiling verbosity (one message or one
    per layer, in either format of :data:`_LOG_FORMATS`); None when the log has no layer information."""
    lines = [line for msg in messages for line in msg.splitlines()]
    for header, pattern in _LOG_FORMATS:
        starts = [i for i, line in enumerate(lines) if line.strip().startswith(header)]
        if not starts:
            continue
        layers = []
        for line in lines[starts[-1] + 1:]:
            m = pattern.match(line)
            if m is None:
                if layers:
                    break
                continue
            nodes = tuple(_ONNX_NODES.findall(line)) or (m.group("name"),)
            layers.append(EngineLayer(m.group("name"), m.group("kind").strip(), nodes))
        if layers:
            return layers
    return None


def inspector_layers(info_json: str) -> list[EngineLayer] | None:
    """The layers of ``IEngineInspector.get_engine_information(JSON)`` (detailed verbosity: dicts with ``Name``,
    ``LayerType``, ``Metadata``); None when it names none."""
    layers = []
    for layer in json.loads(info_json).get("Layers", []):
        if isinstance(layer, dict) and layer.get("Name"):
            nodes = tuple(_ONNX_NODES.findall(str(layer.get("Metadata", "")))) or (layer["Name"],)
            layers.append(EngineLayer(layer["Name"], str(layer.get("LayerType", "")), nodes))
    return layers or None


def _inspect(rt: TensorRT, plan: bytes) -> list[EngineLayer] | None:
    """Layers by the engine inspector, where this machine can load the plan (a GPU); else None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    log = _Log(rt.trt)
    runtime = rt.trt.Runtime(log.logger)
    runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        return None
    return inspector_layers(engine.create_engine_inspector().get_engine_information(rt.trt.LayerInformationFormat.JSON))


# --- build ----------------------------------------------------------------------------------------------


@dataclass
class EngineBuild:
    """What :func:`build_engine` made: the plan, by which TensorRT, for which targets, and its layers."""

    path: Path
    runtime: str
    targets: list[int]  # compute capabilities (TensorRT-RTX); empty: the GPU full TensorRT ran on
    seconds: float
    size: int
    rq_nodes: list[str]  # the ONNX file's rq::RQMoE nodes
    layers: list[EngineLayer] | None  # None: neither the build log nor an inspector (GPU) gave them
    plugin_embedded: bool

    def plugin_layers(self) -> list[EngineLayer]:
        """Plugin layers of the engine that came from an rq::RQMoE node."""
        nodes = set(self.rq_nodes)
        return [l for l in self.layers or [] if l.is_plugin and nodes.intersection(l.onnx_nodes)]

    def summary(self) -> str:
        where = ", ".join(f"sm{t}" for t in self.targets) or "this GPU"
        layers = ("no layer information (not in this TensorRT's build log, and no GPU to inspect the engine)"
                  if self.layers is None else
                  f"{len(self.layers)} layers, {len(self.plugin_layers())} RQMoE plugin layers for "
                  f"{len(self.rq_nodes)} MoE layers")
        return (f"engine {self.path} ({self.size / 2**20:.1f} MiB) built by {self.runtime} for {where} in "
                f"{self.seconds:.1f} s: {layers}; plugin library embedded")


def default_engine_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``engine.plan`` beside it (the name ``rq check --trt`` reads); ``encoder.onnx`` ->
    ``encoder.plan`` and ``decoder.onnx`` -> ``decoder.plan`` for encoder-decoder exports."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name("engine.plan" if onnx_path.name == "model.onnx" else onnx_path.stem + ".plan")


def _first_line(errors: Sequence[str], fallback: str) -> str:
    return errors[0].strip().splitlines()[0] if errors and errors[0].strip() else fallback


def _parse(rt: TensorRT, onnx_path: Path, log: _Log) -> tuple[Any, Any, Any, list[str]]:
    """Builder, strongly typed network and parser of ``onnx_path``; every rq::RQMoE node must become a plugin."""
    from rq.export.onnx_file import rq_nodes

    import onnx

    nodes = [n.name for n in rq_nodes(onnx.load(str(onnx_path), load_external_data=False))]
    trt = rt.trt
    builder = trt.Builder(log.logger)
    if builder is None:
        raise RQError(f"{rt} could not create a builder ({_first_line(log.errors(), 'no CUDA GPU?')}); "
                      f"TensorRT-RTX builds without a GPU")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log.logger)
    if not parser.parse_from_file(str(onnx_path)):
        first = str(parser.get_error(0)) if parser.num_errors else _first_line(log.errors(), "no error reported")
        raise RQError(f"{rt} could not parse {onnx_path}: {first.strip().splitlines()[0]}")
    plugins = [network.get_layer(i).name for i in range(network.num_layers)
               if network.get_layer(i).type == trt.LayerType.PLUGIN_V3]
    if sorted(plugins) != sorted(nodes):
        raise RQError(f"{rt}'s parser made plugin layers {sorted(plugins)} for the rq::RQMoE nodes {sorted(nodes)} "
                      f"of {onnx_path}; re-export it with this rq (plugin_namespace/plugin_version attributes)")
    return builder, network, parser, nodes


def _configure(rt: TensorRT, builder: Any, onnx_path: Path, plugin: PluginLibrary, targets: list[int],
               limits: ProfileLimits, workspace_gib: float | None) -> Any:
    """Builder config: layer information, targets (TensorRT-RTX), the plugin library inside, one profile."""
    trt = rt.trt
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer information in the build log
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if rt.rtx:
        caps = rtx_targets(rt)
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            config.set_compute_capability(caps[t], i)
    else:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)  # TensorRT serializes plugin libraries only then
    config.plugins_to_serialize = [str(plugin.path)]
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(input_dims(onnx_path), limits.ranges()).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    return config


def require_precisions(onnx_path: Path, plugin: PluginLibrary) -> None:
    """A model's copy precisions must be ones the plugin library runs (its ``precisions``; a library built before
    the INT8 class runs 0 and 1 only): refused before building, with the fix, instead of a parser error."""
    import onnx

    from rq.core.op import PRECISIONS
    from rq.export.onnx_file import rq_nodes

    runs = set(plugin.precisions)
    for node in rq_nodes(onnx.load(str(onnx_path), load_external_data=False)):
        precision = next((list(a.ints) for a in node.attribute if a.name == "precision"), [])
        missing = sorted(set(precision) - runs)
        if missing:
            names = ", ".join(PRECISIONS[p] if 0 <= p < len(PRECISIONS) else str(p) for p in missing)
            raise RQError(f"{onnx_path} has {names} expert copies (node {node.name}) that the plugin library "
                          f"{plugin.path} does not run: rebuild it from this version of rq ({PLUGIN_HINT})")


def build_engine(onnx_path: str | Path, out_path: str | Path | None = None,
                 plugin_lib: str | Path = "build/plugins/librq_moe_plugin.so", *, targets: Sequence[int] | None = None,
                 limits: ProfileLimits = ProfileLimits(), workspace_gib: float | None = None,
                 verbose: bool = False) -> EngineBuild:
    """Build a TensorRT plan (``.plan``) from an R&Q ONNX file with the RQMoE plugin serialized into it.

    onnx_path: ``model.onnx`` of rq-export (or ``encoder.onnx``/``decoder.onnx``); out_path: default
    :func:`default_engine_path`; plugin_lib: ``librq_moe_plugin.so``; targets: compute capabilities for
    TensorRT-RTX's ahead-of-time build (default: every target of TensorRT-RTX the plugin's cubins run on);
    limits: the optimization profile. Written atomically; :class:`RQError` on any user error.
    """
    onnx_path = Path(onnx_path)
    out_path = Path(out_path) if out_path is not None else default_engine_path(onnx_path)
    if not onnx_path.is_file():
        raise RQError(f"{onnx_path} does not exist; export first with `rq-export MODEL_DIR --plan plan.json`")
    plugin = plugin_library(plugin_lib)
    require_precisions(onnx_path, plugin)
    rt = load_tensorrt()
    chosen = _resolve_targets(rt, plugin, list(targets) if targets is not None else None)
    start = time.perf_counter()
    log = _Log(rt.trt, echo=verbose)
    _register_plugin(rt, plugin)
    builder, network, _parser, nodes = _parse(rt, onnx_path, log)  # the parser owns weights the build reads
    config = _configure(rt, builder, onnx_path, plugin, chosen, limits, workspace_gib)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RQError(f"{rt} could not build an engine from {onnx_path}: "
                      f"{_first_line(log.errors(), 'no error reported (rerun with --verbose)')}")
    plan = bytes(serialized)
    library = plugin.path.read_bytes()
    embedded = library[len(library) // 2: len(library) // 2 + 4096] in plan
    if not embedded:
        raise RQError(f"{rt} built {onnx_path} without the plugin library inside the plan; "
                      f"report it with the --verbose log (docs/tensorrt.md)")
    layers = engine_layers([m for _, m in log.messages]) or _inspect(rt, plan)
    result = EngineBuild(out_path, str(rt), chosen, time.perf_counter() - start, len(plan), nodes, layers, embedded)
    if result.layers is not None and sorted(n for l in result.plugin_layers() for n in l.onnx_nodes
                                            if n in set(nodes)) != sorted(nodes):
        raise RQError(f"the engine's plugin layers {[l.name for l in result.plugin_layers()]} do not match the "
                      f"rq::RQMoE nodes {nodes} of {onnx_path} one to one")
    atomic_write_bytes(out_path, plan)
    return result


# --- check ----------------------------------------------------------------------------------------------


def _engine_runner(rt: TensorRT, engine_path: Path, plugin: PluginLibrary | None, name: str):
    """A Polygraphy ``TrtRunner`` for the plan; TensorRT loads the plugin library the plan carries."""
    from polygraphy.backend.trt import TrtRunner

    if plugin is not None:  # a specific build instead of the embedded one
        _register_plugin(rt, plugin)
    log = _Log(rt.trt)
    runtime = rt.trt.Runtime(log.logger)
    runtime.engine_host_code_allowed = True  # the plan carries librq_moe_plugin.so
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        error = _first_line(log.errors(), "no error reported")
        fix = ("running an engine needs an NVIDIA GPU of a compute capability it was built for, and its driver"
               if "cuda" in error.lower() else f"rebuild it with `rq build` on {rt}")
        raise RQError(f"{rt} could not load {engine_path} ({error}): {fix}")
    return TrtRunner(engine, name=name)


def check_engines(build_dir: str | Path, plugin_lib: str | Path | None = None,
                  engine_path: str | Path | None = None, write: bool = True):
    """``rq check BUILD --trt``: run each graph's plan on the prefill feeds rq-export saved and compare with the
    saved PyTorch reference (``expert_counts`` exactly); returns a ``ParityReport(runtime=<TensorRT x.y>)`` and
    writes it to ``BUILD/parity.tensorrt.json``. ``engine_path`` overrides the plan of a one-graph export."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.json import load_json

    from rq.export.parity import ParityReport, compare_run_results, near_ties, polygraphy_quiet
    from rq.export.runtime import load_manifest

    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    if "parity" not in manifest:
        raise RQError(f"{build_dir} has no parity data; re-run rq-export (it saves the reference outputs)")
    graphs = manifest["parity"]["prefill"]
    plans = {g: default_engine_path(build_dir / manifest["graphs"][g]["file"]) for g in graphs}
    if engine_path is not None:
        if len(plans) != 1:
            raise RQError(f"{build_dir} has graphs {sorted(plans)}: their plans are read by name, drop --engine")
        plans = {g: Path(engine_path) for g in plans}
    for graph, plan in plans.items():
        if not plan.is_file():
            raise RQError(f"{plan} does not exist; build it with `rq build {build_dir / manifest['graphs'][graph]['file']}`")
    plugin = plugin_library(plugin_lib) if plugin_lib is not None else None
    rt = load_tensorrt()
    rows = []
    for graph, entry in graphs.items():
        with polygraphy_quiet():
            feeds = load_json(str(build_dir / entry["inputs"]))
            reference = RunResults.load(str(build_dir / entry["reference"]))
            ours = Comparator.run([_engine_runner(rt, plans[graph], plugin, f"tensorrt-{graph}")], data_loader=feeds)
        names = [o["name"] for o in manifest["graphs"][graph]["outputs"]]
        rows.extend(compare_run_results(reference, ours, names, manifest["dtype"], "prefill", graph,
                                        near_ties=near_ties(manifest, "prefill", graph)))
    report = ParityReport(str(build_dir), manifest["dtype"], all(r.passed for r in rows), rows, runtime=str(rt),
                          notes=[f"plans: {', '.join(str(p) for p in plans.values())}"])
    if write:
        atomic_write_text(build_dir / "parity.tensorrt.json", json.dumps(report.to_dict(), indent=2) + "\n")
    return report


__all__ = [
    "EngineBuild", "EngineLayer", "INSTALL_HINT", "MIN_TENSORRT", "MIN_TENSORRT_RTX", "PluginLibrary", "ProfileLimits",
    "TensorRT", "build_engine", "check_engines", "default_engine_path", "engine_layers", "input_dims",
    "inspector_layers", "load_tensorrt",
    "parse_targets", "plugin_library", "profile_shapes", "rtx_targets",
]
