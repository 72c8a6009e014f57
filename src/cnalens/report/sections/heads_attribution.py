"""The ``heads_attribution`` section: the first-order pre-scan of the heads.

Reads ``DIR/heads_attribution.csv`` (layer, head, the groups: op, digits, n, dlogp_est) and
``DIR/heads_attribution.json`` (top heads; Spearman against the exact scan when one was in
the folder). Shows a layer x head heatmap of the estimate, the agreement table and the top
heads per group (operation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, read_csv, read_meta
from cnalens.tables import group_columns, panel_columns, pooled

STAGE = "heads_attribution"
REQUIRED = ("layer", "head", "n", "dlogp_est")
TOP = 5


def heatmap(df: pd.DataFrame) -> Figure:
    """One panel per group (op): layers x heads, colour = estimated log p lost (digits
    pooled)."""
    return plots.head_heatmaps(pooled(df, "dlogp_est"), "dlogp_est", "est. log p lost",
                               scale=-1, floor=1e-6, by=panel_columns(df))


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    path = dir / f"{STAGE}.csv"
    if not path.is_file():
        return None
    groups = [c for c in group_columns(pd.read_csv(path, nrows=0)) if c != "digits"]
    df = read_csv(dir, STAGE, required=REQUIRED, text=tuple(groups))
    if df is None or df.empty:
        return None
    stage = read_meta(dir, STAGE)
    parts = [h.what("A first-order estimate of each head's zeroing effect on the answer's "
                    "log-probability from one forward and one backward pass per batch "
                    "(attribution patching): a cheap screen for large models; confirm its "
                    "top heads with the exact scan."),
             h.note(f"{h.fmt_int(stage.get('n_cases'))} cases · time: "
                    f"{h.fmt_seconds(stage.get('seconds'))}")]
    uri = plots.embed(heatmap(df), dir, "heads_attribution")
    parts.append(h.figure(uri, "estimated effect per layer and head",
                          "Estimated log-probability of the answer lost when each head is "
                          "zeroed; red = the head helps."))
    panel = panel_columns(df)
    agree = stage.get("vs_exact") or []
    if agree:
        rows = [[*[plots.group_value(c, a.get(c)) for c in panel], h.fmt_int(a["n_heads"]),
                 h.fmt_num(a["spearman_dlogp"]), h.fmt_num(a["spearman_drop"])]
                for a in agree]
        first = len(panel)
        parts.append(h.tag("h3", "Agreement with the exact scan"))
        parts.append(h.table([*panel, "heads", "Spearman (Δ log p)",
                              "Spearman (accuracy drop)"],
                             rows, num_cols=range(first, first + 3), caption="Rank "
                             "correlation of the estimate with the exact zero-ablation scan "
                             "in this folder."))
        rho = [a["spearman_dlogp"] for a in agree if not h.is_missing(a.get("spearman_dlogp"))]
        if rho:
            lo, hi = min(rho), max(rho)
            verdict = ("orders the heads much as the exact scan does" if lo >= 0.7 else
                       "roughly follows the exact scan: use it to shortlist heads, not to "
                       "rank them" if lo >= 0.4 else
                       "is a poor guide to the exact scan here: confirm every head with it")
            parts.append(h.interp(f"Spearman {lo:.2f}–{hi:.2f} over the groups: the estimate "
                                  f"{verdict}."))
    else:
        parts.append(h.interp("No exact scan in this folder to check the estimate against: "
                              "treat its ranking as a screen until `cnalens heads` confirms "
                              "the top heads."))
    top = [t for t in stage.get("top") or [] if t["rank"] <= TOP]
    if top:
        rows = [[*[plots.group_value(c, t.get(c)) for c in panel], t["rank"], t["name"],
                 h.fmt_num(t["dlogp_est"])] for t in top]
        first = len(panel)
        parts.append(h.tag("h3", "Top heads by the estimate"))
        parts.append(h.table([*panel, "rank", "head", "estimated Δ log p"], rows,
                             num_cols=(first, first + 2)))
    return "".join(parts)


SECTION = Section(STAGE, "Attention heads: attribution pre-scan", render)
