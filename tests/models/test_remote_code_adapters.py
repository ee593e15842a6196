"""Adapters for the remote-code checkpoints of the paper: LLaMA-MoE v1 (``llama_moe``) and DeepSeek-MoE v1
(``deepseek``). Tiny checkpoints are written from trimmed copies of their modeling files
(tests/models/remote_code/), loaded with ``trust_remote_code=True``, calibrated, planned and rebuilt with R&Q."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rq.core import int4
from rq.models.adapters import adapter_for, load_model
from rq.models.adapters.deepseek_moe import SEAM, DeepseekExpertsCall
from rq.calibrate.accumulate import calibrate
from rq.models.routing import record_calls
from rq.calibrate.data import TokenData
from rq.errors import RQError
from rq.core.experts import expert_forward
from rq.plan.planner import PlanOptions, make_plan, plan_from_decisions
from rq.rqmodel.model import RQExperts, apply_plan, rq_layers_of

_spec = importlib.util.spec_from_file_location("rq_remote_checkpoints",
                                               Path(__file__).parent / "remote_code" / "checkpoints.py")
checkpoints = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checkpoints)

pytestmark = pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")

ARCHS = ("llama_moe", "deepseek")
GROUP = 64


def _load(path):
    """``load_model`` with trust; LLaMA-MoE's released gate needs the adapter's load context under transformers 5."""
    with adapter_for("llama_moe").load_context():
        return load_model(path, trust_remote_code=True)


def _tokens(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(2, checkpoints.VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to a busy machine's thread wake-ups."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def ckpt(arch, tmp_path_factory):
    with adapter_for("llama_moe").load_context():
        return checkpoints.save_remote_checkpoint(arch, tmp_path_factory.mktemp(f"{arch}_ckpt"))


@pytest.fixture(scope="module")
def stats(ckpt):
    model, adapter = _load(ckpt)
    data = TokenData(_tokens(16, 32, seed=1), "random tokens")
    return calibrate(model, adapter, data, batch_size=8, group_size=GROUP, show_progress=False)


def _logits(model, adapter, tokens):
    with torch.no_grad():
        return adapter.forward_logits(model, tokens, torch.ones_like(tokens))


def _gate_outputs(model, arch):
    """Forward hooks on every router: what the checkpoint's own gate returned, per call."""
    outputs, handles = [], []
    for name, module in model.named_modules():
        if type(module).__name__ in ("TopKBalancedNoisyGate", "MoEGate"):
            outputs.append([])
            handles.append(module.register_forward_hook(lambda m, a, out, sink=outputs[-1]: sink.append(out)))
    return outputs, handles


# --------------------------------------------------------------------------------------------------

def test_requires_trust_remote_code(ckpt):
    with pytest.raises(RQError, match="rerun with --trust-remote-code") as err:
        load_model(ckpt)
    assert "\n" not in str(err.value)


def test_llama_moe_load_context():
    """Why LLaMA-MoE needs it: its gate builds ``Normal(0.0, 1.0)`` in ``__init__`` and transformers 5 builds models
    on the meta device, where the distribution's argument check cannot run."""
    from torch.distributions import Distribution, Normal

    before = Distribution._validate_args
    with torch.device("meta"):
        with pytest.raises(RuntimeError, match="meta"):
            Normal(0.0, 1.0)
        with adapter_for("llama_moe").load_context():
            Normal(0.0, 1.0)
    assert Distribution._validate_args == before


def test_layers_and_weights(arch, ckpt):
    model, adapter = _load(ckpt)
    assert adapter.model_types == (arch,)
    layers = adapter.moe_layers(model)
    if arch == "llama_moe":
        assert [l.path for l in layers] == ["model.layers.0.mlp.calculator", "model.layers.1.mlp.calculator"]
        assert [l.top_k for l in layers] == [2, 2]
        assert [l.score_scale_factor for l in layers] == [1.5, 4.0]
        assert tuple(layers[0].router_weight.shape) == (8, 64 + 8)  # mlp gate: both matrices
    else:  # layer 0 is dense (first_k_dense_replace=1)
        assert [l.path for l in layers] == [f"model.layers.{i}.mlp.{SEAM}" for i in (1, 2)]
        assert [l.top_k for l in layers] == [3, 3]
        assert layers[0].router_weight is model.model.layers[1].mlp.gate.weight
    assert all((l.num_experts, l.hidden_size, l.intermediate_size, l.activation) == (8, 64, 64, "silu_glu")
               for l in layers)

    # every weight in the file was loaded (none re-initialised)
    saved = load_file(str(ckpt / "model.safetensors"))
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)

    # canonical form computes what the checkpoint's expert computes, and set/get round-trips
    layer = layers[1]
    x = torch.randn(5, 64)
    w_in, w_out = adapter.get_expert_weights(layer, 3)
    assert w_in.shape == layer.w_in_shape and w_out.shape == layer.w_out_shape
    own = layer.experts(x, 3) if arch == "llama_moe" else layer.experts[3](x)
    torch.testing.assert_close(expert_forward(x, w_in, w_out, layer.activation), own, rtol=0, atol=1e-6)
    new_in, new_out = torch.randn_like(w_in), torch.randn_like(w_out)
    adapter.set_expert_weights(layer, 3, new_in, new_out)
    got_in, got_out = adapter.get_expert_weights(layer, 3)
    assert torch.equal(got_in, new_in) and torch.equal(got_out, new_out)


