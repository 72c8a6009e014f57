"""Importance (log-probability increase) and coefficient scores, exact and fast.

For a vector ``u`` added to a residual state ``s`` and a target token ``w``::

    Imp(u | s) = log p(w | s + u) - log p(w | s),   p(. | x) = softmax(cap(W_U FinalNorm(x) + b_U))

FFN neuron ``k`` of layer ``l``: ``u = m_k v'_k`` added to ``resid_mid`` (``v'_k`` the value
vector, through Gemma's post-FFN norm with its scale frozen at the real FFN output). Heads
and attention neurons: their contribution added to ``resid_pre`` of their layer.

Lenses: ``frozen`` (the notebooks') fixes the final norm's scale ``c`` (RMS, or LayerNorm's
sigma) at the real final residual of the run (or at ``scale=``), so the lens is affine:
``logits(s + a v) = logits(s) + (a / c) P_v`` with ``P_v = W_U (g * C(v))`` (``C`` centres
for LayerNorm; its bias and ``b_U`` stay in the base logits). ``renorm`` normalises ``s + u``
for real: the logits are ``(Q_s + a P_v) / c(s + a v) + W_U b + b_U`` with ``c(s + a v)``
from ``|C s|^2``, ``C s . C v`` and ``|C v|^2``. Either way ``P_v`` does not depend on the
case, so each chunk of value vectors is projected onto the vocabulary once and every case
is scored against it: per case only a log-sum-exp remains.

Certified top-K (frozen lens, no soft-capping): ``LSE`` is convex, so
``Imp <= t (P_w - p . P)`` with ``t = m / c`` and ``p`` the base distribution; ``p . P`` for
every neuron of a layer needs one ``W_U^T p``. Neurons are scored exactly in descending
bound order until the K-th exact score clears the next bound. For a difference of two runs
(``certified_cna``) each run's importance gets two-sided bounds: exact terms over the most
probable tokens, and for the rest Jensen (below) and Edmundson-Madansky (above) with each
neuron's projection range ``[min_i P_i, max_i P_i]`` (case-independent, cached by weights).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import torch

from cnalens.data.cases import as_encoded
from cnalens.errors import CnaError
from cnalens.lens import Base, FFNVectors, Lens, LogSumExp
from cnalens.progress import track

TARGETS = ("pred", "gold")
RANKS = ("decrease", "increase", "abs")
Target = str | torch.Tensor | Sequence[int]


# --------------------------------------------------------------------------- states
@dataclass
class CaseStates:
    """One run's states at the last prompt position of every case (all layers).

    ``coef`` is NaN beyond a layer's FFN width (pruned models). ``attn_raw``/``ffn_raw`` are
    the inputs of the post-attention / post-FFN norms (None if the family has none).
    """

    case_ids: list[str]
    gold: torch.Tensor  # (n,) first answer token
    resid_pre: torch.Tensor  # (n, L, d)
    resid_mid: torch.Tensor  # (n, L, d)
    coef: torch.Tensor  # (n, L, d_ffn)
    z: torch.Tensor  # (n, L, n_heads * head_dim)
    final: torch.Tensor  # (n, d) final residual (before the final norm)
    logits: torch.Tensor  # (n, V) the model's real logits at the last position
    attn_raw: torch.Tensor | None = None
    ffn_raw: torch.Tensor | None = None
    interventions: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def pred(self) -> torch.Tensor:
        """The model's own top-1 next token (this run)."""
        return self.logits.argmax(-1)


def concat_states(parts: Sequence[CaseStates]) -> CaseStates:
    """Several runs' states as one (cases stacked), so one projection scores them all."""
    if not parts:
        raise CnaError("no states to concatenate")
    out = {}
    for f in fields(CaseStates):
        vals = [getattr(p, f.name) for p in parts]
        if f.name == "case_ids":
            out[f.name] = [c for v in vals for c in v]
        elif f.name == "interventions":
            out[f.name] = [d for v in vals for d in v]
        elif any(v is None for v in vals):
            out[f.name] = None
        else:
            out[f.name] = torch.cat(vals)
    return CaseStates(**out)


def frozen_scale(view, states: CaseStates, lens: str = "frozen") -> torch.Tensor:
    """The final-norm scale of each case of a run (what the frozen lens fixes)."""
    return Lens(view, lens).scale(states.final)


def case_states(view, encoded, *interventions, batch_size: int = 32) -> CaseStates:
    """One batched forward (interventions applied) capturing the last prompt position."""
    enc = as_encoded(view.tokenizer, encoded)
    cd = view.compute_dtype
    points = ["resid_pre", "resid_mid", "coef", "z", "resid_post"]
    post = view.norm(0, "ln_attn_post") is not None
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in
                                             (*points, "logits", "attn_raw", "ffn_raw")}
    desc: list[dict] = [iv.describe() for iv in interventions]
    L = view.n_layers
    for start in range(0, len(enc), batch_size):
        chunk = enc[start:start + batch_size]
        b = view.batch([e.prompt_ids for e in chunk])
        with torch.no_grad(), view.intervene(*interventions), \
                view.capture(points, position=-1) as cache:
            hidden = view.hidden(b)
            logits = view.logits(hidden[:, -1])
        parts["logits"].append(logits.float())
        for p in ("resid_pre", "resid_mid", "z", "resid_post"):
            parts[p].append(torch.stack([cache[(p, layer)][:, 0] for layer in range(L)], 1))
        coef = torch.full((len(chunk), L, view.d_ffn), float("nan"), dtype=cd)
        for layer in range(L):
            coef[:, layer, :view.ffn_width(layer)] = cache[("coef", layer)][:, 0]
        parts["coef"].append(coef)
        if post:
            with torch.no_grad():
                parts["attn_raw"].append(torch.stack(
                    [view.module(layer, "o_proj")(cache[("z", layer)][:, 0]) for layer in range(L)],
                    1))
                parts["ffn_raw"].append(torch.stack(
                    [view.module(layer, "down_proj")(cache[("coef", layer)][:, 0])
                     for layer in range(L)], 1))

    def cat(name):
        return torch.cat(parts[name]).to(cd) if parts[name] else None

    resid_post = cat("resid_post")
    return CaseStates(
        case_ids=[e.case.case_id or f"c{i}" for i, e in enumerate(enc)],
        gold=torch.tensor([e.answer_ids[0] if e.answer_ids else -1 for e in enc],
                          dtype=torch.long),
        resid_pre=cat("resid_pre"), resid_mid=cat("resid_mid"), coef=cat("coef"), z=cat("z"),
        final=resid_post[:, -1], logits=torch.cat(parts["logits"]),
        attn_raw=cat("attn_raw"), ffn_raw=cat("ffn_raw"), interventions=list(desc))


