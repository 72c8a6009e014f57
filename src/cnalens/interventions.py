"""Interventions as data: small frozen dataclasses applied by ``ModelView.intervene``.

Each intervention edits points of a layer, identified by uniform names: ``z`` (the input
of the attention output projection, i.e. the heads' outputs, split by head), ``coef`` (the
input of the FFN down projection, i.e. the FFN coefficients; in a mixture-of-experts layer
the weighted coefficients of all experts, flat: ``ModelView``) and ``router`` (a
mixture-of-experts layer's router logits, before its top-k).
An edit sets ``x[..., idx] = x[..., idx] * factor + value`` at the chosen positions.
``describe(shape)`` gives a JSON-able record that results carry in their metadata (neurons
of mixture-of-experts layers named ``L.E.N``/``L.S.N`` when the model's shape is given).

Neurons are ``(layer, index)`` pairs, the index flat in a mixture-of-experts layer
(``ModelShape.neuron_index`` turns ``L.E.N`` into it): zeroing or scaling an expert's
neurons scales their weighted coefficients, the same as scaling those columns of the
expert's ``down_proj``. ``ZeroExperts`` zeroes whole routed experts, either keeping the
routing (the expert's output is dropped, the other experts' weights unchanged: as zeroing
its ``down_proj``) or re-routing (the router's logit of the expert set to -inf before
its softmax and top-k: the token goes to the next best expert, as if the model had been
built without it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cnalens.errors import CnaError
from cnalens.models.shape import SHARED

if TYPE_CHECKING:
    from cnalens.models import ModelView
    from cnalens.models.shape import ModelShape

Head = tuple[int, int]
Neuron = tuple[int, int]


@dataclass(frozen=True)
class Edit:
    """One low-level edit of a layer's ``z`` or ``coef`` vector."""

    point: str  # "z", "coef" or "router"
    layer: int
    idx: torch.Tensor  # coordinates of the point's last dimension
    factor: float = 0.0
    value: torch.Tensor | None = None  # added after scaling, same length as idx
    position: int | None = None  # None: every position; else one index (e.g. -1)


def _norm_units(units) -> tuple[tuple[int, int], ...]:
    return tuple(sorted({(int(a), int(b)) for a, b in units}))


def _group(units) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, index in units:
        by_layer[layer].append(index)
    return by_layer


def _neuron_names(neurons, shape: ModelShape | None) -> list[str]:
    if shape is None:
        return [f"{a}.{b}" for a, b in neurons]
    return [shape.neuron_name(a, b) for a, b in neurons]


def _head_coords(heads: list[int], head_dim: int) -> torch.Tensor:
    h = torch.tensor(heads, dtype=torch.long)
    return (h[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


@dataclass(frozen=True)
class ScaleHeads:
    """Multiply chosen heads' outputs by ``factor`` (0 = the paper's zero-intervention)."""

    heads: tuple[Head, ...]
    factor: float = 0.0
    position: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "heads", _norm_units(self.heads))

    def edits(self, view: ModelView) -> list[Edit]:
        view.check_heads(self.heads)
        return [
            Edit("z", layer, _head_coords(hs, view.head_dim), self.factor, None, self.position)
            for layer, hs in _group(self.heads).items()
        ]

    def describe(self, shape: ModelShape | None = None) -> dict:
        kind = "zero_heads" if self.factor == 0 else "scale_heads"
        return {"kind": kind, "heads": [f"{a}.{b}" for a, b in self.heads],
                "factor": self.factor, "position": self.position}


def ZeroHeads(heads: Iterable[Head], position: int | None = None) -> ScaleHeads:  # noqa: N802
    """Zero-intervention of heads at the output projection's input."""
    return ScaleHeads(heads, 0.0, position)


@dataclass(frozen=True)
class ReplaceHeads:
    """Replace chosen heads' outputs by fixed vectors (``values[i]`` for ``heads[i]``)."""

    heads: tuple[Head, ...]
    values: torch.Tensor = field(compare=False)  # (len(heads), head_dim)
    label: str = "replace_heads"
    position: int | None = None

    def edits(self, view: ModelView) -> list[Edit]:
        view.check_heads(self.heads)
        out = []
        by_layer: dict[int, list[int]] = defaultdict(list)
        for i, (layer, _) in enumerate(self.heads):
            by_layer[layer].append(i)
        for layer, rows in by_layer.items():
            hs = [self.heads[i][1] for i in rows]
            vals = self.values[rows].reshape(-1)
            out.append(Edit("z", layer, _head_coords(hs, view.head_dim), 0.0, vals, self.position))
        return out

    def describe(self, shape: ModelShape | None = None) -> dict:
        return {"kind": self.label, "heads": [f"{a}.{b}" for a, b in self.heads],
                "position": self.position}


@dataclass(frozen=True)
class ScaleNeurons:
    """Multiply chosen FFN neurons' coefficients by ``factor`` (0 = zero-intervention)."""

    neurons: tuple[Neuron, ...]
    factor: float = 0.0
    position: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "neurons", _norm_units(self.neurons))

    def edits(self, view: ModelView) -> list[Edit]:
        view.check_neurons(self.neurons)
        return [
            Edit("coef", layer, torch.tensor(ns, dtype=torch.long), self.factor, None,
                 self.position)
            for layer, ns in _group(self.neurons).items()
        ]

    def describe(self, shape: ModelShape | None = None) -> dict:
        kind = "zero_neurons" if self.factor == 0 else "scale_neurons"
        return {"kind": kind, "n": len(self.neurons),
                "neurons": _neuron_names(self.neurons, shape),
                "factor": self.factor, "position": self.position}


