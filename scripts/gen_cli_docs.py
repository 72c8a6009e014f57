"""The CLI reference, generated from the typer app itself (``cnalens.cli.app``).

Typer's own generator (the one behind ``typer MODULE utils docs``) walks the click command
tree of the imported app, so every command, including those that register themselves
from ``cnalens/commands/``, appears with its arguments, options, defaults and help.
(``typer cnalens.cli utils docs`` loads ``cli.py`` as a second copy of the module, on
whose app the ``commands/`` modules do not register, so this script calls the generator
on the real app instead.)

The docs site builds ``reference/cli.md`` from :func:`cli_markdown` at build time
(``docs/hooks.py``); nothing generated is committed.

    python scripts/gen_cli_docs.py              # print the page
    python scripts/gen_cli_docs.py -o cli.md    # write it
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

INTRO = """\
Generated from the typer app (`cnalens.cli.app`) when the site is built
(`scripts/gen_cli_docs.py`): it is what `cnalens COMMAND --help` prints. The
[CLI guide](cli.md) explains what each command computes and writes.
"""


def cli_markdown(title: str = "CLI reference") -> str:
    """Markdown for every command of ``cnalens``, as typer's docs generator writes it."""
    import typer
    import typer.main
    from typer.cli import MARKUP_MODE_KEY, get_docs_for_click

    from cnalens.cli import app

    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="cnalens")
    ctx.ensure_object(dict)
    ctx.obj[MARKUP_MODE_KEY] = getattr(app, "rich_markup_mode", None)
    body = get_docs_for_click(obj=command, ctx=ctx, name="cnalens", title="`cnalens`")
    return f"# {title}\n\n{INTRO}\n{_escape(_demote(body)).strip()}\n"


def _demote(markdown: str) -> str:
    """One heading level down (the page has its own title), outside code blocks."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(out)


def _escape(markdown: str) -> str:
    """Help texts are plain text: escape the ``*`` in them (``--ops +,-,*,/``) so Markdown
    does not read emphasis; code spans, code blocks, list bullets and typer's own bold
    labels (``**Options**:``) stay as they are."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or line.startswith("```") or re.fullmatch(r"\*\*\w+\*\*:", line):
            out.append(line)
            continue
        bullet = "* " if line.startswith("* ") else ""
        parts = line[len(bullet):].split("`")
        parts[::2] = [p.replace("*", "\\*") for p in parts[::2]]  # outside code spans
        out.append(bullet + "`".join(parts))
    return "\n".join(out)


def command_names() -> list[str]:
    """Every command path (``run arithmetic``, ``heads``, ...) of the app, sorted."""
    import typer
    import typer.main

    from cnalens.cli import app

    def walk(cmd, prefix: str) -> list[str]:
        if hasattr(cmd, "list_commands"):  # a group (typer vendors its own click)
            ctx = typer.Context(cmd)
            return [n for name in cmd.list_commands(ctx)
                    for n in walk(cmd.get_command(ctx, name), f"{prefix} {name}".strip())]
        return [prefix]

    return sorted(walk(typer.main.get_command(app), ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, help="write the page here (else stdout)")
    args = parser.parse_args(argv)
    text = cli_markdown()
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
