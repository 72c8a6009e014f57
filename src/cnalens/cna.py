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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from cnalens.callables import make_callable
from cnalens.certified import certified_cna, screened_cna
from cnalens.data.cases import Cases, Encoded, Targets, as_encoded
from cnalens.errors import CnaError
from cnalens.evaluate import batches, evaluate, score_batch
from cnalens.progress import track
from cnalens.scores import (
    RANKINGS,
    NeuronScores,
    rank_key,
    rank_order,
    ranked_rows,
    score_neurons,
)
from cnalens.states import (
    CaseStates,
    case_states,
    concat_states,
    frozen_scale,
    neuron_routes,
    route_table,
)
from cnalens.stats import bootstrap_mean, share_of_effect, wilson
from cnalens.tables import add_verdicts, frequency

if TYPE_CHECKING:
    from cnalens.models import ModelView

DEFAULT_K = 20  # what Comparison.frame shows when no K was asked for


@dataclass
class Comparison:
    """Two runs' scores of the same neurons on the same cases.

    ``diff`` = imp_a - imp_b; entries never scored (certified top-K scores only what the
    ranking needs) are NaN in ``diff``, ``imp_a`` and ``imp_b``; coefficients are complete.
    Every tensor is on the CPU, whatever device the model runs on.
    """

    diff: torch.Tensor  # (n_cases, n_layers, d_ffn)
    imp_a: torch.Tensor
    imp_b: torch.Tensor
    coef_a: torch.Tensor
    coef_b: torch.Tensor
    case_ids: list[str]
    meta: dict
    # kept by ``cna`` so that ``frame()`` and ``verify()`` need no arguments
    view: Any = field(default=None, repr=False)
    cases: list[Encoded] | None = field(default=None, repr=False)  # run A's, in order
    cases_b: list[Encoded] | None = field(default=None, repr=False)  # input comparisons
    by: str = "decrease"
    k: int | None = None  # certified/screened comparisons: only this top-K was scored
    layers: list[int] | None = None  # the layers ranked (None: all)
    deep_layers: list[int] | None = None  # verification's deep layers (None: ``layers``)
    interventions: tuple = ()  # run B's, for a comparison by interventions (mediation)
    # mixtures of experts: each run's router weights (n_cases, n_layers, routes), as
    # ``CaseStates.route`` (None for dense models): ``frame()`` names experts, ``routing()``
    route_a: torch.Tensor | None = field(default=None, repr=False)
    route_b: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # the scores live on the CPU whatever device the model runs on (tables, numpy)
        for name in ("diff", "imp_a", "imp_b", "coef_a", "coef_b", "route_a", "route_b"):
            t = getattr(self, name)
            if t is not None and t.device.type != "cpu":
                setattr(self, name, t.cpu())

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
        ranked = int(torch.isfinite(key).sum(1).min()) if len(key) else k
        if k > ranked:
            raise CnaError(f"top-K {k} exceeds the {ranked} neurons ranked (in the layers "
                           "asked for) for some case")
        return rank_order(key)[:, :k]

    def frame(self, k: int | None = None, by: str | None = None,
              layers: Sequence[int] | None = None,
              labels: Sequence[dict] | None = None) -> pd.DataFrame:
        """Tidy top-K per case: case, rank, layer, neuron, imp_a, imp_b, coef_a, coef_b
        (``scores.ranked_rows``: the rows ``diff_frame`` gives, without its diff column;
        neurons never scored or outside ``layers`` are left out); ``labels``: one dict of
        extra columns per case. Defaults: ``k`` the comparison's K (else 20), ``by`` and
        ``layers`` its ranking's. A mixture of experts adds ``expert`` and ``index`` (the
        neuron ``L.E.N``; ``neuron`` stays flat) and the runs' router weights ``route_a``,
        ``route_b``; ``coef_a``/``coef_b`` are then the neurons' own coefficients."""
        k = k if k is not None else self.k or DEFAULT_K
        by = by or self.by
        layers = self.layers if layers is None else layers
        if by not in RANKINGS:
            raise CnaError(f"unknown ranking '{by}': use {', '.join(RANKINGS)}")
        if k > self.diff[0].numel():
            raise CnaError(f"top-K {k} exceeds the {self.diff[0].numel()} neurons compared")
        moe = self.view is not None and self.view.shape.is_moe
        routes = [None if r is None or not moe else neuron_routes(self.view, r)
                  for r in (self.route_a, self.route_b)]
        df, case = ranked_rows(self.diff, self.imp_a, self.imp_b, self.coef_a, self.coef_b,
                               self.case_ids, k, by, layers,
                               shape=self.view.shape if moe else None,
                               route_a=routes[0], route_b=routes[1])
        df = df.drop(columns="diff")
        if labels is not None:
            extra = pd.DataFrame(list(labels)).iloc[case]
            df = pd.concat([df, extra.reset_index(drop=True)], axis=1)
        return df

    def routing(self, changed_only: bool = True) -> pd.DataFrame:
        """A mixture of experts' routing in the two runs (``states.route_table``): per case,
        layer and expert routed in run A or B, its router weights ``weight_a``,
        ``weight_b`` (0: not routed) and whether the case's routed experts of that layer
        differ (``changed``; ``changed_only`` keeps only those). Empty for dense models."""
        if self.view is None:
            raise CnaError("this Comparison keeps no model: make it with cnalens.cna(...)")
        return route_table(self.view, self.case_ids, self.route_a, self.route_b,
                           changed_only)

    def frequency(self, k: int | None = None) -> pd.DataFrame:
        """How often each neuron is in a case's top-``k`` (default the comparison's K, else
        20), with its mean scores (``tables.frequency`` of ``frame(k)``), most often first."""
        k = k if k is not None else self.k or DEFAULT_K
        return frequency(self.frame(k), k)

    def subset(self, rows: Sequence[int]) -> Comparison:
        """The same comparison restricted to the cases at positions ``rows``."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        pick = [self.cases, self.cases_b]
        return Comparison(*(t[idx] for t in (self.diff, self.imp_a, self.imp_b, self.coef_a,
                                             self.coef_b)),
                          [self.case_ids[i] for i in idx.tolist()], dict(self.meta),
                          self.view, *([c[i] for i in idx.tolist()] if c is not None else None
                                       for c in pick),
                          self.by, self.k, self.layers, self.deep_layers, self.interventions,
                          *(None if r is None else r[idx] for r in (self.route_a, self.route_b)))

    def _correct(self, batch_size: int, metric: str = "correct") -> Comparison:
        """This comparison on the cases the kept model answers correctly."""
        if self.view is None or self.cases is None:
            raise CnaError("this Comparison keeps no model and cases: make it with "
                           "cnalens.cna(...), or call cnalens.cna.verify(view, cases, comp, ...)")
        ok = evaluate(self.view, self.cases, batch_size=batch_size, progress=False)[metric]
        rows = [i for i, good in enumerate(ok.tolist()) if good]
        if not rows:
            raise CnaError("the model answers none of the compared cases correctly: "
                           "nothing to verify")
        return self.subset(rows)

    def _check_k(self, ks: Sequence[int]) -> None:
        if self.k is not None and max(ks) > self.k:
            raise CnaError(f"K {max(ks)} exceeds the top-{self.k} this comparison scored: "
                           f"run cna with k={max(ks)} or without k")

    def verify(self, ks: Sequence[int] = (10, 20, 50), deep_layers: Sequence[int] | None = None,
               *, metric: str = "correct", seeds: int = 3, batch_size: int = 32,
               positions: str = "all", progress: bool = False) -> pd.DataFrame:
        """The paper's four verification experiments (:func:`verify`) on the kept model and
        run A's cases, those the model answers correctly (``n`` says how many; the rest are
        left out, as the CNA stage does). ``deep_layers``: default the comparison's (from
        the lowest intervened layer up), else its ranked layers, else all. ``positions``:
        "all" or "last" (the scored positions only). Rows carry ``base_accuracy`` (the
        share of the cases answered correctly) and their ``verdict``
        (``tables.add_verdicts``)."""
        if metric not in METRICS or positions not in POSITIONS:
            _check_run([], self, metric, positions)
        self._check_k(ks)
        comp = self._correct(batch_size, metric)
        deep = list(deep_layers if deep_layers is not None else self.deep_layers
                    or self.layers or range(self.view.n_layers))
        ver = verify(self.view, comp.cases, comp, ks, deep, self.by, metric=metric,
                     seeds=seeds, batch_size=batch_size, progress=progress,
                     rank_layers=self.layers, positions=positions)
        return add_verdicts(ver.assign(base_accuracy=len(comp.case_ids) / len(self.case_ids)))

    def mediation(self, ks: Sequence[int] = (10, 20, 50), *, seeds: int = 3,
                  batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
        """Is run B's effect carried by each case's top-K neurons (:func:`mediation`)? For a
        comparison made with interventions, on the cases the model answers correctly."""
        if not self.interventions:
            raise CnaError("mediation needs a comparison made with intervention= (run B's "
                           "interventions)")
        self._check_k(ks)
        comp = self._correct(batch_size)
        med = mediation(self.view, comp.cases, comp, ks, self.interventions, self.by,
                        self.layers, seeds=seeds, batch_size=batch_size, progress=progress)
        return add_verdicts(med.assign(base_accuracy=len(comp.case_ids) / len(self.case_ids)))


def compare(a: NeuronScores, b: NeuronScores, meta: dict | None = None) -> Comparison:
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
    """A Comparison from a top-K frame (``certified_cna``, ``screened_cna``); unscored
    neurons are NaN."""
    shape = coef_a.shape
    pos = {c: i for i, c in enumerate(case_ids)}
    flat = (torch.tensor(frame["case"].map(pos).to_numpy()) * shape[1] * shape[2]
            + torch.tensor(frame["layer"].to_numpy()) * shape[2]
            + torch.tensor(frame["neuron"].to_numpy()))
    dt = coef_a.dtype  # the model's compute dtype, as an exhaustive comparison has it
    out = []
    for col in ("diff", "imp_a", "imp_b"):
        t = torch.full(shape, float("nan"), dtype=dt)
        t.view(-1)[flat] = torch.tensor(frame[col].to_numpy()).to(dt)
        out.append(t)
    return Comparison(*out, coef_a, coef_b, list(case_ids), dict(meta or {}))


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


POSITIONS = ("all", "last")  # where verification's neuron interventions act


def scored_positions(tails: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: each row's last ``tails[i]`` positions (left padding aligns the
    rows' ends), the positions whose predictions a teacher-forced score reads."""
    return torch.arange(length)[None, :] >= (length - tails.cpu())[:, None]


def _answer_tails(items: Sequence[Encoded]) -> torch.Tensor:
    return torch.tensor([max(1, len(e.answer_ids)) for e in items])


def _row_hook(scale: torch.Tensor | None, where: dict, values: torch.Tensor | None = None,
              mask: torch.Tensor | None = None):
    """Edit one layer's coefficients of the batch rows: multiply by ``scale`` (B, width)
    and/or set the ``mask`` (B, width) entries to ``values`` (B, tail, width; aligned to
    the sequence end) at the positions ``where["tails"]`` marks (None: multiply at every
    position; values always act at the scored positions only)."""
    def fn(x):
        tails = where.get("tails")
        pos = None if tails is None else scored_positions(tails, x.shape[1]).to(x.device)
        if scale is not None:
            s = scale.to(x.device, x.dtype)[:, None, :]
            x = x * s if pos is None else torch.where(pos[..., None], x * s, x)
        if values is not None:  # the batch's own longest answer (values are end-aligned)
            t = min(int(where["answer_tails"].max()), values.shape[1], x.shape[1])
            vals = values[:, -t:].to(x.device, x.dtype)
            rows = torch.arange(x.shape[1] - t, x.shape[1], device=x.device)
            tail_pos = scored_positions(where["answer_tails"], x.shape[1]).to(x.device)[:, -t:]
            sel = mask.to(x.device)[:, None, :] & tail_pos[..., None]
            x = x.clone()
            x[:, rows] = torch.where(sel, vals, x[:, rows])
        return x
    return fn


