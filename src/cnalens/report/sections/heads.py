"""The ``heads`` section: which attention heads the arithmetic depends on.

Reads ``DIR/heads.csv`` (one row per layer, head, op, digits; see ``cnalens.heads``) and
``DIR/heads.json`` (method, metric, n_cases, seconds, top_k). Shows a layer x head heatmap
of the accuracy drop per operation and the top heads per operation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from cnalens.heads import pooled, top_heads
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, read_csv, read_meta

STAGE = "heads"
REQUIRED = ("layer", "head", "op", "digits", "n", "acc_orig", "acc_ablated", "drop", "dlogp")
NUMERIC = ("layer", "head", "digits", "n", "acc_orig", "acc_ablated", "drop", "drop_rel",
           "drop_lo", "drop_hi", "dlogp")
DEFAULT_TOP = 5


def heatmap(df: pd.DataFrame) -> Figure | None:
    """One panel per op: layers (rows) x heads (columns), colour = accuracy drop (%)."""
    if df.empty:
        return None
    return plots.head_heatmaps(pooled(df), "drop", "accuracy drop (points)", scale=100)


def top_table(df: pd.DataFrame, k: int) -> str:
    top = top_heads(df, k)
    head = ["op", "rank", "head", "n", "acc orig", "acc ablated", "drop", "rel. drop",
            "Δ log p"]
    rows = [[plots.op_label(r.op) if r.op != "all" else "all ops", int(r.rank), r.name,
             h.fmt_int(r.n), h.fmt_pct(r.acc_orig), h.fmt_pct(r.acc_ablated),
             h.fmt_pct(r.drop), h.fmt_pct(r.drop_rel), h.fmt_num(r.dlogp)]
            for r in top.itertuples()]
    cap = ("Heads ranked by accuracy drop when zeroed, per operation (digits pooled); "
           "drop is in accuracy points, Δ log p the mean change of the answer's first "
           "token log-probability.")
    return h.tag("div", h.table(head, rows, num_cols=range(3, 9), caption=cap),
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
    df = read_csv(dir, STAGE, required=REQUIRED, text=("op",))
    if df is None:
        return None
    for c in NUMERIC:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    stage = read_meta(dir, STAGE)
    parts = [h.what("Accuracy drop when one attention head at a time is removed "
                    "(zeroed at the output projection's input): a few heads with large "
                    "drops are the arithmetic heads."), _meta_line(stage)]
    if df.empty:
        parts.append(h.note("heads.csv has no rows."))
        return "".join(parts)
    fig = heatmap(df)
    if fig is not None:
        uri = plots.embed(fig, dir, "heads_drop")
        parts.append(h.figure(uri, "accuracy drop per layer and head",
                              "Accuracy drop (points) when each head is zeroed, per "
                              "operation; red = the head helps, blue = it hurts."))
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
