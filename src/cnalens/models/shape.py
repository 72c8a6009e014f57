"""The sizes a model's config fixes, and the range checks of layer, head and neuron numbers.

A mixture-of-experts layer has an experts dimension of its own (``ExpertLayout``): its
FFN neurons are numbered flat, expert 0's ``width`` neurons first, then expert 1's, ...,
then the shared expert's (Qwen2-MoE), so every array over a layer's neurons (coefficients,
importances, value vectors) keeps one axis. Their names are ``L.E.N`` (layer, expert,
index inside the expert) and ``L.S.N`` (the shared expert); a dense layer's stay ``L.N``.

``ModelShape`` needs no weights: the command line reads it from the config (a GGUF's
metadata, a cached or saved folder's ``config.json``) and checks every ``L``, ``L.H`` and
``L.N`` it was given before a model is converted or loaded, so a bad argument fails in
seconds. ``ModelView.shape`` is the same object for a loaded model (after pruning, its
per-layer FFN widths).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cnalens.errors import CnaError

SHARED = "S"  # the shared expert's name in ``L.S.N``


@dataclass(frozen=True)
class ExpertLayout:
    """The experts of one mixture-of-experts layer, and how its flat neuron index splits.

    Flat neuron ``j < n_experts * width`` is neuron ``j % width`` of routed expert
    ``j // width``; the ``shared`` neurons after them are the shared expert's. Route
    ``e`` (a column of the router weights, ``ModelView`` capture point ``route``) is
    routed expert ``e``, and route ``n_experts`` the shared expert's gate.
    """

    n_experts: int
    width: int  # neurons per routed expert
    shared: int = 0  # the shared expert's neurons (0: no shared expert)
    top_k: int = 1  # experts routed per token

    @property
    def n_neurons(self) -> int:
        return self.n_experts * self.width + self.shared

    @property
    def n_routes(self) -> int:
        return self.n_experts + (1 if self.shared else 0)

    def route_of(self) -> torch.Tensor:
        """(n_neurons,) the route (expert, or ``n_experts`` for shared) of each flat neuron."""
        routed = torch.arange(self.n_experts).repeat_interleave(self.width)
        return torch.cat([routed, torch.full((self.shared,), self.n_experts)])

    def expert_neurons(self, expert: int | str) -> torch.Tensor:
        """The flat indices of one expert's neurons (``SHARED`` for the shared expert)."""
        if expert == SHARED:
            return torch.arange(self.shared) + self.n_experts * self.width
        return torch.arange(self.width) + int(expert) * self.width

    def flat(self, expert: int | str, index: int) -> int:
        """The flat index of neuron ``index`` of ``expert`` (``SHARED``: the shared one)."""
        if expert == SHARED:
            return self.n_experts * self.width + index
        return int(expert) * self.width + index

    def split(self, flat: int) -> tuple[int | str, int]:
        """``(expert, index)`` of a flat index; expert ``SHARED`` for the shared expert's."""
        if flat >= self.n_experts * self.width:
            return SHARED, flat - self.n_experts * self.width
        return divmod(flat, self.width)


