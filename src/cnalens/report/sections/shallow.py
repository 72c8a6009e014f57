"""The ``shallow`` section: hidden-interpretable shallow FFN neurons (zero-shot locator).

Reads ``DIR/shallow.csv`` (one row per located neuron: layer, neuron, name, matches,
transform_layer, side, matches_untransformed, concepts, top_tokens, untransformed_tokens;
token lists as JSON) and ``DIR/shallow.json`` (sweep, null, histograms, settings,
timings; see ``cnalens.stages.shallow.run_shallow``). Shows the M-sweep against random sets,
the null calibration and the neuron table, untransformed beside transformed tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cnalens.report import findings as F
from cnalens.report import html as h
from cnalens.report import plots
from cnalens.report.sections import Section, read_csv, read_meta

STAGE = "shallow"
REQUIRED = ("layer", "neuron", "matches", "transform_layer", "matches_untransformed")
TEXT = ("name", "concepts", "top_tokens", "untransformed_tokens")
SHOW = 25


def sweep_figure(sweep: pd.DataFrame, null: pd.DataFrame) -> Figure | None:
    """Left: accuracy drop per M, located set vs random sets (mean ± std). Right: set size
    per M, observed vs what random directions predict."""
    if sweep.empty:
        return None
    fig = plots.new_figure(width=8.6, height=3.4)
    ax1, ax2 = fig.subplots(1, 2)
    ms = sweep["m"].to_numpy()
    x = np.arange(len(ms))
    ax1.bar(x - 0.2, 100 * sweep["drop"], width=0.4, color="#c0392b", label="located set")
    ax1.bar(x + 0.2, 100 * sweep["random_mean"], width=0.4, color="#95a5a6",
            yerr=100 * sweep["random_std"], capsize=3, label="random, same layers & size")
    ax1.set_xticks(x, [f"M≥{m}" for m in ms])
    ax1.set_ylabel("accuracy drop (points)", fontsize=9)
    ax1.set_title("zeroed: located vs random", fontsize=10)
    plots.style_axes(ax1)
    if not null.empty:
        nm = null.set_index("m").reindex(ms)
        ax2.bar(x - 0.2, sweep["n_neurons"], width=0.4, color="#2c7fb8", label="observed")
        ax2.bar(x + 0.2, nm["null_expected"].to_numpy(), width=0.4, color="#bdbdbd",
                label="random directions")
        ax2.set_xticks(x, [f"M≥{m}" for m in ms])
        ax2.set_ylabel("neurons", fontsize=9)
        ax2.set_title("set size: observed vs random directions", fontsize=10)
        plots.style_axes(ax2)
    fig.legend(loc="outside upper center", ncols=4, fontsize=9, frameon=False)
    return fig


def _tokens(text: str, n: int = 8) -> str:
    try:
        toks = json.loads(text) if text else []
    except ValueError:
        return text
    return " · ".join(h.visible(str(t)).replace(" ", "␣") or "∅" for t in toks[:n])


def neuron_table(df: pd.DataFrame, k: int = SHOW) -> str:
    top = df.sort_values(["matches", "matches_untransformed", "layer", "neuron"],
                         ascending=[False, True, True, True]).head(k)
    rows = [[r.name, h.fmt_int(r.matches), h.fmt_int(r.matches_untransformed),
             str(int(r.transform_layer)), "+" if int(r.side) > 0 else "−",
             _tokens(r.untransformed_tokens), _tokens(r.top_tokens), _tokens(r.concepts, 12)]
            for r in top.itertuples()]
    cap = (f"The {len(rows)} shallow neurons with the most concept tokens in their top "
           "tokens after the transform (ties: fewest before it). 'through layer' is the "
           "attention layer whose value/output circuit gives the most matches.")
    return h.tag("div", h.table(["neuron", "matches", "before", "through layer", "sign",
                                 "top tokens, untransformed", "top tokens, transformed",
                                 "concept tokens"], rows, num_cols=(1, 2, 3), caption=cap),
                 class_="scroll")


def sweep_table(sweep: pd.DataFrame, null: pd.DataFrame, hidden: dict) -> str:
    nm = null.set_index("m") if not null.empty else pd.DataFrame()
    rows = []
    for r in sweep.itertuples():
        exp = nm["null_expected"].get(r.m) if "null_expected" in nm else None
        rows.append([f"≥\u00a0{r.m}", h.fmt_int(r.n_neurons), h.fmt_int(exp),
                     h.fmt_int(hidden.get(str(r.m), hidden.get(r.m))),
                     h.fmt_pct(r.acc_orig), h.fmt_pct(r.acc_zeroed), h.fmt_pct(r.drop),
                     h.fmt_pct(r.rel_drop), h.fmt_pct(r.random_mean), h.fmt_int(r.n_cases)])
    return h.tag("div", h.table(["M", "neurons", "random directions predict",
                                 "hidden (fewer before)",
                    "acc", "acc zeroed", "drop", "rel. drop", "random sets' drop", "n"],
                   rows, num_cols=range(1, 10),
                   caption="Neurons with at least M concept tokens among their top tokens, "
                   "zeroed at every position; random sets have the same size and per-layer "
                   "counts. 'random directions predict': how many neurons the null "
                   "(Gaussian directions with the neurons' norms, same transforms) would "
                   "put above M."), class_="scroll")


def _meta_line(meta: dict[str, Any]) -> str:
    s = meta.get("settings", {})
    bits = [f"head {meta.get('head') or '—'}: shallow layers 0-{meta.get('head_layer', 1) - 1}",
            f"{h.fmt_int(meta.get('n_shallow_neurons'))} neurons",
            f"top {s.get('top_tokens')} tokens", f"transforms: {meta.get('transforms')}",
            f"sign: {s.get('sign')}", f"{s.get('seeds')} random seeds",
            f"{h.fmt_int(meta.get('n_null'))} null directions"]
    if meta.get("profile"):
        bits.append(f"profile {meta['profile']}")
    if meta.get("seconds") is not None:
        bits.append(f"time: {h.fmt_seconds(meta['seconds'])}")
    return h.note(" · ".join(bits))


def _neuron_line(df: pd.DataFrame) -> str:
    """How many located neurons read as numbers only after the transform."""
    m = pd.to_numeric(df["matches"], errors="coerce").fillna(0)
    before = pd.to_numeric(df["matches_untransformed"], errors="coerce").fillna(0)
    hidden = int(((m > 0) & (before == 0)).sum())
    return (f"{hidden:,} of {len(df):,} located neurons show no concept token before the "
            "transform and some after it ('hidden' in the paper's sense); whether they matter "
            "is the sweep's question above, not the token lists'.")


def render(dir: Path, meta: dict[str, Any]) -> str | None:
    df = read_csv(dir, STAGE, required=REQUIRED, text=TEXT)
    stage = read_meta(dir, STAGE)
    if df is None and not stage:
        return None
    parts = [h.what("Shallow FFN neurons are rarely readable in the vocabulary directly; "
                    "passed through an upper attention layer's value/output circuit, some "
                    "project onto numbers and operators. The sweep asks whether zeroing them "
                    "hurts arithmetic more than zeroing random neurons of the same layers."),
             _meta_line(stage)]
    sweep = pd.DataFrame(stage.get("sweep") or [])
    null = pd.DataFrame(stage.get("null") or [])
    if not sweep.empty:
        fig = sweep_figure(sweep, null)
        if fig is not None:
            uri = plots.embed(fig, dir, "shallow_sweep")
            parts.append(h.figure(uri, "accuracy drop per M, located vs random",
                                  "Left: accuracy drop when each set is zeroed vs random "
                                  "sets (error bars: std over seeds). Right: set sizes vs "
                                  "what random directions predict."))
        parts.append(sweep_table(sweep, null, stage.get("hidden") or {}))
        parts.append(h.join(h.interp(x) for x in F.shallow_findings(stage)))
    if df is not None and not df.empty:
        parts.append(h.tag("h3", "Neurons"))
        parts.append(neuron_table(df))
        parts.append(h.interp(_neuron_line(df)))
    elif df is not None:
        parts.append(h.note("No shallow neuron has a concept token among its top tokens."))
    return "".join(parts)


SECTION = Section(STAGE, "Hidden-interpretable shallow neurons", render)
