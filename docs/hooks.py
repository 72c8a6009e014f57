r"""MkDocs hooks (``hooks:`` in mkdocs.yml): the pages generated when the site is built.

- ``cli-reference.md``: replaced by the reference generated from the typer app
  (``scripts/gen_cli_docs.py``), so it can never fall behind the CLI.
- every page, read as GitHub reads it (the files stay as they are): a list that follows
  a paragraph line directly gets the blank line Python-Markdown needs to see a list, and
  a ``\|`` inside a code span of a table row (GitHub's escape) becomes ``|`` (Python-
  Markdown's tables never split inside code spans, and would show the backslash).
- ``api.md``: its ``<!-- namespace -->`` section becomes a table of ``cnalens.__all__``;
  each name links to its entry in the modules the page documents (its ``::: module``
  lines, the one list of documented modules), and names defined elsewhere are documented
  in the section itself.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = re.compile(r"<!-- namespace: generated -->.*?<!-- /namespace -->", re.S)
DOCUMENTED = re.compile(r"^::: *([\w.]+)", re.M)
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")
CODE_SPAN = re.compile(r"`[^`\n]+`")


def _gen_cli_docs():
    spec = importlib.util.spec_from_file_location("gen_cli_docs",
                                                  ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_reference() -> str:
    return _gen_cli_docs().cli_markdown()


def _path(obj) -> str:
    """The dotted path where ``obj`` is defined (a module: its name)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return f"{obj.__module__}.{obj.__qualname__}"


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    return first.replace("|", "\\|")


def namespace_section(documented: list[str]) -> str:
    """The table of ``cnalens.__all__`` and the entries of names no module below holds."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import cnalens

    def covered(path: str) -> bool:
        return any(path == m or path.startswith(m + ".") for m in documented)

    rows, entries = [], []
    for name in cnalens.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(cnalens, name)
        path = _path(obj)
        if not covered(path):
            entries.append(f"::: {path}\n    options:\n      heading: cnalens.{name}\n"
                           "      heading_level: 3\n      show_root_full_path: false\n")
        rows.append(f"| [`cnalens.{name}`][{path}] | {_summary(obj)} |")
    table = "| name | what it is |\n|---|---|\n" + "\n".join(rows)
    return (table + "\n\nDefined outside the modules below:\n\n" + "\n".join(entries)
            if entries else table)


def separate_lists(markdown: str) -> str:
    """A blank line before a list item that directly follows a paragraph line (not
    indented, not itself a list item), outside code fences."""
    out, fenced, prev = [], False, ""
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif (not fenced and LIST_ITEM.match(line) and prev.strip()
              and not LIST_ITEM.match(prev) and not prev[:1].isspace()):
            out.append("")
        out.append(line)
        prev = line
    return "\n".join(out) + "\n"


def table_code_pipes(markdown: str) -> str:
    """``\\|`` -> ``|`` inside the code spans of table rows (lines starting with ``|``)."""
    return "\n".join(
        CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)
        if line.lstrip().startswith("|") else line
        for line in markdown.split("\n"))


def on_page_markdown(markdown: str, page, config, files) -> str:
    src = page.file.src_uri
    if src == "cli-reference.md":
        return cli_reference()
    if src == "api.md":
        documented = DOCUMENTED.findall(markdown)
        markdown = NAMESPACE.sub(lambda _: namespace_section(documented), markdown, count=1)
    return table_code_pipes(separate_lists(markdown))
