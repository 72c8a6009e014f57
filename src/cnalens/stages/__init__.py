"""Stages: each reads its settings, runs the compute modules and writes ``DIR/<stage>.csv``
and ``DIR/<stage>.json`` (what was run, on what, how long) atomically; ``DIR/run.json``
describes the whole run. The compute modules write no files; the report reads them.

This module holds what every stage shares: timestamps, the run record, case selection
helpers. One module per stage beside it; :mod:`cnalens.pipeline` runs them.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from cnalens import __version__
from cnalens.data.cases import Case, Encoded, encode_all
from cnalens.io import read_json, write_json

if TYPE_CHECKING:
    from cnalens.models import ModelView


@dataclass(frozen=True)
class Profile:
    """Sizes of the main job. ``quick`` fits 15 minutes on a 2-core CPU."""

    name: str
    eval_digits: tuple[int, ...]
    eval_templates: tuple[str, ...]
    eval_n: dict[int, int | None] = field(default_factory=dict)  # pairs per (op, digits)
    heads_digits: tuple[int, ...] = (1,)
    heads_n: int | None = None  # operand pairs per op for the head scan (None: all)
    cna_ops: tuple[str, ...] = ("+", "-")
    cna_n: int | None = 20  # training-split cases per op (None: all); the correct ones are kept
    cna_ks: tuple[int, ...] = (10, 20, 50)
    cna_seeds: int = 2
    cna_split: str = "train"  # the pairs CNA runs on: "train" (half), "all"
    cna_negative: bool = False  # subtraction with negative differences too
    cna_positions: tuple[str, ...] = ("all",)  # where verification's interventions act
    cna_mediation: bool = True


@dataclass
class StageContext:
    """What a later stage of the main job gets: the model, the folder and earlier results."""

    view: ModelView
    out: Path
    profile: Profile
    ops: tuple[str, ...]
    seed: int
    batch_size: int
    progress: bool
    settings: dict
    heads: pd.DataFrame | None  # heads.csv of this run (None without the head stage)
    top_heads: dict[str, tuple[int, int]]  # op -> (layer, head) with the largest drop


def now() -> str:
    """The time now (UTC, seconds), as stage records write it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def start_run(out: Path, view: ModelView, command: str, profile: str, settings: dict,
              stages: list[str]) -> dict:
    """Write ``DIR/run.json`` for a new run (the command, profile, model, environment)."""
    run = {
        "cnalens_version": __version__, "command": command, "profile": profile,
        "started": now(), "finished": None, "seconds": None, "stages": stages,
        "model": view.summary(), "settings": settings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "platform": sys.platform},
    }
    write_json(out / "run.json", run)
    return run


def record_stage(out: Path, view: ModelView, command: str, stage: str, seconds: float) -> Path:
    """After a single-stage command: add the stage to DIR/run.json (made if missing),
    then re-render DIR/report.html."""
    from cnalens.report import render_report

    path = out / "run.json"
    run = read_json(path) if path.is_file() else {
        "cnalens_version": __version__, "command": command, "profile": "custom",
        "started": now(), "stages": [], "model": view.summary(), "settings": {}}
    run["stages"] = [*[s for s in run.get("stages", []) if s != stage], stage]
    run.update(finished=now(), seconds=round((run.get("seconds") or 0) + seconds, 1))
    run.setdefault("commands", []).append(command)
    write_json(path, run)
    return render_report(out)


def finish_run(out: Path, run: dict, t0: float) -> None:
    """Stamp the run's end and duration into ``DIR/run.json``."""
    run.update(finished=now(), seconds=round(time.perf_counter() - t0, 1))
    write_json(out / "run.json", run)


def read_stage(out: Path, stage: str) -> tuple[pd.DataFrame, dict]:
    """A finished stage's table and record."""
    return pd.read_csv(out / f"{stage}.csv"), read_json(out / f"{stage}.json")


def correct_cases(view: ModelView, cases: list[Case], batch_size: int = 64,
                  progress: bool = True) -> tuple[list[Encoded], int]:
    """The encoded cases the (unmodified) model answers correctly, and how many were not."""
    from cnalens.evaluate import evaluate

    enc = encode_all(view.tokenizer, cases)
    res = evaluate(view, enc, batch_size=batch_size, progress=progress,
                   description="selecting correct cases")
    keep = [e for e, ok in zip(enc, res["correct"], strict=True) if ok]
    return keep, len(enc) - len(keep)


def cases_by_group(cases: list[Case], keys: list[str]) -> dict:
    """Cases by their values of ``keys`` (a tuple of values for several keys); no keys:
    one group, ``"custom"``."""
    if not keys:
        return {"custom": list(cases)}
    out: dict = {}
    for c in cases:
        vals = tuple(c.labels.get(k) for k in keys)
        out.setdefault(vals if len(keys) > 1 else vals[0], []).append(c)
    return out


def group_name(key: Hashable) -> str:
    """A group's name: its value, or its values joined by ``|``."""
    return "|".join(map(str, key)) if isinstance(key, tuple) else str(key)


__all__ = ["Profile", "StageContext", "cases_by_group", "correct_cases", "finish_run",
           "group_name", "now", "read_stage", "record_stage", "start_run"]
