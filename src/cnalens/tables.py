"""Result tables read back: the pure-pandas summaries that stages, the CLI and the report
share (no torch, no model): the heads table's groups, pooling and top heads, and how often
a neuron is in the cases' top-K of a CNA table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cnalens.stats import verdict, wilson

# the heads table's result columns (the rest are group labels such as op and digits)
RESULTS = frozenset({"layer", "head", "n", "acc_orig", "acc_ablated", "drop", "drop_rel",
                     "drop_lo", "drop_hi", "dlogp", "dlogp_est", "rank", "name"})
OP_RANK = {op: i for i, op in enumerate(["+", "-", "*", "/"])}


def group_columns(df: pd.DataFrame) -> list[str]:
    """A head table's group columns (op, digits on arithmetic): those not results."""
    return [c for c in df.columns if c not in RESULTS]


def panel_columns(df: pd.DataFrame) -> list[str]:
    """The group columns summaries keep apart: all but ``digits`` (pooled)."""
    return [c for c in group_columns(df) if c != "digits"]


def group_order(s: pd.Series) -> pd.Series:
    """Sort key of group values: the arithmetic ops in their order, numbers before text,
    ``"all"`` last."""
    def key(v):
        num = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and v == v
        return (v == "all", OP_RANK.get(v, 9) if s.name == "op" else 0, not num,
                float(v) if num else 0.0, str(v))
    return s.map(key)


def pooled(df: pd.DataFrame, cols: str | Sequence[str] = "drop") -> pd.DataFrame:
    """``cols`` per (group, layer, head), digits pooled: means weighted by ``n`` (columns
    ``panel_columns``, layer, head, n and ``cols``; groups in order of first appearance)."""
    cols = [cols] if isinstance(cols, str) else list(cols)
    keys = [*panel_columns(df.drop(columns=cols)), "layer", "head"]
    d = pd.concat([df[[*keys, "n"]], df[cols].mul(df["n"], axis=0)], axis=1)
    g = d.groupby(keys, sort=False, dropna=False)[["n", *cols]].sum().reset_index()
    g[cols] = g[cols].div(g["n"], axis=0)
    return g


def top_heads(df: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The ``k`` heads with the largest drop per group (``panel_columns``: op on
    arithmetic; digits pooled, weighted by n), and over all groups (each group column
    ``"all"``). Columns: the group columns, rank, name (``L.H``), layer, head, n,
    acc_orig, acc_ablated, drop, drop_rel, dlogp."""
    panel = panel_columns(df)
    both = pd.concat([df, df.assign(**dict.fromkeys(panel, "all"))]) if panel else df
    g = pooled(both, ["acc_orig", "acc_ablated", "dlogp"])
    g["drop"] = g["acc_orig"] - g["acc_ablated"]
    g["drop_rel"] = g["drop"] / g["acc_orig"].where(g["acc_orig"] > 0)
    g = g.sort_values([*panel, "drop", "dlogp"], ascending=[*[True] * len(panel), False, True],
                      key=lambda s: group_order(s) if s.name in panel else s, kind="stable")
    g = (g.groupby(panel, sort=False, dropna=False).head(k) if panel else g.head(k)).copy()
    g["rank"] = (g.groupby(panel, sort=False, dropna=False).cumcount() if panel
                 else pd.Series(range(len(g)), index=g.index)) + 1
    g["name"] = g["layer"].astype(str) + "." + g["head"].astype(str)
    return g[[*panel, "rank", "name", "layer", "head", "n", "acc_orig", "acc_ablated", "drop",
              "drop_rel", "dlogp"]].reset_index(drop=True)


def frequency(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """How often each neuron is in a case's top-K, with its mean scores."""
    top = frame[frame["rank"] <= k]
    g = top.groupby(["layer", "neuron"])
    out = g.agg(count=("case", "size"), imp_a=("imp_a", "mean"), imp_b=("imp_b", "mean"),
                coef_a=("coef_a", "mean"), coef_b=("coef_b", "mean")).reset_index()
    out["freq"] = out["count"] / frame["case"].nunique()
    return out.sort_values(["count", "layer", "neuron"], ascending=[False, True, True])


PRUNE_VARIANTS = {  # prune.csv's variants and their labels
    "original": "original",
    "lora": "LoRA",
    "cna_pruned": "CNA-pruned",
    "cna_pruned_lora": "CNA-pruned + LoRA",
    "random_pruned": "random-pruned",
    "random_pruned_lora": "random-pruned + LoRA",
}


def prune_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: accuracy (mean and sd over seeds for the random controls), the
    Wilson 95% interval of the pooled cases, and the fraction of deep neurons pruned."""
    out = []
    for variant in PRUNE_VARIANTS:
        g = rows[rows["variant"] == variant]
        if g.empty:
            continue
        n, k = int(g["n"].sum()), int(g["correct"].sum())
        lo, hi = wilson(k, n)
        out.append({"variant": variant, "label": PRUNE_VARIANTS[variant], "runs": len(g),
                    "n": int(g["n"].iloc[0]), "acc": float(g["acc"].mean()),
                    "acc_sd": float(g["acc"].std(ddof=1)) if len(g) > 1 else float("nan"),
                    "acc_lo": lo, "acc_hi": hi, "acc_first": float(g["acc_first"].mean()),
                    "logp": float(g["logp"].mean()),
                    "deep_pruned": float(g["deep_pruned"].mean())})
    return pd.DataFrame(out)


__all__ = ["OP_RANK", "PAPER_DIRECTION", "PRUNE_VARIANTS", "RESULTS", "add_verdicts",
           "frequency", "group_columns", "group_order", "panel_columns", "pooled",
           "prune_summary", "top_heads"]


# the paper's direction per verification experiment: True when its effect is above the
# random control (a larger drop, a larger share), False when below (keep-only loses less)
PAPER_DIRECTION = {
    "zero_topk": True, "keep_topk": False, "coef_drop_head": True, "coef_drop_lowest": True,
    "heldout_zero_topk": True, "mediation_restore_acc": True, "mediation_restore_logp": True,
    "mediation_reproduce_acc": True, "mediation_reproduce_logp": True,
}


def add_verdicts(ver: pd.DataFrame) -> pd.DataFrame:
    """``ver`` (verification rows with value, lo, hi, random_mean, n, base_accuracy) with a
    ``verdict`` column: ``stats.verdict`` against the random control, in the paper's
    direction (``PAPER_DIRECTION``); experiments the paper has no direction for, and rows
    without an interval, get "cannot be judged"."""
    out = ver.copy()

    def one(r) -> str:
        higher = PAPER_DIRECTION.get(r["experiment"])
        if higher is None or "lo" not in r or "base_accuracy" not in r:
            return "cannot be judged"
        return verdict(r["value"], r["lo"], r["hi"], r["random_mean"], int(r["n"]),
                       r["base_accuracy"], higher)

    out["verdict"] = [one(r) for _, r in out.iterrows()] if len(out) else []
    return out
