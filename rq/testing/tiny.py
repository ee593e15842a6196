"""Tiny random-weight checkpoints of every supported architecture, built from configs (no downloads).

Used by the tests and by CI's export checks: ``save_tiny_checkpoint("mixtral", dir)`` writes a real
Hugging Face checkpoint directory (config.json, safetensors, tokenizer) that rq loads through the normal
``from_pretrained`` path. Sizes are multiples of 64 so INT4 group size 64 applies.
"""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, LAYERS, VOCAB = 64, 64, 8, 2, 2, 320

_COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, max_position_embeddings=256, num_experts_per_tok=TOP_K, head_dim=16,
               pad_token_id=0, eos_token_id=1, bos_token_id=None)


def tiny_config(arch: str):
    """A transformers config for a ~100k-parameter MoE of family ``arch``."""
    from transformers import (DeepseekV2Config, DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
                              Qwen3MoeConfig, SwitchTransformersConfig)

    if arch == "mixtral":
        return MixtralConfig(**_COMMON, intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**_COMMON, moe_intermediate_size=INTERMEDIATE, num_experts=EXPERTS,
                              shared_expert_intermediate_size=INTERMEDIATE, intermediate_size=INTERMEDIATE,
                              decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**_COMMON, moe_intermediate_size=INTERMEDIATE, num_experts=EXPERTS,
                              intermediate_size=INTERMEDIATE, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "olmoe":
        return OlmoeConfig(**{k: v for k, v in _COMMON.items() if k != "head_dim"},
                           intermediate_size=INTERMEDIATE, num_experts=EXPERTS)
    if arch in ("deepseek_v2", "deepseek_v3"):
        cls = DeepseekV2Config if arch == "deepseek_v2" else DeepseekV3Config
        extra = dict(n_group=2, topk_group=1, topk_method="group_limited_greedy") if arch == "deepseek_v2" else \
            dict(n_group=2, topk_group=1)
        deepseek = {k: v for k, v in _COMMON.items() if k != "head_dim"} | {"num_key_value_heads": 4}  # MLA: kv heads = heads
        return cls(**deepseek, intermediate_size=INTERMEDIATE,
                   moe_intermediate_size=INTERMEDIATE, n_routed_experts=EXPERTS, n_shared_experts=1,
                   first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                   qk_nope_head_dim=8, v_head_dim=16, **extra)
    if arch == "switch_transformers":
        return SwitchTransformersConfig(vocab_size=VOCAB, d_model=HIDDEN, d_ff=INTERMEDIATE, d_kv=16, num_heads=4,
                                        num_layers=LAYERS, num_decoder_layers=LAYERS, num_experts=EXPERTS,
                                        expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    raise ValueError(f"no tiny config for '{arch}'")


TINY_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "switch_transformers")

_TOKENIZER_TEXT = (
    "def forward(self, hidden_states):\n    return self.experts(hidden_states)\n"
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route tokens to experts.\n"
    "import torch\nfor i in range(10):\n    print(i * 2)\n"
)


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer trained on a few built-in lines (so any text is encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def save_tiny_checkpoint(arch: str, out_dir: str | Path, seed: int = 0, router_std: float = 0.2) -> Path:
    """Write a tiny random-weight checkpoint of ``arch`` to ``out_dir`` and return the path.

    ``router_std``: spread of the router weights. Wider routers make fewer near-ties between the router's
    logits, which float16 arithmetic (about 3 significant digits) can otherwise resolve either way."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    auto = AutoModelForSeq2SeqLM if arch == "switch_transformers" else AutoModelForCausalLM
    model = auto.from_config(config)
    with torch.no_grad():  # routers initialised at zero would tie every token; give them a spread
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "experts" in name:
                param.normal_(0, 0.2)
            elif param.dim() >= 2 and ("gate" in name or "router" in name):
                param.normal_(0, router_std)
    out = Path(out_dir)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out
