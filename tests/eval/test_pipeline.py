"""calibrate -> plan -> apply -> evaluate on a tiny random checkpoint of every supported architecture."""

import pytest
import torch

from rq.core import int4
from rq.models.adapters import load_model
from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import load_token_data, load_tokenizer
from rq.errors import RQError
from rq.eval.evaluate import evaluate
from rq.plan.planner import PlanOptions, make_plan, plan_from_decisions
from rq.rqmodel.model import apply_plan, rq_layers_of, set_mode
from rq.testing.tiny import TINY_ARCHS

GROUP = 64


def _setup(ckpt, text_file, budget=1.0):
    model, adapter = load_model(ckpt)
    data = load_token_data(load_tokenizer(ckpt), text_file, seq_len=32, max_sequences=12)
    stats = calibrate(model, adapter, data, batch_size=4, group_size=GROUP, show_progress=False)
    return model, adapter, data, stats, make_plan(stats, PlanOptions(budget_factor=budget))


def _logits(adapter, model, x):
    return adapter.forward_logits(model, x, torch.ones_like(x))


def _unchanged(plan, stats):
    """The plan that changes nothing: every expert at original precision, one copy each."""
    n = plan.model.num_experts
    return plan_from_decisions(plan, stats, [(torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.int64))
                                             for _ in plan.layers])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pipeline_every_architecture(arch, tiny_checkpoints, text_file):
    ckpt = tiny_checkpoints(arch)
    model, adapter, data, stats, plan = _setup(ckpt, text_file)
    layers = adapter.moe_layers(model)
    assert len(stats.layers) == len(layers) and all(s.load.sum() > 0 for s in stats.layers)
    # every assignment is counted: T*K per layer (Switch may drop tokens over capacity)
    for s in stats.layers:
        assert s.load.sum() <= data.tokens * s.top_k
        if arch != "switch_transformers":
            assert s.load.sum() == data.tokens * s.top_k
    assert sum(e.replicas for layer in plan.layers for e in layer.experts) > 0, "a skewed layer should get replicas"
    x = data.sequences[:3]
    reference = _logits(adapter, model, x)

    # a plan that changes nothing reproduces the original model
    unchanged, _ = load_model(ckpt)
    apply_plan(unchanged, adapter, _unchanged(plan, stats))
    torch.testing.assert_close(_logits(adapter, unchanged, x), reference, atol=1e-5, rtol=1e-5)

    # within tolerance otherwise: with every replicated expert's primary in INT4 too, all copies of an expert
    # hold the same bytes, so R&Q equals the original model with those experts' weights dequantized
    _assert_matches_dequantized(ckpt, adapter, plan, stats, x)

    rq_model, _ = load_model(ckpt)
    rq_experts = apply_plan(rq_model, adapter, plan)
    # measured bytes of the R&Q model are within the budget (from the real tensors)
    measured = sum(layer.weight_nbytes() for layer in rq_experts)
    assert measured == plan.budget.planned_bytes <= plan.budget.budget_factor * plan.budget.reference_bytes

    report = evaluate(model, rq_model, adapter, data.sequences, batch_sizes=[1, 4], stream_batch=4, stream_steps=3,
                      show_progress=False)
    assert report.accuracy.tokens > 0 and 0 <= report.accuracy.top1_agreement <= 1 and report.accuracy.kl_mean >= 0
    assert report.bytes_after == measured


def _assert_matches_dequantized(ckpt, adapter, plan, stats, x):
    forced = plan_from_decisions(plan, stats, [
        (torch.tensor([e.replicas > 0 or e.precision == "int4" for e in layer.experts]), torch.tensor(layer.logcnt))
        for layer in plan.layers])
    rq_model, _ = load_model(ckpt)
    apply_plan(rq_model, adapter, forced)
    dequantized, _ = load_model(ckpt)
    for layer, layer_plan in zip(adapter.moe_layers(dequantized), forced.layers):
        for e in layer_plan.experts:
            if e.precision == "int4":
                adapter.set_expert_weights(layer, e.expert, *(
                    int4.dequantize(int4.quantize(w.detach(), GROUP), torch.float32)
                    for w in adapter.get_expert_weights(layer, e.expert)))
    torch.testing.assert_close(_logits(adapter, rq_model, x), _logits(adapter, dequantized, x), atol=1e-4, rtol=1e-4)


def test_streaming_mode_rotates_offsets_and_records(tiny_checkpoints, text_file):
    ckpt = tiny_checkpoints("mixtral")
    model, adapter, data, stats, plan = _setup(ckpt, text_file)
    apply_plan(model, adapter, plan)
    set_mode(model, "streaming", record=True)
    x = data.sequences[:2, :8]
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                   pad_token_id=0)
    for layer in rq_layers_of(model):
        assert len(layer.history) == 3  # prefill (yields token 1) + 2 decode steps
        assert int(layer.offsets.sum()) == int(torch.stack(layer.history).sum())  # offsets advanced by every load
    set_mode(model, "batch")
    assert all(int(layer.offsets.sum()) == 0 for layer in rq_layers_of(model))


def test_plan_for_another_model_is_refused(tiny_checkpoints, text_file):
    _, adapter, _, _, plan = _setup(tiny_checkpoints("mixtral"), text_file)
    other, other_adapter = load_model(tiny_checkpoints("qwen3_moe"))
    with pytest.raises(RQError, match="another model"):
        apply_plan(other, other_adapter, plan)
