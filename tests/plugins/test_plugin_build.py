"""plugins/ built with CMake from TensorRT's public headers alone (tests/conftest.py's ``rq_plugin``, once per
session): the launcher's host test, the library's interface and ABI, and the build against both header sets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rq.core.experts import ACTIVATIONS, is_glu


def _readelf(library: Path, *args: str) -> str:
    return subprocess.run(["readelf", *args, str(library)], capture_output=True, text=True, check=True).stdout


def test_host_test_passes(rq_plugin):
    run = subprocess.run([str(rq_plugin.host_test)], capture_output=True, text=True)
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout + run.stderr


def test_activation_table_is_the_plugin_abi(rq_plugin):
    """The plugin's C++ table, read from the built library, is rq.core.experts.ACTIVATIONS, in code order."""
    assert rq_plugin.info["activations"] == [[name, is_glu(name)] for name in ACTIVATIONS]
    assert rq_plugin.info["plugin"] == "rq::RQMoE" and rq_plugin.info["version"] == "1"


def test_library_links_no_tensorrt_and_exports_its_entry_points_only(rq_plugin):
    dynamic = _readelf(rq_plugin.library, "-d")
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert not [n for n in needed if "nvinfer" in n or "tensorrt" in n or "cuda" in n], needed
    assert "RPATH" not in dynamic and "RUNPATH" not in dynamic, "no rpath to a TensorRT (or any) folder"
    symbols = _readelf(rq_plugin.library, "--dyn-syms", "-W")
    defined = sorted(line.split()[-1] for line in symbols.splitlines()
                     if " GLOBAL " in line and " UND " not in line and "FUNC" in line)
    assert defined == ["getCreators", "rqMoePluginInfo", "rqMoeSupportsArch", "setLoggerFinder"], defined


def test_cubins_for_the_requested_archs(rq_plugin):
    table = (rq_plugin.cubins / "rqMoeKernelTable.h").read_text()
    archs = rq_plugin.info["archs"]
    assert archs and f"= {{{', '.join(map(str, archs))}}};" in table
    assert rq_plugin.info["kernels"] == 44 * len(archs)  # 12 per architecture for the INT8 class
    assert rq_plugin.info["precisions"] == [0, 1, 2]


def test_compiles_against_tensorrt_10_headers_with_werror(rq_plugin, tmp_path, cmake_plugin, tensorrt_include):
    """The same sources against TensorRT 10.16's headers (SYSTEM includes: their deprecations are theirs), reusing
    the session's cubins."""
    built = cmake_plugin(tmp_path / "b", tensorrt_include("10.16"), f"-DRQ_CUBIN_DIR={rq_plugin.cubins}")
    assert built.returncode == 0, built.stdout[-5000:] + built.stderr[-5000:]
    assert (tmp_path / "b" / "librq_moe_plugin.so").is_file() and (tmp_path / "b" / "rq_moe_plugin_driver").is_file()


def test_configure_names_a_python_without_triton(tmp_path):
    """CMake stops at configure, saying which Python lacks triton and what to pass instead."""
    python = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter the venv was made from: no triton
    probe = subprocess.run([str(python), "-c", "import triton"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{python} has triton")
    run = subprocess.run(["cmake", "-S", str(Path(__file__).resolve().parents[2] / "plugins"), "-B", str(tmp_path),
                          f"-DPython3_EXECUTABLE={python}"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "cannot import triton" in run.stderr and "-DPython3_EXECUTABLE" in run.stderr, run.stderr[-2000:]
