"""Comparative Neuron Analysis: the same neurons scored in two runs, and the paper's
verification experiments.

Runs (design.md): for a model comparison (a head zeroed, a LoRA model) run A is the model
whose mechanism is explained, and both runs are scored with run A's target and frozen
final-norm scale; for an input comparison each run keeps its own scale, the target is
shared. A ranking orders neurons by ``imp_a - imp_b`` (``by="decrease"``, the default),
by ``imp_b - imp_a`` (``"increase"``) or by ``|imp_a - imp_b|`` (``"abs"``).

Verification (method.md), for each K with the top-K neurons chosen per case, on the cases
the original model gets right:
1. ``zero_topk``: accuracy drop when the top-K neurons are zeroed;
2. ``keep_topk``: accuracy drop when every OTHER neuron of the deep layers is zeroed;
3. ``coef_drop_head``: relative drop of the top-K neurons' coefficient sum (sum of |m|)
   when the head is zeroed;
4. ``coef_drop_lowest``: prediction enhancing: relative drop of the other top-K neurons'
   coefficient sum when only the lowest-layer top-K neuron is zeroed;
each beside a random baseline: K random neurons with the same per-layer counts (1-3), a
random neuron of the lowest neuron's layer (4), mean and std over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cnalens.data.cases import Encoded
from cnalens.errors import CnaError
from cnalens.evaluate import batches, score_batch
from cnalens.progress import track
from cnalens.scores import rank_key, rank_order, ranked_rows

RANKINGS = ("decrease", "increase", "abs")


@dataclass
class Comparison:
    """Two runs' scores of the same neurons on the same cases.

    ``diff`` = imp_a - imp_b; entries never scored (certified top-K scores only what the
    ranking needs) are NaN in ``diff``, ``imp_a`` and ``imp_b``; coefficients are complete.
    """

    diff: torch.Tensor  # (n_cases, n_layers, d_ffn)
    imp_a: torch.Tensor
    imp_b: torch.Tensor
    coef_a: torch.Tensor
    coef_b: torch.Tensor
    case_ids: list[str]
    meta: dict

    def key(self, by: str = "decrease", layers: Sequence[int] | None = None) -> torch.Tensor:
        """Ranking key per neuron (``scores.rank_key``; higher ranks first); -inf outside
        ``layers`` or NaN."""
        if by not in RANKINGS:
            raise CnaError(f"unknown ranking '{by}': use {', '.join(RANKINGS)}")
        key = torch.nan_to_num(rank_key(self.diff, by), nan=float("-inf"))
        if layers is not None:
            keep = torch.zeros(key.shape[1], dtype=torch.bool)
            keep[list(layers)] = True
            key = key.masked_fill(~keep[None, :, None], float("-inf"))
        return key

    def topk(self, k: int, by: str = "decrease",
             layers: Sequence[int] | None = None) -> torch.Tensor:
        """(n_cases, k) flat neuron indices (layer * d_ffn + neuron), best first, ties by
        layer then neuron (``scores.rank_order``)."""
        key = self.key(by, layers).flatten(1)
        if k > key.shape[1]:
            raise CnaError(f"top-K {k} exceeds the {key.shape[1]} neurons compared")
        return rank_order(key)[:, :k]

    def frame(self, k: int, by: str = "decrease", layers: Sequence[int] | None = None,
              labels: Sequence[dict] | None = None) -> pd.DataFrame:
        """Tidy top-K per case: case, rank, layer, neuron, imp_a, imp_b, coef_a, coef_b
        (``scores.ranked_rows``: the rows ``diff_frame`` gives, without its diff column;
        neurons never scored or outside ``layers`` are left out); ``labels``: one dict of
        extra columns per case."""
        if by not in RANKINGS:
            raise CnaError(f"unknown ranking '{by}': use {', '.join(RANKINGS)}")
        if k > self.diff[0].numel():
            raise CnaError(f"top-K {k} exceeds the {self.diff[0].numel()} neurons compared")
        df, case = ranked_rows(self.diff, self.imp_a, self.imp_b, self.coef_a, self.coef_b,
                               self.case_ids, k, by, layers)
        df = df.drop(columns="diff")
        if labels is not None:
            extra = pd.DataFrame(list(labels)).iloc[case]
            df = pd.concat([df, extra.reset_index(drop=True)], axis=1)
        return df


def compare(a, b, meta: dict | None = None) -> Comparison:
    """CNA of two exhaustive ``NeuronScores`` over the same cases and neurons."""
    if a.imp.shape != b.imp.shape:
        raise CnaError(f"runs of different shapes cannot be compared: {tuple(a.imp.shape)} "
                       f"vs {tuple(b.imp.shape)}")
    if list(a.case_ids) != list(b.case_ids):
        raise CnaError("runs cover different cases")
    return Comparison(a.imp - b.imp, a.imp, b.imp, a.coef, b.coef,
                      list(a.case_ids), {"a": a.meta, "b": b.meta, **(meta or {})})


def from_certified(frame: pd.DataFrame, coef_a: torch.Tensor, coef_b: torch.Tensor,
                   case_ids: Sequence[str], meta: dict | None = None) -> Comparison:
    """A Comparison from ``certified_topk_diff``'s frame; unscored neurons are NaN."""
    shape = coef_a.shape
    pos = {c: i for i, c in enumerate(case_ids)}
    flat = (torch.tensor(frame["case"].map(pos).to_numpy()) * shape[1] * shape[2]
            + torch.tensor(frame["layer"].to_numpy()) * shape[2]
            + torch.tensor(frame["neuron"].to_numpy()))
    out = []
    for col in ("diff", "imp_a", "imp_b"):
        t = torch.full(shape, float("nan"), dtype=torch.float64)
        t.view(-1)[flat] = torch.tensor(frame[col].to_numpy(), dtype=torch.float64)
        out.append(t)
    return Comparison(*out, coef_a, coef_b, list(case_ids), dict(meta or {}))


