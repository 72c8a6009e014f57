"""Head scan: how much accuracy drops when one attention head is zeroed (or mean-ablated).

``scan_heads(view, cases)`` gives one row per (layer, head, op, digits; or the groups of
other labels, ``keys``) with ``acc_orig``,
``acc_ablated``, ``drop`` (absolute, with a paired bootstrap 95% interval over cases),
``drop_rel`` and ``dlogp`` (mean change of the gold first token's log-probability).
The intervention is the paper's: the head's slice of the attention output projection's
input (``z``) is zeroed, at every position; ``method="mean"`` replaces it by its mean
over the dataset instead (``head_means``).

The package, by job:

* :mod:`cnalens.heads.selection`: ``L.H`` names, layer ranges, the heads to scan;
* :mod:`cnalens.heads.scan`: the two engines (``scan_naive``, the loop people write,
  and ``scan_fast``, the same per-case results with shared work) and their ``Scan``;
* :mod:`cnalens.heads.table`: the heads table (``head_table``, ``pooled``,
  ``top_heads``, grouping, bootstrap);
* :mod:`cnalens.heads.attribution`: the first-order attribution pre-scan;
* :mod:`cnalens.heads.distributed`: sharding over ``torch.distributed`` processes;
* :mod:`cnalens.heads.checkpoints`: partial results, to resume an interrupted scan;
* here: ``scan_heads``, the entry point that puts them together, and ``write_heads``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cnalens.data.cases import Cases, Targets
from cnalens.errors import CnaError
from cnalens.evaluate import encode_cases
from cnalens.heads.attribution import (
    attribution_summary,
    scan_heads_attribution,
    write_attribution,
)
from cnalens.heads.checkpoints import layer_groups, load_partial, save_partial, scan_key
from cnalens.heads.distributed import finish_distributed, init_distributed, rank_world
from cnalens.heads.scan import (
    FIELDS,
    LOGIT_CHUNK,
    MEAN_OVER,
    TILE_ROWS,
    Layout,
    Scan,
    answer_layout,
    empty_results,
    head_means,
    merge_scans,
    scan_fast,
    scan_naive,
    score_answers,
    vocab_tile,
)
from cnalens.heads.selection import Head, parse_heads, parse_layers, select_heads
from cnalens.heads.table import (
    COLUMNS,
    GROUP_BY,
    METRICS,
    OP_RANK,
    RESULTS,
    case_groups,
    group_columns,
    head_table,
    panel_columns,
    pooled,
    top_heads,
)
from cnalens.io import write_csv, write_json

if TYPE_CHECKING:
    from cnalens.models import ModelView

METHODS = ("zero", "mean")
CHECKPOINT_HEADS = 16  # a checkpoint file holds whole layers, at least this many heads
CHECKPOINT_FILES = 3  # ... and at most about this many files per scan: every file repeats
# the fast scan's reference pass, so fewer files cost less


# ----------------------------------------------------------------- entry point
def scan_heads(view: ModelView, cases: Cases, heads: Sequence[Head] | None = None,
               method: str = "zero", metric: str = "acc", batch_size: int = 128,
               progress: bool = True, fast: bool = True, layers: Sequence[int] | None = None,
               mean_over: str = "all", heads_per_pass: int | None = None,
               checkpoint: Path | None = None, resume: bool = False,
               keys: Sequence[str] | None = None, targets: Targets = None) -> pd.DataFrame:
    """Scan heads (all, those of ``layers``, or ``heads``) and tabulate (``COLUMNS``; the
    groups of ``keys``, default op and digits: ``head_table``). ``cases`` may be prompt
    strings with ``targets`` (``evaluate.encode_cases``).

    ``method``: ``zero`` (the paper's) or ``mean`` (the head's mean ``z`` over the
    dataset, ``mean_over`` = all positions or the last prompt position; ``head_means``).
    ``metric``: ``acc`` or ``acc_first``. ``fast=False`` runs the naive loop (same
    numbers, slower). ``df.attrs["meta"]`` says what was run.

    ``checkpoint``: a folder for partial results, written atomically as groups of whole
    layers (``CHECKPOINT_HEADS``) finish, under a fingerprint of model, cases, method and
    metric (``scan_key``); ``resume=True`` loads the groups already done instead of
    recomputing them (otherwise the fingerprint's old partial results are discarded).
    Under ``torch.distributed`` (``init_distributed``) each process scans every
    world-size-th layer still to do; the results are gathered on rank 0 and every rank
    returns the same table.
    """
    import torch.distributed as dist

    if method not in METHODS:
        raise CnaError(f"unknown method '{method}': use {', '.join(METHODS)}")
    if metric not in METRICS:
        raise CnaError(f"unknown metric '{metric}': use {', '.join(METRICS)}")
    chosen = select_heads(view, heads, layers)
    enc = encode_cases(view, cases, targets)
    rank, world = rank_world()
    folder = None
    if checkpoint is not None:
        folder = Path(checkpoint) / scan_key(view, enc, method, metric, mean_over)
        if rank == 0 and not resume and folder.exists():
            shutil.rmtree(folder)
    loaded = []
    if folder is not None and resume and rank == 0:
        want = set(chosen)
        loaded = [s for s in load_partial(folder, len(enc)) if set(s.heads) <= want]
    done = {h for s in loaded for h in s.heads}
    if world > 1:
        box = [sorted(done)]
        dist.broadcast_object_list(box, src=0)
        done = set(box[0])
    todo = [h for h in chosen if h not in done]
    mine = sorted({h[0] for h in todo})[rank::world]
    todo = [h for h in todo if h[0] in mine]
    show = progress and rank == 0
    means = head_means(view, enc, mean_over) if method == "mean" and todo else None
    parts = []
    every = max(CHECKPOINT_HEADS, -(-len(todo) // CHECKPOINT_FILES))
    units = layer_groups(todo, every if folder is not None else None)
    for i, unit in enumerate(units):  # one bar per checkpointed group of layers
        label = "head scan" if len(units) == 1 else (
            f"head scan, part {i + 1}/{len(units)}: layers {unit[0][0]}-{unit[-1][0]}")
        if fast:
            part = scan_fast(view, enc, unit, means, batch_size, heads_per_pass,
                             progress=show, label=label)
        else:
            part = scan_naive(view, enc, unit, means, batch_size, show, label=label)
        if folder is not None:
            save_partial(folder, part)
        parts.append(part)
    if world > 1:
        every = [None] * world if rank == 0 else None
        dist.gather_object(parts, every, dst=0)
        parts = [p for ps in every for p in ps] if rank == 0 else []
    df = None
    if rank == 0:
        df = head_table(merge_scans(loaded + parts, chosen, len(enc)), enc, metric, keys=keys)
        df.attrs["meta"] = {"method": method, "metric": metric, "n_cases": len(enc),
                            "n_heads": len(chosen), "mean_over": mean_over if method == "mean"
                            else None, "fast": fast, "position": "all",
                            "resumed_heads": len(done), "processes": world}
    if world > 1:
        box = [df]
        dist.broadcast_object_list(box, src=0)
        df = box[0]
    return df


def write_heads(dir: Path, df: pd.DataFrame, meta: dict, top_k: int = 10) -> None:
    """``DIR/heads.csv`` (the table) and ``DIR/heads.json`` (meta, top heads), atomically."""
    top = top_heads(df, top_k)
    write_csv(Path(dir) / "heads.csv", df)
    write_json(Path(dir) / "heads.json", {**df.attrs.get("meta", {}), **meta, "top_k": top_k,
                                          "top": top.to_dict("records")})



__all__ = [
    "CHECKPOINT_FILES", "CHECKPOINT_HEADS", "COLUMNS", "FIELDS", "GROUP_BY", "LOGIT_CHUNK",
    "MEAN_OVER", "METHODS", "METRICS", "OP_RANK", "RESULTS", "TILE_ROWS", "Head", "Layout",
    "Scan", "answer_layout", "attribution_summary", "case_groups", "empty_results",
    "finish_distributed", "group_columns", "head_means", "head_table", "init_distributed",
    "layer_groups", "load_partial", "merge_scans", "panel_columns", "parse_heads",
    "parse_layers", "pooled", "rank_world", "save_partial", "scan_fast", "scan_heads",
    "scan_heads_attribution", "scan_key", "scan_naive", "score_answers", "select_heads",
    "top_heads", "vocab_tile", "write_attribution", "write_heads",
]
