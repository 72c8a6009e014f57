"""The ``verification`` section: do the CNA neurons carry the head's effect?

Reads ``DIR/verification.csv`` (model, head, the group columns: op, experiment, k, value,
random_mean, random_std, n; newer files also lo, hi, positions, base_accuracy, verdict; see
``cnalens.cna.verify`` and ``cnalens.cna.mediation``) and ``DIR/verification.json``. One
table per group (operation) laid out like the paper's (experiments x K, each cell ``value``
with its interval beside the random baseline and the verdict; the paper's numbers beside
arithmetic) and a plot of value against K with the random baseline dashed.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pandas as pd

from cnalens.report import findings as F
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, case_file, read_csv, read_meta
from cnalens.stats import VERDICT_RULE

STAGE = "verification"
REQUIRED = ("head", "experiment", "k", "value", "random_mean", "random_std", "n")
EXPERIMENTS = {
    "zero_topk": "accuracy drop, top-K zeroed",
    "keep_topk": "accuracy drop, all OTHER deep neurons zeroed",
    "coef_drop_head": "coefficient-sum drop of the top-K, head zeroed",
    "coef_drop_lowest": "others' coefficient-sum drop, lowest top-K neuron zeroed",
    "heldout_zero_topk": "held-out accuracy drop, the K most frequent neurons zeroed",
    "mediation_restore_acc": "mediation: share of the head's accuracy effect restored "
                             "(head zeroed, top-K set to their run-A values)",
    "mediation_restore_logp": "mediation: share of the head's log-prob effect restored",
    "mediation_reproduce_acc": "mediation: share of the head's accuracy effect reproduced "
                               "(top-K set to their head-zeroed values)",
    "mediation_reproduce_logp": "mediation: share of the head's log-prob effect reproduced",
}
WHERE = {"all": "", "last": " [scored positions only]"}
PAPER = {  # Llama-7B, 1D +/-, head 17_22, K = 99, 50, 30, 20, 10 (method.md)
    "zero_topk": {100: 100, 50: 96.0, 30: 89.5, 20: 86.8, 10: 68.4},
    "keep_topk": {100: 3.9, 50: 7.8, 30: 13.2, 20: 18.4, 10: 38.2},
    "coef_drop_head": {100: 49.1, 50: 60.4, 30: 67.2, 20: 72.7, 10: 77.1},
    "coef_drop_lowest": {100: 15.8, 50: 14.8, 30: 12.5, 20: 9.5, 10: 4.4},
}


def _cell(r, exp: str) -> h.Html:
    """The value with its 95% interval over the random baseline, and the verdict."""
    lo, hi = getattr(r, "lo", float("nan")), getattr(r, "hi", float("nan"))
    if exp in F.ACC_DROPS and pd.isna(lo):
        value = F.fmt_drop(r.value, r.n)
    elif pd.isna(lo):
        value = h.fmt_pct(r.value)
    else:
        value = h.fmt_acc(r.value, lo, hi)
    rand = "" if pd.isna(r.random_mean) else h.tag(
        "span", f"random {h.fmt_pct(r.random_mean)} ± {h.fmt_pct(r.random_std)}",
        class_="rand")
    verdict = getattr(r, "verdict", None)
    tail = h.tag("span", str(verdict), class_="rand") if isinstance(verdict, str) else ""
    return h.Html("<br>".join(x for x in (h.esc(value), rand, tail) if x))


def op_table(df: pd.DataFrame, paper: bool = True) -> str:
    """Experiments x K; ``paper``: a column with the paper's arithmetic numbers."""
    ks = sorted(df["k"].unique())
    head = ["experiment", *[f"K={k}" for k in ks], *(["paper (Llama-7B)"] if paper else [])]
    rows = []
    where = df["positions"] if "positions" in df.columns else pd.Series("all", df.index)
    for exp, label in EXPERIMENTS.items():
        for pos, suffix in WHERE.items():
            sub = df[(df["experiment"] == exp) & (where.fillna("all") == pos)]
            sub = sub.drop_duplicates("k").set_index("k")
            if sub.empty:
                continue
            if exp.startswith("mediation"):
                suffix = ""  # mediation acts at the scored positions by definition
            ref = PAPER.get(exp, {}) if pos == "all" else {}
            rows.append([(label + suffix, {"class_": "exp"}),
                         *[_cell(next(sub.loc[[k]].itertuples()), exp) if k in sub.index
                           else "—" for k in ks],
                         *([", ".join(f"{k}: {v}" for k, v in sorted(ref.items()) if k in ks)
                            or "—"] if paper else [])])
    cap = ("Accuracy drops with their Wilson 95% interval (all cases were answered correctly "
           "before, so a drop is the share of them lost), coefficient drops and mediation "
           "shares with a bootstrap 95% interval over cases; random: mean ± std over seeds; "
           "then the verdict. " + VERDICT_RULE.replace("*", ""))
    return h.tag("div", h.table(head, rows, num_cols=range(1, len(ks) + 1), caption=cap),
                 class_="scroll")


YLABELS = {"coef_drop_head": "Σ|m| drop (%)", "coef_drop_lowest": "others' Σ|m| drop (%)",
           **{e: "share of the effect (%)" for e in EXPERIMENTS if e.startswith("mediation")}}


