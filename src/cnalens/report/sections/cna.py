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

from cnalens.cna import frequency
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, case_file, read_csv, read_meta

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
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel(f"% of top-{k} neurons", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    plots.style_axes(ax)
    return fig


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
        f"case{data}.")]
    for group, sub in plots.groups_of(df, by):
        op = "|".join(group.values())
        head = sub["head"].iloc[0]
        n = sub["case"].nunique()
        freq = frequency(sub, k).head(SHOW)
        rows = [[f"{int(r.layer)}.{int(r.neuron)}", h.fmt_int(r.count), h.fmt_pct(r.freq),
                 h.fmt_num(r.imp_a, 3), h.fmt_num(r.imp_b, 3), h.fmt_num(r.coef_a, 3),
                 h.fmt_num(r.coef_b, 3)] for r in freq.itertuples()]
        parts.append(h.tag("h3", f"{plots.group_label(group)}: head {head}, {n} cases"))
        faith = (stage.get("per_op", {}).get(op) or {}).get("faithfulness")
        if faith:
            parts.append(h.note(
                f"Lens faithfulness: over each case's top-10 neurons of run A "
                f"({faith['n']} neuron-cases), the lens importance and the real log-prob "
                f"drop when the neuron alone is zeroed correlate with Spearman "
                f"{faith['spearman']:.2f}, Pearson {faith['pearson']:.2f}."))
        parts.append(h.tag("div", h.table(
            ["neuron", f"in top-{k}", "of cases", "imp A", "imp B", "coef A", "coef B"], rows,
            num_cols=range(1, 7), caption=f"Neurons most often in a case's top-{k} (mean "
            "scores over those cases)."), class_="scroll"))
    uri = plots.embed(layer_chart(df, k, by), dir, "cna_layers")
    parts.append(h.figure(uri, "layers of the CNA neurons",
                          f"Where each case's top-{k} CNA neurons sit, by layer."))
    return "".join(parts)


SECTION = Section(STAGE, "Comparative Neuron Analysis (CNA)", render)
