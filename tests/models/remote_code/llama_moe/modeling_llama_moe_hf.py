"""LLaMA-MoE v1 modeling code, trimmed for tests from pjlab-sys4nlp/llama-moe ``modeling_llama_moe_hf.py``
(the remote code that ``llama-moe/LLaMA-MoE-v1-*`` checkpoints ship).

The MoE block is kept as the checkpoints define it — module names, parameter names, routing and the
expert computation: ``LinearGLUMoELayer`` = ``gate`` (``TopKBalancedNoisyGate``: ``gate_network``
linear/mlp, top-(k+1) then the first k, softmax over the k logits in float32, noise only in training) +
``calculator`` (``UniversalCalculator``, called as ``calculator(x, **gate_outputs)``, which sorts the
assignments by expert, runs ``LinearGLUExperts`` (per-expert ``weight_gate``/``weight_up``/``weight_down``
ParameterLists), scales by ``topK_scores * score_scale_factor`` and ``index_add``s back).
Attention is a plain causal multi-head attention with rotary embeddings and no KV cache (the tests only
need logits); the decoder/model/LM-head plumbing keeps the original's structure and outputs.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions.normal import Normal
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_llama_moe import LlamaMoEConfig


@dataclass
class CalculatorOutput(ModelOutput):
    hidden_states: Optional[torch.FloatTensor] = None
    num_dropped_tokens: Optional[int] = None


@dataclass
class BaseMoEModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.FloatTensor = None
    past_key_values: Optional[Tuple[Tuple[torch.FloatTensor]]] = None
    hidden_states: Optional[Tuple[torch.FloatTensor]] = None
    attentions: Optional[Tuple[torch.FloatTensor]] = None
    balance_loss: Optional[float] = None
    num_dropped_tokens: Optional[Tuple[torch.Tensor]] = None
    gate_load: Optional[Tuple[list]] = None
    gate_importance: Optional[Tuple[list]] = None


@dataclass
class MoECausalLMOutputWithPast(CausalLMOutputWithPast):
    balance_loss: Optional[float] = None
    num_dropped_tokens: Optional[Tuple[int]] = None
    gate_load: Optional[Tuple[list]] = None
    gate_importance: Optional[Tuple[list]] = None


@dataclass
class MoEMlpOutput(ModelOutput):
    hidden_states: Optional[torch.FloatTensor] = None
    balance_loss: Optional[torch.FloatTensor] = None
    num_dropped_tokens: Optional[int] = None
    gate_load: Optional[list] = None
    gate_importance: Optional[list] = None


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    """Causal attention with rotary embeddings (trimmed: no KV cache, no pretraining_tp slicing)."""

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask, position_ids):
        bsz, q_len, _ = hidden_states.shape
        shape = (bsz, q_len, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, device=q.device).float() / self.head_dim))
        freqs = position_ids[:, None, :, None].float() * inv_freq  # (bsz, 1, q_len, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        attn = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim) + attention_mask
        attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(out)


class TopKBalancedNoisyGate(nn.Module):
    def __init__(self, input_size, num_experts, num_selects, gate_network="mlp", use_softmax=True,
                 use_balance=True, balance_loss_weight=1e-2, add_noise=True, noise_epsilon=1e-2):
        super().__init__()
        assert num_selects <= num_experts
        self.input_size = input_size
        self.num_experts = num_experts
        self.num_selects = num_selects
        self.gate_network_type = gate_network
        self.gate_network = self.get_gate_network(gate_network, input_size, num_experts)
        self.use_softmax = use_softmax
        self.softmax = nn.Softmax(1)
        self.use_balance = use_balance
        self.balance_loss_weight = balance_loss_weight
        self.add_noise = add_noise
        self.noise_epsilon = noise_epsilon
        if self.add_noise:
            self.weight_noise = nn.Linear(input_size, num_experts, bias=False)
            nn.init.zeros_(self.weight_noise.weight)
            self.normal = Normal(0.0, 1.0)
            self.softplus = nn.Softplus()

    def get_gate_network(self, gate_network_type, input_size, num_experts):
        gate_network_type = gate_network_type.lower()
        if gate_network_type == "linear":
            gate_network = nn.Linear(input_size, num_experts, bias=False)
            nn.init.zeros_(gate_network.weight)
        elif gate_network_type == "mlp":
            gate_network = nn.Sequential(nn.Linear(input_size, num_experts, bias=False), nn.Tanh(),
                                         nn.Linear(num_experts, num_experts, bias=False))
        else:
            raise ValueError(f"Unexpected gate network type: {gate_network_type}.")
        return gate_network

    def cv_squared(self, x, eps=1e-10):
        if x.shape[0] == 1:
            return torch.tensor(0.0, device=x.device)
        return x.float().var() / (x.float().mean() ** 2 + eps)

    def forward(self, x):
        logits_gate = self.gate_network(x)
        if self.training and self.add_noise:
            noise_control = self.softplus(self.weight_noise(x)) + self.noise_epsilon
            logits = logits_gate + torch.randn_like(logits_gate) * noise_control
        else:
            logits = logits_gate

        top_logits, top_indices = logits.topk(min(self.num_selects + 1, self.num_experts), dim=1)
        top_k_logits = top_logits[:, : self.num_selects]
        top_k_indices = top_indices[:, : self.num_selects]
        top_k_scores = self.softmax(top_k_logits.to(torch.float32)) if self.use_softmax else top_k_logits
        top_k_scores = top_k_scores.to(logits.dtype)

        zeros = torch.zeros_like(logits, requires_grad=True, device=logits.device)
        scores_filtered = zeros.scatter(dim=1, index=top_k_indices, src=top_k_scores)
        importance = scores_filtered.sum(0)
        load = (scores_filtered > 0).sum(0)  # (the original's noisy differentiable load is training-only)
        if self.use_balance:
            balance_loss = (self.cv_squared(importance) + self.cv_squared(load)) * self.balance_loss_weight
        else:
            balance_loss = torch.tensor(-100.0, device=x.device)
        return {"topK_indices": top_k_indices, "topK_scores": top_k_scores, "balance_loss": balance_loss,
                "load": load, "importance": importance}


class LinearGLUExperts(nn.Module):
    def __init__(self, in_features, hidden_features, out_features, hidden_act, num_experts, size_experts=None,
                 bias=True, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.hidden_act = hidden_act
        self.num_experts = num_experts
        if size_experts is None:
            assert hidden_features % num_experts == 0
            size_experts = [hidden_features // num_experts for _ in range(num_experts)]
        else:
            assert len(size_experts) == num_experts and sum(size_experts) == hidden_features
        self.size_experts = size_experts
        self.act_fn = ACT2FN[hidden_act]

        self.weight_gate = nn.ParameterList()
        self.weight_up = nn.ParameterList()
        self.weight_down = nn.ParameterList()
        for i in range(num_experts):
            self.weight_gate.append(nn.Parameter(torch.empty((size_experts[i], in_features), **factory_kwargs)))
            self.weight_up.append(nn.Parameter(torch.empty((size_experts[i], in_features), **factory_kwargs)))
            self.weight_down.append(nn.Parameter(torch.empty((out_features, size_experts[i]), **factory_kwargs)))
        if bias:
            self.bias_gate = nn.ParameterList()
            self.bias_up = nn.ParameterList()
            self.bias_down = nn.ParameterList()
            for i in range(num_experts):
                self.bias_gate.append(nn.Parameter(torch.zeros((size_experts[i],), **factory_kwargs)))
                self.bias_up.append(nn.Parameter(torch.zeros((size_experts[i],), **factory_kwargs)))
                self.bias_down.append(nn.Parameter(torch.zeros((out_features,), **factory_kwargs)))
        else:
            self.register_parameter("bias_gate", None)
            self.register_parameter("bias_up", None)
            self.register_parameter("bias_down", None)
        self.reset_parameters()

    def reset_parameters(self):
        for i in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight_gate[i], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.weight_up[i], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.weight_down[i], a=math.sqrt(5))

    def forward(self, input, i):
        gate = self.act_fn(F.linear(input, self.weight_gate[i],
                                    self.bias_gate[i] if self.bias_gate is not None else None))
        up = F.linear(input, self.weight_up[i], self.bias_up[i] if self.bias_up is not None else None)
        return F.linear(gate * up, self.weight_down[i], self.bias_down[i] if self.bias_down is not None else None)


class UniversalCalculator(nn.Module):
    def __init__(self, experts: LinearGLUExperts, multiply_gate_scores=True, score_scale_factor=1.0):
        super().__init__()
        self.experts = experts
        self.multiply_gate_scores = multiply_gate_scores
        self.score_scale_factor = score_scale_factor
        self.num_experts = experts.num_experts
        self.mlp_norm = None

    def forward(self, x, topK_indices, topK_scores, expert_batch_size=None, **kwargs) -> CalculatorOutput:
        batch_size = topK_indices.size(0)  # (bsz*seq_len, num_selects)
        num_selects = topK_indices.size(1)
        topK_indices = topK_indices.flatten()
        topK_scores = topK_scores.flatten()
        batch_indices = torch.arange(batch_size, device=topK_scores.device).repeat_interleave(num_selects)

        _, index_sorted_topK_indices = topK_indices.sort(0)
        sorted_topK_scores = topK_scores.index_select(0, index_sorted_topK_indices)
        sorted_batch_indices = batch_indices.index_select(0, index_sorted_topK_indices)
        if expert_batch_size is None:
            expert_batch_size = topK_indices.bincount(minlength=self.num_experts).tolist()

        sorted_x = x.index_select(0, sorted_batch_indices)
        split_x = torch.split(sorted_x, expert_batch_size, dim=0)
        expert_outputs = [self.experts(split_x[i], i) for i in range(self.num_experts) if split_x[i].shape[0] > 0]

        cat_expert_outputs = torch.cat(expert_outputs, 0)
        output_dim = cat_expert_outputs.size(1)
        if self.multiply_gate_scores:
            if self.mlp_norm is None:
                cat_expert_outputs = torch.mul(cat_expert_outputs,
                                               sorted_topK_scores.reshape(-1, 1) * self.score_scale_factor)
            else:
                cat_expert_outputs = torch.mul(cat_expert_outputs, sorted_topK_scores.reshape(-1, 1))
                cat_expert_outputs = self.mlp_norm(cat_expert_outputs)

        zeros = torch.zeros((batch_size, output_dim), device=cat_expert_outputs.device,
                            dtype=cat_expert_outputs.dtype)
        y = zeros.index_add(0, sorted_batch_indices, cat_expert_outputs)
        return CalculatorOutput(hidden_states=y, num_dropped_tokens=torch.tensor(-1.0))


class LinearGLUMoELayer(nn.Module):
    def __init__(self, input_size, hidden_size, output_size, hidden_act, num_experts, num_selects,
                 size_experts=None, bias=True, **kwargs):
        super().__init__()
        assert num_selects <= num_experts
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.hidden_act = hidden_act
        self.num_experts = num_experts
        self.num_selects = num_selects
        self.size_experts = size_experts
        self.bias = bias

        experts = LinearGLUExperts(input_size, hidden_size, output_size, hidden_act, num_experts,
                                   size_experts=size_experts, bias=bias)
        self.gate = TopKBalancedNoisyGate(
            self.input_size, self.num_experts, self.num_selects,
            gate_network=kwargs.get("gate_network", "mlp"), use_softmax=kwargs.get("gate_use_softmax", True),
            use_balance=kwargs.get("gate_use_balance", True),
            balance_loss_weight=kwargs.get("gate_balance_loss_weight", 1e-2),
            add_noise=kwargs.get("gate_add_noise", True), noise_epsilon=kwargs.get("gate_noise_epsilon", 1e-2))
        self.calculator = UniversalCalculator(experts,
                                              multiply_gate_scores=kwargs.get("multiply_gate_scores", True),
                                              score_scale_factor=kwargs.get("score_scale_factor", 1.0))

    def forward(self, x) -> MoEMlpOutput:
        original_shape = x.shape[:-1]
        x = x.reshape(-1, self.input_size)
        gate_outputs: dict = self.gate(x)
        calc_outs: CalculatorOutput = self.calculator(x, **gate_outputs)
        y = calc_outs.hidden_states
        y = y.reshape(original_shape + (self.output_size,))
        return MoEMlpOutput(hidden_states=y, balance_loss=gate_outputs.get("balance_loss"),
                            num_dropped_tokens=calc_outs.num_dropped_tokens,
                            gate_load=gate_outputs.get("load", torch.tensor(-1)),
                            gate_importance=gate_outputs.get("importance", torch.tensor(-1)))


class LlamaMoEDecoderLayer(nn.Module):
    def __init__(self, config: LlamaMoEConfig, layer_index):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        gating_config = {
            "gate_network": config.gate_network, "gate_use_softmax": config.gate_use_softmax,
            "gate_use_balance": config.gate_use_balance, "gate_balance_loss_weight": config.gate_balance_loss_weight,
            "gate_add_noise": config.gate_add_noise, "gate_noise_epsilon": config.gate_noise_epsilon,
        }
        calculator_config = {
            "multiply_gate_scores": config.multiply_gate_scores,
            "score_scale_factor": (config.score_scale_factor[layer_index]
                                   if isinstance(config.score_scale_factor, list) else config.score_scale_factor),
        }
        self.mlp = LinearGLUMoELayer(
            input_size=self.hidden_size, hidden_size=config.intermediate_size, output_size=self.hidden_size,
            hidden_act=config.hidden_act, num_experts=config.num_experts, num_selects=config.num_selects,
            size_experts=config.size_experts[layer_index] if config.size_experts is not None else None,
            bias=False, **gating_config, **calculator_config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False) -> tuple:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states, attention_mask, position_ids)
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        mlp_outs: MoEMlpOutput = self.mlp(hidden_states)
        hidden_states = residual + mlp_outs.hidden_states
        return (hidden_states, mlp_outs.balance_loss, mlp_outs.num_dropped_tokens, mlp_outs.gate_load,
                mlp_outs.gate_importance)


class LlamaMoEPreTrainedModel(PreTrainedModel):
    config_class = LlamaMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMoEDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()


class LlamaMoEModel(LlamaMoEPreTrainedModel):
    def __init__(self, config: LlamaMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_length = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seq_length, device=inputs_embeds.device).unsqueeze(0)
        dtype = inputs_embeds.dtype
        causal = torch.full((seq_length, seq_length), torch.finfo(dtype).min, device=inputs_embeds.device).triu(1)
        mask = causal[None, None].expand(batch_size, 1, seq_length, seq_length)
        if attention_mask is not None:
            padding = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
            mask = (mask + padding).clamp(min=torch.finfo(dtype).min)

        hidden_states = inputs_embeds
        balance_loss = 0.0
        num_dropped_tokens, gate_load, gate_importance = (), (), ()
        all_hidden_states = () if output_hidden_states else None
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_outputs = decoder_layer(hidden_states, attention_mask=mask, position_ids=position_ids)
            hidden_states = layer_outputs[0]
            if layer_outputs[1] is not None:
                balance_loss += layer_outputs[1]
            num_dropped_tokens += (layer_outputs[2],)
            gate_load += (layer_outputs[3],)
            gate_importance += (layer_outputs[4],)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseMoEModelOutputWithPast(last_hidden_state=hidden_states, balance_loss=balance_loss,
                                          hidden_states=all_hidden_states, num_dropped_tokens=num_dropped_tokens,
                                          gate_load=gate_load, gate_importance=gate_importance)


class LlamaMoEForCausalLM(LlamaMoEPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaMoEModel(config)
        self.pretraining_tp = config.pretraining_tp
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        outputs: BaseMoEModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.CrossEntropyLoss()(logits[..., :-1, :].reshape(-1, self.config.vocab_size),
                                         labels[..., 1:].reshape(-1))
            if outputs.balance_loss is not None and outputs.balance_loss > 0:
                loss += outputs.balance_loss
        return MoECausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         num_dropped_tokens=outputs.num_dropped_tokens,
                                         balance_loss=outputs.balance_loss, gate_load=outputs.gate_load,
                                         gate_importance=outputs.gate_importance)
