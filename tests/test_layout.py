"""The layout holds: the library (``pipeline/``) never imports a stage, a stage never imports
another stage, the library has no import circle, and no library module grows past ~450 lines.

Imports are read with ``ast`` (every ``import`` statement, also those inside functions: a lazy
import is still a dependency). A *stage* is a subpackage of ``stages/`` (``stages/teach/``...);
the modules directly in ``stages/`` are the machinery stages share (store runner, executors,
locks, the CLI).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 450
# The CLI and the params schema assemble every stage; they are no stage themselves.
ASSEMBLERS = {"stages.cli", "stages.params_schema"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(top: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / top).rglob("*.py"))}


ALL = modules("pipeline") | modules("stages")


def imports(path: Path) -> set[str]:
    """Every module of ours ``path`` imports (``from a.b import c`` counts ``a.b`` and, when it is
    a module, ``a.b.c``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in ALL)
    return {m for m in found if m.split(".")[0] in ("pipeline", "stages")}


def stage_of(module: str) -> str | None:
    """``stages.teach.run`` -> ``teach``; None for the shared machinery and the library."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "stages":
        return None
    return parts[1] if (REPO / "stages" / parts[1]).is_dir() else None


def test_the_library_imports_no_stage():
    upward = {m: sorted(d for d in imports(p) if d.startswith("stages"))
              for m, p in modules("pipeline").items()}
    assert {m: d for m, d in upward.items() if d} == {}


def test_a_stage_imports_no_other_stage():
    crossing = {}
    for m, p in modules("stages").items():
        if m in ASSEMBLERS:
            continue
        own = stage_of(m)
        other = sorted(d for d in imports(p) if stage_of(d) not in (None, own))
        if other:
            crossing[m] = other
    assert crossing == {}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_library_or_the_stages():
    graph = {m: {d for d in imports(p) if d in ALL and d != m} for m, p in ALL.items()}
    # a package importing its own modules (registrations) is no circle by itself; a module of
    # it importing the package back is
    assert cycles(graph) == []


def test_cycles_finds_a_circle():
    """The check itself: a circle of three modules is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []


@pytest.mark.parametrize("name", sorted(modules("pipeline")))
def test_library_modules_stay_small(name):
    lines = len(ALL[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{ALL[name]} has {lines} lines (at most {MAX_LINES}): split it by job"


def test_every_module_has_a_docstring():
    missing = [m for m, p in ALL.items()
               if p.read_text().strip() and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []
