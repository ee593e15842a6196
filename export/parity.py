"""``rq check build/``: ONNX Runtime vs the PyTorch R&Q reference, compared with Polygraphy (docs/spec.md §9).

- **prefill**: Polygraphy's ``OnnxrtRunner`` runs each graph on the saved seeded feeds
  (``parity/<graph>_inputs.json``) and ``Comparator.compare_accuracy`` compares every output against the
  saved reference ``RunResults`` (``parity/<graph>_reference.json``).
- **streaming**: :class:`rq.export.runtime.OrtGenerator` (streaming offsets) is teacher-forced along the
  reference's greedy tokens; its per-step logits and ``expert_counts`` are compared the same way.

Both of an export's files are checked, one ONNX Runtime session at a time: the fused route
(``model.ort.onnx``) and the portable ``model.onnx``.

Tolerances: float32 ``atol 1e-4, rtol 1e-3``; float16 ``atol 2e-2, rtol 1e-2`` (an element passes when
within either, Polygraphy's ``SimpleCompareFunc`` ``elemwise`` rule); ``expert_counts`` exactly, but for assignments
the reference's router scores leave open within that tolerance (its near-ties, :func:`rq.export.reference.near_tie_swaps`:
another runtime may route such a token either way, docs/spec.md §9). The result is a
:class:`ParityReport` written to ``build/parity.json`` and printable as one screen of
``PASSED | ...`` / ``FAILED | ...`` lines.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rq.errors import RQError
from rq.export.layerwise import LayerwiseExport, LayerwiseUnsupported
from rq.export.runtime import OrtGenerator, load_manifest

TOLERANCES = {"float32": (1e-4, 1e-3), "float16": (2e-2, 1e-2)}
ORT_RUNNER = "onnxrt"
GENERATOR_RUNNER = "onnxrt-generator"


def tolerances(dtype: str) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol, "expert_counts": "exact"}


@dataclass
class OutputParity:
    """One output of one phase, aggregated over its iterations (feeds or decode steps)."""

    phase: str  # "prefill" or "streaming"
    graph: str  # graph name, or "generator"
    output: str
    passed: bool
    iterations: int
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    exact: bool = False
    file: str = ""  # which file of the export ran (model.ort.onnx, model.onnx, engine.plan)
    near_tie_swaps: int = 0  # exact outputs: assignments routed the other way on the reference's near-ties
    rule: str = ""  # outputs checked by the approximate rule (int8 activations): its measure and limit

    def line(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        if self.rule:
            err = self.rule
        elif self.exact and self.passed and self.near_tie_swaps:
            err = f"exact but {self.near_tie_swaps} near-tie swap{'s' * (self.near_tie_swaps > 1)}"
        elif self.exact:
            err = "exact" if self.passed else f"mismatch (max abs diff {self.max_abs:g})"
        else:
            err = f"max abs {self.max_abs:.3e} (atol {self.atol:g})  max rel {self.max_rel:.3e} (rtol {self.rtol:g})"
        return f"{status} | {self.file:<15} {self.phase:<9} {self.graph:<9} {self.output:<26} x{self.iterations:<3} {err}"


@dataclass
class ParityReport:
    """Result of :func:`check_export`: ``passed`` and one :class:`OutputParity` per compared output."""

    build_dir: str
    dtype: str
    passed: bool
    outputs: list[OutputParity] = field(default_factory=list)
    greedy_tokens: dict[str, list[int]] = field(default_factory=dict)  # file -> [agree, total], informational
    notes: list[str] = field(default_factory=list)
    runtime: str = "ONNX Runtime"  # what ran the exported model

    def failures(self) -> list[OutputParity]:
        return [o for o in self.outputs if not o.passed]

    def summary(self, max_lines: int = 20) -> str:
        """One screen: a header, a line per output (the present.* keys/values folded into one line per
        graph), and the verdict."""
        atol, rtol = TOLERANCES[self.dtype]
        lines = [f"rq check {self.build_dir}: {self.runtime} vs PyTorch R&Q, {self.dtype} "
                 f"(atol {atol:g}, rtol {rtol:g}; expert_counts exact but for the reference's near-ties)"]
        for row in _fold_present(self.outputs)[:max_lines]:
            lines.append(row.line())
        hidden = len(_fold_present(self.outputs)) - max_lines
        if hidden > 0:
            lines.append(f"... {hidden} more outputs in parity.json")
        for file, (agree, total) in self.greedy_tokens.items():
            lines.append(f"greedy tokens of the reference reproduced by {file}: {agree}/{total}")
        lines.extend(self.notes)
        n_fail = len(self.failures())
        lines.append(("PASSED" if self.passed else "FAILED") + f" | {len(self.outputs) - n_fail}/{len(self.outputs)} "
                     f"outputs within tolerance")
        return "\n".join(lines)

    def table(self):
        """The same as a rich ``Table``."""
        from rich.table import Table

        atol, rtol = TOLERANCES[self.dtype]
        table = Table(title=f"{self.runtime} vs PyTorch R&Q ({self.dtype}: atol {atol:g}, rtol {rtol:g})")
        for col in ("", "phase", "graph", "output", "iters", "max abs", "max rel"):
            table.add_column(col)
        for row in _fold_present(self.outputs):
            status = "[green]PASSED" if row.passed else "[red]FAILED"
            abs_err = "exact" if row.exact and row.passed else f"{row.max_abs:.2e}"
            rel_err = "" if row.exact else f"{row.max_rel:.2e}"
            table.add_row(status, row.phase, row.graph, row.output, str(row.iterations), abs_err, rel_err)
        return table

    def to_dict(self) -> dict:
        out = asdict(self)
        for row in out["outputs"]:  # JSON has no inf/nan
            for key in ("max_abs", "max_rel"):
                if not math.isfinite(row[key]):
                    row[key] = str(row[key])
        return out


def _fold_present(rows: list[OutputParity]) -> list[OutputParity]:
    """Fold the ``present.*`` rows of a graph into one ``present.* (n tensors)`` row for the summary."""
    out, groups = [], {}
    for row in rows:
        if row.output.startswith("present."):
            key = (row.file, row.phase, row.graph)
            if key not in groups:
                groups[key] = []
                out.append(key)
            groups[key].append(row)
        else:
            out.append(row)
    folded = []
    for item in out:
        if isinstance(item, OutputParity):
            folded.append(item)
            continue
        group = groups[item]
        worst = max(group, key=lambda r: r.max_abs)
        folded.append(OutputParity(item[1], item[2], f"present.* ({len(group)} tensors)", all(r.passed for r in group),
                                   group[0].iterations, worst.max_abs, max(r.max_rel for r in group),
                                   group[0].atol, group[0].rtol, file=item[0], rule=worst.rule))
    return folded


@contextlib.contextmanager
def polygraphy_quiet():
    """Polygraphy without its console log (the report prints one summary instead)."""
    from polygraphy.logger import G_LOGGER

    saved = G_LOGGER.module_severity, G_LOGGER.colors
    G_LOGGER.module_severity, G_LOGGER.colors = G_LOGGER.CRITICAL, False
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        G_LOGGER.module_severity, G_LOGGER.colors = saved


def compare_run_results(reference, candidate, output_names: list[str], dtype: str, phase: str,
                        graph: str, file: str = "", near_ties: list[dict[str, int]] | None = None
                        ) -> list[OutputParity]:
    """Polygraphy comparison of two ``RunResults`` (one runner each), aggregated per output: the one comparison
    every runtime's check uses (ONNX Runtime here, TensorRT in :mod:`rq.engines.tensorrt`). ``near_ties``: per
    iteration, the reference's near-tie swaps per ``expert_counts`` output (docs/spec.md §9); without them the
    counts must be exact."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc

    atol, rtol = TOLERANCES[dtype]
    exact = [n for n in output_names if n.startswith("expert_counts")]
    atols = {"": atol, **{n: 0.0 for n in exact}}
    rtols = {"": rtol, **{n: 0.0 for n in exact}}
    results = RunResults()
    results.extend(reference)
    results.extend(candidate)
    with polygraphy_quiet():
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atols, rtol=rtols,
                                                                                        check_shapes=True))
    iterations = list(accuracy[0].values())[0]  # one comparison (reference vs candidate): per-iteration dicts
    rows = []
    for name in output_names:
        expected = sum(name in it for it in reference[0][1])  # e.g. encoder loads exist at step 0 only
        per_iter = [(i, it[name]) for i, it in enumerate(iterations) if name in it]
        swaps = 0
        passed = expected > 0 and len(per_iter) == expected
        for i, result in per_iter:
            if bool(result):
                continue
            moved = _swaps_within_near_ties(reference[0][1][i], candidate[0][1][i], name, near_ties, i) \
                if name in exact else None
            passed = passed and moved is not None
            swaps += moved or 0
        max_abs = max((r.max_absdiff for _, r in per_iter if r.max_absdiff is not None), default=math.inf)
        max_rel = max((r.max_reldiff for _, r in per_iter if r.max_reldiff is not None), default=math.inf)
        rows.append(OutputParity(phase, graph, name, passed, expected, float(max_abs), float(max_rel),
                                 atols.get(name, atol), rtols.get(name, rtol), exact=name in exact, file=file,
                                 near_tie_swaps=swaps))
    return rows


