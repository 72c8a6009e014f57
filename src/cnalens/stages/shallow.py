"""The shallow stage: the zero-shot locator (:mod:`cnalens.locator`) below an arithmetic
head's layer, its M-sweep against random sets and the null; DIR/shallow.csv and
shallow.json."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cnalens.data.arithmetic import arithmetic_cases
from cnalens.data.cases import Case, encode_all
from cnalens.io import write_csv, write_json
from cnalens.locator import (
    PRESETS,
    LocatorSettings,
    locate,
    located_frame,
    null_table,
    settings_dict,
    sweep,
)
from cnalens.progress import console
from cnalens.stages import StageContext, now

if TYPE_CHECKING:
    from cnalens.models import ModelView


def run_shallow(view: ModelView, out: str | Path, head: tuple[int, int] | None, head_layer: int,
                settings: LocatorSettings, cases: Sequence[Case], batch_size: int = 64,
                progress: bool = True, extra: dict | None = None,
                layers: Sequence[int] | None = None) -> dict:
    """Locate (``layers``: default every layer below ``head_layer``), sweep M against
    random sets, write DIR/shallow.csv and DIR/shallow.json."""
    out = Path(out)
    t0, c0 = time.perf_counter(), time.process_time()
    enc = encode_all(view.tokenizer, cases)
    located = locate(view, head_layer, settings, layers=layers, progress=progress)
    t1 = time.perf_counter()
    sw = sweep(view, located, enc, batch_size=batch_size, progress=progress)
    t2 = time.perf_counter()
    frame = located_frame(view, located)
    per_layer = {int(m): {str(k): int(v) for k, v in located.frame[
        located.frame["matches"] >= m].groupby("layer").size().items()} for m in settings.ms}
    hist = located.frame["matches"].value_counts().sort_index()
    null_hist = located.null["matches"].value_counts().sort_index()
    meta = {
        "stage": "shallow", "model": view.summary(),
        "head": None if head is None else f"{head[0]}.{head[1]}", "head_layer": head_layer,
        "shallow_layers": located.layers, "n_shallow_neurons": len(located.frame),
        "settings": settings_dict(settings), **(extra or {}),
        "transforms": ("each attention layer above the neuron up to the head's layer"
                       if settings.transforms == "all" else "the head's layer only"),
        "vectors": "value vectors as the residual receives them (post-FFN norm gain "
                   "applied where the family has one); unit norm scales (rankings are "
                   "scale-free)",
        "matching": "whole token after stripping the space marker; see cnalens.data.lexicon",
        "n_cases": len(enc), "sweep": sw.to_dict("records"),
        "null": null_table(located, settings.ms),
        "histogram": {str(k): int(v) for k, v in hist.items()},
        "null_histogram": {str(k): int(v) for k, v in null_hist.items()},
        "n_null": len(located.null), "per_layer": per_layer,
        "hidden": {int(m): int(((located.frame["matches"] >= m)
                                & (located.frame["matches_untransformed"] < m)).sum())
                   for m in settings.ms},
        "timings": {**located.seconds, "sweep": round(t2 - t1, 2)},
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),
        "finished": now(),
    }
    write_csv(out / "shallow.csv", frame)
    write_json(out / "shallow.json", meta)
    return meta


SWEEP_CASES = {"quick": 12, "smoke": 3, "full": None}  # 1-digit cases per op (None: all)


def shallow_cases(ops: Sequence[str], profile: str, seed: int = 0
                  ) -> tuple[list[str], list[Case]]:
    """The M-sweep's cases: 1-digit "n1+n2=" cases of + and - (the paper's 1D +/-) among
    ``ops`` (else the first op), ``SWEEP_CASES[profile]`` per op."""
    chosen = [o for o in ("+", "-") if o in ops] or list(ops)[:1]
    return chosen, arithmetic_cases(chosen, (1,), ("eq",), n=SWEEP_CASES.get(profile),
                                    seed=seed)


def shallow_stage(ctx: StageContext) -> None:
    """Main-job stage: the zero-shot locator (:mod:`cnalens.locator`) below the + head's
    layer (or the first op's head), with the profile's settings; DIR/shallow.csv/.json."""
    head = ctx.top_heads.get("+") or next(iter(ctx.top_heads.values()), None)
    if head is None:
        console.print("[yellow]shallow: no head scan to take the arithmetic head from; "
                      "skipped[/]")
        return
    if head[0] == 0:
        console.print(f"[yellow]shallow: the head {head[0]}.{head[1]} is in layer 0, so "
                      "there are no shallow layers; skipped[/]")
        return
    name = ctx.profile.name if ctx.profile.name in PRESETS else "quick"
    settings = replace(PRESETS[name], seed=ctx.seed)
    ops, cases = shallow_cases(ctx.ops, name, ctx.seed)
    layers = [head[0] - 1] if name == "smoke" else None  # smoke: seconds, for tests
    run_shallow(ctx.view, ctx.out, head, head[0], settings, cases, ctx.batch_size,
                ctx.progress, extra={"cases": {"ops": ops, "digits": [1], "template": "eq",
                                               "per_op": SWEEP_CASES.get(name),
                                               "seed": ctx.seed},
                                     "profile": name}, layers=layers)


__all__ = ["SWEEP_CASES", "run_shallow", "shallow_cases", "shallow_stage"]
