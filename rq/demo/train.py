"""Train the built-in demo MoE from scratch on CPU (docs/demo-model.md).

    python -m rq.demo.train --out DIR            # full recipe (~6 min on 2 CPU cores)
    python -m rq.demo.train --out DIR --tiny --steps 3   # smoke test (seconds)
    python -m rq.demo.train --eval DIR           # re-measure a checkpoint (perplexity, per-layer LIS)

Steps: byte-level BPE tokenizer (vocab 2048) trained on the training split; a ``Qwen3MoeForCausalLM``
(4 layers, all MoE, 16 experts, top-2, hidden 128) trained for a fixed number of seeded steps on
random windows of the training split, with a weak Switch-style load-balancing loss (the HF
``router_aux_loss_coef`` / ``output_router_logits`` mechanism); then ``save_pretrained`` of model and
tokenizer into DIR, plus ``demo_training.json`` (recipe, loss curve, evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rq.demo import corpus

EOS = corpus.DOC_SEPARATOR


@dataclass
class Recipe:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    max_position_embeddings: int = 1024
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = True
    router_aux_loss_coef: float = 0.003  # per-layer Switch loss, see per_layer_balance_loss
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # One intra-op thread: bit-reproducible whatever the core count (the float summation order of
    # CPU kernels depends on the thread count), and robust on a shared machine, where two OpenMP
    # threads competing with other processes for two cores ran 10x slower than one thread.
    threads: int = 1
    eval_seq_len: int = 512
    tokenizer_docs: int | None = None  # None: the whole training split
    train_docs: int | None = None      # None: the whole training split

    @staticmethod
    def tiny() -> "Recipe":
        """Reduced recipe for smoke tests: same code path, seconds instead of minutes."""
        return Recipe(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, num_experts=4, moe_intermediate_size=64,
                      max_position_embeddings=128, seq_len=32, batch_size=2, steps=3, warmup_steps=1,
                      eval_seq_len=64, tokenizer_docs=12, train_docs=12)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization, no prefix space) with one special token,
    ``<|endoftext|>`` (id 0), wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def encode_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: each document followed by ``<|endoftext|>``."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # The backend tokenizer directly: same ids, no "longer than model_max_length" warnings.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def encode_split(tokenizer, name: str) -> torch.Tensor:
    """Token ids of a committed split (its separators become ``<|endoftext|>`` tokens)."""
    enc = tokenizer.backend_tokenizer.encode(corpus.load_split(name), add_special_tokens=False)
    return torch.tensor(enc.ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model

def make_config(r: Recipe, tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=r.hidden_size,
        intermediate_size=2 * r.moe_intermediate_size,  # dense MLP size; unused (all layers are MoE)
        moe_intermediate_size=r.moe_intermediate_size,
        num_hidden_layers=r.num_hidden_layers,
        num_attention_heads=r.num_attention_heads,
        num_key_value_heads=r.num_key_value_heads,
        head_dim=r.head_dim,
        num_experts=r.num_experts,
        num_experts_per_tok=r.num_experts_per_tok,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=r.norm_topk_prob,
        max_position_embeddings=r.max_position_embeddings,
        tie_word_embeddings=r.tie_word_embeddings,
        router_aux_loss_coef=r.router_aux_loss_coef,
        output_router_logits=False,  # inference default; training passes it per call
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed per MoE layer, averaged over layers:
    ``mean_l  E * sum_e f[l,e] * P[l,e]`` with ``f`` the share of layer ``l``'s top-k assignments
    that went to expert ``e`` and ``P`` its mean router probability. 1.0 is perfect balance.

    HF's ``load_balancing_loss_func`` (what ``router_aux_loss_coef`` drives inside
    ``Qwen3MoeForCausalLM.forward``) pools ``f`` and ``P`` over all layers before multiplying, so it is
    minimal as soon as the *sum over layers* is balanced, while each layer can keep its own heavy
    hitter: with it at coefficient 0.01 the pooled loss sat at its minimum yet per-layer LIS stayed
    at 3-4.8 (docs/demo-model.md). Real MoE training balances every layer, hence this variant."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        idx = torch.topk(probs, top_k, dim=-1).indices
        f = torch.bincount(idx.reshape(-1), minlength=num_experts).to(probs.dtype) / idx.numel()
        losses.append(num_experts * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    progress = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- measurement

def moe_gates(model) -> list[torch.nn.Module]:
    """The router (``mlp.gate``) of every MoE layer, in layer order."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def measure(model, ids: torch.Tensor, seq_len: int, batch_size: int = 8,
            max_tokens: int | None = None) -> dict:
    """Perplexity and routing loads of ``ids`` cut into non-overlapping ``seq_len`` windows (the
    remainder is dropped). Loads count top-k assignments per (layer, expert), recorded by forward
    hooks on each ``mlp.gate`` (which returns ``(logits, weights, indices)``)."""
    model.eval()
    n = ids.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    windows = ids[: n * seq_len].view(n, seq_len)
    gates = moe_gates(model)
    num_experts = model.config.num_experts
    loads = torch.zeros(len(gates), num_experts, dtype=torch.long)

    def hook(index):
        def fn(_module, _inputs, output):
            loads[index] += torch.bincount(output[2].reshape(-1), minlength=num_experts)
        return fn

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(gates)]
    nll, count = 0.0, 0
    try:
        for start in range(0, n, batch_size):
            batch = windows[start:start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
    share = loads.double() / loads.sum(-1, keepdim=True).clamp(min=1)
    lis = (loads.amax(-1).double() * num_experts / loads.sum(-1).clamp(min=1)).tolist()
    return {
        "tokens": n * seq_len,
        "windows": n,
        "seq_len": seq_len,
        "loss": nll / max(count, 1),
        "perplexity": math.exp(nll / max(count, 1)),
        "lis_per_layer": [round(v, 4) for v in lis],
        "model_lis": round(sum(lis) / len(lis), 4),
        "worst_layer_lis": round(max(lis), 4),
        "top_expert_share_per_layer": [round(v, 4) for v in share.amax(-1).tolist()],
        "top_expert_per_layer": share.argmax(-1).tolist(),
        "loads": loads.tolist(),
    }


def evaluate(model, tokenizer, seq_len: int, train_ids: torch.Tensor | None = None,
             splits: tuple[str, ...] = corpus.SPLITS, max_tokens: int | None = None) -> dict:
    """Measure every committed split; with ``train_ids``, add the unigram baseline perplexity
    (training-split token frequencies, add-one smoothed) next to the uniform one (= vocab size)."""
    out = {"uniform_perplexity": float(len(tokenizer))}
    unigram = None
    if train_ids is not None:
        counts = torch.bincount(train_ids, minlength=len(tokenizer)).double() + 1
        unigram = (counts / counts.sum()).log()
    for name in splits:
        ids = encode_split(tokenizer, name)
        m = measure(model, ids, seq_len, max_tokens=max_tokens)
        m["split_tokens"] = ids.numel()
        m["bytes_per_token"] = round(len(corpus.load_split(name).encode("utf-8")) / ids.numel(), 4)
        if unigram is not None:
            m["unigram_perplexity"] = math.exp(-unigram[ids[: m["tokens"]]].mean().item())
        out[name] = m
    return out


def format_eval(ev: dict) -> str:
    lines = [f"uniform perplexity {ev['uniform_perplexity']:.0f}"]
    for name in corpus.SPLITS:
        if name not in ev:
            continue
        m = ev[name]
        uni = f" (unigram {m['unigram_perplexity']:.1f})" if "unigram_perplexity" in m else ""
        lines.append(
            f"{name:14s} tokens {m['tokens']:6d} ppl {m['perplexity']:8.2f}{uni} "
            f"LIS/layer {' '.join(f'{v:.2f}' for v in m['lis_per_layer'])} "
            f"(model {m['model_lis']:.2f}, worst {m['worst_layer_lis']:.2f}) "
            f"top share {' '.join(f'{v:.3f}' for v in m['top_expert_share_per_layer'])}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training

def train(out: Path, r: Recipe, log_every: int = 50, evaluate_after: bool = True) -> dict:
    from transformers import Qwen3MoeForCausalLM

    t0 = time.time()
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    docs = corpus.build_train_documents()
    texts = [t for _, t in docs]
    tok_texts = texts if r.tokenizer_docs is None else texts[: r.tokenizer_docs]
    train_texts = texts if r.train_docs is None else texts[: r.train_docs]
    tokenizer = train_tokenizer(tok_texts, r.vocab_size)
    ids = encode_documents(tokenizer, train_texts)
    t_data = time.time() - t0
    print(f"train split: {len(train_texts)} files, {sum(len(t) for t in train_texts):,} chars, "
          f"{ids.numel():,} tokens; tokenizer vocab {len(tokenizer)} ({t_data:.1f}s)", flush=True)

    config = make_config(r, tokenizer)
    torch.manual_seed(r.seed)
    model = Qwen3MoeForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, experts implementation "
          f"{model.config._experts_implementation}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=r.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(r.seed)
    span = r.seq_len + 1
    log = []
    ce_acc = aux_acc = 0.0
    acc_n = 0
    t_train = time.time()
    for step in range(r.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r)
        starts = torch.randint(0, ids.numel() - span, (r.batch_size,), generator=gen)
        batch = torch.stack([ids[s:s + span] for s in starts.tolist()])
        outputs = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        logits = outputs.logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = per_layer_balance_loss(outputs.router_logits, r.num_experts_per_tok)
        loss = ce + r.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        ce_acc += ce.item()
        aux_acc += aux.item()
        acc_n += 1
        if (step + 1) % log_every == 0 or step + 1 == r.steps:
            entry = {"step": step + 1, "ce": round(ce_acc / acc_n, 4), "aux": round(aux_acc / acc_n, 4),
                     "lr": round(lr_at(step, r), 6), "elapsed_s": round(time.time() - t_train, 1)}
            log.append(entry)
            print(f"step {entry['step']:5d} ce {entry['ce']:.4f} ppl {math.exp(entry['ce']):8.2f} "
                  f"aux {entry['aux']:.4f} lr {entry['lr']:.2e} {entry['elapsed_s']:.0f}s", flush=True)
            ce_acc = aux_acc = 0.0
            acc_n = 0
    train_s = time.time() - t_train

    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "recipe": asdict(r),
        "command": "python -m rq.demo.train " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("train.py")
        else None,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__,
                        "tokenizers": __import__("tokenizers").__version__,
                        "platform": platform.platform(), "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count()},
        "train_split": {"files": len(train_texts), "chars": sum(len(t) for t in train_texts),
                        "tokens": ids.numel()},
        "parameters": n_params,
        "tokens_seen": r.steps * r.batch_size * r.seq_len,
        "train_seconds": round(train_s, 1),
        "total_seconds": None,
        "log": log,
    }
    if evaluate_after:
        max_tokens = None if r.train_docs is None else 4 * r.eval_seq_len
        record["eval"] = evaluate(model, tokenizer, r.eval_seq_len, train_ids=ids, max_tokens=max_tokens)
        print(format_eval(record["eval"]), flush=True)
    record["total_seconds"] = round(time.time() - t0, 1)
    (out / "demo_training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"saved to {out} (train {train_s:.0f}s, total {record['total_seconds']:.0f}s)", flush=True)
    return record


def evaluate_checkpoint(path: Path, seq_len: int = 512) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_ids = encode_documents(tokenizer, [t for _, t in corpus.build_train_documents()])
    ev = evaluate(model, tokenizer, seq_len, train_ids=train_ids)
    print(format_eval(ev))
    return ev


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rq.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="output checkpoint directory")
    p.add_argument("--eval", type=Path, metavar="DIR", help="only evaluate an existing checkpoint")
    p.add_argument("--tiny", action="store_true", help="reduced model and data (smoke test)")
    p.add_argument("--steps", type=int, help="override the number of optimizer steps")
    p.add_argument("--aux-coef", type=float, help="override router_aux_loss_coef")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--threads", type=int, help="torch intra-op threads (recipe default: 1)")
    args = p.parse_args(argv)
    if args.eval is not None:
        torch.set_num_threads(args.threads or Recipe.threads)
        evaluate_checkpoint(args.eval)
        return
    if args.out is None:
        p.error("--out DIR is required (or --eval DIR)")
    r = Recipe.tiny() if args.tiny else Recipe()
    if args.steps is not None:
        r.steps = args.steps
        r.warmup_steps = min(r.warmup_steps, max(1, args.steps // 10))
    if args.aux_coef is not None:
        r.router_aux_loss_coef = args.aux_coef
    if args.seed is not None:
        r.seed = args.seed
    if args.threads:
        r.threads = args.threads
    train(args.out, r, log_every=1 if args.tiny else 50, evaluate_after=not args.no_eval)


if __name__ == "__main__":
    main()
