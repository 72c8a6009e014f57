"""Every public function and method of cnalens annotates every parameter (``self``/``cls``
excepted; ``*args``/``**kwargs`` included). Private names (``_x``) and nested functions
(closures) are exempt."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(node: ast.AST, prefix: str = "", in_class: bool = False
               ) -> list[tuple[str, Function, bool]]:
    """(qualified name, node, defined in a class) of every function not nested in another
    function: module level, in classes (nested ones too) and under ``if``/``try``/``with``."""
    out = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((prefix + child.name, child, in_class))
        elif isinstance(child, ast.ClassDef):
            out += _functions(child, f"{prefix}{child.name}.", True)
        elif isinstance(child, ast.stmt):
            out += _functions(child, prefix, in_class)
    return out


def unannotated(source: str, filename: str = "<snippet>") -> list[str]:
    """``file:line:function:param`` for every parameter of a public function or method of
    ``source`` without an annotation."""
    bad = []
    for name, fn, in_class in _functions(ast.parse(source)):
        if fn.name.startswith("_"):
            continue
        a = fn.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
        if in_class and params and params[0].arg in ("self", "cls"):
            params = params[1:]
        params += [p for p in (a.vararg, a.kwarg) if p is not None]
        bad += [f"{filename}:{fn.lineno}:{name}:{p.arg}" for p in params
                if p.annotation is None]
    return bad


def test_public_functions_annotate_every_parameter():
    bad = []
    for path in sorted((SRC / "cnalens").rglob("*.py")):
        bad += unannotated(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))
    assert bad == [], "unannotated parameters:\n" + "\n".join(bad)


def test_the_checker_can_fail():
    snippet = (
        "def f(x, y: int, *args, z=1, **kw) -> None: ...\n"   # 1
        "async def g(q: int, /, r) -> None: ...\n"           # 2
        "def _private(a): ...\n"                             # 3
        "def outer(a: int) -> None:\n"                       # 4
        "    def inner(b): ...\n"                            # 5
        "class C:\n"                                         # 6
        "    def m(self, v, w: int) -> None: ...\n"          # 7
        "    @classmethod\n"                                 # 8
        "    def k(cls, u: int) -> None: ...\n"              # 9
        "    def _hidden(self, t): ...\n"                    # 10
        "    class D:\n"                                     # 11
        "        def n(self, s): ...\n"                      # 12
        "if True:\n"                                         # 13
        "    def h(p): ...\n"                                # 14
        "def free(self): ...\n"                              # 15
    )
    assert unannotated(snippet, "m.py") == [
        "m.py:1:f:x", "m.py:1:f:z", "m.py:1:f:args", "m.py:1:f:kw", "m.py:2:g:r",
        "m.py:7:C.m:v", "m.py:12:C.D.n:s", "m.py:14:h:p", "m.py:15:free:self"]
    assert unannotated("def f(x: int, *a: int, **k: str) -> None: ...\n") == []
