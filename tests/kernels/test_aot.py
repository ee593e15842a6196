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
LARGEST = "expert_in_f32_orig_glu_m64"  # the variant with the most shared memory


def test_every_variant_has_a_complete_signature():
    names = [v.name for v in aot.variants()]
    assert len(names) == len(set(names)) == 44  # 12 of them the INT8 class (docs/spec.md §5a)
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
    table = (tmp_path / "rqMoeKernelTable.h").read_text()
    assert "constexpr int32_t kDispatchBlockA = 128;" in table
    assert f"kEmbeddedArchs[kNumEmbeddedArchs > 0 ? kNumEmbeddedArchs : 1] = {{{arch}}};" in table
    assert re.search(rf'"combine_f32", "\w+", {arch}, {"true" if arch >= 90 else "false"},', header), \
        "sm_90 and later cubins are marked architecture-specific (Triton emits sm_XYa code)"


def test_activation_table_is_rq_core_experts():
    """The C++ table the plugin switches on is generated from the one Python definition (docs/spec.md §8)."""
    from rq.core.experts import ACTIVATIONS, GLU_ACTIVATIONS

    assert [name for name, _ in aot.activation_table()] == list(ACTIVATIONS)
    lines = "\n".join(aot.activation_lines())
    assert ", ".join(f'"{a}"' for a in ACTIVATIONS) in lines
    assert ", ".join("true" if a in GLU_ACTIVATIONS else "false" for a in ACTIVATIONS) in lines


@pytest.mark.parametrize("arch", [a for a in aot.DEFAULT_ARCHS if a not in (80, 90)])
def test_every_default_arch_compiles_within_its_shared_memory(tmp_path, arch):
    """Each compute capability the plugin ships cubins for compiles, the largest variant within its shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "rq.kernels.aot", "--out", str(tmp_path), "--arch", str(arch),
                          "--only", LARGEST], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    (meta,) = json.loads((tmp_path / "rq_kernels.json").read_text())["kernels"]
    assert meta["arch"] == arch and 0 < meta["shared"] <= aot.MAX_SHARED_BYTES[arch]
    assert meta["sm"] == f"sm_{arch}" + ("a" if arch >= 90 else "")
