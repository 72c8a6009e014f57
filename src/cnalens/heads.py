"""Head scan: how much accuracy drops when one attention head is zeroed (or mean-ablated).

``scan_heads(view, cases)`` gives one row per (layer, head, op, digits; or the groups of
other labels, ``keys``) with ``acc_orig``,
``acc_ablated``, ``drop`` (absolute, with a paired bootstrap 95% interval over cases),
``drop_rel`` and ``dlogp`` (mean change of the gold first token's log-probability).
The intervention is the paper's: the head's slice of the attention output projection's
input (``z``) is zeroed, at every position; ``method="mean"`` replaces it by its mean
over the dataset instead (``head_means``).

The fast scan gives the same per-case results as the naive loop (one full forward pass
of every batch per head under ``ZeroHeads``), computed with less work:

* several heads per pass: the batch is tiled once per head of one layer, and a hook on
  that layer's ``z`` zeroes head ``h`` in replica ``h`` only;
* layers below the intervened layer are not recomputed: a reference pass records every
  decoder layer's output and ``view.reuse_layers`` returns it (tiled over replicas);
* every token prefix shared by cases is computed once per intervention: the cases of a
  chunk are packed as one token tree (``cnalens.trees``, one node per distinct prefix,
  the few-shot prefix included) and run as one row with a tree attention mask
  (``view.tree_mask``); no padding. Models that cannot take such a mask (an attention
  implementation other than eager/sdpa, or a sliding window they would need per layer
  and do not accept per layer) run right-padded rows after a key/value cache of the
  group's common prefix instead (``tree=False`` forces this);
* logits only at the scored positions (the answer tokens), the scored rows of several
  passes together, reduced a vocabulary tile at a time while the tile is in cache
  (top-2 and an online log-sum-exp, ``_stats_tiled``) instead of whole logit rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnalens.data.cases import Case, Cases, Encoded, Targets, as_encoded
from cnalens.errors import CnaError
from cnalens.evaluate import batches, encode_cases, group_keys
from cnalens.interventions import ReplaceHeads, ZeroHeads
from cnalens.io import _atomic, write_csv, write_json
from cnalens.lens import LogSumExp
from cnalens.models.view import Batch
from cnalens.names import parse_ints, parse_units
from cnalens.progress import track
from cnalens.trees import token_tree

Head = tuple[int, int]
METHODS = ("zero", "mean")
METRICS = ("acc", "acc_first")
MEAN_OVER = ("all", "last")
COLUMNS = ("layer", "head", "op", "digits", "n", "acc_orig", "acc_ablated", "drop",
           "drop_rel", "drop_lo", "drop_hi", "dlogp")
FIELDS = ("correct", "correct_first", "logp", "pred", "margin")
GROUP_BY = ("op", "digits")  # the default grouping (those the cases have); digits pooled on top
RESULTS = frozenset({"layer", "head", "n", "acc_orig", "acc_ablated", "drop", "drop_rel",
                     "drop_lo", "drop_hi", "dlogp", "dlogp_est", "rank", "name"})
OP_RANK = {op: i for i, op in enumerate(["+", "-", "*", "/"])}
LOGIT_CHUNK = 128  # rows of whole logits at a time (the naive loop)
TILE_ROWS = 2048  # rows per vocabulary sweep of the fast scan


def vocab_tile(device) -> int:
    """Vocabulary tile of the fast scan's scoring: cache-sized on CPU, large on GPUs."""
    return 65536 if torch.device(device).type == "cuda" else 4096


# ----------------------------------------------------------------- names and selection
def parse_heads(text: str) -> list[Head]:
    """``"17.22,15.9"`` -> ``[(17, 22), (15, 9)]`` (0-based ``L.H``)."""
    return parse_units(text, "heads")


def parse_layers(text: str) -> list[int]:
    """``"10-17"`` or ``"3,5"`` -> layer indices."""
    return parse_ints(text, "layers")


