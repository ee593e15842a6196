"""Streaming (rq.models.streaming): a model's decoder layers read from the shards one at a time give exactly the
whole model's weights and calibration statistics, on every architecture; broken checkpoints are one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rq.calibrate.accumulate import calibrate
from rq.calibrate.data import TokenData
from rq.calibrate.stats import METRICS
from rq.errors import RQError
from rq.models.adapters import adapter_for, load_model
from rq.models.streaming import open_streamed
from rq.testing.tiny import TINY_ARCHS, VOCAB

_spec = importlib.util.spec_from_file_location("rq_remote_checkpoints",
                                               Path(__file__).parent / "remote_code" / "checkpoints.py")
remote = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(remote)

pytestmark = pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")


def _tokens() -> TokenData:
    return TokenData(torch.randint(2, VOCAB, (10, 24), generator=torch.Generator().manual_seed(0)), "seeded")


def _same_stats(a, b) -> None:
    assert a.model == b.model  # fingerprint, dtype, shapes
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert (la.path, la.original_bytes, la.quantizable) == (lb.path, lb.original_bytes, lb.quantizable)
        for metric in METRICS:
            assert torch.equal(getattr(la, metric), getattr(lb, metric)), f"{la.path} {metric}"


def _check_identical(model_dir: Path, trust: bool = False) -> None:
    with adapter_for("llama_moe").load_context():
        model, adapter = load_model(model_dir, trust_remote_code=trust)
    streamed = open_streamed(model_dir, trust_remote_code=trust, show_progress=False)
    assert streamed.model.dtype == model.dtype
    for group in range(len(streamed.blocks)):
        streamed.load(group)
    whole, parts = model.state_dict(), streamed.model.state_dict()
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole), "streamed weights differ from from_pretrained's"
    for group in range(len(streamed.blocks)):
        streamed.release(group)
    assert all(p.is_meta for _, block in streamed.blocks for p in block.parameters())
    data = _tokens()
    _same_stats(calibrate(model, adapter, data, batch_size=4, group_size=64, show_progress=False),
                calibrate(streamed, streamed.adapter, data, batch_size=4, group_size=64, show_progress=False))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_streamed_calibration_is_identical(tiny_checkpoints, arch):
    _check_identical(Path(tiny_checkpoints(arch)))


@pytest.mark.parametrize("arch", ("llama_moe", "deepseek"))
def test_streamed_calibration_is_identical_remote_code(tmp_path, arch):
    _check_identical(remote.save_remote_checkpoint(arch, tmp_path / arch), trust=True)


def test_fused_and_sharded_checkpoints(tiny_checkpoints, tmp_path):
    """A checkpoint that stores the fused [E, 2I, H] experts, split over shards with an index, streams too."""
    source = Path(tiny_checkpoints("qwen3_moe"))
    model, _ = load_model(source)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    fused = tmp_path / "fused"
    fused.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            (fused / name).write_bytes((source / name).read_bytes())
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(fused / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (fused / "model.safetensors.index.json").write_text(json.dumps(index))
    streamed = open_streamed(fused, show_progress=False)
    for group in range(len(streamed.blocks)):
        streamed.load(group)
    assert all(torch.equal(state[k], v) for k, v in streamed.model.state_dict().items())

    # broken copies of it: one line each, naming the file
    (fused / "model-00002-of-00002.safetensors").rename(fused / "away.safetensors")
    with pytest.raises(RQError, match="names shard model-00002-of-00002.safetensors"):
        open_streamed(fused, show_progress=False)
    data = (fused / "away.safetensors").read_bytes()
    (fused / "model-00002-of-00002.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(RQError, match="truncated"):
        open_streamed(fused, show_progress=False)
    (fused / "model-00002-of-00002.safetensors").unlink()
    (fused / "model.safetensors.index.json").unlink()
    with pytest.raises(RQError, match="no model.safetensors"):
        open_streamed(fused, show_progress=False)


def test_plain_call_and_failing_pass(tiny_checkpoints):
    """Outside run() a call loads each layer for itself (same logits as the whole model); a pass that fails
    stops the others and raises its own error."""
    model_dir = tiny_checkpoints("mixtral")
    model, adapter = load_model(model_dir)
    streamed = open_streamed(model_dir, show_progress=False)
    batch = _tokens().sequences[:2]
    with torch.no_grad():
        expected = adapter.forward_logits(model, batch, torch.ones_like(batch))
        assert torch.equal(adapter.forward_logits(streamed.model, batch, torch.ones_like(batch)), expected)
    assert all(p.is_meta for _, block in streamed.blocks for p in block.parameters())

    def good():
        return adapter.forward_logits(streamed.model, batch, torch.ones_like(batch))

    def bad():
        return adapter.forward_logits(streamed.model, batch[:, :0].float(), None)

    results = streamed.run([good, good], label="t")
    assert all(torch.equal(r, expected) for r in results)
    with pytest.raises(Exception) as raised:
        streamed.run([good, bad, good], label="t")
    assert not isinstance(raised.value, RQError)
    assert all(p.is_meta for _, block in streamed.blocks for p in block.parameters())


def _same_eval_streamed_and_whole(model_dir: Path, plan, keep: bool) -> None:
    """``evaluate`` of the streamed pair equals, to the last bit, ``evaluate`` of the two whole models."""
    from rq.eval.evaluate import evaluate
    from rq.eval.streamed import StreamedPair
    from rq.rqmodel.model import apply_plan

    sequences = torch.randint(2, VOCAB, (6, 20), generator=torch.Generator().manual_seed(1))
    options = dict(batch_sizes=[1, 4], run_batch=4, stream_batch=3, stream_steps=3, prompt_len=4, show_progress=False)
    original, adapter = load_model(model_dir)
    rq_model, _ = load_model(model_dir)
    apply_plan(rq_model, adapter, plan)
    whole = evaluate(original, rq_model, adapter, sequences, **options)
    streamed = open_streamed(model_dir, show_progress=False)
    streamed.keep = keep
    pair = StreamedPair(streamed, plan)
    parts = evaluate(pair, None, streamed.adapter, sequences, **options)
    assert json.dumps(parts.to_json(), sort_keys=True) == json.dumps(whole.to_json(), sort_keys=True)
    released = [p.is_meta for _, block in streamed.blocks for p in block.parameters()]
    assert all(released) if not keep else not any(released)
    pair.close()


@pytest.mark.parametrize("arch", ("mixtral", "deepseek_v3", "switch_transformers"))
@pytest.mark.parametrize("keep", (False, True))
def test_streamed_eval_equals_whole_models(tiny, arch, keep):
    """``rq eval``'s numbers (batch LIS, streaming decode LIS, accuracy) are the same, to the last bit, when the
    original and the R&Q model stream in lockstep, layers released after use or kept once read."""
    from rq.plan.schema import load_plan

    model_dir, plan_path = tiny(arch)
    _same_eval_streamed_and_whole(model_dir, load_plan(plan_path), keep)


def test_streamed_eval_of_a_mixed_plan(tiny_checkpoints, mixed_export):
    """A plan with original, INT4 and INT8 copies: the streamed R&Q layers load (and release) the INT8 class too."""
    plan, _ = mixed_export
    _same_eval_streamed_and_whole(tiny_checkpoints("qwen3_moe"), plan, keep=False)


def test_streamed_eval_refuses_another_models_plan(tiny):
    from rq.eval.streamed import StreamedPair
    from rq.plan.schema import load_plan

    _, plan_path = tiny("qwen3_moe")
    model_dir, _ = tiny("mixtral")
    with pytest.raises(RQError, match="fingerprint|do not match"):
        StreamedPair(open_streamed(model_dir, show_progress=False), load_plan(plan_path))


def test_bfloat16_and_auto_dtype(tiny_checkpoints, tmp_path):
    """``dtype="auto"`` is the checkpoint's own dtype; a bfloat16 checkpoint calibrates on the CPU in bfloat16,
    streamed exactly as loaded whole."""
    model, adapter = load_model(tiny_checkpoints("qwen3_moe"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / name).write_bytes((Path(tiny_checkpoints("qwen3_moe")) / name).read_bytes())
    whole, _ = load_model(tmp_path / "bf16", dtype="auto")
    streamed = open_streamed(tmp_path / "bf16", show_progress=False)
    assert whole.dtype == streamed.model.dtype == torch.bfloat16
    assert open_streamed(tiny_checkpoints("qwen3_moe"), show_progress=False).model.dtype == torch.float32
    data = _tokens()
    stats = calibrate(streamed, adapter, data, batch_size=4, group_size=64, show_progress=False)
    _same_stats(calibrate(whole, adapter, data, batch_size=4, group_size=64, show_progress=False), stats)
    assert stats.model.dtype == "bfloat16" and stats.layers[0].load.sum() > 0


@pytest.mark.gpu
def test_streamed_calibration_on_cuda(tiny_checkpoints):
    """One decoder layer at a time on the GPU: the same loads as on the CPU (routing ties aside: random tokens
    on a tiny model have none at float32), everything but the layer in use off the GPU."""
    model_dir = tiny_checkpoints("mixtral")
    data = _tokens()
    cpu = calibrate(open_streamed(model_dir, show_progress=False), adapter_for("mixtral"), data, batch_size=4,
                    group_size=64, show_progress=False)
    streamed = open_streamed(model_dir, device="cuda", show_progress=False)
    gpu = calibrate(streamed, streamed.adapter, data, batch_size=4, group_size=64, show_progress=False)
    assert all(torch.equal(a.load, b.load) for a, b in zip(cpu.layers, gpu.layers))
    assert all(p.is_meta for _, block in streamed.blocks for p in block.parameters())
    assert streamed.model.get_input_embeddings().weight.is_cuda


def test_cli_streams_and_reports_a_broken_checkpoint_in_one_line(tiny_checkpoints, text_file, tmp_path):
    """``rq calibrate --stream always`` on a sharded checkpoint with a truncated shard: one line naming the file,
    exit 2, no stats written; intact, the same command gives the whole-model statistics."""
    from typer.testing import CliRunner

    from rq.calibrate.stats import CalibrationStats
    from rq.cli.main import app

    source = Path(tiny_checkpoints("olmoe"))
    model, _ = load_model(source)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((source / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    args = ["--data", str(text_file), "--seq-len", "32", "--sequences", "4", "--group-size", "64", "--stream", "always"]
    result = CliRunner().invoke(app, ["calibrate", str(sharded), "--out", str(tmp_path / "stats"), *args])
    assert result.exit_code == 0, result.output
    stats = CalibrationStats.load(tmp_path / "stats")
    assert stats.layers[0].load.sum() == 4 * 32 * stats.layers[0].top_k
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    result = CliRunner().invoke(app, ["calibrate", str(sharded), "--out", str(tmp_path / "broken"), *args])
    output = result.stderr if result.stderr_bytes is not None else result.output
    assert result.exit_code == 2 and "Traceback" not in output and shard.name in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "broken").exists()
