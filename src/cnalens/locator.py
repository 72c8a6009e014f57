"""The zero-shot locator of hidden-interpretable shallow FFN neurons (paper, step 4).

Every FFN neuron of the shallow layers (below the arithmetic head's layer ``Lh``) is
passed through the attention value/output circuit of each layer above it up to ``Lh``
(``transforms="all"``; ``"head"``: the head's layer ``Lh`` only), projected through the
final norm and unembedding (:mod:`cnalens.vocab`), and its top-``k`` tokens (k = 50) are
matched against the concept lexicon (:mod:`cnalens.data.lexicon`). A neuron's
``matches`` is its best count over the transforms (``transform_layer`` records which,
the lowest on ties). Neurons with at least M matches form a set; each set is zeroed
(every position) and the accuracy drop on arithmetic cases is compared with random sets
of the same size drawn from the same layers with the same per-layer counts, several seeds.
A null distribution calibrates M: the counts of random Gaussian directions, rescaled to
the norms of the layer's neurons, put through the same transforms.

Which direction a neuron writes: its value vector as the residual stream sees it (for
Gemma 2/3, times the post-FFN norm's gain: :func:`neuron_vectors`), with the coefficient
taken positive (``sign="pos"``, the default), negative, or either (``"both"``: the better
side counts). Scales are irrelevant to the ranking (every transform is linear once its
norm scales are frozen), so the locator uses unit scales.

Speed, exactly: the top-k over 262k tokens of tens of thousands of vectors is the cost.
A concept token can be in a vector's top-k only if its logit reaches the k-th largest
logit over ANY subset of the vocabulary (a lower bound on the true k-th). One product with
a subset (the concept tokens plus the ``bound_tokens`` tokens most likely to rank high
for the batch: :class:`ConceptCounter`) gives that bound and every concept logit; only
vectors with at least one concept token above it (candidates) get the full-vocabulary
top-k. The counts are exact (tested against
brute force).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from cnalens.data.lexicon import ConceptTable, concept_table
from cnalens.errors import CnaError
from cnalens.lens import neuron_vectors
from cnalens.progress import track
from cnalens.vocab import SIGNS, lens_vectors, topk_lens, transform

if TYPE_CHECKING:
    from cnalens.data.cases import Encoded
    from cnalens.models import ModelView

TRANSFORMS = ("all", "head")


@dataclass(frozen=True)
class LocatorSettings:
    """How the locator runs; ``quick`` and ``full`` are the main job's profiles."""

    top_tokens: int = 50
    ms: tuple[int, ...] = (1, 2, 3)
    transforms: str = "all"
    sign: str = "pos"
    seeds: int = 3
    null_per_layer: int = 512
    bound_tokens: int = 32768
    seed: int = 0

    def check(self) -> LocatorSettings:
        if self.transforms not in TRANSFORMS:
            raise CnaError(f"unknown transforms '{self.transforms}': use all or head")
        if self.sign not in SIGNS:
            raise CnaError(f"unknown sign '{self.sign}': use {', '.join(SIGNS)}")
        if self.top_tokens < 1:
            raise CnaError("top_tokens must be at least 1")
        if not self.ms or min(self.ms) < 1:
            raise CnaError("m: thresholds must be at least 1")
        if self.seeds < 1:
            raise CnaError("seeds must be at least 1")
        return self


PRESETS = {
    "quick": LocatorSettings(transforms="head", seeds=2, null_per_layer=128),
    "full": LocatorSettings(transforms="all", seeds=5, null_per_layer=2048),
    "smoke": LocatorSettings(ms=(1, 2), transforms="head", seeds=1, null_per_layer=16,
                             bound_tokens=4096),  # the main job's stage: one layer only
}


def transform_layers(layer: int, head_layer: int, mode: str) -> list[int]:
    """The attention layers that transform a neuron of ``layer`` (below ``head_layer``)."""
    return list(range(layer + 1, head_layer + 1)) if mode == "all" else [head_layer]


