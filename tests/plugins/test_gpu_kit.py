"""benchmarks/gpu/run.sh, the GPU bring-up kit, where no GPU is: its syntax, its arguments, and a dry run that
checks the tools and every option of the commands it would run (the driver it builds compiles in
test_plugin_driver.py; the run itself needs a GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

TENSORRT_HEADERS_ENV = "RQ_TENSORRT_HEADERS"  # as tests/conftest.py reads it

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
STEPS = ("env", "plugin", "host", "pytest", "driver", "bench", "trt", "trt-mixed")
NEEDS_HEADERS = ("plugin", "host", "driver")  # skipped, each with its reason, where no TensorRT headers are

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("cmake") is None, reason="needs bash, cmake")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    headers = Path(os.environ.get(TENSORRT_HEADERS_ENV, "")) / "11.1" / "include"
    if os.environ.get(TENSORRT_HEADERS_ENV) and "TensorRT_INCLUDE_DIR" not in env:
        env["TensorRT_INCLUDE_DIR"] = str(headers)  # the kit's own variable, as a user would set it
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_arguments():
    for args in ((), ("--bogus", "x"), ("a", "b")):
        run = _run(*args)
        assert run.returncode == 2 and "usage:" in run.stderr, (args, run.stderr)


def test_dry_run_plans_every_step_within_its_time_limits(tmp_path):
    run = _run("--dry-run", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    planned = [line.split("[")[1].split(",")[0] for line in run.stdout.splitlines() if line.startswith("would run [")]
    if "TensorRT headers not found" in run.stdout:  # no TensorRT_INCLUDE_DIR and none installed
        assert "SKIPPED plugin: no TensorRT headers" in run.stdout and "SKIPPED driver" in run.stdout, run.stdout
        assert tuple(planned) == tuple(s for s in STEPS if s not in NEEDS_HEADERS), run.stdout
    else:
        assert tuple(planned) == STEPS, run.stdout
    limits = [int(line.split("<= ")[1].split("s]")[0]) for line in run.stdout.splitlines() if line.startswith("would run [")]
    assert sum(limits) <= 8 * 60
    assert "--tokens-per-expert 1 16 128 512" in run.stdout and "check" in run.stdout and "--trt" in run.stdout
    assert "--precisions int4,int8" in run.stdout and "build-mixed" in run.stdout  # the mixed plan's engine too