@torch.inference_mode()
def run_with_row_masks(view: ModelView, enc: Sequence[Encoded], factor: torch.Tensor | None,
                       batch_size: int = 32, capture_coef: bool = False,
                       progress: bool = False, description: str = "",
                       positions: str = "all", interventions: Sequence = (),
                       replace: tuple[torch.Tensor, TailValues] | None = None) -> dict:
    """Evaluate with a per-case multiplicative mask on the FFN coefficients.

    ``factor``: (n_cases, n_layers, d_ffn) or None; layers whose factors are all 1 get no
    hook. ``positions``: "all" (every position) or "last" (the scored positions only: the
    prompt's last position and, under teacher forcing, every answer position scored).
    ``interventions``: applied as well (e.g. run B's head zeroed). ``replace``: ``(mask,
    values)``, mask (n_cases, n_layers, d_ffn) bool and ``tail_coefficients``' values (of
    every layer the mask touches): the masked coefficients set to those values at the
    scored positions. Returns ``correct``/``correct_first``/``logp`` and, with
    ``capture_coef``, the coefficients at the last prompt position (n_cases, n_layers,
    d_ffn).
    """
    if positions not in POSITIONS:
        raise CnaError(f"unknown positions '{positions}': use {', '.join(POSITIONS)}")
    if replace is not None and capture_coef:
        raise CnaError("replace= and capture_coef= cannot be combined")
    n = len(enc)
    active = [] if factor is None else [
        layer for layer in range(view.n_layers) if not bool((factor[:, layer] == 1).all())]
    swap = [] if replace is None else [
        layer for layer in range(view.n_layers) if bool(replace[0][:, layer].any())]
    missing = [x for x in swap if x not in replace[1].layers] if replace is not None else []
    if missing:
        raise CnaError(f"replace=: the mask touches layer(s) {', '.join(map(str, missing))}, "
                       "whose values were not captured (tail_coefficients(layers=...))")
    res = {k: torch.empty(n, dtype=t) for k, t in
           (("correct", torch.bool), ("correct_first", torch.bool), ("logp", torch.float32))}
    coefs = torch.full((n, view.n_layers, view.d_ffn), float("nan")) if capture_coef else None
    for idx in track(batches(enc, batch_size), description or "ablating", show=progress):
        rows = torch.as_tensor(idx)
        items = [enc[i] for i in idx]
        where: dict = {"answer_tails": _answer_tails(items)}
        with ExitStack() as stack:
            stack.enter_context(view.intervene(*interventions))
            for layer in sorted(set(active) | set(swap)):
                w = view.ffn_width(layer)
                scale = factor[rows, layer, :w] if layer in active else None
                vals = msk = None
                if layer in swap:
                    msk = replace[0][rows, layer, :w]
                    vals = torch.nan_to_num(replace[1].at(rows, layer, w))
                stack.enter_context(view.edit("coef", layer, _row_hook(scale, where, vals, msk)))
            if capture_coef:
                b = view.batch([list(e.prompt_ids) for e in items])
                where["tails"] = torch.ones(len(items), dtype=torch.long) \
                    if positions == "last" else None
                with view.capture(["coef"], position=-1) as cache:
                    view.hidden(b)
            where["tails"] = where["answer_tails"] if positions == "last" else None
            out = score_batch(view, items)
        for k in res:
            res[k][rows] = out[k].cpu()
        if capture_coef:
            for layer in range(view.n_layers):
                c = cache[("coef", layer)][:, 0].float().cpu()
                coefs[rows, layer, :c.shape[-1]] = c
    if capture_coef:
        res["coef"] = coefs
    return res


@dataclass(frozen=True)
class TailValues:
    """FFN coefficients at each case's scored positions, for some layers only:
    ``values`` (n_cases, tail, len(layers), d_ffn), ``tail`` the longest answer, aligned to
    the sequence end (row ``i``'s last ``len(answer_ids)`` positions hold its values,
    earlier ones NaN)."""

    values: torch.Tensor
    layers: tuple[int, ...]

    def at(self, rows: torch.Tensor, layer: int, width: int) -> torch.Tensor:
        """(len(rows), tail, width): the given cases' values in ``layer``."""
        if layer not in self.layers:
            raise CnaError(f"no captured values for layer {layer} (captured: "
                           f"{', '.join(map(str, self.layers))})")
        return self.values[rows, :, self.layers.index(layer), :width]


@torch.inference_mode()
def tail_coefficients(view: ModelView, enc: Sequence[Encoded], interventions: Sequence = (),
                      layers: Sequence[int] | None = None, batch_size: int = 32
                      ) -> TailValues:
    """FFN coefficients at each case's scored positions under teacher forcing, for
    ``layers`` (default every layer) only: memory n_cases x tail x len(layers) x d_ffn."""
    tail = int(_answer_tails(enc).max())
    layers = list(range(view.n_layers)) if layers is None else sorted({int(x) for x in layers})
    out = torch.full((len(enc), tail, len(layers), view.d_ffn), float("nan"))
    for idx in batches(enc, batch_size):
        items = [enc[i] for i in idx]
        b = view.batch([e.input_ids for e in items])
        with view.intervene(*interventions), view.capture(["coef"], layers,
                                                          position=slice(-tail, None)) as cache:
            view.hidden(b)
        t = min(tail, b.input_ids.shape[1])
        pos = scored_positions(_answer_tails(items), b.input_ids.shape[1])[:, -t:]
        rows = torch.as_tensor(idx)
        for j, layer in enumerate(layers):
            c = cache[("coef", layer)][:, -t:].float().cpu()
            c = c.masked_fill(~pos[..., None], float("nan"))
            out[rows, tail - t:, j, :c.shape[-1]] = c
    return TailValues(out, tuple(layers))


