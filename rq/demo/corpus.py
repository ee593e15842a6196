"""Demo corpus: text every machine has, the Python standard library (docs/demo-model.md).

Two domains:

* **code** (domain A): the ``.py`` files of the standard library, without test suites
  (``test/``, ``tests/``, ``idle_test/``), generated codec tables (``encodings/``), build-specific
  files (``_sysconfigdata*``, ``config-*``), installed packages (``site-packages``) and
  ``pydoc_data/`` (which is prose, domain B).
* **prose** (domain B): the topic texts of ``pydoc_data/topics.py`` -- the Python language
  reference as English prose, as ``help('topic')`` shows it. Never trained on.

Splits (fixed, deterministic; a file/topic belongs to exactly one split):

* ``calibration``  -- code files, committed in ``rq/demo/data/calibration.txt``;
* ``heldout_code`` -- code files, committed in ``rq/demo/data/heldout_code.txt``;
* ``heldout_prose`` -- prose topics, committed in ``rq/demo/data/heldout_prose.txt``;
* ``calibration_prose`` -- the other prose topics, committed in ``rq/demo/data/calibration_prose.txt``:
  with ``calibration`` it is the demo's calibration set, one file per domain the demo serves, so a
  default plan is fitted to both (docs/demo.md);
* ``train`` -- every other eligible code file, rebuilt from the running interpreter's stdlib
  (:func:`build_train_documents`); the files named in the committed manifest are always excluded,
  so the training split stays disjoint from the committed splits on any Python version.

Selection rule: eligible files are ordered by ``sha256("rq-demo:" + relative path)``; walking that
order, files of at most ``MAX_HELDOUT_FILE_BYTES`` fill ``calibration`` up to ``CALIBRATION_BYTES``,
then ``heldout_code`` up to ``HELDOUT_CODE_BYTES``; everything else is ``train``. Prose topics are
ordered the same way by topic name and fill ``heldout_prose`` up to ``HELDOUT_PROSE_BYTES``, then
``calibration_prose`` up to ``CALIBRATION_PROSE_BYTES``.
``python -m rq.demo.corpus --write`` regenerates the committed files (the committed ones came from
CPython 3.11.7); ``python -m rq.demo.corpus`` prints a summary.

Inside a split file the documents (source files or topics) are joined by :data:`DOC_SEPARATOR`, the
tokenizer's end-of-text special token, so tokenizing a split marks document boundaries.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

DOC_SEPARATOR = "<|endoftext|>"
SPLITS = ("calibration", "heldout_code", "heldout_prose", "calibration_prose")
CALIBRATION_SPLITS = ("calibration", "calibration_prose")  # what the demo calibrates on: both served domains

CALIBRATION_BYTES = 320_000
HELDOUT_CODE_BYTES = 256_000
HELDOUT_PROSE_BYTES = 256_000
CALIBRATION_PROSE_BYTES = 256_000  # more than the topics left after heldout_prose: it takes them all
MAX_HELDOUT_FILE_BYTES = 48_000

_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data", "encodings",
     "lib-dynload", "__pycache__"}
)
_HASH_SALT = "rq-demo:"
_PACKAGE_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- committed artifacts

def data_dir() -> Path:
    """Directory of the committed text splits and their manifest."""
    return _PACKAGE_DIR / "data"


def demo_checkpoint_dir() -> Path:
    """Directory of the committed demo checkpoint (loadable with ``from_pretrained``)."""
    return _PACKAGE_DIR / "checkpoint"


def split_path(name: str) -> Path:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
    return data_dir() / f"{name}.txt"


@lru_cache(maxsize=None)
def load_split(name: str) -> str:
    """The committed text of split ``name`` (one of :data:`SPLITS`):
    documents joined by :data:`DOC_SEPARATOR`."""
    return split_path(name).read_text(encoding="utf-8")


def load_documents(name: str) -> list[str]:
    """The documents (source files or prose topics) of a committed split."""
    return load_split(name).split(DOC_SEPARATOR)


def load_manifest() -> dict:
    """The committed manifest: selection rule, source Python version, and per split the document
    names (stdlib relative paths or topic names) with their sha256 and byte counts."""
    return json.loads((data_dir() / "manifest.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- building from the stdlib

def stdlib_dir() -> Path:
    """The running interpreter's pure-Python standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _key(name: str) -> str:
    return hashlib.sha256((_HASH_SALT + name).encode("utf-8")).hexdigest()


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _eligible_path(rel: Path) -> bool:
    parts = rel.parts
    if any(p in _EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
        return False
    return rel.suffix == ".py" and not rel.name.startswith("_sysconfigdata")


def read_code_file(path: Path) -> str | None:
    """A stdlib source file as normalised text, or None when it is not usable (not UTF-8, blank,
    or containing the document separator)."""
    try:
        text = _normalise(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    if not text.strip() or DOC_SEPARATOR in text:
        return None
    return text


def code_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """All eligible code files as ``(relative posix path, text)``, in selection order (by key)."""
    root = Path(root) if root is not None else stdlib_dir()
    docs = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _eligible_path(rel):
            continue
        text = read_code_file(path)
        if text is not None:
            docs.append((rel.as_posix(), text))
    docs.sort(key=lambda d: (_key(d[0]), d[0]))
    return docs


def prose_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """The topic texts of ``pydoc_data/topics.py`` as ``(topic, text)``, in selection order.
    Read with ``ast`` (the file is a single dict literal), never imported."""
    root = Path(root) if root is not None else stdlib_dir()
    source = (root / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    topics = None
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict):
        raise RuntimeError(f"no 'topics' dict in {root / 'pydoc_data' / 'topics.py'}")
    docs = [(name, _normalise(text)) for name, text in topics.items()
            if text.strip() and DOC_SEPARATOR not in text]
    docs.sort(key=lambda d: (_key(d[0]), d[0]))
    return docs


def _fill(docs, budget: int, max_doc: int | None, taken: set[str]) -> list[tuple[str, str]]:
    out, size = [], 0
    for name, text in docs:
        if size >= budget:
            break
        if name in taken:
            continue
        n = len(text.encode("utf-8"))
        if max_doc is not None and n > max_doc:
            continue
        out.append((name, text))
        taken.add(name)
        size += n
    return out


def select_splits(root: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Apply the selection rule to a stdlib: ``{split: [(name, text), ...]}`` for the committed splits
    and ``train``."""
    code, prose = code_documents(root), prose_documents(root)
    taken: set[str] = set()
    taken_topics: set[str] = set()
    splits = {
        "calibration": _fill(code, CALIBRATION_BYTES, MAX_HELDOUT_FILE_BYTES, taken),
        "heldout_code": _fill(code, HELDOUT_CODE_BYTES, MAX_HELDOUT_FILE_BYTES, taken),
        "heldout_prose": _fill(prose, HELDOUT_PROSE_BYTES, None, taken_topics),
    }
    held_texts = {t for _, t in splits["heldout_prose"]}  # some topics share one text ('if' and 'else')
    splits["calibration_prose"] = _fill([d for d in prose if d[1] not in held_texts], CALIBRATION_PROSE_BYTES,
                                        None, taken_topics)
    splits["train"] = [(n, t) for n, t in code if n not in taken]
    return splits


def committed_code_names() -> set[str]:
    """Relative paths of the code files in the committed calibration / held-out splits."""
    manifest = load_manifest()
    return {d["name"] for split in ("calibration", "heldout_code") for d in manifest["splits"][split]}


def build_train_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """The training split ``[(relative path, text)]``: every eligible code file of the running
    interpreter's stdlib (or ``root``) except those named in the committed manifest, in selection
    order. The committed checkpoint was trained on this list as built by CPython 3.11.7."""
    excluded = committed_code_names()
    return [(n, t) for n, t in code_documents(root) if n not in excluded]


def write_splits(root: Path | None = None, out: Path | None = None) -> dict:
    """Regenerate the committed split files and ``manifest.json`` from a stdlib."""
    out = Path(out) if out is not None else data_dir()
    out.mkdir(parents=True, exist_ok=True)
    splits = select_splits(root)
    manifest = {
        "format": "rq-demo-corpus",
        "version": 1,
        "source": {
            "python": sys.version.split()[0],
            "implementation": sys.implementation.name,
            "stdlib": "sysconfig.get_paths()['stdlib']",
        },
        "rule": {
            "order": f"sha256('{_HASH_SALT}' + name)",
            "calibration_bytes": CALIBRATION_BYTES,
            "heldout_code_bytes": HELDOUT_CODE_BYTES,
            "heldout_prose_bytes": HELDOUT_PROSE_BYTES,
            "calibration_prose_bytes": CALIBRATION_PROSE_BYTES,
            "max_heldout_file_bytes": MAX_HELDOUT_FILE_BYTES,
            "excluded_dirs": sorted(_EXCLUDED_DIRS),
            "separator": DOC_SEPARATOR,
        },
        "train_files": len(splits["train"]),
        "train_bytes": sum(len(t.encode("utf-8")) for _, t in splits["train"]),
        "splits": {},
    }
    for name in SPLITS:
        docs = splits[name]
        text = DOC_SEPARATOR.join(t for _, t in docs)
        split_path_out = out / f"{name}.txt"
        split_path_out.write_text(text, encoding="utf-8", newline="\n")
        manifest["splits"][name] = [
            {"name": n, "bytes": len(t.encode("utf-8")),
             "sha256": hashlib.sha256(t.encode("utf-8")).hexdigest()}
            for n, t in docs
        ]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    load_split.cache_clear()
    return manifest


def _summary() -> None:
    manifest = load_manifest()
    print(f"committed splits from Python {manifest['source']['python']} ({data_dir()})")
    for name in SPLITS:
        docs = manifest["splits"][name]
        print(f"  {name:17s} {len(docs):4d} docs {sum(d['bytes'] for d in docs):9,d} bytes")
    train = build_train_documents()
    print(f"  {'train':17s} {len(train):4d} docs "
          f"{sum(len(t.encode('utf-8')) for _, t in train):9,d} bytes "
          f"(rebuilt from Python {sys.version.split()[0]} at {stdlib_dir()})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rq.demo.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="regenerate rq/demo/data/ from this interpreter's stdlib")
    args = parser.parse_args(argv)
    if args.write:
        write_splits()
    _summary()


if __name__ == "__main__":
    main()
