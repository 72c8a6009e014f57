"""The registry of report sections.

One module per stage lives in this package, named after the stage (``eval.py``,
``heads.py``, ...). A module plugs in by defining a module-level ``SECTION``::

    from cnalens.report.sections import Section

    def render(dir: Path, meta: dict) -> str | None:
        ...                       # read DIR/<stage>.csv / .json, return HTML (or None to omit)

    SECTION = Section("heads", "Attention heads", render)

``meta`` is the parsed ``DIR/run.json``. The renderer reads its own stage files (helpers:
:func:`read_csv`, :func:`read_meta`) and builds HTML with :mod:`cnalens.report.html` and
figures with :mod:`cnalens.report.plots`. Nothing else needs editing: :func:`registry` finds
the module, and :data:`ORDER` fixes where its section appears. A renderer is only called when
``DIR/<stage>.csv`` or ``DIR/<stage>.json`` exists; returning None also omits the section.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from cnalens.errors import CnaError
from cnalens.io import read_json

Renderer = Callable[[Path, dict[str, Any]], "str | None"]


class Section(NamedTuple):
    stage: str  # results file stem: DIR/<stage>.csv, DIR/<stage>.json
    title: str | Callable[[Path], str]  # section heading, or (dir) -> heading
    render: Renderer  # (dir, run.json dict) -> HTML body, or None to omit the section

    def heading(self, dir: Path) -> str:
        """The section's heading for the results in ``dir``."""
        return self.title(dir) if callable(self.title) else self.title


# Fixed display order. Stages planned but without a module yet are simply skipped; a module
# whose stage is not listed here is shown after these, in alphabetical order.
ORDER: tuple[str, ...] = (
    "eval",
    "heads",
    "heads_attribution",
    "cna",
    "verification",
    "shallow",
    "explain",
    "lora",
    "prune",
    "debias",
)


def _load(stage: str) -> Section | None:
    name = f"{__name__}.{stage}"
    if importlib.util.find_spec(name) is None:
        return None
    mod = importlib.import_module(name)
    sec = getattr(mod, "SECTION", None)
    if not isinstance(sec, Section):
        raise TypeError(f"{name} must define SECTION = Section(...)")
    return sec


def registry() -> list[Section]:
    """All known sections, in display order."""
    extra = sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_") and m.name not in ORDER
    )
    return [s for s in (_load(stage) for stage in (*ORDER, *extra)) if s is not None]


# ---------------------------------------------------------------- helpers for renderers


def case_file(dir: Path, stage: str) -> str | None:
    """The case file a stage ran on (its settings' ``cases``); None for arithmetic."""
    settings = read_meta(dir, stage).get("settings") or {}
    return str(settings["cases"]) if settings.get("cases") else None


def has_results(dir: Path, stage: str) -> bool:
    return (dir / f"{stage}.csv").is_file() or (dir / f"{stage}.json").is_file()


def read_meta(dir: Path, stage: str) -> dict[str, Any]:
    """``DIR/<stage>.json`` as a dict; ``{}`` when the file is missing."""
    path = Path(dir) / f"{stage}.json"
    if not path.is_file():
        return {}
    try:
        obj = read_json(path)
    except ValueError as e:
        raise CnaError(f"{path.name} is not valid JSON: {e}") from e
    return obj if isinstance(obj, dict) else {}


def _csv_kwargs(path: Path, text: tuple[str, ...], usecols: tuple[str, ...] | None) -> dict:
    header = list(pd.read_csv(path, nrows=0).columns)
    cols = header if usecols is None else [c for c in usecols if c in header]
    return {
        "keep_default_na": False,
        "na_values": {c: [""] if c in text else ["", "nan", "NaN", "NA"] for c in cols},
        "dtype": {c: str for c in text if c in cols},
        "usecols": cols,
    }


def _fix(df: pd.DataFrame, path: Path, required: tuple[str, ...], text: tuple[str, ...]):
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CnaError(f"{path.name} lacks column(s): {', '.join(missing)}")
    for c in text:
        if c in df.columns:
            df[c] = df[c].fillna("").astype(str)
    return df


def read_csv(
    dir: Path,
    name: str,
    *,
    required: tuple[str, ...] = (),
    text: tuple[str, ...] = (),
    usecols: tuple[str, ...] | None = None,
) -> pd.DataFrame | None:
    """``DIR/<name>.csv`` (``name`` is a file stem, e.g. ``"eval"`` or ``"eval_cases"``).

    Returns None when the file is missing. Columns in ``text`` are kept as strings exactly as
    written (no 'NA' -> NaN guessing; empty -> ""). Missing ``required`` columns -> CnaError.
    """
    path = Path(dir) / f"{name}.csv"
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, **_csv_kwargs(path, text, usecols))
    except (ValueError, pd.errors.ParserError) as e:
        raise CnaError(f"cannot read {path.name}: {e}") from e
    return _fix(df, path, required, text)


def iter_csv(
    dir: Path,
    name: str,
    *,
    required: tuple[str, ...] = (),
    text: tuple[str, ...] = (),
    usecols: tuple[str, ...] | None = None,
    chunksize: int = 50_000,
) -> Iterator[pd.DataFrame]:
    """Like :func:`read_csv` but in chunks, for large per-case files; nothing if missing."""
    path = Path(dir) / f"{name}.csv"
    if not path.is_file():
        return
    try:
        reader = pd.read_csv(path, chunksize=chunksize, **_csv_kwargs(path, text, usecols))
        with reader:
            for chunk in reader:
                yield _fix(chunk, path, required, text)
    except (ValueError, pd.errors.ParserError) as e:
        raise CnaError(f"cannot read {path.name}: {e}") from e
