"""The import structure (design.md): lower layers never import higher ones, no import
circles (imports inside functions count), no private name used from another module, and
the report reads files without torch or the compute modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# low to high; a module may import its own layer's and lower layers' modules only
LAYERS: list[tuple[str, ...]] = [
    ("cnalens.errors", "cnalens.io", "cnalens.progress", "cnalens.callables", "cnalens.names",
     "cnalens.stats", "cnalens.trees", "cnalens.tables"),
    ("cnalens.models", "cnalens.data", "cnalens"),
    ("cnalens.interventions", "cnalens.lens", "cnalens.report"),
    ("cnalens.evaluate", "cnalens.states", "cnalens.plot"),
    ("cnalens.scores", "cnalens.heads", "cnalens.ablation"),
    ("cnalens.certified", "cnalens.vocab"),
    ("cnalens.cna", "cnalens.locator", "cnalens.robustness"),
    ("cnalens.explain",),
    ("cnalens.apps",),
    ("cnalens.stages",),
    ("cnalens.pipeline",),
    ("cnalens.cli", "cnalens.commands", "cnalens.__main__"),
]
# what the report may import: it renders files (no torch, no compute modules)
REPORT_MAY_IMPORT = ("cnalens.report", "cnalens.errors", "cnalens.io", "cnalens.tables",
                     "cnalens.stats", "cnalens.names")


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "cnalens").rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _typing_only(tree: ast.Module) -> set[int]:
    """Line numbers of the imports under ``if TYPE_CHECKING:`` (never executed)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for s in node.body for n in ast.walk(s)
                      if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _imports(name: str, path: Path, runtime: bool = False
             ) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every import anywhere in
    the file (inside functions too), relative imports resolved; ``runtime``: without the
    type-checking-only ones."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _typing_only(tree) if runtime else set()
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full, None, node.lineno) if full in MODULES
                           else (base, a.name, node.lineno))
    return out


def _layer(module: str) -> int | None:
    best = None
    for i, names in enumerate(LAYERS):
        for pre in names:
            inside = module == pre or (pre != "cnalens" and module.startswith(pre + "."))
            if inside and (
                    best is None or len(pre) > best[0]):
                best = (len(pre), i)
    return None if best is None else best[1]


def _edges() -> dict[str, set[str]]:
    """Who imports whom when the code runs (imports inside functions included)."""
    return {m: {t for t, _, _ in _imports(m, p, runtime=True) if t in MODULES and t != m}
            for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_no_upward_imports():
    bad = []
    for m, p in MODULES.items():
        for target, _, line in _imports(m, p):
            if target in MODULES and _layer(target) > _layer(m):
                bad.append(f"{p.relative_to(SRC)}:{line} {m} -> {target}")
    assert bad == []


def test_no_import_circles():
    edges = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert circles == []


def test_no_private_names_across_modules():
    bad = []
    for m, p in MODULES.items():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        aliases = {}  # local name -> cnalens module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("cnalens"):
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in MODULES:
                        aliases[a.asname or a.name] = full
        for target, name, line in _imports(m, p):
            if name and name.startswith("_") and not name.startswith("__") and target != m:
                bad.append(f"{p.relative_to(SRC)}:{line} {name} from {target}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != m):
                bad.append(f"{p.relative_to(SRC)}:{node.lineno} {node.value.id}.{node.attr}")
    assert bad == []


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith("cnalens.report")])
def test_report_reads_files_only(name):
    imported = {t for t, _, _ in _imports(name, MODULES[name])}
    heavy = sorted(t for t in imported if t.split(".")[0] in ("torch", "transformers", "peft"))
    mine = sorted(t for t in imported if t.startswith("cnalens") and not any(
        t == ok or t.startswith(ok + ".") for ok in REPORT_MAY_IMPORT))
    assert (heavy, mine) == ([], [])


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The import parser sees function-level and relative imports and private names."""
    pkg = tmp_path / "cnalens"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n    from ..x import _y\n")
    monkeypatch.setitem(MODULES, "cnalens.sub.b", pkg / "sub" / "b.py")
    got = _imports("cnalens.sub.a", pkg / "sub" / "a.py")
    assert ("cnalens.sub.b", None, 2) in got and ("cnalens.x", "_y", 3) in got
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from cnalens.sub import b\n")
    assert _imports("cnalens.sub.c", pkg / "sub" / "c.py", runtime=True) == [
        ("typing", "TYPE_CHECKING", 1)]
    assert ("cnalens.sub.b", None, 3) in _imports("cnalens.sub.c", pkg / "sub" / "c.py")
