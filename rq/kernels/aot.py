"""Ahead-of-time compilation of the ``rq::RQMoE`` Triton kernels to cubins for the TensorRT plugin.

Calls ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` directly, which needs no GPU
and no driver (``python -m triton.tools.compile`` asks the driver for its target). Writes, per variant and
architecture, ``<variant>.sm<arch>.cubin``, plus ``rq_kernels.json`` (entry name, warps, shared bytes,
parameter list), ``rqMoeCubins.h``, a C++ header that embeds every cubin for the plugin's launcher, and
``rqMoeKernelTable.h``, its table: tile constants, architectures, and the activation table of
:data:`rq.core.experts.ACTIVATIONS` (the plugin's ABI: generated here, never written by hand).

    python -m rq.kernels.aot --out build/cubins --arch 80 86 89 90 100 103 120

Which cubin runs where: Triton compiles ``sm_80``/``sm_86``/``sm_89`` code that runs on every later GPU of the
same major version, and ``sm_90a``/``sm_100a``/``sm_103a``/``sm_120a`` code (architecture-specific features)
that runs on exactly that compute capability. The header records this per cubin and the launcher picks by it.

Launch convention of a Triton kernel (also in plugins/rqMoeLauncher.cpp): the non-constexpr parameters in
order, then two null pointers (global and profile scratch), ``blockDim.x = 32 * num_warps`` and
``metadata.shared`` bytes of dynamic shared memory (opt-in above 48 KiB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import sm_arch_from_capability
from triton.compiler import ASTSource

from rq.core.experts import ACTIVATIONS, is_glu

from . import combine, dispatch, gemm, moe

DEFAULT_ARCHS = (80, 86, 89, 90, 100, 103, 120)
"""Every compute capability a TensorRT or TensorRT-RTX engine of the plugin can run on: 8.x, 9.0 (H100/H200),
10.0 (B200), 10.3 (B300), 12.0 (RTX 50). 8.7 runs the sm_86 cubins."""
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
                    110: 232448, 120: 101376, 121: 101376}
"""Opt-in shared memory per block (CUDA programming guide, compute capabilities table): a variant that needs
more cannot launch there, so the build fails instead of the engine."""
ACT_TYPES = {"f16": "fp16", "f32": "fp32"}
DOT = {"f16": (tl.float16, "tf32"), "f32": (tl.float32, "ieee")}
# Integer parameters the plugin guarantees to be multiples of 16 (it checks H and I at configure time).
DIVISIBLE_INTS = {"hidden_size", "inter_size"}


@dataclass(frozen=True)
class Variant:
    """One compiled specialization: ``name`` is the key the launcher looks up (plus the arch)."""

    name: str
    kernel: str  # attribute of the module holding the @triton.jit function
    module: str
    signature: dict[str, str]  # non-constexpr parameter -> Triton type, in parameter order
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def _fn(v: Variant) -> triton.JITFunction:
    return getattr({"dispatch": dispatch, "gemm": gemm, "combine": combine}[v.module], v.kernel)


def variants() -> list[Variant]:
    """Every kernel specialization the plugin may launch (FP16/FP32 activations, INT32/INT64 ids, the three
    weight classes)."""
    out: list[Variant] = []
    for ids, ity in (("i32", "*i32"), ("i64", "*i64")):
        out.append(Variant(f"dispatch_count_{ids}", "dispatch_count_kernel", "dispatch",
                           {"ids_ptr": ity, "eid_ptr": "*i32", "lrank_ptr": "*i32", "hist_ptr": "*i32",
                            "num_assign": "i32", "num_experts": "i32"},
                           {"BLOCK_A": dispatch.BLOCK_A, "BLOCK_N": dispatch.BLOCK_N}))
    out.append(Variant("dispatch_scan", "dispatch_scan_kernel", "dispatch",
                       {"hist_ptr": "*i32", "counts_ptr": "*i64", "num_blocks": "i32", "num_experts": "i32"},
                       {"BLOCK_B": dispatch.BLOCK_B, "BLOCK_N": dispatch.BLOCK_N}))
    for bm in moe.BLOCK_M_CHOICES:
        out.append(Variant(f"dispatch_copies_m{bm}", "dispatch_copies_kernel", "dispatch",
                           {"counts_ptr": "*i64", "offsets_ptr": "*i64", "logcnt_ptr": "*i32", "base_ptr": "*i32",
                            "phy2log_ptr": "*i32", "prec_ptr": "*i32", "copy_start_ptr": "*i32",
                            "tile_start0_ptr": "*i32", "tile_start1_ptr": "*i32", "tile_start2_ptr": "*i32",
                            "num_phys": "i32"},
                           {"BLOCK_M": bm, "BLOCK_P": dispatch.BLOCK_P}))
    out.append(Variant("dispatch_scatter", "dispatch_scatter_kernel", "dispatch",
                       {"eid_ptr": "*i32", "lrank_ptr": "*i32", "prefix_ptr": "*i32", "offsets_ptr": "*i64",
                        "logcnt_ptr": "*i32", "base_ptr": "*i32", "copy_start_ptr": "*i32",
                        "sorted_assign_ptr": "*i32", "assign_pos_ptr": "*i32", "phys_ptr": "*i32",
                        "num_assign": "i32", "num_experts": "i32"},
                       {"BLOCK_A": dispatch.BLOCK_A}))
    for dt, ty in ACT_TYPES.items():
        dot_dtype, dot_prec = DOT[dt]
        # Weight classes (docs/spec.md §8): original values, packed INT4 bytes (§5), INT8 values (§5a).
        for cls, wty in (("orig", f"*{ty}"), ("int4", "*u8"), ("int8", "*i8")):
            for bm in moe.BLOCK_M_CHOICES:
                tiles = {"BLOCK_M": bm, "BLOCK_N": moe.BLOCK_N, "BLOCK_K": moe.BLOCK_K, "DOT_DTYPE": dot_dtype,
                         "DOT_PRECISION": dot_prec, "IS_INT4": cls == "int4", "IS_INT8": cls == "int8"}
                common = {"sorted_assign_ptr": "*i32", "copy_start_ptr": "*i32", "tile_start_ptr": "*i32",
                          "slot_ptr": "*i32", "num_phys": "i32", "hidden_size": "i32", "inter_size": "i32"}
                for glu in (False, True):
                    sig = {"x_ptr": f"*{ty}", "w_ptr": wty, "s_ptr": "*fp16", "h_ptr": f"*{ty}", **common,
                           "top_k": "i32", "act": "i32", "group_size": "i32"}
                    out.append(Variant(f"expert_in_{dt}_{cls}_{'glu' if glu else 'plain'}_m{bm}", "expert_in_kernel",
                                       "gemm", sig, {**tiles, "GLU": glu}, num_warps=moe.NUM_WARPS))
                sig = {"h_ptr": f"*{ty}", "w_ptr": wty, "s_ptr": "*fp16", "out_ptr": f"*{ty}", **common,
                       "group_size": "i32"}
                out.append(Variant(f"expert_out_{dt}_{cls}_m{bm}", "expert_out_kernel", "gemm", sig, tiles,
                                   num_warps=moe.NUM_WARPS))
        out.append(Variant(f"combine_{dt}", "combine_kernel", "combine",
                           {"out_ptr": f"*{ty}", "weights_ptr": f"*{ty}", "eid_ptr": "*i32", "y_ptr": f"*{ty}",
                            "hidden_size": "i32", "top_k": "i32", "num_experts": "i32"},
                           {"BLOCK_H": combine.BLOCK_H}))
    return out


def compile_variant(v: Variant, arch: int) -> dict[str, Any]:
    """Compile one variant for ``sm_<arch>``; returns its metadata and cubin bytes."""
    fn = _fn(v)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("AOT compilation needs the real Triton compiler: unset TRITON_INTERPRET before "
                           "rq.kernels is imported")
    names = fn.arg_names
    missing = [n for n in names if n not in v.signature and n not in v.constexprs]
    if missing:
        raise ValueError(f"variant {v.name}: parameters {missing} have neither a type nor a constexpr value")
    signature = {n: (v.signature[n] if n in v.signature else "constexpr") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in DIVISIBLE_INTS}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(v.constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{v.name} sm_{arch}: kernels that need global/profile scratch are not supported")
    if md.shared > MAX_SHARED_BYTES.get(arch, 101376):  # unknown architectures: the smallest limit
        raise RuntimeError(f"{v.name} needs {md.shared} bytes of shared memory, sm_{arch} offers "
                           f"{MAX_SHARED_BYTES.get(arch, 101376)}; lower num_stages for this variant")
    cubin = compiled.asm["cubin"]
    return {
        "name": v.name,
        "arch": arch,
        "sm": sm_arch_from_capability(arch),  # e.g. sm_90a: runs on exactly 9.0
        "entry": md.name,
        "num_warps": md.num_warps,
        "shared": md.shared,
        "params": [[n, signature[n]] for n in names if signature[n] != "constexpr"],
        "constexprs": {k: str(val) for k, val in v.constexprs.items()},
        "sha256": hashlib.sha256(cubin).hexdigest(),
        "cubin": cubin,
    }


def _compile_job(job: tuple[str, int]) -> dict[str, Any]:
    name, arch = job
    return compile_variant(next(v for v in variants() if v.name == name), arch)


def _c_ident(name: str, arch: int) -> str:
    return f"kCubin_{name}_sm{arch}"


def launch_constants() -> dict[str, int]:
    """Compile-time tile sizes shared with plugins/rqMoeLauncher.cpp through the generated header."""
    return {
        "kDispatchBlockA": dispatch.BLOCK_A,
        "kDispatchBlockN": dispatch.BLOCK_N,
        "kDispatchBlockB": dispatch.BLOCK_B,
        "kDispatchBlockP": dispatch.BLOCK_P,
        "kGemmBlockN": moe.BLOCK_N,
        "kGemmBlockK": moe.BLOCK_K,
        "kGemmBlockMSmall": moe.BLOCK_M_CHOICES[0],
        "kGemmBlockMLarge": moe.BLOCK_M_CHOICES[1],
        "kCombineBlockH": combine.BLOCK_H,
    }


def activation_table() -> list[tuple[str, bool]]:
    """``(name, gated)`` per activation code: :data:`rq.core.experts.ACTIVATIONS` in order."""
    return [(name, is_glu(name)) for name in ACTIVATIONS]


def activation_lines() -> list[str]:
    """C++ declarations of the activation table (index = the ``act`` code the kernels switch on)."""
    table = activation_table()
    return [
        "// Activations of rq::RQMoE: rq.core.experts.ACTIVATIONS, index = integer code (the plugin's ABI).",
        f"constexpr int32_t kNumActivations = {len(table)};",
        "constexpr char const* kActivationNames[kNumActivations] = {"
        + ", ".join(f'"{name}"' for name, _ in table) + "};",
        "constexpr bool kActivationIsGlu[kNumActivations] = {"
        + ", ".join("true" if glu else "false" for _, glu in table) + "};",
    ]


def table_header_text(entries: list[dict[str, Any]]) -> str:
    """``rqMoeKernelTable.h``: what the launcher needs to know of the cubins (the ``EmbeddedKernel`` record, tile
    constants, activation table, architectures), small enough to include anywhere."""
    archs = sorted({e["arch"] for e in entries})
    lines = [
        "// Generated by `python -m rq.kernels.aot`: the table of rq::RQMoE's embedded Triton cubins. Do not edit.",
        "#pragma once",
        "#include <cstddef>",
        "#include <cstdint>",
        "",
        "namespace rq",
        "{",
        "struct EmbeddedKernel",
        "{",
        "    char const* name;  // variant, e.g. expert_in_f16_int4_glu_m16",
        "    char const* entry; // function name inside the cubin",
        "    int32_t arch;      // compute capability major*10+minor it was compiled for",
        "    bool archSpecific; // sm_<arch>a code: runs on exactly `arch`; else on `arch` and later of the same major",
        "    int32_t numWarps;",
        "    int32_t sharedBytes;",
        "    int32_t numParams; // without the two trailing scratch pointers",
        "    unsigned char const* cubin;",
        "    size_t cubinSize;",
        "};",
        "",
        "// Tile constants the kernels were compiled with (the launcher's grids depend on them).",
        *[f"constexpr int32_t {k} = {v};" for k, v in launch_constants().items()],
        "",
        *activation_lines(),
        "",
        "// Architectures with cubins, ascending.",
        f"constexpr int32_t kNumEmbeddedArchs = {len(archs)};",
        "constexpr int32_t kEmbeddedArchs[kNumEmbeddedArchs > 0 ? kNumEmbeddedArchs : 1] = {"
        + ", ".join(map(str, archs or [0])) + "};",
        "",
        "// Defined in rqMoeCubins.h, which exactly one translation unit includes.",
        "extern EmbeddedKernel const kEmbeddedKernels[];",
        "extern int32_t const kNumEmbeddedKernels;",
        "} // namespace rq",
    ]
    return "\n".join(lines) + "\n"


def header_text(entries: list[dict[str, Any]]) -> str:
    """``rqMoeCubins.h``: one byte array per cubin and the table ``kEmbeddedKernels`` the launcher searches."""
    lines = [
        "// Generated by `python -m rq.kernels.aot`: Triton cubins of rq::RQMoE. Do not edit.",
        "// Include from one translation unit only (plugins/rqMoeCubins.cpp): it defines the cubin bytes.",
        "#pragma once",
        '#include "rqMoeKernelTable.h"',
        "",
        "namespace rq",
        "{",
    ]
    for e in entries:
        data = e["cubin"]
        body = ",".join(str(b) for b in data)
        lines.append(f"alignas(16) static unsigned char const {_c_ident(e['name'], e['arch'])}[{len(data)}] = {{{body}}};")
    lines.append("")
    lines.append("EmbeddedKernel const kEmbeddedKernels[] = {")
    for e in entries:
        specific = "true" if e["sm"].endswith("a") else "false"
        lines.append(f'    {{"{e["name"]}", "{e["entry"]}", {e["arch"]}, {specific}, {e["num_warps"]}, {e["shared"]}, '
                     f'{len(e["params"])}, {_c_ident(e["name"], e["arch"])}, sizeof({_c_ident(e["name"], e["arch"])})}},')
    lines.append("};")
    lines.append(f"int32_t const kNumEmbeddedKernels = {len(entries)};")
    lines.append("} // namespace rq")
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    """Keep the timestamp when nothing changed (CMake then rebuilds nothing)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def build(out_dir: Path, archs: tuple[int, ...] = DEFAULT_ARCHS, only: list[str] | None = None,
          jobs: int = 1) -> list[dict[str, Any]]:
    """Compile all (or ``only`` the named) variants for ``archs`` into ``out_dir``; returns the metadata."""
    # Line info triples the cubin size (and the embedding header); profilers still see kernel names.
    os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [v.name for v in variants() if only is None or v.name in only]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {[v.name for v in variants()]}")
    work = [(n, a) for a in archs for n in names]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            entries = list(pool.map(_compile_job, work))
    else:
        entries = [_compile_job(w) for w in work]
    for e in entries:
        (out_dir / f"{e['name']}.sm{e['arch']}.cubin").write_bytes(e["cubin"])
    meta = [{k: v for k, v in e.items() if k != "cubin"} | {"file": f"{e['name']}.sm{e['arch']}.cubin"} for e in entries]
    doc = {"format": "rq-cubins", "version": 1, "triton": triton.__version__, "kernels": meta}
    (out_dir / "rq_kernels.json").write_text(json.dumps(doc, indent=1) + "\n")
    _write_if_changed(out_dir / "rqMoeKernelTable.h", table_header_text(entries))
    _write_if_changed(out_dir / "rqMoeCubins.h", header_text(entries))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder for cubins, JSON and header")
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help=f"compute capabilities, default {' '.join(map(str, DEFAULT_ARCHS))}")
    parser.add_argument("--only", nargs="*", help="compile only these variants (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    parser.add_argument("--list", action="store_true", help="print the variant names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(v.name for v in variants()))
        return 0
    start = time.perf_counter()
    meta = build(args.out, tuple(args.arch), args.only, args.jobs)
    print(f"rq.kernels.aot: {len(meta)} cubins for sm_{'/sm_'.join(map(str, args.arch))} in "
          f"{time.perf_counter() - start:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