@dataclass(frozen=True)
class ModelShape:
    """Layer count, attention heads per layer and FFN width of each layer."""

    n_layers: int
    n_heads: int
    ffn_widths: tuple[int, ...]  # flat neurons per layer (all experts' of a MoE layer)
    experts: tuple[ExpertLayout | None, ...] = ()  # per layer, None dense; () all dense

    def layout(self, layer: int) -> ExpertLayout | None:
        """The experts of a mixture-of-experts layer, None for a dense one."""
        return self.experts[layer] if self.experts else None

    @property
    def is_moe(self) -> bool:
        return any(e is not None for e in self.experts)

    def neuron_name(self, layer: int, flat: int) -> str:
        """``L.N`` for a dense layer, ``L.E.N`` or ``L.S.N`` for a mixture-of-experts one."""
        lay = self.layout(layer)
        if lay is None:
            return f"{layer}.{flat}"
        expert, index = lay.split(int(flat))
        return f"{layer}.{expert}.{index}"

    def expert_labels(self, layer: np.ndarray, flat: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        """For table rows (vectorised): each neuron's expert (a string: "" in a dense layer,
        ``S`` for the shared expert) and its index inside that expert (the flat index in a
        dense layer)."""
        layer, flat = np.asarray(layer), np.asarray(flat)
        expert = np.full(flat.shape, "", dtype=object)
        index = flat.copy()
        for x in np.unique(layer):
            lay = self.layout(int(x))
            if lay is None:
                continue
            at = layer == x
            routed = lay.n_experts * lay.width
            e, i = np.divmod(flat[at], lay.width)
            shared = flat[at] >= routed
            expert[at] = np.where(shared, SHARED, e.astype(str)).astype(object)
            index[at] = np.where(shared, flat[at] - routed, i)
        return expert, index

    def neuron_index(self, layer: int, expert: int | str | None, index: int) -> int:
        """The flat index of ``L.N`` (``expert`` None) or ``L.E.N``/``L.S.N``; CnaError
        naming the valid range for one that does not exist."""
        self.check_layers([layer])
        lay = self.layout(layer)
        if expert is None:
            if lay is not None:
                raise CnaError(f"neuron {layer}.{index}: layer {layer} is a mixture of "
                               f"{lay.n_experts} experts: name its neurons L.E.N"
                               + (" or L.S.N (shared expert)" if lay.shared else ""))
            self.check_neurons([(layer, index)])
            return int(index)
        name = f"{layer}.{expert}.{index}"
        if lay is None:
            raise CnaError(f"neuron {name}: layer {layer} is dense: name its neurons L.N")
        if expert == SHARED:
            if not lay.shared:
                raise CnaError(f"neuron {name}: layer {layer} has no shared expert")
            width = lay.shared
        else:
            if not 0 <= int(expert) < lay.n_experts:
                raise CnaError(f"neuron {name} out of range: layer {layer} has experts "
                               f"0..{lay.n_experts - 1}")
            width = lay.width
        if not 0 <= index < width:
            raise CnaError(f"neuron {name} out of range: each expert of layer {layer} has "
                           f"neurons 0..{width - 1}")
        return lay.flat(expert, index)

    def check_experts(self, experts: Iterable[tuple[int, int | str]]) -> None:
        """One line naming the valid range for the first expert ``(L, E)`` (``E`` =
        ``SHARED``: the shared expert) that does not exist."""
        for layer, e in experts:
            self.check_layers([layer])
            lay = self.layout(layer)
            if lay is None:
                raise CnaError(f"expert {layer}.{e}: layer {layer} is dense (no experts)")
            if e == SHARED:
                if not lay.shared:
                    raise CnaError(f"expert {layer}.S: layer {layer} has no shared expert")
            elif not 0 <= int(e) < lay.n_experts:
                raise CnaError(f"expert {layer}.{e} out of range: layer {layer} has experts "
                               f"0..{lay.n_experts - 1}")

    @classmethod
    def from_config(cls, config: Any, ffn_widths: Sequence[int] | None = None,
                    experts: Sequence[ExpertLayout | None] | None = None) -> ModelShape:
        """The shape a transformers config describes (``ffn_widths`` and ``experts`` for
        pruned models)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str) -> int | None:
            for name in names:
                value = getattr(cfg, name, None)
                if isinstance(value, int):
                    return value
            return None

        n_layers = first("num_hidden_layers", "n_layer", "num_layers")
        n_heads = first("num_attention_heads", "n_head")
        if n_layers is None or n_heads is None:
            raise CnaError(f"cannot read layer and head counts from the {cfg.model_type} config")
        experts = tuple(experts) if experts is not None else expert_layouts(cfg, n_layers)
        if ffn_widths is None:
            width = first("intermediate_size", "n_inner", "ffn_dim")
            if width is None:  # GPT-2 and GPT-J leave the FFN width at 4 x d_model
                width = 4 * (first("hidden_size", "n_embd", "d_model") or 0)
            ffn_widths = [width if e is None else e.n_neurons for e in experts]
        return cls(n_layers, n_heads, tuple(int(w) for w in ffn_widths),
                   experts if any(e is not None for e in experts) else ())

    def check_layers(self, layers: Iterable[int]) -> None:
        """One line naming the valid range for the first layer out of range."""
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise CnaError(f"layer {layer} out of range: the model has layers "
                               f"0..{self.n_layers - 1}")

    def check_heads(self, heads: Iterable[tuple[int, int]]) -> None:
        """One line naming the valid range for the first head ``(L, H)`` out of range."""
        for layer, h in heads:
            self.check_layers([layer])
            if not 0 <= h < self.n_heads:
                raise CnaError(f"head {layer}.{h} out of range: layer {layer} has heads "
                               f"0..{self.n_heads - 1}")

    def check_neurons(self, neurons: Iterable[tuple[int, int]]) -> None:
        """One line naming the valid range for the first FFN neuron ``(L, N)`` out of range
        (``N`` flat in a mixture-of-experts layer)."""
        for layer, n in neurons:
            self.check_layers([layer])
            if not 0 <= n < self.ffn_widths[layer]:
                lay = self.layout(layer)
                what = "" if lay is None else (
                    f" (flat: {lay.n_experts} experts x {lay.width}"
                    + (f" + {lay.shared} shared" if lay.shared else "") + ")")
                raise CnaError(f"neuron {layer}.{n} out of range: layer {layer} has FFN "
                               f"neurons 0..{self.ffn_widths[layer] - 1}{what}")

    def check(self, *, layers: Iterable[int] = (), heads: Iterable[tuple[int, int]] = (),
              neurons: Iterable[tuple[int, int]] = ()) -> None:
        """All three checks at once."""
        self.check_layers(layers)
        self.check_heads(heads)
        self.check_neurons(neurons)


# config keys of the mixture-of-experts families: (experts, width per expert), first found
_N_EXPERTS = ("num_local_experts", "num_experts")
_EXPERT_WIDTH = {"mixtral": "intermediate_size", "olmoe": "intermediate_size"}


def expert_layouts(cfg: Any, n_layers: int) -> tuple[ExpertLayout | None, ...]:
    """Each layer's ``ExpertLayout`` as a mixture-of-experts config describes it (None for
    dense layers: every layer of a dense model; Qwen MoE's ``mlp_only_layers`` and the
    layers ``decoder_sparse_step`` skips)."""
    n = next((v for k in _N_EXPERTS if isinstance(v := getattr(cfg, k, None), int)), 0)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not n or not isinstance(top_k, int):
        return (None,) * n_layers
    width = getattr(cfg, _EXPERT_WIDTH.get(cfg.model_type, "moe_intermediate_size"))
    shared = int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    return tuple(None if (layer in dense or (layer + 1) % step) else
                 ExpertLayout(int(n), int(width), shared, int(top_k))
                 for layer in range(n_layers))
