"""Attribution patching: every head's first-order zeroing effect from one forward and one
backward pass per batch, a cheap pre-scan to confirm with the exact scan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cnalens.data.cases import Case, Encoded, as_encoded
from cnalens.evaluate import batches
from cnalens.heads.selection import Head, select_heads
from cnalens.heads.table import case_groups, group_columns, panel_columns, pooled
from cnalens.io import write_csv, write_json
from cnalens.progress import track

if TYPE_CHECKING:
    from cnalens.models import ModelView


def _attribution_batch(view, items: Sequence[Encoded]) -> torch.Tensor:
    """First-order estimate of each head's zeroing effect on the gold first token's
    log-prob, per case: ``sum_t (0 - z_h,t) . d logp / d z_h,t`` -> (B, layers, heads)."""
    from contextlib import ExitStack

    zs: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}

    def keep(layer):
        def fn(x):  # z + 0: d logp / d delta is d logp / d z, through every later path
            zs[layer] = x.detach()
            deltas[layer] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[layer]
        return fn

    k = max(len(e.answer_ids) for e in items)
    b = view.batch([e.input_ids for e in items])
    rows = torch.arange(len(items), device=view.device)
    first = torch.as_tensor([k - len(e.answer_ids) for e in items], device=view.device)
    gold = torch.as_tensor([e.answer_ids[0] for e in items], device=view.device)
    layers = range(view.n_layers)
    with torch.enable_grad(), ExitStack() as stack:
        for layer in layers:
            stack.enter_context(view.edit("z", layer, keep(layer)))
        hidden = view.hidden(b)[:, -k:][rows, first]
        logp = torch.log_softmax(view.logits(hidden).float(), -1)[rows, gold]
        grads = torch.autograd.grad(logp.sum(), [deltas[layer] for layer in layers])
    mask = b.attention_mask[:, :, None, None].to(view.dtype)
    out = []
    for layer in layers:
        z = zs[layer].reshape(*b.input_ids.shape, view.n_heads, view.head_dim)
        out.append(-(z * grads[layer].reshape(z.shape) * mask).sum((1, 3)))
    return torch.stack(out, 1).float().cpu()


def scan_heads_attribution(view: ModelView, cases: Sequence[Case] | Sequence[Encoded],
                           batch_size: int = 32, progress: bool = True,
                           heads: Sequence[Head] | None = None,
                           layers: Sequence[int] | None = None,
                           keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Attribution patching: every head's estimated ``dlogp`` from one forward and one
    backward pass per batch (columns layer, head, the groups of ``keys`` as in
    ``head_table``, n, dlogp_est). A cheap pre-scan for large models; confirm its top
    heads with ``scan_heads``. The passes estimate every head at once; ``heads``/``layers``
    select the rows kept."""
    keep = select_heads(view, heads, layers)
    enc = as_encoded(view.tokenizer, cases)
    est = torch.zeros(len(enc), view.n_layers, view.n_heads)
    for idx in track(batches(enc, batch_size), "attribution", show=progress):
        est[torch.as_tensor(idx)] = _attribution_batch(view, [enc[i] for i in idx])
    labels = case_groups(enc, keys)
    keys = list(labels.columns)
    layer, head = np.meshgrid(np.arange(view.n_layers), np.arange(view.n_heads),
                              indexing="ij")
    parts = [pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(),
                           **dict(zip(keys, vals, strict=True)), "n": len(g),
                           "dlogp_est": est[list(g.index)].mean(0).numpy().ravel()})
             for vals, g in labels.groupby(keys, sort=True, dropna=False)]
    df = pd.concat(parts, ignore_index=True)
    if len(keep) < view.n_layers * view.n_heads:
        rows = pd.MultiIndex.from_frame(df[["layer", "head"]]).isin(keep)
        df = df[rows].reset_index(drop=True)
    return df


def attribution_summary(att: pd.DataFrame, exact: pd.DataFrame | None = None,
                        k: int = 10) -> dict:
    """The attribution pre-scan's top ``k`` heads per group (``panel_columns``: op on
    arithmetic; most negative estimated ``dlogp`` first, digits pooled by n) and, given an
    exact scan (``heads.csv``) of the same cases and groups, the Spearman correlation of
    the estimate with its ``dlogp`` and ``drop`` per group over the heads both scanned."""
    from scipy.stats import spearmanr

    panel = panel_columns(att)

    def groups(frame):
        return (frame.groupby(panel, sort=True, dropna=False) if panel else [((), frame)])

    g = pooled(att, "dlogp_est").sort_values([*panel, "dlogp_est", "layer", "head"],
                                             kind="stable")
    top = [{**dict(zip(panel, vals, strict=True)), "rank": i + 1,
            "name": f"{r.layer}.{r.head}", "layer": int(r.layer),
            "head": int(r.head), "dlogp_est": float(r.dlogp_est)}
           for vals, grp in groups(g) for i, r in enumerate(grp.head(k).itertuples())]
    agree = []
    if (exact is not None and len(exact)
            and set(group_columns(exact)) == set(group_columns(att))):
        keys = ["layer", "head", *group_columns(att)]
        m = att.merge(exact[[*keys, "dlogp", "drop"]], on=keys)
        for vals, grp in groups(m):
            if len(grp) < 3:
                continue
            agree.append({**dict(zip(panel, vals, strict=True)), "n_heads": int(len(grp)),
                          "spearman_dlogp": float(spearmanr(grp["dlogp_est"],
                                                            grp["dlogp"]).statistic),
                          "spearman_drop": float(spearmanr(-grp["dlogp_est"],
                                                           grp["drop"]).statistic)})
    return {"top": top, "vs_exact": agree}


def write_attribution(dir: Path, att: pd.DataFrame, meta: dict, k: int = 10) -> dict:
    """``DIR/heads_attribution.csv`` and ``.json`` (top heads; Spearman against
    ``DIR/heads.csv`` when an exact scan is there), atomically; ``heads.csv`` is left as
    it is. Returns the summary."""
    path = Path(dir) / "heads.csv"
    exact = pd.read_csv(path, dtype={"op": str}) if path.is_file() else None
    summary = attribution_summary(att, exact, k)
    write_csv(Path(dir) / "heads_attribution.csv", att)
    write_json(Path(dir) / "heads_attribution.json", {**meta, **summary})
    return summary
