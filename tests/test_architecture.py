"""The shape of the code (docs/design.md): imports run forward along the data flow, and no two modules import
each other. Read from the source with ``ast`` (function-level imports included), so a lazy import that opens
a door backwards counts as much as one at the top of a file."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"rq": ROOT / "rq", "rq.export": ROOT / "export", "rq.engines": ROOT / "engines"}
STANDALONE = ("tritonserver_models",)  # copied into Triton model repositories; they import only numpy/onnxruntime

# Stages in data-flow order (docs/design.md); a package may import its own stage, the shared base and the stages
# before it. eval and export both follow rqmodel and never import each other; placement follows plan.
BASE = {"rq", "rq.errors", "rq.atomic", "rq.documents", "rq.progress", "rq.memory"}
ALLOWED = {
    "rq.core": set(),
    "rq.kernels": {"rq.core"},
    "rq.models": {"rq.core"},
    "rq.calibrate": {"rq.core", "rq.models"},
    "rq.plan": {"rq.core", "rq.models", "rq.calibrate"},
    "rq.rqmodel": {"rq.core", "rq.kernels", "rq.models", "rq.calibrate", "rq.plan"},
    "rq.eval": {"rq.core", "rq.models", "rq.calibrate", "rq.plan", "rq.rqmodel"},
    "rq.export": {"rq.core", "rq.kernels", "rq.models", "rq.calibrate", "rq.plan", "rq.rqmodel"},
    "rq.engines": {"rq.core", "rq.kernels", "rq.models", "rq.calibrate", "rq.plan", "rq.rqmodel", "rq.export"},
    "rq.placement": {"rq.core", "rq.models", "rq.calibrate", "rq.plan"},
    "rq.replan": {"rq.core", "rq.kernels", "rq.models", "rq.calibrate", "rq.plan", "rq.rqmodel", "rq.eval", "rq.export",
                  "rq.engines", "rq.placement"},  # the loop of a served model comes after everything it drives
}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, base in PACKAGE_DIRS.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base)
            if any(part in STANDALONE for part in rel.parts) or (prefix == "rq" and rel.parts[0] in ("export", "engines")):
                continue
            parts = [p for p in rel.with_suffix("").parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the rq modules it imports (``from rq.x import y`` counts ``rq.x.y`` where that is a module)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_two_modules_import_each_other():
    edges = _imports(_modules())
    mutual = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
    assert not mutual, f"modules that import each other: {mutual}"


def test_no_stage_imports_a_later_stage():
    edges = _imports(_modules())
    backwards = []
    for module, targets in edges.items():
        allowed = ALLOWED.get(_package(module))
        if allowed is None:  # the CLI, the demo, testing tooling and the shared base sit above or below the stages
            continue
        for target in targets:
            package = _package(target)
            if package != _package(module) and package not in BASE and package not in allowed:
                backwards.append(f"{module} -> {target}")
    assert not backwards, "imports against the data flow (docs/design.md):\n" + "\n".join(sorted(backwards))


def test_the_shared_base_imports_no_stage():
    edges = _imports(_modules())
    for module in BASE - {"rq"}:
        stages = {t for t in edges.get(module, ()) if _package(t) not in BASE}
        assert not stages, f"{module} is shared by every stage and must import none: {sorted(stages)}"
