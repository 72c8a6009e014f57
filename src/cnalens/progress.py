"""Progress bars on stderr (rich); silent when disabled or when stderr is not a terminal
and CNALENS_PROGRESS=0."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True)


def enabled(flag: bool = True) -> bool:
    return flag and os.environ.get("CNALENS_PROGRESS", "1") != "0"


def columns(*extra: ProgressColumn) -> tuple:
    """The project's progress columns, with ``extra`` columns (e.g. a loss) before the time."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


def bar(show: bool = True, *extra: ProgressColumn) -> Progress:
    """A progress bar on stderr with :func:`columns`; disabled like :func:`track`."""
    return Progress(*columns(*extra), console=console, disable=not enabled(show))


def track(items: Iterable[T], description: str, total: int | None = None,
          show: bool = True) -> Iterator[T]:
    """Iterate with a progress bar (elapsed and remaining time)."""
    if not enabled(show):
        yield from items
        return
    with Progress(*columns(), console=console, transient=False) as progress:
        task = progress.add_task(description, total=total if total is not None else len(items))
        for item in items:
            yield item
            progress.advance(task)


def notice(message: str, show: bool = True) -> None:
    """One ``cnalens: ...`` line on stderr (a first-use conversion, say), never wrapped."""
    if show:
        import sys

        print(f"cnalens: {message}", file=sys.stderr, flush=True)