def ZeroNeurons(neurons: Iterable[Neuron],  # noqa: N802
                position: int | None = None) -> ScaleNeurons:
    """Zero chosen FFN neurons' coefficients."""
    return ScaleNeurons(neurons, 0.0, position)


@dataclass(frozen=True)
class KeepOnlyNeurons:
    """Zero every FFN neuron of ``layers`` except those in ``keep``."""

    layers: tuple[int, ...]
    keep: tuple[Neuron, ...]
    position: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(sorted(set(int(x) for x in self.layers))))
        object.__setattr__(self, "keep", _norm_units(self.keep))

    def edits(self, view: ModelView) -> list[Edit]:
        view.check_layers(self.layers)
        view.check_neurons(self.keep)
        kept = _group(self.keep)
        out = []
        for layer in self.layers:
            mask = torch.ones(view.ffn_width(layer), dtype=torch.bool)
            mask[torch.tensor(kept.get(layer, []), dtype=torch.long)] = False
            out.append(Edit("coef", layer, mask.nonzero().flatten(), 0.0, None, self.position))
        return out

    def describe(self, shape: ModelShape | None = None) -> dict:
        return {"kind": "keep_only_neurons", "layers": list(self.layers),
                "n_keep": len(self.keep), "keep": _neuron_names(self.keep, shape),
                "position": self.position}


@dataclass(frozen=True)
class ReplaceNeurons:
    """Set chosen FFN neurons' coefficients to fixed values (e.g. their dataset mean)."""

    neurons: tuple[Neuron, ...]
    values: torch.Tensor = field(compare=False)  # (len(neurons),)
    label: str = "replace_neurons"
    position: int | None = None

    def edits(self, view: ModelView) -> list[Edit]:
        view.check_neurons(self.neurons)
        by_layer: dict[int, list[int]] = defaultdict(list)
        for i, (layer, _) in enumerate(self.neurons):
            by_layer[layer].append(i)
        return [
            Edit("coef", layer, torch.tensor([self.neurons[i][1] for i in rows]), 0.0,
                 self.values[rows], self.position)
            for layer, rows in by_layer.items()
        ]

    def describe(self, shape: ModelShape | None = None) -> dict:
        return {"kind": self.label, "n": len(self.neurons),
                "neurons": _neuron_names(self.neurons, shape), "position": self.position}


def _expert_key(unit: tuple[int, int | str]) -> tuple[int, int, int]:
    layer, e = unit
    return (layer, 1, 0) if e == SHARED else (layer, 0, int(e))


@dataclass(frozen=True)
class ZeroExperts:
    """Zero whole experts ``(layer, expert)`` of mixture-of-experts layers (``"S"``: the
    shared expert). ``reroute=False``: their output is dropped and the other experts keep
    their router weights (the same as zeroing the experts' ``down_proj``); ``reroute=True``
    (routed experts only): the router never picks them, and each token goes to its next
    best experts, weighted as the router weights them (as in a model built without them).
    """

    experts: tuple[tuple[int, int | str], ...]
    reroute: bool = False
    position: int | None = None

    def __post_init__(self):
        units = {(int(a), SHARED if b == SHARED else int(b)) for a, b in self.experts}
        object.__setattr__(self, "experts", tuple(sorted(units, key=_expert_key)))

    def edits(self, view: ModelView) -> list[Edit]:
        view.check_experts(self.experts)
        out = []
        for layer, es in _group(self.experts).items():
            lay = view.layout(layer)
            if self.reroute:
                if SHARED in es:
                    raise CnaError(f"expert {layer}.S: the shared expert is not routed, so "
                                   "it cannot be re-routed (zero it with reroute=False)")
                if len(es) > lay.n_experts - lay.top_k:
                    raise CnaError(f"cannot re-route around {len(es)} experts of layer "
                                   f"{layer}: each token needs {lay.top_k} of its "
                                   f"{lay.n_experts}")
                idx = torch.tensor(es, dtype=torch.long)
                out.append(Edit("router", layer, idx, 0.0,
                                torch.full((len(es),), float("-inf")), self.position))
            else:
                idx = torch.cat([lay.expert_neurons(e) for e in es])
                out.append(Edit("coef", layer, idx, 0.0, None, self.position))
        return out

    def describe(self, shape: ModelShape | None = None) -> dict:
        return {"kind": "zero_experts", "experts": [f"{a}.{b}" for a, b in self.experts],
                "reroute": self.reroute, "position": self.position}


Intervention = (ScaleHeads | ReplaceHeads | ScaleNeurons | KeepOnlyNeurons | ReplaceNeurons
                | ZeroExperts)


def describe_all(interventions: Iterable[Intervention],
                 shape: ModelShape | None = None) -> list[dict]:
    return [i.describe(shape) for i in interventions]
