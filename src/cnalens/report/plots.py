"""Figures for the report.

Every figure is drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so
nothing here touches pyplot's global state or needs a display. :func:`embed` saves the figure
as ``DIR/plots/<name>.png`` and returns it as a ``data:image/png;base64,...`` URI, which keeps
the HTML page one self-contained file.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cnalens.io import write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PLOTS_DIR = "plots"
DPI = 144
PAGE_PX = 894  # a figure's room on the page at a 1,000 px window (CSS px)
MIN_TEXT_PX = 10.5  # no figure text renders smaller than this on such a page
MIN_WIDTH = 6.0  # inches: every figure is at least 6 * DPI = 864 px wide

# Muted, colour-blind-friendly palette (Okabe-Ito, minus yellow which is hard on white).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#555555"]

OP_NAMES = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}
OP_ORDER = ["+", "-", "*", "/", "custom"]
TEMPLATE_ORDER = ["eq", "nl", "qa", "verbal", "custom"]


def new_figure(width: float = 8.0, height: float = 3.2) -> Figure:
    """A figure with the report's look, attached to an Agg canvas (at least
    :data:`MIN_WIDTH` inches wide)."""
    fig = Figure(figsize=(max(MIN_WIDTH, width), height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style_axes(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.spines[["left", "bottom"]].set_color("#888888")
    ax.tick_params(colors="#333333", labelsize=9)
    ax.yaxis.grid(True, color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)


def text_px(fig: Figure, size_pt: float, page_px: float = PAGE_PX) -> float:
    """How tall text of ``size_pt`` points renders on a page ``page_px`` wide (the image
    is scaled down to fit; never up)."""
    width_px = fig.get_figwidth() * DPI
    return size_pt * DPI / 72 * min(1.0, page_px / width_px)


def legible(fig: Figure, min_px: float = MIN_TEXT_PX, page_px: float = PAGE_PX) -> int:
    """Enlarge every visible text of ``fig`` that would render under ``min_px`` on a page
    ``page_px`` wide; returns how many were enlarged."""
    need = min_px / text_px(fig, 1.0, page_px)  # points
    n = 0
    for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
        if t.get_visible() and t.get_text() and t.get_fontsize() < need - 1e-9:
            t.set_fontsize(need)
            n += 1
    return n


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def embed(fig: Figure, dir: Path, name: str) -> str:
    """Save ``fig`` as ``DIR/plots/<name>.png`` and return it as a base64 PNG data URI."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"bad plot name {name!r}")
    legible(fig)
    png = png_bytes(fig)
    write_bytes(Path(dir) / PLOTS_DIR / f"{name}.png", png)
    return data_uri(png)


def ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """Unique ``values``: those in ``preferred`` first in that order, the rest sorted."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + sorted(v for v in seen if v not in preferred)


def op_label(op: str) -> str:
    name = OP_NAMES.get(op)
    return f"{op}  {name}" if name else op


def group_value(col: str, value: object) -> str:
    """One group column's value in a table cell: an op by its name, "all" (pooled) as
    "all ops" for ops."""
    if str(value) == "all":
        return "all ops" if col == "op" else "all"
    return op_label(str(value)) if col == "op" else str(value)


def group_label(group: dict) -> str:
    """A group of rows in text: an operation by its name (``+  addition``), any other
    label as ``column = value``; several joined by `` · ``; no label (or op "custom", the
    one group of a case file without labels): "all cases"."""
    if not group or group == {"op": "custom"}:
        return "all cases"
    return " · ".join(op_label(str(v)) if k == "op" else f"{k} = {v}"
                      for k, v in group.items())


def groups_of(df: pd.DataFrame, by: Sequence[str]) -> list[tuple[dict, pd.DataFrame]]:
    """``df``'s rows per group of the ``by`` columns (ops in their order, the rest sorted
    as text), each with its group as a dict; no columns: one group, ``{}``."""
    by = list(by)
    if not by:
        return [({}, df)]
    keys = df[by].astype(str).apply(tuple, axis=1)
    order = ordered(keys.tolist(), [])
    if by == ["op"]:
        order = [(v,) for v in ordered([k[0] for k in order], OP_ORDER)]
    return [(dict(zip(by, k, strict=True)), df[keys == k]) for k in order]


def head_heatmaps(g: pd.DataFrame, value: str, label: str, scale: float = 1.0,
                  floor: float = 1.0, by: Sequence[str] = ("op",)) -> Figure:
    """One panel per group of ``by`` (op) of a (group, layer, head, ``value``) frame:
    layers (rows) x heads (columns), colour = ``value * scale`` on a symmetric red-blue
    scale (at least ``floor``)."""
    panels = groups_of(g, by)
    n_layers, n_heads = int(g["layer"].max()) + 1, int(g["head"].max()) + 1
    vmax = max(floor, float(np.nanmax(np.abs(g[value].to_numpy()))) * abs(scale))
    width = min(12.0, 1.2 + len(panels) * max(1.6, 0.28 * n_heads + 0.8))
    fig = new_figure(width=width, height=min(12.0, 1.4 + 0.22 * n_layers))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    im = None
    for ax, (group, sub) in zip(axes, panels, strict=True):
        grid = np.full((n_layers, n_heads), np.nan)
        grid[sub["layer"].astype(int), sub["head"].astype(int)] = sub[value] * scale
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                       origin="lower", interpolation="nearest")
        ax.set_title(group_label(group) if group else "", fontsize=10, color="#222222")
        ax.set_xlabel("head", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_xticks(range(0, n_heads, max(1, n_heads // 8)))
        ax.set_yticks(range(n_layers))  # every layer row labelled
    axes[0].set_ylabel("layer", fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.9, label=label)
    return fig


def eval_accuracy_chart(df: pd.DataFrame) -> Figure | None:
    """Grouped bars: one panel per op, digits on x, one bar per template, 95% CI whiskers.

    ``df`` holds eval.csv rows; pooled rows (op or template ``"all"``) are ignored here.
    """
    df = df[(df["op"] != "all") & (df["template"] != "all")]
    df = df[df["acc"].notna()]
    if df.empty:
        return None
    ops = ordered(df["op"].tolist(), OP_ORDER)
    templates = ordered(df["template"].tolist(), TEMPLATE_ORDER)
    colors = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(templates)}

    widths = []
    for op in ops:
        n_digits = df.loc[df["op"] == op, "digits"].nunique()
        widths.append(max(1.0, n_digits * (0.35 + 0.12 * len(templates))))
    fig = new_figure(width=min(11.0, max(6.0, 1.2 + 1.0 * sum(widths))), height=3.3)
    axes = fig.subplots(
        1, len(ops), sharey=True, squeeze=False, gridspec_kw={"width_ratios": widths}
    )[0]

    bar_w = 0.8 / len(templates)
    for ax, op in zip(axes, ops, strict=True):
        sub = df[df["op"] == op]
        digits = sorted(sub["digits"].dropna().unique().tolist())
        xpos = {d: i for i, d in enumerate(digits)}
        for j, tpl in enumerate(templates):
            rows = sub[sub["template"] == tpl]
            if rows.empty:
                continue
            x = [xpos[d] - 0.4 + bar_w * (j + 0.5) for d in rows["digits"]]
            acc = rows["acc"].to_numpy(dtype=float)
            lo = rows["acc_lo"].to_numpy(dtype=float) if "acc_lo" in rows else acc
            hi = rows["acc_hi"].to_numpy(dtype=float) if "acc_hi" in rows else acc
            lo = [a if math.isnan(v) else v for a, v in zip(acc, lo, strict=True)]
            hi = [a if math.isnan(v) else v for a, v in zip(acc, hi, strict=True)]
            yerr = [
                [max(0.0, a - v) * 100 for a, v in zip(acc, lo, strict=True)],
                [max(0.0, v - a) * 100 for a, v in zip(acc, hi, strict=True)],
            ]
            ax.bar(
                x,
                acc * 100,
                width=bar_w * 0.92,
                color=colors[tpl],
                label=tpl,
                yerr=yerr,
                error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "#333333"},
            )
        ax.set_xticks(range(len(digits)))
        ax.set_xticklabels(["—" if d == 0 else f"{int(d)}-digit" for d in digits])
        ax.set_xlim(-0.6, len(digits) - 0.4)
        ax.set_title(op_label(op), fontsize=10, color="#222222")
        style_axes(ax)
    axes[0].set_ylim(0, 105)
    axes[0].set_yticks(range(0, 101, 20))
    axes[0].set_ylabel("accuracy (%)", fontsize=9)
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="outside upper center",
        ncols=len(handles),
        fontsize=9,
        frameon=False,
        title="template",
        title_fontsize=9,
    )
    return fig


def group_accuracy_chart(df: pd.DataFrame, keys: Sequence[str]) -> Figure | None:
    """One bar per group of ``keys`` (eval.csv rows; pooled rows, any key ``"all"``, left
    out) with 95% whiskers; None with fewer than two groups."""
    keys = list(keys)
    if not keys:
        return None
    rows = df[~df[keys].astype(str).eq("all").any(axis=1) & df["acc"].notna()]
    if len(rows) < 2:
        return None
    labels = [" · ".join(str(r[k]) for k in keys) for _, r in rows.iterrows()]
    fig = new_figure(width=min(12.0, 2.0 + 0.55 * len(rows)), height=3.2)
    ax = fig.subplots()
    acc = rows["acc"].to_numpy() * 100
    err = None
    if {"acc_lo", "acc_hi"} <= set(rows.columns):
        lo = np.clip(acc - rows["acc_lo"].to_numpy() * 100, 0, None)
        hi = np.clip(rows["acc_hi"].to_numpy() * 100 - acc, 0, None)
        err = np.nan_to_num(np.vstack([lo, hi]))
    ax.bar(range(len(rows)), acc, yerr=err, color=PALETTE[0], capsize=3,
           error_kw={"elinewidth": 0.9, "ecolor": "#333333"})
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30 if len(rows) > 6 else 0, ha="right"
                       if len(rows) > 6 else "center", fontsize=8)
    ax.set_xlabel(" · ".join(keys), fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)", fontsize=9)
    style_axes(ax)
    return fig