def _drop(base: torch.Tensor, after: torch.Tensor) -> float:
    return float(base.float().mean() - after.float().mean())


def _case_coef_drops(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor
                     ) -> np.ndarray:
    """Per case, the relative drop of sum |m| over its masked neurons (cases whose masked
    sum is 0 left out)."""
    sb = (before.abs().nan_to_num() * mask).flatten(1).sum(1)
    sa = (after.abs().nan_to_num() * mask).flatten(1).sum(1)
    ok = sb > 0
    return ((sb - sa)[ok] / sb[ok]).double().numpy()


def _coef_drop(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over cases of the relative drop of sum |m| over the masked neurons."""
    d = _case_coef_drops(before, after, mask)
    return float(d.mean()) if len(d) else float("nan")


METRICS = ("correct", "correct_first")  # verification's accuracy drops


def _interval(base: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """Wilson 95% interval of an accuracy drop over cases all answered right before."""
    return wilson(float((base.float() - after.float()).sum()), len(base))


def _check_run(enc: Sequence[Encoded], comp: Comparison, metric: str = "correct",
               positions: str = "all") -> None:
    """One line for a bad call of the verification experiments, before any forward."""
    if metric not in METRICS:
        raise CnaError(f"metric takes {' or '.join(METRICS)} (accuracy drops), not {metric!r}")
    if positions not in POSITIONS:
        raise CnaError(f"unknown positions '{positions}': use {', '.join(POSITIONS)}")
    if not enc:
        raise CnaError("no cases to verify")
    if len(enc) != len(comp.case_ids) or any(
            e.case.case_id and e.case.case_id != c
            for e, c in zip(enc, comp.case_ids, strict=True)):
        raise CnaError("the cases given are not the comparison's cases in its order")


def valid_neurons(view: ModelView) -> torch.Tensor:
    """(n_layers, d_ffn) bool: the neurons that exist (pruned layers are narrower)."""
    valid = torch.zeros(view.n_layers, view.d_ffn, dtype=torch.bool)
    for layer in range(view.n_layers):
        valid[layer, :view.ffn_width(layer)] = True
    return valid


def random_pool(view: ModelView, comp: Comparison) -> torch.Tensor:
    """(n_cases, n_layers, d_ffn) bool: where the random controls draw from, per case:
    every existing neuron, and in a mixture-of-experts layer only those of the experts
    routed at the case's scored position in run A (an unrouted neuron does nothing, so
    drawing it would make the control too easy to beat)."""
    pool = valid_neurons(view)[None].expand(len(comp.case_ids), -1, -1).clone()
    shape = view.shape
    if shape.is_moe:
        moe = torch.tensor([shape.layout(x) is not None for x in range(view.n_layers)])
        routed = comp.coef_a.nan_to_num() != 0
        pool &= routed | ~moe[None, :, None]
    return pool


def verify(view: ModelView, enc: Sequence[Encoded], comp: Comparison, ks: Sequence[int],
           deep_layers: Sequence[int], by: str = "decrease", metric: str = "correct",
           seeds: int = 3, batch_size: int = 32, progress: bool = True,
           rank_layers: Sequence[int] | None = None, positions: str = "all",
           coef_head: bool = True) -> pd.DataFrame:
    """The four verification experiments (module docstring) for each K.

    ``enc`` and ``comp`` must hold the same cases in the same order, all answered
    correctly by the original model (``verify_cases`` selects them). ``rank_layers``
    restricts the ranking (default: every layer). ``positions``: where the neuron
    interventions act, "all" or "last" (the scored positions; ``run_with_row_masks``).
    Each row has the value's 95% interval (``lo``, ``hi``: Wilson for accuracy drops, a
    bootstrap over cases for coefficient drops). ``coef_head``: the head's coefficient
    drop, which no intervention position changes (False: left out, e.g. when another
    call gave it). ``metric``: "correct" or "correct_first".
    """
    _check_run(enc, comp, metric, positions)
    n_layers, width = view.n_layers, view.d_ffn
    pool = random_pool(view, comp)
    deep = torch.zeros(n_layers, dtype=torch.bool)
    deep[list(deep_layers)] = True
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(len(enc), n_layers, width)
    base = torch.ones(len(enc), dtype=torch.bool)  # cases are correct by selection
    coef_a = comp.coef_a
    rows = []

    def run(factor, **kw):
        return run_with_row_masks(view, enc, factor, batch_size, positions=positions, **kw)

    def add(exp, k, value, rand, interval):
        rows.append({"experiment": exp, "k": k, "value": value, "lo": interval[0],
                     "hi": interval[1],
                     "random_mean": float(np.mean(rand)) if rand else float("nan"),
                     "random_std": float(np.std(rand)) if rand else float("nan"),
                     "n": len(enc), "positions": positions})

    def coef_row(exp, k, after, mask, rand):
        d = _case_coef_drops(coef_a, after, mask)
        add(exp, k, float(d.mean()) if len(d) else float("nan"), rand, bootstrap_mean(d))

    for k in track(list(ks), "verifying", show=progress):
        mask = topk_mask(comp.topk(k, by, rank_layers), n_layers, width)
        rand_masks = [random_like(mask, gen, pool) for _ in range(seeds)]
        # 1. zero the top-K
        zero = run(ones.masked_fill(mask, 0.0))[metric]
        r1 = [_drop(base, run(ones.masked_fill(m, 0.0))[metric]) for m in rand_masks]
        add("zero_topk", k, _drop(base, zero), r1, _interval(base, zero))
        # 2. keep only the top-K in the deep layers
        keep = run(ones.masked_fill(deep[None, :, None] & ~mask, 0.0))[metric]
        r2 = [_drop(base, run(ones.masked_fill(deep[None, :, None] & ~m, 0.0))[metric])
              for m in rand_masks]
        add("keep_topk", k, _drop(base, keep), r2, _interval(base, keep))
        # 3. coefficient-sum drop of the top-K between the runs
        if coef_head:
            coef_row("coef_drop_head", k, comp.coef_b, mask,
                     [_coef_drop(coef_a, comp.coef_b, m) for m in rand_masks])
        # 4. prediction enhancing: zero the lowest-layer top-K neuron
        lowest = mask.any(-1).float().argmax(-1)  # first layer holding a top-K neuron
        first = mask[torch.arange(len(enc)), lowest].float().argmax(-1)
        one = torch.zeros_like(mask)
        one[torch.arange(len(enc)), lowest, first] = True
        after = run(ones.masked_fill(one, 0.0), capture_coef=True)["coef"]
        others = mask & ~one
        r4 = []
        for _ in range(seeds):
            rnd = torch.zeros_like(mask)
            pick = torch.randint(0, width, (len(enc),), generator=gen) % torch.tensor(
                [view.ffn_width(int(x)) for x in lowest])
            rnd[torch.arange(len(enc)), lowest, pick] = True
            after_r = run(ones.masked_fill(rnd, 0.0), capture_coef=True)["coef"]
            r4.append(_coef_drop(coef_a, after_r, others & ~rnd))
        coef_row("coef_drop_lowest", k, after, others, r4)
    return pd.DataFrame(rows)


MEDIATION = ("mediation_restore", "mediation_reproduce")
MEDIATION_METRICS = {"acc": "correct", "logp": "logp"}


def mediation(view: ModelView, enc: Sequence[Encoded], comp: Comparison, ks: Sequence[int],
              interventions: Sequence, by: str = "decrease",
              rank_layers: Sequence[int] | None = None, seeds: int = 3,
              batch_size: int = 32, progress: bool = True) -> pd.DataFrame:
    """Is run B's effect carried by each case's top-K neurons? For each K, at the scored
    positions (``tail_coefficients``):

    * ``mediation_restore``: run B (``interventions``, e.g. the head zeroed) with the top-K
      neurons' coefficients set back to run A's values: the share of the head's effect
      recovered, ``(mean(restored) - mean(B)) / (mean(A) - mean(B))``;
    * ``mediation_reproduce``: run A with the top-K set to run B's values: the share of
      the effect reproduced, ``(mean(A) - mean(changed)) / (mean(A) - mean(B))``;

    each for accuracy (``_acc``) and the first answer token's log-probability (``_logp``),
    as a ratio of means over cases with a paired bootstrap 95% interval
    (``stats.share_of_effect``), beside random neuron sets with the same per-layer counts
    (mean and std over ``seeds``). ``enc`` and ``comp`` hold the same cases in order.
    """
    ivs = list(interventions)
    if not ivs:
        raise CnaError("mediation needs run B's interventions (e.g. ZeroHeads([(7, 0)]))")
    _check_run(enc, comp)
    n_layers, width = view.n_layers, view.d_ffn
    pool = random_pool(view, comp)
    ranked = rank_layers if rank_layers is not None else comp.layers  # the masks' layers
    layers = sorted({int(x) for x in ranked}) if ranked is not None else None
    val_a = tail_coefficients(view, enc, (), layers, batch_size)
    val_b = tail_coefficients(view, enc, ivs, layers, batch_size)
    run_a = run_with_row_masks(view, enc, None, batch_size)
    run_b = run_with_row_masks(view, enc, None, batch_size, interventions=ivs)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k in track(list(ks), "mediation", show=progress):
        mask = topk_mask(comp.topk(k, by, rank_layers), n_layers, width)
        masks = [mask, *(random_like(mask, gen, pool) for _ in range(seeds))]
        for exp in MEDIATION:
            restore = exp == "mediation_restore"
            got = [run_with_row_masks(view, enc, None, batch_size,
                                      interventions=ivs if restore else (),
                                      replace=(m, val_a if restore else val_b))
                   for m in masks]
            for suffix, metric in MEDIATION_METRICS.items():
                a = run_a[metric].double().numpy()
                b = run_b[metric].double().numpy()
                if restore:
                    shares = [share_of_effect(a, b, g[metric].double().numpy()) for g in got]
                else:
                    shares = [share_of_effect(b, a, g[metric].double().numpy()) for g in got]
                rand = [s[0] for s in shares[1:] if not np.isnan(s[0])]
                rows.append({"experiment": f"{exp}_{suffix}", "k": k, "value": shares[0][0],
                             "lo": shares[0][1], "hi": shares[0][2],
                             "random_mean": float(np.mean(rand)) if rand else float("nan"),
                             "random_std": float(np.std(rand)) if rand else float("nan"),
                             "n": len(enc), "positions": "last"})
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


def verify_heldout(view: ModelView, test_enc: Sequence[Encoded], comp: Comparison,
                   ks: Sequence[int],
                   by: str = "decrease", layers: Sequence[int] | None = None,
                   metric: str = "correct", seeds: int = 3, batch_size: int = 32,
                   progress: bool = True, positions: str = "all") -> pd.DataFrame:
    """Held-out verification: one neuron set per K chosen on ``comp``'s (training) cases by
    :func:`frequency_set`, zeroed on ``test_enc`` (held-out cases the original model answers
    correctly): the accuracy drop (with its Wilson interval) beside random sets with the
    same per-layer counts. ``positions`` as :func:`verify`."""
    if metric not in METRICS:
        raise CnaError(f"metric takes {' or '.join(METRICS)} (accuracy drops), not {metric!r}")
    if positions not in POSITIONS:
        raise CnaError(f"unknown positions '{positions}': use {', '.join(POSITIONS)}")
    n_layers, width = comp.diff.shape[1:]
    valid = valid_neurons(view)
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(len(test_enc), n_layers, width)
    base = torch.ones(len(test_enc), dtype=torch.bool)
    rows = []
    for k in track(list(ks), "held-out verification", show=progress):
        mask = frequency_set(comp, k, by, layers)
        rand = [random_like(mask[None], gen, valid[None])[0] for _ in range(seeds)]
        got = [run_with_row_masks(view, test_enc, ones.masked_fill(m, 0.0), batch_size,
                                  positions=positions)[metric] for m in [mask, *rand]]
        drops = [_drop(base, g) for g in got]
        lo, hi = _interval(base, got[0])
        rows.append({"experiment": "heldout_zero_topk", "k": k, "value": drops[0],
                     "lo": lo, "hi": hi,
                     "random_mean": float(np.mean(drops[1:])) if seeds else float("nan"),
                     "random_std": float(np.std(drops[1:])) if seeds else float("nan"),
                     "n": len(test_enc), "positions": positions})
    return pd.DataFrame(rows)


def lens_faithfulness(view: ModelView, enc: Sequence[Encoded], imp: torch.Tensor, top: int = 10,
                      batch_size: int = 32) -> pd.DataFrame:
    """Lens importance of each case's ``top`` neurons beside the real effect of zeroing
    each one alone in the full model: the drop of the first answer token's log-probability
    (``real``). ``imp``: (n_cases, n_layers, d_ffn) importances of those cases."""
    imp = imp.cpu()
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


# ----------------------------------------------------------------- one entry point
def _intervention_list(intervention) -> list:
    ivs = [intervention] if hasattr(intervention, "edits") else list(intervention)
    if not ivs or not all(hasattr(iv, "edits") for iv in ivs):
        raise CnaError("intervention= takes an intervention (ZeroHeads, ZeroNeurons, ...) or "
                       "a list of them")
    return ivs


def _check_adapter_inside_layers(view: ModelView) -> None:
    """Both runs are scored through the view's lens, so a LoRA on the unembedding or the
    final norm (outside the decoder layers) cannot be compared this way."""
    from peft.tuners.lora import LoraLayer

    inside = {id(m) for layer in view.layers for m in layer.modules()}
    outside = [name for name, m in view.model.named_modules()
               if isinstance(m, LoraLayer) and id(m) not in inside]
    if outside:
        raise CnaError(f"the adapter changes {outside[0]}, outside the decoder layers: CNA "
                       "scores both runs through the one unembedding, so only adapters "
                       "inside the layers can be compared")


def _distinct_ids(enc: Sequence[Encoded]) -> None:
    seen: set[str] = set()
    for i, e in enumerate(enc):
        cid = e.case.case_id or f"c{i}"  # as case_states names them
        if cid in seen:
            raise CnaError(f"case id {cid!r} repeats: a comparison keys its rows by case id, "
                           "so give each case its own")
        seen.add(cid)


def _other_run(view: ModelView, other):
    """Run B's model: ``("view", ModelView)`` or ``("adapter_off", peft_model)``."""
    from torch import nn

    from cnalens.models import ModelView

    if hasattr(other, "disable_adapter") and hasattr(other, "get_base_model"):
        if other.get_base_model() is view.model:
            _check_adapter_inside_layers(view)
            return "adapter_off", other
        other = other.get_base_model()
    if isinstance(other, nn.Module) and not isinstance(other, ModelView):
        other = ModelView(other, view.tokenizer)
    if not isinstance(other, ModelView):
        raise CnaError(f"other_model= takes a ModelView, a Hugging Face model or a peft "
                       f"model, not {type(other).__name__}")
    mine = (view.n_layers, view.d_ffn, view.vocab_size)
    theirs = (other.n_layers, other.d_ffn, other.vocab_size)
    if mine != theirs:
        raise CnaError(f"other_model= has another shape (layers, FFN width, vocabulary) "
                       f"{theirs} than the model {mine}: CNA compares the same neurons")
    return "view", other