def frequency(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """How often each neuron is in a case's top-K, with its mean scores."""
    top = frame[frame["rank"] <= k]
    g = top.groupby(["layer", "neuron"])
    out = g.agg(count=("case", "size"), imp_a=("imp_a", "mean"), imp_b=("imp_b", "mean"),
                coef_a=("coef_a", "mean"), coef_b=("coef_b", "mean")).reset_index()
    out["freq"] = out["count"] / frame["case"].nunique()
    return out.sort_values(["count", "layer", "neuron"], ascending=[False, True, True])


# ----------------------------------------------------------------- masks and runs
def topk_mask(idx: torch.Tensor, n_layers: int, width: int) -> torch.Tensor:
    """(n_cases, n_layers, width) bool mask of flat indices (n_cases, k)."""
    m = torch.zeros(idx.shape[0], n_layers * width, dtype=torch.bool)
    m.scatter_(1, idx, True)
    return m.view(idx.shape[0], n_layers, width)


def random_like(mask: torch.Tensor, gen: torch.Generator,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Random masks with the same number of neurons per case and layer as ``mask``."""
    r = torch.rand(mask.shape, generator=gen)
    if valid is not None:
        r = r.masked_fill(~valid, 2.0)
    rank = r.argsort(-1).argsort(-1)
    return rank < mask.sum(-1, keepdim=True)


def _row_scale_hook(scale: torch.Tensor):
    """Multiply the coefficients of batch row i by ``scale[i]`` (width,), every position."""
    def fn(x):
        return x * scale.to(x.device, x.dtype)[:, None, :]
    return fn


@torch.inference_mode()
def run_with_row_masks(view, enc: Sequence[Encoded], factor: torch.Tensor,
                       batch_size: int = 32, capture_coef: bool = False,
                       progress: bool = False, description: str = "") -> dict:
    """Evaluate with a per-case multiplicative mask on the FFN coefficients.

    ``factor``: (n_cases, n_layers, d_ffn); layers whose factors are all 1 get no hook.
    Returns ``correct``/``correct_first``/``logp`` and, with ``capture_coef``, the
    coefficients at the last prompt position (n_cases, n_layers, d_ffn).
    """
    n = len(enc)
    active = [layer for layer in range(view.n_layers) if not bool((factor[:, layer] == 1).all())]
    res = {k: torch.empty(n, dtype=t) for k, t in
           (("correct", torch.bool), ("correct_first", torch.bool), ("logp", torch.float32))}
    coefs = torch.full((n, view.n_layers, view.d_ffn), float("nan")) if capture_coef else None
    for idx in track(batches(enc, batch_size), description or "ablating", show=progress):
        rows = torch.as_tensor(idx)
        with ExitStack() as stack:
            for layer in active:
                w = view.ffn_width(layer)
                stack.enter_context(view.edit("coef", layer,
                                              _row_scale_hook(factor[rows, layer, :w])))
            if capture_coef:
                b = view.batch([list(enc[i].prompt_ids) for i in idx])
                with view.capture(["coef"], position=-1) as cache:
                    view.hidden(b)
            out = score_batch(view, [enc[i] for i in idx])
        for k in res:
            res[k][rows] = out[k].cpu()
        if capture_coef:
            for layer in range(view.n_layers):
                c = cache[("coef", layer)][:, 0].float().cpu()
                coefs[rows, layer, :c.shape[-1]] = c
    if capture_coef:
        res["coef"] = coefs
    return res


def _drop(base: torch.Tensor, after: torch.Tensor) -> float:
    return float(base.float().mean() - after.float().mean())


def _coef_drop(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over cases of the relative drop of sum |m| over the masked neurons."""
    sb = (before.abs().nan_to_num() * mask).flatten(1).sum(1)
    sa = (after.abs().nan_to_num() * mask).flatten(1).sum(1)
    ok = sb > 0
    return float(((sb - sa)[ok] / sb[ok]).mean()) if bool(ok.any()) else float("nan")


def verify(view, enc: Sequence[Encoded], comp: Comparison, ks: Sequence[int],
           deep_layers: Sequence[int], by: str = "decrease", metric: str = "correct",
           seeds: int = 3, batch_size: int = 32, progress: bool = True,
           rank_layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The four verification experiments (module docstring) for each K.

    ``enc`` and ``comp`` must hold the same cases in the same order, all answered
    correctly by the original model (``verify_cases`` selects them). ``rank_layers``
    restricts the ranking (default: every layer).
    """
    n_layers, width = view.n_layers, view.d_ffn
    valid = torch.zeros(n_layers, width, dtype=torch.bool)
    for layer in range(n_layers):
        valid[layer, :view.ffn_width(layer)] = True
    deep = torch.zeros(n_layers, dtype=torch.bool)
    deep[list(deep_layers)] = True
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(len(enc), n_layers, width)
    base = torch.ones(len(enc), dtype=torch.bool)  # cases are correct by selection
    coef_a = comp.coef_a
    rows = []

    def add(exp, k, value, rand):
        rows.append({"experiment": exp, "k": k, "value": value,
                     "random_mean": float(np.mean(rand)) if rand else float("nan"),
                     "random_std": float(np.std(rand)) if rand else float("nan"),
                     "n": len(enc)})

    for k in track(list(ks), "verifying", show=progress):
        mask = topk_mask(comp.topk(k, by, rank_layers), n_layers, width)
        rand_masks = [random_like(mask, gen, valid[None]) for _ in range(seeds)]
        # 1. zero the top-K
        zero = run_with_row_masks(view, enc, ones.masked_fill(mask, 0.0), batch_size)
        r1 = [_drop(base, run_with_row_masks(view, enc, ones.masked_fill(m, 0.0),
                                             batch_size)[metric]) for m in rand_masks]
        add("zero_topk", k, _drop(base, zero[metric]), r1)
        # 2. keep only the top-K in the deep layers
        keep = run_with_row_masks(view, enc, ones.masked_fill(deep[None, :, None] & ~mask,
                                                              0.0), batch_size)
        r2 = [_drop(base, run_with_row_masks(view, enc, ones.masked_fill(
            deep[None, :, None] & ~m, 0.0), batch_size)[metric]) for m in rand_masks]
        add("keep_topk", k, _drop(base, keep[metric]), r2)
        # 3. coefficient-sum drop of the top-K between the runs
        add("coef_drop_head", k, _coef_drop(coef_a, comp.coef_b, mask),
            [_coef_drop(coef_a, comp.coef_b, m) for m in rand_masks])
        # 4. prediction enhancing: zero the lowest-layer top-K neuron
        lowest = mask.any(-1).float().argmax(-1)  # first layer holding a top-K neuron
        first = mask[torch.arange(len(enc)), lowest].float().argmax(-1)
        one = torch.zeros_like(mask)
        one[torch.arange(len(enc)), lowest, first] = True
        after = run_with_row_masks(view, enc, ones.masked_fill(one, 0.0), batch_size,
                                   capture_coef=True)["coef"]
        others = mask & ~one
        r4 = []
        for _ in range(seeds):
            rnd = torch.zeros_like(mask)
            pick = torch.randint(0, width, (len(enc),), generator=gen) % torch.tensor(
                [view.ffn_width(int(x)) for x in lowest])
            rnd[torch.arange(len(enc)), lowest, pick] = True
            after_r = run_with_row_masks(view, enc, ones.masked_fill(rnd, 0.0), batch_size,
                                         capture_coef=True)["coef"]
            r4.append(_coef_drop(coef_a, after_r, others & ~rnd))
        add("coef_drop_lowest", k, _coef_drop(coef_a, after, others), r4)
    return pd.DataFrame(rows)


def frequency_set(comp: Comparison, k: int, by: str = "decrease",
                  layers: Sequence[int] | None = None) -> torch.Tensor:
    """(n_layers, d_ffn) mask of the K neurons most often in the cases' top-K.

    Ties in frequency go to the larger summed ranking key over the cases, then to the lower
    flat index (deterministic).
    """
    n_layers, width = comp.diff.shape[1:]
    count = topk_mask(comp.topk(k, by, layers), n_layers, width).sum(0).flatten()
    key = comp.key(by, layers).flatten(1)
    summed = torch.where(torch.isfinite(key), key, torch.zeros_like(key)).sum(0)
    order = torch.argsort(summed, descending=True, stable=True)
    order = order[torch.argsort(count[order], descending=True, stable=True)]
    mask = torch.zeros(n_layers * width, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(n_layers, width)


def verify_heldout(view, test_enc: Sequence[Encoded], comp: Comparison, ks: Sequence[int],
                   by: str = "decrease", layers: Sequence[int] | None = None,
                   metric: str = "correct", seeds: int = 3, batch_size: int = 32,
                   progress: bool = True) -> pd.DataFrame:
    """Held-out verification: one neuron set per K chosen on ``comp``'s (training) cases by
    :func:`frequency_set`, zeroed on ``test_enc`` (held-out cases the original model answers
    correctly): the accuracy drop beside random sets with the same per-layer counts."""
    n_layers, width = comp.diff.shape[1:]
    valid = torch.zeros(n_layers, width, dtype=torch.bool)
    for layer in range(n_layers):
        valid[layer, :view.ffn_width(layer)] = True
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(len(test_enc), n_layers, width)
    base = torch.ones(len(test_enc), dtype=torch.bool)
    rows = []
    for k in track(list(ks), "held-out verification", show=progress):
        mask = frequency_set(comp, k, by, layers)
        rand = [random_like(mask[None], gen, valid[None])[0] for _ in range(seeds)]
        drops = [_drop(base, run_with_row_masks(view, test_enc, ones.masked_fill(m, 0.0),
                                                batch_size)[metric]) for m in [mask, *rand]]
        rows.append({"experiment": "heldout_zero_topk", "k": k, "value": drops[0],
                     "random_mean": float(np.mean(drops[1:])) if seeds else float("nan"),
                     "random_std": float(np.std(drops[1:])) if seeds else float("nan"),
                     "n": len(test_enc)})
    return pd.DataFrame(rows)


def lens_faithfulness(view, enc: Sequence[Encoded], imp: torch.Tensor, top: int = 10,
                      batch_size: int = 32) -> pd.DataFrame:
    """Lens importance of each case's ``top`` neurons beside the real effect of zeroing
    each one alone in the full model: the drop of the first answer token's log-probability
    (``real``). ``imp``: (n_cases, n_layers, d_ffn) importances of those cases."""
    n, n_layers, width = imp.shape
    key = torch.nan_to_num(imp.float(), nan=float("-inf")).flatten(1)
    idx = key.topk(top, dim=1).indices  # (n, top)
    rows = torch.arange(n).repeat_interleave(top)
    flat = idx.flatten()
    factor = torch.ones(n * top, n_layers, width)
    factor.view(n * top, -1)[torch.arange(n * top), flat] = 0.0
    rep = [enc[i] for i in rows.tolist()]
    base = run_with_row_masks(view, enc, torch.ones(n, n_layers, width), batch_size)["logp"]
    zeroed = run_with_row_masks(view, rep, factor, batch_size)["logp"]
    return pd.DataFrame({
        "case_index": rows.numpy(), "case": [enc[i].case.case_id for i in rows.tolist()],
        "layer": (flat // width).numpy(), "neuron": (flat % width).numpy(),
        "importance": imp.flatten(1).gather(1, idx).flatten().float().numpy(),
        "real": (base[rows] - zeroed).numpy(),
    })
