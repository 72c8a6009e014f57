"""Checkpoints of a head scan: partial results saved as groups of whole layers finish,
under a fingerprint of what they depend on, and loaded again to resume."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cnalens.data.cases import Encoded
from cnalens.heads.scan import Scan
from cnalens.heads.selection import Head
from cnalens.io import write_with

if TYPE_CHECKING:
    from cnalens.models import ModelView


def scan_key(view: ModelView, enc: Sequence[Encoded], method: str, metric: str,
             mean_over: str | None = None) -> str:
    """Fingerprint of what a scan's partial results depend on: the model, the cases
    (ids and tokens), the method and the metric."""
    s = view.summary()
    model = {k: s.get(k) for k in ("spec", "model_type", "n_layers", "n_heads", "head_dim",
                                   "d_model", "vocab_size", "n_params", "dtype")}
    blob = json.dumps({"model": model, "method": method, "metric": metric,
                       "mean_over": mean_over if method == "mean" else None,
                       "cases": [[e.case.case_id, list(e.prompt_ids), list(e.answer_ids)]
                                 for e in enc]}, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def layer_groups(heads: Sequence[Head], every: int | None) -> list[list[Head]]:
    """Heads grouped by whole layers, at least ``every`` heads per group (None: one group)."""
    if not heads:
        return []
    if every is None:
        return [list(heads)]
    out: list[list[Head]] = [[]]
    for layer in sorted({h[0] for h in heads}):
        if len(out[-1]) >= every:
            out.append([])
        out[-1] += [h for h in heads if h[0] == layer]
    return out


def load_partial(folder: Path, n: int) -> list[Scan]:
    """The group files (``save_partial``) of an interrupted scan over ``n`` cases in
    ``folder`` (unreadable ones are skipped)."""
    out = []
    for f in sorted(folder.glob("layers_*.pt")):
        try:
            d = torch.load(f, weights_only=True)
            scan = Scan([tuple(h) for h in d["heads"]], d["orig"], d["ablated"])
        except Exception:  # noqa: BLE001 - a damaged partial file is recomputed
            continue
        if len(scan.orig["correct"]) == n:
            out.append(scan)
    return out


def save_partial(folder: Path, scan: Scan) -> None:
    """``folder/layers_<layers>.pt``: one finished group of whole layers, atomically."""
    name = "layers_" + "-".join(str(x) for x in sorted({h[0] for h in scan.heads})) + ".pt"
    data = {"heads": [list(h) for h in scan.heads], "orig": scan.orig,
            "ablated": scan.ablated}
    write_with(folder / name, lambda p: torch.save(data, p))