def _check_call(view: ModelView, by: str, lens: str, k: int | None) -> None:
    from cnalens.models import ModelView

    if not isinstance(view, ModelView):
        raise CnaError(f"cna takes a ModelView (cnalens.load_model(...) or "
                       f"cnalens.ModelView(model, tokenizer)), not {type(view).__name__}")
    if by not in RANKINGS:
        raise CnaError(f"unknown ranking '{by}': use {', '.join(RANKINGS)}")
    if lens not in ("frozen", "renorm"):
        raise CnaError(f"unknown lens '{lens}': use frozen or renorm")
    if k is not None and k < 1:
        raise CnaError(f"k must be at least 1, got {k}")


def _with_answer(enc: Sequence[Encoded], target: torch.Tensor) -> list[Encoded]:
    """Cases without answer tokens get the scored target as their answer (for verify)."""
    return [e if e.answer_ids else Encoded(e.case, e.prompt_ids, (int(t),))
            for e, t in zip(enc, target.tolist(), strict=True)]


def _lora_down(view: ModelView, layers: Sequence[int] | None) -> list[int]:
    """The layers (of ``layers``, default all) whose FFN down projection carries a LoRA:
    there the two runs' value vectors differ."""
    from peft.tuners.lora import LoraLayer

    def carries(x: int) -> bool:
        if isinstance(view.module(x, "down_proj"), LoraLayer):
            return True
        shared = view.moe_module(x, "shared_expert") if view.is_moe(x) else None
        down = getattr(shared, "down_proj", None)
        return isinstance(down, LoraLayer)  # a mixture's shared expert (Qwen2-MoE)

    layers = range(view.n_layers) if layers is None else layers
    return [x for x in layers if carries(x)]


