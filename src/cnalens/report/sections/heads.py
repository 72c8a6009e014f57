"""The ``heads`` section: which attention heads the arithmetic depends on.

Reads ``DIR/heads.csv`` (one row per layer, head and group: op, digits on arithmetic, the
``--group-by`` labels otherwise; see ``cnalens.heads``) and ``DIR/heads.json`` (method,
metric, n_cases, seconds, top_k). Shows a layer x head heatmap of the accuracy drop per
group (operation) and the top heads per group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from cnalens.heads import group_columns, panel_columns, pooled, top_heads
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, case_file, read_csv, read_meta

STAGE = "heads"
REQUIRED = ("layer", "head", "n", "acc_orig", "acc_ablated", "drop", "dlogp")
NUMERIC = ("layer", "head", "digits", "n", "acc_orig", "acc_ablated", "drop", "drop_rel",
           "drop_lo", "drop_hi", "dlogp")
DEFAULT_TOP = 5


def heatmap(df: pd.DataFrame) -> Figure | None:
    """One panel per group (op): layers (rows) x heads (columns), colour = accuracy drop."""
    if df.empty:
        return None
    return plots.head_heatmaps(pooled(df), "drop", "accuracy drop (points)", scale=100,
                               by=panel_columns(df))


def per_group(df: pd.DataFrame) -> str:
    """How the table's groups read in text: "per operation", "per region", ..."""
    panel = panel_columns(df)
    if panel == ["op"] and set(df["op"].astype(str)) <= {"+", "-", "*", "/"}:
        text = "per operation"
    elif not panel or (panel == ["op"] and set(df["op"].astype(str)) == {"custom"}):
        text = "over all cases"
    else:
        text = "per " + " and ".join(panel)
    return text + (" (digits pooled)" if "digits" in group_columns(df) else "")


def top_table(df: pd.DataFrame, k: int) -> str:
    top = top_heads(df, k)
    panel = panel_columns(df)
    head = [*panel, "rank", "head", "n", "acc orig", "acc ablated", "drop", "rel. drop",
            "Δ log p"]
    rows = [[*[plots.group_value(c, r[c]) for c in panel], int(r["rank"]), r["name"],
             h.fmt_int(r["n"]), h.fmt_pct(r["acc_orig"]), h.fmt_pct(r["acc_ablated"]),
             h.fmt_pct(r["drop"]), h.fmt_pct(r["drop_rel"]), h.fmt_num(r["dlogp"])]
            for _, r in top.iterrows()]
    cap = (f"Heads ranked by accuracy drop when zeroed, {per_group(df)}; "
           "drop is in accuracy points, Δ log p the mean change of the answer's first "
           "token log-probability.")
    first = len(panel) + 2
    return h.tag("div", h.table(head, rows, num_cols=range(first, first + 6), caption=cap),
                 class_="scroll")


def _meta_line(meta: dict[str, Any]) -> str:
    bits = []
    if meta.get("method"):
        bits.append(f"method: {meta['method']} ablation at the output projection's input")
    if meta.get("metric"):
        bits.append(f"metric: {meta['metric']}")
    if meta.get("n_cases") is not None:
        bits.append(f"{h.fmt_int(meta['n_cases'])} cases")
    if meta.get("n_heads") is not None:
        bits.append(f"{h.fmt_int(meta['n_heads'])} heads")
    if meta.get("seconds") is not None:
        bits.append(f"time: {h.fmt_seconds(meta['seconds'])}")
    return h.note(" · ".join(bits)) if bits else ""


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    path = dir / f"{STAGE}.csv"
    if not path.is_file():
        return None
    groups = [c for c in group_columns(pd.read_csv(path, nrows=0)) if c != "digits"]
    df = read_csv(dir, STAGE, required=REQUIRED, text=tuple(groups))
    if df is None:
        return None
    for c in NUMERIC:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    stage = read_meta(dir, STAGE)
    source = case_file(dir, STAGE)
    which = (f"the heads the cases of {Path(source).name} depend on" if source
             else "the arithmetic heads")
    parts = [h.what("Accuracy drop when one attention head at a time is removed "
                    "(zeroed at the output projection's input): a few heads with large "
                    f"drops are {which}."), _meta_line(stage)]
    if df.empty:
        parts.append(h.note("heads.csv has no rows."))
        return "".join(parts)
    fig = heatmap(df)
    if fig is not None:
        uri = plots.embed(fig, dir, "heads_drop")
        parts.append(h.figure(uri, "accuracy drop per layer and head",
                              "Accuracy drop (points) when each head is zeroed, "
                              f"{per_group(df)}; red = the head helps, blue = it hurts."))
    rob_path = dir / "heads_robustness.csv"
    if rob_path.is_file():
        rob = pd.read_csv(rob_path, dtype={"op": str, "top_a": str, "top_b": str})
        rows = [[plots.op_label(r.op), r.a, r.b, h.fmt_num(r.spearman_drop),
                 h.fmt_num(r.spearman_dlogp), r.top_a, r.top_b] for r in rob.itertuples()]
        parts.append(h.tag("h3", "Robustness across prompt formats"))
        parts.append(h.table(["op", "variant A", "variant B", "Spearman (drop)",
                              "Spearman (Δ log p)", "top head A", "top head B"], rows,
                             num_cols=(3, 4), caption="Whether the head ranking is a "
                             "property of the model or of one prompt format."))
    parts.append(h.tag("h3", "Top heads"))
    parts.append(top_table(df, int(stage.get("top_k") or DEFAULT_TOP)))
    return "".join(parts)


SECTION = Section(STAGE, "Attention heads (head scan)", render)
