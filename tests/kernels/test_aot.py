"""AOT compilation of the kernels to cubins without a GPU (Triton's compiler only needs ptxas)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

aot = pytest.importorskip("rq.kernels.aot")
ROOT = Path(__file__).resolve().parents[2]

FEW = ["dispatch_count_i64", "expert_in_f16_int4_glu_m16", "combine_f32"]


def test_every_variant_has_a_complete_signature():
    names = [v.name for v in aot.variants()]
    assert len(names) == len(set(names)) == 32
    for v in aot.variants():
        fn = aot._fn(v)
        params = getattr(fn, "arg_names", None) or list(fn.fn.__code__.co_varnames[: fn.fn.__code__.co_argcount])
        assert set(params) == set(v.signature) | set(v.constexprs), v.name


@pytest.mark.parametrize("arch", [80, 90])
def test_build_cubins_json_and_header(tmp_path, arch):
    # A fresh process: this one may have the kernels interpreted (TRITON_INTERPRET=1, see conftest).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "rq.kernels.aot", "--out", str(tmp_path), "--arch", str(arch),
                          "--only", *FEW], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "rq_kernels.json").read_text())
    assert doc["format"] == "rq-cubins" and len(doc["kernels"]) == len(FEW)
    for m in doc["kernels"]:
        cubin = (tmp_path / m["file"]).read_bytes()
        assert cubin[:4] == b"\x7fELF", "a cubin is an ELF image"
        assert m["arch"] == arch and m["num_warps"] == 4 and m["shared"] >= 0
        assert m["params"] and all(t != "constexpr" for _, t in m["params"])
    header = (tmp_path / "rqMoeCubins.h").read_text()
    assert f"kCubin_expert_in_f16_int4_glu_m16_sm{arch}" in header
    assert re.search(r"kNumEmbeddedKernels = 3;", header)
    assert "constexpr int32_t kDispatchBlockA = 128;" in header
