"""The lens: the final norm and unembedding as importance scores and projections need them.

For a vector ``u`` added to a residual state ``s`` and a target token ``w``::

    Imp(u | s) = log p(w | s + u) - log p(w | s),   p(. | x) = softmax(cap(W_U FinalNorm(x) + b_U))

Modes: ``frozen`` fixes the final norm's scale ``c`` (RMS, or LayerNorm's sigma) at the
real final residual of the run, so the lens is affine:
``logits(s + a v) = logits(s) + (a / c) P_v`` with ``P_v = W_U (g * C(v))`` (``C`` centres
for LayerNorm; its bias and ``b_U`` stay in the base logits). ``renorm`` normalises
``s + u`` for real: the logits are ``(Q_s + a P_v) / c(s + a v) + W_U b + b_U``, with
``c(s + a v)`` from ``|C s|^2``, ``C s . C v`` and ``|C v|^2``. Either way ``P_v`` does not
depend on the case, so a chunk of vectors is projected onto each vocabulary block once and
every case is scored against it.

One of each: :class:`LogSumExp` (the online, vocabulary-tiled log-sum-exp every scorer
uses), :meth:`Lens.first_order` (the direction ``W_U[t] - p . W_U`` of the first-order
importance ``t (P_w - p . P)``, an upper bound by convexity), :class:`FFNVectors` (FFN value
vectors as the vocabulary sees them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from cnalens.errors import CnaError

if TYPE_CHECKING:
    from cnalens.models import ModelView

LENSES = ("frozen", "renorm")
VOCAB_BLOCK = 8192  # tokens per vocabulary block of the exact scores


def norm_scale(view: ModelView, mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm's frozen scale at real input(s) ``x`` (..., d) -> (...): RMS, or LayerNorm's
    sigma (the one definition; ``Lens.scale`` is the final norm's)."""
    return view.norm_affine(mod, x)[1][..., 0]


def final_gain(view: ModelView) -> tuple[torch.Tensor, bool]:
    """The final norm's gain ``g`` (d,) in the compute dtype, and whether it centres."""
    ref = torch.ones(1, view.d_model, dtype=view.compute_dtype, device=view.device)
    gain, _, _, centred = view.norm_affine(view.final_norm, ref)
    return gain.detach().to(view.compute_dtype), centred


def center(x: torch.Tensor, centred: bool) -> torch.Tensor:
    """``C(x)``: the mean over the last dimension removed when ``centred`` (LayerNorm)."""
    return x - x.mean(-1, keepdim=True) if centred else x


class LogSumExp:
    """Online log-sum-exp over the last dimension of blocks of one set of rows.

    ``add(y)`` folds a block in (``top``: its row maxima, if known; ``inplace`` lets it
    overwrite ``y``); ``value`` is the log-sum-exp of everything added (-inf for rows
    that saw only -inf)."""

    def __init__(self) -> None:
        self.m: torch.Tensor | None = None
        self.z: torch.Tensor | None = None

    def add(self, y: torch.Tensor, top: torch.Tensor | None = None,
            inplace: bool = False) -> None:
        top = y.amax(-1) if top is None else top
        if self.m is None:
            m = top
            self.z = torch.zeros_like(top)
        else:
            m = torch.maximum(self.m, top)
            self.z = self.z * torch.exp(self.m - m)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows all -inf so far
        e = (y if inplace else y.clone()).sub_(m[..., None]).exp_()
        self.z = self.z + e.sum(-1)
        self.m = m

    @property
    def value(self) -> torch.Tensor:
        if self.m is None:
            raise CnaError("log-sum-exp of nothing")
        return self.m + torch.log(self.z)


@dataclass
class Base:
    """Base lens logits of residual states, one per row (a case, or a run of a case)."""

    y0: torch.Tensor  # (n, V) base lens logits before soft-capping
    logp_w: torch.Tensor  # (n,) base log-prob of the target
    c: torch.Tensor  # (n,) frozen scale (frozen lens) or the state's own scale (renorm)
    targets: torch.Tensor  # (n,)
    Q: torch.Tensor | None = None  # (n, V) W_U (g * C s), renorm only
    Cs: torch.Tensor | None = None  # (n, d) centred state, renorm only

    def rows(self, i: int | slice) -> Base:
        """Row ``i`` (kept 2-D) or a slice of rows."""
        sl = slice(i, i + 1) if isinstance(i, int) else i
        return Base(self.y0[sl], self.logp_w[sl], self.c[sl], self.targets[sl],
                    None if self.Q is None else self.Q[sl],
                    None if self.Cs is None else self.Cs[sl])

    def stack(self, other: Base) -> Base:
        """These rows, then ``other``'s (frozen lens)."""
        return Base(torch.cat([self.y0, other.y0]), torch.cat([self.logp_w, other.logp_w]),
                    torch.cat([self.c, other.c]), torch.cat([self.targets, other.targets]))