def select_heads(view, heads: Sequence[Head] | None = None,
                 layers: Sequence[int] | None = None) -> list[Head]:
    """The heads to scan, sorted and unique: ``heads`` if given, else every head of
    ``layers`` (default: all layers). Out-of-range names raise CnaError."""
    if heads is not None:
        out = sorted({(int(a), int(b)) for a, b in heads})
        if not out:
            raise CnaError("no heads to scan")
        view.check_heads(out)
        if layers is not None:
            out = [x for x in out if x[0] in set(layers)]
        return out
    layers = list(range(view.n_layers)) if layers is None else sorted(set(layers))
    if not layers:
        raise CnaError("no layers to scan")
    view.check_layers(layers)
    return [(layer, h) for layer in layers for h in range(view.n_heads)]


# ----------------------------------------------------------------- scoring
@dataclass
class Scan:
    """Per-case results: ``orig[f]`` is (n,), ``ablated[f]`` is (len(heads), n), for each
    field of ``FIELDS`` (correct, correct_first, logp of the first answer token, pred =
    first-token prediction, margin = smallest top-2 logit gap over the scored tokens)."""

    heads: list[Head]
    orig: dict[str, torch.Tensor]
    ablated: dict[str, torch.Tensor]


@dataclass
class _Layout:
    """Where a chunk's scored tokens sit in a (rows, width) batch of its B cases."""

    pos: torch.Tensor  # (N,) flat index into rows * width
    target: torch.Tensor  # (N,)
    case: torch.Tensor  # (N,) case index within the chunk
    first: torch.Tensor  # (N,) bool, the answer's first token
    n: int  # cases in the chunk
    stride: int  # positions per replica (rows * width)


def _layout(items: Sequence[Encoded], width: int, starts: Sequence[int]) -> _Layout:
    """``starts[i]``: index in row i of the position that predicts the first answer token."""
    return _flat_layout(items, [range(i * width + s, i * width + s + len(e.answer_ids))
                                for i, (e, s) in enumerate(zip(items, starts, strict=True))],
                        len(items) * width)


def _flat_layout(items: Sequence[Encoded], where: Sequence[Sequence[int]], stride: int
                 ) -> _Layout:
    """``where[i]``: flat positions predicting case i's answer tokens, in order."""
    pos, tgt, case, first = [], [], [], []
    for i, (e, w) in enumerate(zip(items, where, strict=True)):
        k = len(e.answer_ids)
        pos += w
        tgt += e.answer_ids
        case += [i] * k
        first += [True] + [False] * (k - 1)
    t = torch.as_tensor
    return _Layout(t(pos), t(tgt), t(case), t(first), len(items), stride)


def _stats_full(view, h: torch.Tensor, target: torch.Tensor, first: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pred, top-2 margin) per row and the log-prob of ``target`` at the ``first`` rows,
    from whole logit rows, ``LOGIT_CHUNK`` rows at a time (as the naive loop does it)."""
    preds, margins, logps = [], [], []
    for i in range(0, len(h), LOGIT_CHUNK):
        lg = view.logits(h[i:i + LOGIT_CHUNK]).float()
        top2 = lg.topk(2, -1)
        preds.append(top2.indices[:, 0])
        margins.append(top2.values[:, 0] - top2.values[:, 1])
        f = first[i:i + LOGIT_CHUNK].to(lg.device)  # log-probs at first answer tokens only
        lf = lg[f]
        logps.append(lf.gather(-1, target[i:i + LOGIT_CHUNK][f, None])[:, 0]
                     - torch.logsumexp(lf, -1))
    return torch.cat(preds), torch.cat(margins), torch.cat(logps)


def _stats_tiled(view, h: torch.Tensor, target: torch.Tensor, first: torch.Tensor,
                 tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_stats_full`` a vocabulary tile at a time: every row in one product per tile, the
    top-2 and an online log-sum-exp reduced while the tile is in cache (no whole logit
    rows are ever stored)."""
    order = torch.argsort((~first).to(torch.int8), stable=True)  # first-token rows on top
    k = int(first.sum())
    h, target = h[order], target.to(h.device)[order]
    n, dev = len(h), h.device
    top_v = torch.full((n, 2), float("-inf"), device=dev)
    top_i = torch.zeros((n, 2), dtype=torch.long, device=dev)
    lse = LogSumExp()
    gold = torch.zeros(k, device=dev)
    tk = target[:k]
    for start, lg in view.logit_tiles(h, tile):
        w = lg.shape[1]
        tv, ti = lg.topk(min(2, w), -1)
        top_v, j = torch.cat([top_v, tv], 1).topk(2, -1)
        top_i = torch.cat([top_i, ti + start], 1).gather(1, j)
        if k:
            a = lg[:k]
            loc = tk - start
            inside = (loc >= 0) & (loc < w)
            gold = torch.where(inside, a.gather(1, loc.clamp(0, w - 1)[:, None])[:, 0], gold)
            lse.add(a, top=tv[:k, 0], inplace=True)
    back = torch.empty_like(order)
    back[order] = torch.arange(n, device=order.device)
    back = back.to(dev)
    pred, margin = top_i[back, 0], (top_v[:, 0] - top_v[:, 1])[back]
    total = lse.value if k else torch.zeros(0, device=dev)
    logp = (gold - total)[back[first.to(dev)]]  # first rows, in row order
    return pred, margin, logp


