"""The results report: one self-contained HTML page built from the files in a results folder.

    from cnalens.report import render_report
    path = render_report(Path("results/run1"))      # -> results/run1/report.html

The report only reads files (``DIR/run.json``, ``DIR/<stage>.csv``, ``DIR/<stage>.json``, ...),
it never recomputes anything. Figures are embedded as base64 PNGs and also saved as
``DIR/plots/<name>.png``. Sections come from :mod:`cnalens.report.sections` (one module per
stage; see that package's docstring for how to add one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cnalens.errors import CnaError
from cnalens.io import read_json, write_text
from cnalens.report import html
from cnalens.report.sections import ORDER, Section, has_results, read_meta, registry

__all__ = ["ORDER", "REPORT_NAME", "Section", "findings_section", "load_run", "registry",
           "render_report"]

REPORT_NAME = "report.html"
log = logging.getLogger(__name__)


def load_run(dir: Path) -> dict[str, Any]:
    """``DIR/run.json`` as a dict; CnaError when the folder or the file is missing or bad."""
    dir = Path(dir)
    path = dir / "run.json"
    if not path.is_file():
        raise CnaError(f"no results in {dir}: run.json missing")
    try:
        run = read_json(path)
    except ValueError as e:
        raise CnaError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(run, dict):
        raise CnaError(f"{path} should hold a JSON object")
    return run


FINDING_TITLES = {"eval": "Accuracy", "heads": "Attention heads", "cna": "CNA and its "
                  "verification", "shallow": "Shallow neurons", "explain": "The chain of "
                  "single cases", "lora": "LoRA", "prune": "Pruning", "debias": "Bias editing"}


def findings_section(dir: Path) -> str:
    """The report's opening "Findings" section (:mod:`cnalens.report.findings`)."""
    from cnalens.report.findings import NOTATION, collect, missing_line

    found = collect(dir)
    groups = [(FINDING_TITLES.get(st, st), [f.text for f in found if f.stage == st])
              for st in dict.fromkeys(f.stage for f in found)]
    notes = [NOTATION, *([m] if (m := missing_line(dir)) else [])]
    return html.findings_box(groups, notes)


def render_report(
    dir: Path, *, sections: Sequence[Section] | None = None, strict: bool = False
) -> Path:
    """Write ``DIR/report.html`` (atomically) from the results in DIR and return its path.

    ``sections`` overrides the registry (default: :func:`registry`). A section whose renderer
    raises is shown as an error box so one bad file does not cost the whole report; with
    ``strict=True`` the exception propagates instead (tests use this).
    """
    dir = Path(dir)
    run = load_run(dir)
    rendered: list[tuple[str, str, str]] = []
    for sec in registry() if sections is None else sections:
        if not has_results(dir, sec.stage):
            continue
        try:
            body = sec.render(dir, run)
        except Exception as e:
            if strict:
                raise
            log.warning("report section %s failed: %s", sec.stage, e)
            detail = f"{type(e).__name__}: {e}"
            body = html.error_box("This section could not be rendered:", detail)
        if body is not None:
            rendered.append((sec.stage, sec.heading(dir), body))

    stage_seconds = {}
    for stage in run.get("stages") or []:
        try:
            meta = read_meta(dir, str(stage))
        except CnaError:
            continue
        if "seconds" in meta:
            stage_seconds[str(stage)] = meta["seconds"]

    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    try:
        summary = findings_section(dir)
    except Exception as e:
        if strict:
            raise
        log.warning("report findings failed: %s", e)
        summary = html.error_box("The findings could not be computed:", f"{type(e).__name__}: {e}")
    page = html.page(run, str(dir), rendered, stage_seconds, generated, summary)
    return write_text(dir / REPORT_NAME, page)
