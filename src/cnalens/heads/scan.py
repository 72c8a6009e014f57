"""The two scan engines: per-case results with one head at a time zeroed (or replaced by
its mean output).

``scan_naive`` is the loop people write (one full forward pass of every batch per head
under ``ZeroHeads``). ``scan_fast`` gives the same per-case results with less work:

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

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cnalens.data.cases import Encoded
from cnalens.errors import CnaError
from cnalens.evaluate import batches
from cnalens.heads.selection import Head
from cnalens.interventions import ReplaceHeads, ZeroHeads
from cnalens.lens import LogSumExp
from cnalens.models.view import Batch
from cnalens.progress import track
from cnalens.trees import token_tree

if TYPE_CHECKING:
    from cnalens.models import ModelView

FIELDS = ("correct", "correct_first", "logp", "pred", "margin")
MEAN_OVER = ("all", "last")
LOGIT_CHUNK = 128  # rows of whole logits at a time (the naive loop)
TILE_ROWS = 2048  # rows per vocabulary sweep of the fast scan


def vocab_tile(device: torch.device | str) -> int:
    """Vocabulary tile of the fast scan's scoring: cache-sized on CPU, large on GPUs."""
    return 65536 if torch.device(device).type == "cuda" else 4096



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
class Layout:
    """Where a chunk's scored tokens sit in a (rows, width) batch of its B cases."""

    pos: torch.Tensor  # (N,) flat index into rows * width
    target: torch.Tensor  # (N,)
    case: torch.Tensor  # (N,) case index within the chunk
    first: torch.Tensor  # (N,) bool, the answer's first token
    n: int  # cases in the chunk
    stride: int  # positions per replica (rows * width)


def answer_layout(items: Sequence[Encoded], width: int, starts: Sequence[int]) -> Layout:
    """Where the answer tokens of ``items`` are scored in a (len(items), width) batch.
    ``starts[i]``: index in row i of the position that predicts the first answer token."""
    return _flat_layout(items, [range(i * width + s, i * width + s + len(e.answer_ids))
                                for i, (e, s) in enumerate(zip(items, starts, strict=True))],
                        len(items) * width)


def _flat_layout(items: Sequence[Encoded], where: Sequence[Sequence[int]], stride: int
                 ) -> Layout:
    """``where[i]``: flat positions predicting case i's answer tokens, in order."""
    pos, tgt, case, first = [], [], [], []
    for i, (e, w) in enumerate(zip(items, where, strict=True)):
        k = len(e.answer_ids)
        pos += w
        tgt += e.answer_ids
        case += [i] * k
        first += [True] + [False] * (k - 1)
    t = torch.as_tensor
    return Layout(t(pos), t(tgt), t(case), t(first), len(items), stride)


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


def _rows(hidden: torch.Tensor, lay: Layout, reps: int = 1) -> torch.Tensor:
    """The hidden states at the scored positions of ``reps`` stacked copies of a chunk."""
    off = torch.arange(reps)[:, None]
    pos = (off * lay.stride + lay.pos[None]).reshape(-1).to(hidden.device)
    return hidden.reshape(-1, hidden.shape[-1])[pos]


def score_answers(view: ModelView, hidden: torch.Tensor, lay: Layout, reps: int = 1,
                  tile: int | None = None) -> dict[str, torch.Tensor]:
    """Scores of ``reps`` stacked copies of a chunk (hidden states laid out as ``lay``
    says): each field of ``FIELDS`` (reps, n). Logits only at the scored positions,
    float32 like ``cnalens.evaluate.score_batch``."""
    return _score_rows(view, _rows(hidden, lay, reps), lay, reps, tile)


def _score_rows(view, h: torch.Tensor, lay: Layout, reps: int = 1,
                tile: int | None = None) -> dict[str, torch.Tensor]:
    """``score_answers`` from the scored rows (``_rows``); ``tile``: reduce the vocabulary in
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


def empty_results(n: int, reps: int | None = None) -> dict[str, torch.Tensor]:
    """Zeroed per-case results, each field of ``FIELDS`` (n,) or (reps, n)."""
    shape = (n,) if reps is None else (reps, n)
    types = {"correct": torch.bool, "correct_first": torch.bool, "logp": torch.float32,
             "pred": torch.long, "margin": torch.float32}
    return {k: torch.zeros(shape, dtype=t) for k, t in types.items()}



# ----------------------------------------------------------------- interventions
def head_means(view: ModelView, enc: Sequence[Encoded], over: str = "all",
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
def scan_naive(view: ModelView, enc: Sequence[Encoded], heads: Sequence[Head],
               means: torch.Tensor | None = None, batch_size: int = 64,
               progress: bool = False, label: str = "head scan (naive)") -> Scan:
    """The loop people write: per head, one full forward pass of every batch (left-padded,
    logits at the last positions only) under ``ZeroHeads`` / mean replacement."""
    groups = batches(enc, batch_size)
    runs = [None, *heads]
    res = [empty_results(len(enc)) for _ in runs]
    for j, head in enumerate(track(runs, label, show=progress)):
        ivs = [] if head is None else [_single(view, head, means)]
        with view.intervene(*ivs):
            for idx in groups:
                items = [enc[i] for i in idx]
                k = max(len(e.answer_ids) for e in items)
                hidden = view.hidden(view.batch([e.input_ids for e in items]))[:, -k:]
                lay = answer_layout(items, k, [k - len(e.answer_ids) for e in items])
                out = score_answers(view, hidden, lay)
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
    layout: Layout


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
    lay = answer_layout(items, s, [len(e.prompt_ids) - 1 - p for e in items])
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
        self.orig = score_answers(view, hidden, ch.layout, tile=vocab_tile(view.device))

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
    layout: Layout


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
        self.orig = score_answers(view, hidden, ch.layout, tile=vocab_tile(view.device))

    def ablate(self, layer: int, heads: Sequence[int], fill: torch.Tensor | None):
        view, ch, r = self.view, self.ch, len(heads)
        below = layer if self.reuse else 0
        with view.edit("z", layer, _replica_edit(view, heads, fill)), \
                view.reuse_layers(self.out, below, r):
            hidden = view.run_tree(ch.ids, ch.depth, ch.mask, r)
        return _rows(hidden, ch.layout, r)


@torch.inference_mode()
def scan_fast(view: ModelView, enc: Sequence[Encoded], heads: Sequence[Head],
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
    orig, abl = empty_results(len(enc)), empty_results(len(enc), len(heads))
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


def merge_scans(parts: Sequence[Scan], heads: Sequence[Head], n: int) -> Scan:
    """One Scan over ``heads`` from parts that cover them (in any order)."""
    where = {h: (p, i) for p in parts for i, h in enumerate(p.heads)}
    abl = empty_results(n, len(heads))
    for j, h in enumerate(heads):
        p, i = where[h]
        for f in FIELDS:
            abl[f][j] = p.ablated[f][i]
    return Scan(list(heads), parts[0].orig, abl)