def compare_approximate(reference, candidate, output_names: list[str], dtype: str, phase: str, graph: str,
                        file: str = "", near_ties: list[dict[str, int]] | None = None) -> list[OutputParity]:
    """:func:`compare_run_results` for a file checked by the approximate rule (int8 activations,
    :mod:`rq.export.approximate`; its limits do not depend on ``dtype``): one row per output, its worst call
    against the rule's limit."""
    from rq.export import approximate

    rows = []
    ref_iters, our_iters = reference[0][1], candidate[0][1]
    for name in output_names:
        calls = [(np.asarray(r[name]), np.asarray(o[name])) for r, o in zip(ref_iters, our_iters) if name in r]
        expected = sum(name in it for it in ref_iters)
        ties = None if near_ties is None else [t.get(name, 0) for t in near_ties]
        result = approximate.verdict(name, calls if len(calls) == expected else [], ties)
        rows.append(OutputParity(phase, graph, name, result.passed, expected, result.value, result.value,
                                 result.limit, result.limit, exact=False, file=file, rule=result.rule))
    return rows


def _swaps_within_near_ties(reference, candidate, name: str, near_ties: list[dict[str, int]] | None,
                            iteration: int) -> int | None:
    """The assignments ``candidate``'s counts moved from ``reference``'s when the move is explained by the
    reference's near-ties of that call (the same total, at most that many moved); else None (a mismatch)."""
    if near_ties is None or iteration >= len(near_ties):
        return None
    ref, ours = np.asarray(reference[name], np.int64), np.asarray(candidate[name], np.int64)
    if ref.shape != ours.shape or ref.sum() != ours.sum():
        return None
    moved = int(np.maximum(ours - ref, 0).sum())
    return moved if moved <= near_ties[iteration].get(name, 0) else None


