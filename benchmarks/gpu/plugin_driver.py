"""The TensorRT plugin's IPluginV3 runtime path on a GPU with no TensorRT: plugins/tests/rqMoePluginDriver.cpp.

Each case (a layer of docs/spec.md §8 and one call) is written to a folder; the C++ driver takes the plugin
through creator -> build-phase calls -> serialization -> attachToContext -> onShapeChange -> enqueue (direct and
inside a CUDA graph) and writes ``y`` and ``expert_counts``; they are compared with the float32
:func:`rq.core.op.rq_moe_reference` on the same weights by :func:`rq.export.parity.compare_run_results`
(docs/spec.md §9: float16 ``atol 2e-2, rtol 1e-2``, float32 ``1e-4, 1e-3``; counts exact).

    python -m benchmarks.gpu.plugin_driver --driver build/plugins/rq_moe_plugin_driver \\
        --plugin build/plugins/librq_moe_plugin.so --out OUT [--build-only]

``--build-only`` stops the driver before its first CUDA call (machines without a GPU: CI).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rq.core import int4, int8
from rq.core.experts import is_glu
from rq.core.op import CALL_INPUTS, RQLayerWeights, rq_moe_reference

DTYPES = {"f16": (torch.float16, "float16"), "f32": (torch.float32, "float32")}
IDS = {"i32": torch.int32, "i64": torch.int64}


@dataclass(frozen=True)
class Case:
    """One layer and one call of the op; ``copies``/``precision`` as the node attributes (0 original, 1 INT4,
    2 INT8). ``int8_class``: the node carries the INT8 inputs (docs/spec.md §8; always where a copy is INT8)."""

    name: str
    copies: tuple[int, ...]
    precision: tuple[int, ...]
    hidden: int
    inter: int
    activation: str
    group_size: int
    tokens: int
    top_k: int = 2
    dtype: str = "f16"
    ids: str = "i32"
    rotate_offsets: bool = False  # streaming: non-zero replica offsets
    int8_class: bool = False


CASES = (
    Case("mixed_replicas_f16", (2, 1, 1, 3, 1, 1, 1, 1), (0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0), 256, 128, "silu_glu", 128, 37,
         rotate_offsets=True),
    # LLaMA-MoE v1's expert width: I = 688 = 5 blocks of 128 and a partial one of 48 (docs/spec.md §5).
    Case("llama_moe_688_partial_block_f16", (1, 2, 1, 1), (1, 1, 1, 0, 1), 512, 688, "silu_glu", 128, 64, ids="i64"),
    Case("decode_one_token_f32", (1, 1, 2, 1), (0, 1, 1, 0, 1), 128, 176, "gelu_tanh", 64, 1, dtype="f32"),
    Case("prefill_64_row_tiles_f16", tuple([2] * 4 + [1] * 12), tuple(([0, 1] * 4) + [1, 0] * 6), 512, 256,
         "gelu_tanh_glu", 64, 512, top_k=4),
    Case("all_int4_relu_f32", (1, 1, 1), (1, 1, 1), 64, 64, "relu", 64, 9, top_k=1, dtype="f32", ids="i64"),
    # Mixed plans (docs/spec.md §5a): all three precisions, replicas of either quantized format, partial blocks.
    Case("mixed_int8_replicas_f16", (3, 1, 2, 1, 1, 2), (0, 2, 1, 2, 1, 2, 0, 0, 2, 1), 256, 176, "silu_glu", 64, 53,
         rotate_offsets=True, int8_class=True),
    Case("mixed_int8_688_partial_block_f32", (2, 1, 1, 2), (0, 2, 1, 2, 0, 1), 128, 688, "gelu_tanh", 128, 17,
         dtype="f32", ids="i64", int8_class=True),
    Case("int8_prefill_64_row_tiles_f16", tuple([2] * 4 + [1] * 4), tuple([0, 2, 2, 2, 0, 1, 0, 2] + [2, 0, 1, 2]), 256,
         128, "gelu_glu", 128, 400, top_k=4, int8_class=True),
    Case("empty_int8_class_f16", (1, 2, 1), (0, 1, 1, 0), 128, 64, "silu_glu", 64, 11, int8_class=True),
)


def make_call(case: Case, seed: int = 0) -> tuple[RQLayerWeights, dict[str, torch.Tensor]]:
    """Random weights (INT4 and INT8 copies quantized by rq.core.int4 / rq.core.int8) and routing with dropped ids
    (-1 and N)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype][0]
    in_rows = 2 * case.inter if is_glu(case.activation) else case.inter
    n_orig, n_int4, n_int8 = case.precision.count(0), case.precision.count(1), case.precision.count(2)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / cols**0.5

    def stack(items: list[torch.Tensor], *empty: int, dt: torch.dtype) -> torch.Tensor:
        return torch.stack(items) if items else torch.zeros(0, *empty, dtype=dt)

    q_in = [int4.quantize(weight(in_rows, case.hidden), case.group_size) for _ in range(n_int4)]
    q_out = [int4.quantize(weight(case.hidden, case.inter), case.group_size) for _ in range(n_int4)]
    g = case.group_size
    int8_class = {}
    if case.int8_class or n_int8:
        q8_in = [int8.quantize(weight(in_rows, case.hidden), g) for _ in range(n_int8)]
        q8_out = [int8.quantize(weight(case.hidden, case.inter), g) for _ in range(n_int8)]
        int8_class = dict(
            w_in_q8=stack([q.values for q in q8_in], in_rows, case.hidden, dt=torch.int8),
            w_in_scales8=stack([q.scales for q in q8_in], in_rows, int4.num_blocks(case.hidden, g), dt=torch.float16),
            w_out_q8=stack([q.values for q in q8_out], case.hidden, case.inter, dt=torch.int8),
            w_out_scales8=stack([q.scales for q in q8_out], case.hidden, int4.num_blocks(case.inter, g),
                                dt=torch.float16))
    layer = RQLayerWeights(
        case.top_k, case.activation, g, case.copies, case.precision,
        stack([weight(in_rows, case.hidden).to(dtype) for _ in range(n_orig)], in_rows, case.hidden, dt=dtype),
        stack([weight(case.hidden, case.inter).to(dtype) for _ in range(n_orig)], case.hidden, case.inter, dt=dtype),
        stack([q.packed for q in q_in], in_rows, int4.packed_width(case.hidden), dt=torch.uint8),
        stack([q.scales for q in q_in], in_rows, int4.num_blocks(case.hidden, g), dt=torch.float16),
        stack([q.packed for q in q_out], case.hidden, int4.packed_width(case.inter), dt=torch.uint8),
        stack([q.scales for q in q_out], case.hidden, int4.num_blocks(case.inter, g), dt=torch.float16),
        **int8_class,
    )
    n = len(case.copies)
    logits = torch.randn(case.tokens, n, generator=gen) + torch.linspace(2, -2, n)  # uneven loads
    ids = torch.topk(logits, min(case.top_k, n), dim=-1).indices
    dropped = torch.rand(case.tokens, case.top_k, generator=gen) < 0.1
    ids = torch.where(dropped, torch.where(torch.rand(ids.shape, generator=gen) < 0.5, -1, n), ids)
    offsets = (torch.randint(0, 1 << 20, (n,), generator=gen) if case.rotate_offsets
               else torch.zeros(n, dtype=torch.int64))
    call = {
        "hidden": torch.randn(case.tokens, case.hidden, generator=gen).to(dtype),
        "topk_ids": ids.to(IDS[case.ids]),
        "topk_weights": torch.softmax(torch.randn(case.tokens, case.top_k, generator=gen), -1).to(dtype),
        "offsets": offsets.to(torch.int64),
    }
    return layer, call


