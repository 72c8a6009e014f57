"""The ``prune`` section: CNA-guided pruning of deep FFN neurons against random pruning.

Reads ``DIR/prune.csv`` (one row per variant and seed: variant, seed, n, correct, acc,
acc_lo, acc_hi, deep_pruned; see ``cnalens.apps.prune``) and ``DIR/prune.json`` (selection,
sizes, speed). Shows the paper-style table, a bar chart, and the pruned model's size and
speed.
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

STAGE = "prune"
REQUIRED = ("variant", "n", "correct", "acc", "deep_pruned")
PAPER = {"original": 0.629, "lora": 0.893, "cna_pruned_lora": 0.823,
         "random_pruned_lora": 0.171}


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    from cnalens.tables import prune_summary as summary

    return summary(df)


def chart(summ: pd.DataFrame) -> Figure | None:
    if summ.empty:
        return None
    fig = plots.new_figure(width=7.0, height=3.0)
    ax = fig.subplots()
    x = np.arange(len(summ))
    acc = summ["acc"].to_numpy() * 100
    first = summ["acc_first"].to_numpy() * 100
    err = np.nan_to_num(summ["acc_sd"].to_numpy() * 100)
    colors = ["#888888" if v in ("original", "lora") else "#1f77b4" if v.startswith("cna")
              else "#d62728" for v in summ["variant"]]
    ax.bar(x - 0.2, acc, 0.4, yerr=err, color=colors, capsize=3, label="acc")
    ax.bar(x + 0.2, first, 0.4, color=colors, alpha=0.45, hatch="//", label="acc_first")
    ax.legend(fontsize=8, frameon=False)
    ax.set_xticks(x, summ["label"], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy on the test split (%)", fontsize=9)
    ax.set_ylim(0, 100)
    plots.style_axes(ax)
    return fig


def _sizes(meta: dict[str, Any]) -> str:
    s = meta.get("sizes") or {}
    if not s:
        return ""
    sp = s.get("speed") or {}
    mib = 2 ** 20
    rows = [
        ("deep FFN neurons pruned", f"{h.fmt_pct(meta.get('pruned_fraction'))} of "
         f"{h.fmt_int(meta.get('deep_neurons'))} (layers {meta['deep_layers'][0]}-"
         f"{meta['deep_layers'][1]}, union of each case's top-{meta.get('n_top')})"),
        ("FFN parameters removed", f"{h.fmt_int(s.get('ffn_params_removed'))} of "
         f"{h.fmt_int(s.get('ffn_params_before'))} (all layers' FFN)"),
        ("all parameters", f"{h.fmt_int(s.get('params_before'))} → "
         f"{h.fmt_int(s.get('params_after'))}"),
        ("weights file", f"{s['weights_bytes_before'] / mib:,.0f} MiB → "
         f"{s['weights_bytes_after'] / mib:,.0f} MiB (−{h.fmt_pct(s.get('file_reduction'))})"),
        ("forward pass", f"{h.fmt_num(sp.get('original_s'), 3)} s → "
         f"{h.fmt_num(sp.get('pruned_s'), 3)} s ({h.fmt_num(sp.get('speedup'))}× faster; "
         f"{sp.get('prompts')} prompts, median of {sp.get('repeats')}, "
         f"{sp.get('threads')} thread(s))"),
        ("reload check", f"max |logit difference| {s.get('reload_max_abs_diff', 0):.1e} "
         f"(saved model in {s.get('model_dir')})"),
    ]
    return h.kv_table(rows)


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    df = read_csv(dir, STAGE, required=REQUIRED, text=("variant",))
    if df is None:
        return None
    stage = read_meta(dir, STAGE)
    sel = stage.get("selection") or {}
    parts = [h.what(
        "CNA between a LoRA model (A) and the original (B) on 1-digit cases picks, per case, "
        "the deep FFN neurons whose importance the LoRA raised most; the union of every "
        "case's top-N is kept and every other deep FFN neuron is removed for real (smaller "
        "matrices). A fresh LoRA is then trained on the pruned model, beside the same with "
        "random neurons kept in the same numbers per layer. Paper (Llama-7B, 95% of the "
        "deep neurons pruned): original 62.9, LoRA 89.3, CNA-pruned + LoRA 82.3, "
        "random-pruned + LoRA 17.1."),
        h.note(f"selection: {sel.get('cases')} cases ({sel.get('pairs_per_op') or 'all'} "
               f"pairs per op); test split n = {stage.get('n_test')}; train n = "
               f"{stage.get('n_train')}; seeds {stage.get('seeds')}; time "
               f"{h.fmt_seconds(stage.get('seconds'))}")]
    summ = _summary(df)
    rows = [[r.label, h.fmt_int(r.runs), h.fmt_int(r.n),
             h.fmt_acc(r.acc, r.acc_lo, r.acc_hi),
             "" if np.isnan(r.acc_sd) else h.fmt_pct(r.acc_sd), h.fmt_pct(r.acc_first),
             h.fmt_num(r.logp), h.fmt_pct(r.deep_pruned), h.fmt_pct(PAPER.get(r.variant))]
            for r in summ.itertuples()]
    parts.append(h.table(["model", "runs", "n", "acc [Wilson 95%]", "sd over seeds",
                          "acc_first", "logp", "deep neurons pruned", "paper (Llama-7B)"],
                         rows, num_cols=range(1, 9),
                         caption="Accuracy on the LoRA test split (random rows: mean over "
                         "seeds, interval of the pooled cases)."))
    parts.append(h.join(h.interp(x) for x in F.prune_findings(summ)))
    fig = chart(summ)
    if fig is not None:
        parts.append(h.figure(plots.embed(fig, dir, "prune_accuracy"), "pruning accuracy",
                              "grey: unpruned; blue: CNA-pruned; red: random-pruned; "
                              "solid: acc (error bar: sd over seeds), hatched: acc_first."))
    parts.append(h.tag("h3", "The pruned model"))
    parts.append(_sizes(stage))
    return "".join(parts)


SECTION = Section(STAGE, "CNA-guided pruning", render)
