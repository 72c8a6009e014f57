"""Which heads a scan covers: ``L.H`` names, layer ranges, and the checked selection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cnalens.errors import CnaError
from cnalens.names import parse_ints, parse_units

if TYPE_CHECKING:
    from cnalens.models import ModelView

Head = tuple[int, int]


def parse_heads(text: str) -> list[Head]:
    """``"17.22,15.9"`` -> ``[(17, 22), (15, 9)]`` (0-based ``L.H``)."""
    return parse_units(text, "heads")


def parse_layers(text: str) -> list[int]:
    """``"10-17"`` or ``"3,5"`` -> layer indices."""
    return parse_ints(text, "layers")


def select_heads(view: ModelView, heads: Sequence[Head] | None = None,
                 layers: Sequence[int] | None = None) -> list[Head]:
    """The heads to scan, sorted and unique: ``heads`` if given, else every head of
    ``layers`` (default: all layers). Out-of-range names raise CnaError."""
    if heads is not None:
        out = sorted({(int(a), int(b)) for a, b in heads})
        if not out:
            raise CnaError("no heads to scan")
        view.check_heads(out)
        if layers is not None:
            out = [x for x in out if x[0] in set(layers)]
        return out
    layers = list(range(view.n_layers)) if layers is None else sorted(set(layers))
    if not layers:
        raise CnaError("no layers to scan")
    view.check_layers(layers)
    return [(layer, h) for layer in layers for h in range(view.n_heads)]
