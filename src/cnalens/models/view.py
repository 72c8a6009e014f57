"""ModelView: the one place that knows architectures.

Everything above this module speaks uniform names (layers, heads ``L.H``, FFN neurons
``L.N``, capture points ``resid_pre``/``resid_mid``/``resid_post``/``attn_out``/
``mlp_out``/``z``/``coef``) and never touches Hugging Face module names.

Residual-stream decomposition (what the invariant tests check, for every family):
``resid_post[l] = resid_pre[l] + attn_out[l] + mlp_out[l]`` where
``attn_out = P_attn(sum_h W_O[h] z_h + b_O)`` and ``mlp_out = P_ffn(sum_k m_k v_k + b_down)``,
``P`` being the identity, or for Gemma 2/3 and OLMo-2 the post-sublayer RMS norm, which is
linear once its scale (the RMS of the real sum) is frozen: ``frozen_norm`` applies it so.
A family without norms before its sublayers (OLMo-2) has ``NO_NORM`` there: the identity.
``resid_pre[0]`` is the embedding output (Gemma's sqrt(d) scale and GPT-2's position
embeddings included), and the final residual is ``resid_post[n_layers - 1]``.

Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; ``layout(layer)``) number
their neurons flat, expert by expert, then the shared expert (``shape.ExpertLayout``).
With ``x`` the FFN input of a token, ``r_e`` the router weight of expert ``e`` (0 where the
token is not routed to it) and ``g = sigmoid(W_g x)`` the shared expert's gate::

    mlp_out = sum_e r_e sum_n m_{e,n} v_{e,n} + g sum_n m_{S,n} v_{S,n},
    m_e = act(x W_gate[e]^T) * (x W_up[e]^T)   (gate_up_proj[e] = W_gate[e] | W_up[e])

``v_{e,n} = down_proj[e][:, n]``. The ``coef`` point of such a layer holds the weighted
coefficients ``r_e m_{e,n}`` and ``g m_{S,n}`` (exactly 0 for experts the token was not
routed to), the factor of each value vector in ``mlp_out``, so every sum over neurons
reads the same as in a dense layer; ``route`` holds the weights ``r_e`` (and ``g`` last).
There is no module per expert, so both are computed inside the MoE block from the inputs
its experts module receives (whatever experts implementation runs), and an edit of
``coef`` adds ``sum_n (m'_n - m_n) v_n`` to the block's output. Editing ``router`` edits
the router's logits (tokens, experts) before its softmax and top-k, which then run again:
a logit of -inf takes an expert out and the token is re-routed to the next best.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from cnalens.errors import CnaError
from cnalens.models.families import Family, family_for
from cnalens.models.finite import check_finite, check_finite_weights, finite_flag, nonfinite_error
from cnalens.models.shape import ExpertLayout, ModelShape

if TYPE_CHECKING:
    from transformers import DynamicCache

    from cnalens.trees import TokenTree

    class Intervening(Protocol):
        """What ``ModelView.intervene`` applies: an intervention of
        ``cnalens.interventions`` (a layer above this module, hence named by its shape)."""

        def edits(self, view: ModelView) -> Sequence[Any]: ...

        def describe(self, shape: ModelShape | None = None) -> dict: ...

CAPTURE_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "coef",
                  "route")
EDIT_POINTS = ("z", "coef", "router")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores, lenses and norms compute in for weights or states of ``dtype``:
    float32 for half precision, float64 stays float64 (the one definition)."""
    return torch.promote_types(dtype, torch.float32)


class NoNorm(nn.Module):
    """The norm before a sublayer of a family that has none there (OLMo-2): the identity,
    with gain 1 and frozen scale 1, so ``frozen_norm``, ``norm_affine`` and ``norm_eps``
    treat it as any other norm (``ModelView.norm`` gives it for ``ln_attn`` and ``ln_ffn``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


NO_NORM = NoNorm()


def _get(root: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def _find(root: nn.Module, path: str | None) -> nn.Module | None:
    """The module at ``path``, or None where the path is None or leads nowhere."""
    try:
        return _get(root, path)
    except AttributeError:
        return None


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _lora_terms(mod: nn.Module) -> tuple[nn.Module, list[tuple[str, int]]] | None:
    """For a peft LoRA layer: its base layer and the ``(adapter, sign)`` deltas that turn the
    base layer's weight into the one its forward applies now (none once merged: the base
    holds them; the merged ones subtracted while adapters are disabled, as the forward
    unmerges then). None for any other module."""
    if not (hasattr(mod, "lora_A") and hasattr(mod, "get_base_layer")):
        return None
    if mod.disable_adapters:
        terms = [(a, -1) for a in mod.merged_adapters]
    elif mod.merged:
        terms = []
    else:
        terms = [(a, 1) for a in mod.active_adapters if a in mod.lora_A]
    for a, _ in terms:
        if a in getattr(mod, "lora_variant", {}):
            kind = type(mod.lora_variant[a]).__name__
            raise CnaError(f"adapter '{a}' is a LoRA variant ({kind}) whose weights cnalens "
                           f"cannot read: merge it into the model first (merge_and_unload)")
    return mod.get_base_layer(), terms


def effective_weight(mod: nn.Module) -> torch.Tensor:
    """A projection's weight (in its storage layout) as its forward applies it: a peft LoRA
    layer's base weight plus ``scaling * B @ A`` of each active adapter (in eval mode, where
    LoRA dropout is the identity), the base weight alone under ``disable_adapter()``; any
    other module's ``weight``."""
    lora = _lora_terms(mod)
    if lora is None:
        return mod.weight
    base, terms = lora
    w = base.weight
    for a, sign in terms:
        w = w + sign * mod.get_delta_weight(a).to(w.dtype)
    return w