def _adapter_scores(view: ModelView, peft_model, a, b, target, scale, kw: dict
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA model's run (``a``) and its adapter-disabled run (``b``) scored with A's
    target and scale: in one pass where their value vectors agree; in layers whose down
    projection carries the LoRA, each run with its own (B's with the adapter disabled)."""
    n = len(a)
    layers = list(range(view.n_layers)) if kw["layers"] is None else kw["layers"]
    own = _lora_down(view, layers)
    rest = {**kw, "layers": [x for x in layers if x not in own]}
    sc = score_neurons(view, None, states=concat_states([a, b]),
                       target=torch.cat([target, target]), scale=torch.cat([scale, scale]),
                       **rest)
    ia, ib = sc.imp[:n].clone(), sc.imp[n:].clone()
    if own:
        mine = {**kw, "layers": own}
        ia[:, own] = score_neurons(view, None, states=a, target=target, scale=scale,
                                   **mine).imp[:, own]
        with peft_model.disable_adapter():
            ib[:, own] = score_neurons(view, None, states=b, target=target, scale=scale,
                                       **mine).imp[:, own]
    return ia, ib


def _from_top(frame: pd.DataFrame, sa: CaseStates, sb: CaseStates, meta: dict,
              stats: dict, keep: dict, k: int) -> Comparison:
    """A Comparison of a top-``k`` (certified or screened) frame: unscored entries NaN."""
    comp = from_certified(frame, sa.coef, sb.coef, sa.case_ids, {**meta, "stats": stats})
    for name, value in {**keep, "k": k}.items():
        setattr(comp, name, value)
    comp.__post_init__()  # the routes set above go to the CPU too
    return comp


def compare_runs(view: ModelView, cases: Cases, interventions: Sequence = (), *,
                 other_model: Any = None, target: Targets = None, k: int | None = None,
                 layers: Sequence[int] | None = None,
                 by: str = "decrease", lens: str = "frozen", batch_size: int = 32,
                 progress: bool = False) -> Comparison:
    """A model comparison (design.md): run A is ``view`` on ``cases``, run B the same cases
    under ``interventions`` or on ``other_model``; both scored with run A's target (its
    prediction, or ``target``) and A's frozen final-norm scale.

    ``other_model``: a ModelView or Hugging Face model of the same shape (its own weights
    score run B), or the peft model wrapping ``view``'s model: run B is then the adapter
    disabled (A = the LoRA model, as ``apps.lora_cna``). ``layers``: the layers scored and
    ranked (default: from the lowest intervened layer up, since below it the runs agree;
    all for other models). ``k``: only the top-``k`` per case is needed: with the frozen
    lens, no soft-capping and the same FFN value vectors in both runs (interventions, or a
    LoRA whose down projections are untouched), the certified exact top-``k`` is scored
    (``certified.certified_cna``); else every neuron is (``score_neurons``).
    """
    ivs = list(interventions)
    kind, other = _other_run(view, other_model) if other_model is not None else (None, None)
    if kind is None and not ivs:
        raise CnaError("a model comparison needs interventions or another model for run B")
    enc = as_encoded(view.tokenizer, cases, target)
    _distinct_ids(enc)
    deep = None
    if ivs and kind is None:
        deep = list(range(min(e.layer for iv in ivs for e in iv.edits(view)), view.n_layers))
    layer_list = sorted({int(x) for x in layers}) if layers is not None else deep
    kw = {"layers": layer_list, "lens": lens, "batch_size": batch_size, "progress": progress}
    a = case_states(view, enc, batch_size=batch_size)
    tg = a.gold if target is not None else a.pred
    scale = frozen_scale(view, a, lens)
    runs = {"a": "the model", "b": [iv.describe() for iv in ivs]}
    same_vectors = kind is None or (kind == "adapter_off" and not _lora_down(view, layer_list))
    certified = k is not None and same_vectors and lens == "frozen" and not view.softcap
    if kind == "adapter_off":
        with other.disable_adapter():
            b = case_states(view, enc, batch_size=batch_size)
        runs = {"a": "LoRA model", "b": "original (adapter disabled)"}
    elif kind == "view":
        b = case_states(other, enc, batch_size=batch_size)
        runs = {"a": "the model", "b": f"other model ({other.info.get('spec', 'given')})"}
    else:
        b = case_states(view, enc, *ivs, batch_size=batch_size)
    meta = {"comparison": "models", "runs": runs, "target": "given" if target is not None
            else "run A's prediction", "lens": f"{lens} (run A's scale)", "ranking": by,
            "layers": layer_list, "scoring": "certified" if certified else "exhaustive",
            "model": view.summary()}
    keep = {"view": view, "cases": _with_answer(enc, tg), "by": by, "layers": layer_list,
            "deep_layers": deep, "interventions": tuple(ivs) if kind is None else (),
            "route_a": a.route, "route_b": b.route}
    if certified:
        frame, stats = certified_cna(view, a, b, k, target=tg, layers=layer_list, by=by,
                                     progress=progress)
        return _from_top(frame, a, b, meta, stats, keep, k)
    if kind == "adapter_off":
        ia, ib = _adapter_scores(view, other, a, b, tg, scale, kw)
    elif kind == "view":
        ia = score_neurons(view, None, states=a, target=tg, scale=scale, **kw).imp
        ib = score_neurons(other, None, states=b, target=tg, scale=scale, **kw).imp
    else:  # one pass: both runs share the value-vector projections
        n = len(a)
        sc = score_neurons(view, None, states=concat_states([a, b]),
                           target=torch.cat([tg, tg]), scale=torch.cat([scale, scale]), **kw)
        ia, ib = sc.imp[:n], sc.imp[n:]
    out_dt = ia.dtype
    return Comparison(ia - ib, ia, ib, a.coef.to(out_dt), b.coef.to(out_dt), list(a.case_ids),
                      meta, k=k, **keep)


def compare_inputs(view: ModelView, cases_a: Cases, cases_b: Cases, *,
                   target: Targets = None, k: int | None = None,
                   screen: int | None = None, layers: Sequence[int] | None = None,
                   by: str = "decrease", lens: str = "frozen", batch_size: int = 32,
                   progress: bool = False) -> Comparison:
    """An input comparison (design.md): case ``i`` of ``cases_a`` (run A) against case ``i``
    of ``cases_b`` (run B), one shared target (``target``; else run A's case target, else
    run A's prediction), each run with its own frozen final-norm scale. ``k``: only the
    top-``k`` per case is needed: certified exact (``certified.certified_cna`` with each
    run's own scale) with the frozen lens and no soft-capping, else every neuron of
    ``layers`` is scored. ``screen`` (with ``k``, ranking "decrease") is the approximate
    option: each case's ``screen`` best neurons by a first-order estimate, scored exactly
    (``certified.screened_cna``; recorded in ``meta``)."""
    enc_a = as_encoded(view.tokenizer, cases_a, target)
    enc_b = as_encoded(view.tokenizer, cases_b, target)
    if len(enc_a) != len(enc_b):
        raise CnaError(f"{len(enc_a)} run-A prompts but {len(enc_b)} run-B prompts: an input "
                       "comparison pairs them one to one")
    _distinct_ids(enc_a)
    if len({bool(e.answer_ids) for e in enc_a}) > 1:
        raise CnaError("some run-A cases have a target and some do not: give every case one "
                       "(target=) or none (each run A's prediction is scored)")
    if screen is not None and (k is None or by != "decrease"):
        raise CnaError("screen= needs k= and the ranking by='decrease'")
    if screen is not None and lens != "frozen":
        raise CnaError("screen= needs the frozen lens")
    sa = case_states(view, enc_a, batch_size=batch_size)
    sb = case_states(view, enc_b, batch_size=batch_size)
    given = all(e.answer_ids for e in enc_a)
    tg = sa.gold if given else sa.pred
    layer_list = sorted({int(x) for x in layers}) if layers is not None else None
    certified = (k is not None and screen is None and lens == "frozen" and not view.softcap)
    scoring = "screened" if screen is not None else "certified" if certified else "exhaustive"
    meta = {"comparison": "inputs", "runs": {"a": "prompts A", "b": "prompts B"},
            "target": "given" if given else "run A's prediction",
            "lens": f"{lens} (each run its own scale)", "ranking": by, "layers": layer_list,
            "scoring": scoring, "model": view.summary()}
    keep = {"view": view, "cases": _with_answer(enc_a, tg), "cases_b": _with_answer(enc_b, tg),
            "by": by, "layers": layer_list, "route_a": sa.route, "route_b": sb.route}
    if screen is not None:
        frame, stats = screened_cna(view, sa, sb, k, target=tg, layers=layer_list,
                                    screen=screen, progress=progress)
        return _from_top(frame, sa, sb, meta, stats, keep, k)
    if certified:
        frame, stats = certified_cna(view, sa, sb, k, target=tg, layers=layer_list, by=by,
                                     own_scales=True, progress=progress)
        return _from_top(frame, sa, sb, meta, stats, keep, k)
    n = len(sa)
    sc = score_neurons(view, None, states=concat_states([sa, sb]), target=torch.cat([tg, tg]),
                       layers=layer_list, lens=lens, batch_size=batch_size, progress=progress)
    ia, ib = sc.imp[:n], sc.imp[n:]
    return Comparison(ia - ib, ia, ib, sc.coef[:n], sc.coef[n:], list(sa.case_ids), meta,
                      k=k, **keep)


def cna(view: ModelView, a: Cases, b: Cases | None = None, *, intervention: Any = None,
        other_model: Any = None, target: Targets = None, k: int | None = None,
        layers: Sequence[int] | None = None, by: str = "decrease", lens: str = "frozen",
        screen: int | None = None, batch_size: int = 32,
        progress: bool = False) -> Comparison:
    """Comparative Neuron Analysis in one call; returns a :class:`Comparison`.

    ``a``: run A's cases: a prompt string, a ``Case``, an ``Encoded`` or a list of them.
    Run B is exactly one of: ``b`` (other prompts, one per case of ``a``: an input
    comparison, :func:`compare_inputs`), ``intervention`` (one or a list, e.g.
    ``ZeroHeads([(7, 0)])``) or ``other_model`` (a model comparison,
    :func:`compare_runs`). ``target``: the token scored (text or id, one or one per case;
    default run A's prediction). ``k``: only the top-``k`` per case is needed (certified
    exact for interventions); ``.frame()`` then shows it.
    """
    given = [name for name, x in (("b", b), ("intervention", intervention),
                                  ("other_model", other_model)) if x is not None]
    if not given:
        raise CnaError("cna needs run B: a second prompt (b), intervention= or other_model=")
    if len(given) > 1:
        raise CnaError(f"ambiguous comparison ({' and '.join(given)}): give one of b (two "
                       "inputs), intervention= or other_model= (two models)")
    _check_call(view, by, lens, k)
    common = {"target": target, "k": k, "layers": layers, "by": by, "lens": lens,
              "batch_size": batch_size, "progress": progress}
    if b is not None:
        return compare_inputs(view, a, b, screen=screen, **common)
    if screen is not None:
        raise CnaError("screen= applies to input comparisons (two prompts) only")
    if intervention is not None:
        return compare_runs(view, a, _intervention_list(intervention), **common)
    return compare_runs(view, a, other_model=other_model, **common)


make_callable(__name__, cna)  # cnalens.cna(view, ...) is cna(view, ...)