def test_routing_is_what_the_gate_computed(arch, ckpt):
    model, adapter = _load(ckpt)
    layers = adapter.moe_layers(model)
    calls = [[] for _ in layers]
    recorders = [lambda m, a, k, sink=sink, layer=layer: sink.append(adapter.routing_from_call(layer, a, k))
                 for sink, layer in zip(calls, layers)]
    gates, handles = _gate_outputs(model, arch)
    tokens = _tokens(3, 24, seed=2)
    with record_calls(model, layers, recorders):
        _logits(model, adapter, tokens)
    for h in handles:
        h.remove()
    assert len(gates) == len(layers)
    for layer, routed, gated in zip(layers, calls, gates):
        assert len(routed) == len(gated) == 1
        r, g = routed[0], gated[0]
        if arch == "llama_moe":
            ids, weights = g["topK_indices"], g["topK_scores"] * layer.score_scale_factor
        else:
            ids, weights = g[0], g[1]
        assert r.hidden.shape == (3 * 24, 64)
        assert r.ids.shape == r.weights.shape == (3 * 24, layer.top_k)
        assert torch.equal(r.ids, ids)  # same ids, same slot order (token-major, as the gate returned them)
        assert torch.equal(r.weights, weights)


def test_deepseek_seam_is_behaviour_identical(ckpt, arch):
    if arch != "deepseek":
        pytest.skip("the seam is DeepSeek-MoE v1 only")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, local_files_only=True).eval()
    assert not any(isinstance(m, DeepseekExpertsCall) for m in plain.modules())
    tokens = _tokens(2, 20, seed=3)
    adapter = adapter_for("deepseek")
    before = _logits(plain, adapter, tokens)
    layers = adapter.moe_layers(plain)
    seams = [plain.get_submodule(l.path) for l in layers]
    assert all(isinstance(s, DeepseekExpertsCall) for s in seams)
    assert torch.equal(_logits(plain, adapter, tokens), before)  # bit for bit
    adapter.moe_layers(plain)  # idempotent
    assert [plain.get_submodule(l.path) for l in layers] == seams
    assert not any(SEAM in k for k in plain.state_dict())
    twin = copy.deepcopy(plain)  # the seam follows the copy, not the original block
    twin_block = twin.model.layers[1].mlp
    assert getattr(twin_block, SEAM).__dict__["_block"] is twin_block
    assert twin_block.moe_infer.args[0] is twin_block
    assert torch.equal(_logits(twin, adapter, tokens), before)


def test_noop_plan_gives_original_logits(ckpt, stats):
    plan = make_plan(stats, PlanOptions(budget_factor=1.0, max_quantized_fraction=0.0))
    assert all(e.precision == "original" and e.replicas == 0 for l in plan.layers for e in l.experts)
    original, adapter = _load(ckpt)
    rq_model, _ = _load(ckpt)
    layers = adapter.moe_layers(original)
    rq_experts = apply_plan(rq_model, adapter, plan)
    assert len(rq_experts) == len(layers) and rq_layers_of(rq_model) == rq_experts
    tokens = _tokens(4, 32, seed=4)
    torch.testing.assert_close(_logits(rq_model, adapter, tokens), _logits(original, adapter, tokens),
                               rtol=0, atol=1e-5)
    # the replaced module keeps the call the hooks read (evaluation traces both models the same way)
    traces = []
    for model in (original, rq_model):
        ids = [[] for _ in layers]
        cbs = [lambda m, a, k, sink=sink, layer=layer: sink.append(adapter.routing_from_call(layer, a, k).ids)
               for sink, layer in zip(ids, layers)]
        with record_calls(model, layers, cbs):
            _logits(model, adapter, tokens)
        traces.append(ids)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*traces))


