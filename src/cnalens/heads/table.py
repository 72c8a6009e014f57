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
from cnalens.tables import (  # re-exported: the heads table's pure-pandas helpers
    OP_RANK,
    RESULTS,
    group_columns,
    group_order,
    panel_columns,
    pooled,
    top_heads,
)

if TYPE_CHECKING:
    from cnalens.heads.scan import Scan

METRICS = ("acc", "acc_first")
COLUMNS = ("layer", "head", "op", "digits", "n", "acc_orig", "acc_ablated", "drop",
           "drop_rel", "drop_lo", "drop_hi", "dlogp")
GROUP_BY = ("op", "digits")  # the default grouping (those the cases have); digits pooled on top


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


__all__ = ["COLUMNS", "GROUP_BY", "METRICS", "OP_RANK", "RESULTS", "case_groups", "group_columns",
           "group_order", "head_table", "panel_columns", "pooled", "top_heads"]