def _rows(hidden: torch.Tensor, lay: _Layout, reps: int = 1) -> torch.Tensor:
    """The hidden states at the scored positions of ``reps`` stacked copies of a chunk."""
    off = torch.arange(reps)[:, None]
    pos = (off * lay.stride + lay.pos[None]).reshape(-1).to(hidden.device)
    return hidden.reshape(-1, hidden.shape[-1])[pos]


def _score(view, hidden: torch.Tensor, lay: _Layout, reps: int = 1,
           tile: int | None = None) -> dict[str, torch.Tensor]:
    """Scores of ``reps`` stacked copies of a chunk: each field (reps, n). Logits only at
    the scored positions, float32 like ``cnalens.evaluate.score_batch``."""
    return _score_rows(view, _rows(hidden, lay, reps), lay, reps, tile)


def _score_rows(view, h: torch.Tensor, lay: _Layout, reps: int = 1,
                tile: int | None = None) -> dict[str, torch.Tensor]:
    """``_score`` from the scored rows (``_rows``); ``tile``: reduce the vocabulary in
    tiles of that many tokens (``_stats_tiled``) instead of whole logit rows."""
    target = lay.target.repeat(reps).to(h.device)
    first = lay.first.repeat(reps)
    if tile:
        parts = [_stats_tiled(view, h[i:i + TILE_ROWS], target[i:i + TILE_ROWS],
                              first[i:i + TILE_ROWS], tile)
                 for i in range(0, len(h), TILE_ROWS)]
        stats = tuple(torch.cat(x) for x in zip(*parts, strict=True))
    else:
        stats = _stats_full(view, h, target, first)
    pred, margin, logp = (x.cpu() for x in stats)
    target = target.cpu()
    case = (torch.arange(reps)[:, None] * lay.n + lay.case[None]).reshape(-1)
    rows = reps * lay.n
    wrong = torch.zeros(rows).index_add_(0, case, (pred != target).float())
    out = {"correct": wrong == 0,
           "margin": torch.full((rows,), float("inf")).scatter_reduce(
               0, case, margin, "amin")}
    fc = case[first]
    out["correct_first"] = torch.zeros(rows, dtype=torch.bool)
    out["correct_first"][fc] = pred[first] == target[first]
    out["logp"] = torch.zeros(rows)
    out["logp"][fc] = logp
    out["pred"] = torch.zeros(rows, dtype=torch.long)
    out["pred"][fc] = pred[first]
    return {k: v.reshape(reps, lay.n) for k, v in out.items()}


def _empty(n: int, reps: int | None = None) -> dict[str, torch.Tensor]:
    shape = (n,) if reps is None else (reps, n)
    types = {"correct": torch.bool, "correct_first": torch.bool, "logp": torch.float32,
             "pred": torch.long, "margin": torch.float32}
    return {k: torch.zeros(shape, dtype=t) for k, t in types.items()}


