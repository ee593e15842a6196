"""Benchmark of the rq::RQMoE Triton kernels (docs/kernels.md). Needs a CUDA GPU; prints that and exits 0 without.

1. INT4 grouped expert GEMMs (gate/up + down, dequantized in registers) vs FP16 ``torch.matmul`` per expert,
   at 1, 16, 128 and 512 tokens per expert (``--tokens-per-expert``), on Mixtral-like (H=4096, I=14336,
   8 experts, top-2) and DeepSeek-like (H=7168, I=2048, 256 experts, top-8) layers; achieved HBM bandwidth
   as % of the copy bandwidth measured in the same run.
2. Whole RQMoE (dispatch + GEMMs + combine, mixed precision with replicas) vs the PyTorch reference MoE.

    python -m benchmarks.bench_kernels [--quick] [--json OUT.json]

Every ratio is against a baseline measured in the same run on the same GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPES = {  # name: (hidden, intermediate, experts, top_k)
    "mixtral": (4096, 14336, 8, 2),
    "deepseek": (7168, 2048, 256, 8),
}
TOKENS_PER_EXPERT = (1, 16, 128, 512)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the practical HBM ceiling."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def int4_layer(hidden: int, inter: int, experts: int, group: int = 128) -> dict[str, torch.Tensor]:
    """Random INT4 weights in the op layout, generated on the GPU (quantizing 256 experts on CPU is slow)."""
    dev = "cuda"
    return {
        "w_in_q": torch.randint(0, 256, (experts, 2 * inter, hidden // 2), dtype=torch.uint8, device=dev),
        "w_in_scales": (torch.rand(experts, 2 * inter, hidden // group, device=dev) * 1e-2).half(),
        "w_out_q": torch.randint(0, 256, (experts, hidden, inter // 2), dtype=torch.uint8, device=dev),
        "w_out_scales": (torch.rand(experts, hidden, inter // group, device=dev) * 1e-2).half(),
    }


def bench_grouped_gemm(name: str, peak: float, tokens_per_expert: tuple[int, ...]) -> list[dict]:
    import triton
    import triton.testing

    from rq.kernels import dispatch, gemm, moe
    from rq.core.op import activation_code

    hidden, inter, experts, top_k = SHAPES[name]
    q = int4_layer(hidden, inter, experts)
    w16_in = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.float16) * 0.01
    w16_out = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.float16) * 0.01
    tables = dispatch.device_tables(
        torch.ones(experts, dtype=torch.int64), torch.ones(experts, dtype=torch.int64), torch.device("cuda"))
    print(f"\n== {name}: H={hidden} I={inter} experts={experts} top-{top_k}, INT4 g128 vs FP16 torch.matmul ==")
    print(f"{'tok/expert':>10} {'int4 ms':>9} {'fp16 ms':>9} {'speedup':>8} {'int4 GB/s':>10} {'% peak':>7}")
    rows = []
    for tpe in tokens_per_expert:
        tokens = max(1, tpe * experts // top_k)
        ids = (torch.arange(tokens * top_k, device="cuda") % experts).reshape(tokens, top_k).int()  # even loads
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.float16)
        cfg = moe.launch_config(tokens * top_k, experts)
        d = dispatch.dispatch_assignments(ids, None, tables, cfg.block_m)
        a = tokens * top_k
        h = torch.empty(a, inter, device="cuda", dtype=torch.float16)
        out = torch.empty(a, hidden, device="cuda", dtype=torch.float16)
        tiles = triton.cdiv(a, cfg.block_m) + experts
        kw = dict(IS_INT4=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  DOT_DTYPE=gemm.tl.float16, DOT_PRECISION="tf32", num_warps=cfg.num_warps)

        def run_int4() -> None:
            gemm.expert_in_kernel[(tiles, triton.cdiv(inter, cfg.block_n))](
                x, q["w_in_q"], q["w_in_scales"], h, d.sorted_assign, d.copy_start, d.tile_start[1], tables.slot,
                experts, hidden, inter, top_k, activation_code("silu_glu"), 128, GLU=True, **kw)
            gemm.expert_out_kernel[(tiles, triton.cdiv(hidden, cfg.block_n))](
                h, q["w_out_q"], q["w_out_scales"], out, d.sorted_assign, d.copy_start, d.tile_start[1], tables.slot,
                experts, hidden, inter, 128, **kw)

        xs = [x[(ids == e).any(dim=1)] for e in range(experts)]  # tokens of each expert, gathered outside timing

        def run_fp16() -> None:
            for e in range(experts):
                g = torch.matmul(xs[e], w16_in[e].T)
                torch.matmul(torch.nn.functional.silu(g[:, :inter]) * g[:, inter:], w16_out[e].T)

        t4 = triton.testing.do_bench(run_int4, warmup=10, rep=50, return_mode="median")
        t16 = triton.testing.do_bench(run_fp16, warmup=10, rep=50, return_mode="median")
        weight_bytes = sum(v.numel() * v.element_size() for v in q.values())
        act_bytes = 2 * (a * hidden * 2 + a * inter * 2)
        bw = (weight_bytes + act_bytes) / (t4 * 1e-3)
        print(f"{tpe:>10} {t4:>9.3f} {t16:>9.3f} {t16 / t4:>7.2f}x {bw / 1e9:>10.0f} {100 * bw / peak:>6.1f}%")
        rows.append({"shape": name, "tokens_per_expert": tpe, "int4_ms": t4, "fp16_ms": t16, "speedup": t16 / t4,
                     "int4_bytes_per_s": bw, "percent_of_copy_bandwidth": 100 * bw / peak})
    torch.cuda.empty_cache()
    return rows


def bench_whole_moe(quick: bool) -> None:
    import triton.testing

    from rq.core.op import RQLayerWeights, rq_moe_reference
    from rq.kernels import rq_moe

    hidden, inter, experts, top_k = 2048, 1024, 64, 8
    copies = [2 if e < 8 else 1 for e in range(experts)]
    precision = [1 if (p % 2) else 0 for p in range(sum(copies))]
    n0, n1 = precision.count(0), precision.count(1)
    q = int4_layer(hidden, inter, n1)
    w_in = torch.randn(n0, 2 * inter, hidden, device="cuda", dtype=torch.float16) * 0.02
    w_out = torch.randn(n0, hidden, inter, device="cuda", dtype=torch.float16) * 0.02
    layer = RQLayerWeights(top_k, "silu_glu", 128, tuple(copies), tuple(precision), w_in, w_out, q["w_in_q"],
                           q["w_in_scales"], q["w_out_q"], q["w_out_scales"])
    print(f"\n== whole RQMoE (H={hidden} I={inter} {experts} experts, {sum(copies)} copies, top-{top_k}) "
          "vs PyTorch reference ==")
    print(f"{'tokens':>7} {'triton ms':>10} {'reference ms':>13} {'speedup':>8}")
    for tokens in (1, 16, 256) if quick else (1, 4, 16, 64, 256, 1024):
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.float16)
        ids = torch.topk(torch.randn(tokens, experts, device="cuda"), top_k).indices
        w = torch.softmax(torch.randn(tokens, top_k, device="cuda"), -1).half()
        tk = triton.testing.do_bench(lambda: rq_moe(x, ids, w, layer), warmup=5, rep=30, return_mode="median")
        tr = triton.testing.do_bench(lambda: rq_moe_reference(x, ids, w, layer, compute_dtype=torch.float16),
                                     warmup=2, rep=10, return_mode="median")
        print(f"{tokens:>7} {tk:>10.3f} {tr:>13.3f} {tr / tk:>7.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens-per-expert", type=int, nargs="+", default=list(TOKENS_PER_EXPERT))
    parser.add_argument("--no-whole-moe", action="store_true", help="only the grouped GEMMs")
    parser.add_argument("--json", type=Path, help="also write the grouped-GEMM rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: a CUDA GPU is needed to benchmark the kernels; nothing was measured.")
        return 0
    peak = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {peak / 1e12:.2f} TB/s")
    tpe = tuple(args.tokens_per_expert[:2] if args.quick else args.tokens_per_expert)
    rows = [row for name in args.shapes for row in bench_grouped_gemm(name, peak, tpe)]
    if args.json is not None:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_bytes_per_s": peak,
                                         "grouped_gemm": rows}, indent=1) + "\n")
    if not args.no_whole_moe:
        bench_whole_moe(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