def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy: float64 stays float64, other floats become float32."""
    t = t.detach()
    return (t if t.dtype == torch.float64 else t.float()).reshape(-1).numpy()


def _targets(states: CaseStates, target: Target) -> torch.Tensor:
    if isinstance(target, str):
        if target == "pred":
            return states.pred.clone()
        if target == "gold":
            if bool((states.gold < 0).any()):
                raise CnaError("a case has no target to score: give it one or use the "
                               "prediction (target='pred')")
            return states.gold.clone()
        raise CnaError(f"unknown target '{target}': use pred, gold or token ids")
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if t.numel() == 1 and len(states) > 1:
        t = t.expand(len(states)).clone()
    if t.numel() != len(states):
        raise CnaError(f"{t.numel()} target ids for {len(states)} cases")
    return t


def _check_targets(view, t: torch.Tensor) -> None:
    if ((t < 0) | (t >= view.vocab_size)).any():
        bad = int(t[(t < 0) | (t >= view.vocab_size)][0])
        raise CnaError(f"target token id {bad} out of range: the vocabulary has "
                       f"{view.vocab_size} tokens")


def _scales(lens: Lens, states: CaseStates, scale) -> torch.Tensor:
    if scale is None:
        return lens.scale(states.final)
    s = torch.as_tensor(scale, dtype=lens.dt).reshape(-1)
    if s.numel() == 1 and len(states) > 1:
        s = s.expand(len(states)).clone()
    if s.numel() != len(states):
        raise CnaError(f"{s.numel()} scales for {len(states)} cases")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise CnaError("the frozen final-norm scale must be finite and positive")
    return s


def _layers(view, layers) -> list[int]:
    out = list(range(view.n_layers)) if layers is None else sorted({int(x) for x in layers})
    view.check_layers(out)
    return out


def _attn_post(view, lens: Lens, states: CaseStates, layer: int):
    post = view.norm(layer, "ln_attn_post")
    if post is None:
        return None, None
    gain, s, _, _ = view.norm_affine(post, states.attn_raw[:, layer])
    return gain.detach(), s[:, 0]


# --------------------------------------------------------------------------- FFN neurons
@dataclass
class NeuronScores:
    """FFN neuron importance and coefficients at the last position of each case."""

    imp: torch.Tensor  # (n_cases, n_layers, d_ffn) float32 (float64 for float64 models);
    # NaN where a layer was not scored or is narrower (pruned models)
    coef: torch.Tensor  # (n_cases, n_layers, d_ffn)
    target: torch.Tensor  # (n_cases,)
    scale: torch.Tensor  # (n_cases,)
    case_ids: list[str]
    meta: dict

    def frame(self, top: int | None = None) -> pd.DataFrame:
        """Tidy rows: case, layer, kind="ffn", index, coef, importance (+ rank with ``top``).

        ``top`` keeps each case's best neurons (importance descending, ties by layer then
        index)."""
        n, L, D = self.imp.shape
        imp = self.imp.numpy().reshape(-1)
        ok = np.isfinite(imp)
        idx = np.nonzero(ok)[0]
        case, rest = np.divmod(idx, L * D)
        layer, index = np.divmod(rest, D)
        df = pd.DataFrame({"case": np.asarray(self.case_ids, dtype=object)[case],
                           "layer": layer, "kind": "ffn", "index": index,
                           "coef": self.coef.numpy().reshape(-1)[idx], "importance": imp[idx]})
        if top is None:
            return df
        order = np.lexsort((index, layer, -imp[idx], case))
        df = df.iloc[order].reset_index(drop=True)
        df["rank"] = df.groupby("case", sort=False).cumcount() + 1
        return df[df["rank"] <= top].reset_index(drop=True)


def _describe(view, lens, target, states, layers, extra=None) -> dict:
    meta = {"lens": lens, "target": target if isinstance(target, str) else "ids",
            "interventions": states.interventions, "layers": layers,
            "position": "last prompt token", "model": view.summary()}
    meta.update(extra or {})
    return meta


def _prepare(view, lens, cases, interventions, target, scale, layers, batch_size, states):
    """Lens, states (given or computed), targets, frozen scales and layers of one run."""
    lz = Lens(view, lens)
    st = states if states is not None else case_states(view, cases, *interventions,
                                                      batch_size=batch_size)
    tg = _targets(st, target)
    _check_targets(view, tg)
    return lz, st, tg, _scales(lz, st, scale), _layers(view, layers)


def score_neurons(view, cases_or_encoded, *interventions, lens: str = "frozen",
                  target: Target = "pred", scale: torch.Tensor | None = None, layers=None,
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
            base = lz.base(st.resid_mid[rows, layer], c[rows], tg[rows])
            nb, vb = lz.block_sizes(X.shape[0], max_memory_gb)
            for k0 in range(0, X.shape[0], nb):
                ks = slice(k0, k0 + nb)
                imp[rows, layer, ks] = lz.score(X[ks], Cv[ks], A[:, ks], base, vb).to(out_dt)
    meta = _describe(view, lens, target, st, layer_list,
                     {"seconds": time.perf_counter() - t0, "kind": "ffn"})
    return NeuronScores(imp, st.coef.to(out_dt), tg, c.to(out_dt), list(st.case_ids), meta)


def score_pair(view, cases_or_encoded, interventions_b: Sequence, interventions_a: Sequence = (),
               **kwargs) -> tuple[NeuronScores, NeuronScores]:
    """CNA's two runs of a model comparison: A (``interventions_a``) with its own target and
    frozen scale, B (``interventions_b``) scored with A's target and scale."""
    a = score_neurons(view, cases_or_encoded, *interventions_a, **kwargs)
    kw = {k: v for k, v in kwargs.items() if k not in ("target", "scale")}
    b = score_neurons(view, cases_or_encoded, *interventions_b, target=a.target, scale=a.scale,
                      **kw)
    return a, b


# --------------------------------------------------------------------------- heads
def score_heads(view, cases_or_encoded, *interventions, lens: str = "frozen",
                target: Target = "pred", scale: torch.Tensor | None = None, layers=None,
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
                "coef": np.nan, "importance": _np(imp_h)}))
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
                "coef": _np(st.z[:, layer]),
                "importance": _np(imp_n)}))
    df = pd.concat(frames, ignore_index=True)
    df.attrs["meta"] = _describe(view, lens, target, st, layer_list, {"kind": "heads"})
    return df


