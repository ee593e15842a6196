"""Text data for calibration and evaluation: read local files, tokenize, cut into fixed-length sequences.

Equal-length sequences without padding keep the token order of docs/spec.md §1 simple (row-major over
``[batch, seq]``) and make batch LIS comparable across batch sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rq.errors import RQError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".csv", ".html", ".tex", ".c", ".h", ".cpp"}


@dataclass(frozen=True)
class TokenData:
    sequences: torch.Tensor  # [n, seq_len] int64
    description: str

    @property
    def tokens(self) -> int:
        return self.sequences.numel()


def read_texts(path: str | Path | Sequence[str | Path]) -> tuple[list[str], str]:
    """A file, every text file below a folder (sorted, so the order is reproducible), or several of
    those in the order given: one per domain, so sequences (and the traffic windows cut from them,
    docs/spec.md §3) keep the domains apart."""
    if not isinstance(path, (str, Path)):
        parts = [read_texts(p) for p in path]
        if not parts:
            raise RQError("no data path given; pass --data FILE_OR_DIR (repeat it for several domains)")
        return [t for texts, _ in parts for t in texts], " + ".join(d for _, d in parts)
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    else:
        raise RQError(f"data path {path} does not exist; pass a text file or a folder of text files")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise RQError(f"no text found in {path}; pass a non-empty file or a folder with {sorted(TEXT_SUFFIXES)} files")
    size = sum(len(t) for t in texts)
    return texts, f"{path} ({len(texts)} file{'s' if len(texts) > 1 else ''}, {size} characters)"


def tokenize_sequences(tokenizer, texts: list[str], *, seq_len: int, max_sequences: int | None,
                       seed: int = 0, description: str = "") -> TokenData:
    """Tokenize, concatenate (separated by EOS where the tokenizer has one), cut into ``seq_len`` windows
    and keep ``max_sequences`` of them chosen with ``seed`` (all when None)."""
    if seq_len < 2:
        raise RQError(f"--seq-len must be at least 2, got {seq_len}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    n = len(ids) // seq_len
    if n == 0:
        raise RQError(f"{description or 'data'} has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
                      f"pass more text or a smaller --seq-len")
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)
    if max_sequences is not None and max_sequences < n:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_sequences]
        windows = windows[order.sort().values]
    desc = f"{description}; {windows.shape[0]} x {seq_len} tokens, seed {seed}"
    return TokenData(windows, desc)


def load_token_data(tokenizer, path: str | Path | Sequence[str | Path], *, seq_len: int, max_sequences: int | None,
                    seed: int = 0) -> TokenData:
    texts, description = read_texts(path)
    return tokenize_sequences(tokenizer, texts, seq_len=seq_len, max_sequences=max_sequences, seed=seed,
                              description=description)


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise RQError(f"no usable tokenizer in {model_dir} ({str(err).splitlines()[0]}); "
                      f"save the tokenizer next to the weights with tokenizer.save_pretrained") from None


def batches(sequences: torch.Tensor, batch_size: int):
    """Consecutive ``[B, S]`` batches (the last one may be smaller)."""
    for start in range(0, sequences.shape[0], batch_size):
        yield sequences[start:start + batch_size]