class ConceptCounter:
    """Exact concept counts among the top-k tokens of lens vectors (module doc: bound).

    The bound's subset is chosen per batch: the concept tokens plus the ``bound_tokens``
    tokens of largest second moment of their logits over the batch (``w^T E[x x^T] w``,
    from the top ``rank`` eigenvectors), the tokens most likely to rank high."""

    def __init__(self, view: ModelView, table: ConceptTable, k: int = 50, bound_tokens: int = 32768,
                 rank: int = 64):
        self.view, self.table, self.k = view, table, k
        self.W = view.unembed.weight.detach()
        self.concepts = table.ids().to(self.W.device)
        self.bound_tokens, self.rank = bound_tokens, rank
        self.stats = {"vectors": 0, "candidates": 0}

    def _subset(self, X: torch.Tensor) -> torch.Tensor:
        W = self.W
        if self.bound_tokens >= W.shape[0]:
            return torch.arange(W.shape[0], device=W.device)
        M = X.T @ X / X.shape[0]
        e, U = torch.linalg.eigh(M)
        r = min(self.rank, e.numel())
        B = U[:, -r:] * e[-r:].clamp(min=0).sqrt()
        q = (W.to(X.dtype) @ B).pow(2).sum(-1)
        return torch.unique(torch.cat([self.concepts, q.topk(self.bound_tokens).indices]))

    @torch.no_grad()
    def count(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(counts (n,), candidate rows (c,), their exact top-k ids (c, k))``."""
        n = X.shape[0]
        counts = torch.zeros(n, dtype=torch.long)
        none = torch.zeros(0, dtype=torch.long), torch.zeros(0, self.k, dtype=torch.long)
        if self.concepts.numel() == 0 or n == 0:
            return (counts, *none)
        subset = self._subset(X)
        at = torch.searchsorted(subset, self.concepts)  # concept columns in the subset
        P = X @ self.W[subset].to(X.dtype).T
        bound = P.topk(min(self.k, P.shape[1]), -1).values[:, -1:]
        upper = (P[:, at] >= bound).sum(-1)
        cand = (upper > 0).nonzero().flatten().cpu()
        self.stats["vectors"] += n
        self.stats["candidates"] += int(cand.numel())
        if not cand.numel():
            return (counts, *none)
        ids = topk_lens(self.view, X[cand.to(X.device)], self.k, bottom=False).top_ids
        counts[cand] = self.table.count(ids)
        return counts, cand, ids


@dataclass
class Located:
    """Per shallow neuron: best concept count, where, which side; plus the null."""

    frame: pd.DataFrame  # layer, neuron, matches, transform_layer, side,
    # matches_untransformed (-1 where matches == 0: not computed)
    top_ids: dict[int, torch.Tensor]  # layer -> (width, k) top ids at the best transform
    raw_ids: dict[int, torch.Tensor]  # layer -> (width, k) untransformed top ids
    # (rows of -1: where matches == 0, or no concept token can reach the top-k)
    null: pd.DataFrame  # layer, matches (one row per random direction)
    head_layer: int
    layers: list[int]
    settings: LocatorSettings
    seconds: dict


def _signed_count(counter: ConceptCounter, X: torch.Tensor, sign: str):
    """Counts over the requested side(s): (counts, side (+1/-1), top ids (n, k); -1 rows
    where no concept token can be in the top-k)."""
    sides = {"pos": (1,), "neg": (-1,), "both": (1, -1)}[sign]
    n = X.shape[0]
    best = torch.full((n,), -1, dtype=torch.long)
    side = torch.ones(n, dtype=torch.long)
    tops = torch.full((n, counter.k), -1, dtype=torch.long)
    for s in sides:
        c, cand, ids = counter.count(X * s)
        full = torch.full((n, counter.k), -1, dtype=torch.long)
        full[cand] = ids
        better = c > best
        best = torch.where(better, c, best)
        side = torch.where(better, torch.full_like(side, s), side)
        tops = torch.where(better[:, None], full, tops)
    return best, side, tops


def _null_vectors(view: ModelView, V: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random Gaussian directions, each rescaled to the norm of a random neuron."""
    norms = V.norm(dim=-1)
    pick = torch.randint(0, V.shape[0], (n,), generator=gen)
    R = torch.randn(n, view.d_model, generator=gen, dtype=V.dtype).to(V.device)
    return R / R.norm(dim=-1, keepdim=True) * norms[pick.to(V.device)][:, None]


def locate(view: ModelView, head_layer: int, settings: LocatorSettings = LocatorSettings(),
           layers: Sequence[int] | None = None, progress: bool = True) -> Located:
    """Run the locator over the shallow ``layers`` (default: every layer below
    ``head_layer``)."""
    settings.check()
    view.check_layers([head_layer])
    layers = list(range(head_layer)) if layers is None else sorted(set(layers))
    if not layers:
        raise CnaError(f"no shallow layers below layer {head_layer}: pick a deeper head or "
                       "--deep-from")
    view.check_layers(layers)
    if max(layers) >= head_layer:
        raise CnaError(f"shallow layers must lie below the head's layer {head_layer}")
    t0 = time.perf_counter()
    table = concept_table(view.tokenizer, view.vocab_size)
    counter = ConceptCounter(view, table, settings.top_tokens, settings.bound_tokens)
    t_table = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(settings.seed)
    k = settings.top_tokens
    work = [(layer, t) for layer in layers
            for t in transform_layers(layer, head_layer, settings.transforms)]
    st: dict[int, dict] = {}
    t1 = time.perf_counter()
    for layer, t in track(work, "locating", show=progress):
        if layer not in st:
            V = neuron_vectors(view, layer)
            n = V.shape[0]
            st[layer] = {"V": V, "R": _null_vectors(view, V, settings.null_per_layer, gen),
                         "best": torch.zeros(n, dtype=torch.long),
                         "t": torch.full((n,), -1, dtype=torch.long),
                         "side": torch.ones(n, dtype=torch.long),
                         "ids": torch.full((n, k), -1, dtype=torch.long),
                         "null": torch.zeros(settings.null_per_layer, dtype=torch.long)}
        s = st[layer]
        c, side, tops = _signed_count(counter, lens_vectors(view, transform(view, s["V"], t)),
                                      settings.sign)
        better = c > s["best"]
        s["best"] = torch.where(better, c, s["best"])
        s["t"] = torch.where(better, torch.full_like(s["t"], t), s["t"])
        s["side"] = torch.where(better, side, s["side"])
        s["ids"] = torch.where(better[:, None], tops, s["ids"])
        cn, _, _ = _signed_count(counter, lens_vectors(view, transform(view, s["R"], t)),
                                 settings.sign)
        s["null"] = torch.maximum(s["null"], cn)
    t2 = time.perf_counter()
    frames, nulls, raw_ids = [], [], {}
    for layer in layers:
        s = st[layer]
        n = s["best"].shape[0]
        raw = torch.full((n,), -1, dtype=torch.long)
        ids = torch.full((n, k), -1, dtype=torch.long)
        hit = (s["best"] > 0).nonzero().flatten()
        if hit.numel():  # untransformed, same side: full top-k of the located neurons
            X = lens_vectors(view, s["V"][hit]) * s["side"][hit, None].to(s["V"].device,
                                                                           s["V"].dtype)
            ids[hit] = topk_lens(view, X, k, bottom=False).top_ids
            raw[hit] = table.count(ids[hit])
        raw_ids[layer] = ids
        frames.append(pd.DataFrame({
            "layer": layer, "neuron": range(n), "matches": s["best"].numpy(),
            "transform_layer": s["t"].numpy(), "side": s["side"].numpy(),
            "matches_untransformed": raw.numpy()}))
        nulls.append(pd.DataFrame({"layer": layer, "matches": s["null"].numpy()}))
    secs = {"lexicon": round(t_table, 2), "locate": round(t2 - t1, 2),
            "untransformed": round(time.perf_counter() - t2, 2),
            "vectors_counted": counter.stats["vectors"],
            "full_vocabulary_candidates": counter.stats["candidates"]}
    return Located(pd.concat(frames, ignore_index=True), {ly: st[ly]["ids"] for ly in layers},
                   raw_ids, pd.concat(nulls, ignore_index=True), head_layer, layers, settings,
                   secs)


def sets(located: Located, ms: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
    """The neurons with at least M matches, for each M."""
    f = located.frame
    return {m: list(zip(f.loc[f["matches"] >= m, "layer"].astype(int),
                        f.loc[f["matches"] >= m, "neuron"].astype(int), strict=True))
            for m in ms}


def random_set(view: ModelView, units: Sequence[tuple[int, int]], gen: torch.Generator
               ) -> list[tuple[int, int]]:
    """A random set with the same number of neurons in each layer as ``units``."""
    counts: dict[int, int] = {}
    for layer, _ in units:
        counts[layer] = counts.get(layer, 0) + 1
    out = []
    for layer, c in sorted(counts.items()):
        idx = torch.randperm(view.ffn_width(layer), generator=gen)[:c]
        out.extend((layer, int(i)) for i in idx.tolist())
    return out


def null_table(located: Located, ms: Sequence[int]) -> list[dict]:
    """Per M: the fraction of random directions with >= M matches and the number of
    shallow neurons that fraction predicts."""
    null = located.null["matches"]
    n_neurons = len(located.frame)
    return [{"m": m, "null_fraction": float((null >= m).mean()),
             "null_expected": float((null >= m).mean() * n_neurons),
             "observed": int((located.frame["matches"] >= m).sum())} for m in ms]


def sweep(view: ModelView, located: Located, enc: Sequence[Encoded], batch_size: int = 64,
          progress: bool = True) -> pd.DataFrame:
    """Accuracy drop when each M-set is zeroed vs random sets (same per-layer counts)."""
    from cnalens.evaluate import evaluate
    from cnalens.interventions import ZeroNeurons

    s = located.settings
    gen = torch.Generator().manual_seed(s.seed + 1)
    base = evaluate(view, enc, batch_size=batch_size, progress=False)
    acc0 = float(base["correct"].mean())
    rows = []
    for m, units in track(list(sets(located, s.ms).items()), "M sweep", show=progress):
        row = {"m": m, "n_neurons": len(units), "n_cases": len(enc), "acc_orig": acc0}
        if not units:
            rows.append({**row, "acc_zeroed": acc0, "drop": 0.0, "rel_drop": 0.0,
                         "random_mean": 0.0, "random_std": 0.0, "random_drops": []})
            continue
        res = evaluate(view, enc, ZeroNeurons(units), batch_size=batch_size, progress=False)
        acc = float(res["correct"].mean())
        rand = []
        for _ in range(s.seeds):
            r = evaluate(view, enc, ZeroNeurons(random_set(view, units, gen)),
                         batch_size=batch_size, progress=False)
            rand.append(acc0 - float(r["correct"].mean()))
        rt = torch.tensor(rand, dtype=torch.float64)
        rows.append({**row, "acc_zeroed": acc, "drop": acc0 - acc,
                     "rel_drop": (acc0 - acc) / acc0 if acc0 else float("nan"),
                     "random_mean": float(rt.mean()),
                     "random_std": float(rt.std(unbiased=False)), "random_drops": rand})
    return pd.DataFrame(rows)


def settings_dict(s: LocatorSettings) -> dict:
    return {**asdict(s), "ms": list(s.ms)}


# --------------------------------------------------------------------------- the stage
def _json_tokens(rows: list[list[str]]) -> list[str]:
    import json

    return [json.dumps(r, ensure_ascii=False) for r in rows]


def located_frame(view: ModelView, located: Located, show: int = 10) -> pd.DataFrame:
    """One row per located neuron (matches >= 1), most matches first: its concept tokens,
    top tokens after the transform and untransformed (JSON lists of token strings)."""
    from cnalens.data.lexicon import concept_table
    from cnalens.vocab import ids_to_strings

    table = concept_table(view.tokenizer, view.vocab_size)
    f = located.frame
    hit = f[f["matches"] > 0].sort_values(["matches", "layer", "neuron"],
                                          ascending=[False, True, True])
    if hit.empty:
        return hit.assign(name=[], concepts=[], top_tokens=[], untransformed_tokens=[])
    offset, start = {}, 0
    for ly in located.layers:
        offset[ly] = start
        start += located.top_ids[ly].shape[0]
    rows = torch.as_tensor([offset[int(a)] + int(b) for a, b in
                            zip(hit["layer"], hit["neuron"], strict=True)], dtype=torch.long)
    top = torch.cat([located.top_ids[ly] for ly in located.layers])[rows]
    raw = torch.cat([located.raw_ids[ly] for ly in located.layers])[rows]
    strings = ids_to_strings(view.tokenizer, top.clamp(min=0))
    is_concept = table.mask[top.clamp(min=0)]
    concepts = [[s for s, c in zip(row, m, strict=True) if c]
                for row, m in zip(strings, is_concept.tolist(), strict=True)]
    out = hit.copy()
    out.insert(2, "name", [f"{a}.{b}" for a, b in zip(hit["layer"], hit["neuron"], strict=True)])
    out["concepts"] = _json_tokens(concepts)
    out["top_tokens"] = _json_tokens([r[:show] for r in strings])
    out["untransformed_tokens"] = _json_tokens(ids_to_strings(view.tokenizer,
                                                              raw[:, :show].clamp(min=0)))
    return out.reset_index(drop=True)
