"""Certified exact top-K: the best FFN neurons by importance, or by the CNA difference of two
runs, without scoring every neuron; exact results, not estimates.

One run (``certified_topk``, frozen lens, no soft-capping): ``LSE`` is convex, so
``Imp <= t (P_w - p . P)`` with ``t = m / c`` and ``p`` the base distribution
(:meth:`cnalens.lens.Lens.first_order`). Neurons are scored exactly in descending bound
order until the K-th exact score clears the next bound.

Two runs (``certified_cna``): each run's importance gets two-sided bounds: exact terms over
the most probable tokens and, for the rest, Jensen (below) and Edmundson-Madansky (above)
with each neuron's projection range ``[min_i P_i, max_i P_i]`` (case-independent, cached by
a fingerprint of the weights' content: in memory, and on disk in ``$CNALENS_CACHE/ranges``
so later processes start warm; ``CNALENS_RANGE_CACHE=0`` keeps them in memory only).
Run B is scored with run A's frozen scale (model comparisons) or its own (input
comparisons: ``scales``).

``screened_cna`` is the approximate alternative for input comparisons: each case's best
neurons by the first-order difference, scored exactly (recorded as "screened").
Users reach all of these through :func:`cnalens.cna.cna` and its ``Comparison``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cnalens.errors import CnaError
from cnalens.io import write_with
from cnalens.lens import Base, FFNVectors, Lens, LogSumExp
from cnalens.models.load import cache_dir
from cnalens.progress import track
from cnalens.scores import RANKINGS, expert_columns, rank_key, ranked_rows, score_neurons
from cnalens.states import (
    CaseStates,
    Target,
    as_numpy,
    case_states,
    check_targets,
    concat_states,
    describe_run,
    neuron_routes,
    resolve_layers,
    scales_for,
    targets_for,
)

if TYPE_CHECKING:
    from cnalens.data.cases import Cases
    from cnalens.interventions import Intervention
    from cnalens.models import ModelView


# --------------------------------------------------------------------------- certified top-K
@contextmanager
def true_float32() -> Iterator[None]:
    """IEEE float32 matrix products while the block runs (the previous setting restored):
    the certified bounds allow for float32 rounding only, and TF32 products
    (``torch.set_float32_matmul_precision("high")``, often switched on for GPUs) are about
    1e-3 relative, so certification would not hold under them."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _slack(lz: Lens, slack: float | None) -> float:
    if slack is not None:
        return float(slack)
    return 1e-4 if lz.dt == torch.float32 else 1e-9