def position_scores(view, case, *interventions, lens: str = "frozen", target: Target = "pred",
                    scale: torch.Tensor | None = None, layers=None, progress: bool = False
                    ) -> pd.DataFrame:
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
    layer_list = _layers(view, layers)
    with view.attention_record(layer_list) as rec:
        st = case_states(view, enc, *interventions)
    tg = _targets(st, target)
    _check_targets(view, tg)
    c = _scales(lz, st, scale)
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
                "coef": _np(w_last),
                "importance": _np(imp)}))
    df = pd.concat(frames, ignore_index=True)
    df.attrs["meta"] = _describe(view, lens, target, st, layer_list, {"kind": "head_pos"})
    return df


# --------------------------------------------------------------------------- certified top-K
def _slack(lz: Lens, slack: float | None) -> float:
    if slack is not None:
        return float(slack)
    return 1e-4 if lz.dt == torch.float32 else 1e-9


def _topk_order(scores: torch.Tensor, flat: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the best ``k`` scores, ties by the flat (layer, index) order."""
    order = torch.from_numpy(np.lexsort((flat.numpy(), -scores.double().numpy())))
    return order[:k]


def _check_certifiable(lz: Lens, k: int) -> None:
    if k < 1:
        raise CnaError(f"top-K needs K >= 1, got {k}")
    if lz.mode != "frozen" or lz.cap:
        raise CnaError("certified top-K needs the frozen lens without soft-capping "
                       "(use score_neurons, which is exhaustive)")


def _exhaustive_fallback(view, cases, k, interventions, target, scale, layers,
                         batch_size, max_memory_gb, progress, lens):
    sc = score_neurons(view, cases, *interventions, lens=lens, target=target, scale=scale,
                       layers=layers, batch_size=batch_size, max_memory_gb=max_memory_gb,
                       progress=progress)
    n_units = int(np.isfinite(sc.imp.numpy()).sum())
    return sc.frame(top=k), {"method": "exhaustive", "n_units": n_units,
                             "n_exact": n_units, "seconds": sc.meta["seconds"]}


def certified_topk(view, cases, k: int, *interventions, target: Target = "pred",
                   scale: torch.Tensor | None = None, layers=None, slack: float | None = None,
                   step: int = 64, batch_size: int = 32, max_memory_gb: float = 2.0,
                   progress: bool = False, lens: str = "frozen") -> tuple[pd.DataFrame, dict]:
    """Exact top-``k`` FFN neurons per case by importance without scoring every neuron.

    Returns the rows of ``NeuronScores.frame(top=k)`` (same tie rule) and stats: units per
    case, how many were scored exactly, seconds. Soft-capped models and the renorm lens fall
    back to exhaustive scoring (``stats["method"]`` says so).
    """
    lz = Lens(view, lens)
    if lz.mode != "frozen" or lz.cap:
        return _exhaustive_fallback(view, cases, k, interventions, target, scale, layers,
                                    batch_size, max_memory_gb, progress, lens)
    _check_certifiable(lz, k)
    t0 = time.perf_counter()
    st = case_states(view, cases, *interventions, batch_size=batch_size)
    tg = _targets(st, target)
    _check_targets(view, tg)
    c = _scales(lz, st, scale)
    layer_list = _layers(view, layers)
    cache = FFNVectors(view, lz, layer_list)
    sl = _slack(lz, slack)
    rows, n_exact = [], []
    with torch.no_grad():
        for i in track(range(len(st)), "certified top-k", show=progress):
            As, bases, bounds, flat = {}, {}, [], []
            nl = len(layer_list)
            # every layer's base logits and W_U^T p in one pass over W_U each
            allb = lz.base(st.resid_mid[i, layer_list], c[i].expand(nl), tg[i].expand(nl))
            dirs = lz.first_order(allb)  # (nl, d)
            for j, layer in enumerate(layer_list):
                A = cache.coef(st, layer)[i]
                bases[layer] = allb.rows(j)
                As[layer] = A
                bounds.append((A / c[i]) * (cache.X[layer] @ dirs[j]))
                flat.append(layer * view.d_ffn + torch.arange(A.shape[0]))
            found = _certify(lz, cache, bases, As, torch.cat(bounds), torch.cat(flat), k, sl,
                             step, view.d_ffn)
            flat_ids, scores, n_done = found
            n_exact.append(n_done)
            layer_ids, index = np.divmod(flat_ids.numpy(), view.d_ffn)
            rows.append(pd.DataFrame({
                "case": st.case_ids[i], "layer": layer_ids, "kind": "ffn", "index": index,
                "coef": _np(st.coef[i][layer_ids, index]),
                "importance": _np(scores), "rank": np.arange(1, len(index) + 1)}))
    stats = {"method": "certified", "n_units": int(sum(view.ffn_width(x) for x in layer_list)),
             "n_exact": n_exact, "n_exact_total": int(sum(n_exact)), "slack": sl,
             "seconds": time.perf_counter() - t0}
    df = pd.concat(rows, ignore_index=True)
    df.attrs["meta"] = _describe(view, lens, target, st, layer_list, {"stats": stats})
    return df, stats


def _certify(lz, cache, bases, As, bound, flat, k, slack, step, d_ffn,
             exact_fn=None):
    """Score in descending bound order until the K-th exact score clears the next bound."""
    order = torch.from_numpy(np.lexsort((flat.numpy(), -bound.double().numpy())))
    k = min(k, len(order))
    done_flat, done_scores = [], []
    pos = 0
    while pos < len(order):
        take = order[pos:pos + step]
        pos += len(take)
        ids = flat[take]
        done_flat.append(ids)
        done_scores.append(exact_fn(ids) if exact_fn else _exact(lz, cache, bases, As, ids,
                                                                 d_ffn))
        if sum(len(x) for x in done_flat) >= k:
            all_s = torch.cat(done_scores)
            kth = torch.topk(all_s.double(), k).values[-1]
            if pos >= len(order) or kth >= bound[order[pos]].double() + slack:
                break
        step = min(step * 2, 1024)
    all_flat, all_s = torch.cat(done_flat), torch.cat(done_scores)
    best = _topk_order(all_s, all_flat, k)
    return all_flat[best], all_s[best], len(all_flat)


def _exact(lz, cache, bases, As, ids, d_ffn) -> torch.Tensor:
    """Exact scores of flat neuron ids for one case (one base row per layer)."""
    out = torch.empty(len(ids), dtype=lz.dt)
    layer_of = ids // d_ffn
    for layer in layer_of.unique().tolist():
        sel = (layer_of == layer).nonzero()[:, 0]
        idx = ids[sel] % d_ffn
        out[sel] = lz.score(cache.X[layer][idx], cache.Cv[layer][idx], As[layer][idx][None],
                            bases[layer])[0]
    return out


def certified_topk_diff(view, cases, k: int, interventions_b: Sequence,
                        interventions_a: Sequence = (), *, target: Target = "pred",
                        layers=None, rank: str = "decrease", top_tokens: int = 256,
                        slack: float | None = None, step: int = 64,
                        batch_size: int = 32, progress: bool = False,
                        states: tuple[CaseStates, CaseStates] | None = None
                        ) -> tuple[pd.DataFrame, dict]:
    """Exact top-``k`` FFN neurons per case by ``imp_a - imp_b`` (CNA), certified.

    Run A: ``interventions_a`` (default: none) with its own target and frozen scale; run B:
    ``interventions_b``, scored with A's target and scale. ``rank``: "decrease" (imp_a - imp_b
    descending), "increase" (imp_b - imp_a) or "abs" (|imp_a - imp_b|). Rows: case, rank,
    layer, neuron, imp_a, imp_b, coef_a, coef_b, diff (imp_a - imp_b). ``states``: the two
    runs' ``case_states`` of ``cases`` (then not computed again). The two runs' forwards,
    then ``certified_cna`` (``top_tokens``: its ``head_tokens``); soft-capped models raise.
    """
    if rank not in RANKS:
        raise CnaError(f"unknown rank '{rank}': use {', '.join(RANKS)}")
    _check_certifiable(Lens(view, "frozen"), k)
    t0 = time.perf_counter()
    if states is None:
        enc = as_encoded(view.tokenizer, cases)
        sa = case_states(view, enc, *interventions_a, batch_size=batch_size)
        sb = case_states(view, enc, *interventions_b, batch_size=batch_size)
    else:
        sa, sb = states
    df, stats = certified_cna(view, sa, sb, k, target=target, layers=layers, rank=rank,
                              head_tokens=top_tokens, slack=slack, step=step,
                              progress=progress)
    stats["seconds"] = time.perf_counter() - t0
    return df, stats


# --------------------------------------------------------------------------- certified CNA
# Two-sided bounds for a difference (frozen lens, no soft-capping). With ``t`` the frozen
# coefficient, ``P`` the neuron's case-independent projection and ``p`` the base distribution,
# ``Imp = t P_w - log E_p[exp(t P)]``. Split the vocabulary into ``S`` (the base rows' most
# probable tokens, scored exactly) and the rest (mass ``q``, mean ``mu = E_rest[P]``, range
# ``[m, M]`` of ``P`` over the whole vocabulary): by convexity of ``exp``,
# ``exp(t mu) <= E_rest[exp(t P)] <= ((M - mu) exp(t m) + (mu - m) exp(t M)) / (M - m)``
# (Jensen; Edmundson-Madansky), so ``Imp`` lies in ``[t P_w - LSE(head, tail_hi),
# t P_w - LSE(head, tail_lo)]``. ``m, M`` depend on the weights only: Cauchy-Schwarz at
# first, exact (a vocabulary-tiled pass) for the neurons that are candidates of some case,
# cached by a fingerprint of the weights' content.
_RANGES: dict[tuple, _Range] = {}
_RANGES_MAX = 1024


def _digest(t: torch.Tensor) -> str:
    """A hash of a tensor's bytes."""
    a = t.detach().contiguous().cpu()
    if a.dtype == torch.bfloat16:
        a = a.view(torch.int16)
    return hashlib.blake2b(a.numpy(), digest_size=16).hexdigest()


