"""Parsing the shared names and lists of the command line: ``+,-``, ``1,2``, ``10-17``,
heads ``L.H`` and neurons ``L.N`` (0-based)."""

from __future__ import annotations

from cnalens.errors import CnaError


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
