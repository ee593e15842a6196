"""Memory of every stage on models at a real MoE layer shape, as the number of decoder layers grows.

Writes a random-weight Qwen3-MoE checkpoint at Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of width
768, top-8, 32/4 attention heads of 128, vocabulary 151936, bfloat16, one tensor per expert as the released
checkpoint names them, one shard per decoder layer with an index), shard by shard (one layer in memory while
writing). Folders with 2, 4 and 8 layers share those shards (their configs and indexes say fewer layers).
Each stage then runs as its own ``rq`` process; a sampler reads ``RssAnon`` (what cannot be dropped: mapped
checkpoint pages are reclaimable) and ``VmRSS`` of the process every 0.1 s.

    python -m benchmarks.bench_scale --work /big/disk/scale [--layers 2,4,8] [--stages calibrate,plan,eval,export]

``--kept-max N`` also runs calibration with every layer kept once read and the parity check with one ONNX Runtime
session per file (``--stream never``: what holding the whole model costs) as the baselines. Results:
``benchmarks/plots/scale.json``, a markdown table on stdout (for
RESULTS.md) and ``benchmarks/plots/scale_memory.png``; ``--from-json`` redraws both from a stored run.
Not a test: it writes about 10.4 GiB and runs for many minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
             intermediate_size=6144, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
             hidden_act="silu", model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], dtype="bfloat16",
             pad_token_id=0, eos_token_id=1, bos_token_id=None)
DTYPE = torch.bfloat16


def _layer_tensors(layer: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors, named as the released Qwen3-MoE checkpoints name them."""
    h, i, e, hd = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * hd, SHAPE["num_key_value_heads"] * hd
    p = f"model.layers.{layer}."

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(DTYPE)

    out = {p + "input_layernorm.weight": torch.ones(h, dtype=DTYPE),
           p + "post_attention_layernorm.weight": torch.ones(h, dtype=DTYPE),
           p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
           p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
           p + "self_attn.q_norm.weight": torch.ones(hd, dtype=DTYPE),
           p + "self_attn.k_norm.weight": torch.ones(hd, dtype=DTYPE),
           p + "mlp.gate.weight": rand(e, h, std=0.2)}
    for expert in range(e):
        x = f"{p}mlp.experts.{expert}."
        out[x + "gate_proj.weight"], out[x + "up_proj.weight"] = rand(i, h), rand(i, h)
        out[x + "down_proj.weight"] = rand(h, i)
    return out


def write_checkpoint(root: Path, layers: list[int], seed: int = 0) -> dict[int, Path]:
    """``{n: folder}`` of checkpoints with ``n`` decoder layers; the shards are written once, for the largest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rq.testing.tiny import tiny_tokenizer

    most = max(layers)
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    files = [("embed.safetensors", None)] + [(f"layer-{l:03d}.safetensors", l) for l in range(most)]
    for file, layer in files:
        path = shards / file
        if path.is_file():  # written by an earlier run (same seed and shape)
            with safe_open(str(path), framework="pt") as existing:
                weight_map.update({k: (file, layer) for k in existing.keys()})
            continue
        if layer is None:
            v, h = SHAPE["vocab_size"], SHAPE["hidden_size"]
            tensors = {"model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).to(DTYPE),
                       "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.02).to(DTYPE),
                       "model.norm.weight": torch.ones(h, dtype=DTYPE)}
        else:
            tensors = _layer_tensors(layer, gen)
        save_file(tensors, str(path.with_suffix(".tmp")), metadata={"format": "pt"})
        path.with_suffix(".tmp").rename(path)
        weight_map.update({k: (file, layer) for k in tensors})
        del tensors
    tokenizer = tiny_tokenizer()
    folders = {}
    for n in layers:
        folder = root / f"layers{n}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**SHAPE, "num_hidden_layers": n}, indent=2))
        index = {k: f for k, (f, layer) in weight_map.items() if layer is None or layer < n}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        for file in set(index.values()):
            link = folder / file
            if not link.exists():
                link.symlink_to(shards / file)
        tokenizer.save_pretrained(folder)
        folders[n] = folder
    return folders


def checkpoint_bytes(folder: Path) -> int:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return sum((folder / f).stat().st_size for f in set(index.values()))


# ---------------------------------------------------------------------------------------------------
# measuring a stage

def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def measure(command: list[str], log: Path) -> dict:
    """Run ``command``; its wall time, CPU time (user + system, from ``wait4``: less moved by other work on a
    shared machine than wall time), exit code and the peaks of RssAnon and VmRSS (sampled every 0.1 s)."""
    peaks = {"RssAnon": 0, "VmRSS": 0}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            while not done.is_set():
                for key, value in _status(proc.pid).items():
                    peaks[key] = max(peaks[key], value)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    return {"rc": code, "wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_anon": peaks["RssAnon"],
            "peak_rss": peaks["VmRSS"]}


def stage_commands(folder: Path, work: Path, data: Path, tokens: tuple[int, int], stream: str = "always",
                   check: bool = False, export_dtype: str = "float16") -> dict[str, list[str]]:
    """One ``rq`` command line per stage; ``stream`` is every loading stage's ``--stream`` (``plan`` loads no
    model), ``check`` runs export's parity check inside the export (else ``rq check`` is its own stage)."""
    sequences, seq_len = tokens
    rq = [sys.executable, "-m", "rq.cli.main"]
    stats, plan = work / f"{folder.name}-stats", work / f"{folder.name}-plan.json"
    return {
        "calibrate": rq + ["calibrate", str(folder), "--data", str(data), "--out", str(stats), "--sequences",
                           str(sequences), "--seq-len", str(seq_len), "--batch-size", str(sequences), "--stream",
                           stream],
        "plan": rq + ["plan", str(stats), "--out", str(plan)],
        "eval": rq + ["eval", str(folder), "--plan", str(plan), "--data", str(data), "--sequences", str(sequences),
                      "--seq-len", str(seq_len), "--batch-sizes", "1,2",
                      "--stream-steps", "0", "--stream", stream],
        "export": rq + ["export", str(folder), "--plan", str(plan), "--out", str(work / f"{folder.name}-build"),
                        "--dtype", export_dtype, "--stream", stream, "--force",
                        "--check" if check else "--no-check"],
        "check": rq + ["check", str(work / f"{folder.name}-build"), "--stream", stream],
    }


