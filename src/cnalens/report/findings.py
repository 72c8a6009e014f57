"""What a results folder found, in a few sentences: the report's opening and the last lines
a command prints. Reads only files (``eval.csv``, ``heads.csv``, ``verification.csv``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cnalens.heads import panel_columns, top_heads
from cnalens.io import read_json


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _label(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{row[k]}" for k in keys) or "all cases"


def heads_findings(df: pd.DataFrame) -> list[str]:
    """Per group (op on arithmetic): the head whose zeroing costs most accuracy."""
    top = top_heads(df, 1)
    keys = panel_columns(df)
    if keys:  # one line per group, not the pooled "all" row
        top = top[~(top[keys] == "all").all(axis=1)]
    return [f"top head for {_label(r, keys)}: {r['name']} (layer.head); zeroing it takes "
            f"accuracy from {_pct(r['acc_orig'])} to {_pct(r['acc_ablated'])} "
            f"(n = {int(r['n'])})" for _, r in top.iterrows()]


def verification_findings(df: pd.DataFrame, group_by: list[str]) -> list[str]:
    """Per group (op on arithmetic) and head: zeroing each case's top-K CNA neurons
    against random neurons."""
    out = []
    zero = df[df["experiment"] == "zero_topk"]
    keys = [c for c in group_by if c in df.columns]
    for _, sub in zero.groupby([*keys, "head"], sort=False, dropna=False):
        r0 = sub.iloc[0]
        cells = ", ".join(f"K={int(r.k)}: {_pct(r.value)} vs {_pct(r.random_mean)}"
                          for r in sub.sort_values("k").itertuples())
        out.append(f"{_label(r0, keys)} (head {r0['head']} zeroed in run B), each case's "
                   f"top-K CNA neurons zeroed: accuracy drop vs random neurons {cells} "
                   f"(n = {int(sub.n.max())})")
    return out


def findings(dir: Path) -> list[str]:
    """The folder's findings as sentences, for whatever stages it holds."""
    dir = Path(dir)
    lines: list[str] = []
    if (dir / "heads.csv").is_file():
        lines += heads_findings(pd.read_csv(dir / "heads.csv", dtype={"op": str}))
    if (dir / "verification.csv").is_file():
        meta = read_json(dir / "verification.json") if (dir / "verification.json").is_file() \
            else {}
        keys = meta.get("group_by") or ["op"]
        ver = pd.read_csv(dir / "verification.csv", dtype=dict.fromkeys([*keys, "head"], str))
        lines += verification_findings(ver, keys)
    return lines
