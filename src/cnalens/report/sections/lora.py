"""The ``lora`` section: what a LoRA on one attention layer changes (paper section 6a).

Reads ``DIR/lora.csv`` (accuracy per run, layer, op), ``DIR/lora_cna.csv`` (coefficient
change of the top-K CNA neurons per layer band vs random neurons) and ``DIR/lora.json``
(settings, timings, loss history). Answers: does LoRA amplify the coefficients of neurons
the original already uses, rather than learn new features?
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cnalens.report import findings as F
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, read_csv, read_meta

STAGE = "lora"


def _acc_table(acc: pd.DataFrame, layer: int) -> str:
    orig = acc[acc["run"] == "original"].set_index("op")
    lora = acc[(acc["run"] == "lora") & (acc["layer"] == layer)].set_index("op")
    ops = plots.ordered([o for o in orig.index if o != "all"], plots.OP_ORDER) + ["all"]
    rows = [[plots.op_label(o) if o != "all" else "all ops", h.fmt_int(orig.at[o, "n"]),
             h.fmt_acc(orig.at[o, "acc"], orig.at[o, "acc_lo"], orig.at[o, "acc_hi"]),
             h.fmt_acc(lora.at[o, "acc"], lora.at[o, "acc_lo"], lora.at[o, "acc_hi"])
             if o in lora.index else "—"] for o in ops if o in orig.index]
    return h.table(["op", "n", "original acc [95%]", f"LoRA layer {layer} acc [95%]"], rows,
                   num_cols=(1, 2, 3), caption="Test split (operand pairs disjoint from "
                   "training); acc = every answer token greedy top-1; Wilson intervals.")


def _by_layer(acc: pd.DataFrame):
    lora = acc[(acc["run"] == "lora") & (acc["op"] == "all")].sort_values("layer")
    if lora["layer"].nunique() < 2:
        return None
    orig = acc[(acc["run"] == "original") & (acc["op"] == "all")]
    fig = plots.new_figure(width=6.5, height=3.0)
    ax = fig.subplots()
    x = lora["layer"].to_numpy()
    ax.errorbar(x, lora["acc"] * 100, yerr=[(lora["acc"] - lora["acc_lo"]) * 100,
                                             (lora["acc_hi"] - lora["acc"]) * 100],
                marker="o", capsize=3, color="#1f77b4", label="LoRA on this layer")
    if len(orig):
        ax.axhline(float(orig["acc"].iloc[0]) * 100, color="#888888", linestyle="--",
                   label="original")
    ax.set_xlabel("LoRA layer", fontsize=9)
    ax.set_ylabel("test accuracy (%)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    plots.style_axes(ax)
    return fig


def _loss(history: dict):
    if not history or not history.get("loss"):
        return None
    fig = plots.new_figure(width=6.5, height=2.6)
    ax = fig.subplots()
    loss = pd.Series(history["loss"])
    ax.plot(history["step"], loss, color="#bbbbbb", linewidth=0.8, label="batch")
    ax.plot(history["step"], loss.rolling(10, min_periods=1).mean(), color="#d62728",
            label="mean of 10")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("answer-token loss", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    plots.style_axes(ax)
    return fig


def _cna_table(cna: pd.DataFrame) -> str:
    rows = []
    for r in cna.itertuples():
        sd = 0.0 if pd.isna(r.random_std) else r.random_std * 100
        rows.append([r.band, r.layers, "all" if r.k == 0 else int(r.k), h.fmt_int(r.n_neurons),
                     h.fmt_num(r.coef_b), h.fmt_num(r.coef_a), f"{r.change * 100:+.1f}%",
                     "—" if pd.isna(r.random_mean) else
                     f"{r.random_mean * 100:+.1f}% ± {sd:.1f}",
                     h.fmt_pct(r.up_frac, 0), h.fmt_num(r.pct_b, 0)])
    cap = ("Coefficient sums (Σ|m|) of each case's top-K neurons by CNA (importance gained "
           "under LoRA), in the original (B) and the LoRA model (A); change = A/B − 1; "
           "random = the same count of random neurons per case and layer (mean ± std over "
           "seeds); up = share of those neurons whose |m| grew; pct(B) = their mean "
           "percentile of |m| among their layer's neurons in the original (100 = most "
           "active). k = all: every neuron of the band.")
    return h.tag("div", h.table(["band", "layers", "top-K", "neurons", "Σ|m| orig",
                                 "Σ|m| LoRA", "change", "random", "up", "pct(B)"], rows,
                                num_cols=range(2, 10), caption=cap), class_="scroll")


def answer(cna: pd.DataFrame) -> str:
    """The section's one-paragraph answer, from the numbers."""
    top = cna[cna["k"] > 0]
    if top.empty:
        return "No CNA rows."
    k = int(top["k"].min())
    bits = []
    for r in top[top["k"] == k].itertuples():
        if r.band == "all" or r.n_neurons == 0:
            continue
        bits.append(f"{r.band} layers {r.layers}: {r.change * 100:+.1f}% "
                    f"(random {r.random_mean * 100:+.1f}%, {r.n_neurons} neurons, "
                    f"pct(B) {r.pct_b:.0f})")
    allr = top[(top["k"] == k) & (top["band"] == "all")].iloc[0]
    every = cna[(cna["k"] == 0) & (cna["band"] == "all")]
    whole = (f"; every neuron of those layers: {every['change'].iloc[0] * 100:+.1f}%"
             if len(every) else "")
    amplified = allr.change > 0 and (pd.isna(allr.random_mean)
                                     or allr.change > allr.random_mean)
    existing = allr.pct_b >= 75
    verdict = ("Yes: " if amplified and existing else "Partly: " if amplified else "No: ")
    return (f"{verdict}the top-{k} neurons' coefficient sum changes by "
            f"{allr.change * 100:+.1f}% under LoRA (random neurons of the same layers: "
            f"{allr.random_mean * 100:+.1f}%{whole}); they were already among the more active "
            f"neurons of the original (mean percentile {allr.pct_b:.0f}). By band: "
            + "; ".join(bits) + ". Paper (Llama-7B, layers 1-9): +42/49/57/59% for the "
            "top 50/30/20/10.")


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    acc = read_csv(dir, STAGE, required=("run", "layer", "op", "n", "acc"), text=("op",))
    stage = read_meta(dir, STAGE)
    if acc is None or not stage:
        return None
    layer = int(stage.get("layer", 0))
    s = stage.get("settings", {})
    t = stage.get("timings", {})
    parts = [h.what("A LoRA trained on one attention layer (2-digit arithmetic, all four "
                    "operations, negative differences included), then CNA between the LoRA "
                    "model (A) and the original (B): does LoRA amplify the coefficients of "
                    "existing neurons rather than learn new features?"),
             h.note(f"layer {layer}, targets {', '.join(stage.get('targets', []))}; rank "
                    f"{s.get('rank')}, alpha {s.get('alpha')}, lr {s.get('lr')}, "
                    f"{s.get('epochs')} epoch(s), batch {s.get('batch_size')}, "
                    f"{stage.get('n_train')} train / {stage.get('n_test')} test cases, "
                    f"{s.get('shots')} few-shot examples; training "
                    f"{h.fmt_seconds(t.get('train_seconds'))} on "
                    f"{t.get('threads')} thread(s); adapter: {stage.get('adapter')}")]
    parts.append(_acc_table(acc, layer))
    parts.append(h.join(h.interp(x) for x in F.lora_findings(acc, stage)))
    fig = _by_layer(acc)
    if fig is not None:
        parts.append(h.figure(plots.embed(fig, dir, "lora_by_layer"), "accuracy by layer",
                              "Test accuracy with a LoRA on each layer (one LoRA per layer; "
                              "bars: Wilson 95%); dashed: the original."))
    fig = _loss(stage.get("history", {}))
    if fig is not None:
        parts.append(h.figure(plots.embed(fig, dir, "lora_loss"), "training loss",
                              f"Training loss of the layer-{layer} LoRA."))
    cna = read_csv(dir, "lora_cna", required=("band", "k", "change"), text=("band", "layers"))
    if cna is not None and len(cna):
        parts.append(h.tag("h3", "Does LoRA amplify existing neurons?"))
        parts.append(h.interp(answer(cna)))
        c = stage.get("cna", {})
        parts.append(h.note(f"{c.get('n_cases')} test cases; ranking {c.get('ranking')}; "
                            f"{c.get('lens')}; bands: " + (f"deep from layer {stage['deep_from']}"
                                                   if stage.get("deep_from") is not None
                                                   else "depth quartiles")))
        parts.append(_cna_table(cna))
    return "".join(parts)


SECTION = Section(STAGE, "How LoRA works (CNA of a LoRA model)", render)
