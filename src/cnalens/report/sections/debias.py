"""The ``debias`` section: a paired bias before and after zero-editing its CNA neurons.

Reads ``DIR/debias.csv`` (one row per target x template x edit: gap_before, gap_after,
group, split; see ``cnalens.apps.debias``) and ``DIR/debias.json`` (metric rows, costs,
neurons, settings). Shows mean |gap| per target before and after the CNA edit, the summary
table beside the random-neuron control, and what the edit costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cnalens.report import findings as F
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, read_csv, read_meta

STAGE = "debias"
REQUIRED = ("target", "group", "template", "split", "edit", "gap_before", "gap_after")


def bars(df: pd.DataFrame, split: str = "select") -> Figure | None:
    """Horizontal bars per target: mean |gap| before, after the CNA edit, after random."""
    d = df[df["split"] == split]
    if d.empty:
        return None
    g = d.assign(b=d["gap_before"].abs(), a=d["gap_after"].abs())
    cna = g[g["edit"] == "cna"].groupby(["group", "target"])[["b", "a"]].mean()
    rnd = g[g["edit"] == "random"].groupby(["group", "target"])["a"].mean()
    cna = cna.assign(r=rnd.reindex(cna.index)).reset_index()
    cna = cna.sort_values(["group", "b"], ascending=[True, True])
    n = len(cna)
    fig = plots.new_figure(width=7.5, height=min(16.0, 1.2 + 0.3 * n))
    ax = fig.subplots()
    y = np.arange(n)
    ax.barh(y + 0.27, cna["b"], 0.27, color=plots.PALETTE[6], label="before")
    ax.barh(y, cna["a"], 0.27, color=plots.PALETTE[0], label="CNA edit")
    if cna["r"].notna().any():
        ax.barh(y - 0.27, cna["r"], 0.27, color=plots.PALETTE[1], label="random (mean)")
    ax.set_yticks(y, [f"{t} ({g[0]})" for t, g in zip(cna["target"], cna["group"],
                                                         strict=True)], fontsize=9)
    ax.set_xlabel("mean |log p(target | a) - log p(target | b)|", fontsize=9)
    plots.style_axes(ax)
    ax.legend(fontsize=8, frameon=False, loc="best")
    return fig


def summary_table(meta: dict[str, Any]) -> str:
    rows = []
    for m in meta.get("metric", []):
        lo, hi = m.get("cna_change_lo"), m.get("cna_change_hi")
        ci = ("" if h.is_missing(lo) or h.is_missing(hi)
              else f"[{h.fmt_pct(lo)}, {h.fmt_pct(hi)}]")
        rows.append([m["split"], m["by"], m["key"], h.fmt_int(m["n"]), h.fmt_num(m["before"]),
                     h.fmt_num(m.get("cna")), h.fmt_pct(m.get("cna_change")), ci,
                     h.fmt_num(m.get("random_mean")), h.fmt_pct(m.get("random_change")),
                     m.get("verdict", "")])
    head = ["split", "by", "key", "pairs", "before", "CNA edit", "change", "95% interval",
            "random", "change", "verdict"]
    cap = ("Mean |gap| before and after zeroing the CNA neurons, beside the same number of "
           "random neurons (same count per layer; mean over seeds). Held-out templates were "
           "never seen by the selection.")
    return h.tag("div", h.table(head, rows, num_cols=range(3, 10), caption=cap), class_="scroll")


def cost_table(meta: dict[str, Any]) -> str:
    c = meta.get("costs") or {}
    if not c:
        return ""
    rows = [["original", h.fmt_pct(c["before"]["acc"]), h.fmt_num(c["before"]["ppl"])],
            ["CNA edit", h.fmt_pct(c["cna"]["acc"]), h.fmt_num(c["cna"]["ppl"])]]
    rows += [[f"random (seed {r['seed']})", h.fmt_pct(r["acc"]), h.fmt_num(r["ppl"])]
             for r in c.get("random", [])]
    n, tokens = c["before"].get("n"), c["before"].get("tokens")
    cap = (f"What the edit costs elsewhere: 1-digit arithmetic acc ({n} cases) and "
           f"perplexity on the shipped neutral text ({tokens} tokens).")
    return h.table(["model", "arithmetic acc (%)", "perplexity"], rows, num_cols=(1, 2),
                   caption=cap)


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    df = read_csv(dir, STAGE, required=REQUIRED, text=("target", "group", "template",
                                                        "split", "edit"))
    stage = read_meta(dir, STAGE)
    if df is None and not stage:
        return None
    parts = [h.what("Zero-editing the FFN neurons that CNA finds between paired prompts "
                    "(\"A woman works as a\" / \"A man works as a\") for the same target: "
                    "does the log-probability gap shrink more than with random neurons, "
                    "and at what cost?")]
    neurons = [n["name"] for n in stage.get("neurons", [])]
    sec = stage.get("seconds")
    bits = [f"{len(neurons)} neurons: {', '.join(neurons)}" if neurons else "",
            f"time: {h.fmt_seconds(sec)}" if sec is not None else "",
            f"edited model: {stage['model_dir']}" if stage.get("model_dir") else ""]
    parts.append(h.note(" · ".join(b for b in bits if b)))
    if df is not None and not df.empty:
        for c in ("gap_before", "gap_after"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
        fig = bars(df)
        if fig is not None:
            uri = plots.embed(fig, dir, "debias_bars")
            parts.append(h.figure(uri, "gap per target before and after",
                                  "Mean |gap| per target over the selection templates, "
                                  "before and after each edit."))
    if stage.get("metric"):
        parts.append(h.tag("h3", "Summary"))
        parts.append(summary_table(stage))
        parts.append(h.join(h.interp(x) for x in F.debias_findings(stage)))
    if len(stage.get("k_search") or []) > 1:
        rows = [[r["k"], h.fmt_num(r["select_metric"]), ", ".join(r["neurons"][:6]) + " ..."]
                for r in stage["k_search"]]
        parts.append(h.table(["top-K", "selection metric after", "neurons"], rows,
                             num_cols=(0, 1), caption=f"The K whose set gives the smallest "
                             f"gap on the selection pairs is edited (K = {stage.get('top_k')}); "
                             "held-out templates take no part."))
    if stage.get("costs"):
        parts.append(h.tag("h3", "Costs"))
        parts.append(cost_table(stage))
    return "".join(parts)


SECTION = Section(STAGE, "Bias editing (CNA neurons zeroed)", render)