# ----------------------------------------------------------------- interventions
def head_means(view, enc: Sequence[Encoded], over: str = "all",
               batch_size: int = 64) -> torch.Tensor:
    """Mean output ``z`` of every head over the dataset: (n_layers, n_heads, head_dim).

    ``over="all"``: every real token of every case's input (few-shot prefix included);
    ``"last"``: the position that predicts the first answer token.
    """
    if over not in MEAN_OVER:
        raise CnaError(f"unknown mean position '{over}': use {', '.join(MEAN_OVER)}")
    total = torch.zeros(view.n_layers, view.n_heads * view.head_dim, dtype=torch.float64)
    count = 0
    with torch.inference_mode():
        for idx in batches(enc, batch_size):
            items = [enc[i] for i in idx]
            b = view.batch([e.input_ids for e in items])
            width = b.input_ids.shape[1]
            if over == "all":
                w = b.attention_mask.to(torch.float64)
            else:
                w = torch.zeros(b.input_ids.shape, dtype=torch.float64)
                for i, e in enumerate(items):
                    w[i, width - len(e.input_ids) + len(e.prompt_ids) - 1] = 1
            w = w.to(view.device)
            with view.capture(["z"]) as cache:
                view.hidden(b)
            for layer in range(view.n_layers):
                z = cache[("z", layer)].to(torch.float64)
                total[layer] += torch.einsum("bt,btd->d", w, z).cpu()
            count += float(w.sum())
    return (total / count).to(view.dtype).reshape(view.n_layers, view.n_heads, view.head_dim)


def _single(view, head: Head, means: torch.Tensor | None):
    if means is None:
        return ZeroHeads([head])
    return ReplaceHeads((head,), means[head[0], head[1]][None], label="mean_heads")


