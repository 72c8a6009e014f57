"""Is the head ranking a property of the model or of one prompt format?

The same head scan under several templates and under two few-shot prefixes; the
Spearman correlation of the heads' accuracy drops (and of their mean log-probability
changes) between every pair of variants, per operation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING

import pandas as pd
from scipy.stats import spearmanr

from cnalens.data.arithmetic import arithmetic_cases, default_examples, operand_pairs
from cnalens.heads import scan_heads

if TYPE_CHECKING:
    from cnalens.models import ModelView


def alternative_examples(op: str, template: str, shots: int = 3, seed: int = 1) -> list:
    """Seeded few-shot pairs that differ from the default ones."""
    default = set(default_examples(op, template, 1, shots))
    pairs = [p for p in operand_pairs(op, 1) if p not in default]
    return random.Random(f"alt|{op}|{template}|{seed}").sample(pairs, shots)


def head_robustness(view: ModelView, ops: Sequence[str],
                    templates: Sequence[str] = ("eq", "verbal"), n: int | None = 25,
                    seed: int = 0, batch_size: int = 64, progress: bool = True,
                    layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Spearman of per-head drops between variants: each template with the default
    prefix, and the first template with an alternative prefix. One row per op and pair."""
    variants: dict[str, pd.DataFrame] = {}
    for t in templates:
        cases = arithmetic_cases(ops, (1,), (t,), n=n, seed=seed)
        variants[f"{t}"] = scan_heads(view, cases, layers=layers, batch_size=batch_size,
                                      progress=progress)
    t0 = templates[0]
    alt = {f"{op}|{t0}": alternative_examples(op, t0) for op in ops}
    cases = arithmetic_cases(ops, (1,), (t0,), n=n, seed=seed, examples=alt)
    variants[f"{t0}+alt-prefix"] = scan_heads(view, cases, layers=layers,
                                              batch_size=batch_size, progress=progress)
    rows = []
    for (na, a), (nb, b) in combinations(variants.items(), 2):
        for op in ops:
            x = a[a["op"] == op].sort_values(["layer", "head"])
            y = b[b["op"] == op].sort_values(["layer", "head"])
            rows.append({"op": op, "a": na, "b": nb, "n_heads": len(x),
                         "spearman_drop": float(spearmanr(x["drop"], y["drop"]).statistic),
                         "spearman_dlogp": float(spearmanr(x["dlogp"], y["dlogp"]).statistic),
                         "top_a": _top(x), "top_b": _top(y)})
    return pd.DataFrame(rows)


def _top(df: pd.DataFrame) -> str:
    r = df.sort_values("drop", ascending=False).iloc[0]
    return f"{int(r['layer'])}.{int(r['head'])}"
