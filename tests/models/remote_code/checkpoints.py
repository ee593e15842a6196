"""Tiny remote-code checkpoints (LLaMA-MoE v1, DeepSeek-MoE v1) for the adapter tests.

Each checkpoint directory gets the trimmed modeling/configuration files next to this module, a
``config.json`` whose ``auto_map`` points at them (as on the Hub), random weights in ``model.safetensors``
and the tiny tokenizer — loadable only with ``trust_remote_code=True``. The model is built through the
same dynamic-module path that loading uses, so the saved state-dict keys are the real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).parent
HIDDEN, EXPERT_INTER, EXPERTS, VOCAB = 64, 64, 8, 320

ARCHS = {
    "llama_moe": dict(
        files=("configuration_llama_moe.py", "modeling_llama_moe_hf.py"),
        config=dict(
            model_type="llama_moe", architectures=["LlamaMoEForCausalLM"],
            auto_map={"AutoConfig": "configuration_llama_moe.LlamaMoEConfig",
                      "AutoModel": "modeling_llama_moe_hf.LlamaMoEModel",
                      "AutoModelForCausalLM": "modeling_llama_moe_hf.LlamaMoEForCausalLM"},
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=EXPERT_INTER * EXPERTS, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=256,
            rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=None, eos_token_id=1, tie_word_embeddings=False,
            num_experts=EXPERTS, num_selects=2, size_experts=None, gate_type="TopKBalancedNoisyGate",
            gate_network="mlp", gate_use_softmax=True, gate_use_balance=True, gate_balance_loss_weight=1e-2,
            gate_add_noise=True, gate_noise_epsilon=1e-2, calculator_type="UniversalCalculator",
            multiply_gate_scores=True, score_scale_factor=[1.5, 4.0]),
    ),
    "deepseek": dict(
        files=("configuration_deepseek.py", "modeling_deepseek.py"),
        config=dict(
            model_type="deepseek", architectures=["DeepseekForCausalLM"],
            auto_map={"AutoConfig": "configuration_deepseek.DeepseekConfig",
                      "AutoModel": "modeling_deepseek.DeepseekModel",
                      "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, moe_intermediate_size=EXPERT_INTER,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
            n_routed_experts=EXPERTS, num_experts_per_tok=3, moe_layer_freq=1, first_k_dense_replace=1,
            norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
            max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=None, eos_token_id=1,
            tie_word_embeddings=False, rope_theta=10000.0),
    ),
}
SOURCES = {"llama_moe": HERE / "llama_moe", "deepseek": HERE / "deepseek_moe"}


def save_remote_checkpoint(arch: str, out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random-weight remote-code checkpoint of ``arch`` ("llama_moe" or "deepseek");
    ``config_overrides`` replace entries of its config.json (e.g. another expert width)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from rq.testing.tiny import tiny_tokenizer

    spec = ARCHS[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in spec["files"]:
        shutil.copy(SOURCES[arch] / name, out / name)
    (out / "config.json").write_text(json.dumps({**spec["config"], **config_overrides}, indent=2))
    config = AutoConfig.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2 or "weight_noise" in name:
                continue  # norms stay at one; the noise net stays at zero as the gate initialises it
            router = "gate.weight" in name or "gate_network" in name
            param.normal_(0, 0.5 if router else 0.1)  # routers spread so tokens do not all tie
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(out)
    return out