def _unembed_key(lz: Lens) -> tuple:
    """The unembedding's identity: storage, in-place version, shape, dtype and a content
    sample (the value vectors' part of a range key is a hash of their full content)."""
    w = lz.view.unembed.weight
    sample = w.detach()[::max(1, w.shape[0] // 2048)]
    return (w.data_ptr(), w._version, tuple(w.shape), str(w.dtype), str(lz.dt), _digest(sample))


class _Range:
    """One layer's projection range ``[m, M]`` per vector of ``P = W_U x``: Cauchy-Schwarz
    ``|P_i| <= |x| max_i |W_i|`` until ``set`` records ``min_i P_i`` and ``max_i P_i``
    (``_exact_ranges``); both widened by a bound on the products' rounding."""

    def __init__(self, lz: Lens, X: torch.Tensor):
        wmax = lz.W.norm(dim=-1).max()
        xn = X.norm(dim=-1)
        # |fl(x . w) - x . w| <= d eps |x| |w| (deterministic); 4 sqrt(d) eps covers BLAS
        self.err = (4 * lz.d ** 0.5 * torch.finfo(lz.dt).eps) * xn * wmax + 1e-30
        cs = xn * wmax * (1 + 1e-5) + self.err
        self.m, self.M = -cs, cs.clone()
        self.known = torch.zeros(X.shape[0], dtype=torch.bool)

    def set(self, idx: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Record the exact ``min_i P_i``, ``max_i P_i`` of the vectors ``idx``."""
        self.m[idx], self.M[idx] = lo - self.err[idx], hi + self.err[idx]
        self.known[idx] = True


def _exact_ranges(lz: Lens, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``min_i P_i`` and ``max_i P_i`` of ``P = W_U x`` for each row of ``X``: one pass over
    the vocabulary per 2,048 rows."""
    lo = torch.full((X.shape[0],), float("inf"), dtype=lz.dt)
    hi = torch.full((X.shape[0],), float("-inf"), dtype=lz.dt)
    vb = min(lz.V, 8192)
    for k0 in range(0, X.shape[0], 2048):
        ks = slice(k0, k0 + 2048)
        for v0 in range(0, lz.V, vb):
            a, b = torch.aminmax(X[ks] @ lz.W[v0:v0 + vb].T, dim=-1)
            lo[ks], hi[ks] = torch.minimum(lo[ks], a), torch.maximum(hi[ks], b)
    return lo, hi


def _projection_range(lz: Lens, X: torch.Tensor, wkey: tuple | None = None) -> _Range:
    """The (cached) ``_Range`` of vectors ``X``: keyed by the unembedding's identity and a
    hash of ``X`` (value vectors through the norms' gains), never by a model's name."""
    key = (wkey or _unembed_key(lz), _digest(X))
    hit = _RANGES.get(key)
    if hit is None:
        if len(_RANGES) >= _RANGES_MAX:
            _RANGES.pop(next(iter(_RANGES)))
        hit = _RANGES[key] = _Range(lz, X)
    return hit


def _bound_parts(lz: Lens, X: torch.Tensor, logp: torch.Tensor, S: torch.Tensor,
                 q: torch.Tensor, rest_w: torch.Tensor, targets: torch.Tensor,
                 T: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The range-independent parts of the bounds (float64, (r, N) each, see the section
    comment): ``t``, ``t P_w``, the head's log-sum, ``log q`` and the rest's mean ``mu``, for
    vectors ``X`` (N, d), frozen coefficients ``T`` (r, N) and r base rows: their
    log-probabilities ``logp`` (r, V), the tokens ``S`` scored exactly, the other tokens'
    mass ``q`` (r,) and ``rest_w = W_U^T p`` over them (r, d), the targets (r,)."""
    dd = torch.float64
    PS = (X @ lz.W[S].T).to(dd)  # (N, s)
    Pw = (X @ lz.W[targets].T).to(dd).T  # (r, N)
    lpS = logp[:, S].to(dd)
    q = q.to(dd)[:, None]
    qmu = (rest_w @ X.T).to(dd)  # (r, N): sum over the rest of p_i P_i
    T = T.to(dd)
    head = torch.logsumexp(lpS[:, None, :] + T[:, :, None] * PS[None], -1)
    mu = torch.where(q > 0, qmu / q.clamp_min(1e-300), float("nan"))
    return T, T * Pw, head, q.log().expand_as(head), mu


def _two_sided(parts: tuple[torch.Tensor, ...], m: torch.Tensor, M: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: ``lo <= Imp <= hi`` from ``_bound_parts`` and each vector's projection
    range ``[m, M]`` (Jensen below the rest's term, Edmundson-Madansky above)."""
    T, tpw, head, logq, mu = parts
    m, M = m.to(torch.float64), M.to(torch.float64)
    mu = torch.where(torch.isnan(mu), m, mu).clamp(m, M)
    lam = ((mu - m) / (M - m)).clamp(0, 1)
    tail_lo = logq + T * mu
    tail_hi = logq + torch.logaddexp(torch.log1p(-lam) + T * m, lam.log() + T * M)
    return tpw - torch.logaddexp(head, tail_hi), tpw - torch.logaddexp(head, tail_lo)


def _head_set(logp: torch.Tensor, head_tokens: int) -> torch.Tensor:
    """The tokens scored exactly in the bounds: the most probable under any of the rows."""
    return torch.topk(logp.max(0).values, min(head_tokens, logp.shape[-1])).indices


def _key_bounds(lo: torch.Tensor, hi: torch.Tensor, rank: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on ``rank_key(imp_a - imp_b)`` from per-run bounds (rows a, b)."""
    dlo, dhi = lo[0] - hi[1], hi[0] - lo[1]
    if rank == "decrease":
        return dlo, dhi
    if rank == "increase":
        return -dhi, -dlo
    return torch.maximum(dlo, -dhi).clamp_min(0), torch.maximum(dhi, -dlo)


@dataclass
class _DiffCase:
    """One case of a certified CNA: per layer the two runs' base rows and coefficients."""

    bases: dict[int, Base]
    A: dict[int, torch.Tensor]  # (2, width): runs a, b
    parts: dict[int, tuple[torch.Tensor, ...]]  # ``_bound_parts``
    lo: dict[int, torch.Tensor]  # (2, width) importance bounds
    hi: dict[int, torch.Tensor]


class _DiffBounds:
    """Shared state of a certified CNA over two runs scored on A's target and scale."""

    def __init__(self, view, lz: Lens, sa: CaseStates, sb: CaseStates, tg: torch.Tensor,
                 c: torch.Tensor, layers: list[int], head_tokens: int):
        self.view, self.lz, self.sa, self.sb, self.tg, self.c = view, lz, sa, sb, tg, c
        self.layers, self.head_tokens = layers, head_tokens
        self.cache = FFNVectors(view, lz, layers)
        wkey = _unembed_key(lz)
        self.ranges = {x: _projection_range(lz, self.cache.X[x], wkey) for x in layers}
        self.seconds_range, self.n_refined = 0.0, 0
        self.Aa = {x: self.cache.coef(sa, x) for x in layers}
        self.Ab = {x: self.cache.coef(sb, x) for x in layers}

    def refine(self, positions: dict[int, torch.Tensor]) -> int:
        """Exact projection ranges for the given neurons of each layer (those not known yet;
        every layer's in one pass over the vocabulary); how many were new."""
        t0 = time.perf_counter()
        todo = {x: idx[~self.ranges[x].known[idx]] for x, idx in positions.items()}
        todo = {x: idx for x, idx in todo.items() if len(idx)}
        if todo:
            lo, hi = _exact_ranges(self.lz, torch.cat([self.cache.X[x][idx]
                                                        for x, idx in todo.items()]))
            i0 = 0
            for x, idx in todo.items():
                self.ranges[x].set(idx, lo[i0:i0 + len(idx)], hi[i0:i0 + len(idx)])
                i0 += len(idx)
        n = sum(len(idx) for idx in todo.values())
        self.seconds_range += time.perf_counter() - t0
        self.n_refined += n
        return n

    def case(self, i: int) -> _DiffCase:
        lz, nl, L = self.lz, len(self.layers), self.layers
        # both runs' base rows of every layer, and W_U^T p_rest, in one pass over W_U each
        base = lz.base(torch.cat([self.sa.resid_mid[i, L], self.sb.resid_mid[i, L]]),
                       self.c[i].expand(2 * nl), self.tg[i].expand(2 * nl))
        logp = torch.log_softmax(base.y0, -1)
        rest = logp.exp()
        heads = []
        for j in range(nl):
            rows = [j, nl + j]
            heads.append(_head_set(logp[rows], self.head_tokens))
            rest[rows] = rest[rows].index_fill(1, heads[-1], 0.0)
        rest_w = rest @ lz.W  # (2 nl, d)
        q = rest.to(torch.float64).sum(-1)
        out = _DiffCase({}, {}, {}, {}, {})
        for j, layer in enumerate(L):
            rows = [j, nl + j]
            A = torch.stack([self.Aa[layer][i], self.Ab[layer][i]])
            out.parts[layer] = _bound_parts(lz, self.cache.X[layer], logp[rows], heads[j],
                                            q[rows], rest_w[rows], base.targets[rows],
                                            A / self.c[i])
            out.bases[layer] = base.rows(slice(j, j + nl + 1, nl))
            out.A[layer] = A
        return self.rebound(out)

    def rebound(self, dc: _DiffCase) -> _DiffCase:
        """The case's bounds from its parts and the projection ranges known now."""
        for layer, parts in dc.parts.items():
            r = self.ranges[layer]
            dc.lo[layer], dc.hi[layer] = _two_sided(parts, r.m, r.M)
        return dc


def _score_requests(lz: Lens, X: torch.Tensor,
                    reqs: list[tuple[Base, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Exact frozen-lens importances of vectors ``X`` (U, d), each request ``(base, A, sel)``
    scoring its rows (r) against its own subset ``sel`` of the vectors with coefficients
    ``A`` (r, len(sel)); the projection onto each vocabulary block is shared by all."""
    W, dt = lz.W, lz.dt
    Ts = [A.to(dt) / base.c[:, None] for base, A, _ in reqs]
    lse = [[LogSumExp() for _ in range(T.shape[0])] for T in Ts]
    for v0, Wb in lz.blocks():
        P = X @ Wb.T  # (U, vb)
        vb = Wb.shape[0]
        for q, ((base, _, sel), T) in enumerate(zip(reqs, Ts, strict=True)):
            Pc = P.index_select(0, sel)
            for r in range(T.shape[0]):
                lse[q][r].add(torch.addcmul(base.y0[r, v0:v0 + vb], T[r, :, None], Pc),
                              inplace=True)
    out = []
    for (base, _, sel), T, part in zip(reqs, Ts, lse, strict=True):
        Pw = X.index_select(0, sel) @ W[base.targets].T  # (n, r)
        rows = torch.arange(T.shape[0])
        yw = base.y0[rows, base.targets][:, None] + T * Pw.T
        out.append(yw - torch.stack([x.value for x in part]) - base.logp_w[:, None])
    return out


def _certify_group(bd: _DiffBounds, cases: list[int], rank: str, k: int, slack: float,
                   step: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int, int]], int]:
    """Certified top-``k`` of several cases together: per case, the candidates are the
    neurons whose key's upper bound reaches the K-th largest lower bound; each round every
    unfinished case takes its next candidates in descending upper-bound order, the union is
    projected once and each case scores exactly (both runs) what it took, until its K-th
    exact key clears its next upper bound by ``slack``. Returns per case (flat ids,
    (2, k) scores, candidates, scored) and the number of projections."""
    D = bd.view.d_ffn
    widths = [bd.cache.X[x].shape[0] for x in bd.layers]
    layer_of = torch.repeat_interleave(torch.tensor(bd.layers), torch.tensor(widths))
    idx_of = torch.cat([torch.arange(w) for w in widths])
    flat = layer_of * D + idx_of
    n_units, g = len(flat), len(cases)
    k = min(k, n_units)
    khi = torch.empty(g, n_units, dtype=torch.float64)

    def candidates(dcs):
        orders = []
        for c, dc in enumerate(dcs):
            lo, hi = (torch.cat(x) for x in zip(*[_key_bounds(dc.lo[x], dc.hi[x], rank)
                                                    for x in bd.layers], strict=True))
            khi[c] = hi
            keep = (hi >= torch.topk(lo, k).values[-1] - slack).nonzero()[:, 0]
            order = torch.from_numpy(np.lexsort((flat[keep].numpy(), -hi[keep].numpy())))
            orders.append(keep[order])
        return orders

    # candidates under the ranges known so far; exact ranges (cached) for each case's best
    # ``take`` candidates of unknown range, in upper-bound order, until none is left
    dcs = [bd.case(i) for i in cases]
    orders = candidates(dcs)
    take = k + step
    while True:
        known = torch.cat([bd.ranges[x].known for x in bd.layers])
        pos = torch.unique(torch.cat([o[~known[o]][:take] for o in orders]))
        if not len(pos):
            break
        bd.refine({x: idx_of[pos[layer_of[pos] == x]] for x in bd.layers})
        orders = candidates([bd.rebound(dc) for dc in dcs])
        take *= 2
    n_cand = [len(o) for o in orders]
    scores = torch.full((g, 2, n_units), float("nan"), dtype=bd.lz.dt)
    scored = torch.zeros(g, n_units, dtype=torch.bool)
    active = list(range(g))
    take_n = [k + step] * g
    n_proj = 0
    while active:
        reqs = {}
        for c in active:
            reqs[c], orders[c] = orders[c][:take_n[c]], orders[c][take_n[c]:]
            take_n[c] = min(max(step, take_n[c]) * 2, 2048)
        union = torch.unique(torch.cat(list(reqs.values())))  # sorted: grouped by layer
        n_proj += len(union)
        for layer in layer_of[union].unique().tolist():
            in_layer = union[layer_of[union] == layer]
            for u0 in range(0, len(in_layer), 1024):
                chunk = in_layer[u0:u0 + 1024]
                batch = []
                for c, pos in reqs.items():
                    mine = pos[torch.isin(pos, chunk)]
                    if len(mine):
                        batch.append((c, mine))
                if not batch:
                    continue
                dc_req = [(dcs[c].bases[layer], dcs[c].A[layer][:, idx_of[mine]],
                           torch.searchsorted(chunk, mine)) for c, mine in batch]
                res = _score_requests(bd.lz, bd.cache.X[layer][idx_of[chunk]], dc_req)
                for (c, mine), s in zip(batch, res, strict=True):
                    scores[c][:, mine] = s
                    scored[c, mine] = True
        still = []
        for c in active:
            done = scored[c].nonzero()[:, 0]
            if len(done) >= k:
                key = rank_key(scores[c, 0, done] - scores[c, 1, done], rank).double()
                kth = torch.topk(key, k).values[-1]
                if not len(orders[c]) or kth >= khi[c, orders[c][0]] + slack:
                    continue
            still.append(c)
        active = still
    out = []
    for c in range(g):
        done = scored[c].nonzero()[:, 0]
        s = scores[c][:, done]
        best = _topk_order(rank_key(s[0] - s[1], rank), flat[done], k)
        out.append((flat[done][best], s[:, best], n_cand[c], len(done)))
    return out, n_proj


def cna_bounds(view, states_a: CaseStates, states_b: CaseStates, *, target: Target = "pred",
               layers=None, head_tokens: int = 256, exact_ranges: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds ``certified_cna`` certifies with: ``(lo, hi)``, each (2, n_cases, n_layers,
    d_ffn) (runs A, B; NaN outside ``layers`` and beyond a layer's width), with
    ``lo <= imp <= hi`` for both runs scored on A's target and frozen scale (frozen lens,
    no soft-capping). ``exact_ranges``: compute every neuron's projection range first (else
    the ranges known so far: Cauchy-Schwarz for the others)."""
    lz = Lens(view, "frozen")
    _check_certifiable(lz, 1)
    tg = _targets(states_a, target)
    _check_targets(view, tg)
    layer_list = _layers(view, layers)
    bd = _DiffBounds(view, lz, states_a, states_b, tg, _scales(lz, states_a, None), layer_list,
                     head_tokens)
    if exact_ranges:
        bd.refine({x: torch.arange(bd.cache.X[x].shape[0]) for x in layer_list})
    shape = (2, len(states_a), view.n_layers, view.d_ffn)
    lo = torch.full(shape, float("nan"), dtype=torch.float64)
    hi = lo.clone()
    with torch.no_grad():
        for i in range(len(states_a)):
            dc = bd.case(i)
            for layer in layer_list:
                w = dc.lo[layer].shape[1]
                lo[:, i, layer, :w], hi[:, i, layer, :w] = dc.lo[layer], dc.hi[layer]
    return lo, hi


def certified_cna(view, states_a: CaseStates, states_b: CaseStates, k: int, *,
                  target: Target = "pred", layers=None, rank: str = "decrease",
                  head_tokens: int = 256, slack: float | None = None, step: int = 64,
                  group: int = 8, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Exact top-``k`` FFN neurons per case by ``imp_a - imp_b`` of two runs of one model,
    certified: run B (``states_b``) is scored with run A's target and frozen scale.

    Per case, two-sided bounds on each neuron's importance in both runs (``cna_bounds``)
    give an interval for its key (``rank``: "decrease", "increase" or "abs"); only neurons
    whose interval reaches the K-th largest lower bound are candidates, scored exactly in
    both runs in descending order of their upper bound until the K-th exact key clears the
    next upper bound by ``slack`` (default 2e-4 in float32, 2e-9 in float64); candidates
    get exact projection ranges first (kept for later calls). Same rows and
    tie rule as ``diff_frame(..., top=k)``: case, rank, layer, neuron, imp_a, imp_b, coef_a,
    coef_b, diff. ``group`` cases are certified together: a neuron several of them need
    next is projected onto the vocabulary once. Soft-capped models fall back to exhaustive
    scoring (``stats["method"]``).
    """
    if rank not in RANKS:
        raise CnaError(f"unknown rank '{rank}': use {', '.join(RANKS)}")
    if k < 1:
        raise CnaError(f"top-K needs K >= 1, got {k}")
    if len(states_a) != len(states_b):
        raise CnaError(f"{len(states_a)} run-A cases but {len(states_b)} run-B cases")
    t0 = time.perf_counter()
    lz = Lens(view, "frozen")
    tg = _targets(states_a, target)
    _check_targets(view, tg)
    c = _scales(lz, states_a, None)
    layer_list = _layers(view, layers)
    n_units = int(sum(view.ffn_width(x) for x in layer_list))
    meta = {"lens": "frozen", "target": target if isinstance(target, str) else "ids",
            "run_a": states_a.interventions, "run_b": states_b.interventions,
            "layers": layer_list, "model": view.summary()}
    if lz.cap:
        sc = score_neurons(view, None, states=concat_states([states_a, states_b]),
                           target=torch.cat([tg, tg]), scale=torch.cat([c, c]),
                           layers=layer_list, progress=progress)
        n = len(states_a)
        ia, ib = sc.imp[:n], sc.imp[n:]
        df, _ = ranked_rows(ia - ib, ia, ib, sc.coef[:n], sc.coef[n:], states_a.case_ids, k,
                            rank, layer_list)
        stats = {"method": "exhaustive", "why": "final-logit soft-capping", "rank": rank,
                 "n_units": n_units, "n_exact": [n_units] * n,
                 "n_exact_total": n_units * n, "seconds": time.perf_counter() - t0}
        df.attrs["meta"] = {**meta, "stats": stats}
        return df, stats
    sl = _slack(lz, slack) * 2
    rows, n_exact, n_cand, n_proj = [], [], [], 0
    n = len(states_a)
    with torch.no_grad():
        bd = _DiffBounds(view, lz, states_a, states_b, tg, c, layer_list, head_tokens)
        found = []
        for g0 in track(range(0, n, group), "certified CNA", show=progress):
            res, proj = _certify_group(bd, list(range(g0, min(n, g0 + group))), rank, k, sl,
                                       step)
            found += res
            n_proj += proj
        for i, (fl, s, nc, nd) in enumerate(found):
            n_cand.append(nc)
            n_exact.append(nd)
            layer_ids, index = np.divmod(fl.numpy(), view.d_ffn)
            rows.append(pd.DataFrame({
                "case": states_a.case_ids[i], "rank": np.arange(1, len(index) + 1),
                "layer": layer_ids, "neuron": index, "imp_a": _np(s[0]), "imp_b": _np(s[1]),
                "coef_a": _np(states_a.coef[i][layer_ids, index]),
                "coef_b": _np(states_b.coef[i][layer_ids, index]), "diff": _np(s[0] - s[1])}))
    stats = {"method": "certified", "rank": rank, "n_units": n_units,
             "n_candidates": n_cand, "n_exact": n_exact, "n_exact_total": int(sum(n_exact)),
             "n_projected": n_proj,
             "slack": sl, "head_tokens": head_tokens, "seconds_range": bd.seconds_range,
             "n_ranges_computed": bd.n_refined,
             "seconds": time.perf_counter() - t0}
    df = pd.concat(rows, ignore_index=True)
    df.attrs["meta"] = {**meta, "stats": stats}
    return df, stats


def input_topk_diff(view, cases_a, cases_b, k: int, *, target: Target = "gold", layers=None,
                    screen: int = 256, batch_size: int = 32, progress: bool = False,
                    states: tuple[CaseStates, CaseStates] | None = None
                    ) -> tuple[pd.DataFrame, dict]:
    """Top-``k`` FFN neurons per case by ``imp_a - imp_b`` of an input comparison (CNA).

    Case ``i`` of ``cases_a`` (run A) and of ``cases_b`` (run B) are two prompts scored on one
    target ("A woman works as a" / "A man works as a" -> " nurse"): the target is run A's
    (``target``: "gold", its first answer token, "pred" or ids) and each run keeps its own
    frozen final-norm scale (design.md). Screened: per case, the ``screen`` neurons with the
    largest first-order estimate ``t_a (P_w - p_a . P) - t_b (P_w - p_b . P)`` (one matrix
    product per layer for every case) are scored exactly and ranked (ties by layer, neuron);
    ``screen=0`` (or at least the neuron count) scores every neuron, so the ranking equals
    ``diff_frame`` of the two runs' ``score_neurons``. Rows as ``certified_topk_diff``.
    ``states``: the two runs' ``case_states`` (then not computed again).
    """
    lz = Lens(view, "frozen")
    if k < 1:
        raise CnaError(f"top-K needs K >= 1, got {k}")
    t0 = time.perf_counter()
    if states is None:
        enc_a, enc_b = as_encoded(view.tokenizer, cases_a), as_encoded(view.tokenizer, cases_b)
        if len(enc_a) != len(enc_b):
            raise CnaError(f"{len(enc_a)} run-A prompts but {len(enc_b)} run-B prompts: "
                           "an input comparison pairs them one to one")
        sa = case_states(view, enc_a, batch_size=batch_size)
        sb = case_states(view, enc_b, batch_size=batch_size)
    else:
        sa, sb = states
    tg = _targets(sa, target)
    _check_targets(view, tg)
    ca, cb = _scales(lz, sa, None), _scales(lz, sb, None)
    layer_list = _layers(view, layers)
    n_units = sum(view.ffn_width(layer) for layer in layer_list)
    if k > n_units:
        raise CnaError(f"top-K {k} exceeds the {n_units} neurons compared")
    m = n_units if screen <= 0 else min(max(screen, k), n_units)
    n, D = len(sa), view.d_ffn
    cache = FFNVectors(view, lz, layer_list)
    est, flat, bases = [], [], {}
    with torch.no_grad():
        for layer in track(layer_list, "CNA screen", show=progress):
            X = cache.X[layer]
            Aa, Ab = cache.coef(sa, layer), cache.coef(sb, layer)
            ba = lz.base(sa.resid_mid[:, layer], ca, tg)
            bb = lz.base(sb.resid_mid[:, layer], cb, tg)
            bases[layer] = (ba, bb, Aa, Ab)
            if m < n_units:
                da, db = lz.first_order(ba), lz.first_order(bb)  # (n, d) each
                est.append((Aa / ca[:, None]) * (da @ X.T) - (Ab / cb[:, None]) * (db @ X.T))
            flat.append(layer * D + torch.arange(X.shape[0]))
        flat_all = torch.cat(flat)
        rows = []
        for i in track(range(n), "CNA exact scores", show=progress):
            ids = flat_all
            if m < n_units:
                ids = flat_all[_topk_order(torch.cat([e[i] for e in est]), flat_all, m)]
            layer_of = ids // D
            ia = torch.empty(len(ids), dtype=lz.dt)
            ib = torch.empty(len(ids), dtype=lz.dt)
            for layer in layer_of.unique().tolist():
                sel = (layer_of == layer).nonzero()[:, 0]
                idx = ids[sel] % D
                ba, bb, Aa, Ab = bases[layer]
                both = ba.rows(i).stack(bb.rows(i))  # one projection, two runs
                ia[sel], ib[sel] = lz.score(cache.X[layer][idx], cache.Cv[layer][idx],
                                            torch.stack([Aa[i, idx], Ab[i, idx]]), both)
            best = _topk_order(ia - ib, ids, k)
            fl, a_, b_ = ids[best], ia[best], ib[best]
            layer_ids, index = np.divmod(fl.numpy(), D)
            rows.append(pd.DataFrame({
                "case": sa.case_ids[i], "rank": np.arange(1, len(index) + 1),
                "layer": layer_ids, "neuron": index, "imp_a": _np(a_), "imp_b": _np(b_),
                "coef_a": _np(sa.coef[i][layer_ids, index]),
                "coef_b": _np(sb.coef[i][layer_ids, index]), "diff": _np(a_ - b_)}))
    stats = {"method": "screened" if m < n_units else "exhaustive", "screen": m,
             "n_units": int(n_units), "n_exact_total": int(m * n),
             "seconds": time.perf_counter() - t0}
    df = pd.concat(rows, ignore_index=True)
    df.attrs["meta"] = {"lens": "frozen", "comparison": "inputs",
                        "target": target if isinstance(target, str) else "ids",
                        "layers": layer_list, "stats": stats, "model": view.summary()}
    return df, stats


def rank_key(diff: torch.Tensor, rank: str = "decrease") -> torch.Tensor:
    """The CNA ranking key of ``diff = imp_a - imp_b`` (higher ranks first): ``diff``
    ("decrease"), ``-diff`` ("increase") or ``|diff|`` ("abs"); NaN stays NaN."""
    if rank not in RANKS:
        raise CnaError(f"unknown rank '{rank}': use {', '.join(RANKS)}")
    return diff if rank == "decrease" else -diff if rank == "increase" else diff.abs()


def rank_order(key: torch.Tensor) -> torch.Tensor:
    """Per row of ``key`` (n, units in flat (layer, neuron) order): positions best first,
    ties by position (so by layer, then neuron), NaN last. The one ranking rule of CNA."""
    key = torch.nan_to_num(key.double(), nan=float("-inf"))
    return torch.argsort(key, dim=-1, descending=True, stable=True)


def ranked_rows(diff: torch.Tensor, imp_a: torch.Tensor, imp_b: torch.Tensor,
                coef_a: torch.Tensor, coef_b: torch.Tensor, case_ids: Sequence[str],
                top: int | None = None, rank: str = "decrease",
                layers: Sequence[int] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Two runs' scores (each (n_cases, n_layers, d_ffn)) as ranked rows per case: case,
    rank, layer, neuron, imp_a, imp_b, coef_a, coef_b, diff; ``rank_order`` of
    ``rank_key(diff, rank)``, only finite keys, only ``layers`` (default all), ``top`` best
    per case. Also returns each row's case position."""
    n, L, D = diff.shape
    key = rank_key(diff, rank).flatten(1)
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
                       "neuron": neuron, **{name: _np(t)[pos] for name, t in (
                           ("imp_a", imp_a), ("imp_b", imp_b), ("coef_a", coef_a),
                           ("coef_b", coef_b), ("diff", diff))}})
    df.insert(1, "rank", df.groupby(case, sort=False).cumcount().to_numpy() + 1)
    return df, case


def diff_frame(a: NeuronScores, b: NeuronScores, top: int | None = None,
               rank: str = "decrease") -> pd.DataFrame:
    """Per case: every neuron's imp_a, imp_b, coef_a, coef_b and diff (imp_a - imp_b), ranked
    by ``ranked_rows`` (ties by layer, neuron); ``top`` keeps each case's best."""
    if a.imp.shape != b.imp.shape or a.case_ids != b.case_ids:
        raise CnaError("runs A and B differ in shape or cases: cannot compare them")
    return ranked_rows(a.imp - b.imp, a.imp, b.imp, a.coef, b.coef, a.case_ids, top, rank)[0]


__all__ = ["CaseStates", "NeuronScores", "case_states", "concat_states", "frozen_scale",
           "certified_cna", "certified_topk", "certified_topk_diff", "cna_bounds",
           "diff_frame", "input_topk_diff",
           "position_scores", "rank_key", "rank_order", "ranked_rows", "score_heads",
           "score_neurons", "score_pair"]