def near_ties(manifest: dict, phase: str, graph: str | None = None) -> list[dict[str, int]] | None:
    """The reference's near-tie swaps per call of ``phase`` (and prefill ``graph``); None for an export that
    predates them (its counts are compared exactly)."""
    ties = manifest["parity"].get("near_ties")
    if ties is None:
        return None
    return ties["prefill"].get(graph) if phase == "prefill" else ties["streaming"]


FLAVOURS = {"onnxruntime": "ort_file", "portable": "file"}
"""The files an export has for ONNX Runtime: its fused route (``model.ort.onnx``) and the portable ``model.onnx``."""


def _compare(approximate: bool):
    """The comparison of a file: element-wise (:func:`compare_run_results`) or the approximate rule."""
    return compare_approximate if approximate else compare_run_results


def _prefill(build_dir: Path, manifest: dict, file: str, generator: OrtGenerator | None = None,
             layerwise: LayerwiseExport | None = None, approximate: bool = False) -> list[OutputParity]:
    """Each graph on its saved feeds: Polygraphy's ``OnnxrtRunner`` on the generator's session, or the same feeds
    layer by layer."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.json import load_json

    rows = []
    for graph, entry in manifest["parity"]["prefill"].items():
        with polygraphy_quiet():
            feeds = load_json(str(build_dir / entry["inputs"]))
            reference = RunResults.load(str(build_dir / entry["reference"]))
        names = [o["name"] for o in manifest["graphs"][graph]["outputs"]]
        if layerwise is not None:
            outputs = layerwise.runners[graph].run([dict(f) for f in feeds], names)
            ours = RunResults()
            ours.append((ORT_RUNNER, [IterationResult(outputs=o, runtime=0.0, runner_name=ORT_RUNNER)
                                      for o in outputs]))
        else:
            with polygraphy_quiet():
                ours = Comparator.run([OnnxrtRunner(generator.sessions[graph], name=ORT_RUNNER)], data_loader=feeds)
        rows.extend(_compare(approximate)(reference, ours, names, manifest["dtype"], "prefill", graph, file,
                                          near_ties(manifest, "prefill", graph)))
    return rows


def _streaming(build_dir: Path, manifest: dict, file: str, generator: OrtGenerator | None = None,
               layerwise: LayerwiseExport | None = None, approximate: bool = False
               ) -> tuple[list[OutputParity], int, int]:
    """The teacher-forced generation of the saved streaming case (:class:`OrtGenerator`, streaming offsets, or the
    same calls layer by layer), per-step logits and loads against the reference's; and how many of the
    reference's greedy tokens the runtime's own argmax reproduces (informational)."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import load_json

    entry = manifest["parity"]["streaming"]
    with polygraphy_quiet():
        inputs = load_json(str(build_dir / entry["inputs"]))[0]
        reference = RunResults.load(str(build_dir / entry["reference"]))
    forced = np.asarray(inputs["forced_tokens"], np.int64)
    if layerwise is not None:
        steps = layerwise.generate(np.asarray(inputs["input_ids"], np.int64),
                                   np.asarray(inputs["attention_mask"], np.int64), forced)
    else:
        generator.reset()
        generation = generator.generate(inputs["input_ids"], inputs["attention_mask"], forced_tokens=forced)
        steps = [{"logits": s.logits, **s.counts_by_name()} for s in generation.steps]
    ours = RunResults()
    ours.append((GENERATOR_RUNNER, [IterationResult(outputs=s, runtime=0.0, runner_name=GENERATOR_RUNNER)
                                    for s in steps]))
    names = list(dict.fromkeys(n for it in reference[0][1] for n in it.keys()))
    rows = _compare(approximate)(reference, ours, names, manifest["dtype"], "streaming", "generator", file,
                                 near_ties(manifest, "streaming"))
    greedy = np.stack([s["logits"][:, -1, :].argmax(-1) for s in steps[:-1]], axis=1)
    return rows, int((greedy == forced).sum()), int(forced.size)