def test_int4_replicas_match_dequantized_model(ckpt, stats):
    plan = make_plan(stats, PlanOptions(budget_factor=1.0, max_quantized_fraction=0.5, max_replicas=1))
    assert sum(e.replicas for l in plan.layers for e in l.experts) > 0
    # every copy of a replicated expert INT4 (primary too), so the R&Q model equals a dequantized model exactly
    plan = plan_from_decisions(plan, stats, [
        (torch.tensor([e.replicas > 0 or e.precision == "int4" for e in l.experts]), torch.tensor(l.logcnt))
        for l in plan.layers])
    assert any(e.precision == "original" for l in plan.layers for e in l.experts)

    rq_model, adapter = _load(ckpt)
    rq_experts = apply_plan(rq_model, adapter, plan)
    reference, _ = _load(ckpt)
    for layer, layer_plan in zip(adapter.moe_layers(reference), plan.layers):
        for e in layer_plan.experts:
            if e.precision == "int4":
                w_in, w_out = adapter.get_expert_weights(layer, e.expert)
                adapter.set_expert_weights(layer, e.expert,
                                           *(int4.dequantize(int4.quantize(w, GROUP), torch.float32)
                                             for w in (w_in, w_out)))
    tokens = _tokens(4, 32, seed=5)
    torch.testing.assert_close(_logits(rq_model, adapter, tokens), _logits(reference, adapter, tokens),
                               rtol=0, atol=1e-4)
    # the replicas really served tokens
    replica_load = 0
    for rq, layer_plan in zip(rq_experts, plan.layers):
        assert isinstance(rq, RQExperts)
        primaries = torch.cumsum(torch.tensor(layer_plan.logcnt), 0) - torch.tensor(layer_plan.logcnt)
        is_replica = torch.ones(rq.num_copies, dtype=torch.bool)
        is_replica[primaries] = False
        replica_load += int(rq.total_copy_loads[is_replica].sum())
    assert replica_load > 0


def test_llama_moe_v1_expert_width_gets_int4_and_replicas(tmp_path):
    """LLaMA-MoE v1's experts are 688 wide (hidden 4096 / 16 experts x 11008): no group size divides them.
    At the same shape ratio (hidden 64, experts 43 wide) INT4 takes a partial last block and an odd row, so
    the planner quantizes and replicates, and the R&Q model equals the model with those experts' weights
    dequantized."""
    inter = 43
    with adapter_for("llama_moe").load_context():
        ckpt = checkpoints.save_remote_checkpoint("llama_moe", tmp_path / "v1", intermediate_size=inter * checkpoints.EXPERTS)
    model, adapter = _load(ckpt)
    assert {layer.intermediate_size for layer in adapter.moe_layers(model)} == {inter}
    stats = calibrate(model, adapter, TokenData(_tokens(16, 32, seed=1), "random tokens"), batch_size=8,
                      group_size=GROUP, show_progress=False)
    plan = make_plan(stats, PlanOptions(budget_factor=1.0))
    assert any(e.replicas for l in plan.layers for e in l.experts) and not any(l.warnings for l in plan.layers)
    plan = plan_from_decisions(plan, stats, [
        (torch.tensor([e.replicas > 0 or e.precision == "int4" for e in l.experts]), torch.tensor(l.logcnt))
        for l in plan.layers])
    rq_model, _ = _load(ckpt)
    rq_experts = apply_plan(rq_model, adapter, plan)
    assert rq_experts[0].w_out_q.shape[-1] == (inter + 1) // 2 and rq_experts[0].w_out_scales.shape[-1] == 1
    reference, _ = _load(ckpt)
    for layer, layer_plan in zip(adapter.moe_layers(reference), plan.layers):
        for e in layer_plan.experts:
            if e.precision == "int4":
                adapter.set_expert_weights(layer, e.expert, *(int4.dequantize(int4.quantize(w.detach(), GROUP))
                                                              for w in adapter.get_expert_weights(layer, e.expert)))
    tokens = _tokens(3, 16, seed=4)
    torch.testing.assert_close(_logits(rq_model, adapter, tokens), _logits(reference, adapter, tokens),
                               atol=1e-4, rtol=1e-4)