def effective_bias(mod: nn.Module) -> torch.Tensor | None:
    """A projection's bias as its forward applies it (a peft LoRA layer's ``lora_bias``
    included), or None."""
    lora = _lora_terms(mod)
    if lora is None:
        return getattr(mod, "bias", None)
    base, terms = lora
    b = getattr(base, "bias", None)
    for a, sign in terms:
        if getattr(mod, "lora_bias", {}).get(a):
            d = sign * mod.lora_B[a].bias * mod.scaling[a]
            b = d.to(base.weight.dtype) if b is None else b + d.to(b.dtype)
    return b


class ActivationCache(dict):
    """Captured activations keyed by ``(point, layer)``; tensors are detached."""

    def stack(self, point: str) -> torch.Tensor:
        """All captured layers of one point stacked on a new first dimension; layers of
        unequal widths (``coef`` of pruned or mixture-of-experts layers) padded with NaN."""
        ts = [self[k] for k in sorted((k for k in self if k[0] == point), key=lambda k: k[1])]
        width = max(t.shape[-1] for t in ts)
        return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1]),
                                                    value=float("nan")) for t in ts])


@dataclass
class Batch:
    """Left-padded token ids with the matching mask and position ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


class ModelView:
    """A causal LM seen through uniform names: sizes, weights by head and neuron, hooks."""

    def __init__(self, model: nn.Module, tokenizer=None, info: dict | None = None,
                 check_weights: bool = True):
        """``check_weights``: CnaError if a weight holds NaN or inf (one pass over them)."""
        self.model = model
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self.config = model.config.get_text_config()
        self.family: Family = family_for(self.config)
        fam = self.family
        self.layers: list[nn.Module] = list(_get(model, fam.layers))
        self.n_layers = len(self.layers)
        self.n_heads = int(getattr(self.config, "num_attention_heads", None)
                           or self.config.n_head)
        self.n_kv_heads = int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)
        o_in = self._in_features(self.module(0, "o_proj"))
        if o_in % self.n_heads:
            raise CnaError(f"cannot split heads: o_proj input {o_in} is not a multiple of "
                           f"{self.n_heads} heads")
        self.head_dim = o_in // self.n_heads
        self.d_model = self._out_features(self.module(0, "o_proj"))
        self.experts = [self._expert_layout(layer) for layer in range(self.n_layers)]
        self.ffn_widths = [self._in_features(self.module(layer, "down_proj")) if lay is None
                           else lay.n_neurons for layer, lay in enumerate(self.experts)]
        self.d_ffn = max(self.ffn_widths)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.final_norm = _get(model, fam.final_norm)
        self.unembed: nn.Module = model.get_output_embeddings()
        self.embed = _get(model, fam.embed)
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self._hooks: list = []
        self._moe: dict[int, _MoeHooks] = {}
        if check_weights:
            check_finite_weights(model, self)

    # ----------------------------------------------------------------- structure
    def module(self, layer: int, role: str) -> nn.Module | None:
        """A layer's module by uniform name (see ``families``); None if the family lacks it,
        and for ``down_proj`` of a mixture-of-experts layer (its experts' are 3-D
        parameters: ``moe_module``, ``value_vectors``, ``neuron_weights``)."""
        if self.family.experts is not None:  # dense and MoE layers in one model
            return _find(self.layers[layer], getattr(self.family, role))
        return _get(self.layers[layer], getattr(self.family, role))

    def _expert_layout(self, layer: int) -> ExpertLayout | None:
        """The experts of a mixture-of-experts layer as its modules hold them; None if dense."""
        blk = self.layers[layer]
        ex = _find(blk, self.family.experts)
        if ex is None:
            return None
        if (getattr(ex, "is_transposed", False) or getattr(ex, "has_bias", False)
                or not getattr(ex, "has_gate", True) or ex.gate_up_proj.dim() != 3):
            raise CnaError(f"{self.family.name}: layer {layer}'s experts are not stored as "
                           "gate_up_proj (E, 2F, d) and down_proj (E, d, F) without biases")
        n, width = int(ex.down_proj.shape[0]), int(ex.down_proj.shape[2])
        shared = _find(blk, self.family.shared_expert)
        return ExpertLayout(n, width, 0 if shared is None else
                            self._in_features(shared.down_proj),
                            int(_get(blk, self.family.router).top_k))

    def layout(self, layer: int) -> ExpertLayout | None:
        """The experts of a mixture-of-experts layer (``shape.ExpertLayout``: how its flat
        neuron index splits into expert and index), None for a dense layer."""
        return self.experts[layer]

    def is_moe(self, layer: int) -> bool:
        return self.experts[layer] is not None

    def moe_module(self, layer: int, role: str) -> nn.Module | None:
        """A mixture-of-experts layer's ``experts``, ``router``, ``shared_expert`` or
        ``shared_gate`` module (None where the layer or family has none)."""
        return _find(self.layers[layer], getattr(self.family, role))

    def _in_features(self, mod: nn.Module) -> int:
        w = mod.weight
        return int(w.shape[0] if self.family.conv1d else w.shape[1])

    def _out_features(self, mod: nn.Module) -> int:
        w = mod.weight
        return int(w.shape[1] if self.family.conv1d else w.shape[0])

    def _weight_out_in(self, mod: nn.Module) -> torch.Tensor:
        """A projection's weight as (out, in), whatever its storage; for a peft LoRA layer
        the weight its forward applies now (``effective_weight``)."""
        w = effective_weight(mod)
        return w.t() if self.family.conv1d else w

    def ffn_width(self, layer: int) -> int:
        return self.ffn_widths[layer]

    def o_proj_by_head(self, layer: int) -> torch.Tensor:
        """W_O split by head: (n_heads, d_model, head_dim); head h adds W_O[h] @ z_h."""
        w = self._weight_out_in(self.module(layer, "o_proj"))
        return w.reshape(self.d_model, self.n_heads, self.head_dim).permute(1, 0, 2)

    def o_proj_bias(self, layer: int) -> torch.Tensor | None:
        return effective_bias(self.module(layer, "o_proj"))

    def v_proj_by_head(self, layer: int) -> torch.Tensor:
        """W_V split by KV head: (n_kv_heads, head_dim, d_model); query head h reads KV head
        ``h // (n_heads // n_kv_heads)``. Biases (constant in the input) are left out."""
        w = self._weight_out_in(self.module(layer, "v_proj"))
        kv, hd, d = self.n_kv_heads, self.head_dim, w.shape[1]
        if self.family.qkv == "fused":  # q | k | v: n_heads, n_kv_heads, n_kv_heads heads
            w = w[(self.n_heads + kv) * hd:]
        elif self.family.qkv == "neox":  # fused per head: (heads, q | k | v, head_dim)
            return w.reshape(self.n_heads, 3, hd, d)[:, 2]
        return w.reshape(kv, hd, d)

    def value_vectors(self, layer: int, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """FFN value vectors (columns of the down projection) as rows: (d_ffn, d_model), or
        those of ``neurons`` (flat indices) only. In a mixture-of-experts layer, flat: each
        expert's ``down_proj[e]`` columns, expert by expert, then the shared expert's (a
        subset is gathered without copying the rest)."""
        lay = self.layout(layer)
        if lay is None:
            v = self._weight_out_in(self.module(layer, "down_proj")).t()
            return v if neurons is None else v[neurons]
        down = self.moe_module(layer, "experts").down_proj  # (E, d, F)
        shared = (self._weight_out_in(self.moe_module(layer, "shared_expert").down_proj).t()
                  if lay.shared else None)
        if neurons is None:
            parts = [down.permute(0, 2, 1).reshape(lay.n_experts * lay.width, self.d_model)]
            return torch.cat(parts + ([shared] if lay.shared else []))
        idx = torch.as_tensor(neurons, dtype=torch.long, device=down.device)
        routed = idx < lay.n_experts * lay.width
        r = idx.clamp(max=lay.n_experts * lay.width - 1)
        out = down[r // lay.width, :, r % lay.width]  # (len, d)
        if lay.shared:
            s = (idx - lay.n_experts * lay.width).clamp(min=0)
            out = torch.where(routed[:, None], out, shared[s])
        return out

    def down_bias(self, layer: int) -> torch.Tensor | None:
        if self.is_moe(layer):  # no biases in the supported experts (checked at load)
            return None
        return effective_bias(self.module(layer, "down_proj"))

    def ffn_in(self, layer: int) -> list[nn.Module]:
        """The FFN's input projections (gate and up, or up alone): one output per neuron,
        or per neuron and block of a fused projection (``ffn_in_rows``). None in a
        mixture-of-experts layer (its experts' are 3-D parameters)."""
        if self.is_moe(layer):
            raise CnaError(f"layer {layer} is a mixture of experts: its FFN input "
                           "projections are the experts' fused 3-D gate_up_proj")
        return [_get(self.layers[layer], path) for path in self.family.ffn_in]

    def ffn_in_rows(self, layer: int, neurons: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The output rows of each FFN input projection that ``neurons`` own, in order: the
        neurons themselves, or for a fused gate | up projection (Phi-3) the gate rows
        ``i`` then the up rows ``d_ffn + i`` (so the kept rows stay gate | up)."""
        idx = torch.as_tensor(neurons, dtype=torch.long).flatten()
        blocks = torch.arange(self.family.ffn_in_blocks, dtype=torch.long, device=idx.device)
        return (blocks[:, None] * self.ffn_width(layer) + idx[None]).flatten()

    def ffn_parameters(self, layer: int) -> list[nn.Parameter]:
        """A layer's FFN parameters: the input projections and the down projection (with
        their biases), or a mixture's router, fused experts and shared expert with its gate
        (what pruning shrinks and its parameter counts count)."""
        if not self.is_moe(layer):
            mods = [*self.ffn_in(layer), self.module(layer, "down_proj")]
        else:
            mods = [self.moe_module(layer, r) for r in ("router", "experts", "shared_gate")]
            se = self.moe_module(layer, "shared_expert")
            mods += [] if se is None else [se.gate_proj, se.up_proj, se.down_proj]
        return [p for m in mods if m is not None for p in m.parameters(recurse=False)]

    def neuron_weights(self, layer: int, neurons: torch.Tensor | Sequence[int],
                       inputs: bool = False) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """Where the weights hold FFN neurons (flat indices of one layer): ``(tensor, axis,
        index)`` triples, each tensor a parameter or a view of one, in its storage layout,
        so that ``tensor.index_fill_(axis, index, 0)`` zeroes those neurons' value vectors
        (the down projection's columns; an expert's ``down_proj[e][:, n]``), and with
        ``inputs`` also the rows that compute them (gate and up, and their biases; an
        expert's ``gate_up_proj[e]`` rows ``n`` and ``F + n``)."""
        idx = torch.as_tensor(neurons, dtype=torch.long).flatten()
        lay = self.layout(layer)
        if lay is None:
            down = self.module(layer, "down_proj")
            out = [(down.weight, 0 if self.family.conv1d else 1, idx)]
            if inputs:
                rows = self.ffn_in_rows(layer, idx)
                for mod in self.ffn_in(layer):
                    out.append((mod.weight, 1 if self.family.conv1d else 0, rows))
                    if getattr(mod, "bias", None) is not None:
                        out.append((mod.bias, 0, rows))
            return out
        ex = self.moe_module(layer, "experts")
        route = lay.route_of()[idx]
        out = []
        for e in torch.unique(route).tolist():
            ns = idx[route == e] - e * lay.width
            if e == lay.n_experts:  # the shared expert: a dense FFN
                se = self.moe_module(layer, "shared_expert")
                out.append((se.down_proj.weight, 1, ns))
                if inputs:
                    out += [(se.gate_proj.weight, 0, ns), (se.up_proj.weight, 0, ns)]
                continue
            out.append((ex.down_proj[e], 1, ns))
            if inputs:
                out.append((ex.gate_up_proj[e], 0, torch.cat([ns, ns + lay.width])))
        return out

    def ffn_module(self, layer: int) -> nn.Module:
        """The FFN module of a layer (its down projection's parent): called on the FFN's
        normed input it returns the FFN output (before the post-FFN norm of Gemma 2/3
        and OLMo-2)."""
        return _get(self.layers[layer], self.family.down_proj.rsplit(".", 1)[0])

    def norm(self, layer: int, which: str) -> nn.Module | None:
        """``which`` in ln_attn, ln_attn_post, ln_ffn, ln_ffn_post; None where the family has
        none (a post norm, or ``ln_ffn`` of parallel blocks, which share ``ln_attn``), and
        ``NO_NORM`` (the identity) for the pre-norms of a family without them (OLMo-2)."""
        if self.family.ln_attn is None and which in ("ln_attn", "ln_ffn"):
            return NO_NORM
        return self.module(layer, which)

    @property
    def device(self) -> torch.device:
        return self.unembed.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """What scores and lenses compute in: the weights' dtype, at least float32."""
        return compute_dtype(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.weight.dtype

    def summary(self) -> dict:
        moe = [x for x in range(self.n_layers) if self.is_moe(x)]
        lay = self.layout(moe[0]) if moe else None
        experts = {} if lay is None else {
            "moe_layers": moe, "n_experts": lay.n_experts, "expert_width": lay.width,
            "shared_expert_width": lay.shared, "experts_per_token": lay.top_k}
        return {
            "spec": self.info.get("spec"),
            "family": self.family.name,
            "model_type": self.config.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "d_model": self.d_model,
            "d_ffn": self.d_ffn,
            "ffn_widths_equal": len(set(self.ffn_widths)) == 1,
            "vocab_size": self.vocab_size,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "norm": self.family.norm_kind,
            "pre_sublayer_norms": self.family.ln_attn is not None,
            "post_sublayer_norms": self.family.ln_attn_post is not None,
            "parallel_blocks": self.family.parallel,
            "tied_embeddings": self.unembed.weight is self.embed.weight,
            "final_logit_softcapping": self.softcap,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "source": self.info.get("source"),
            "gguf_sha256": self.info.get("gguf_sha256"),
            **experts,
        }

    # ----------------------------------------------------------------- checks
    @property
    def shape(self) -> ModelShape:
        """Layer, head and per-layer FFN sizes (the live widths, after any pruning)."""
        moe = any(e is not None for e in self.experts)
        return ModelShape(self.n_layers, self.n_heads, tuple(self.ffn_widths),
                          tuple(self.experts) if moe else ())

    def check_layers(self, layers: Iterable[int]) -> None:
        self.shape.check_layers(layers)

    def check_heads(self, heads: Iterable[tuple[int, int]]) -> None:
        self.shape.check_heads(heads)

    def check_neurons(self, neurons: Iterable[tuple[int, int]]) -> None:
        self.shape.check_neurons(neurons)

    def check_experts(self, experts: Iterable[tuple[int, int | str]]) -> None:
        self.shape.check_experts(experts)

    # ----------------------------------------------------------------- norms and lens
    def frozen_norm(self, mod: nn.Module, x: torch.Tensor, ref: torch.Tensor,
                    center: bool = True, bias: bool = True) -> torch.Tensor:
        """Apply norm ``mod`` to ``x`` with its scale frozen at the real input ``ref``.

        ``frozen_norm(mod, ref, ref) == mod(ref)``, and the map is affine in ``x`` (linear
        with ``bias=False``), so contributions that sum to ``ref`` map to parts that sum
        to ``mod(ref)``. ``ref`` broadcasts against ``x`` over the last dimension.
        """
        dt = compute_dtype(x.dtype)
        if isinstance(mod, NoNorm):
            return x.to(dt)
        eps = self.norm_eps(mod)
        x, ref = x.to(dt), ref.to(dt)
        w = mod.weight.to(dt)
        if self.family.norm_kind == "layer":
            if center:
                x = x - x.mean(-1, keepdim=True)
            scale = torch.sqrt(ref.var(-1, keepdim=True, unbiased=False) + eps)
            out = x / scale * w
            if bias and mod.bias is not None:
                out = out + mod.bias.to(dt)
            return out
        scale = torch.sqrt(ref.pow(2).mean(-1, keepdim=True) + eps)
        w = (1.0 + w) if self.family.norm_kind == "rms1p" else w
        return x / scale * w

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final-normed hidden states (unembedding and soft-capping)."""
        out = self.unembed(hidden)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return check_finite(self, out, "logits")

    def logit_tiles(self, hidden: torch.Tensor, tile: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, logits[:, start:start + tile])`` over the vocabulary, in float32.

        The same numbers as ``logits(hidden)``, a slice of the unembedding at a time, so a
        caller can reduce each tile while it is in cache. An unembedding that is not a
        plain linear layer comes as one tile. A NaN or inf in any tile raises CnaError
        once the last tile has been taken (one check per sweep, no sync per tile).
        """
        w, b = getattr(self.unembed, "weight", None), getattr(self.unembed, "bias", None)
        if type(self.unembed) is not nn.Linear or w is None:
            yield 0, self.logits(hidden).float()
            return
        ok = None  # no NaN or inf in any tile so far: checked once, after the last tile
        for s in range(0, w.shape[0], tile):
            out = torch.nn.functional.linear(hidden, w[s:s + tile],
                                             None if b is None else b[s:s + tile])
            if self.softcap:
                out = torch.tanh(out / self.softcap) * self.softcap
            ok = finite_flag(out) if ok is None else ok & finite_flag(out)
            yield s, out.float()
        if ok is not None and not bool(ok):
            raise nonfinite_error(self, "logits", "NaN or inf")

    # ----------------------------------------------------------------- running
    def batch(self, seqs: Sequence[Sequence[int]]) -> Batch:
        """Left-pad token id lists into one batch on the model's device."""
        if not seqs:
            raise CnaError("empty batch")
        pad = self.pad_id
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
                mask[i, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        return Batch(ids.to(dev), mask.to(dev), pos.to(dev))

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                     getattr(self.config, "pad_token_id", None)):
            if cand is not None:
                return int(cand)
        return 0

    def hidden(self, batch: Batch) -> torch.Tensor:
        """Final-normed hidden states of every position (no unembedding)."""
        base = self.model.base_model

        def run():
            return base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False).last_hidden_state
        return check_finite(self, run(), "activations", batch.input_ids, run)

    def run_with_cache(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                       points: Iterable[str] = CAPTURE_POINTS,
                       layers: Iterable[int] | None = None,
                       position: int | slice | None = None
                       ) -> tuple[torch.Tensor, ActivationCache]:
        """One forward pass over prompts (text, or token id lists), left-padded into one
        batch: the logits at the last position (batch, vocab) and the activations at
        ``points`` (``capture``; every position unless ``position``). Interventions active
        around the call apply."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise CnaError("no prompts")
        if any(isinstance(p, str) for p in prompts) and self.tokenizer is None:
            raise CnaError("the model has no tokenizer: pass token ids")
        seqs = [list(self.tokenizer(p).input_ids) if isinstance(p, str) else list(p)
                for p in prompts]
        with torch.no_grad(), self.capture(points, layers, position) as cache:
            logits = self.logits(self.hidden(self.batch(seqs))[:, -1])
        return logits, cache

    def last_logits(self, batch: Batch, n_last: int = 1) -> torch.Tensor:
        """Logits at the last ``n_last`` positions only: (batch, n_last, vocab)."""
        return self.logits(self.hidden(batch)[:, -n_last:])

    # ----------------------------------------------------------------- hooks
    @contextmanager
    def _hooked(self, registrations: list) -> Iterator[None]:
        """Hooks ``(module, "pre" | "fwd", hook)`` and taps of mixture-of-experts layers
        ``(layer, "tap", (role, point, fn, positions))``, all removed on exit."""
        handles = []
        try:
            for mod, kind, fn in registrations:
                if kind == "pre":
                    handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
                elif kind == "fwd":
                    handles.append(mod.register_forward_hook(fn, with_kwargs=True))
                else:
                    if mod not in self._moe:
                        self._moe[mod] = _MoeHooks(self, mod)
                    handles.append(self._moe[mod].add(fn))
            yield
        finally:
            for h in handles:
                h.remove()

    def _editor(self, point: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple:
        """The registration that replaces the input of ``point`` of ``layer`` by ``fn`` of it."""
        if point == "z":
            return self.module(layer, "o_proj"), "pre", _input_editor(fn)
        if point == "coef" and self.is_moe(layer):
            return layer, "tap", ("edit", "coef", fn, None)
        if point == "coef":
            return self.module(layer, "down_proj"), "pre", _input_editor(fn)
        if point == "router":
            if not self.is_moe(layer):
                raise CnaError(f"layer {layer} is dense: it has no router to edit")
            return layer, "tap", ("edit", "router", fn, None)
        raise CnaError(f"cannot intervene at '{point}': use {', '.join(EDIT_POINTS)}")

    @contextmanager
    def intervene(self, *interventions: Intervening) -> Iterator[list[dict]]:
        """Apply interventions (see ``cnalens.interventions``) while the block runs.

        Yields their JSON-able descriptions. Hooks come off on exit, also on exceptions.
        """
        regs = [self._editor(edit.point, edit.layer, _edit_fn(edit))
                for iv in interventions for edit in iv.edits(self)]
        with self._hooked(regs):
            yield [iv.describe(self.shape) for iv in interventions]

    @contextmanager
    def capture(self, points: Iterable[str] = CAPTURE_POINTS,
                layers: Iterable[int] | None = None,
                position: int | slice | None = None) -> Iterator[ActivationCache]:
        """Record activations at uniform points while the block runs.

        ``position``: None keeps every position, an int or slice selects positions
        (left padding puts every prompt's last token at -1). ``resid_mid`` is
        ``resid_pre + attn_out`` (the FFN's residual input in sequential blocks). ``route``
        (mixture-of-experts layers only): (batch, positions, experts [+ 1 shared]) router
        weights, 0 where a token is not routed to an expert.
        """
        points = tuple(points)
        for p in points:
            if p not in CAPTURE_POINTS:
                raise CnaError(f"unknown capture point '{p}': use {', '.join(CAPTURE_POINTS)}")
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        self.check_layers(layers)
        cache = ActivationCache()
        if position is None or isinstance(position, slice):
            sel = position or slice(None)
        else:
            sel = slice(position, position + 1 if position != -1 else None)

        def store(key):
            def put(t):
                cache[key] = t[:, sel].detach()
            return put

        need = set(points)
        if "resid_mid" in need:
            need |= {"resid_pre", "attn_out"}
        regs = []
        for layer in layers:
            blk = self.layers[layer]
            if "resid_pre" in need:
                regs.append((blk, "pre", _pre_reader(store(("resid_pre", layer)))))
            if "resid_post" in need:
                regs.append((blk, "fwd", _out_reader(store(("resid_post", layer)))))
            if "attn_out" in need:
                regs.append((self.module(layer, "attn_out"), "fwd",
                             _out_reader(store(("attn_out", layer)))))
            if "mlp_out" in need:
                regs.append((self.module(layer, "mlp_out"), "fwd",
                             _out_reader(store(("mlp_out", layer)))))
            if "z" in need:
                regs.append((self.module(layer, "o_proj"), "pre",
                             _pre_reader(store(("z", layer)))))
            if "coef" in need and self.is_moe(layer):  # computed at ``sel`` only
                regs.append((layer, "tap", ("read", "coef", _putter(cache, ("coef", layer)),
                                            sel)))
            elif "coef" in need:
                regs.append((self.module(layer, "down_proj"), "pre",
                             _pre_reader(store(("coef", layer)))))
            if "route" in need and self.is_moe(layer):
                regs.append((layer, "tap", ("read", "route", _putter(cache, ("route", layer)),
                                            sel)))
        with self._hooked(regs):
            yield cache
        if "resid_mid" in points:
            for layer in layers:
                if ("resid_pre", layer) in cache:
                    cache[("resid_mid", layer)] = (cache[("resid_pre", layer)]
                                                   + cache[("attn_out", layer)])
        for key in [k for k in cache if k[0] not in points]:
            del cache[key]

    # ----------------------------------------------------------------- reuse (for scans)
    # Used by the head scan (cnalens.heads.scan) to share computation between interventions:
    # run from a key/value cache, copy/expand caches, skip layers whose output is known,
    # and edit one point of one layer with an arbitrary tensor function.
    def run_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor, cache: DynamicCache | None = None
                   ) -> tuple[torch.Tensor, object]:
        """Final-normed hidden states of ``input_ids`` continuing ``cache`` (None: a fresh one).

        ``attention_mask`` covers the cached tokens and the new ones; returns the hidden
        states and the (extended, in place) transformers ``DynamicCache``.
        """
        from transformers import DynamicCache
        if cache is None:
            cache = DynamicCache(config=self.config)
        start, runs = cache.get_seq_length(), []

        def run():
            if runs:  # the diagnosis pass: first drop what the first pass added
                cache.crop(start)
            runs.append(1)
            return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, cache=cache,
                                         use_cache=True).last_hidden_state
        rerun = run if isinstance(cache, DynamicCache) else None
        return check_finite(self, run(), "activations", input_ids, rerun), cache

    def tree_mask(self, tree: TokenTree) -> torch.Tensor | dict | None:
        """The attention mask that runs a ``cnalens.trees.TokenTree`` as one row.

        An additive (1, 1, N, N) mask where node i sees node j iff j is i or an ancestor
        (and, in sliding-window layers, their depths differ by less than the window), or
        a dict of such masks per layer type. None where this model cannot take one (an
        attention implementation other than eager/sdpa, or a sliding window it would need
        per layer but does not accept per layer): callers then run sequences as rows.
        """
        if self.config._attn_implementation not in ("eager", "sdpa"):
            return None
        anc = tree.ancestors()
        window = getattr(self.config, "sliding_window", None)
        types = set(getattr(self.config, "layer_types", None) or ["full_attention"])
        masks = {"full_attention": anc}
        if window and len(tree) and int(tree.depth.max()) >= window:
            if not self._takes_mask_dict or not types <= {"full_attention",
                                                             "sliding_attention"}:
                return None
            near = (tree.depth[:, None] - tree.depth[None, :]) < window
            masks["sliding_attention"] = anc & near
        elif not types <= {"full_attention", "sliding_attention"}:
            return None
        low = torch.finfo(self.dtype).min
        out = {t: torch.zeros(m.shape, dtype=self.dtype).masked_fill_(~m, low)[None, None]
               .to(self.device) for t, m in masks.items()}
        if len(out) == 1:
            return out["full_attention"]
        return {t: out.get(t, out["full_attention"]) for t in types}

    @functools.cached_property
    def _takes_mask_dict(self) -> bool:
        """Whether the base model's forward accepts one mask per layer type (a dict)."""
        import inspect
        try:
            src = inspect.getsource(type(self.model.base_model).forward)
        except (OSError, TypeError):
            return False
        return "causal_mask_mapping := attention_mask, dict" in src

    def run_tree(self, ids: torch.Tensor, depth: torch.Tensor,
                 mask: torch.Tensor | dict[str, torch.Tensor], rows: int = 1) -> torch.Tensor:
        """Final-normed hidden states (rows, N, d) of a token tree (``tree_mask``) repeated
        in ``rows`` identical rows (e.g. one per intervention replica)."""
        n = ids.shape[-1]
        if isinstance(mask, dict):
            mask = {k: v.expand(rows, -1, -1, -1) for k, v in mask.items()}
        else:
            mask = mask.expand(rows, -1, -1, -1)

        def run():
            return self.model.base_model(input_ids=ids.reshape(1, n).expand(rows, n),
                                         attention_mask=mask,
                                         position_ids=depth.reshape(1, n).expand(rows, n),
                                         use_cache=False).last_hidden_state
        return check_finite(self, run(), "activations", None, run)

    @staticmethod
    def expand_cache(cache: DynamicCache, repeats: int, base: DynamicCache | None = None,
                     below: int = 0) -> DynamicCache:
        """A new cache with every row of ``cache`` repeated ``repeats`` times (interleaved).

        Layers ``< below`` are taken from ``base`` instead (e.g. a one-row reference cache),
        each of its rows repeated so the batch matches. Neither input is modified.
        """
        import copy
        rows = cache.layers[below].keys.shape[0] * repeats
        layers = []
        for layer, own in enumerate(cache.layers):
            src = base.layers[layer] if layer < below else own
            dst = copy.copy(src)
            dst.keys = src.keys.repeat_interleave(rows // src.keys.shape[0], 0)
            dst.values = src.values.repeat_interleave(rows // src.values.shape[0], 0)
            layers.append(dst)
        new = copy.copy(cache)
        new.layers = layers
        return new

    @contextmanager
    def reuse_layers(self, outputs: Sequence[torch.Tensor], below: int,
                     repeat: int = 1) -> Iterator[None]:
        """Decoder layers ``< below`` skip their work and return ``outputs[layer]``.

        ``outputs[layer]`` is the layer's recorded output (``capture(["resid_post"])``),
        tiled ``repeat`` times along the batch. Every decoder layer of the supported
        families returns its hidden states as a plain tensor (transformers >= 5). The
        original ``forward`` is restored on exit, also on exceptions.
        """
        self.check_layers(range(below))
        saved = []
        try:
            for layer in range(below):
                out = outputs[layer]
                out = out.repeat(repeat, *([1] * (out.dim() - 1))) if repeat > 1 else out
                mod = self.layers[layer]
                saved.append((mod, mod.__dict__.get("forward")))
                mod.forward = _constant(out)
            yield
        finally:
            for mod, fwd in saved:
                if fwd is None:
                    del mod.forward
                else:
                    mod.forward = fwd

    @contextmanager
    def edit(self, point: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]
             ) -> Iterator[None]:
        """Replace the input of ``point`` (``z``, ``coef`` or, in a mixture-of-experts layer,
        ``router``: its logits) of one layer by ``fn(input)`` ((batch, positions, width))."""
        self.check_layers([layer])
        with self._hooked([self._editor(point, layer, fn)]):
            yield

    # --- lens (scores): helpers for cnalens.scores -------------------------------------
    def norm_affine(self, mod: nn.Module, ref: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Norm ``mod`` frozen at ``ref`` as parts ``(gain, scale, bias, centred)``.

        ``frozen_norm(mod, x, ref) == C(x) / scale * gain + bias`` where ``C`` subtracts the
        mean when ``centred`` (LayerNorm) and is the identity otherwise; ``scale`` has
        ``ref``'s shape with last dimension 1; ``bias`` is None for RMS norms.
        """
        dt = compute_dtype(ref.dtype)
        ref = ref.to(dt)
        if isinstance(mod, NoNorm):
            return (torch.ones(ref.shape[-1], dtype=dt, device=ref.device),
                    torch.ones_like(ref[..., :1]), None, False)
        eps = self.norm_eps(mod)
        w = mod.weight.to(dt)
        if self.family.norm_kind == "layer":
            scale = torch.sqrt(ref.var(-1, keepdim=True, unbiased=False) + eps)
            bias = mod.bias.to(dt) if getattr(mod, "bias", None) is not None else None
            return w, scale, bias, True
        scale = torch.sqrt(ref.pow(2).mean(-1, keepdim=True) + eps)
        return ((1.0 + w) if self.family.norm_kind == "rms1p" else w), scale, None, False

    def norm_eps(self, mod: nn.Module) -> float:
        """The epsilon a norm adds to its variance / mean square (0 for ``NO_NORM``)."""
        if isinstance(mod, NoNorm):
            return 0.0
        return float(getattr(mod, "eps", None) or getattr(mod, "variance_epsilon", 1e-6))

    @contextmanager
    def attention_record(self, layers: Iterable[int] | None = None
                         ) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Record attention weights and values while the block runs (eager attention).

        Yields ``{layer: (weights (b, n_heads, q, k), values (b, n_kv_heads, k, head_dim))}``;
        head ``h`` reads value head ``h // (n_heads // n_kv_heads)``, and its output (its
        slice of ``z``) is ``weights[:, h] @ values[:, h // groups]``. The model's attention
        implementation is switched to eager for the block and restored on exit.
        """
        import sys

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        layers = list(range(self.n_layers)) if layers is None else list(layers)
        self.check_layers(layers)
        owners = {id(self.module(layer, "attn")): layer for layer in layers}
        record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def eager(module, query, key, value, attention_mask, **kwargs):
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise CnaError(f"{self.family.name}: no eager attention to record weights from")
            out, weights = fn(module, query, key, value, attention_mask, **kwargs)
            if id(module) in owners:
                record[owners[id(module)]] = (weights.detach(), value.detach())
            return out, weights

        before = self.config._attn_implementation
        had = "eager" in ALL_ATTENTION_FUNCTIONS._local_mapping
        old = ALL_ATTENTION_FUNCTIONS._local_mapping.get("eager")
        try:
            self.model.set_attn_implementation("eager")
            ALL_ATTENTION_FUNCTIONS["eager"] = eager
            yield record
        finally:
            if had:
                ALL_ATTENTION_FUNCTIONS["eager"] = old
            elif "eager" in ALL_ATTENTION_FUNCTIONS._local_mapping:
                del ALL_ATTENTION_FUNCTIONS["eager"]
            self.model.set_attn_implementation(before)


def _constant(out: torch.Tensor):
    def forward(*args, **kwargs):
        return out
    return forward


def _pre_reader(put):
    def hook(mod, args, kwargs):
        put(args[0] if args else kwargs["hidden_states"])
    return hook


def _out_reader(put):
    def hook(mod, args, kwargs, output):
        put(_first(output))
    return hook


def _input_editor(fn):
    """A forward pre-hook replacing a module's input by ``fn(input)``."""
    def hook(mod, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


def _edit_fn(edit):
    """``x[..., idx] = x[..., idx] * factor + value`` at the edit's positions, on a copy."""
    def fn(x):
        x = x.clone()
        idx = edit.idx.to(x.device)
        at = (Ellipsis, idx) if edit.position is None else (slice(None), edit.position, idx)
        new = x[at] * edit.factor
        if edit.value is not None:
            new = new + edit.value.to(device=x.device, dtype=x.dtype)
        x[at] = new
        return x
    return fn


def _putter(cache: ActivationCache, key: tuple[str, int]):
    def put(t):
        cache[key] = t.detach()
    return put


def _sel_key(sel: slice) -> tuple:
    return (sel.start, sel.stop, sel.step)


class _Tap:
    """A handle that takes one tap off a mixture-of-experts layer."""

    def __init__(self, owner: _MoeHooks, key: int):
        self.owner, self.key = owner, key

    def remove(self) -> None:
        self.owner.remove(self.key)


class _MoeHooks:
    """The hooks of one mixture-of-experts layer, on while any tap is: taps run in the order
    they were added (so a capture inside an intervention sees the edited coefficients).

    Taps ``(role, point, fn, positions)``: ``("read", "coef" | "route", put, sel)`` gets
    the (batch, positions ``sel``, width) weighted coefficients or router weights (computed
    at those positions only when nothing edits them); ``("edit", "coef", fn, None)``
    replaces the weighted coefficients by ``fn`` of them, which adds ``sum_n (m'_n - m_n)
    v_n`` to the block's output; ``("edit", "router", fn)`` replaces the router's logits
    (batch, positions, experts) and routes again (softmax, top-k, renormalised where the
    router does)."""

    def __init__(self, view: ModelView, layer: int):
        self.view, self.layer = view, layer
        self.lay: ExpertLayout = view.layout(layer)
        self.taps: dict[int, tuple] = {}
        self.handles: list = []
        self.state: dict[str, Any] = {}
        self.count = 0

    def add(self, tap: tuple) -> _Tap:
        if not self.taps:
            self._install()
        self.count += 1
        self.taps[self.count] = tap
        return _Tap(self, self.count)

    def remove(self, key: int) -> None:
        self.taps.pop(key, None)
        if not self.taps:
            for h in self.handles:
                h.remove()
            self.handles = []
            self.state.clear()

    def _install(self) -> None:
        v, layer = self.view, self.layer
        regs = [(v.ffn_module(layer), "pre", self._start),
                (v.moe_module(layer, "router"), "fwd", self._route),
                (v.moe_module(layer, "experts"), "pre", self._experts_in),
                (v.ffn_module(layer), "fwd", self._finish)]
        shared, gate = v.moe_module(layer, "shared_expert"), v.moe_module(layer, "shared_gate")
        if shared is not None:
            regs.append((shared.down_proj, "pre", self._shared_in))
        if gate is not None:
            regs.append((gate, "fwd", self._shared_gate))
        for mod, kind, fn in regs:
            self.handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True)
                                if kind == "pre" else
                                mod.register_forward_hook(fn, with_kwargs=True))

    # ---- the hooks, in the order a forward pass calls them
    def _start(self, mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.state.clear()
        self.state["shape"] = tuple(x.shape[:-1])

    def _route(self, mod, args, kwargs, output):
        edits = [fn for role, point, fn, _ in self.taps.values()
                 if role == "edit" and point == "router"]
        if not edits:
            return None
        logits, weights, index = output
        new = logits.reshape(*self.state["shape"], -1)
        for fn in edits:
            new = fn(new)
        new = new.reshape(logits.shape)
        changed = (new != logits).any(-1, keepdim=True)
        probs = torch.softmax(new, dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, index.shape[-1], dim=-1)
        if getattr(mod, "norm_topk_prob", True):  # Mixtral's router always renormalises
            top = top / top.sum(-1, keepdim=True)
        return (new, torch.where(changed, top.to(weights.dtype), weights),
                torch.where(changed, idx, index))

    def _experts_in(self, mod, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = list(args) + [kwargs[k] for k in names[len(args):]]
        self.state.update(zip(("x", "index", "weights"), vals, strict=False))

    def _shared_in(self, mod, args, kwargs):
        self.state["shared"] = args[0] if args else kwargs["input"]

    def _shared_gate(self, mod, args, kwargs, output):
        self.state["gate"] = torch.sigmoid(output)

    def _finish(self, mod, args, kwargs, output):
        taps = [t for t in self.taps.values() if t[1] != "router"]
        if not taps:
            return None
        sels = {_sel_key(sel) for role, _, _, sel in taps if role == "read"}
        if all(role == "read" for role, *_ in taps) and len(sels) == 1:
            coef, route = self._coefficients(taps[0][3])  # the read positions only
            for _, point, put, _ in taps:
                put(coef if point == "coef" else route)
            return None
        coef, route = self._coefficients()
        new = coef
        for role, point, fn, sel in taps:
            if role == "read":
                fn((new if point == "coef" else route)[:, sel])
            else:
                new = fn(new)
        if new is coef:
            return None
        diff = (new - coef).reshape(-1, coef.shape[-1])
        cols = diff.ne(0).any(0).nonzero()[:, 0]
        if not len(cols):
            return None
        vecs = self.view.value_vectors(self.layer, cols)
        return output + (diff[:, cols].to(vecs.dtype) @ vecs).reshape(output.shape).to(
            output.dtype)

    def _coefficients(self, sel: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted coefficients (batch, positions, n_neurons) and router weights
        (batch, positions, n_routes) of this forward pass (at positions ``sel`` only, if
        given): per routed expert (a loop over experts, vectorised over its tokens and
        neurons) ``r_e * act(gate) * up``."""
        st, lay = self.state, self.lay
        ex = self.view.moe_module(self.layer, "experts")
        x, index, weights = st["x"], st["index"], st["weights"]
        shape, shared, gate = st["shape"], st.get("shared"), st.get("gate")
        if sel is not None:  # the tokens at those positions (tokens are batch-major)
            tokens = torch.arange(x.shape[0], device=x.device).reshape(shape)[:, sel]
            shape, tokens = tuple(tokens.shape), tokens.reshape(-1)
            x, index, weights = x[tokens], index[tokens], weights[tokens]
            shared = None if shared is None else shared[tokens]
            gate = None if gate is None else gate[tokens]
        T, dt = x.shape[0], x.dtype
        rdt = compute_dtype(dt)
        coef = x.new_zeros(T, lay.n_experts, lay.width)
        for e in torch.unique(index).tolist():
            if not 0 <= e < lay.n_experts:  # expert-parallel sentinels
                continue
            tok, slot = (index == e).nonzero(as_tuple=True)
            m = ex._apply_gate(nn.functional.linear(x[tok], ex.gate_up_proj[e]))
            coef[tok, e] = (m * weights[tok, slot, None]).to(dt)
        route = torch.zeros(T, lay.n_experts, dtype=rdt, device=x.device)
        route.scatter_(1, index.clamp(max=lay.n_experts - 1),
                       weights.to(rdt) * (index < lay.n_experts))
        coef = coef.reshape(T, -1)
        if lay.shared:
            gate = torch.ones(T, 1, dtype=dt, device=x.device) if gate is None else gate
            coef = torch.cat([coef, (gate * shared).to(dt)], -1)
            route = torch.cat([route, gate.to(rdt)], -1)
        return coef.reshape(*shape, -1), route.reshape(*shape, -1)
