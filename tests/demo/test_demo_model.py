"""The committed demo model and corpus (rq/demo/, docs/demo-model.md)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from rq.demo import corpus

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the training recipe: tiny matmuls gain nothing from more, and on a
    busy machine competing OpenMP threads are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(corpus.demo_checkpoint_dir())
    m.eval()
    return m


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(corpus.demo_checkpoint_dir())


# ----------------------------------------------------------------------------- corpus

def test_splits_load_nonempty():
    for name in corpus.SPLITS:
        text = corpus.load_split(name)
        docs = corpus.load_documents(name)
        assert len(text) > 100_000, name
        assert len(docs) >= 10 and all(d.strip() for d in docs), name


def test_unknown_split_refused():
    with pytest.raises(ValueError):
        corpus.load_split("train")


def test_splits_match_manifest_and_are_disjoint():
    manifest = corpus.load_manifest()
    names = {}
    hashes = {}
    for name in corpus.SPLITS:
        docs = corpus.load_documents(name)
        entries = manifest["splits"][name]
        assert len(docs) == len(entries)
        got = [hashlib.sha256(d.encode("utf-8")).hexdigest() for d in docs]
        assert got == [e["sha256"] for e in entries], name
        names[name] = {e["name"] for e in entries}
        hashes[name] = set(got)
    assert not names["calibration"] & names["heldout_code"]
    assert not names["heldout_prose"] & names["calibration_prose"]  # prose calibration never sees held-out topics
    for i, a in enumerate(corpus.SPLITS):
        for b in corpus.SPLITS[i + 1:]:
            assert not hashes[a] & hashes[b], (a, b)
    # committed data stays small
    total = sum(corpus.split_path(n).stat().st_size for n in corpus.SPLITS)
    assert total < 1_500_000


def test_train_split_disjoint_from_committed_splits():
    train = corpus.build_train_documents()
    assert len(train) > 100
    committed = corpus.committed_code_names()
    train_names = {n for n, _ in train}
    assert not train_names & committed
    committed_hashes = {e["sha256"] for s in corpus.SPLITS for e in corpus.load_manifest()["splits"][s]}
    assert not {hashlib.sha256(t.encode("utf-8")).hexdigest() for _, t in train} & committed_hashes
    assert not any(n.startswith("pydoc_data/") for n in train_names)  # prose never trained on


# ----------------------------------------------------------------------------- checkpoint

def test_checkpoint_shape(model):
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_hidden_layers >= 4
    assert cfg.num_experts >= 16
    assert cfg.num_experts_per_tok == 2
    assert cfg.hidden_size % 128 == 0 and cfg.moe_intermediate_size % 128 == 0  # INT4 G=128 fits
    assert cfg.max_position_embeddings >= 512
    layers = model.model.layers
    assert all(hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts") for layer in layers)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n_params < 8_000_000


def test_tokenizer_round_trip(tokenizer):
    assert len(tokenizer) == 2048
    assert tokenizer.eos_token == corpus.DOC_SEPARATOR
    samples = [
        corpus.load_documents("heldout_code")[0][:3000],
        corpus.load_documents("heldout_prose")[0][:3000],
        "def f(x):\n\treturn {'a': x ** 2}  # ünïcödé → ✓\r\n\n    \n",
    ]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    ids = tokenizer(corpus.DOC_SEPARATOR, add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.eos_token_id]


def test_calibration_split_has_default_calibration_tokens(tokenizer):
    enc = tokenizer.backend_tokenizer.encode(corpus.load_split("calibration"), add_special_tokens=False)
    assert len(enc.ids) >= 128 * 512  # docs/spec.md §3 default: 128 sequences x 512 tokens


def test_logits_finite_and_routing_imbalanced(model, tokenizer):
    from rq.demo.train import encode_split, measure

    ids = encode_split(tokenizer, "calibration")
    m = measure(model, ids, seq_len=512, max_tokens=8 * 512)
    assert m["tokens"] == 8 * 512
    assert m["perplexity"] < len(tokenizer) / 20  # far better than uniform: the model learned
    lis = m["lis_per_layer"]
    assert len(lis) == model.config.num_hidden_layers
    assert max(lis) > 1.5  # heavy hitters: the point of the demo
    with torch.no_grad():
        logits = model(input_ids=ids[:64].unsqueeze(0)).logits
    assert logits.shape == (1, 64, len(tokenizer))
    assert torch.isfinite(logits).all()


def test_training_record_committed():
    record = json.loads((corpus.demo_checkpoint_dir() / "demo_training.json").read_text())
    assert record["recipe"]["num_experts"] >= 16
    measured = [name for name in corpus.SPLITS if name in record["eval"]]
    # the training record measures the splits it was evaluated on: at least the three the model reports on
    assert {"calibration", "heldout_code", "heldout_prose"} <= set(measured)
    for name in measured:
        assert record["eval"][name]["perplexity"] < record["eval"]["uniform_perplexity"]


# ----------------------------------------------------------------------------- training script

def test_train_script_tiny(tmp_path):
    from rq.demo import train

    out = tmp_path / "tiny"
    train.main(["--out", str(out), "--tiny", "--steps", "3"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    record = json.loads((out / "demo_training.json").read_text())
    assert len(record["log"]) == 3
    assert all(torch.isfinite(torch.tensor(e["ce"])) for e in record["log"])
    ids = tok("import os\n", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
