"""The heads table: per-case scan results grouped and summarised (accuracy drops with a
paired bootstrap interval, log-probability changes), digits pooled, the top heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cnalens.data.cases import Encoded
from cnalens.errors import CnaError
from cnalens.evaluate import group_keys

if TYPE_CHECKING:
    from cnalens.heads.scan import Scan

METRICS = ("acc", "acc_first")
COLUMNS = ("layer", "head", "op", "digits", "n", "acc_orig", "acc_ablated", "drop",
           "drop_rel", "drop_lo", "drop_hi", "dlogp")
GROUP_BY = ("op", "digits")  # the default grouping (those the cases have); digits pooled on top
RESULTS = frozenset({"layer", "head", "n", "acc_orig", "acc_ablated", "drop", "drop_rel",
                     "drop_lo", "drop_hi", "dlogp", "dlogp_est", "rank", "name"})
OP_RANK = {op: i for i, op in enumerate(["+", "-", "*", "/"])}


def _boot_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each case is drawn in each resample (the draws of ``stats.bootstrap_diff``)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(float)


def case_groups(enc: Sequence[Encoded], keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Each case's group labels, one column per key (default: op and digits where the
    cases have them, ``GROUP_BY``); with no key, one group: op ``"custom"``."""
    keys = group_keys(enc, None, GROUP_BY) if keys is None else list(keys)
    if not keys:
        return pd.DataFrame({"op": ["custom"] * len(enc)})
    return pd.DataFrame([{k: e.case.labels.get(k) for k in keys} for e in enc], columns=keys)


def group_columns(df: pd.DataFrame) -> list[str]:
    """A head table's group columns (op, digits on arithmetic): those not results."""
    return [c for c in df.columns if c not in RESULTS]


def panel_columns(df: pd.DataFrame) -> list[str]:
    """The group columns summaries keep apart: all but ``digits`` (pooled)."""
    return [c for c in group_columns(df) if c != "digits"]


def _group_order(s: pd.Series) -> pd.Series:
    """Sort key of group values: the arithmetic ops in their order, numbers before text,
    ``"all"`` last."""
    def key(v):
        num = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and v == v
        return (v == "all", OP_RANK.get(v, 9) if s.name == "op" else 0, not num,
                float(v) if num else 0.0, str(v))
    return s.map(key)


def head_table(scan: Scan, enc: Sequence[Encoded], metric: str = "acc",
               n_boot: int = 2000, seed: int = 0,
               keys: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (layer, head, group of ``keys``; default op, digits: ``case_groups``);
    the drop's interval is a paired bootstrap."""
    if metric not in METRICS:
        raise CnaError(f"unknown metric '{metric}': use {', '.join(METRICS)}")
    field = "correct" if metric == "acc" else "correct_first"
    labels = case_groups(enc, keys)
    keys = list(labels.columns)
    a_orig = scan.orig[field].numpy().astype(float)
    a_abl = scan.ablated[field].numpy().astype(float)
    dl = (scan.ablated["logp"] - scan.orig["logp"][None]).numpy().astype(float)
    layer = np.array([h[0] for h in scan.heads])
    head = np.array([h[1] for h in scan.heads])
    parts = []
    for vals, g in labels.groupby(keys, sort=True, dropna=False):
        ix = g.index.to_numpy()
        n = len(ix)
        acc_o = a_orig[ix].mean()
        acc_a = a_abl[:, ix].mean(1)
        diff = a_orig[ix][None] - a_abl[:, ix]  # (heads, n)
        boot = _boot_counts(n, n_boot, seed) @ diff.T / n  # (n_boot, heads)
        lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
        drop = acc_o - acc_a
        parts.append(pd.DataFrame({
            "layer": layer, "head": head, **dict(zip(keys, vals, strict=True)), "n": n,
            "acc_orig": acc_o, "acc_ablated": acc_a, "drop": drop,
            "drop_rel": drop / acc_o if acc_o > 0 else np.nan,
            "drop_lo": lo, "drop_hi": hi, "dlogp": dl[:, ix].mean(1)}))
    df = pd.concat(parts, ignore_index=True)
    cols = ["layer", "head", *keys, *COLUMNS[COLUMNS.index("n"):]]
    return df.sort_values(["layer", "head", *keys], ignore_index=True)[cols]


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
                      key=lambda s: _group_order(s) if s.name in panel else s, kind="stable")
    g = (g.groupby(panel, sort=False, dropna=False).head(k) if panel else g.head(k)).copy()
    g["rank"] = (g.groupby(panel, sort=False, dropna=False).cumcount() if panel
                 else pd.Series(range(len(g)), index=g.index)) + 1
    g["name"] = g["layer"].astype(str) + "." + g["head"].astype(str)
    return g[[*panel, "rank", "name", "layer", "head", "n", "acc_orig", "acc_ablated", "drop",
              "drop_rel", "dlogp"]].reset_index(drop=True)
