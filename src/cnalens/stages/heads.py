"""The head-scan stage: every head zeroed (or mean-ablated), DIR/heads.csv and heads.json."""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cnalens.data.cases import Case, encode_all
from cnalens.evaluate import group_keys
from cnalens.stages import now

if TYPE_CHECKING:
    from cnalens.models import ModelView


def heads_stage(view: ModelView, cases: list[Case], out: Path, settings: dict,
                method: str = "zero", metric: str = "acc",
                heads: Sequence[tuple[int, int]] | None = None,
                layers: Sequence[int] | None = None, batch_size: int = 64,
                progress: bool = True, resume: bool = False,
                group_by: str | list[str] | None = None) -> pd.DataFrame:
    """Zero (or mean-ablate) every head, measure the accuracy drop; heads.csv/.json.
    Rows per group of ``group_by`` (default: op and digits where the cases have them;
    recorded as settings ``group_by``).

    Partial results go to ``DIR/heads.partial`` as they are computed (``resume=True``
    picks them up) and are removed when the stage completes. Under ``torch.distributed``
    the scan is sharded over the processes and only rank 0 writes."""
    import shutil

    from cnalens.heads import (
        GROUP_BY,
        rank_world,
        scan_heads,
        scan_heads_attribution,
        write_attribution,
        write_heads,
    )

    t0 = time.perf_counter()
    rank = rank_world()[0]
    keys = group_keys(cases, group_by, GROUP_BY)
    settings = {**settings, "group_by": keys}
    enc = encode_all(view.tokenizer, cases)
    partial = Path(out) / "heads.partial"
    if method == "attribution":  # an estimate: its own files, an exact heads.csv is kept
        df = scan_heads_attribution(view, enc, batch_size=batch_size,
                                    progress=progress and rank == 0, heads=heads,
                                    layers=layers, keys=keys)
        if rank == 0:
            write_attribution(out, df, {
                "stage": "heads_attribution", "model": view.summary(), "settings": settings,
                "n_cases": len(enc), "method": method,
                "seconds": round(time.perf_counter() - t0, 2), "finished": now()})
        return df
    df = scan_heads(view, enc, heads=heads, layers=layers, method=method, metric=metric,
                    batch_size=batch_size, progress=progress, checkpoint=partial,
                    resume=resume, keys=keys)
    if rank == 0:
        write_heads(out, df, {"stage": "heads", "model": view.summary(), "settings": settings,
                              "n_cases": len(enc), "method": method, "metric": metric,
                              "seconds": round(time.perf_counter() - t0, 2),
                              "finished": now()})
        shutil.rmtree(partial, ignore_errors=True)
    return df


def top_head_per_op(heads: pd.DataFrame, ops: Iterable[Hashable], by: tuple[str, ...] = ("op",)
                    ) -> dict:
    """Each operation's head with the largest accuracy drop (digits pooled). ``by``: the
    group columns ``ops`` name, one value each (a tuple of values for several columns)."""
    from cnalens.heads import top_heads

    top = top_heads(heads, 1)
    if any(c not in top.columns for c in by):
        return {}
    out = {}
    for op in ops:
        vals = op if isinstance(op, tuple) else (op,)
        hit = pd.Series(True, index=top.index)
        for c, v in zip(by, vals, strict=True):
            hit &= top[c].astype(str) == str(v)
        row = top[hit]
        if len(row):
            out[op] = (int(row["layer"].iloc[0]), int(row["head"].iloc[0]))
    return out