def _topk_order(scores: torch.Tensor, flat: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the best ``k`` scores, ties by the flat (layer, index) order."""
    order = torch.from_numpy(np.lexsort((flat.cpu().numpy(), -scores.double().cpu().numpy())))
    return order[:k]


def _check_certifiable(lz: Lens, k: int) -> None:
    if k < 1:
        raise CnaError(f"k must be at least 1, got {k}")
    if lz.mode != "frozen" or lz.cap:
        raise CnaError("certified top-K needs the frozen lens without soft-capping "
                       "(use score_neurons, which is exhaustive)")


def _exhaustive_fallback(view: ModelView, cases, k, interventions, target, scale, layers,
                         batch_size, max_memory_gb, progress, lens):
    sc = score_neurons(view, cases, *interventions, lens=lens, target=target, scale=scale,
                       layers=layers, batch_size=batch_size, max_memory_gb=max_memory_gb,
                       progress=progress)
    n_units = int(np.isfinite(sc.imp.numpy()).sum())
    return sc.frame(top=k), {"method": "exhaustive", "n_units": n_units,
                             "n_exact": n_units, "seconds": sc.meta["seconds"]}


@true_float32()
def certified_topk(view: ModelView, cases: Cases, k: int, *interventions: Intervention,
                   target: Target = "pred", scale: torch.Tensor | None = None,
                   layers: Sequence[int] | None = None, slack: float | None = None,
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
    tg = targets_for(st, target)
    check_targets(view, tg)
    c = scales_for(lz, st, scale)
    layer_list = resolve_layers(view, layers)
    cache = FFNVectors(view, lz, layer_list)
    routed = {x: cache.routed(st, x) for x in layer_list}
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
                # only the neurons of experts the case was routed to are candidates
                keep = slice(None) if routed[layer] is None else routed[layer][i].cpu()
                bounds.append(((A / c[i]) * (cache.X[layer] @ dirs[j])).cpu()[keep])
                flat.append((layer * view.d_ffn + torch.arange(A.shape[0]))[keep])
            found = _certify(lz, cache, bases, As, torch.cat(bounds), torch.cat(flat), k, sl,
                             step, view.d_ffn)
            flat_ids, scores, n_done = found
            n_exact.append(n_done)
            layer_ids, index = np.divmod(flat_ids.numpy(), view.d_ffn)
            rows.append(pd.DataFrame({
                "case": st.case_ids[i], "layer": layer_ids, "kind": "ffn", "neuron": index,
                "coef": as_numpy(st.coef[i][layer_ids, index]),
                "importance": as_numpy(scores), "rank": np.arange(1, len(index) + 1)}))
    stats = {"method": "certified", "n_units": int(sum(view.ffn_width(x) for x in layer_list)),
             "n_exact": n_exact, "n_exact_total": int(sum(n_exact)), "slack": sl,
             "seconds": time.perf_counter() - t0}
    df = _expert_rows(view, {"": st}, pd.concat(rows, ignore_index=True), _row_cases(rows))
    df.attrs["meta"] = describe_run(view, lens, target, st, layer_list, {"stats": stats})
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
                            bases[layer])[0].cpu()
    return out


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
#
# The difference itself (``_difference``) is bounded too, and the tighter of the two is kept:
# where the runs differ little (a LoRA, an input comparison), each run's interval is wide but
# the difference is small. With ``K_r(t) = log E_{p_r}[exp(t P)]`` (so ``Imp_r = t_r P_w -
# K_r(t_r)``), ``mu_r = E_{p_r}[P]`` and ``R_r(t) = K_r(t) - t mu_r >= 0``:
#   ``K_a(t_a) - K_b(t_b) = [K_a(t_a) - K_a(t_b)] + t_b (mu_a - mu_b) + R_a(t_b) - R_b(t_b)``.
# The first term is ``(t_a - t_b) K_a'(s)`` for an ``s`` between the two, with ``K_a'``
# increasing, ``K_a'(0) = mu_a`` and ``0 <= K_a'' <= (M - m)^2 / 4``. For the last two: with
# ``delta = y_a - y_b`` (the base logits' difference) and ``w = max delta - min delta``, every
# tilted ``p_a`` is within a factor ``e^w`` of the tilted ``p_b`` token by token, so are their
# variances, and ``R = int (t - s) Var_s ds`` gives ``R_a(t) / R_b(t) in [e^-w, e^w]``;
# ``R_b(t_b)``'s upper bound comes from run B's interval. The same with the runs' roles
# exchanged (``R_a(t_a)`` from run A's interval) is intersected in.
_RANGES: dict[tuple, _Range] = {}
_RANGES_MAX = 1024
PROJECT_CHUNK = 1024  # neurons projected onto the vocabulary together (memory: x 8,192)


_W_DIGESTS: dict[tuple, str] = {}


def clear_range_cache() -> None:
    """Forget every cached projection range, in memory and on disk (benchmarks and tests
    time or check cold runs with it)."""
    import shutil

    _RANGES.clear()
    shutil.rmtree(cache_dir() / "ranges", ignore_errors=True)


def _weights_digest(lz: Lens) -> str:
    """A hash of the unembedding's full content and the compute dtype (once per tensor
    version in a process): the on-disk part of a range key."""
    w = lz.view.unembed.weight
    key = (w.data_ptr(), w._version, tuple(w.shape), str(w.dtype), str(lz.dt))
    if key not in _W_DIGESTS:
        _W_DIGESTS[key] = _digest(w) + str(lz.dt).replace("torch.", "-")
    return _W_DIGESTS[key]


def _range_file(lz: Lens, X: torch.Tensor) -> Path | None:
    """Where the exact ranges of vectors ``X`` persist (``$CNALENS_CACHE/ranges``), keyed
    by the weights' content; None when ``CNALENS_RANGE_CACHE=0``."""
    if os.environ.get("CNALENS_RANGE_CACHE", "1") == "0":
        return None
    return cache_dir() / "ranges" / f"{_weights_digest(lz)}-{_digest(X)}.safetensors"


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

    def __init__(self, lz: Lens, X: torch.Tensor, path: Path | None = None):
        wmax = lz.W.norm(dim=-1).max()
        xn = X.norm(dim=-1)
        # |fl(x . w) - x . w| <= d eps |x| |w| (deterministic); 4 sqrt(d) eps covers BLAS
        self.err = (4 * lz.d ** 0.5 * torch.finfo(lz.dt).eps) * xn * wmax + 1e-30
        cs = xn * wmax * (1 + 1e-5) + self.err
        self.m, self.M = -cs, cs.clone()
        self.known = torch.zeros(X.shape[0], dtype=torch.bool)
        self.lo, self.hi = torch.zeros_like(cs), torch.zeros_like(cs)  # exact, where known
        self.path = path
        if path is not None and path.is_file():  # computed by an earlier process
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                saved = load_file(path)
                idx, lo, hi = (saved["idx"], saved["lo"].to(cs.device, cs.dtype),
                               saved["hi"].to(cs.device, cs.dtype))
                if len(idx) and int(idx.max()) < X.shape[0] and len(lo) == len(hi) == len(idx):
                    self.set(idx, lo, hi)
            except (OSError, RuntimeError, KeyError, ValueError, SafetensorError):
                pass  # an unreadable cache file is recomputed and rewritten

    def set(self, idx: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Record the exact ``min_i P_i``, ``max_i P_i`` of the vectors ``idx`` (a CPU
        index; ``known`` lives on the CPU, the ranges with the vectors)."""
        idx = idx.cpu()
        self.lo[idx], self.hi[idx] = lo, hi
        self.m[idx], self.M[idx] = lo - self.err[idx], hi + self.err[idx]
        self.known[idx] = True

    def save(self) -> None:
        """Persist the exact ranges known so far (atomically), if this range has a file."""
        if self.path is None:
            return
        from safetensors.torch import save_file

        idx = self.known.nonzero()[:, 0]
        data = {"idx": idx, "lo": self.lo[idx].contiguous().cpu(),
                "hi": self.hi[idx].contiguous().cpu()}
        try:
            write_with(self.path, lambda tmp: save_file(data, str(tmp)))
        except OSError:
            pass  # a read-only cache: the ranges stay in memory


def _exact_ranges(lz: Lens, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``min_i P_i`` and ``max_i P_i`` of ``P = W_U x`` for each row of ``X``: one pass over
    the vocabulary per 2,048 rows."""
    lo = torch.full((X.shape[0],), float("inf"), dtype=lz.dt, device=X.device)
    hi = torch.full((X.shape[0],), float("-inf"), dtype=lz.dt, device=X.device)
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
        hit = _RANGES[key] = _Range(lz, X, _range_file(lz, X))
    return hit


def _bound_parts(lz: Lens, X: torch.Tensor, logp: torch.Tensor, S: torch.Tensor,
                 q: torch.Tensor, rest_w: torch.Tensor, targets: torch.Tensor,
                 T: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The range-independent parts of the bounds (float64, (r, N) each, see the section
    comment): ``t``, ``t P_w``, the head's log-sum, ``log q``, the rest's mean ``mu`` and
    the whole vocabulary's mean ``E_p[P]``, for
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
    mean = lpS.exp() @ PS.T + qmu
    return T, T * Pw, head, q.log().expand_as(head), mu, mean


def _difference(parts: tuple[torch.Tensor, ...], m: torch.Tensor, M: torch.Tensor, w: float,
                lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlo, dhi)`` (N,): ``dlo <= Imp_a - Imp_b <= dhi`` bounded directly (the section
    comment), intersected with the runs' intervals ``lo``, ``hi`` (2, N); ``w`` the
    oscillation of the two runs' base logits' difference over the vocabulary."""
    T, tpw, _, _, _, mean = parts
    m, M = m.to(torch.float64), M.to(torch.float64)
    dt = T[0] - T[1]
    dpw = tpw[0] - tpw[1]  # (t_a - t_b) P_w: both runs scored on A's target
    s2 = (M - m).square() / 4  # the largest variance P can have
    smin, smax = torch.minimum(T[0], T[1]), torch.maximum(T[0], T[1])
    R = (tpw - lo - T * mean).clamp_min(0)  # each run's R_r(t_r) <= this
    out_lo, out_hi = lo[0] - hi[1], hi[0] - lo[1]
    if not w < 700.0:  # a token masked in one run only (w infinite), or e^w overflows:
        return out_lo, out_hi  # the runs' intervals alone
    ew, emw = math.exp(w), math.exp(-w)
    # (r: whose K' the first term uses; o: the other run, at whose t the second term is)
    for r, o, sgn in ((0, 1, 1.0), (1, 0, -1.0)):
        d1 = torch.maximum(m, mean[r] + smin.clamp(max=0) * s2)  # K_r' between the t's
        d2 = torch.minimum(M, mean[r] + smax.clamp(min=0) * s2)
        t1lo, t1hi = torch.minimum(dt * d1, dt * d2), torch.maximum(dt * d1, dt * d2)
        # K_a(t) - K_b(t) at t = t_o: t (mu_a - mu_b) + R_a(t) - R_b(t), where R_o(t_o) is
        # in [0, R[o]] and run r's R_r(t_o) within [e^-w, e^w] of it
        lin = T[o] * (mean[0] - mean[1])
        a_lo, a_hi = (emw - 1) * R[o], (ew - 1) * R[o]
        t2lo, t2hi = (lin + a_lo, lin + a_hi) if sgn > 0 else (lin - a_hi, lin - a_lo)
        out_lo = torch.maximum(out_lo, dpw - t1hi - t2hi)
        out_hi = torch.minimum(out_hi, dpw - t1lo - t2lo)
    return out_lo, out_hi


def _two_sided(parts: tuple[torch.Tensor, ...], m: torch.Tensor, M: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: ``lo <= Imp <= hi`` from ``_bound_parts`` and each vector's projection
    range ``[m, M]`` (Jensen below the rest's term, Edmundson-Madansky above)."""
    T, tpw, head, logq, mu, _ = parts
    m, M = m.to(torch.float64), M.to(torch.float64)
    mu = torch.where(torch.isnan(mu), m, mu).clamp(m, M)
    lam = ((mu - m) / (M - m)).clamp(0, 1)
    tail_lo = logq + T * mu
    tail_hi = logq + torch.logaddexp(torch.log1p(-lam) + T * m, lam.log() + T * M)
    return tpw - torch.logaddexp(head, tail_hi), tpw - torch.logaddexp(head, tail_lo)


def _head_set(logp: torch.Tensor, head_tokens: int) -> torch.Tensor:
    """The tokens scored exactly in the bounds: the most probable under any of the rows."""
    return torch.topk(logp.max(0).values, min(head_tokens, logp.shape[-1])).indices


def _key_bounds(dlo: torch.Tensor, dhi: torch.Tensor, by: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on ``rank_key(imp_a - imp_b)`` from bounds on ``imp_a - imp_b``."""
    if by == "decrease":
        return dlo, dhi
    if by == "increase":
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
    w: dict[int, float]  # oscillation of the runs' base logits' difference
    dlo: dict[int, torch.Tensor]  # (width,) bounds on imp_a - imp_b
    dhi: dict[int, torch.Tensor]


class _DiffBounds:
    """Shared state of a certified CNA over two runs scored on A's target, with A's frozen
    scale for both (model comparisons) or each run's own (input comparisons)."""

    def __init__(self, view: ModelView, lz: Lens, sa: CaseStates, sb: CaseStates, tg: torch.Tensor,
                 c: tuple[torch.Tensor, torch.Tensor], layers: list[int], head_tokens: int):
        self.view, self.lz, self.sa, self.sb, self.tg = view, lz, sa, sb, tg
        self.ca, self.cb = c  # each run's frozen scales (model comparisons: A's twice)
        self.layers, self.head_tokens = layers, head_tokens
        self.cache = FFNVectors(view, lz, layers)
        wkey = _unembed_key(lz)
        self.ranges = {x: _projection_range(lz, self.cache.X[x], wkey) for x in layers}
        self.seconds_range, self.n_refined = 0.0, 0
        self.Aa = {x: self.cache.coef(sa, x) for x in layers}
        self.Ab = {x: self.cache.coef(sb, x) for x in layers}
        # (2, n, width) whether each run routed each case to each neuron's expert (None:
        # a dense layer): a neuron not routed in a run is not scored there (NaN)
        self.routed = {x: None if self.cache.routed(sa, x) is None else
                       torch.stack([self.cache.routed(sa, x), self.cache.routed(sb, x)])
                       for x in layers}

    def scorable(self, i: int) -> torch.Tensor:
        """(units,) over the layers' neurons in order: routed in both runs for case ``i``
        (every neuron of a dense layer): the only candidates of its ranking."""
        return torch.cat([torch.ones(self.cache.X[x].shape[0], dtype=torch.bool)
                          if self.routed[x] is None else self.routed[x][:, i].all(0).cpu()
                          for x in self.layers])

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
                self.ranges[x].save()
                i0 += len(idx)
        n = sum(len(idx) for idx in todo.values())
        self.seconds_range += time.perf_counter() - t0
        self.n_refined += n
        return n

    def case(self, i: int) -> _DiffCase:
        lz, nl, L = self.lz, len(self.layers), self.layers
        # both runs' base rows of every layer, and W_U^T p_rest, in one pass over W_U each
        base = lz.base(torch.cat([self.sa.resid_mid[i, L], self.sb.resid_mid[i, L]]),
                       torch.cat([self.ca[i].expand(nl), self.cb[i].expand(nl)]),
                       self.tg[i].expand(2 * nl))
        logp = torch.log_softmax(base.y0, -1)
        rest = logp.exp()
        heads = []
        for j in range(nl):
            rows = [j, nl + j]
            heads.append(_head_set(logp[rows], self.head_tokens))
            rest[rows] = rest[rows].index_fill(1, heads[-1], 0.0)
        rest_w = rest @ lz.W  # (2 nl, d)
        q = rest.to(torch.float64).sum(-1)
        out = _DiffCase({}, {}, {}, {}, {}, {}, {}, {})
        for j, layer in enumerate(L):
            rows = [j, nl + j]
            delta = base.y0[j].to(torch.float64) - base.y0[nl + j].to(torch.float64)
            # a token masked in both runs (NaN here) drops out; in one run only (+-inf): w
            # is infinite and the runs' intervals alone are used
            delta = delta[~torch.isnan(delta)]
            out.w[layer] = float(delta.max() - delta.min()) if len(delta) else float("inf")
            A = torch.stack([self.Aa[layer][i], self.Ab[layer][i]])
            out.parts[layer] = _bound_parts(lz, self.cache.X[layer], logp[rows], heads[j],
                                            q[rows], rest_w[rows], base.targets[rows],
                                            A / torch.stack([self.ca[i], self.cb[i]])[:, None])
            out.bases[layer] = base.rows(slice(j, j + nl + 1, nl))
            out.A[layer] = A
        return self.rebound(out)

    def rebound(self, dc: _DiffCase) -> _DiffCase:
        """The case's bounds from its parts and the projection ranges known now."""
        for layer, parts in dc.parts.items():
            r = self.ranges[layer]
            dc.lo[layer], dc.hi[layer] = _two_sided(parts, r.m, r.M)
            dc.dlo[layer], dc.dhi[layer] = _difference(parts, r.m, r.M, dc.w[layer],
                                                       dc.lo[layer], dc.hi[layer])
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
            Pc = P.index_select(0, sel.to(P.device))
            for r in range(T.shape[0]):
                lse[q][r].add(torch.addcmul(base.y0[r, v0:v0 + vb], T[r, :, None], Pc),
                              inplace=True)
    out = []
    for (base, _, sel), T, part in zip(reqs, Ts, lse, strict=True):
        Pw = X.index_select(0, sel.to(X.device)) @ W[base.targets].T  # (n, r)
        rows = torch.arange(T.shape[0], device=T.device)
        yw = base.y0[rows, base.targets][:, None] + T * Pw.T
        out.append(yw - torch.stack([x.value for x in part]) - base.logp_w[:, None])
    return out


def _certify_group(bd: _DiffBounds, cases: list[int], by: str, k: int, slack: float,
                   step: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int, int]], int]:
    """Certified top-``k`` of several cases together: per case, the candidates are the
    neurons whose key's upper bound reaches the K-th largest lower bound; each round every
    unfinished case takes its next ``step`` candidates (``k + step`` at first) in descending
    upper-bound order, the union (every layer's) is projected once and each case scores
    exactly (both runs) what it took; a candidate whose upper bound its K-th exact key clears
    by ``slack`` is dropped, and a case is done when none is left. Returns per case (flat ids,
    (2, k) scores, candidates, scored) and the number of projections."""
    D = bd.view.d_ffn
    widths = [bd.cache.X[x].shape[0] for x in bd.layers]
    layer_of = torch.repeat_interleave(torch.tensor(bd.layers), torch.tensor(widths))
    idx_of = torch.cat([torch.arange(w) for w in widths])
    flat = layer_of * D + idx_of
    n_units, g = len(flat), len(cases)
    valid = torch.stack([bd.scorable(i) for i in cases])  # (g, n_units)
    ks = [min(k, int(v.sum())) for v in valid]  # a case's neurons routed in both runs
    khi = torch.empty(g, n_units, dtype=torch.float64)

    def candidates(dcs):
        orders = []
        for c, dc in enumerate(dcs):
            lo, hi = (torch.cat(x).cpu().masked_fill(~valid[c], float("-inf"))
                      for x in zip(*[_key_bounds(dc.dlo[x], dc.dhi[x], by)
                                     for x in bd.layers], strict=True))
            khi[c] = hi
            if not ks[c]:
                orders.append(torch.zeros(0, dtype=torch.long))
                continue
            keep = (valid[c] & (hi >= torch.topk(lo, ks[c]).values[-1] - slack)).nonzero()[:, 0]
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
    take_n = [kc + step for kc in ks]
    n_proj = 0
    while active:
        reqs = {}
        for c in active:
            reqs[c], orders[c] = orders[c][:take_n[c]], orders[c][take_n[c]:]
            # next round: a quarter of what is scored so far (each round is a pass over
            # the vocabulary; candidates the K-th exact key clears are dropped before it)
            take_n[c] = min(max(step, int(scored[c].sum() + len(reqs[c])) // 4), 2048)
        # the union, every layer in one pass over the vocabulary (PROJECT_CHUNK a chunk;
        # ``union`` is sorted by flat id, so grouped by layer in ``bd.layers``' order)
        union = torch.unique(torch.cat(list(reqs.values())))
        n_proj += len(union)
        for u0 in range(0, len(union), PROJECT_CHUNK):
            chunk = union[u0:u0 + PROJECT_CHUNK]
            batch, dc_req = [], []
            for c, pos in reqs.items():
                mine = pos[torch.isin(pos, chunk)]
                for layer in layer_of[mine].unique().tolist():
                    at = mine[layer_of[mine] == layer]
                    batch.append((c, at))
                    dc_req.append((dcs[c].bases[layer], dcs[c].A[layer][:, idx_of[at]],
                                   torch.searchsorted(chunk, at)))
            if not batch:
                continue
            X = torch.cat([bd.cache.X[x][idx_of[chunk[layer_of[chunk] == x]]]
                           for x in layer_of[chunk].unique().tolist()])
            for (c, at), s in zip(batch, _score_requests(bd.lz, X, dc_req), strict=True):
                scores[c][:, at] = s.cpu()
                scored[c, at] = True
        # a case is certified when its K-th exact key clears every unscored candidate's
        # upper bound by ``slack``; candidates it clears can never enter, so they drop out
        still = []
        for c in active:
            done = scored[c].nonzero()[:, 0]
            if len(done) >= ks[c] and len(orders[c]):
                key = rank_key(scores[c, 0, done] - scores[c, 1, done], by).double()
                kth = torch.topk(key, ks[c]).values[-1] if ks[c] else float("inf")
                orders[c] = orders[c][khi[c, orders[c]] + slack > kth]
            if len(orders[c]):
                still.append(c)
        active = still
    out = []
    for c in range(g):
        done = scored[c].nonzero()[:, 0]
        s = scores[c][:, done]
        best = _topk_order(rank_key(s[0] - s[1], by), flat[done], ks[c])
        out.append((flat[done][best], s[:, best], n_cand[c], len(done)))
    return out, n_proj


@true_float32()
def cna_bounds(view: ModelView, states_a: CaseStates, states_b: CaseStates, *,
               target: Target = "pred",
               layers: Sequence[int] | None = None, head_tokens: int = 256,
               exact_ranges: bool = True,
               own_scales: bool = False,
               difference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds ``certified_cna`` certifies with: ``(lo, hi)``, each (2, n_cases, n_layers,
    d_ffn) (runs A, B; NaN outside ``layers``, beyond a layer's width and, as the
    importance, for an expert's neurons where that run did not route the case to it), with
    ``lo <= imp <= hi`` for both runs scored on A's target and A's frozen scale (each
    run's own with ``own_scales``; frozen lens,
    no soft-capping). ``exact_ranges``: compute every neuron's projection range first (else
    the ranges known so far: Cauchy-Schwarz for the others). ``difference``: bounds on
    ``imp_a - imp_b`` instead, each (n_cases, n_layers, d_ffn): the runs' intervals
    intersected with the difference's own bound (the section comment)."""
    lz = Lens(view, "frozen")
    _check_certifiable(lz, 1)
    tg = targets_for(states_a, target)
    check_targets(view, tg)
    layer_list = resolve_layers(view, layers)
    bd = _DiffBounds(view, lz, states_a, states_b, tg, _run_scales(lz, states_a, states_b,
                                                                   own_scales), layer_list,
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
                if difference:
                    lo[0, i, layer, :w], hi[0, i, layer, :w] = dc.dlo[layer], dc.dhi[layer]
                else:
                    lo[:, i, layer, :w], hi[:, i, layer, :w] = dc.lo[layer], dc.hi[layer]
                if bd.routed[layer] is not None:  # not routed in a run: not scored there
                    off = ~bd.routed[layer][:, i].cpu()
                    off = off.any(0, keepdim=True).expand(2, -1) if difference else off
                    lo[:, i, layer, :w][off] = hi[:, i, layer, :w][off] = float("nan")
    return (lo[0], hi[0]) if difference else (lo, hi)


def _diff_rows(sa: CaseStates, sb: CaseStates, i: int, flat: torch.Tensor,
               imp_a: torch.Tensor, imp_b: torch.Tensor, d_ffn: int) -> pd.DataFrame:
    """Case ``i``'s ranked rows: case, by, layer, neuron, imp_a, imp_b, coef_a, coef_b,
    diff (``flat`` = layer * d_ffn + neuron, best first)."""
    layer, neuron = np.divmod(flat.cpu().numpy(), d_ffn)
    return pd.DataFrame({
        "case": sa.case_ids[i], "rank": np.arange(1, len(neuron) + 1), "layer": layer,
        "neuron": neuron, "imp_a": as_numpy(imp_a), "imp_b": as_numpy(imp_b),
        "coef_a": as_numpy(sa.coef[i][layer, neuron]),
        "coef_b": as_numpy(sb.coef[i][layer, neuron]), "diff": as_numpy(imp_a - imp_b)})


def _expert_rows(view: ModelView, runs: dict[str, CaseStates], df: pd.DataFrame,
                 case: np.ndarray) -> pd.DataFrame:
    """A mixture of experts' rows (``case``: each row's case position) with the columns
    ``NeuronScores.frame`` / ``diff_frame`` give them (``scores.expert_columns``: expert,
    index and, per run (``runs``: coefficient column suffix -> states), the router weight
    ``route{suffix}`` and the own coefficient); other models' rows as they are."""
    if any(st.route is None for st in runs.values()):
        return df
    at = (case * view.n_layers + df["layer"].to_numpy()) * view.d_ffn + df["neuron"].to_numpy()
    return expert_columns(df, view.shape, {
        f"coef{run}": (f"route{run}", as_numpy(neuron_routes(view, st.route))[at])
        for run, st in runs.items()})


def _row_cases(rows: Sequence[pd.DataFrame]) -> np.ndarray:
    """The case position of each row of per-case frames concatenated in case order."""
    return np.repeat(np.arange(len(rows)), [len(r) for r in rows])


def _run_scales(lz: Lens, sa: CaseStates, sb: CaseStates, own: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both runs' frozen scales: run A's for both (model comparisons) or each its own
    (input comparisons, ``own``)."""
    ca = scales_for(lz, sa, None)
    return ca, (scales_for(lz, sb, None) if own else ca)


@true_float32()
def certified_cna(view: ModelView, states_a: CaseStates, states_b: CaseStates, k: int, *,
                  target: Target = "pred", layers: Sequence[int] | None = None,
                  by: str = "decrease",
                  own_scales: bool = False,
                  head_tokens: int = 256, slack: float | None = None, step: int = 64,
                  group: int = 8, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Exact top-``k`` FFN neurons per case by ``imp_a - imp_b`` of two runs of one model,
    certified: run B (``states_b``) is scored with run A's target and A's frozen scale
    (``own_scales``: its own, as input comparisons are).

    Per case, two-sided bounds on each neuron's importance in both runs (``cna_bounds``)
    give an interval for its key (``by``: "decrease", "increase" or "abs"); only neurons
    whose interval reaches the K-th largest lower bound are candidates (in a mixture of
    experts only those routed in both runs, as the exhaustive ranking has them), scored
    exactly in both runs in descending order of their upper bound until the K-th exact key
    clears the next upper bound by ``slack`` (default 2e-4 in float32, 2e-9 in float64);
    candidates get exact projection ranges first (kept for later calls). Same rows and
    tie rule as ``diff_frame(..., top=k)``: case, by, layer, neuron, imp_a, imp_b, coef_a,
    coef_b, diff (a mixture of experts: its expert and route columns too). ``group``
    cases are certified together: a neuron several of them need next is projected onto the
    vocabulary once. Soft-capped models fall back to exhaustive scoring
    (``stats["method"]``).
    """
    if by not in RANKINGS:
        raise CnaError(f"unknown ranking '{by}': use {', '.join(RANKINGS)}")
    if k < 1:
        raise CnaError(f"k must be at least 1, got {k}")
    if len(states_a) != len(states_b):
        raise CnaError(f"{len(states_a)} run-A cases but {len(states_b)} run-B cases")
    t0 = time.perf_counter()
    lz = Lens(view, "frozen")
    tg = targets_for(states_a, target)
    check_targets(view, tg)
    c = _run_scales(lz, states_a, states_b, own_scales)
    layer_list = resolve_layers(view, layers)
    n_units = int(sum(view.ffn_width(x) for x in layer_list))
    if k > n_units:
        raise CnaError(f"top-K {k} exceeds the {n_units} neurons compared")
    meta = {"lens": "frozen", "scales": "each run its own" if own_scales else "run A's",
            "target": target if isinstance(target, str) else "ids",
            "run_a": states_a.interventions, "run_b": states_b.interventions,
            "layers": layer_list, "model": view.summary()}
    if lz.cap:
        sc = score_neurons(view, None, states=concat_states([states_a, states_b]),
                           target=torch.cat([tg, tg]), scale=torch.cat(c),
                           layers=layer_list, progress=progress)
        n = len(states_a)
        ia, ib = sc.imp[:n], sc.imp[n:]
        df, case = ranked_rows(ia - ib, ia, ib, sc.coef[:n], sc.coef[n:], states_a.case_ids,
                               k, by, layer_list)
        stats = {"method": "exhaustive", "why": "final-logit soft-capping", "ranking": by,
                 "n_units": n_units, "n_exact": [n_units] * n,
                 "n_exact_total": n_units * n, "seconds": time.perf_counter() - t0}
        df = _expert_rows(view, {"_a": states_a, "_b": states_b}, df, case)
        df.attrs["meta"] = {**meta, "stats": stats}
        return df, stats
    sl = _slack(lz, slack) * 2
    rows, n_exact, n_cand, n_proj = [], [], [], 0
    n = len(states_a)
    with torch.no_grad():
        bd = _DiffBounds(view, lz, states_a, states_b, tg, c, layer_list, head_tokens)
        found = []
        for g0 in track(range(0, n, group), "certified CNA", show=progress):
            res, proj = _certify_group(bd, list(range(g0, min(n, g0 + group))), by, k, sl,
                                       step)
            found += res
            n_proj += proj
        for i, (fl, s, nc, nd) in enumerate(found):
            n_cand.append(nc)
            n_exact.append(nd)
            rows.append(_diff_rows(states_a, states_b, i, fl, s[0], s[1], view.d_ffn))
    stats = {"method": "certified", "ranking": by, "n_units": n_units,
             "n_candidates": n_cand, "n_exact": n_exact, "n_exact_total": int(sum(n_exact)),
             "n_projected": n_proj,
             "slack": sl, "head_tokens": head_tokens, "seconds_range": bd.seconds_range,
             "n_ranges_computed": bd.n_refined,
             "seconds": time.perf_counter() - t0}
    df = _expert_rows(view, {"_a": states_a, "_b": states_b},
                      pd.concat(rows, ignore_index=True), _row_cases(rows))
    df.attrs["meta"] = {**meta, "stats": stats}
    return df, stats


@true_float32()
def screened_cna(view: ModelView, states_a: CaseStates, states_b: CaseStates, k: int, *,
                 target: Target = "gold", layers: Sequence[int] | None = None,
                 screen: int = 256,
                 progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Top-``k`` FFN neurons per case by ``imp_a - imp_b`` of an input comparison, screened
    (approximate): case ``i`` of run A and of run B are two prompts scored on one target
    (run A's: ``target`` "gold", "pred" or ids), each run with its own frozen final-norm
    scale (design.md). Per case, the ``screen`` neurons with the largest first-order
    estimate ``t_a (P_w - p_a . P) - t_b (P_w - p_b . P)`` (in a mixture of experts, of
    the neurons routed in both runs) are scored exactly and ranked
    (ties by layer, neuron); ``screen=0`` (or at least the neuron count) scores every
    neuron. Rows as ``certified_cna``.
    """
    lz = Lens(view, "frozen")
    if k < 1:
        raise CnaError(f"k must be at least 1, got {k}")
    t0 = time.perf_counter()
    sa, sb = states_a, states_b
    if len(sa) != len(sb):
        raise CnaError(f"{len(sa)} run-A prompts but {len(sb)} run-B prompts: an input "
                       "comparison pairs them one to one")
    tg = targets_for(sa, target)
    check_targets(view, tg)
    ca, cb = scales_for(lz, sa, None), scales_for(lz, sb, None)
    layer_list = resolve_layers(view, layers)
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
        routed = [(cache.routed(sa, x), cache.routed(sb, x)) for x in layer_list]
        rows, n_done = [], 0
        for i in track(range(n), "CNA exact scores", show=progress):
            # in a mixture of experts, only the neurons routed in both runs are ranked
            ok = torch.cat([torch.ones(w, dtype=torch.bool) if ra is None else (ra[i] & rb[i]).cpu()
                            for (ra, rb), w in zip(routed, (len(f) for f in flat),
                                                   strict=True)])
            ids = flat_all[ok]
            if m < len(ids):
                guess = torch.cat([x[i] for x in est]).cpu()[ok]
                ids = ids[_topk_order(guess, ids, m)]
            n_done += len(ids)
            layer_of = ids // D
            ia = torch.empty(len(ids), dtype=lz.dt)
            ib = torch.empty(len(ids), dtype=lz.dt)
            for layer in layer_of.unique().tolist():
                sel = (layer_of == layer).nonzero()[:, 0]
                idx = ids[sel] % D
                ba, bb, Aa, Ab = bases[layer]
                both = ba.rows(i).stack(bb.rows(i))  # one projection, two runs
                ia[sel], ib[sel] = lz.score(cache.X[layer][idx], cache.Cv[layer][idx],
                                            torch.stack([Aa[i, idx], Ab[i, idx]]), both).cpu()
            best = _topk_order(ia - ib, ids, k)
            fl, a_, b_ = ids[best], ia[best], ib[best]
            rows.append(_diff_rows(sa, sb, i, fl, a_, b_, D))
    stats = {"method": "screened" if m < n_units else "exhaustive", "screen": m,
             "n_units": int(n_units), "n_exact_total": int(n_done),
             "seconds": time.perf_counter() - t0}
    df = _expert_rows(view, {"_a": sa, "_b": sb}, pd.concat(rows, ignore_index=True),
                      _row_cases(rows))
    df.attrs["meta"] = {"lens": "frozen", "comparison": "inputs",
                        "target": target if isinstance(target, str) else "ids",
                        "layers": layer_list, "stats": stats, "model": view.summary()}
    return df, stats


__all__ = ["certified_cna", "certified_topk", "clear_range_cache", "cna_bounds",
           "screened_cna", "true_float32"]
