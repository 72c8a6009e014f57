"""Reading directions in vocabulary space: projection, attention-transformed projection,
the heads' OV circuits, and the zero-shot locator of hidden-interpretable shallow neurons.

**Projection** (the frozen final-norm lens): a residual-space vector ``v`` reads as the lens
logits ``W_U (g * C(v)) / c`` (``C`` centres for LayerNorm families, ``g`` the final
norm's gain, ``c`` its frozen scale). The norm's bias and the unembedding bias are constant
in ``v`` and belong to the base logits, so they are left out. Soft-capping (Gemma 2) is
monotone and does not change which tokens rank first; the values reported are the
uncapped lens logits (direct logit attribution units). ``c`` only rescales the values:
default 1 ("unit"), or a real scale from :func:`case_scales` / :func:`mean_scales`.

**Transform** by an upper layer ``t``'s attention value/output circuit::

    T_t(v) = Post_t( sum_h W_O[h] W_V[g(h)] (gain_in * C(v) / s_in) ) ,
    Post_t(x) = gain_post * x / s_post  (Gemma 2/3's post-attention norm; identity otherwise)

``g(h)`` is query head h's KV group (GQA). ``s_in`` is layer ``t``'s input-norm scale
at the SOURCE position (where the value is read), ``s_post`` the post-attention norm's
scale at the DESTINATION position (where the head writes); both frozen, so ``T_t`` is
linear. Biases (LayerNorm's, W_V's, W_O's) are constant in ``v`` and left out.
Attention weights are not applied (the OV circuit alone, as the paper does). Both scales
only rescale ``T_t(v)`` for every vector alike: the top tokens never depend on them.

Scales (:class:`Scales`): :func:`case_scales` takes them from one case: ``s_in`` at the
neuron's position (default: the last prompt token, where ``score_neurons`` reads the
coefficient and importance; pass the operand's position to follow the value read there),
``s_post`` and the final scale at the last token. :func:`mean_scales` (zero-shot) averages
``s_in`` over the question tokens of a dataset's prompts (few-shot prefix and BOS
excluded), ``s_post`` and the final scale over their last tokens.

Everything is batched: all neurons of a layer in one matrix product, chunked over the
vocabulary (top-k per block, then merged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from cnalens.data.cases import Case, as_encoded, question_start
from cnalens.errors import CnaError
from cnalens.lens import FFNVectors, Lens, center, final_gain, neuron_vectors, norm_scale
from cnalens.states import case_states, neuron_routes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cnalens.data.cases import CaseLike, Cases, Encoded
    from cnalens.models import ModelView

SIGNS = ("pos", "neg", "both")


# --------------------------------------------------------------------------- projection
@dataclass
class Projection:
    """Top and bottom tokens of ``n`` directions: ``top_*`` descending, ``bottom_*``
    ascending (most negative first); ``*_vals`` are lens logits (see the module doc)."""

    top_ids: torch.Tensor  # (n, k) long
    top_vals: torch.Tensor  # (n, k)
    bottom_ids: torch.Tensor  # (n, k) long
    bottom_vals: torch.Tensor  # (n, k)

    def __len__(self) -> int:
        return int(self.top_ids.shape[0])

    def side(self, sign: torch.Tensor | float | int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens a coefficient of this sign promotes: top where ``sign >= 0``, else
        bottom (with values negated, so they read as what ``sign * v`` adds)."""
        s = torch.as_tensor(sign).reshape(-1)
        if s.numel() == 1:
            s = s.expand(len(self))
        pos = (s >= 0)[:, None].to(self.top_ids.device)
        ids = torch.where(pos, self.top_ids, self.bottom_ids)
        vals = torch.where(pos, self.top_vals, -self.bottom_vals)
        return ids, vals

    def tokens(self, tokenizer: PreTrainedTokenizerBase, which: str = "top",
               k: int | None = None) -> list[list[str]]:
        """Token strings of each row (``which``: top or bottom), as the tokenizer decodes
        them one by one."""
        if which not in ("top", "bottom"):
            raise CnaError(f"which must be top or bottom, not '{which}'")
        ids = (self.top_ids if which == "top" else self.bottom_ids)[:, :k]
        return ids_to_strings(tokenizer, ids)


