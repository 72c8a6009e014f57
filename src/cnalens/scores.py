"""Importance (log-probability increase) and coefficient scores, exact and fast.

For a vector ``u`` added to a residual state ``s`` and a target token ``w``::

    Imp(u | s) = log p(w | s + u) - log p(w | s),   p(. | x) = softmax(cap(W_U FinalNorm(x) + b_U))

FFN neuron ``k`` of layer ``l``: ``u = m_k v'_k`` added to ``resid_mid`` (``v'_k`` the value
vector, through Gemma's post-FFN norm with its scale frozen at the real FFN output). Heads
and attention neurons: their contribution added to ``resid_pre`` of their layer. A neuron
``L.E.N`` of a mixture-of-experts layer: ``u = r_E m_{E,N} v_{E,N}`` (router weight times
coefficient times value vector, the weighted coefficient ``ModelView`` captures); where the
case was not routed to expert ``E`` it contributes exactly zero and is not scored (NaN).

Lenses: ``frozen`` (the notebooks') fixes the final norm's scale ``c`` (RMS, or LayerNorm's
sigma) at the real final residual of the run (or at ``scale=``), so the lens is affine:
``logits(s + a v) = logits(s) + (a / c) P_v`` with ``P_v = W_U (g * C(v))`` (``C`` centres
for LayerNorm; its bias and ``b_U`` stay in the base logits). ``renorm`` normalises ``s + u``
for real: the logits are ``(Q_s + a P_v) / c(s + a v) + W_U b + b_U`` with ``c(s + a v)``
from ``|C s|^2``, ``C s . C v`` and ``|C v|^2``. Either way ``P_v`` does not depend on the
case, so each chunk of value vectors is projected onto the vocabulary once and every case
is scored against it: per case only a log-sum-exp remains.
The certified top-K and certified CNA (bounds, not every neuron) are in
:mod:`cnalens.certified`; the one CNA entry point is :mod:`cnalens.cna`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cnalens.data.cases import CaseLike, Cases, as_encoded
from cnalens.errors import CnaError
from cnalens.lens import FFNVectors, Lens
from cnalens.progress import track
from cnalens.states import (
    CaseStates,
    Target,
    as_numpy,
    case_states,
    check_targets,
    describe_run,
    neuron_routes,
    resolve_layers,
    scales_for,
    targets_for,
)

if TYPE_CHECKING:
    from cnalens.interventions import Intervention
    from cnalens.models import ModelView
    from cnalens.models.shape import ModelShape

RANKINGS = ("decrease", "increase", "abs")  # CNA orders: imp_a - imp_b, its negative, |.|


def _attn_post(view: ModelView, lens: Lens, states: CaseStates, layer: int):
    post = view.norm(layer, "ln_attn_post")
    if post is None:
        return None, None
    gain, s, _, _ = view.norm_affine(post, states.attn_raw[:, layer])
    return gain.detach(), s[:, 0]


# --------------------------------------------------------------------------- FFN neurons
@dataclass
class NeuronScores:
    """FFN neuron importance and coefficients at the last position of each case (CPU
    tensors, whatever device the model runs on)."""

    imp: torch.Tensor  # (n_cases, n_layers, d_ffn) float32 (float64 for float64 models);
    # NaN where a layer was not scored or is narrower (pruned models), and for the neurons
    # of experts a case was not routed to
    coef: torch.Tensor  # (n_cases, n_layers, d_ffn); mixtures of experts: weighted
    target: torch.Tensor  # (n_cases,)
    scale: torch.Tensor  # (n_cases,)
    case_ids: list[str]
    meta: dict
    route: torch.Tensor | None = None  # (n_cases, n_layers, d_ffn) each neuron's router
    # weight (NaN for dense layers); mixture-of-experts models only
    shape: ModelShape | None = None

    def frame(self, top: int | None = None) -> pd.DataFrame:
        """Tidy rows: case, layer, kind="ffn", neuron, coef, importance (+ rank with ``top``).

        ``top`` keeps each case's best neurons (importance descending, ties by layer then
        neuron). Mixture-of-experts models add ``expert`` (empty for dense layers, ``S`` for
        the shared expert), ``index`` (the neuron inside its expert: ``L.E.N``; ``neuron``
        stays the flat index interventions take) and ``route`` (the router weight), and
        ``coef`` is the neuron's own coefficient (the weighted one over ``route``)."""
        n, L, D = self.imp.shape
        imp = self.imp.numpy().reshape(-1)
        ok = np.isfinite(imp)
        idx = np.nonzero(ok)[0]
        case, rest = np.divmod(idx, L * D)
        layer, index = np.divmod(rest, D)
        coef = self.coef.numpy().reshape(-1)[idx]
        df = pd.DataFrame({"case": np.asarray(self.case_ids, dtype=object)[case],
                           "layer": layer, "kind": "ffn", "neuron": index,
                           "coef": coef, "importance": imp[idx]})
        if self.route is not None and self.shape is not None:
            df = expert_columns(df, self.shape,
                                {"coef": ("route", self.route.numpy().reshape(-1)[idx])})
        if top is None:
            return df
        order = np.lexsort((index, layer, -imp[idx], case))
        df = df.iloc[order].reset_index(drop=True)
        df["rank"] = df.groupby("case", sort=False).cumcount() + 1
        return df[df["rank"] <= top].reset_index(drop=True)


