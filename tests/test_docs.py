"""The README and the docs site: size, the two verified commands, links, the library
example (parsed, checked against the API, and run on a tiny model), and the pages the
site generates (CLI reference, API namespace). ``mkdocs build --strict`` itself runs in
CI (``.ci/run``) and here when the ``docs`` extra is installed."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cnalens

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_BYTES = 10_000

# verified in fresh clones (issue 18: "its two commands still work from a fresh clone")
MAIN_JOB = "./scripts/setup.sh && .venv/bin/cnalens run arithmetic --out results/arithmetic"
TESTS = "./scripts/setup.sh && .venv/bin/python -m pytest -q"

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks, "the README has no ```python example"
    return blocks[0]


# ------------------------------------------------------------------------------ README
def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes (at most {MAX_README_BYTES})"


def test_readme_keeps_the_two_commands():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)\n```", text, re.S | re.M)
    assert MAIN_JOB in blocks, "the main job's command changed or left the README"
    assert TESTS in blocks, "the test command changed or left the README"
    assert TESTS in (ROOT / ".ci" / "run").read_text(), ".ci/run no longer runs the README's"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto: not checked here; same-page anchors
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.name}: links to missing files: {missing}"


def test_docs_pages_are_in_the_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            if isinstance(item, str):
                yield item
            else:
                for value in item.values():
                    yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert on_disk <= listed, f"pages missing from mkdocs.yml's nav: {on_disk - listed}"
    assert listed <= on_disk, f"nav entries without a page: {listed - on_disk}"


# ------------------------------------------------------------- the README's library example
def _resolve(node: ast.AST):
    """The object a ``cnalens.a.b`` expression names, or None if it is not one."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == "cnalens"):
        return None
    obj, name = cnalens, "cnalens"
    for attr in reversed(parts):
        assert not attr.startswith("_"), f"the README uses a private name: {name}.{attr}"
        assert hasattr(obj, attr), f"the README names {name}.{attr}, which does not exist"
        obj, name = getattr(obj, attr), f"{name}.{attr}"
    return obj


def _signature(obj) -> inspect.Signature:
    if getattr(obj, "__name__", None) == "cnalens.cna":  # the callable module
        return inspect.signature(obj.cna)
    return inspect.signature(obj)


def _bind(sig: inspect.Signature, call: ast.Call, what: str, method: bool = False) -> None:
    args = [None] * (len(call.args) + method)
    kwargs = {k.arg: None for k in call.keywords if k.arg}
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise AssertionError(f"the README calls {what} with arguments it does not take: "
                             f"{exc}") from None


def test_readme_example_names_the_real_api():
    tree = ast.parse(_readme_example())
    returns = {"cna": cnalens.Comparison}  # what the example's results are, by function
    typed: dict[str, type] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Attribute) and func.attr in returns:
                typed.update({t.id: returns[func.attr] for t in node.targets
                              if isinstance(t, ast.Name)})
    calls = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            _resolve(node)
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        obj = _resolve(node.func)
        if obj is not None and callable(obj):
            _bind(_signature(obj), node, ast.unparse(node.func))
            calls += 1
        elif isinstance(node.func.value, ast.Name) and node.func.value.id in typed:
            cls = typed[node.func.value.id]
            meth = getattr(cls, node.func.attr, None)
            assert meth is not None, f"{cls.__name__} has no method {node.func.attr}"
            _bind(inspect.signature(meth), node, f"{cls.__name__}.{node.func.attr}", True)
            calls += 1
    assert calls >= 6, "the README example calls less of the API than expected"


def test_readme_example_runs_on_a_tiny_model(monkeypatch, one_thread):
    """The example as written, with two substitutions: the model is a tiny random Llama,
    and the cases' targets are its own predictions (so that it answers them and the
    verification has cases to work on)."""
    from cnalens.models import ModelView
    from tiny import TinyTokenizer, tiny_model

    view = ModelView(tiny_model("llama"), TinyTokenizer(), {"spec": "llama"})
    real_cases = cnalens.arithmetic_cases

    def cases_it_answers(*args, **kwargs):
        cases = real_cases(*args, **kwargs)
        pred = cnalens.evaluate(view, cases, progress=False)["pred"]
        return [dataclasses.replace(c, target=p) for c, p in zip(cases, pred, strict=True)
                if p.strip() == p and p]

    monkeypatch.setattr(cnalens, "load_model", lambda *a, **k: view)
    monkeypatch.setattr(cnalens, "arithmetic_cases", cases_it_answers)
    monkeypatch.setenv("CNALENS_PROGRESS", "0")
    scope: dict = {}
    exec(compile(_readme_example(), "<README example>", "exec"), scope)
    assert len(scope["cases"]) >= 8
    frame = scope["comp"].frame()
    assert list(frame.columns[:8]) == ["case", "rank", "layer", "neuron", "imp_a", "imp_b",
                                       "coef_a", "coef_b"]
    ver = scope["comp"].verify(ks=[10, 20])
    assert {"zero_topk", "keep_topk", "coef_drop_head", "coef_drop_lowest"} <= set(
        ver["experiment"])


# ---------------------------------------------------------------- generated pages
def test_cli_reference_has_every_command():
    gen = _load("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    page = gen.cli_markdown()
    names = gen.command_names()
    assert {"run arithmetic", "heads", "cna", "explain", "debias"} <= set(names)
    for name in names:
        assert f"`cnalens {name}`" in page, f"no section for cnalens {name}"
    assert "--top-k" in page and "[default: gemma3-270m]" in page
    assert "+,-,\\*,/" in page  # help text escaped for Markdown, not read as emphasis


def test_api_page_documents_the_namespace():
    hooks = _load("docs_hooks", DOCS / "hooks.py")
    page = (DOCS / "api.md").read_text()
    documented = hooks.DOCUMENTED.findall(page)
    assert "cnalens.cna" in documented and "cnalens.models.view" in documented
    for module in documented:
        assert importlib.util.find_spec(module) is not None, module
    section = hooks.namespace_section(documented)
    for name in cnalens.__all__:
        if not name.startswith("__"):
            assert f"`cnalens.{name}`" in section, name
    assert "::: cnalens.heads.scan_heads" in section  # defined outside the listed modules
    assert "::: cnalens.cna.Comparison" not in section  # linked to its module's entry


def test_lists_after_a_paragraph_get_their_blank_line():
    hooks = _load("docs_hooks", DOCS / "hooks.py")
    text = "Intro:\n- a\n  more\n- b\n\n```\nx:\n- not a list\n```\n"
    assert hooks.separate_lists(text) == (
        "Intro:\n\n- a\n  more\n- b\n\n```\nx:\n- not a list\n```\n")


def test_table_code_pipes_lose_githubs_escape():
    hooks = _load("docs_hooks", DOCS / "hooks.py")
    text = "| `a \\| b` | c \\| d |\nnot `a \\| b`"
    assert hooks.table_code_pipes(text) == "| `a | b` | c \\| d |\nnot `a \\| b`"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: "
                                          "pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings")
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    res = subprocess.run([exe, "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "site" / "cli-reference" / "index.html").exists()
