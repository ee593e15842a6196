"""Synthetic calibration statistics at real model shapes, for planner/placement scale tests and benchmarks.

No model is loaded: per-expert loads are drawn from a seeded Zipf-skewed distribution and every other
docs/spec.md §3 metric is derived from them with seeded noise, while the shapes and byte sizes are those of the
named model (bf16 experts). Two shapes are built in:

* ``deepseek_v3`` -- 58 MoE layers (decoder layers 3..60) x 256 routed experts, top-8, hidden 7168,
  moe intermediate 2048 (SwiGLU), bf16;
* ``mixtral`` -- 32 MoE layers x 8 experts, top-2, hidden 4096, intermediate 14336 (SwiGLU), bf16.

``synthetic_stats(shape, drift=0.25, sample_seed=1)`` with the same ``seed`` gives a *held-out* set: the
same per-layer popularity ranking with multiplicative log-normal drift on the probabilities and fresh
sampling, so a plan made on one set can be judged on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rq.core.int4 import can_quantize
from rq.documents import CalibrationInfo, ModelInfo
from rq.calibrate.stats import CalibrationStats, LayerStats


@dataclass(frozen=True)
class SyntheticShape:
    architecture: str
    num_moe_layers: int
    first_moe_layer: int  # decoder index of the first MoE layer (DeepSeek-V3: 3 dense layers first)
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    zipf: float  # default skew exponent: p_rank ∝ rank^-zipf
    num_groups: int = 1  # router expert groups (DeepSeek-V3: 8)


SHAPES = {
    "deepseek_v3": SyntheticShape("deepseek_v3", 58, 3, 256, 8, 7168, 2048, zipf=0.35, num_groups=8),
    "mixtral": SyntheticShape("mixtral", 32, 0, 8, 2, 4096, 14336, zipf=0.5),
}


def zipf_probs(num_experts: int, exponent: float, perm: torch.Tensor) -> torch.Tensor:
    """``[N]`` float64 routing probabilities: the expert at popularity rank r (1-based) gets ∝ r^-exponent;
    ``perm [N]`` says which expert holds each rank."""
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    probs = torch.empty(num_experts, dtype=torch.float64)
    probs[perm] = ranks.pow(-exponent)
    return probs / probs.sum()


def synthetic_stats(shape: str = "deepseek_v3", *, seed: int = 0, tokens: int = 65536, zipf: float | None = None,
                    drift: float = 0.0, sample_seed: int | None = None, group_size: int = 128,
                    num_layers: int | None = None) -> CalibrationStats:
    """Seeded synthetic :class:`CalibrationStats` at the shapes of ``shape`` (a key of :data:`SHAPES`).

    Per layer: a popularity permutation and a skew exponent ``zipf * U(0.8, 1.2)`` (from ``seed``); loads
    ``~ Poisson(tokens * K * p)`` (the multinomial's large-count limit; totals are about T*K) where ``p`` is
    Zipf over the permutation, times ``exp(drift * N(0,1))`` per expert when ``drift > 0`` (from
    ``sample_seed``). Probabilities are capped at ``1/K`` (an expert can appear at most once per token).
    ``gate_mass`` ≈ load / K, ``contribution`` ≈ gate mass × a per-expert output norm,
    ``quant_sensitivity`` = gate-mass-weighted log-normal per-expert error, so importance by sensitivity
    differs from frequency (as the paper finds); ``quant_sensitivity_int8`` that error / 256 (a 16x finer step)
    with log-normal noise. ``num_layers`` keeps only the first layers (fast tests).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape '{shape}'; choose one of {', '.join(SHAPES)}")
    s = SHAPES[shape]
    exponent = s.zipf if zipf is None else zipf
    structure = torch.Generator().manual_seed(seed)
    sampling = torch.Generator().manual_seed(seed if sample_seed is None else 10_000 + sample_seed)
    int8_noise = torch.Generator().manual_seed(20_000 + seed)  # its own stream: the other metrics stay as they were
    n, k, h, i = s.num_experts, s.top_k, s.hidden_size, s.intermediate_size
    w_in, w_out = (2 * i, h), (h, i)
    per_expert_bytes = (w_in[0] * w_in[1] + w_out[0] * w_out[1]) * 2  # bf16
    layers = []
    num_layers = s.num_moe_layers if num_layers is None else min(num_layers, s.num_moe_layers)
    for li in range(num_layers):
        perm = torch.randperm(n, generator=structure)
        layer_exp = exponent * float(torch.empty(1).uniform_(0.8, 1.2, generator=structure))
        probs = zipf_probs(n, layer_exp, perm)
        norms = torch.empty(n, dtype=torch.float64).log_normal_(0.0, 0.3, generator=structure)
        q_err = torch.empty(n, dtype=torch.float64).log_normal_(0.0, 1.0, generator=structure)
        if drift > 0:
            probs = probs * torch.exp(drift * torch.randn(n, generator=sampling, dtype=torch.float64))
            probs = probs / probs.sum()
        probs = probs.clamp(max=1.0 / k)
        probs = probs / probs.sum()
        load = torch.poisson(probs * (tokens * k), generator=sampling)  # ≈ Multinomial(T*K, p), fast at 256 experts
        gate_mass = load / k * torch.empty(n, dtype=torch.float64).uniform_(0.8, 1.2, generator=sampling)
        layers.append(LayerStats(
            index=li, path=f"model.layers.{s.first_moe_layer + li}.mlp.experts", num_experts=n, top_k=k,
            activation="silu_glu", w_in_shape=w_in, w_out_shape=w_out, original_bytes=[per_expert_bytes] * n,
            quantizable=can_quantize(w_in) and can_quantize(w_out),
            load=load, gate_mass=gate_mass, contribution=gate_mass * norms,
            quant_sensitivity=gate_mass.square() / load.clamp(min=1) * q_err,
            quant_sensitivity_int8=gate_mass.square() / load.clamp(min=1) * q_err / 256
            * torch.empty(n, dtype=torch.float64).log_normal_(0.0, 0.2, generator=int8_noise)))
    model = ModelInfo(architecture=s.architecture, num_moe_layers=num_layers, num_experts=n, top_k=k,
                      hidden_size=h, intermediate_size=i, dtype="bfloat16",
                      fingerprint=f"synthetic:{shape}:seed{seed}")
    data = (f"synthetic {shape}: zipf {exponent:g} (x U(0.8,1.2) per layer), seed {seed}"
            + (f", held-out drift {drift:g} sample seed {sample_seed}" if drift > 0 or sample_seed is not None else ""))
    calibration = CalibrationInfo(data=data, sequences=tokens // 512 if tokens >= 512 else 1,
                                  seq_len=min(tokens, 512), tokens=tokens, seed=seed)
    return CalibrationStats(model, calibration, group_size, layers)
