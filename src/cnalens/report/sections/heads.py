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

from cnalens.report import findings as F
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, case_file, read_csv, read_meta
from cnalens.tables import group_columns, panel_columns, pooled

STAGE = "heads"
REQUIRED = ("layer", "head", "n", "acc_orig", "acc_ablated", "drop", "dlogp")
NUMERIC = ("layer", "head", "digits", "n", "acc_orig", "acc_ablated", "drop", "drop_rel",
           "drop_lo", "drop_hi", "dlogp")
DEFAULT_TOP = 10


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


VISIBLE = 10  # rows of the top-heads table shown; the rest behind a toggle


def _drop_cell(r) -> str:
    if h.is_missing(r["drop_lo"]):
        return h.fmt_pct(r["drop"])
    approx = "" if r["ci_exact"] else "≈"
    return f"{h.fmt_pct(r['drop'])} {approx}[{100 * r['drop_lo']:.1f}, {100 * r['drop_hi']:.1f}]"


def top_table(df: pd.DataFrame, k: int) -> str:
    """The top ``k`` heads per group with the drop's 95% interval: the best few of each
    group (:data:`VISIBLE` rows in all) shown, every row behind a toggle."""
    top = F.top_heads_ci(df, k)
    panel = panel_columns(df)
    head = [*panel, "rank", "head (L.H)", "n", "acc orig", "acc zeroed",
            "drop [95% CI]", "rel. drop", "Δ log p"]
    rows = [[*[plots.group_value(c, r[c]) for c in panel], int(r["rank"]), r["name"],
             h.fmt_int(r["n"]), h.fmt_pct(r["acc_orig"]), h.fmt_pct(r["acc_ablated"]),
             _drop_cell(r), h.fmt_pct(r["drop_rel"]), h.fmt_num(r["dlogp"])]
            for _, r in top.iterrows()]
    n_groups = len(top[panel].drop_duplicates()) if panel else 1
    per = max(1, VISIBLE // n_groups)
    shown = [row for row, rank in zip(rows, top["rank"], strict=True) if rank <= per]
    cap = (f"Heads ranked by accuracy drop when zeroed, {per_group(df)}: drops in accuracy "
           "points (78% → 14% is a drop of 64%) with a paired bootstrap 95% interval over "
           "cases (≈: digits pooled, the per-digits intervals combined); Δ log p: mean change "
           "of the answer's first token log-probability.")
    first = len(panel) + 2
    table = h.tag("div", h.table(head, shown, num_cols=range(first, first + 6), caption=cap),
                  class_="scroll")
    if len(shown) < len(rows):
        table += h.details(f"All {len(rows)} rows (top {k} per group)", h.tag(
            "div", h.table(head, rows, num_cols=range(first, first + 6)), class_="scroll"))
    return table


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


def _heatmap_line(df: pd.DataFrame) -> str:
    """How concentrated the effect is: the share of heads whose zeroing costs over 10
    points, and whether the top heads' layers agree across groups."""
    g = pooled(df)
    panel = panel_columns(df)
    worst = g.groupby(["layer", "head"])["drop"].max()
    big = int((worst > 0.10).sum())
    top = g.loc[g.groupby(panel, sort=False)["drop"].idxmax()] if panel else g.nlargest(1, "drop")
    layers = sorted({int(x) for x in top["layer"]})
    few = big <= 0.1 * len(worst)
    text = (f"{big} of {len(worst)} heads ({h.fmt_pct(big / len(worst), 0)}) cost over 10 "
            f"accuracy points{' for some group' if panel else ''} when zeroed: "
            f"{'the effect sits in a few heads' if few else 'many heads matter'}.")
    if len(top) > 1:
        text += (f" Every group's top head is in layer {layers[0]}." if len(layers) == 1
                 else f" The groups' top heads sit in layers {', '.join(map(str, layers))}.")
    return text


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
                    f"drops are {which}. Heads are named L.H: layer L, head H, both "
                    "0-based (7.0 = layer 7, head 0)."), _meta_line(stage)]
    if df.empty:
        parts.append(h.note("heads.csv has no rows."))
        return "".join(parts)
    fig = heatmap(df)
    if fig is not None:
        uri = plots.embed(fig, dir, "heads_drop")
        parts.append(h.figure(uri, "accuracy drop per layer and head",
                              "Accuracy drop (points) when each head is zeroed, "
                              f"{per_group(df)}; red = the head helps, blue = it hurts."))
        parts.append(h.interp(_heatmap_line(df)))
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
    parts.append(h.join(h.interp(x) for x in F.heads_findings(df)))
    return "".join(parts)


SECTION = Section(STAGE, "Attention heads (head scan)", render)