def ids_to_strings(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> list[list[str]]:
    """Decode each id alone: rows of token strings (``(n, k)`` ids)."""
    flat = ids.reshape(-1).tolist()
    uniq = {i: tokenizer.decode([i]) for i in set(flat)}
    k = ids.shape[-1]
    return [[uniq[i] for i in flat[r:r + k]] for r in range(0, len(flat), k)]


def _as_scale(scale, n: int, dt, what: str, device=None) -> torch.Tensor:
    """``scale`` (None, scalar or per-vector) as an (n, 1) tensor of positive values on
    ``device``."""
    if scale is None:
        return torch.ones(n, 1, dtype=dt, device=device)
    s = torch.as_tensor(scale, dtype=dt, device=device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(n)
    if s.numel() != n:
        raise CnaError(f"{s.numel()} {what} scales for {n} vectors")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise CnaError(f"the {what} scale must be finite and positive")
    return s.reshape(n, 1)


def lens_vectors(view: ModelView, vectors: torch.Tensor, scale: torch.Tensor | float | None = None
                 ) -> torch.Tensor:
    """What the vocabulary sees of residual vectors: ``g * C(v) / c`` (n, d)."""
    v = _vectors(view, vectors)
    g, centred = final_gain(view)  # the lens's X = g * C(v), without building W_U
    X = center(v, centred) * g.to(v.device)
    return X / _as_scale(scale, v.shape[0], X.dtype, "final-norm", X.device)


def _vectors(view: ModelView, vectors: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(vectors).detach()
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[-1] != view.d_model:
        raise CnaError(f"vectors must be (n, {view.d_model}), not {tuple(v.shape)}")
    return v.to(device=view.device, dtype=view.compute_dtype)


def _unembed(view: ModelView) -> torch.Tensor:
    return view.unembed.weight.detach()


@torch.no_grad()
def topk_lens(view: ModelView, X: torch.Tensor, k: int, bottom: bool = True,
              ids: torch.Tensor | None = None, vocab_block: int = 16384,
              chunk: int = 2048) -> Projection:
    """Top (and bottom) ``k`` logits of lens vectors ``X`` (n, d) over the vocabulary or
    the token ``ids`` only; chunked over vectors and vocabulary blocks."""
    W = _unembed(view)
    X = X.to(W.device)
    V = W.shape[0] if ids is None else int(ids.numel())
    k = min(k, V)
    n = X.shape[0]
    out = [torch.empty(n, k, dtype=torch.long), torch.empty(n, k, dtype=X.dtype),
           torch.empty(n, k, dtype=torch.long), torch.empty(n, k, dtype=X.dtype)]
    for r0 in range(0, n, chunk):
        x = X[r0:r0 + chunk]
        cand: list[list[torch.Tensor]] = [[], [], [], []]
        for v0 in range(0, V, vocab_block):
            rows = slice(v0, v0 + vocab_block)
            tok = (torch.arange(v0, min(V, v0 + vocab_block), device=W.device)
                   if ids is None else ids[rows].to(W.device))
            w = W[rows] if ids is None else W[tok]
            P = x @ w.to(x.dtype).T
            kk = min(k, P.shape[1])
            tv, ti = P.topk(kk, -1)
            cand[0].append(tok[ti])
            cand[1].append(tv)
            if bottom:
                bv, bi = P.topk(kk, -1, largest=False)
                cand[2].append(tok[bi])
                cand[3].append(bv)
        ti, tv = torch.cat(cand[0], 1), torch.cat(cand[1], 1)
        best, at = tv.topk(k, -1)
        sl = slice(r0, r0 + x.shape[0])
        out[0][sl], out[1][sl] = ti.gather(1, at).cpu(), best.cpu()
        if bottom:
            bi, bv = torch.cat(cand[2], 1), torch.cat(cand[3], 1)
            worst, at = bv.topk(k, -1, largest=False)
            out[2][sl], out[3][sl] = bi.gather(1, at).cpu(), worst.cpu()
    return Projection(*out)


def project(view: ModelView, vectors: torch.Tensor, *, scale: torch.Tensor | float | None = None,
            k: int = 20, vocab_block: int = 16384) -> Projection:
    """Top and bottom ``k`` tokens of residual-space ``vectors`` (n, d) through the frozen
    final norm (``scale``: None = 1, a scalar, or one per vector) and the unembedding."""
    if k < 1:
        raise CnaError("k must be at least 1")
    return topk_lens(view, lens_vectors(view, vectors, scale), k, vocab_block=vocab_block)


# --------------------------------------------------------------------------- transform
def _check_layer_head(view: ModelView, layer: int, head: int | None) -> None:
    view.check_layers([layer])
    if head is not None:
        view.check_heads([(layer, head)])


def ov_parts(view: ModelView, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_V, W_O)`` of a layer per query head: (n_heads, head_dim, d) each, W_V already
    expanded from the KV heads (GQA) and W_O as ``o_proj_by_head`` transposed."""
    dt = view.compute_dtype
    wv = view.v_proj_by_head(layer).detach().to(dt)
    group = view.n_heads // wv.shape[0]
    wv = wv.repeat_interleave(group, 0)
    wo = view.o_proj_by_head(layer).detach().to(dt).transpose(1, 2)
    return wv, wo


@torch.no_grad()
def transform(view: ModelView, vectors: torch.Tensor, layer: int, *, head: int | None = None,
              scale: torch.Tensor | float | None = None,
              post_scale: torch.Tensor | float | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Vectors (n, d) through layer ``layer``'s attention value/output circuit (module doc):
    input norm frozen at ``scale``, W_V, W_O (all heads summed, ``head`` alone, or the
    heads weighted by ``weights`` (n_heads,), e.g. their attention from one position to
    another), then the post-attention norm frozen at ``post_scale`` where the family has
    one. Scales: None = 1, a scalar, or one per vector."""
    _check_layer_head(view, layer, head)
    if weights is not None:
        weights = torch.as_tensor(weights)
    if weights is not None and (head is not None or weights.shape != (view.n_heads,)):
        raise CnaError(f"weights= takes one weight per head ({view.n_heads}), without head=")
    v = _vectors(view, vectors)
    n = v.shape[0]
    ln = view.norm(layer, "ln_attn")
    ref = torch.ones(1, view.d_model, dtype=v.dtype, device=v.device)
    gain, _, _, centred = view.norm_affine(ln, ref)
    x = center(v, centred) * gain.detach().to(v.dtype) / _as_scale(scale, n, v.dtype,
                                                                      "input-norm", v.device)
    wv, wo = ov_parts(view, layer)
    if head is None:
        z = torch.einsum("nd,hed->nhe", x, wv)
        if weights is not None:
            z = z * weights.to(z.device, z.dtype)[None, :, None]
        out = torch.einsum("nhe,hed->nd", z, wo)
    else:
        out = (x @ wv[head].T) @ wo[head]
    post = view.norm(layer, "ln_attn_post")
    if post is not None:
        pg, _, _, _ = view.norm_affine(post, ref)
        out = out * pg.detach().to(v.dtype) / _as_scale(post_scale, n, v.dtype,
                                                         "post-attention norm", v.device)
    return out


# --------------------------------------------------------------------------- scales
@dataclass
class Scales:
    """Frozen norm scales per layer: ``attn_in`` (input norm, at ``position``),
    ``attn_post`` (post-attention norm at the last token; None if the family has none),
    ``final`` (final norm at the last token)."""

    attn_in: torch.Tensor  # (n_layers,)
    attn_post: torch.Tensor | None  # (n_layers,)
    final: float
    source: str  # how they were obtained

    def at(self, layer: int) -> dict:
        """Keyword arguments for :func:`transform` at ``layer``."""
        return {"scale": self.attn_in[layer],
                "post_scale": None if self.attn_post is None else self.attn_post[layer]}


@torch.no_grad()
def _scale_states(view: ModelView, enc, batch_size: int = 32):
    """Per case: resid_pre (L, T, d) at every position, o_proj output and final residual
    at the last token. Yields (encoded chunk, resid_pre (b, L, T, d), raw (b, L, d) or None,
    final (b, d))."""
    post = view.norm(0, "ln_attn_post") is not None
    L = view.n_layers
    for s in range(0, len(enc), batch_size):
        chunk = enc[s:s + batch_size]
        b = view.batch([e.prompt_ids for e in chunk])
        with view.capture(["resid_pre", "z", "resid_post"]) as cache:
            view.hidden(b)
        pre = torch.stack([cache[("resid_pre", layer)] for layer in range(L)], 1)
        raw = None
        if post:
            raw = torch.stack([view.module(layer, "o_proj")(cache[("z", layer)][:, -1])
                               for layer in range(L)], 1)
        yield chunk, pre, raw, cache[("resid_post", L - 1)][:, -1]


def case_scales(view: ModelView, case: CaseLike, position: int = -1) -> Scales:
    """The real scales of one case (a prompt string, ``Case`` or ``Encoded``): the input
    norms' at token ``position`` (negative: from the end), the post-attention and final
    norms' at the last token."""
    if isinstance(case, str):
        case = Case(case, "?", case_id="case")
    enc = as_encoded(view.tokenizer, case)
    T = len(enc[0].prompt_ids)
    if not -T <= position < T:
        raise CnaError(f"position {position} out of range: the prompt has {T} tokens")
    (_, pre, raw, final), = list(_scale_states(view, enc, 1))
    pos = position if position < 0 else position - T  # left padding: count from the end
    attn_in = torch.stack([norm_scale(view, view.norm(layer, "ln_attn"), pre[0, layer, pos])
                           for layer in range(view.n_layers)])
    attn_post = None
    if raw is not None:
        attn_post = torch.stack([norm_scale(view, view.norm(layer, "ln_attn_post"),
                                             raw[0, layer]) for layer in range(view.n_layers)])
    fin = float(norm_scale(view, view.final_norm, final[0]))
    return Scales(attn_in, attn_post, fin, f"case {enc[0].case.prompt!r}, position {position}")


def mean_scales(view: ModelView, cases: Cases, batch_size: int = 32) -> Scales:
    """Zero-shot scales: the input norms' averaged over the question tokens of every
    prompt, the post-attention and final norms' over the prompts' last tokens."""
    enc = as_encoded(view.tokenizer, cases)
    L = view.n_layers
    tot_in = torch.zeros(L, dtype=torch.float64)
    n_in = 0
    posts, finals = [], []
    for chunk, pre, raw, final in _scale_states(view, enc, batch_size):
        T = pre.shape[2]
        for i, e in enumerate(chunk):
            start = T - len(e.prompt_ids) + question_start(view.tokenizer, e)
            for layer in range(L):
                s = norm_scale(view, view.norm(layer, "ln_attn"), pre[i, layer, start:])
                tot_in[layer] += float(s.double().sum())
            n_in += T - start
        if raw is not None:
            posts.append(torch.stack([norm_scale(view, view.norm(layer, "ln_attn_post"),
                                                  raw[:, layer]) for layer in range(L)], 1))
        finals.append(norm_scale(view, view.final_norm, final))
    dt = view.compute_dtype
    attn_post = torch.cat(posts).mean(0).to("cpu", dt) if posts else None
    return Scales((tot_in / n_in).to(dt), attn_post, float(torch.cat(finals).mean()),
                  f"mean over {len(enc)} prompts (input norms: question tokens)")


# --------------------------------------------------------------------------- heads' OV
def head_ov(view: ModelView, layer: int, head: int, tokens: Sequence[int] | None = None,
            k: int = 10,
            n_directions: int = 3) -> dict:
    """A head's OV circuit read through the vocabulary.

    ``inputs``: each input token's embedding (default: the digits 0-9 and the operator
    symbols the lexicon finds) through the circuit (unit scales), projected: the
    tokens the head writes when it attends to that token. ``directions``: the circuit's
    top singular output directions, projected (both signs)."""
    from cnalens.data.lexicon import default_probe_tokens

    _check_layer_head(view, layer, head)
    if tokens is None:
        tokens = default_probe_tokens(view.tokenizer, view.vocab_size)
    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    if ids.numel() and ((ids < 0) | (ids >= view.vocab_size)).any():
        raise CnaError(f"token ids must be in 0..{view.vocab_size - 1}")
    emb = view.embed.weight.detach()[ids.to(view.embed.weight.device)]
    inputs = project(view, transform(view, emb, layer, head=head), k=k)
    wv, wo = ov_parts(view, layer)
    ov = wo[head].T @ wv[head]  # (d, d): out <- in
    u, s, _ = torch.linalg.svd(ov, full_matrices=False)
    r = min(n_directions, int(s.numel()))
    dirs = project(view, u[:, :r].T, k=k)
    return {"input_ids": ids, "inputs": inputs, "singular_values": s[:r],
            "directions": dirs}


# --------------------------------------------------------------------------- neurons
@torch.no_grad()
def neuron_case_scores(view: ModelView, enc: Encoded, units: Sequence[tuple[int, int]],
                       target: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Coefficient and importance (frozen lens, last prompt token) of FFN neurons on one
    encoded case: ``(coef (n,), imp (n,), target id, route (n,))``. ``target``: a token id,
    or None for the case's gold first answer token if it has one, else the model's
    prediction. In a mixture of experts ``route`` is each neuron's router weight (its
    expert's; the shared expert's gate), ``coef`` the neuron's own coefficient and ``imp``
    NaN where the case was not routed to the expert (its contribution is exactly zero and
    not scored); dense layers: ``route`` NaN."""
    st = case_states(view, [enc])
    if target is None:
        tg = st.gold if enc.answer_ids else st.pred
    else:
        tg = torch.tensor([int(target)])
    lz = Lens(view, "frozen")
    c = lz.scale(st.final)
    coef = torch.empty(len(units), dtype=torch.float64)
    imp = torch.empty(len(units), dtype=torch.float64)
    route = torch.full((len(units),), float("nan"), dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _) in enumerate(units):
        by_layer.setdefault(layer, []).append(i)
    routes = None if st.route is None else neuron_routes(view, st.route)[0]  # once
    for layer, rows in by_layer.items():
        idx = torch.tensor([units[i][1] for i in rows])
        vec = FFNVectors(view, lz, [layer])
        X, Cv, A = vec.X[layer], vec.Cv[layer], vec.coef(st, layer)
        base = lz.base(st.resid_mid[:, layer], c, tg)
        imp[rows] = lz.score(X[idx], Cv[idx], A[:, idx], base)[0].double().cpu()
        coef[rows] = st.coef[0, layer, idx].double().cpu()
        routed = vec.routed(st, layer)
        if routed is not None:
            r = routes[layer, idx].double().cpu()
            on = routed[0, idx].cpu()
            route[rows] = r
            imp[rows] = torch.where(on, imp[rows], float("nan"))
            coef[rows] = torch.where(on, coef[rows] / r, float("nan"))
    return coef, imp, int(tg[0]), route


def read_neurons(view: ModelView, units: Sequence[tuple[int, int]], *,
                 case: Encoded | None = None, target: int | None = None,
                 transform_layers: Sequence[int] = (), head: tuple[int, int] | None = None,
                 sign: str | None = None, k: int = 10, position: int = -1,
                 scales: Scales | None = None) -> pd.DataFrame:
    """Top tokens of FFN neurons, untransformed and transformed, as one tidy table.

    One row per neuron, view (``untransformed``, ``T@L`` summed over heads, or
    ``T@L.H`` for ``head``) and side. The vectors are what the residual receives
    (:func:`cnalens.lens.neuron_vectors`). With a ``case`` (an encoded case), the
    coefficient and importance at its last token are given and the scales are the case's
    (:func:`case_scales` at ``position``); without, ``scales`` (e.g. :func:`mean_scales`)
    or unit scales. ``sign``: pos / neg / both; None = the coefficient's sign with a
    case, else pos. Token values are lens logits per unit coefficient."""

    if sign is not None and sign not in SIGNS:
        raise CnaError(f"unknown sign '{sign}': use {', '.join(SIGNS)}")
    units = [(int(a), int(b)) for a, b in units]
    view.check_neurons(units)
    views: list[tuple[str, int | None, int | None]] = [("untransformed", None, None)]
    for t in transform_layers:
        view.check_layers([t])
        views.append((f"T@{t}", t, None))
    if head is not None:
        view.check_heads([head])
        views.append((f"T@{head[0]}.{head[1]}", head[0], head[1]))
    coef = imp = route = None
    tgt = None
    if case is not None:
        coef, imp, tgt, route = neuron_case_scores(view, case, units, target)
        scales = case_scales(view, case, position)
    vecs = torch.cat([neuron_vectors(view, layer)[[n]] for layer, n in units])
    rows = []
    for label, t, h in views:
        X = vecs if t is None else transform(view, vecs, t, head=h,
                                             **(scales.at(t) if scales else {}))
        proj = project(view, X, scale=scales.final if scales else None, k=k)
        top_s, bot_s = proj.tokens(view.tokenizer, "top"), proj.tokens(view.tokenizer, "bottom")
        for i, (layer, n) in enumerate(units):
            c = None if coef is None else float(coef[i])
            chosen = sign or ("pos" if c is None or not c < 0 else "neg")
            sides = ("pos", "neg") if chosen == "both" else (chosen,)
            for sd in sides:
                toks = top_s[i] if sd == "pos" else bot_s[i]
                vals = proj.top_vals[i] if sd == "pos" else -proj.bottom_vals[i]
                rows.append({
                    "neuron": view.shape.neuron_name(layer, n), "layer": layer, "index": n,
                    "view": label,
                    "transform_layer": -1 if t is None else t, "head": -1 if h is None else h,
                    "side": sd, "selected_by": "coefficient" if sign is None and c is not None
                    else "option", "coef": c,
                    "importance": None if imp is None else float(imp[i]),
                    **({} if route is None or not view.shape.is_moe else
                       {"route": float(route[i])}),
                    "target": None if tgt is None else view.tokenizer.decode([tgt]),
                    "tokens": toks, "values": [round(float(x), 4) for x in vals]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- locator
__all__ = ["Projection", "Scales", "case_scales", "head_ov", "ids_to_strings", "lens_vectors",
           "mean_scales", "neuron_case_scores", "ov_parts", "project", "read_neurons",
           "topk_lens",
           "transform"]