GIB = 1 << 30


def markdown(results: dict) -> str:
    """The RESULTS.md table: one row per checkpoint and stage."""
    rows = ["| layers | checkpoint | largest layer | stage | peak RssAnon | x layer | peak resident | wall |",
            "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for run in sorted(results["runs"], key=lambda r: r["layers"]):
        for stage, m in run["stages"].items():
            ok = "" if m["rc"] == 0 else f" (exit {m['rc']})"
            rows.append(f"| {run['layers']} | {run['checkpoint_bytes'] / GIB:.2f} GiB | "
                        f"{run['layer_bytes'] / GIB:.2f} GiB | {stage}{ok} | {m['peak_anon'] / GIB:.2f} GiB | "
                        f"{m['peak_anon'] / run['layer_bytes']:.2f} | {m['peak_rss'] / GIB:.2f} GiB | "
                        f"{m['wall_s']:.0f} s |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    """Peak anonymous memory against the number of layers, per stage, with the checkpoint size for scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["runs"], key=lambda r: r["layers"])
    layers = [r["layers"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(layers, [r["checkpoint_bytes"] / GIB for r in runs], "k--", label="checkpoint size")
    stages = [s for s in ("calibrate_kept", "check_whole", "calibrate", "plan", "eval", "export", "check")
              if any(s in r["stages"] for r in runs)]
    baselines = {"calibrate_kept": "calibrate, layers kept (whole model)",
                 "check_whole": "check, one session per file (whole model)"}
    labels = {**baselines, "check": "check, layer by layer"}
    for stage in stages:
        xs = [r["layers"] for r in runs if stage in r["stages"]]
        ys = [r["stages"][stage]["peak_anon"] / GIB for r in runs if stage in r["stages"]]
        ax.plot(xs, ys, "s:" if stage in baselines else "o-", label=labels.get(stage, f"{stage}, streamed"))
    ax.set_xlabel("decoder layers (Qwen3-30B-A3B shape, bfloat16)")
    ax.set_ylabel("peak RssAnon (GiB)")
    ax.set_xticks(layers)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Peak memory per stage ({results['machine']})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the checkpoints (about 10.4 GiB)")
    parser.add_argument("--layers", default="2,4,8")
    parser.add_argument("--stages", default="calibrate,plan,eval,export,check")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--kept-max", type=int, default=0,
                        help="also calibrate with every layer kept and check whole files (the baselines, holding the "
                             "whole model) on checkpoints of up to this many layers")
    parser.add_argument("--export-dtype", default="float16", choices=("float16", "float32"),
                        help="float type of the exported graphs")
    parser.add_argument("--out", type=Path, default=HERE / "plots" / "scale.json")
    parser.add_argument("--from-json", action="store_true", help="redraw the table and plot from --out")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.out.read_text())
        plot(results, args.out.with_name("scale_memory.png"))
        print(markdown(results))
        return results
    layers = [int(n) for n in args.layers.split(",")]
    folders = write_checkpoint(args.work, layers)
    data = args.work / "data.txt"
    data.write_text("\n".join(p.read_text() for p in sorted((HERE.parent / "rq").rglob("*.py"))))
    results = {"machine": "2-core CPU", "shape": "Qwen3-30B-A3B layer", "tokens": [args.sequences, args.seq_len],
               "export_dtype": args.export_dtype, "runs": []}
    for n in layers:
        folder = folders[n]
        run = {"layers": n, "checkpoint_bytes": checkpoint_bytes(folder),
               "layer_bytes": (folder / "layer-000.safetensors").stat().st_size, "stages": {}}
        commands = stage_commands(folder, args.work, data, (args.sequences, args.seq_len),
                                  export_dtype=args.export_dtype)
        if n <= args.kept_max:
            kept = list(commands["calibrate"])
            kept[kept.index("always")] = "never"
            kept[kept.index("--out") + 1] += "-kept"
            whole_check = list(commands["check"])
            whole_check[whole_check.index("always")] = "never"
            commands = {"calibrate_kept": kept, **commands, "check_whole": whole_check}
        for stage, command in commands.items():
            if stage not in args.stages.split(",") + ["calibrate_kept", "check_whole"]:
                continue
            run["stages"][stage] = measure(command, args.work / f"{folder.name}-{stage}.log")
            print(n, stage, run["stages"][stage], flush=True)
        results["runs"].append(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_name("scale_memory.png"))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
