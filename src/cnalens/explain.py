"""The four-stage chain of one case (the paper's "3+5=" -> "8" picture), every item measured.

For one case, its arithmetic head ``Lh.h`` and a target token ``w`` (the model's own
prediction unless given), read from the output back to the input (the notebooks' route):

1. **prediction enhancing** (deep FFN neurons, layers >= Lh): CNA at the last position,
   run A = the model, run B = the head zeroed, both scored with A's target and frozen
   final-norm scale; the top ``top`` neurons by ``imp_a - imp_b``. By default the
   ranking is exact: the certified top-``top`` of ``cna.compare_runs`` (two-sided bounds on
   each neuron's importance in both runs, convexity above and Edmundson-Madansky with the
   neuron's projection range below, and only the neurons whose bounds can reach the top
   scored exactly).
   **Enhancing links**: ``link(i -> j)`` = relative drop of ``|m_j|`` (last position)
   when neuron ``i`` of a lower layer is zeroed.
2. **feature predicting** (the head): its attention over the prompt's tokens (last
   position) and, per source position ``j``, its output ``a_j W_O W_V x_j``; ``p`` = the
   question position (few-shot prefix excluded) whose output scores highest.
3. **feature transferring** (shallow attention layers, below Lh): each layer's attention
   output at ``p``, passed through the head and scored; zeroed at ``p`` for its effect.
4. **feature enhancing** (shallow FFN neurons, below Lh): every neuron at every question
   position ``q <= p``, ``m_k v_k``, scored along every one-hop route into the head:
   through attention layer ``t`` (``l < t < Lh``, its heads weighted by their real
   attention ``p <- q``), plus directly when ``q == p``. The routes are summed with the
   adjoint of :func:`cnalens.vocab.transform` (the deep key pulled back through the head,
   then through each layer ``t``: one matrix-vector product per layer and position), so
   every neuron is scored in one product per layer and position. Tokens are shown
   untransformed (``m_k v_k``) and transformed along the neuron's best route (by layer
   ``t``'s attention, the paper's "attention transformed" projection, or by the head).

**Scores** (stages 2-4) are the paper's inner products made comparable across layers: a
vector ``u`` arriving at the last position has score ``u . K`` with the deep key
``K = sum_j sign(m_j) dm_j/dx`` over the stage-1 neurons ``j``, the gradient taken through
each neuron's real FFN at the case's input with the pre-FFN norm's scale frozen. So a score
is the first-order increase of the deep neurons' coefficient sum ``sum |m_j|`` (for gated
FFNs ``dm/dx`` mixes the gate and up rows as the notebook's "up + gate score" does,
weighted by the neuron's state). Transforms use ``cnalens.vocab.transform`` with the real
norm scales (input norm at the source position, post-attention norm at the destination);
the attention weights are the real ones of the case (eager attention, recorded).

**Effects**: every element is zeroed in one batched forward, one row each, and measured:
``effect`` = drop of the target's log-probability (positive: the element helps) and
``coef_drop`` = relative drop of the stage-1 neurons' coefficient sum at the last position
(for a deep neuron: of the stage-1 neurons in higher layers). Deep neurons and the head are
zeroed at every position (as in the head scan and the verification); a shallow attention
layer (all its heads) at position ``p`` only; a shallow neuron at its own position only.
Deep neurons' enhancing links and ``coef_drop`` come from the same rows' captures.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cnalens.data.arithmetic import case_from_prompt
from cnalens.data.cases import Case, Encoded, encode_prompt, question_start
from cnalens.errors import CnaError
from cnalens.lens import norm_scale

if TYPE_CHECKING:
    from cnalens.models import ModelView

STAGES = ("feature enhancing", "feature transferring", "feature predicting",
          "prediction enhancing")
COLUMNS = ("case", "prompt", "target", "stage", "kind", "name", "layer", "index", "position",
           "token", "tokens", "tokens_transformed", "score", "effect", "coef_drop", "coef",
           "detail")


@dataclass
class Chain:
    """One explained case: ``elements`` (one row per chain element, :data:`COLUMNS`),
    ``links`` (deep neuron -> deep neuron: relative drop of the upper one's |m| when the
    lower one is zeroed) and ``meta`` (prompt tokens, the head's attention, positions)."""

    elements: pd.DataFrame
    links: pd.DataFrame
    meta: dict

    def stage(self, name: str) -> pd.DataFrame:
        return self.elements[self.elements["stage"] == name]


# --------------------------------------------------------------------------- cases
def target_id(view: ModelView, target: str | int | None) -> int | None:
    """A target given as text must be exactly one token; ids must be in the vocabulary."""
    if target is None:
        return None
    if isinstance(target, int):
        if not 0 <= target < view.vocab_size:
            raise CnaError(f"target id {target} out of range 0..{view.vocab_size - 1}")
        return target
    ids = list(view.tokenizer(target, add_special_tokens=False).input_ids)
    if len(ids) != 1:
        toks = [view.tokenizer.decode([i]) for i in ids]
        raise CnaError(f"target {target!r} is {len(ids)} tokens {toks}: give one token")
    return int(ids[0])


# --------------------------------------------------------------------------- helpers
def _ffn_norm(view: ModelView, layer: int):
    """The norm in front of a layer's FFN and whether it reads resid_pre (parallel blocks)."""
    mod = view.norm(layer, "ln_ffn")
    return (mod if mod is not None else view.norm(layer, "ln_attn")), view.family.parallel


def deep_key(view: ModelView, resid_in: dict[int, torch.Tensor], neurons: list[tuple[int, int]],
             coef: torch.Tensor) -> torch.Tensor:
    """``K = sum_j sign(m_j) dm_j/dx`` (d,): the first-order increase of ``sum_j |m_j|``
    per unit vector added to the residual, each FFN's input norm frozen at its real scale.

    ``resid_in[layer]``: the FFN's residual input at the last position (d,); ``coef``:
    the neurons' real coefficients (for their signs)."""
    dt = view.compute_dtype
    K = torch.zeros(view.d_model, dtype=dt, device=view.device)
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _) in enumerate(neurons):
        by_layer.setdefault(layer, []).append(i)
    for layer, rows in by_layer.items():
        idx = torch.tensor([neurons[i][1] for i in rows])
        sign = torch.sign(coef[rows]).to(view.device, dt)
        norm, _ = _ffn_norm(view, layer)
        ref = resid_in[layer].detach().to(dt)
        got = {}

        def grab(m, got=got):
            got["m"] = m
            return m

        with torch.enable_grad(), view.edit("coef", layer, grab):
            x = ref.clone().requires_grad_(True)
            xn = view.frozen_norm(norm, x, ref).to(view.dtype)
            view.ffn_module(layer)(xn[None, None])
            total = (got["m"][0, 0, idx].to(dt) * sign).sum()
            (g,) = torch.autograd.grad(total, x)
        K += g.detach()
    return K


