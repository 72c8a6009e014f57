"""The ``cna`` section: the FFN neurons whose importance the head (arithmetic's) drives.

Reads ``DIR/cna_neurons.csv`` (each case's top-K by imp_a - imp_b: case, rank, layer,
neuron, imp_a, imp_b, coef_a, coef_b, the group columns (op; cna.json ``group_by``), head,
prompt, target) and ``DIR/cna.json``. Shows the neurons most often in a case's top-K per
group (operation) and where they sit by layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cnalens.report import findings as F
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, case_file, read_csv, read_meta
from cnalens.tables import frequency

STAGE = "cna"
REQUIRED = ("case", "rank", "layer", "neuron", "imp_a", "imp_b", "coef_a", "coef_b", "head")
SHOW = 12


def layer_chart(df: pd.DataFrame, k: int, by: list[str] | tuple[str, ...] = ("op",)):
    groups = plots.groups_of(df[df["rank"] <= k], by)
    fig = plots.new_figure(width=8.0, height=2.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(groups))
    for i, (group, top) in enumerate(groups):
        counts = top["layer"].value_counts().sort_index()
        share = counts / counts.sum() * 100
        ax.bar(share.index + i * width, share.values, width=width,
               label=plots.group_label(group))
    layers = df.loc[df["rank"] <= k, "layer"]
    if len(layers):
        ax.set_xticks(range(int(layers.min()), int(layers.max()) + 1))
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel(f"% of top-{k} neurons", fontsize=9)
    fig.legend(loc="outside upper center", ncols=max(1, len(groups)), fontsize=9,
               frameon=False)
    plots.style_axes(ax)
    return fig


def _shared_line(freq: pd.DataFrame, n: int, k: int) -> str:
    """Whether the cases share their top-K neurons."""
    if freq.empty or n == 0:
        return ""
    r = freq.iloc[0]
    shared = int((freq["freq"] >= 0.5).sum())
    return (f"The most shared neuron, {int(r.layer)}.{int(r.neuron)}, is in {int(r['count'])} "
            f"of {n} cases' top-{k}; {shared} neuron{'s are' if shared != 1 else ' is'} in at "
            "least half of them: "
            + ("the cases share a common set of neurons." if shared >= min(5, k)
               else "each case leans on mostly its own neurons."))


def _layer_line(df: pd.DataFrame, k: int, by: list[str] | tuple[str, ...]) -> str:
    """Which layers hold most of the top-K neurons, per group."""
    bits = []
    for group, sub in plots.groups_of(df[df["rank"] <= k], by):
        share = sub["layer"].value_counts(normalize=True)
        top = share.sort_values(ascending=False).head(3)
        bits.append(f"{plots.group_label(group)}: layers "
                    + ", ".join(f"{int(la)} ({h.fmt_pct(v, 0)})" for la, v in top.items()))
    return "Most top-K neurons sit in " + "; ".join(bits) + "."


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    stage = read_meta(dir, STAGE)
    by = [str(c) for c in stage.get("group_by") or ["op"]]
    df = read_csv(dir, STAGE + "_neurons", required=(*REQUIRED, *by),
                  text=(*by, "head", "case"))
    if df is None:
        return None
    k = int(max(stage.get("ks") or [int(df["rank"].max())]))
    source = case_file(dir, STAGE)
    data = f" of {Path(source).name}" if source else ""
    parts = [h.what(
        "Comparative Neuron Analysis: every FFN neuron's importance (log-probability "
        "increase of run A's prediction) in the original model (A) minus its importance "
        f"with {'the head' if source else 'the arithmetic head'} zeroed (B), ranked per "
        f"case{data}. Neurons are named L.N: layer L, neuron N of that layer's FFN, both "
        "0-based.")]
    for group, sub in plots.groups_of(df, by):
        op = "|".join(group.values())
        head = sub["head"].iloc[0]
        n = sub["case"].nunique()
        freq = frequency(sub, k).head(SHOW)
        rows = [[f"{int(r.layer)}.{int(r.neuron)}", h.fmt_int(r.count), h.fmt_pct(r.freq),
                 h.fmt_num(r.imp_a, 3), h.fmt_num(r.imp_b, 3), h.fmt_num(r.coef_a, 3),
                 h.fmt_num(r.coef_b, 3)] for r in freq.itertuples()]
        parts.append(h.tag("h3", f"{plots.group_label(group)}: head {head}, {n} cases"))
        g = (stage.get("per_op") or {}).get(op)
        if g:
            parts.append(h.join(h.interp(x) for x in F.cna_findings({"per_op": {op: g}})))
        parts.append(h.tag("div", h.table(
            ["neuron (L.N)", f"in top-{k}", "of cases", "imp A", "imp B", "coef A", "coef B"],
            rows, num_cols=range(1, 7), caption=f"Neurons most often in a case's top-{k} "
            "(mean scores over those cases)."), class_="scroll"))
        parts.append(h.interp(_shared_line(frequency(sub, k), n, k)))
    uri = plots.embed(layer_chart(df, k, by), dir, "cna_layers")
    parts.append(h.figure(uri, "layers of the CNA neurons",
                          f"Where each case's top-{k} CNA neurons sit, by layer."))
    parts.append(h.interp(_layer_line(df, k, by)))
    return "".join(parts)


SECTION = Section(STAGE, "Comparative Neuron Analysis (CNA)", render)
