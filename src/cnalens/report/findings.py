"""What a results folder found, in plain sentences computed from its files: the report's
opening "Findings" section, the interpretation lines of its sections, and the last lines
``cnalens run``, ``heads`` and ``cna`` print. Reads only files; every sentence is built from
the numbers (conditional wording), so it holds for any model and any stage selection.

    from cnalens.report.findings import findings
    for line in findings(Path("results/arithmetic")):
        print(line)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cnalens.errors import CnaError
from cnalens.report.html import fmt_acc, fmt_pct, is_missing
from cnalens.report.sections import ORDER, has_results, read_meta
from cnalens.stats import Z95, wilson
from cnalens.tables import panel_columns, top_heads

# The stages a run can have, in the order the Findings section lists them (``cna`` writes
# ``verification`` too; the attribution pre-scan is an option of ``heads``).
STAGES = tuple(s for s in ORDER if s not in ("verification", "heads_attribution"))
NOTATION = ("Heads are named L.H (layer.head) and FFN neurons L.N (layer.neuron), both "
            "0-based.")
ACC_DROPS = ("zero_topk", "keep_topk", "heldout_zero_topk")  # fractions of correct cases


class Finding(NamedTuple):
    """One sentence of the findings, with the stage it comes from."""

    stage: str
    text: str


# ----------------------------------------------------------------- small helpers


def pct(x: Any, decimals: int = 1) -> str:
    """0.875 -> '87.5%' (the report's percentages); missing -> '—'."""
    return fmt_pct(x, decimals)


def signed(x: float, decimals: int = 2) -> str:
    """A signed number with a real minus: 2.1 -> '+2.10', -0.13 -> '−0.13'."""
    return f"{x:+.{decimals}f}".replace("-", "−")


def group_text(keys: Sequence[str], row: Any) -> str:
    """A group of a table in text: the op symbol alone, other labels as ``key = value``;
    no keys (or the one group "custom" of a case file): "all cases"."""
    vals = {k: str(row[k]) for k in keys}
    if not vals or vals == {"op": "custom"}:
        return "all cases"
    return ", ".join(v if k == "op" else f"{k} = {v}" for k, v in vals.items())


def drop_interval(n: Any, value: Any) -> tuple[float, float]:
    """Wilson 95% interval of an accuracy drop measured on ``n`` cases that were all
    answered correctly before (the drop is then the fraction of them lost)."""
    if is_missing(n) or is_missing(value) or int(n) == 0:
        return float("nan"), float("nan")
    return wilson(float(value) * int(n), int(n))


def fmt_drop(value: Any, n: Any) -> str:
    """'87.5% [52.9, 97.8]' for an accuracy drop over ``n`` correct cases."""
    lo, hi = drop_interval(n, value)
    return fmt_acc(value, lo, hi)


# ----------------------------------------------------------------- eval


def eval_keys(df: pd.DataFrame) -> list[str]:
    """eval.csv's group columns: those before ``n``."""
    cols = list(df.columns)
    return cols[: cols.index("n")] if "n" in cols else []


def _cell_text(keys: Sequence[str], row: Any) -> str:
    bits = []
    for k in keys:
        v = row[k]
        if k == "digits":
            bits.append(f"{int(float(v))}-digit" if not is_missing(v) else "")
        else:
            bits.append(str(v))
    return " ".join(b for b in bits if b) or "all cases"


def eval_findings(df: pd.DataFrame, keys: Sequence[str] | None = None) -> list[str]:
    """Accuracy over all cases and the best and worst cell, with 95% intervals."""
    keys = eval_keys(df) if keys is None else list(keys)
    df = df[df["acc"].notna()]
    if df.empty:
        return []
    is_all = pd.DataFrame({k: df[k].astype(str).isin(
        ["all", "0", "0.0"] if k == "digits" else ["all"]) for k in keys}, index=df.index)
    pooled = df[is_all.all(axis=1)] if keys else df
    cells = df[~is_all.any(axis=1)] if keys else df.iloc[0:0]
    out = []
    if len(pooled) == 1 or (not keys and len(df) == 1):
        r = pooled.iloc[0]
        out.append(f"Accuracy over all {int(r['n']):,} cases: "
                   f"{fmt_acc(r['acc'], r.get('acc_lo'), r.get('acc_hi'))}.")
    if len(cells) >= 2:
        lo_r = cells.loc[cells["acc"].idxmin()]
        hi_r = cells.loc[cells["acc"].idxmax()]
        out.append(f"By cell, accuracy ranges from "
                   f"{fmt_acc(lo_r['acc'], lo_r.get('acc_lo'), lo_r.get('acc_hi'))} "
                   f"({_cell_text(keys, lo_r)}, n = {int(lo_r['n'])}) to "
                   f"{fmt_acc(hi_r['acc'], hi_r.get('acc_lo'), hi_r.get('acc_hi'))} "
                   f"({_cell_text(keys, hi_r)}, n = {int(hi_r['n'])}); later stages "
                   "use only correctly answered cases, so weak cells give few of them.")
    return out


# ----------------------------------------------------------------- heads


def top_heads_ci(df: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """:func:`cnalens.heads.top_heads` with the drop's 95% interval (``drop_lo``,
    ``drop_hi``; ``ci_exact`` False where digits were pooled: then the n-weighted
    combination of the per-digits bootstrap intervals under a normal approximation)."""
    top = top_heads(df, k)
    if not {"drop_lo", "drop_hi"} <= set(df.columns):
        return top.assign(drop_lo=np.nan, drop_hi=np.nan, ci_exact=False)
    panel = panel_columns(df)
    both = pd.concat([df, df.assign(**dict.fromkeys(panel, "all"))]) if panel else df
    keys = [*panel, "layer", "head"]
    se = (both["drop_hi"] - both["drop_lo"]) / (2 * Z95)
    d = both[keys].assign(n=both["n"], d=both["drop"] * both["n"], v=(se * both["n"]) ** 2,
                          lo=both["drop_lo"], hi=both["drop_hi"], rows=1)
    g = d.groupby(keys, sort=False, dropna=False).agg(
        n=("n", "sum"), d=("d", "sum"), v=("v", "sum"), lo=("lo", "first"),
        hi=("hi", "first"), rows=("rows", "sum")).reset_index()
    drop, half = g["d"] / g["n"], Z95 * np.sqrt(g["v"]) / g["n"]
    one = g["rows"] == 1
    g["drop_lo"] = np.where(one, g["lo"], drop - half)
    g["drop_hi"] = np.where(one, g["hi"], drop + half)
    g["ci_exact"] = one
    return top.merge(g[[*keys, "drop_lo", "drop_hi", "ci_exact"]], how="left", on=keys)


def _head_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The top two heads per group (the pooled "all" group left out when there are
    groups), with intervals."""
    df = df.copy()
    for c in panel_columns(df):
        df[c] = df[c].astype(str)
    top = top_heads_ci(df, 2)
    keys = panel_columns(df)
    if keys and len(top[keys].drop_duplicates()) > 1:
        top = top[~(top[keys] == "all").all(axis=1)]
    return top


def heads_findings(df: pd.DataFrame) -> list[str]:
    """Per group (op on arithmetic): the head whose zeroing costs most accuracy, what it
    costs with its 95% interval, and whether it stands clear of the next head."""
    keys = panel_columns(df)
    out = []
    top = _head_rows(df)
    for _, sub in (top.groupby(keys, sort=False, dropna=False) if keys
                   else [((), top)]):
        first = sub[sub["rank"] == 1].iloc[0]
        ci = "" if is_missing(first["drop_lo"]) else (
            f" [{100 * first['drop_lo']:.1f}, {100 * first['drop_hi']:.1f}]")
        line = (f"Top head for {group_text(keys, first)}: {first['name']} (layer "
                f"{int(first['layer'])}, head {int(first['head'])}); zeroing it takes "
                f"accuracy from {pct(first['acc_orig'])} to {pct(first['acc_ablated'])}, a "
                f"drop of {pct(first['drop'])}{ci} (n = {int(first['n'])})")
        second = sub[sub["rank"] == 2]
        if len(second):
            s = second.iloc[0]
            line += f"; the next head, {s['name']}, costs {pct(s['drop'])}"
            if is_missing(first["drop_lo"]):
                line += "."
            elif first["drop_lo"] > s["drop"]:
                line += ", below that interval."
            else:
                line += ", within that interval: the top head is not clearly ahead."
        else:
            line += "."
        out.append(line)
    return out


# ----------------------------------------------------------------- cna


def faithfulness_meaning(spearman: float, pearson: float) -> str:
    """What a lens faithfulness correlation pair means for the neuron rankings."""
    if spearman >= 0.7:
        return ("the lens orders neurons much as zeroing them does: the rankings can be "
                "read as ordered.")
    if spearman >= 0.4:
        return ("the lens orders neurons roughly as zeroing them does: the top of a "
                "ranking is meaningful, exact ranks are not.")
    if pearson >= 0.4:
        return ("the few neurons with large real effects also score high (Pearson), but "
                "the order among the rest is close to chance (Spearman): read a top-K as a "
                "set of candidates, not as an order; the verification measures them "
                "directly.")
    return ("the lens importance says little about what zeroing one neuron does: trust "
            "the verification experiments, not the lens ranking.")


def cna_findings(meta: dict[str, Any]) -> list[str]:
    """Per group: how many selected cases CNA kept (and why the others went), and the lens
    faithfulness with what it means for the rankings."""
    out = []
    for group, g in (meta.get("per_op") or {}).items():
        name = "all cases" if group == "custom" else group
        n, wrong = int(g.get("n") or 0), int(g.get("skipped_wrong") or 0)
        line = f"CNA on {name} (head {g.get('head')} zeroed in run B): {n} cases"
        if wrong:
            line += (f" of {n + wrong} selected; the model answered {wrong} wrongly, and CNA "
                     "explains correct answers only")
        f = g.get("faithfulness") or {}
        if f and not is_missing(f.get("spearman")) and not is_missing(f.get("pearson")):
            sp, pe = float(f["spearman"]), float(f["pearson"])
            line += (f". Lens faithfulness over {f.get('n')} neuron-cases (each case's top-10 "
                     f"neurons of run A, lens importance vs the real log-prob drop when "
                     f"zeroed alone): Spearman {sp:.2f}, Pearson {pe:.2f}; "
                     + faithfulness_meaning(sp, pe))
        else:
            line += "."
        out.append(line)
    return out


# ----------------------------------------------------------------- verification


def _vs_random(sub: pd.DataFrame) -> str:
    cells = []
    for r in sub.sort_values("k").itertuples():
        rand = "" if is_missing(r.random_mean) else f" vs random {pct(r.random_mean)}"
        cells.append(f"{fmt_drop(r.value, r.n)}{rand} at K = {int(r.k)}")
    return "; ".join(cells)


def _above(sub: pd.DataFrame) -> str:
    """Which Ks have the interval's lower end above the random mean."""
    above = [int(r.k) for r in sub.itertuples()
             if drop_interval(r.n, r.value)[0] > (0 if is_missing(r.random_mean)
                                                  else r.random_mean)]
    ks = sorted(int(k) for k in sub["k"])
    if len(above) == len(ks):
        return "above random at every K (interval clear of the random mean)"
    if not above:
        return "not clear of random at any K"
    return f"clear of random at K = {', '.join(map(str, sorted(above)))} only"


def _at(sub: pd.DataFrame, exp: str, where: str = "all") -> pd.DataFrame:
    """The rows of one experiment with interventions at ``where`` (files without a
    positions column: every position)."""
    rows = sub[sub["experiment"] == exp]
    if "positions" not in rows.columns:
        return rows if where == "all" else rows.iloc[0:0]
    return rows[rows["positions"].fillna("all") == where]


VERDICT_NAMES = {"zero_topk": "zeroing the top-K", "keep_topk": "keep-only",
                 "coef_drop_head": "the head's coefficient drop",
                 "coef_drop_lowest": "prediction enhancing",
                 "heldout_zero_topk": "held-out zeroing",
                 "mediation_restore_logp": "mediation (restored log-prob effect)",
                 "mediation_reproduce_logp": "mediation (reproduced log-prob effect)"}


def verdict_line(sub: pd.DataFrame) -> str | None:
    """Each experiment's verdicts over K (``tables.add_verdicts``, one rule), in words."""
    if "verdict" not in sub.columns:
        return None
    parts = []
    for exp, name in VERDICT_NAMES.items():
        for where in ("all", "last"):
            rows = (sub[sub["experiment"] == exp] if exp.startswith("mediation")
                    else _at(sub, exp, where))
            if rows.empty or (exp.startswith("mediation") and where == "last"):
                continue
            label = name + (" at the scored positions" if where == "last"
                            and not exp.startswith("mediation") else "")
            found = rows.groupby("verdict", sort=False)["k"].apply(
                lambda k: ", ".join(str(int(x)) for x in sorted(k)))
            parts.append(f"{label}: " + "; ".join(f"{v} (K = {ks})" for v, ks in
                                                  found.items()))
    return ("Verdicts (the effect's 95% interval against the random control, in the "
            "paper's direction; too few cases or a weak model cannot be judged): "
            + " · ".join(parts) + ".") if parts else None


def verification_findings(df: pd.DataFrame, group_by: Sequence[str]) -> list[str]:
    """Per group (op on arithmetic) and head: zeroing each case's top-K CNA neurons, and
    the K most frequent on held-out cases, against random neurons of the same layers;
    the mediation shares; the verdicts."""
    out = []
    keys = [c for c in group_by if c in df.columns]
    for _, sub in df.groupby([*keys, "head"], sort=False, dropna=False):
        r0 = sub.iloc[0]
        zero = _at(sub, "zero_topk")
        name = group_text(keys, r0)
        if len(zero):
            out.append(f"Verification, {name} (head {r0['head']}; n = {int(zero['n'].max())} "
                       f"correctly answered cases): zeroing each case's top-K CNA neurons "
                       f"drops accuracy by {_vs_random(zero)}; {_above(zero)}.")
        last = _at(sub, "zero_topk", "last")
        if len(last):
            out.append(f"The same at the scored positions only, {name}: "
                       f"{_vs_random(last)}; {_above(last)}.")
        held = _at(sub, "heldout_zero_topk")
        if len(held):
            out.append(f"Held-out, {name} (n = {int(held['n'].max())} new cases): zeroing the "
                       f"K neurons most often in the CNA top-K drops accuracy by "
                       f"{_vs_random(held)}; "
                       f"{_above(held)}.")
        med = mediation_line(sub, name)
        if med:
            out.append(med)
    return out


def mediation_line(sub: pd.DataFrame, name: str) -> str | None:
    """What the mediation rows say at the largest K: the shares of the head's log-prob and
    accuracy effects the top-K restore and reproduce, beside random sets."""
    med = sub[sub["experiment"].astype(str).str.startswith("mediation")]
    if med.empty:
        return None
    k = int(med["k"].max())
    at = med[med["k"] == k].set_index("experiment")

    def share(exp: str) -> str:
        if exp not in at.index:
            return "—"
        r = at.loc[exp]
        lo, hi = r.get("lo"), r.get("hi")
        rand = "" if is_missing(r["random_mean"]) else f" (random sets {pct(r['random_mean'])})"
        return f"{fmt_acc(r['value'], lo, hi)}{rand}"

    return (f"Mediation, {name} (K = {k}, scored positions): with the head zeroed, setting "
            f"each case's top-K back to their values in the intact model restores "
            f"{share('mediation_restore_logp')} of the head's log-prob effect and "
            f"{share('mediation_restore_acc')} of its accuracy effect; in the intact model, "
            f"setting them to their head-zeroed values reproduces "
            f"{share('mediation_reproduce_logp')} and {share('mediation_reproduce_acc')} "
            f"of them.")


def keep_meaning(sub: pd.DataFrame) -> str | None:
    """What the keep-only numbers (every other deep neuron zeroed) say, for one head."""
    keep = _at(sub, "keep_topk").sort_values("k")
    if keep.empty:
        return None
    ks = [int(k) for k in keep["k"]]
    vals = keep["value"].to_numpy(dtype=float)
    rand = keep["random_mean"].to_numpy(dtype=float)
    n = int(keep["n"].max())
    better = [k for k, v, r in zip(ks, vals, rand, strict=True) if not np.isnan(r)
              and v < r - 0.05]
    shape = " → ".join(f"{100 * v:.0f}%" for v in vals)
    text = (f"Keep-only (the top-K kept, every other deep neuron zeroed): the drop goes "
            f"{shape} over K = {', '.join(map(str, ks))}")
    if np.all(vals <= 0.2):
        text += ": the top-K neurons alone keep most answers right."
    elif not better:
        text += (": keeping only the top-K loses about as many answers as keeping random "
                 "neurons, so at these K the top-K alone do not carry the computation.")
    elif len(better) == len(ks):
        text += (": fewer answers are lost than with random neurons kept at every K, though "
                 "the top-K alone do not keep most answers.")
    else:
        text += (f": fewer answers are lost than with random neurons kept at K = "
                 f"{', '.join(map(str, better))} only.")
    if len(vals) > 2 and np.any(np.diff(vals) > 0) and np.any(np.diff(vals) < 0):
        text += (f" The shape is not monotone; with n = {n} one case moves it by "
                 f"{100 / n:.1f} points.")
    return text


def coef_meaning(sub: pd.DataFrame) -> str | None:
    """What the coefficient-sum drops (head zeroed; lowest neuron zeroed) say."""
    head = _at(sub, "coef_drop_head").sort_values("k")
    if head.empty:
        return None
    above = (head["value"] > head["random_mean"] + 2 * head["random_std"].fillna(0)).sum()
    lo, hi = head["value"].min(), head["value"].max()
    text = (f"Zeroing the head lowers the top-K neurons' coefficient sum by {pct(lo, 0)}–"
            f"{pct(hi, 0)} (random neurons: {pct(head['random_mean'].min(), 0)}–"
            f"{pct(head['random_mean'].max(), 0)}; the paper: 49–77% on Llama-7B); above "
            f"random by 2 std at {above} of {len(head)} K.")
    low = _at(sub, "coef_drop_lowest")
    if len(low):
        pos = (low["value"] > low["random_mean"]).sum()
        text += (f" Zeroing the lowest top-K neuron lowers the others' sum by "
                 f"{pct(low['value'].min(), 1)}–{pct(low['value'].max(), 1)}, more than a "
                 f"random neuron at {pos} of {len(low)} K (the paper's 'prediction "
                 "enhancing': lower neurons drive higher ones).")
    return text


# ----------------------------------------------------------------- shallow


def shallow_findings(meta: dict[str, Any]) -> list[str]:
    """The M sweep against random sets and the null count, with the verdict the numbers
    support (located sets hurt more than random ones or not; more of them than random
    directions give or not)."""
    sweep = meta.get("sweep") or []
    if not sweep:
        return []
    null = {int(r["m"]): r for r in meta.get("null") or []}
    cells, beats, ratios = [], [], []
    for r in sweep:
        rs = 0.0 if is_missing(r.get("random_std")) else float(r["random_std"])
        rm = float(r.get("random_mean") or 0.0)
        cells.append(f"M ≥ {r['m']}: {r['n_neurons']:,} neurons, drop {pct(r['drop'])} vs "
                     f"random {pct(rm)} ± {pct(rs)}")
        n = int(r.get("n_cases") or 0)
        p = min(max(float(r["drop"]), 0.0), 1.0)  # a drop can be negative (answers gained)
        noise = Z95 * math.sqrt(p * (1 - p) / n) if n else 0.0
        if r["drop"] - rm > max(2 * rs, noise, 1 / max(n, 1)):
            beats.append(r["m"])
        exp = (null.get(int(r["m"])) or {}).get("null_expected")
        if exp:
            ratios.append(r["n_neurons"] / exp)
    head = meta.get("head")
    layers = meta.get("shallow_layers") or []
    where = f"layers {layers[0]}-{layers[-1]}, below head {head}" if layers else f"head {head}"
    line = (f"Shallow locator ({where}; n = {sweep[0].get('n_cases')} cases): "
            + "; ".join(cells) + ".")
    if ratios:
        line += (f" The sets are {min(ratios):.2f}–{max(ratios):.2f}× the size that random "
                 "directions with the same norms give.")
    if not beats and (not ratios or max(ratios) < 1.5):
        line += (" Null result: the located sets hurt no more than random sets (the gap is "
                 "within the located drop's 95% sampling interval and 2 std over seeds) and "
                 "are about as many as chance gives, so this run does not show "
                 "hidden-interpretable shallow neurons.")
    elif beats:
        line += (f" At M ≥ {', '.join(map(str, beats))} the located set hurts more than "
                 "random sets, beyond its 95% sampling interval and 2 std over seeds.")
    else:
        line += (" The located sets hurt no more than random sets, though they are more "
                 "than chance gives.")
    return [line]


# ----------------------------------------------------------------- explain


def explain_findings(df: pd.DataFrame, cases: dict[str, dict]) -> list[str]:
    """Per explained case: what zeroing the head does, and the element with the largest
    effect (signs: the change of log p(answer) when zeroed)."""
    out = []
    for case, sub in df.groupby("case", sort=False):
        meta = cases.get(str(case), {})
        q = meta.get("question", sub["prompt"].iloc[0] if "prompt" in sub else case)
        tgt = meta.get("target", sub["target"].iloc[0] if "target" in sub else "")
        eff = pd.to_numeric(sub["effect"], errors="coerce")
        head = sub[sub["kind"] == "head"]
        bits = []
        if len(head) and not is_missing(head["effect"].iloc[0]):
            bits.append(f"zeroing head {head['name'].iloc[0]} changes log p by "
                        f"{signed(-float(head['effect'].iloc[0]))}")
        others = sub[(sub["kind"] != "head") & eff.notna()]
        if len(others):
            r = others.loc[eff[others.index].abs().idxmax()]
            what = {"ffn_neuron": "neuron", "attn_layer": "attention layer",
                    "head": "head"}.get(str(r["kind"]), str(r["kind"]))
            name = str(r["name"]).removeprefix("L") if r["kind"] == "attn_layer" else r["name"]
            bits.append(f"the largest other effect is {what} {name} ({r['stage']}): "
                        f"{signed(-float(r['effect']))}")
        if bits:
            out.append(f"Chain of {q} → {tgt}: " + "; ".join(bits) + ".")
    return out


# ----------------------------------------------------------------- lora, prune, debias


def _acc(r: Any) -> str:
    return fmt_acc(r["acc"], r.get("acc_lo"), r.get("acc_hi"))


def lora_findings(acc: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Test accuracy of the original and the LoRA model (all ops), with intervals."""
    layer = meta.get("layer")
    sel = acc[acc["op"].astype(str) == "all"]
    orig = sel[sel["run"] == "original"]
    lora = sel[(sel["run"] == "lora") & (sel["layer"] == layer)]
    if orig.empty or lora.empty:
        return []
    o, a = orig.iloc[0], lora.iloc[0]
    overlap = not (a.get("acc_lo", np.nan) > o.get("acc_hi", np.nan)
                   or a.get("acc_hi", np.nan) < o.get("acc_lo", np.nan))
    return [f"LoRA on layer {layer}: test accuracy {_acc(o)} → {_acc(a)} (n = {int(o['n'])}); "
            + ("the intervals overlap." if overlap else "the intervals do not overlap.")]


def prune_findings(summ: pd.DataFrame) -> list[str]:
    """CNA-pruned + LoRA against random-pruned + LoRA (a ``prune`` summary frame)."""
    s = summ.set_index("variant")
    if not {"cna_pruned_lora", "random_pruned_lora"} <= set(s.index):
        return []
    c, r = s.loc["cna_pruned_lora"], s.loc["random_pruned_lora"]
    better = c["acc_lo"] > r["acc"]
    return [f"Pruning {pct(c['deep_pruned'], 0)} of the deep neurons, then a LoRA: CNA-chosen "
            f"neurons kept {fmt_acc(c['acc'], c['acc_lo'], c['acc_hi'])} vs random ones "
            f"{pct(r['acc'])} (n = {int(c['n'])}); "
            + ("CNA's choice keeps clearly more." if better else
               "CNA's choice is not clearly better.")]


def debias_findings(meta: dict[str, Any]) -> list[str]:
    """Mean |gap| before and after the CNA edit against the random edit, per split."""
    out = []
    for m in meta.get("metric") or []:
        if m.get("by") != "total" or is_missing(m.get("cna_change")):
            continue
        rand = m.get("random_change")
        lo, hi = m.get("cna_change_lo"), m.get("cna_change_hi")
        ci = ("" if is_missing(lo) or is_missing(hi)
              else f" [{signed(100 * lo, 1)}, {signed(100 * hi, 1)}]")
        verdict = m.get("verdict")
        if is_missing(rand):
            tail = ""
        elif verdict is not None:  # the one rule: the interval against the random control
            tail = (f" vs random neurons {signed(100 * rand, 1)}%; verdict: {verdict} "
                    "(the paper: the CNA edit shrinks the gap, random neurons do not).")
        else:  # an older debias.json without the interval: point estimates only
            better = m["cna_change"] < min(rand, 0.0)
            tail = (f" vs random neurons {signed(100 * rand, 1)}%; "
                    + ("the CNA edit shrinks it more than random neurons." if better else
                       "the CNA edit does no better than random."))
        out.append(f"Bias edit ({m['split']} pairs, n = {m['n']}): mean |gap| "
                   f"{m['before']:.2f} → {m['cna']:.2f} ({signed(100 * m['cna_change'], 1)}%"
                   f"{ci})" + tail)
    return out


# ----------------------------------------------------------------- the folder


def _read(dir: Path, name: str, **kw: Any) -> pd.DataFrame | None:
    path = dir / f"{name}.csv"
    return pd.read_csv(path, **kw) if path.is_file() else None


def collect(dir: Path) -> list[Finding]:
    """Every finding of the folder, stage by stage (see :data:`STAGES`)."""
    dir = Path(dir)
    out: list[Finding] = []

    def add(stage: str, lines: Sequence[str]) -> None:
        out.extend(Finding(stage, t) for t in lines)

    ev = _read(dir, "eval", dtype={"op": str, "template": str}, keep_default_na=False,
               na_values={"acc": [""], "acc_lo": [""], "acc_hi": [""], "n": [""]})
    if ev is not None:
        keys = (read_meta(dir, "eval").get("settings") or {}).get("group_by")
        add("eval", eval_findings(ev, [k for k in keys if k in ev] if keys else None))
    hd = _read(dir, "heads", dtype={"op": str})
    if hd is not None and len(hd):
        add("heads", heads_findings(hd))
    cna = read_meta(dir, "cna")
    if cna:
        add("cna", cna_findings(cna))
    if (dir / "verification.csv").is_file():
        keys = read_meta(dir, "verification").get("group_by") or ["op"]
        ver = pd.read_csv(dir / "verification.csv", dtype=dict.fromkeys([*keys, "head"], str))
        add("cna", verification_findings(ver, keys))
    sh = read_meta(dir, "shallow")
    if sh:
        add("shallow", shallow_findings(sh))
    ex = _read(dir, "explain", dtype={"case": str, "name": str, "target": str,
                                      "prompt": str})
    if ex is not None and len(ex):
        cases = {str(c.get("case")): c for c in read_meta(dir, "explain").get("cases") or []}
        add("explain", explain_findings(ex, cases))
    lo = _read(dir, "lora", dtype={"op": str})
    if lo is not None:
        add("lora", lora_findings(lo, read_meta(dir, "lora")))
    pr = _read(dir, "prune", dtype={"variant": str})
    if pr is not None and len(pr):
        from cnalens.tables import prune_summary as summary

        add("prune", prune_findings(summary(pr)))
    db = read_meta(dir, "debias")
    if db:
        add("debias", debias_findings(db))
    return out


def missing_stages(dir: Path) -> list[str]:
    """The stages of :data:`STAGES` without results in the folder."""
    return [s for s in STAGES if not has_results(Path(dir), s)]


def missing_line(dir: Path) -> str | None:
    """One line naming the stages this folder has no results of; None when none."""
    gone = missing_stages(dir)
    if not gone:
        return None
    return (f"Not in this folder: {', '.join(gone)} (stage{'s' if len(gone) > 1 else ''} "
            "not run), so nothing is said about {}.".format(
                "them" if len(gone) > 1 else "it"))


def findings(dir: Path) -> list[str]:
    """The folder's findings as sentences, for whatever stages it holds (the lines the
    terminal commands print last)."""
    try:
        return [f.text for f in collect(dir)]
    except (CnaError, KeyError, ValueError) as e:  # a bad file costs the summary only
        return [f"(findings unavailable: {type(e).__name__}: {e})"]
