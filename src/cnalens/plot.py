"""The report's figures for notebooks: each takes the DataFrame a function returns and
gives a matplotlib ``Figure`` (drawn by the same code as ``cnalens report``)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from cnalens.errors import CnaError


def heads(df: pd.DataFrame) -> Figure:
    """Heatmap of a head scan (``scan_heads``): layers x heads, colour = accuracy drop,
    one panel per group (operation)."""
    from cnalens.report.sections.heads import heatmap

    fig = heatmap(df)
    if fig is None:
        raise CnaError("the head table is empty: nothing to plot")
    return fig


def verification(df: pd.DataFrame) -> Figure:
    """The four verification experiments (``Comparison.verify``) against K, each beside
    its random baseline (dashed), one line per group (operation) if the frame has one."""
    from cnalens.report.sections.verification import chart

    if df.empty:
        raise CnaError("the verification table is empty: nothing to plot")
    return chart(df, [c for c in ("op",) if c in df.columns])


__all__ = ["heads", "verification"]
