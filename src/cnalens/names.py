"""Parsing the shared names and lists of the command line: ``+,-``, ``1,2``, ``10-17``,
heads ``L.H`` and neurons ``L.N`` (0-based); in mixture-of-experts layers neurons are
``L.E.N`` (layer, expert, index inside the expert) and ``L.S.N`` (the shared expert)."""

from __future__ import annotations

from typing import Protocol

from cnalens.errors import CnaError


class NeuronIndexer(Protocol):
    """What ``parse_neurons`` needs of a model's shape (``cnalens.models.shape.ModelShape``,
    a layer above this module, hence named by its shape)."""

    def neuron_index(self, layer: int, expert: int | str | None, index: int) -> int: ...


def parse_list(text: str, what: str) -> list[str]:
    """Comma-separated items, stripped, empty items dropped; CnaError if none remain."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise CnaError(f"--{what}: empty list")
    return items


def parse_ints(text: str, what: str) -> list[int]:
    """Comma-separated integers and inclusive ranges: ``1,2`` or ``10-17``."""
    out: list[int] = []
    for item in parse_list(text, what):
        try:
            if "-" in item[1:]:
                lo, hi = item.split("-", 1) if not item.startswith("-") else (item, item)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(item))
        except ValueError:
            raise CnaError(f"--{what}: '{item}' is not an integer or a range like 10-17") from None
    return out


def parse_units(text: str, what: str) -> list[tuple[int, int]]:
    """``L.H`` or ``L.N`` items (``17.22,15.9``) as (layer, index) pairs."""
    out = []
    for item in parse_list(text, what):
        parts = item.replace("_", ".").split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise CnaError(f"--{what}: '{item}' is not of the form L.H (e.g. 17.22)")
        out.append((int(parts[0]), int(parts[1])))
    return out


def fmt_unit(layer: int, index: int) -> str:
    return f"{layer}.{index}"


def parse_neuron_names(text: str, what: str) -> list[tuple[int, int | str | None, int]]:
    """``L.N``, ``L.E.N`` or ``L.S.N`` items as ``(layer, expert, index)``: expert None for
    ``L.N``, ``"S"`` for the shared expert."""
    out: list[tuple[int, int | str | None, int]] = []
    for item in parse_list(text, what):
        parts = item.replace("_", ".").split(".")
        ok = (len(parts) in (2, 3) and parts[0].isdigit() and parts[-1].isdigit()
              and (len(parts) == 2 or parts[1].isdigit() or parts[1].upper() == "S"))
        if not ok:
            raise CnaError(f"--{what}: '{item}' is not of the form L.N (e.g. 17.22), or L.E.N "
                           "or L.S.N in a mixture-of-experts layer (e.g. 5.3.120, 5.S.7)")
        expert = (None if len(parts) == 2 else "S" if parts[1].upper() == "S"
                  else int(parts[1]))
        out.append((int(parts[0]), expert, int(parts[-1])))
    return out


def parse_experts(text: str, what: str) -> list[tuple[int, int | str]]:
    """``L.E`` or ``L.S`` items (``3.5,3.S``) as ``(layer, expert)`` pairs, ``"S"`` the
    shared expert."""
    out: list[tuple[int, int | str]] = []
    for item in parse_list(text, what):
        parts = item.replace("_", ".").split(".")
        if not (len(parts) == 2 and parts[0].isdigit()
                and (parts[1].isdigit() or parts[1].upper() == "S")):
            raise CnaError(f"--{what}: '{item}' is not of the form L.E (layer.expert, e.g. "
                           "3.5) or L.S (the shared expert)")
        out.append((int(parts[0]), "S" if parts[1].upper() == "S" else int(parts[1])))
    return out


def parse_neurons(text: str, what: str, shape: NeuronIndexer) -> list[tuple[int, int]]:
    """Neuron names (``parse_neuron_names``) as ``(layer, index)`` pairs, the index flat in a
    mixture-of-experts layer (``ModelShape.neuron_index``), each checked against ``shape``."""
    return [(layer, shape.neuron_index(layer, expert, index))
            for layer, expert, index in parse_neuron_names(text, what)]