def chart(df: pd.DataFrame, by: list[str] | tuple[str, ...] = ("op",)):
    """One panel per experiment run, two per row, each with its own y label; the legend
    in a panel of its own (never over a line)."""
    if "positions" in df.columns:  # plot every-position runs; mediation is at scored ones
        df = df[(df["positions"].fillna("all") == "all")
                | df["experiment"].str.startswith("mediation")]
    groups = plots.groups_of(df, by)
    exps = [(e, lab) for e, lab in EXPERIMENTS.items() if (df["experiment"] == e).any()]
    cols = 2
    rows = (len(exps) + 1 + cols - 1) // cols  # + 1: the legend's panel
    fig = plots.new_figure(width=8.6, height=0.6 + 2.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    handles: dict[str, Any] = {}
    for ax, (exp, label) in zip(axes, exps, strict=False):
        for i, (group, rws) in enumerate(groups):
            sub = rws[rws["experiment"] == exp].sort_values("k")
            if sub.empty:
                continue
            name = plots.group_label(group)
            color = plots.PALETTE[i % len(plots.PALETTE)]
            line = ax.plot(sub["k"], sub["value"] * 100, marker="o", color=color)[0]
            dash = ax.plot(sub["k"], sub["random_mean"] * 100, ls="--", marker="x",
                           color=color, alpha=0.75)[0]
            handles.setdefault(f"{name}: CNA top-K", line)
            handles.setdefault(f"{name}: random neurons", dash)
        ax.set_title(textwrap.fill(label, 46), fontsize=10)
        ax.set_xlabel("K (neurons per case)", fontsize=9)
        ax.set_ylabel(YLABELS.get(exp, "accuracy drop (%)"), fontsize=9)
        if exp in F.ACC_DROPS:
            ax.set_ylim(-4, 104)
        ax.set_xticks(sorted(df.loc[df["experiment"] == exp, "k"].unique()))
        ax.tick_params(labelsize=9)
        plots.style_axes(ax)
    for ax in axes[len(exps):]:
        ax.axis("off")
    if handles:
        axes[len(exps)].legend(handles.values(), handles.keys(), loc="center", fontsize=9,
                               frameon=False, title="solid: CNA · dashed: random",
                               title_fontsize=9)
    return fig


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    stage = read_meta(dir, STAGE)
    by = [str(c) for c in stage.get("group_by") or ["op"]]
    df = read_csv(dir, STAGE, required=(*REQUIRED, *by), text=(*by, "head", "experiment"))
    if df is None:
        return None
    for c in ("k", "value", "random_mean", "random_std", "n", "lo", "hi"):
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    source = case_file(dir, STAGE)
    held = (" Held-out: one set per K, the neurons most often in the CNA cases' top-K, "
            "zeroed on disjoint held-out operand pairs."
            if (df["experiment"] == "heldout_zero_topk").any() else "")
    parts = [h.what(
        "For each case, its top-K FFN neurons by CNA (importance lost when the "
        f"{'head' if source else 'arithmetic head'} is zeroed) are ablated, kept alone, or "
        "compared; random neurons with the same per-layer counts are the baseline. Cases: "
        f"those {f'of {Path(source).name} ' if source else ''}the model answers correctly."
        + held)]
    bits = [f"ranking: {stage.get('ranking', 'decrease')}", f"lens: {stage.get('lens')}",
            f"seeds: {stage.get('seeds')}"]
    if stage.get("seconds") is not None:
        bits.append(f"time: {h.fmt_seconds(stage['seconds'])}")
    parts.append(h.note(" · ".join(str(b) for b in bits)))
    if df.empty:
        return "".join(parts + [h.note("verification.csv has no rows.")])
    for group, rows in plots.groups_of(df, by):
        for head, sub in rows.groupby("head", sort=False):
            held = sub["experiment"] == "heldout_zero_topk"  # its own n
            n = int(sub.loc[~held, "n"].max()) if (~held).any() else 0
            n_held = f", held-out n = {int(sub.loc[held, 'n'].max())}" if held.any() else ""
            parts.append(h.tag("h3", f"{plots.group_label(group)}: head {head} zeroed, "
                                     f"n = {n}{n_held}"))
            parts.append(op_table(sub, paper=source is None))
            lines = F.verification_findings(sub, by)
            lines += [x for x in (F.keep_meaning(sub), F.coef_meaning(sub),
                                  F.verdict_line(sub)) if x]
            parts.append(h.join(h.interp(x) for x in lines))
    uri = plots.embed(chart(df, by), dir, "verification")
    parts.append(h.figure(uri, "verification by K", "Solid: the CNA top-K neurons; dashed: "
                          "random neurons from the same layers."))
    parts.append(h.interp("A CNA line far above its dashed random line means the neurons CNA "
                          "picks matter more than random neurons of the same layers; the "
                          "paper's Llama-7B values are in the tables' last column."
                          if source is None else "A CNA line far above its dashed random "
                          "line means the neurons CNA picks matter more than random neurons "
                          "of the same layers."))
    return "".join(parts)


SECTION = Section(STAGE, "Verification of the CNA neurons", render)
