"""onnxruntime-genai runs every decoder-only export as it is: ``og.Model(build)``, ``og.Tokenizer``, ``og.Generator``.

Greedy tokens under onnxruntime-genai equal rq's own runtime on the same graph (``OrtGenerator(flavour="genai")``)
and the PyTorch R&Q reference run with the same replica offsets (``past_seq``, docs/spec.md §4), for a batch of
prompts of different lengths (onnxruntime-genai's tokenizer pads them on the right); the ``expert_counts.{l}``
outputs are readable through ``Generator.get_output``; and streaming decode keeps the replicas balanced: its
cumulative LIS is within a few percent of rq's runtime's ``o_e += load_e`` rotation.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

og = pytest.importorskip("onnxruntime_genai")

from rq.core.lis import lis  # noqa: E402
from rq.core.replica import split_load  # noqa: E402
from rq.export.genai import GENAI_CONFIG, genai_type  # noqa: E402
from rq.export.runtime import OrtGenerator, last_logits, position_ids_from_mask  # noqa: E402

DECODER_ONLY = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
PROMPTS = ["def main():", "x", "import numpy as np\nprint("]
NEW_TOKENS = 8


def og_generate(build, prompts, new_tokens, layers, ids=None):
    """Greedy onnxruntime-genai generation of ``prompts`` (or of the token rows ``ids [B, S]`` as given):
    ``(prompt ids [B, S], its attention mask, tokens [B, n], per-call expert_counts {layer: [N]})``."""
    model = og.Model(str(build))
    encoded = og.Tokenizer(model).encode_batch(prompts) if ids is None else ids.astype(np.int32)
    ids = (encoded.as_numpy() if ids is None else ids).astype(np.int64)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False, batch_size=len(ids))
    generator = og.Generator(model, params)
    generator.append_tokens(encoded)
    mask = generator.get_input("attention_mask").astype(np.int64)
    tokens, counts = [], []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(generator.get_next_tokens().astype(np.int64))
        counts.append({l: generator.get_output(f"expert_counts.{l}").copy() for l in layers})
    return ids, mask, np.stack(tokens, axis=1), counts


@torch.no_grad()
def reference_generate(model_dir, plan_path, ids, mask, new_tokens):
    """Greedy decoding of the PyTorch R&Q reference with the graph's offsets rule (every offset = past_seq)."""
    from transformers import DynamicCache

    from rq.export.attention import use_rq_attention
    from rq.models.adapters import load_model
    from rq.plan.schema import load_plan
    from rq.rqmodel.model import apply_plan, set_backend, set_mode

    model, adapter = load_model(model_dir)
    use_rq_attention(model)
    layers = apply_plan(model, adapter, load_plan(plan_path))
    set_backend(model, "reference")
    set_mode(model, "streaming")
    cache, tokens, inputs = DynamicCache(), [], ids
    for step in range(new_tokens):
        for layer in layers:
            layer.offsets.fill_(mask.shape[1] - inputs.shape[1])
        positions = position_ids_from_mask(mask)[:, -inputs.shape[1]:]
        out = model(input_ids=torch.from_numpy(inputs), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), cache=cache, use_cache=True)
        logits = last_logits(out.logits.numpy(), mask if step == 0 else None)
        tokens.append(logits.argmax(-1))
        cache, inputs = out.cache, tokens[-1][:, None]
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
    return np.stack(tokens, axis=1)