def _replica_edit(view, heads: Sequence[int], fill: torch.Tensor | None):
    """z -> z with head ``heads[r]`` zeroed (or set to ``fill[head]``) in replica r."""
    r, nh, hd = len(heads), view.n_heads, view.head_dim
    keep = torch.ones(r, nh, dtype=view.dtype)
    keep[torch.arange(r), torch.as_tensor(heads)] = 0
    add = None if fill is None else ((1 - keep)[:, :, None] * fill[None])[:, None]
    keep = keep[:, None, :, None].to(view.device)
    add = None if add is None else add.to(view.device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(r, -1, nh, hd) * keep
        if add is not None:
            y = y + add
        return y.reshape(x.shape)
    return fn


# ----------------------------------------------------------------- the naive loop
@torch.inference_mode()
def scan_naive(view, enc: Sequence[Encoded], heads: Sequence[Head],
               means: torch.Tensor | None = None, batch_size: int = 64,
               progress: bool = False, label: str = "head scan (naive)") -> Scan:
    """The loop people write: per head, one full forward pass of every batch (left-padded,
    logits at the last positions only) under ``ZeroHeads`` / mean replacement."""
    groups = batches(enc, batch_size)
    runs = [None, *heads]
    res = [_empty(len(enc)) for _ in runs]
    for j, head in enumerate(track(runs, label, show=progress)):
        ivs = [] if head is None else [_single(view, head, means)]
        with view.intervene(*ivs):
            for idx in groups:
                items = [enc[i] for i in idx]
                k = max(len(e.answer_ids) for e in items)
                hidden = view.hidden(view.batch([e.input_ids for e in items]))[:, -k:]
                lay = _layout(items, k, [k - len(e.answer_ids) for e in items])
                out = _score(view, hidden, lay)
                for f in FIELDS:
                    res[j][f][torch.as_tensor(idx)] = out[f][0]
    return Scan(list(heads), res[0], {f: torch.stack([r[f] for r in res[1:]]) for f in FIELDS})


# ----------------------------------------------------------------- the fast scan
@dataclass
class _Chunk:
    """Cases sharing ``prefix`` (P tokens, maybe 0), their suffixes right-padded."""

    idx: list[int]
    prefix: torch.Tensor  # (1, P)
    suffix: torch.Tensor  # (B, S)
    mask: torch.Tensor  # (B, P + S)
    pos: torch.Tensor  # (B, S)
    layout: _Layout


def _prefix_groups(enc: Sequence[Encoded], by_prefix: bool = True) -> list[list[int]]:
    """Case indices grouped by few-shot prefix (one group if not ``by_prefix``)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(enc):
        groups[e.case.prefix if by_prefix else ""].append(i)
    return list(groups.values())


def _chunks(view, enc: Sequence[Encoded], batch_size: int, share_prefix: bool) -> list[_Chunk]:
    """Group cases by their few-shot prefix; P = their longest common token prefix, kept
    shorter than every prompt so each case scores suffix tokens only."""
    out = []
    for idx in _prefix_groups(enc, share_prefix):
        p = min(len(enc[i].prompt_ids) for i in idx) - 1 if share_prefix else 0
        first = enc[idx[0]].prompt_ids
        for i in idx:
            ids = enc[i].prompt_ids
            p = next((j for j in range(p) if ids[j] != first[j]), p)
        idx = sorted(idx, key=lambda i: len(enc[i].input_ids))
        for c in range(0, len(idx), batch_size):
            out.append(_chunk(view, enc, idx[c:c + batch_size], p))
    return out


def _chunk(view, enc: Sequence[Encoded], idx: list[int], p: int) -> _Chunk:
    items = [enc[i] for i in idx]
    tails = [e.input_ids[p:] for e in items]
    s = max(len(t) for t in tails)
    suffix = torch.full((len(items), s), view.pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), p + s), dtype=torch.long)
    mask[:, :p] = 1
    for i, t in enumerate(tails):
        suffix[i, :len(t)] = torch.as_tensor(t)
        mask[i, p:p + len(t)] = 1
    pos = (p + torch.arange(s)).expand(len(items), s)
    lay = _layout(items, s, [len(e.prompt_ids) - 1 - p for e in items])
    prefix = torch.as_tensor(items[0].prompt_ids[:p], dtype=torch.long)[None]
    dev = view.device
    return _Chunk(idx, prefix.to(dev), suffix.to(dev), mask.to(dev), pos.to(dev), lay)


def _tile(x: torch.Tensor, r: int) -> torch.Tensor:
    return x.repeat(r, *([1] * (x.dim() - 1))) if r > 1 else x


class _Runner:
    """Runs one chunk: the reference pass, then passes with heads of one layer ablated."""

    def __init__(self, view, ch: _Chunk, reuse: bool):
        self.view, self.ch, self.reuse = view, ch, reuse
        p = ch.prefix.shape[1]
        self.p = p
        self.prefix_out: list[torch.Tensor] = []
        self.prefix_cache = None
        if p:
            with view.capture(["resid_post"]) as c:
                _, self.prefix_cache = view.run_cached(ch.prefix, torch.ones_like(ch.prefix),
                                                       self._prefix_pos(1))
            self.prefix_out = [c[("resid_post", i)] for i in range(view.n_layers)]
        cache = (view.expand_cache(self.prefix_cache, len(ch.idx)) if p else None)
        with view.capture(["resid_post"]) as c:
            hidden = self._run(ch.suffix, ch.mask, ch.pos, cache)
        self.suffix_out = [c[("resid_post", i)] for i in range(view.n_layers)]
        self.orig = _score(view, hidden, ch.layout, tile=vocab_tile(view.device))

    def _prefix_pos(self, rows: int) -> torch.Tensor:
        return torch.arange(self.p, device=self.view.device).expand(rows, self.p)

    def _run(self, ids, mask, pos, cache):
        if cache is None:
            return self.view.hidden(Batch(ids, mask, pos))
        return self.view.run_cached(ids, mask, pos, cache)[0]

    def ablate(self, layer: int, heads: Sequence[int], fill: torch.Tensor | None):
        view, ch, r = self.view, self.ch, len(heads)
        below = layer if self.reuse else 0
        fn = _replica_edit(view, heads, fill)
        cache = None
        if self.p:  # the prefix once per replica; rows below `below` come from the reference
            with view.edit("z", layer, fn), view.reuse_layers(self.prefix_out, below, r):
                pre = _tile(ch.prefix, r)
                _, c = view.run_cached(pre, torch.ones_like(pre), self._prefix_pos(r))
            cache = view.expand_cache(c, len(ch.idx), self.prefix_cache, below)
        with view.edit("z", layer, fn), view.reuse_layers(self.suffix_out, below, r):
            hidden = self._run(_tile(ch.suffix, r), _tile(ch.mask, r), _tile(ch.pos, r), cache)
        return _rows(hidden, ch.layout, r)


@dataclass
class _TreeChunk:
    """Cases packed as one token tree (``cnalens.trees``): shared prefixes once, no pads."""

    idx: list[int]
    ids: torch.Tensor  # (N,)
    depth: torch.Tensor  # (N,)
    mask: torch.Tensor | dict
    layout: _Layout


def _tree_chunks(view, enc: Sequence[Encoded], batch_size: int) -> list | None:
    """Cases grouped by few-shot prefix, in token order (so a chunk holds whole branches),
    ``batch_size`` a tree; None where the model cannot run trees (``tree_mask``)."""
    out = []
    for idx in _prefix_groups(enc):
        idx = sorted(idx, key=lambda i: enc[i].input_ids)
        for c in range(0, len(idx), batch_size):
            part = idx[c:c + batch_size]
            items = [enc[i] for i in part]
            tree = token_tree([e.input_ids for e in items])
            mask = view.tree_mask(tree)
            if mask is None:
                return None
            where = [path[len(e.prompt_ids) - 1:] for e, path in zip(items, tree.nodes,
                                                                     strict=True)]
            lay = _flat_layout(items, where, len(tree))
            dev = view.device
            out.append(_TreeChunk(part, tree.ids.to(dev), tree.depth.to(dev), mask, lay))
    return out


class _TreeRunner:
    """``_Runner`` for a ``_TreeChunk``: every pass is one row per replica."""

    def __init__(self, view, ch: _TreeChunk, reuse: bool):
        self.view, self.ch, self.reuse = view, ch, reuse
        with view.capture(["resid_post"]) as c:
            hidden = view.run_tree(ch.ids, ch.depth, ch.mask)
        self.out = [c[("resid_post", i)] for i in range(view.n_layers)]
        self.orig = _score(view, hidden, ch.layout, tile=vocab_tile(view.device))

    def ablate(self, layer: int, heads: Sequence[int], fill: torch.Tensor | None):
        view, ch, r = self.view, self.ch, len(heads)
        below = layer if self.reuse else 0
        with view.edit("z", layer, _replica_edit(view, heads, fill)), \
                view.reuse_layers(self.out, below, r):
            hidden = view.run_tree(ch.ids, ch.depth, ch.mask, r)
        return _rows(hidden, ch.layout, r)


@torch.inference_mode()
def scan_fast(view, enc: Sequence[Encoded], heads: Sequence[Head],
              means: torch.Tensor | None = None, batch_size: int = 128,
              heads_per_pass: int | None = None, reuse: bool = True,
              share_prefix: bool = True, tree: bool = True, progress: bool = False,
              label: str = "head scan") -> Scan:
    """The same results as ``scan_naive``, with shared work (module docstring).

    ``batch_size``: cases per chunk; ``heads_per_pass``: replicas per pass (default: all
    heads of a layer); ``label``: the progress bar's. ``reuse``, ``share_prefix`` and
    ``tree`` switch the reuse steps off, for measuring them (``tree=False``: rows after a
    prefix cache).
    """
    by_layer: dict[int, list[int]] = defaultdict(list)
    for j, (layer, _) in enumerate(heads):
        by_layer[layer].append(j)
    r_max = heads_per_pass or view.n_heads
    passes = [(layer, js[i:i + r_max]) for layer, js in sorted(by_layer.items())
              for i in range(0, len(js), r_max)]
    chunks = (_tree_chunks(view, enc, batch_size) if tree and share_prefix else None) \
        or _chunks(view, enc, batch_size, share_prefix)
    make = _TreeRunner if chunks and isinstance(chunks[0], _TreeChunk) else _Runner
    orig, abl = _empty(len(enc)), _empty(len(enc), len(heads))
    work = [(c, ps) for c in range(len(chunks)) for ps in [None, *passes]]
    runner, pending = None, []
    tile = vocab_tile(view.device)

    def flush() -> None:  # score the pending passes' rows together: larger products
        if not pending:
            return
        js = [j for p, _ in pending for j in p]
        out = _score_rows(view, torch.cat([h for _, h in pending]), runner.ch.layout,
                          len(js), tile)
        ix = torch.as_tensor(runner.ch.idx)
        for f in FIELDS:
            abl[f][torch.as_tensor(js)[:, None], ix[None]] = out[f]
        pending.clear()

    for c, ps in track(work, label, show=progress):
        if ps is None:
            flush()
            runner = make(view, chunks[c], reuse)
            for f in FIELDS:
                orig[f][torch.as_tensor(runner.ch.idx)] = runner.orig[f][0]
            continue
        layer, js = ps
        fill = None if means is None else means[layer]
        pending.append((js, runner.ablate(layer, [heads[j][1] for j in js], fill)))
        if sum(len(h) for _, h in pending) >= TILE_ROWS:
            flush()
    flush()
    return Scan(list(heads), orig, abl)


# ----------------------------------------------------------------- the table
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


# ----------------------------------------------------------------- attribution pre-scan
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


def scan_heads_attribution(view, cases: Sequence[Case] | Sequence[Encoded],
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


# ----------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, int]:
    """Start ``torch.distributed`` from the launcher's environment (``torchrun`` or
    ``accelerate launch`` set RANK, WORLD_SIZE, MASTER_ADDR, ...): backend ``nccl`` when
    CUDA is available (each process on ``cuda:LOCAL_RANK``), else ``gloo``. Returns
    (rank, world_size, local_rank); (0, 1, 0) without a launcher. Safe to call twice."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or "RANK" not in os.environ or not dist.is_available():
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def finish_distributed() -> None:
    """Wait for every rank, then tear the process group down (an exit with a live gloo
    group can abort the process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _dist() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------- checkpoints
CHECKPOINT_HEADS = 16  # a checkpoint file holds whole layers, at least this many heads
CHECKPOINT_FILES = 3  # ... and at most about this many files per scan: every file repeats
# the fast scan's reference pass, so fewer files cost less


def scan_key(view, enc: Sequence[Encoded], method: str, metric: str,
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


def _units(heads: Sequence[Head], every: int | None) -> list[list[Head]]:
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


def _load_partial(folder: Path, n: int) -> list[Scan]:
    """The unit files of an interrupted scan (unreadable ones are skipped)."""
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


def _save_partial(folder: Path, scan: Scan) -> None:
    name = "layers_" + "-".join(str(x) for x in sorted({h[0] for h in scan.heads})) + ".pt"
    data = {"heads": [list(h) for h in scan.heads], "orig": scan.orig,
            "ablated": scan.ablated}
    _atomic(folder / name, lambda p: torch.save(data, p))


def _merge(parts: Sequence[Scan], heads: Sequence[Head], n: int) -> Scan:
    """One Scan over ``heads`` from parts that cover them (in any order)."""
    where = {h: (p, i) for p in parts for i, h in enumerate(p.heads)}
    abl = _empty(n, len(heads))
    for j, h in enumerate(heads):
        p, i = where[h]
        for f in FIELDS:
            abl[f][j] = p.ablated[f][i]
    return Scan(list(heads), parts[0].orig, abl)


# ----------------------------------------------------------------- entry point
def scan_heads(view, cases: Cases, heads: Sequence[Head] | None = None, method: str = "zero",
               metric: str = "acc", batch_size: int = 128, progress: bool = True,
               fast: bool = True, layers: Sequence[int] | None = None,
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
    rank, world = _dist()
    folder = None
    if checkpoint is not None:
        folder = Path(checkpoint) / scan_key(view, enc, method, metric, mean_over)
        if rank == 0 and not resume and folder.exists():
            shutil.rmtree(folder)
    loaded = []
    if folder is not None and resume and rank == 0:
        want = set(chosen)
        loaded = [s for s in _load_partial(folder, len(enc)) if set(s.heads) <= want]
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
    units = _units(todo, every if folder is not None else None)
    for i, unit in enumerate(units):  # one bar per checkpointed group of layers
        label = "head scan" if len(units) == 1 else (
            f"head scan, part {i + 1}/{len(units)}: layers {unit[0][0]}-{unit[-1][0]}")
        if fast:
            part = scan_fast(view, enc, unit, means, batch_size, heads_per_pass,
                             progress=show, label=label)
        else:
            part = scan_naive(view, enc, unit, means, batch_size, show, label=label)
        if folder is not None:
            _save_partial(folder, part)
        parts.append(part)
    if world > 1:
        every = [None] * world if rank == 0 else None
        dist.gather_object(parts, every, dst=0)
        parts = [p for ps in every for p in ps] if rank == 0 else []
    df = None
    if rank == 0:
        df = head_table(_merge(loaded + parts, chosen, len(enc)), enc, metric, keys=keys)
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