SESSION_COPIES = 2
"""What a whole-file session holds, in copies of the export's weights: the file's, and the fused kernels' layouts."""


def checks_layerwise(build_dir: str | Path, stream: str) -> bool:
    """Whether ``rq check --stream`` checks layer by layer: ``always``/``never``, or ``auto``: layer by layer
    unless :data:`SESSION_COPIES` times the export's weights take under half the memory available now (the rule
    ``rq export --stream auto`` applies to the checkpoint)."""
    from rq.models.streaming import available_memory

    if stream not in ("auto", "always", "never"):
        raise RQError(f"--stream must be auto, always or never, got '{stream}'")
    if stream != "auto":
        return stream == "always"
    manifest = load_manifest(build_dir)
    data = {g["data"] for g in manifest["graphs"].values() if g.get("data")}
    weights = sum((Path(build_dir) / d).stat().st_size for d in data if (Path(build_dir) / d).is_file())
    available = available_memory()
    return available is None or SESSION_COPIES * weights >= available // 2


def approximate_check(manifest: dict, flavour: str) -> bool:
    """Whether ``flavour``'s file is checked by the approximate rule: the fused route with int8 activations."""
    return flavour == "onnxruntime" and bool(manifest.get("ort_int8_activations"))


def _check_file(build_dir: Path, manifest: dict, flavour: str, file: str, layerwise: bool,
                show_progress: bool = False) -> tuple[list[OutputParity], int, int]:
    """Prefill and streaming parity of one file of the export: whole sessions, or layer by layer; the fused route
    of an export with int8 activations by the approximate rule."""
    approximate = approximate_check(manifest, flavour)
    if not layerwise:
        generator = OrtGenerator(build_dir, streaming=True, flavour=flavour)
        rows = _prefill(build_dir, manifest, file, generator=generator, approximate=approximate)
        stream_rows, agree, total = _streaming(build_dir, manifest, file, generator=generator,
                                               approximate=approximate)
        return rows + stream_rows, agree, total
    from rq.progress import progress_bar

    export = LayerwiseExport(build_dir, manifest, FLAVOURS[flavour])
    segments = {name: len(r.segments) for name, r in export.runners.items()}
    runs = sum(segments[g] for g in manifest["parity"]["prefill"]) + sum(segments.values())
    with progress_bar(f"checking {file}, layer by layer", total=runs, enabled=show_progress) as advance:
        export.on_segment(lambda label: advance(1))
        rows = _prefill(build_dir, manifest, file, layerwise=export, approximate=approximate)
        stream_rows, agree, total = _streaming(build_dir, manifest, file, layerwise=export, approximate=approximate)
    return rows + stream_rows, agree, total