def _row_mult(factor: torch.Tensor):
    def fn(x):
        return x * factor.to(x.device, x.dtype)
    return fn


@torch.no_grad()
def ablate_rows(view: ModelView, prompt_ids: Sequence[int], target: int, specs: list[tuple],
                watch: list[tuple[int, int]],
                batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 plain, row ``r + 1`` with ``specs[r]`` zeroed: ``(point, layer, idx, position)``
    with point ``z`` or ``coef``, ``idx`` the coordinates and ``position`` an index or None
    (every position). Returns the target's log-prob per row (R,) and the ``watch`` neurons'
    coefficients at the last position (R, len(watch))."""
    T = len(prompt_ids)
    R = len(specs) + 1
    widths = {"z": view.n_heads * view.head_dim}
    factors: dict[tuple[str, int], torch.Tensor] = {}
    for r, (point, layer, idx, pos) in enumerate(specs, start=1):
        width = widths.get(point) or view.ffn_width(layer)
        f = factors.setdefault((point, layer), torch.ones(R, T, width, dtype=view.dtype))
        f[r, slice(None) if pos is None else pos, torch.as_tensor(idx)] = 0.0
    watch_layers = sorted({layer for layer, _ in watch})
    logp = torch.empty(R, dtype=torch.float64)
    coefs = torch.empty(R, len(watch), dtype=torch.float64)
    wl = torch.tensor([layer for layer, _ in watch], dtype=torch.long)
    wn = torch.tensor([n for _, n in watch], dtype=torch.long)
    for r0 in range(0, R, batch_size):
        rows = slice(r0, min(R, r0 + batch_size))
        b = view.batch([list(prompt_ids)] * (rows.stop - r0))
        with ExitStack() as stack:
            for (point, layer), f in factors.items():
                stack.enter_context(view.edit(point, layer, _row_mult(f[rows])))
            cache = stack.enter_context(view.capture(["coef"], watch_layers, position=-1))
            logits = view.last_logits(b)[:, -1].double()
        logp[rows] = torch.log_softmax(logits, -1)[:, target].cpu()
        if watch:
            m = torch.stack([torch.nn.functional.pad(
                cache[("coef", layer)][:, 0].double().cpu(),
                (0, view.d_ffn - view.ffn_width(layer))) for layer in watch_layers], 1)
            pos = torch.tensor([watch_layers.index(int(x)) for x in wl])
            coefs[rows] = m[:, pos, wn]
    return logp, coefs


# --------------------------------------------------------------------------- stage 1
def deep_ranking(view: ModelView, enc: Encoded, head: tuple[int, int], target: int,
                 top: int) -> pd.DataFrame:
    """CNA of one case over the deep layers (``cna.compare_runs``: run B the head zeroed,
    the certified exact top-``top``): columns layer, neuron, imp_a, imp_b, diff, coef_a,
    coef_b, best first."""
    from cnalens.cna import compare_runs
    from cnalens.interventions import ZeroHeads

    deep = list(range(head[0], view.n_layers))
    comp = compare_runs(view, [enc], [ZeroHeads([head])], target=int(target), k=top,
                        layers=deep)
    df = comp.frame(top)
    df["diff"] = df["imp_a"] - df["imp_b"]
    cols = ["layer", "neuron", "imp_a", "imp_b", "diff", "coef_a", "coef_b"]
    return df[cols].astype({c: "float64" for c in cols[2:]}).reset_index(drop=True)


# --------------------------------------------------------------------------- the chain
@dataclass
class _Run:
    """The plain run at every position: captures and attention (layers 0..Lh)."""

    cache: dict
    att: dict
    logits: torch.Tensor


def _plain_run(view: ModelView, ids, head_layer: int) -> _Run:
    b = view.batch([list(ids)])
    with torch.no_grad(), view.attention_record(range(head_layer + 1)) as rec, \
            view.capture(["resid_pre", "resid_mid", "attn_out", "coef", "z"]) as cache:
        logits = view.last_logits(b)[0, -1].double()
    dt = view.compute_dtype
    return _Run({k: v[0].to(dt) for k, v in cache.items()},
                {k: (w[0].to(dt), v[0].to(dt)) for k, (w, v) in rec.items()}, logits)


def _attn_raw(view: ModelView, run: _Run, layer: int, pos: int) -> torch.Tensor:
    with torch.no_grad():
        return view.module(layer, "o_proj")(run.cache[("z", layer)][pos].to(view.dtype)).to(
            view.compute_dtype)


def _post_scale(view: ModelView, run: _Run, layer: int, pos: int):
    post = view.norm(layer, "ln_attn_post")
    return None if post is None else norm_scale(view, post, _attn_raw(view, run, layer, pos))


def _in_scale(view: ModelView, run: _Run, layer: int, pos: int):
    return norm_scale(view, view.norm(layer, "ln_attn"), run.cache[("resid_pre", layer)][pos])


def _source_split(view: ModelView, run: _Run, layer: int, query: int, heads=None) -> torch.Tensor:
    """Attention output of ``layer`` at position ``query`` split by source position:
    (T, d), each row ``sum_h a_hj W_O[h] v_hj`` (``heads``: a subset), through the
    post-attention norm frozen at the real output."""
    w, vals = run.att[layer]  # (H, T, T), (n_kv, T, hd)
    H = view.n_heads
    hs = torch.arange(H) if heads is None else torch.as_tensor(heads)
    kv = hs // (H // view.n_kv_heads)
    parts = w[hs, query, :, None] * vals[kv]  # (h, T, hd)
    wo = view.o_proj_by_head(layer).detach().to(view.compute_dtype)[hs]  # (h, d, hd)
    out = torch.einsum("htj,hdj->td", parts, wo)
    post = view.norm(layer, "ln_attn_post")
    if post is not None:
        gain, s, _, _ = view.norm_affine(post, _attn_raw(view, run, layer, query))
        out = out * gain.detach() / s
    return out


def explain_case(view: ModelView, case: Case | Encoded | str, head: tuple[int, int], *,
                 target: str | int | None = None, top: int = 10, n_shallow: int | None = None,
                 k_tokens: int = 8,
                 batch_size: int = 32) -> Chain:
    """The four-stage chain of one case (module doc); ``top`` deep neurons and
    ``n_shallow`` (default ``top``) shallow ones."""
    from cnalens.vocab import ids_to_strings, project, transform

    view.check_heads([head])
    if top < 1:
        raise CnaError("top must be at least 1")
    if isinstance(case, str):
        case = case_from_prompt(case)
    enc = encode_prompt(view.tokenizer, case)
    ids = list(enc.prompt_ids)
    T = len(ids)
    Lh, h = head
    n_shallow = top if n_shallow is None else n_shallow
    run = _plain_run(view, ids, Lh)
    pred = int(run.logits.argmax())
    tgt = target_id(view, target)
    if tgt is None:
        tgt = pred
    enc = Encoded(enc.case, enc.prompt_ids, (tgt,))  # CNA scores this target
    tok = [token_text(t) for t in ids_to_strings(view.tokenizer, torch.tensor([ids]))[0]]
    dt = view.compute_dtype

    # 1. prediction enhancing: CNA over the deep layers
    deep = deep_ranking(view, enc, head, tgt, top)
    dn = list(zip(deep["layer"].tolist(), deep["neuron"].tolist(), strict=True))
    coef_a = torch.tensor(deep["coef_a"].to_numpy())
    resid_in = {}
    for layer in sorted({x for x, _ in dn}):
        point = "resid_pre" if _ffn_norm(view, layer)[1] else "resid_mid"
        resid_in[layer] = run.cache[(point, layer)][-1]
    K = deep_key(view, resid_in, dn, coef_a)

    # 2. feature predicting: the head, split by source position
    w_head = run.att[Lh][0][h, -1]  # (T,)
    head_split = _source_split(view, run, Lh, T - 1, [h])  # (T, d)
    src_score = head_split @ K
    start = question_start(view.tokenizer, enc)
    p = start + int(src_score[start:].argmax())
    s_in_h, s_post_h = _in_scale(view, run, Lh, p), _post_scale(view, run, Lh, T - 1)

    def through_head(x: torch.Tensor) -> torch.Tensor:
        return transform(view, x, Lh, head=h, scale=s_in_h, post_scale=s_post_h) * w_head[p]

    # 3. feature transferring: shallow attention outputs at p, through the head
    shallow = list(range(Lh))
    attn_p = (torch.stack([run.cache[("attn_out", layer)][p] for layer in shallow])
              if shallow else torch.zeros(0, view.d_model, dtype=dt))
    layer_score = through_head(attn_p) @ K if shallow else torch.zeros(0, dtype=dt)

    # measured effects of stages 1-3, one batched forward
    kv_all = torch.arange(view.n_heads * view.head_dim)
    hd = torch.arange(h * view.head_dim, (h + 1) * view.head_dim)
    specs = ([("coef", la, [n], None) for la, n in dn] + [("z", Lh, hd, None)]
             + [("z", la, kv_all, p - T) for la in shallow])
    logp, coefs = ablate_rows(view, ids, tgt, specs, dn, batch_size)
    absm = coefs.abs()
    total0 = absm[0].sum()
    effect = (logp[0] - logp[1:]).numpy()
    drop = ((total0 - absm[1:].sum(1)) / total0).numpy()

    # 4. feature enhancing: every shallow neuron at every question position up to p,
    # scored along every one-hop attention route into p, then through the head
    kh = _adjoint(view, run, Lh, K, _onehot(view, h) * w_head[p], p, T - 1)
    sh = _shallow_neurons(view, run, p, start, n_shallow, kh, K, k_tokens, through_head)
    if sh["units"]:
        lp2, cf2 = ablate_rows(view, ids, tgt, [("coef", la, [n], qq - T) for (la, n), qq
                                                in zip(sh["units"], sh["pos"], strict=True)],
                               dn, batch_size)
        effect = np.concatenate([effect, (lp2[0] - lp2[1:]).numpy()])
        a2 = cf2.abs()
        drop = np.concatenate([drop, ((a2[0].sum() - a2[1:].sum(1)) / a2[0].sum()).numpy()])

    deep_drop, links = _links(dn, absm[:len(dn) + 1])

    # tokens: deep neurons' contributions m v (through the post-FFN norm), projected
    vd = _contribs(view, run, dn, -1)
    deep_tokens = _strings(view, project(view, vd, k=k_tokens), k_tokens)

    rows = []
    base = {"case": enc.case.case_id or "case", "prompt": enc.case.question,
            "target": view.tokenizer.decode([tgt])}
    for i, (la, n) in enumerate(dn):
        r = deep.iloc[i]
        rows.append({**base, "stage": STAGES[3], "kind": "ffn_neuron", "name": f"{la}.{n}",
                     "layer": la, "index": n, "position": T - 1, "token": tok[-1],
                     "tokens": deep_tokens[i], "tokens_transformed": "",
                     "score": r["diff"], "effect": effect[i], "coef_drop": deep_drop[i],
                     "coef": r["coef_a"],
                     "detail": f"imp_a {r['imp_a']:.3f}, imp_b {r['imp_b']:.3f}, "
                               f"coef_b {r['coef_b']:.3f}"})
    j = len(dn)
    top_pos = torch.argsort(w_head, descending=True)[:3].tolist()
    att_txt = ", ".join(f"‘{tok[i]}’@{i} {float(w_head[i]):.2f}" for i in top_pos)
    rows.append({**base, "stage": STAGES[2], "kind": "head", "name": f"{Lh}.{h}", "layer": Lh,
                 "index": h, "position": p, "token": tok[p], "tokens": "",
                 "tokens_transformed": "", "score": float(src_score.sum()),
                 "effect": effect[j], "coef_drop": drop[j], "coef": float(w_head[p]),
                 "detail": f"attends {att_txt}"})
    j += 1
    for la in shallow:
        rows.append({**base, "stage": STAGES[1], "kind": "attn_layer", "name": f"L{la}",
                     "layer": la, "index": -1, "position": p, "token": tok[p], "tokens": "",
                     "tokens_transformed": "", "score": float(layer_score[la]),
                     "effect": effect[j], "coef_drop": drop[j], "coef": float("nan"),
                     "detail": f"zeroed at position {p}"})
        j += 1
    for i, (la, n) in enumerate(sh["units"]):
        q = sh["pos"][i]
        rows.append({**base, "stage": STAGES[0], "kind": "ffn_neuron", "name": f"{la}.{n}",
                     "layer": la, "index": n, "position": q, "token": tok[q],
                     "tokens": sh["tokens"][i], "tokens_transformed": sh["transformed"][i],
                     "score": sh["score"][i], "effect": effect[j], "coef_drop": drop[j],
                     "coef": sh["coef"][i],
                     "detail": sh["route"][i]})
        j += 1
    elements = pd.DataFrame(rows, columns=list(COLUMNS))
    meta = {"case": base["case"], "prompt": enc.case.prompt, "question": enc.case.question,
            "target": base["target"], "target_id": tgt, "pred": view.tokenizer.decode([pred]),
            "logp": float(logp[0]), "head": f"{Lh}.{h}",
            "tokens": tok, "head_attention": [float(x) for x in w_head],
            "head_source_position": p, "head_source_scores": [float(x) for x in src_score],
            "deep_coef_sum": float(total0), "question_start": start,
            "ranking": "exact (certified top-K of imp_a - imp_b)",
            "deep_layers": [Lh, view.n_layers - 1]}
    return Chain(elements, links, meta)


def _links(dn: list[tuple[int, int]], absm: torch.Tensor) -> tuple[np.ndarray, pd.DataFrame]:
    """From |m| of the deep neurons (row 0 plain, row i + 1 with neuron i zeroed): each
    neuron's relative drop of the higher-layer neurons' sum, and every link i -> j (j in a
    higher layer) with the relative drop of |m_j|."""
    lay = torch.tensor([x for x, _ in dn])
    upper = lay[None, :] > lay[:, None]  # (i, j): j above i
    rel = (absm[0][None] - absm[1:]) / absm[0][None]
    s_up0 = (absm[0][None] * upper).sum(1)
    s_up = (absm[1:] * upper).sum(1)
    deep_drop = torch.where(s_up0 > 0, (s_up0 - s_up) / s_up0, torch.nan).numpy()
    li, lj = upper.nonzero(as_tuple=True)
    links = pd.DataFrame({"src": [f"{dn[i][0]}.{dn[i][1]}" for i in li.tolist()],
                          "dst": [f"{dn[j][0]}.{dn[j][1]}" for j in lj.tolist()],
                          "drop": rel[li, lj].numpy()})
    return deep_drop, links


def _contribs(view: ModelView, run: _Run, units, pos: int) -> torch.Tensor:
    """``m_k v_k`` of chosen FFN neurons at a position (post-FFN norm frozen), (n, d)."""
    out = torch.zeros(len(units), view.d_model, dtype=view.compute_dtype, device=view.device)
    lay = torch.tensor([la for la, _ in units], dtype=torch.long)
    idx = torch.tensor([k for _, k in units], dtype=torch.long)
    for la in lay.unique().tolist():
        sel = (lay == la).nonzero()[:, 0]
        out[sel] = _contrib_layer(view, run, la, pos)[idx[sel]]
    return out


def token_text(t: str) -> str:
    """A token readable in a space-separated list: escapes as ``repr``, spaces as ``␣``."""
    return repr(t)[1:-1].replace(" ", "␣") or "∅"


def _strings(view: ModelView, proj, k: int) -> list[str]:
    """Each row's top ``k`` tokens, space-separated (see :func:`token_text`)."""
    from cnalens.vocab import ids_to_strings

    if len(proj) == 0:
        return []
    return [" ".join(token_text(t) for t in row)
            for row in ids_to_strings(view.tokenizer, proj.top_ids[:, :k])]


def _onehot(view: ModelView, h: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(h), view.n_heads).to(view.device,
                                                                          view.compute_dtype)


@torch.no_grad()
def _adjoint(view: ModelView, run: _Run, layer: int, y: torch.Tensor, weights: torch.Tensor,
             src: int,
             dst: int) -> torch.Tensor:
    """``sum_h weights[h] T_h^T y``: the adjoint of ``cnalens.vocab.transform`` (head ``h``,
    input norm frozen at ``src``, post-attention norm at ``dst``), so that
    ``transform(u) . y == u . adjoint(y)``; it pulls a key back through a layer's OV."""
    from cnalens.vocab import ov_parts

    dt = view.compute_dtype
    y = y.to(dt)
    post = view.norm(layer, "ln_attn_post")
    if post is not None:
        gain, s, _, _ = view.norm_affine(post, _attn_raw(view, run, layer, dst))
        y = y * gain.detach() / s
    wv, wo = ov_parts(view, layer)  # (H, hd, d) each: out = (x @ wv[h].T) @ wo[h]
    g = torch.einsum("h,hed,he->d", weights.to(dt), wv, wo @ y)
    ln = view.norm(layer, "ln_attn")
    gain, s, _, centred = view.norm_affine(ln, run.cache[("resid_pre", layer)][src])
    g = g * gain.detach() / s
    return g - g.mean() if centred else g


@torch.no_grad()
def _shallow_neurons(view: ModelView, run: _Run, p: int, start: int, n: int, kh: torch.Tensor,
                     K: torch.Tensor, k_tok: int, through_head):
    """Top ``n`` shallow FFN neurons (layers below the head) over the question positions
    ``q <= p`` by the path sum: ``u . (sum_{l < t < Lh} T_t^T kh + [q == p] kh)``, where
    ``T_t`` is layer ``t``'s OV with its heads weighted by their real attention ``p <- q``
    and ``kh`` the deep key pulled back through the head (module doc)."""
    from cnalens.vocab import project, transform

    Lh = max(run.att) if run.att else 0
    out = {"units": [], "pos": [], "score": np.zeros(0), "coef": np.zeros(0), "tokens": [],
           "transformed": [], "route": []}
    if n < 1 or Lh < 1:
        return out
    qs = list(range(start, p + 1))
    # per route key: (Q, Lh, d); route t carries layers < t; t == Lh stands for "direct"
    keys = torch.zeros(len(qs), Lh + 1, view.d_model, dtype=view.compute_dtype,
                       device=view.device)
    for iq, q in enumerate(qs):
        for t in range(1, Lh):
            keys[iq, t] = _adjoint(view, run, t, kh, run.att[t][0][:, p, q], q, p)
        if q == p:
            keys[iq, Lh] = kh
    scores, units, per_route = [], [], []
    for la in range(Lh):
        carry = torch.zeros(Lh + 1, dtype=torch.bool, device=view.device)
        carry[la + 1:] = True  # routes through attention layers above la, or direct
        for iq, q in enumerate(qs):
            u = _contrib_layer(view, run, la, q)
            r = u @ (keys[iq] * carry[:, None]).T  # (width, Lh + 1)
            per_route.append(r)
            scores.append(r.sum(1))
            width = u.shape[0]
            units.append(torch.stack([torch.full((width,), la), torch.arange(width),
                                      torch.full((width,), q)], 1))
    score, unit, routes = torch.cat(scores), torch.cat(units), torch.cat(per_route)
    best = score.double().topk(min(n, score.numel())).indices.cpu()
    sel = unit[best]  # (layer, index, position) rows on the CPU; the vectors stay put
    best_route = routes[best].argmax(1).cpu()
    u = _gather_contribs(view, run, sel)
    moved = torch.zeros_like(u)
    for t in best_route.unique().tolist():
        rows = (best_route == t).nonzero()[:, 0]
        if t == Lh:  # direct: the head reads the neuron's own position
            moved[rows] = through_head(u[rows])
            continue
        for q in sel[rows, 2].unique().tolist():
            rq = rows[sel[rows, 2] == q]
            w_t = run.att[t][0][:, p, q]
            s_in, s_post = _in_scale(view, run, t, q), _post_scale(view, run, t, p)
            moved[rq] = transform(view, u[rq], t, weights=w_t, scale=s_in,
                                  post_scale=s_post)
    coef = _gather_coefs(run, sel)
    out.update(units=[(int(a), int(b)) for a, b in sel[:, :2].tolist()],
               pos=[int(q) for q in sel[:, 2].tolist()],
               score=score[best].double().cpu().numpy(), coef=coef.double().numpy(),
               tokens=_strings(view, project(view, u, k=k_tok), k_tok),
               transformed=_strings(view, project(view, moved, k=k_tok), k_tok),
               route=[f"read by the head at {p} directly" if int(t) == Lh else
                      f"moved {int(q)} -> {p} by attention layer {int(t)}"
                      for t, q in zip(best_route.tolist(), sel[:, 2].tolist(), strict=True)])
    return out


def _gather_contribs(view: ModelView, run: _Run, sel: torch.Tensor) -> torch.Tensor:
    """``m v`` of neurons ``sel`` (rows layer, index, position), grouped by layer and
    position."""
    out = torch.zeros(len(sel), view.d_model, dtype=view.compute_dtype, device=view.device)
    for la, q in {(int(a), int(c)) for a, _, c in sel.tolist()}:
        rows = ((sel[:, 0] == la) & (sel[:, 2] == q)).nonzero()[:, 0]
        out[rows] = _contrib_layer(view, run, la, q)[sel[rows, 1]]
    return out


def _gather_coefs(run: _Run, sel: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(sel), dtype=torch.float64)
    for la in sel[:, 0].unique().tolist():
        rows = (sel[:, 0] == la).nonzero()[:, 0]
        out[rows] = run.cache[("coef", la)][sel[rows, 2], sel[rows, 1]].double().cpu()
    return out


def _contrib_layer(view: ModelView, run: _Run, layer: int, pos: int) -> torch.Tensor:
    """``m_k v_k`` of every neuron of a layer at a position (post-FFN norm frozen)."""
    m = run.cache[("coef", layer)][pos]
    v = view.value_vectors(layer).detach().to(view.compute_dtype) * m[:, None]
    post = view.norm(layer, "ln_ffn_post")
    if post is not None:
        raw = view.module(layer, "down_proj")(m.to(view.dtype)).to(view.compute_dtype)
        gain, s, _, _ = view.norm_affine(post, raw)
        v = v * gain.detach() / s
    return v


# --------------------------------------------------------------------------- outputs
def chain_records(chain: Chain) -> dict:
    """A chain as JSON-able data: its metadata and its enhancing links."""
    return {**chain.meta, "links": chain.links.to_dict("records")}