class Lens:
    """The final norm and unembedding of a model as one object (module docstring)."""

    def __init__(self, view: ModelView, mode: str = "frozen"):
        if mode not in LENSES:
            raise CnaError(f"unknown lens '{mode}': use {' or '.join(LENSES)}")
        self.view, self.mode = view, mode
        self.dt = view.compute_dtype
        fn = view.final_norm
        self.W = view.unembed.weight.detach().to(self.dt)  # (V, d); no copy in float32
        ref = torch.ones(1, view.d_model, dtype=self.dt, device=self.W.device)
        gain, _, bias, self.centred = view.norm_affine(fn, ref)
        self.g = gain.detach().to(self.dt)
        self.eps = view.norm_eps(fn)
        beta = None
        if bias is not None:
            beta = self.W @ bias.detach().to(self.dt)
        ub = getattr(view.unembed, "bias", None)
        if ub is not None:
            beta = ub.detach().to(self.dt) if beta is None else beta + ub.detach().to(self.dt)
        self.beta = beta
        self.cap = view.softcap
        self.V, self.d = self.W.shape

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """``C(x)``: the mean removed for LayerNorm, unchanged for RMS norms."""
        return center(x, self.centred)

    def scale(self, final: torch.Tensor) -> torch.Tensor:
        """The frozen final-norm scale of real final residuals: (n,)."""
        return norm_scale(self.view, self.view.final_norm,
                          final.to(device=self.W.device, dtype=self.dt))

    def capped(self, y: torch.Tensor) -> torch.Tensor:
        """Final-logit soft-capping (Gemma 2), or ``y`` unchanged."""
        return torch.tanh(y / self.cap) * self.cap if self.cap else y

    def vectors(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, Cv)``: what the vocabulary sees of raw residual vectors, ``X = g * C(v)``
        (on the unembedding's device)."""
        cv = self.center(v.to(device=self.W.device, dtype=self.dt))
        return cv * self.g, cv

    def blocks(self, size: int = VOCAB_BLOCK) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, W_U[start:start + size])`` over the vocabulary."""
        for v0 in range(0, self.V, size):
            yield v0, self.W[v0:v0 + size]

    def base(self, states: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> Base:
        """Base logits of residual states (n, d) with frozen scales ``c`` (n,), on the
        unembedding's device (whatever device the arguments are on)."""
        dev = self.W.device
        c, targets = c.to(dev), targets.to(dev)
        cs = self.center(states.to(device=dev, dtype=self.dt))
        Q = (cs * self.g) @ self.W.T
        if self.mode == "renorm":
            c = torch.sqrt(cs.pow(2).mean(-1) + self.eps)
        y0 = Q / c[:, None]
        if self.beta is not None:
            y0 = y0 + self.beta
        logp = torch.log_softmax(self.capped(y0), -1)
        logp_w = logp.gather(1, targets[:, None])[:, 0]
        if self.mode == "renorm":
            return Base(y0, logp_w, c, targets, Q, cs)
        return Base(y0, logp_w, c, targets)

    def first_order(self, base: Base) -> torch.Tensor:
        """``W_U[t] - softmax(y0) @ W_U`` per base row (n, d): a vector ``x`` with frozen
        coefficient ``t`` has first-order importance ``t * (x . direction)``, an upper bound
        on its exact importance (frozen lens, no soft-capping: LSE is convex)."""
        return self.W[base.targets] - torch.softmax(base.y0, -1) @ self.W

    def block_sizes(self, n_vectors: int, max_memory_gb: float) -> tuple[int, int]:
        """(vectors per chunk, tokens per vocabulary block) within the memory budget."""
        vb = min(self.V, VOCAB_BLOCK)
        per = 4 * vb * self.W.element_size()  # P, Y and log-sum-exp temporaries
        n = int(max(1, min(n_vectors, 512, max_memory_gb * 2**30 // per)))
        return n, vb

    def score(self, X: torch.Tensor, Cv: torch.Tensor, A: torch.Tensor, base: Base,
              vb: int | None = None) -> torch.Tensor:
        """Exact importance of ``a * v`` for vectors ``X = g * C(v)`` (N, d) and coefficients
        ``A`` (n, N) against the ``n`` base rows: (n, N)."""
        n, N = A.shape
        vb = vb or min(self.V, VOCAB_BLOCK)
        W, dt = self.W, self.dt
        X, Cv = X.to(W.device), Cv.to(W.device)
        A = A.to(device=W.device, dtype=dt)
        Pw = X @ W[base.targets].T  # (N, n)
        if self.mode == "frozen":
            T = A / base.c[:, None]
            R = None
        else:
            d = X.shape[-1]
            sv = base.Cs @ Cv.T  # (n, N)
            norm2 = (base.Cs.pow(2).sum(-1)[:, None] + 2 * A * sv + A * A * Cv.pow(2).sum(-1))
            R = torch.rsqrt(norm2 / d + self.eps)
            T = A * R
        rows = torch.arange(n, device=W.device)
        if R is None:
            yw = base.y0[rows, base.targets][:, None] + T * Pw.T
        else:
            yw = (base.Q[rows, base.targets][:, None] + A * Pw.T) * R
            if self.beta is not None:
                yw = yw + self.beta[base.targets][:, None]
        lse = [LogSumExp() for _ in range(n)]
        for v0, Wb in self.blocks(vb):
            P = X @ Wb.T  # (N, vb): shared by every row
            for i in range(n):
                if R is None:
                    Y = torch.addcmul(base.y0[i, v0:v0 + vb], T[i, :, None], P)
                else:
                    Y = torch.addcmul(base.Q[i, v0:v0 + vb], A[i, :, None], P)
                    Y.mul_(R[i, :, None])
                    if self.beta is not None:
                        Y.add_(self.beta[v0:v0 + vb])
                if self.cap:
                    Y.div_(self.cap).tanh_().mul_(self.cap)
                lse[i].add(Y, inplace=True)
        total = torch.stack([s.value for s in lse])
        return (self.capped(yw) - total) - base.logp_w[:, None]


def neuron_vectors(view: ModelView, layer: int) -> torch.Tensor:
    """FFN value vectors as the residual stream receives them, (width, d): the post-FFN
    norm's gain applied where the family has one (Gemma 2/3), the value vectors otherwise."""
    v = view.value_vectors(layer).detach().to(view.compute_dtype)
    post = view.norm(layer, "ln_ffn_post")
    if post is not None:
        gain, _, _, _ = view.norm_affine(post, torch.ones(1, view.d_model, dtype=v.dtype,
                                                            device=v.device))
        v = v * gain.detach().to(v.dtype)
    return v


class _HasCoefficients(Protocol):
    coef: torch.Tensor  # (n, n_layers, d_ffn)
    ffn_raw: torch.Tensor | None  # (n, n_layers, d): the post-FFN norm's inputs
    route: torch.Tensor | None  # (n, n_layers, routes): router weights (mixtures of experts)


class FFNVectors:
    """Each layer's FFN value vectors as the vocabulary sees them (``X``, ``Cv``: through
    the post-FFN norm's gain where the family has one), built once."""

    def __init__(self, view: ModelView, lens: Lens, layers: list[int]):
        self.view, self.lens, self.layers = view, lens, layers
        self.X: dict[int, torch.Tensor] = {}
        self.Cv: dict[int, torch.Tensor] = {}
        for layer in layers:
            self.X[layer], self.Cv[layer] = lens.vectors(neuron_vectors(view, layer))

    def coef(self, states: _HasCoefficients, layer: int) -> torch.Tensor:
        """Per-case coefficients divided by the post-FFN norm's frozen scale: (n, width)."""
        A = states.coef[:, layer, :self.view.ffn_width(layer)]
        post = self.view.norm(layer, "ln_ffn_post")
        if post is not None:
            A = A / self.view.norm_affine(post, states.ffn_raw[:, layer])[1]
        return A

    def routed(self, states: _HasCoefficients, layer: int) -> torch.Tensor | None:
        """(n, width) whether each case was routed to each neuron's expert (a neuron of an
        expert that was not contributes exactly 0 and is not scored); None for a dense
        layer, whose neurons always contribute."""
        lay = self.view.layout(layer)
        if lay is None:
            return None
        return states.route[:, layer, lay.route_of()] != 0


__all__ = ["LENSES", "Base", "FFNVectors", "Lens", "LogSumExp", "center", "final_gain",
           "neuron_vectors", "norm_scale"]