_TYPE_CODES = {torch.float16: "f16", torch.float32: "f32", torch.int32: "i32", torch.int64: "i64", torch.uint8: "i8",
               torch.int8: "i8"}


def write_case(folder: Path, layer: RQLayerWeights, call: dict[str, torch.Tensor]) -> None:
    """``case.txt`` and one ``.bin`` per input (docs/spec.md §8 order, the INT8 class where the layer carries it);
    packed bytes INT8-typed, as in ONNX files."""
    folder.mkdir(parents=True, exist_ok=True)
    attrs = layer.attributes()
    lines = [f"attr num_experts {attrs['num_experts']}", f"attr top_k {attrs['top_k']}",
             f"attr group_size {attrs['group_size']}", f"attr activation {attrs['activation']}",
             "ints copies " + " ".join(map(str, attrs["copies"])), "ints precision " + " ".join(map(str, attrs["precision"]))]
    names = CALL_INPUTS + layer.weight_names
    tensors = {**call, **dict(zip(layer.weight_names, layer.tensors()))}
    for name in names:
        t = tensors[name].contiguous()
        lines.append(f"tensor {name} {_TYPE_CODES[t.dtype]} {t.dim()} " + " ".join(map(str, t.shape)))
        (folder / f"{name}.bin").write_bytes(t.numpy().tobytes())
    (folder / "case.txt").write_text("\n".join(lines) + "\n")