def _prepare(view: ModelView, lens, cases, interventions, target, scale, layers, batch_size,
             states):
    """Lens, states (given or computed), targets, frozen scales and layers of one run."""
    lz = Lens(view, lens)
    st = states if states is not None else case_states(view, cases, *interventions,
                                                      batch_size=batch_size)
    tg = targets_for(st, target)
    check_targets(view, tg)
    return lz, st, tg, scales_for(lz, st, scale), resolve_layers(view, layers)


def score_neurons(view: ModelView, cases_or_encoded: Cases, *interventions: Intervention,
                  lens: str = "frozen", target: Target = "pred",
                  scale: torch.Tensor | None = None, layers: Sequence[int] | None = None,
                  batch_size: int = 32, max_memory_gb: float = 2.0, progress: bool = True,
                  states: CaseStates | None = None) -> NeuronScores:
    """Exhaustive importance of every FFN neuron (vectorised, chunked) plus coefficients.

    ``target``: "pred" (this run's top-1), "gold" (the first answer token) or ids.
    ``scale``: frozen final-norm scales to use instead of this run's own (CNA's run B).
    ``states``: reuse a ``case_states`` result of the same cases and interventions.
    """
    lz, st, tg, c, layer_list = _prepare(view, lens, cases_or_encoded, interventions, target,
                                         scale, layers, batch_size, states)
    n = len(st)
    out_dt = torch.float64 if lz.dt == torch.float64 else torch.float32
    imp = torch.full((n, view.n_layers, view.d_ffn), float("nan"), dtype=out_dt)
    # cases per group: the base logits (a few (n, V) arrays) must fit half the budget
    group = max(1, int(max_memory_gb * 2**29 // (3 * lz.V * lz.W.element_size())))
    todo = [(layer, g0) for layer in layer_list for g0 in range(0, n, group)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for layer, g0 in track(todo, "neuron scores", show=progress):
            rows = slice(g0, g0 + group)
            vec = FFNVectors(view, lz, [layer])
            X, Cv, A = vec.X[layer], vec.Cv[layer], vec.coef(st, layer)[rows]
            routed = vec.routed(st, layer)
            cols = torch.arange(X.shape[0])
            if routed is not None:  # only the experts some case of the group was routed to
                routed = routed[rows].cpu()
                cols = routed.any(0).nonzero()[:, 0]
                X, Cv, A = X[cols], Cv[cols], A[:, cols]
            base = lz.base(st.resid_mid[rows, layer], c[rows], tg[rows])
            nb, vb = lz.block_sizes(max(1, X.shape[0]), max_memory_gb)
            out = imp[rows, layer]  # a view: written in place
            for k0 in range(0, X.shape[0], nb):
                ks = slice(k0, k0 + nb)
                val = lz.score(X[ks], Cv[ks], A[:, ks], base, vb).to("cpu", out_dt)
                if routed is not None:
                    val = val.masked_fill(~routed[:, cols[ks]], float("nan"))
                out[:, cols[ks]] = val
    meta = describe_run(view, lens, target, st, layer_list,
                     {"seconds": time.perf_counter() - t0, "kind": "ffn"})
    route = None if st.route is None else neuron_routes(view, st.route).to("cpu", out_dt)
    return NeuronScores(imp, st.coef.to("cpu", out_dt), tg.cpu(), c.to("cpu", out_dt),
                        list(st.case_ids), meta, route, view.shape if route is not None else None)


# --------------------------------------------------------------------------- heads
def score_heads(view: ModelView, cases_or_encoded: Cases, *interventions: Intervention,
                lens: str = "frozen", target: Target = "pred",
                scale: torch.Tensor | None = None, layers: Sequence[int] | None = None,
                batch_size: int = 32, max_memory_gb: float = 2.0, progress: bool = True,
                attn_neurons: bool = True, states: CaseStates | None = None) -> pd.DataFrame:
    """Every head's importance (kind="head") and every attention neuron's (kind="attn_neuron":
    coordinate j of head h, coefficient z_{h,j}, vector W_O[:, h*head_dim + j] through the
    post-attention norm), each added to ``resid_pre`` of its layer.

    Columns: case, layer, kind, index, head, coef, importance (a head's coef is NaN; an
    attention neuron's index is ``h * head_dim + j``).
    """
    lz, st, tg, c, layer_list = _prepare(view, lens, cases_or_encoded, interventions, target,
                                         scale, layers, batch_size, states)
    n, H, hd = len(st), view.n_heads, view.head_dim
    frames = []
    ids = np.asarray(st.case_ids, dtype=object)
    with torch.no_grad():
        for layer in track(layer_list, "head scores", show=progress):
            base = lz.base(st.resid_pre[:, layer], c, tg)
            wo = view.o_proj_by_head(layer).detach().to(lz.dt)  # (H, d, hd)
            gain, s = _attn_post(view, lz, st, layer)
            z = st.z[:, layer].reshape(n, H, hd)
            heads = torch.einsum("nhj,hdj->nhd", z, wo)
            if gain is not None:
                heads = heads * gain / s[:, None, None]
            X, Cv = lz.vectors(heads)
            imp_h = torch.stack([lz.score(X[i], Cv[i], torch.ones(1, H, dtype=lz.dt),
                                          base.rows(i))[0] for i in range(n)])
            frames.append(pd.DataFrame({
                "case": np.repeat(ids, H), "layer": layer, "kind": "head",
                "index": np.tile(np.arange(H), n), "head": np.tile(np.arange(H), n),
                "coef": np.nan, "importance": as_numpy(imp_h)}))
            if not attn_neurons:
                continue
            cols = wo.permute(0, 2, 1).reshape(H * hd, -1)  # row h*hd + j = W_O[h][:, j]
            A = st.z[:, layer]
            if gain is not None:
                cols = cols * gain
                A = A / s[:, None]
            X, Cv = lz.vectors(cols)
            nb, vb = lz.block_sizes(X.shape[0], max_memory_gb)
            imp_n = torch.cat([lz.score(X[k:k + nb], Cv[k:k + nb], A[:, k:k + nb], base, vb)
                               for k in range(0, X.shape[0], nb)], 1)
            frames.append(pd.DataFrame({
                "case": np.repeat(ids, H * hd), "layer": layer, "kind": "attn_neuron",
                "index": np.tile(np.arange(H * hd), n),
                "head": np.tile(np.arange(H * hd) // hd, n),
                "coef": as_numpy(st.z[:, layer]),
                "importance": as_numpy(imp_n)}))
    df = pd.concat(frames, ignore_index=True)
    df.attrs["meta"] = describe_run(view, lens, target, st, layer_list, {"kind": "heads"})
    return df


def position_scores(view: ModelView, case: CaseLike, *interventions: Intervention,
                    lens: str = "frozen", target: Target = "pred",
                    scale: torch.Tensor | None = None, layers: Sequence[int] | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """One case: each head's output split by source position (kind="head_pos").

    Row (layer, head, index=j): the head's attention to position j times that position's
    value, through W_O[h] and the post-attention norm, added to ``resid_pre``. ``coef`` is
    the attention weight. Needs eager attention (switched on for the forward only). A head
    whose output an intervention edited (its split no longer sums to it) gets NaN.
    """
    enc = as_encoded(view.tokenizer, case)
    if len(enc) != 1:
        raise CnaError("position_scores scores one case")
    lz = Lens(view, lens)
    layer_list = resolve_layers(view, layers)
    with view.attention_record(layer_list) as rec:
        st = case_states(view, enc, *interventions)
    tg = targets_for(st, target)
    check_targets(view, tg)
    c = scales_for(lz, st, scale)
    H, hd = view.n_heads, view.head_dim
    groups = H // view.n_kv_heads
    frames = []
    tokens = list(enc[0].prompt_ids)
    with torch.no_grad():
        for layer in track(layer_list, "position scores", show=progress):
            weights, values = rec[layer]
            w_last = weights[0, :, -1].to(lz.dt)  # (H, k)
            vals = values[0].to(lz.dt)[torch.arange(H) // groups]  # (H, k, hd)
            parts = w_last[..., None] * vals  # (H, k, hd)
            z = st.z[0, layer].reshape(H, hd)
            ok = torch.isclose(parts.sum(1), z, rtol=1e-4, atol=1e-6).all(-1)
            wo = view.o_proj_by_head(layer).detach().to(lz.dt)
            u = torch.einsum("hkj,hdj->hkd", parts, wo)
            gain, s = _attn_post(view, lz, st, layer)
            if gain is not None:
                u = u * gain / s[0]
            k = u.shape[1]
            X, Cv = lz.vectors(u.reshape(H * k, -1))
            base = lz.base(st.resid_pre[:, layer], c, tg)
            imp = lz.score(X, Cv, torch.ones(1, H * k, dtype=lz.dt), base)[0].reshape(H, k)
            imp[~ok] = float("nan")
            frames.append(pd.DataFrame({
                "case": st.case_ids[0], "layer": layer, "kind": "head_pos",
                "index": np.tile(np.arange(k), H), "head": np.repeat(np.arange(H), k),
                "token": np.tile(np.asarray(tokens[-k:]), H),
                "coef": as_numpy(w_last),
                "importance": as_numpy(imp)}))
    df = pd.concat(frames, ignore_index=True)
    df.attrs["meta"] = describe_run(view, lens, target, st, layer_list, {"kind": "head_pos"})
    return df


def rank_key(diff: torch.Tensor, by: str = "decrease") -> torch.Tensor:
    """The CNA ranking key of ``diff = imp_a - imp_b`` (higher ranks first): ``diff``
    ("decrease"), ``-diff`` ("increase") or ``|diff|`` ("abs"); NaN stays NaN."""
    if by not in RANKINGS:
        raise CnaError(f"unknown ranking '{by}': use {', '.join(RANKINGS)}")
    return diff if by == "decrease" else -diff if by == "increase" else diff.abs()


def rank_order(key: torch.Tensor) -> torch.Tensor:
    """Per row of ``key`` (n, units in flat (layer, neuron) order): positions best first,
    ties by position (so by layer, then neuron), NaN last. The one ranking rule of CNA."""
    key = torch.nan_to_num(key.double(), nan=float("-inf"))
    return torch.argsort(key, dim=-1, descending=True, stable=True)


def ranked_rows(diff: torch.Tensor, imp_a: torch.Tensor, imp_b: torch.Tensor,
                coef_a: torch.Tensor, coef_b: torch.Tensor, case_ids: Sequence[str],
                top: int | None = None, by: str = "decrease",
                layers: Sequence[int] | None = None, *, shape: ModelShape | None = None,
                route_a: torch.Tensor | None = None, route_b: torch.Tensor | None = None
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """Two runs' scores (each (n_cases, n_layers, d_ffn)) as ranked rows per case: case,
    rank, layer, neuron, imp_a, imp_b, coef_a, coef_b, diff; ``rank_order`` of
    ``rank_key(diff, by)``, only finite keys, only ``layers`` (default all), ``top`` best
    per case. Also returns each row's case position.

    A mixture-of-experts model's ``shape`` adds ``expert`` (empty for dense layers, ``S``
    for the shared expert) and ``index`` (the neuron inside its expert, ``L.E.N``; ``neuron``
    stays the flat index); with the runs' per-neuron router weights (``NeuronScores.route``)
    ``route_a``/``route_b`` columns follow, and ``coef_a``/``coef_b`` become the neurons' own
    coefficients (the weighted ones over the router weight; NaN where not routed)."""
    diff = diff.cpu()
    n, L, D = diff.shape
    key = rank_key(diff, by).flatten(1)
    if layers is not None:
        keep = torch.zeros(L, dtype=torch.bool)
        keep[list(layers)] = True
        key = key.masked_fill(~keep.repeat_interleave(D)[None], float("nan"))
    order = rank_order(key)
    if top is not None:
        order = order[:, :top]
    ok = torch.isfinite(key.gather(1, order)).numpy()
    case = np.broadcast_to(np.arange(n)[:, None], order.shape)[ok]
    flat = order.numpy()[ok]
    pos = case * (L * D) + flat
    layer, neuron = np.divmod(flat, D)
    df = pd.DataFrame({"case": np.asarray(case_ids, dtype=object)[case], "layer": layer,
                       "neuron": neuron, **{name: as_numpy(t)[pos] for name, t in (
                           ("imp_a", imp_a), ("imp_b", imp_b), ("coef_a", coef_a),
                           ("coef_b", coef_b), ("diff", diff))}})
    df.insert(1, "rank", df.groupby(case, sort=False).cumcount().to_numpy() + 1)
    if shape is not None and shape.is_moe:
        df = expert_columns(df, shape, {f"coef_{run}": (f"route_{run}", as_numpy(route)[pos])
                                        for run, route in (("a", route_a), ("b", route_b))
                                        if route is not None})
    return df, case


def expert_columns(df: pd.DataFrame, shape: ModelShape,
                   routes: dict[str, tuple[str, np.ndarray]] | None = None) -> pd.DataFrame:
    """A neuron table (``layer`` and flat ``neuron`` columns) of a mixture-of-experts model
    with ``expert`` (a string: empty for dense layers, ``S`` for the shared expert) before
    ``neuron`` and ``index`` (the neuron inside its expert, ``L.E.N``) after it. ``routes``:
    per weighted-coefficient column, ``(route column, each row's router weight)``: the
    column becomes the neuron's own coefficient (weighted over router weight; NaN where
    not routed, unchanged in dense layers, whose weight is NaN) and the router weights
    follow the last coefficient column. The one layout of every expert-aware table."""
    df = df.copy()
    expert, inner = shape.expert_labels(df["layer"].to_numpy(), df["neuron"].to_numpy())
    at = df.columns.get_loc("neuron")
    df.insert(at, "expert", expert)
    df.insert(at + 2, "index", inner)
    routes = routes or {}
    after = max((df.columns.get_loc(col) for col in routes), default=0)
    for col, (name, r) in routes.items():
        with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0: not routed
            df[col] = np.where(np.isnan(r), df[col], df[col] / r)
        after += 1
        df.insert(after, name, r)
    return df


def diff_frame(a: NeuronScores, b: NeuronScores, top: int | None = None,
               by: str = "decrease") -> pd.DataFrame:
    """Per case: every neuron's imp_a, imp_b, coef_a, coef_b and diff (imp_a - imp_b), ranked
    by ``ranked_rows`` (ties by layer, neuron); ``top`` keeps each case's best."""
    if a.imp.shape != b.imp.shape or a.case_ids != b.case_ids:
        raise CnaError("runs A and B differ in shape or cases: cannot compare them")
    return ranked_rows(a.imp - b.imp, a.imp, b.imp, a.coef, b.coef, a.case_ids, top, by,
                       shape=getattr(a, "shape", None), route_a=getattr(a, "route", None),
                       route_b=getattr(b, "route", None))[0]


__all__ = ["RANKINGS", "NeuronScores", "diff_frame", "expert_columns", "position_scores",
           "rank_key", "rank_order", "ranked_rows", "score_heads", "score_neurons"]
