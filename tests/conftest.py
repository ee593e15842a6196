"""Shared fixtures, built once per session: tiny random checkpoints of every supported architecture, their R&Q
plans and exports, the demo model's export, and the TensorRT plugin library (CMake)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to oversubscription


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{arch: checkpoint dir} for every tiny architecture (built lazily, cached for the session)."""
    from rq.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, str] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = str(save_tiny_checkpoint(arch, root / arch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A few hundred KB of real text (this package's own sources) for calibration in tests."""
    from pathlib import Path

    import rq

    src = "\n".join(p.read_text() for p in sorted(Path(rq.__file__).parent.rglob("*.py")))
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(src)
    return path


# --- tiny checkpoints with plans, and their exports (tests/export, tests/engines) ---------------------------

GROUP_SIZE = 64
BUDGET = 1.0  # at the original footprint INT4 frees room: the plans hold INT4 primaries and replicas


def make_tiny(arch: str, root: Path, router_std: float = 0.2) -> tuple[Path, Path]:
    """``(model_dir, plan.json)`` of a tiny ``arch`` checkpoint calibrated on seeded random tokens."""
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import TokenData
    from rq.models.adapters import load_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import save_plan
    from rq.testing.tiny import save_tiny_checkpoint

    model_dir = save_tiny_checkpoint(arch, root / arch, router_std=router_std)
    if arch.startswith("deepseek"):
        # Real DeepSeek checkpoints have num_key_value_heads == num_attention_heads (MLA expands the
        # latent to every head); with fewer, Hugging Face's attention fails as soon as a padding mask
        # exists. Weight shapes do not depend on it.
        config = json.loads((model_dir / "config.json").read_text())
        config["num_key_value_heads"] = config["num_attention_heads"]
        (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    model, adapter = load_model(model_dir)
    tokens = torch.randint(2, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, adapter, TokenData(tokens, "seeded random tokens"), batch_size=4,
                      group_size=GROUP_SIZE, show_progress=False)
    plan = make_plan(stats, PlanOptions(budget_factor=BUDGET))
    precision = [p for layer in plan.layers for p in layer.precision]
    assert 0 in precision and 1 in precision, f"{arch}: plan needs original and INT4 copies"
    assert any(e.replicas for layer in plan.layers for e in layer.experts), f"{arch}: plan needs replicas"
    save_plan(plan, model_dir / "plan.json")
    return model_dir, model_dir / "plan.json"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(arch) -> (model_dir, plan_path)``, built once per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str, router_std: float = 0.2) -> tuple[Path, Path]:
        if (arch, router_std) not in cache:
            cache[(arch, router_std)] = make_tiny(arch, root / f"r{router_std:g}", router_std)
        return cache[(arch, router_std)]

    return get


@pytest.fixture(scope="session")
def exported(tiny, tmp_path_factory):
    """``exported(arch, dtype="float32") -> ExportResult`` (with its parity check), built once."""
    from rq.export import export_model

    root = tmp_path_factory.mktemp("builds")
    cache = {}

    def get(arch: str, dtype: str = "float32"):
        if (arch, dtype) not in cache:
            # float16 routing resolves router logits to about 3 digits: a near-tie between two experts may
            # go either way in PyTorch and ONNX Runtime; the check allows the swap in expert_counts (§9), but
            # in a 2-layer model the swapped token's logits can leave the tolerance. Sharper routers keep the
            # float16 check about the export, not about coin flips
            model_dir, plan = tiny(arch, router_std=1.0 if dtype == "float16" else 0.2)
            cache[(arch, dtype)] = export_model(model_dir, plan, root / f"{arch}-{dtype}", dtype=dtype,
                                                show_progress=False)
        return cache[(arch, dtype)]

    return get


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """``(ExportResult, plan)`` of the built-in demo model (rq/demo/checkpoint) with an R&Q plan, parity checked;
    calibrated on the demo's code split (8 x 128 tokens), the stats saved beside the build (``stats/``)."""
    import rq

    demo = Path(rq.__file__).parent / "demo" / "checkpoint"
    if not (demo / "config.json").is_file():
        pytest.skip("rq/demo/checkpoint is not built")
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import load_token_data, load_tokenizer
    from rq.demo import corpus
    from rq.export import export_model
    from rq.models.adapters import load_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import save_plan

    root = tmp_path_factory.mktemp("demo")
    model, adapter = load_model(demo)
    data = load_token_data(load_tokenizer(demo), corpus.split_path("calibration"), seq_len=128, max_sequences=8)
    stats = calibrate(model, adapter, data, group_size=64, show_progress=False)
    stats.save(root / "stats")  # beside the build: what the plan was made from (the re-plan loop reads it)
    plan = make_plan(stats, PlanOptions(budget_factor=1.0))
    save_plan(plan, root / "plan.json")
    return export_model(demo, root / "plan.json", root / "build", show_progress=False), plan


# --- the TensorRT plugin (tests/plugins, tests/engines) ------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TENSORRT_HEADERS_ENV = "RQ_TENSORRT_HEADERS"
"""Environment variable naming a folder of TensorRT's public headers (Apache-2.0), outside the repository, laid out
as ``<version>/include`` for 10.16 and 11.1 (``.ci/run`` sets it where CI has them)."""


def tensorrt_include(version: str) -> Path:
    """``include`` folder of TensorRT ``version``'s headers; skips the test, saying why, where it is absent."""
    root = os.environ.get(TENSORRT_HEADERS_ENV, "")
    include = Path(root) / version / "include"
    if not root or not (include / "NvInferRuntime.h").is_file():
        pytest.skip(f"TensorRT {version} headers not found (set {TENSORRT_HEADERS_ENV} to a folder with "
                    f"{version}/include/NvInferRuntime.h)")
    return include


def cmake_plugin(build: Path, include: Path, *extra: str) -> subprocess.CompletedProcess:
    """Configure and build plugins/ into ``build`` with ``-Werror`` on rq's code; returns the last step's result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    configure = subprocess.run(
        ["cmake", "-S", str(REPO / "plugins"), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
         f"-DTensorRT_INCLUDE_DIR={include}", "-DRQ_WARNINGS_AS_ERRORS=ON", f"-DRQ_AOT_JOBS={os.cpu_count() or 1}",
         *extra], capture_output=True, text=True, env=env)
    if configure.returncode != 0:
        return configure
    return subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)], capture_output=True,
                          text=True, env=env)


@pytest.fixture(name="tensorrt_include")
def tensorrt_include_fixture():
    """The :func:`tensorrt_include` helper (skips where the headers are absent)."""
    return tensorrt_include


@pytest.fixture(name="cmake_plugin")
def cmake_plugin_fixture():
    """The :func:`cmake_plugin` helper."""
    return cmake_plugin


@pytest.fixture(scope="session")
def rq_plugin(tmp_path_factory):
    """``librq_moe_plugin.so``, its host test and IPluginV3 driver, built once per session against TensorRT 11.1's
    headers, with cubins for ``RQ_TEST_CUDA_ARCHS`` (default 80: its code runs on every 8.x GPU, and engines
    built here never run). Skipped, with the reason, without cmake, the CUDA toolkit or the headers."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/include/cuda.h").exists():
        pytest.skip("CUDA toolkit (nvcc, cuda.h) not installed")
    include = tensorrt_include("11.1")
    archs = os.environ.get("RQ_TEST_CUDA_ARCHS", "80")
    build = tmp_path_factory.mktemp("plugin")
    built = cmake_plugin(build, include, f"-DRQ_CUDA_ARCHS={archs}")
    assert built.returncode == 0, built.stdout[-5000:] + built.stderr[-5000:]
    library = build / "librq_moe_plugin.so"
    import ctypes

    lib = ctypes.CDLL(str(library))
    lib.rqMoePluginInfo.restype = ctypes.c_char_p
    return SimpleNamespace(build=build, library=library, driver=build / "rq_moe_plugin_driver",
                           host_test=build / "rq_moe_host_test", cubins=build / "cubins", include=include,
                           info=json.loads(lib.rqMoePluginInfo().decode()))


# --- a plan mixing original, INT8 and INT4 copies (tests/export, tests/engines) --------------------------------


@pytest.fixture(scope="session")
def mixed_export(tiny_checkpoints, tmp_path_factory):
    """``(plan, ExportResult)`` of the tiny Qwen3-MoE with a ``--precisions int4,int8`` plan at budget 1.0 that mixes
    all three precisions (asserted), exported with its parity check, built once per session."""
    from rq.calibrate.accumulate import calibrate
    from rq.calibrate.data import TokenData
    from rq.export import export_model
    from rq.models.adapters import load_model
    from rq.plan.planner import PlanOptions, make_plan
    from rq.plan.schema import save_plan

    model_dir = tiny_checkpoints("qwen3_moe")
    model, adapter = load_model(model_dir)
    tokens = torch.randint(2, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, adapter, TokenData(tokens, "seeded random tokens"), batch_size=4, group_size=64,
                      show_progress=False)
    assert all(s.quant_sensitivity_int8 is not None for s in stats.layers)
    assert all(bool((s.quant_sensitivity_int8 <= s.quant_sensitivity).all()) for s in stats.layers)
    plan = make_plan(stats, PlanOptions(budget_factor=1.0, precisions=("int4", "int8")))
    codes = {p for layer in plan.layers for p in layer.precision}
    assert codes == {0, 1, 2}, f"the tiny plan should mix all three precisions, got {codes}"
    out = tmp_path_factory.mktemp("mixed")
    save_plan(plan, out / "plan.json")
    return plan, export_model(model_dir, out / "plan.json", out / "build", show_progress=False)
