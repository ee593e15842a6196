"""Configure and build plugins/ with CMake (launcher, embedded cubins, host test, plugin stub check).

Needs cmake, a C++ compiler and the CUDA toolkit headers (nvcc); skipped cleanly without them. The real
TensorRT target is only configured when TensorRT is found, which CI does not have.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _have_cuda_toolkit() -> bool:
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/include/cuda.h").exists()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.skipif(not _have_cuda_toolkit(), reason="CUDA toolkit (nvcc, cuda.h) not installed")
def test_cmake_build_and_host_test(tmp_path):
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT / "plugins"), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
         "-DRQ_PLUGIN_STUB_CHECK=ON", f"-DRQ_AOT_JOBS={max(1, min(4, os.cpu_count() or 1))}"],
        capture_output=True, text=True, env=env)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "TensorRT not found" in configure.stdout or "TensorRT found" in configure.stdout
    built = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stdout[-5000:] + built.stderr[-5000:]
    assert (build / "cubins" / "rqMoeCubins.h").exists()
    host = subprocess.run([str(build / "rq_moe_host_test")], capture_output=True, text=True)
    assert host.returncode == 0, host.stdout + host.stderr
    assert "0 failed" in host.stdout