def run_driver(driver: Path, plugin: Path, folder: Path, build_only: bool, repeat: int = 0) -> tuple[bool, str]:
    """Run the C++ driver on one case folder: ``(all its checks passed, its output)``."""
    cmd = [str(driver), str(plugin), str(folder)] + (["--build-only"] if build_only else []) + \
        (["--repeat", str(repeat)] if repeat else [])
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    m = re.search(r"(\d+) passed, (\d+) failed", out)
    return run.returncode == 0 and m is not None and int(m.group(2)) == 0, out


def compare(folder: Path, case: Case, layer: RQLayerWeights, call: dict[str, torch.Tensor]):
    """The driver's outputs vs the float32 reference, as the one parity comparison of rq (per output rows)."""
    from polygraphy.comparator import IterationResult, RunResults

    from rq.export.parity import compare_run_results

    y_ref, counts_ref = rq_moe_reference(call["hidden"].float(), call["topk_ids"], call["topk_weights"].float(), layer,
                                         call["offsets"])
    np_dtype = np.float16 if case.dtype == "f16" else np.float32
    got = {"y": np.fromfile(folder / "y.bin", dtype=np_dtype).reshape(tuple(y_ref.shape)).astype(np.float32),
           "expert_counts": np.fromfile(folder / "expert_counts.bin", dtype=np.int64)}

    def results(name: str, outputs: dict) -> RunResults:
        r = RunResults()
        r.append((name, [IterationResult(outputs=outputs, runtime=0.0, runner_name=name)]))
        return r

    reference = results("pytorch-reference", {"y": y_ref.numpy(), "expert_counts": counts_ref.numpy()})
    return compare_run_results(reference, results("rq-moe-plugin", got), ["y", "expert_counts"], DTYPES[case.dtype][1],
                               "plugin", case.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", type=Path, required=True, help="rq_moe_plugin_driver (CMake target)")
    parser.add_argument("--plugin", type=Path, required=True, help="librq_moe_plugin.so")
    parser.add_argument("--out", type=Path, required=True, help="folder for the cases, outputs and results.json")
    parser.add_argument("--build-only", action="store_true", help="no CUDA call (no GPU here)")
    parser.add_argument("--repeat", type=int, default=0, help="also time N graph replays per case")
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    args = parser.parse_args(argv)
    results, ok = [], True
    for case in (c for c in CASES if c.name in args.cases):
        folder = args.out / case.name
        layer, call = make_call(case)
        write_case(folder, layer, call)
        passed, output = run_driver(args.driver, args.plugin, folder, args.build_only, args.repeat)
        (folder / "driver.log").write_text(output)
        rows = [] if args.build_only or not passed else compare(folder, case, layer, call)
        for row in rows:
            print(row.line())
        case_ok = passed and all(r.passed for r in rows)
        timing = re.search(r"enqueue \(graph replay\): ([\d.]+) us", output)
        print(f"{'PASSED' if case_ok else 'FAILED'} | {case.name}: driver checks {'passed' if passed else 'FAILED'}"
              + ("" if args.build_only else ", outputs within docs/spec.md §9 of the float32 reference"
                 if case_ok else "") + (f", {timing.group(1)} us per call" if timing else ""))
        if not passed:
            print("\n".join(line for line in output.splitlines() if not line.startswith("PASS:")))
        ok &= case_ok
        results.append({"case": asdict(case), "driver_passed": passed, "build_only": args.build_only,
                        "outputs": [asdict(r) for r in rows], "us_per_call": float(timing.group(1)) if timing else None})
    (args.out / "results.json").write_text(json.dumps({"passed": ok, "cases": results}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