def check_export(build_dir: str | Path, write: bool = True, label: str | Path | None = None,
                 layerwise: bool = False, show_progress: bool = False) -> ParityReport:
    """Compare ONNX Runtime on ``build_dir`` with the saved PyTorch reference, for both of the export's files
    (the fused route ``model.ort.onnx`` first, then the portable ``model.onnx``), one ONNX Runtime session per
    file at a time; writes ``parity.json``. ``label`` names the export in the report (default: ``build_dir``).
    ``layerwise``: one session per decoder layer at a time instead (:mod:`rq.export.layerwise`), so the check of
    a model bigger than memory holds one layer's weights; the same calls and comparisons (``show_progress``: a
    bar of the layers run)."""
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    if "parity" not in manifest:
        raise RQError(f"{build_dir} has no parity data; re-run rq-export (it saves the reference outputs)")
    flavours = [f for f, key in FLAVOURS.items() if all(key in g for g in manifest["graphs"].values())]
    for graph in manifest["graphs"].values():
        for key in (FLAVOURS[f] for f in flavours):
            if not (build_dir / graph[key]).is_file():
                raise RQError(f"{build_dir / graph[key]} is missing; re-run rq-export")
    rows, greedy = [], {}
    for flavour in flavours:
        file = "+".join(sorted({g[FLAVOURS[flavour]] for g in manifest["graphs"].values()}))
        try:
            file_rows, agree, total = _check_file(build_dir, manifest, flavour, file, layerwise, show_progress)
        except LayerwiseUnsupported as err:
            raise RQError(f"{file} of {label or build_dir} cannot be checked layer by layer ({err}); check it whole "
                          f"with `rq check --stream never` on a machine that holds it") from None
        except Exception as err:  # a corrupted file, or an ONNX Runtime that cannot run the graph
            if isinstance(err, RQError):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RQError(f"ONNX Runtime could not run {file} of {label or build_dir} ({first}); re-run rq-export") \
                from err
        rows.extend(file_rows)
        greedy[file] = [agree, total]
    notes = [f"{f}: QMoE on int8 activations, checked by the approximate rule (docs/spec.md §9)"
             for f, flavour in zip(greedy, flavours) if approximate_check(manifest, flavour)]
    report = ParityReport(str(label or build_dir), manifest["dtype"], all(r.passed for r in rows), rows, greedy,
                          notes)
    if write:
        (build_dir / "parity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
