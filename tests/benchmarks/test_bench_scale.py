"""bench_scale's table and plot from a results dict (the benchmark itself writes gigabytes: not run here), and
one decoder layer of its checkpoint named and shaped as Qwen3-30B-A3B's."""

from __future__ import annotations

import torch

from benchmarks import bench_scale


def test_layer_tensors_have_the_real_names_and_shapes(monkeypatch):
    small = {**bench_scale.SHAPE, "hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 4, "head_dim": 16,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    monkeypatch.setattr(bench_scale, "SHAPE", small)
    tensors = bench_scale._layer_tensors(3, torch.Generator().manual_seed(0))
    assert tensors["model.layers.3.mlp.experts.3.gate_proj.weight"].shape == (32, 64)
    assert tensors["model.layers.3.mlp.experts.0.down_proj.weight"].shape == (64, 32)
    assert tensors["model.layers.3.self_attn.k_proj.weight"].shape == (32, 64)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_markdown_and_plot(tmp_path):
    gib = bench_scale.GIB
    stage = {"rc": 0, "wall_s": 12.0, "peak_anon": 2 * gib, "peak_rss": 3 * gib}
    results = {"machine": "2-core CPU", "runs": [
        {"layers": n, "checkpoint_bytes": n * gib, "layer_bytes": gib // 2,
         "stages": {"calibrate": stage, "calibrate_kept": {**stage, "peak_anon": n * gib}}} for n in (2, 4)]}
    table = bench_scale.markdown(results).splitlines()
    assert len(table) == 2 + 4 and "| 4 | 4.00 GiB | 0.50 GiB | calibrate_kept | 4.00 GiB | 8.00 |" in table[-1]
    bench_scale.plot(results, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 1000
