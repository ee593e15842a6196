"""Random edits of valid documents, for property-based tests (hypothesis, a dev dependency) of everything rq
reads from disk: plans, stats, engine load dumps, placement files. Whatever the edit, loading must give a
valid document or one-line :class:`rq.errors.RQError` naming the field, never another exception."""

from __future__ import annotations

import json
from typing import Any, Iterator

from hypothesis import strategies as st

LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.sampled_from([0, -1, 1, 63, 64, 10**9]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.just([]), st.just({}),
                   st.lists(st.integers(-2, 20), max_size=4))
"""Values an edit puts in: wrong types, zero, negatives, huge numbers, NaN, empty containers."""


def json_paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every location (a tuple of keys and indices) in a nested dict/list document, the root included."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from json_paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from json_paths(value, prefix + (i,))


@st.composite
def edited(draw, doc: Any) -> Any:
    """``doc`` (a JSON-able structure, not modified) with one to three random edits: a value replaced, a key or
    an item removed, an item or a key added."""
    doc = json.loads(json.dumps(doc))  # a deep copy (dict keys become strings)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(json_paths(doc))))
        if not where:
            doc = draw(LEAVES) if draw(st.booleans()) else doc
            continue
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        key, action = where[-1], draw(st.sampled_from(["replace", "delete", "append"]))
        if action == "replace":
            parent[key] = draw(LEAVES)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.append(draw(LEAVES))
        else:
            parent[draw(st.text(min_size=1, max_size=4))] = draw(LEAVES)
        if not isinstance(doc, (dict, list)):
            break
    return doc