def until_eos(tokens, eos):
    """Each row up to and including its first ``eos`` (onnxruntime-genai stops a row there)."""
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in tokens.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def check_og_matches(result, model_dir, plan_path, ids=None):
    """onnxruntime-genai's greedy tokens and per-call counts equal rq's runtime's and the reference's, for
    ``PROMPTS`` (padded on the right by onnxruntime-genai's tokenizer) or the unpadded token rows ``ids``."""
    build, manifest = result.out_dir, result.manifest
    layers = [l["index"] for l in manifest["moe_layers"]]
    padded = ids is None
    ids, mask, og_tokens, og_counts = og_generate(build, PROMPTS, NEW_TOKENS, layers, ids)
    assert (mask == 0).any() == padded, "the prompts should need padding, the given rows none"
    ours = OrtGenerator(build, flavour="genai").generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=-1)
    reference = reference_generate(model_dir, plan_path, ids, mask, NEW_TOKENS)
    eos = json.loads((build / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
    assert until_eos(og_tokens, eos) == until_eos(ours.tokens, eos) == until_eos(reference, eos)
    eos_set = set(eos if isinstance(eos, list) else [eos])
    ended = [i for i in range(og_tokens.shape[1]) if eos_set & set(og_tokens[:, i].tolist())]
    calls = ended[0] + 1 if ended else len(og_counts)  # a finished row is fed pad tokens after, differently
    for call, (counts, step) in enumerate(zip(og_counts[:calls], ours.steps)):
        for l in layers:
            np.testing.assert_array_equal(counts[l], step.expert_counts[l], err_msg=f"call {call}, layer {l}")
            assert counts[l].sum() == len(ids) * (ids.shape[1] if call == 0 else 1) * manifest["moe_layers"][l][
                "top_k"]


@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_onnxruntime_genai_runs_the_export(exported, tiny, arch):
    result = exported(arch)
    config = json.loads((result.out_dir / GENAI_CONFIG).read_text())
    assert config["model"]["type"] == genai_type(arch) and config["search"]["past_present_share_buffer"] is False
    assert config["model"]["decoder"]["filename"] == result.manifest["genai"]["file"] == "model.genai.onnx"
    assert (result.out_dir / "tokenizer.json").is_file() and "tokenizer.json" in result.manifest["tokenizer"]["files"]
    assert any(note.startswith("onnxruntime-genai: og.Model(folder) runs") for note in result.manifest["notes"])
    check_og_matches(result, *tiny(arch))


def test_onnxruntime_genai_runs_the_demo_export(demo_export, tmp_path):
    result, plan = demo_export
    import rq
    from pathlib import Path

    from rq.plan.schema import save_plan

    save_plan(plan, tmp_path / "plan.json")
    check_og_matches(result, Path(rq.__file__).parent / "demo" / "checkpoint", tmp_path / "plan.json")


def test_onnxruntime_genai_batch_of_equal_length_prompts(exported, tiny):
    """B=4 prompts of one length (no padding): tokens and counts equal rq's runtime and the reference."""
    result = exported("qwen3_moe")
    ids = np.random.default_rng(0).integers(3, result.manifest["vocab_size"], (4, 12)).astype(np.int64)
    check_og_matches(result, *tiny("qwen3_moe"), ids=ids)


def test_onnxruntime_genai_treats_left_padding_as_tokens(exported):
    """onnxruntime-genai 0.18 masks trailing pad tokens only (its attention mask is built from the last token
    backwards, docs/export.md): left-padded rows get an all-ones mask, so a left-padded batch is not what
    onnxruntime-genai runs; its own tokenizer pads on the right, which the tests above cover. If this fails,
    onnxruntime-genai started masking leading pads: docs/export.md's padding paragraph needs updating."""
    result = exported("qwen3_moe")
    pad = json.loads((result.out_dir / GENAI_CONFIG).read_text())["model"]["pad_token_id"]
    ids = np.full((2, 6), pad, np.int64)
    ids[0, 2:], ids[1] = [5, 6, 7, 8], [5, 6, 7, 8, 9, 10]
    model = og.Model(str(result.out_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=8, do_sample=False, batch_size=2)
    generator = og.Generator(model, params)
    generator.append_tokens(ids.astype(np.int32))
    np.testing.assert_array_equal(generator.get_input("attention_mask"), np.ones((2, 6)))
    ids[1, 4:] = pad  # trailing pads are masked
    generator = og.Generator(model, params)
    generator.append_tokens(ids.astype(np.int32))
    np.testing.assert_array_equal(generator.get_input("attention_mask")[1], [1, 1, 1, 1, 0, 0])


def test_genai_graph_inputs_are_optional_and_explicit_feeds_win(exported):
    """onnxruntime-genai sees no offsets or positions to feed; fed, they give model.ort.onnx's outputs exactly."""
    import onnxruntime as ort

    build = exported("qwen3_moe").out_dir
    options = ort.SessionOptions()
    options.log_severity_level = 3
    genai = ort.InferenceSession(str(build / "model.genai.onnx"), options)
    fused = ort.InferenceSession(str(build / "model.ort.onnx"), options)
    required = {i.name for i in genai.get_inputs()}
    overridable = {i.name for i in genai.get_overridable_initializers()}
    assert "position_ids" in overridable and not any(n.startswith("rq_offsets.") for n in required)
    assert required == {i.name for i in fused.get_inputs()} - overridable
    feeds = json.loads((build / "parity" / "decoder_inputs.json").read_text())
    from polygraphy.json import load_json

    for feed in load_json(build / "parity" / "decoder_inputs.json"):
        feed = {k: v + 3 if k.startswith("rq_offsets.") else v for k, v in feed.items()}  # non-zero offsets
        for a, b in zip(genai.run(None, feed), fused.run(None, feed)):
            np.testing.assert_array_equal(a, b)
    assert feeds
    # the weights are model.onnx's: no weight is copied for onnxruntime-genai
    proto = onnx.load(build / "model.genai.onnx", load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


def _cumulative_lis(counts: list[dict[int, np.ndarray]], offsets: list[dict[int, np.ndarray]], logcnt) -> float:
    """Model LIS (mean over layers) of the copies' loads summed over the calls (docs/spec.md §2, §4)."""
    values = []
    for l, copies in logcnt.items():
        total = sum(split_load(torch.from_numpy(c[l]), copies, torch.from_numpy(o[l])) for c, o in zip(counts, offsets))
        values.append(float(lis(total)))
    return float(np.mean(values))


def test_streaming_lis_under_genai_is_close_to_rq_rotation(demo_export):
    """Streaming decode (B=8, 48 steps): the graph's past_seq rotation balances the copies about as well as rq's
    runtime's o_e += load_e, and far better than no rotation (offsets 0)."""
    result, _ = demo_export
    build = result.out_dir
    logcnt = {l["index"]: torch.tensor(l["copies"]) for l in result.manifest["moe_layers"]}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, result.manifest["vocab_size"], (8, 16)).astype(np.int64)
    steps = 48
    runs = {}
    for name, kwargs in {"genai": dict(flavour="genai"), "rq": dict(), "none": dict(streaming=False)}.items():
        generation = OrtGenerator(build, **kwargs).generate(ids, max_new_tokens=steps + 1, eos_token_id=-1)
        decode = generation.steps[1:]  # spec §2: the prefill is not a decode step
        runs[name] = _cumulative_lis([s.expert_counts for s in decode], [s.offsets for s in decode], logcnt)
    assert abs(runs["genai"] - runs["rq"]) <= 0.05 * runs["rq"], runs
    assert runs["genai"] < runs["none"], runs
