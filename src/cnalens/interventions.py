"""Interventions as data: small frozen dataclasses applied by ``ModelView.intervene``.

Each intervention edits one of two points of a layer, identified by uniform names:
``z`` (the input of the attention output projection, i.e. the heads' outputs, split by
head) and ``coef`` (the input of the FFN down projection, i.e. the FFN coefficients).
An edit sets ``x[..., idx] = x[..., idx] * factor + value`` at the chosen positions.
``describe()`` gives a JSON-able record that results carry in their metadata.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cnalens.models import ModelView

Head = tuple[int, int]
Neuron = tuple[int, int]


@dataclass(frozen=True)
class Edit:
    """One low-level edit of a layer's ``z`` or ``coef`` vector."""

    point: str  # "z" or "coef"
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

    def describe(self) -> dict:
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

    def describe(self) -> dict:
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

    def describe(self) -> dict:
        kind = "zero_neurons" if self.factor == 0 else "scale_neurons"
        return {"kind": kind, "n": len(self.neurons),
                "neurons": [f"{a}.{b}" for a, b in self.neurons],
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

    def describe(self) -> dict:
        return {"kind": "keep_only_neurons", "layers": list(self.layers),
                "n_keep": len(self.keep), "keep": [f"{a}.{b}" for a, b in self.keep],
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

    def describe(self) -> dict:
        return {"kind": self.label, "n": len(self.neurons),
                "neurons": [f"{a}.{b}" for a, b in self.neurons], "position": self.position}


Intervention = ScaleHeads | ReplaceHeads | ScaleNeurons | KeepOnlyNeurons | ReplaceNeurons


def describe_all(interventions: Iterable[Intervention]) -> list[dict]:
    return [i.describe() for i in interventions]
