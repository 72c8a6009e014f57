"""The main job ``cnalens run arithmetic``: the profiles and the runner of the stages
(:mod:`cnalens.stages`, one module each; every stage writes ``DIR/<stage>.csv`` and
``DIR/<stage>.json``, ``DIR/run.json`` describes the whole run, the report reads files).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cnalens.data.arithmetic import OPS, TEMPLATES, arithmetic_cases
from cnalens.data.cases import encode_all
from cnalens.errors import CnaError
from cnalens.progress import console
from cnalens.stages import (
    Profile,
    StageContext,
    cases_by_group,
    correct_cases,
    finish_run,
    group_name,
    now,
    read_stage,
    record_stage,
    start_run,
)
from cnalens.stages.cna import HELDOUT_FRACTION, cna_cases, cna_stage
from cnalens.stages.eval import eval_stage
from cnalens.stages.heads import heads_stage, top_head_per_op

if TYPE_CHECKING:
    from cnalens.models import ModelView


PROFILES = {
    "quick": Profile("quick", (1, 2), tuple(TEMPLATES), {1: None, 2: 20}, cna_n=None),
    "full": Profile("full", (1, 2, 3), tuple(TEMPLATES), {1: None, 2: 500, 3: 500},
                    heads_digits=(1, 2), heads_n=None, cna_ops=OPS, cna_n=None,
                    cna_ks=(10, 20, 30, 50, 100), cna_seeds=5, cna_split="all",
                    cna_negative=True, cna_positions=("all", "last")),
    # for tests: seconds, not minutes
    "smoke": Profile("smoke", (1,), ("eq",), {1: 8}, heads_n=6, cna_ops=("+",), cna_n=8,
                     cna_ks=(5,), cna_seeds=1, cna_positions=("all", "last")),
}


# stages after eval/heads/cna: name -> "module:function(ctx: StageContext) -> None"
EXTRA_STAGES: dict[str, str] = {
    "shallow": "cnalens.stages.shallow:shallow_stage",
    "explain": "cnalens.stages.explain:explain_stage",
    "lora": "cnalens.stages.lora:lora_stage",
    "prune": "cnalens.stages.prune:prune_stage",
    "debias": "cnalens.stages.debias:debias_stage",
}
CORE_STAGES = ("eval", "heads", "cna")
DEFAULT_STAGES = ("eval", "heads", "cna", "shallow", "explain")
ALL_STAGES = (*CORE_STAGES, *EXTRA_STAGES)


def check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    bad = [s for s in stages if s not in ALL_STAGES]
    if bad or not stages:
        raise CnaError(f"unknown stage(s) {', '.join(bad) or '(none)'}: "
                       f"use {', '.join(ALL_STAGES)}")
    return tuple(s for s in ALL_STAGES if s in stages)  # canonical order


def run_extra_stage(name: str, ctx: StageContext) -> None:
    import importlib

    module, func = EXTRA_STAGES[name].split(":")
    getattr(importlib.import_module(module), func)(ctx)


def run_arithmetic(view: ModelView, out: Path, profile: str = "quick",
                   ops: Sequence[str] = OPS, seed: int = 0, batch_size: int = 64,
                   progress: bool = True, command: str = "cnalens run arithmetic",
                   stages: tuple[str, ...] = DEFAULT_STAGES) -> Path:
    """The main job: every stage of the profile, then ``DIR/report.html``."""
    from cnalens.report import render_report

    stages = check_stages(stages)
    prof = PROFILES[profile]
    t0 = time.perf_counter()
    cases = [c for d in prof.eval_digits for c in arithmetic_cases(
        ops, (d,), prof.eval_templates if d == 1 else ("eq",), n=prof.eval_n.get(d),
        seed=seed)]
    head_cases = arithmetic_cases(ops, prof.heads_digits, ("eq",), n=prof.heads_n, seed=seed)
    encode_all(view.tokenizer, cases)  # fail on bad input before writing anything
    settings = {"ops": list(ops), "eval_digits": list(prof.eval_digits),
                "eval_templates": list(prof.eval_templates), "seed": seed,
                "eval_pairs_per_op_digits": {str(k): v for k, v in prof.eval_n.items()},
                "heads_digits": list(prof.heads_digits), "heads_template": "eq",
                "cna_ops": [o for o in prof.cna_ops if o in ops], "cna_cases_per_op": prof.cna_n,
                "cna_ks": list(prof.cna_ks), "cna_seeds": prof.cna_seeds,
                "cna_split": prof.cna_split, "cna_negative": prof.cna_negative,
                "cna_positions": list(prof.cna_positions), "cna_mediation": prof.cna_mediation}
    run = start_run(out, view, command, profile, settings, list(stages))
    if "eval" in stages:
        console.print(f"[bold]eval[/]: {len(cases)} cases")
        eval_stage(view, cases, out, settings, batch_size, progress)
    heads = None
    needs_heads = any(s not in ("eval", "debias") for s in stages)
    if needs_heads:
        console.print(f"[bold]heads[/]: {view.n_layers * view.n_heads} heads x "
                      f"{len(head_cases)} cases")
        heads = heads_stage(view, head_cases, out, settings, batch_size=batch_size,
                            progress=progress)
    if "cna" in stages:
        cna_ops = [o for o in prof.cna_ops if o in ops]
        by_op, heldout = cna_cases(cna_ops, prof.cna_n, seed, prof.cna_split,
                                   prof.cna_negative)
        cna_stage(view, out, by_op, top_head_per_op(heads, cna_ops), list(prof.cna_ks),
                  prof.cna_seeds, batch_size=min(batch_size, 32), progress=progress,
                  settings=settings, require=False, heldout_by_op=heldout,
                  positions=prof.cna_positions, mediate=prof.cna_mediation)
    ctx = StageContext(view, out, prof, tuple(ops), seed, batch_size, progress, settings, heads,
                       top_head_per_op(heads, ops) if heads is not None else {})
    for name in stages:
        if name in EXTRA_STAGES:
            console.print(f"[bold]{name}[/]")
            run_extra_stage(name, ctx)
    finish_run(out, run, t0)
    return render_report(out)


__all__ = ["ALL_STAGES", "DEFAULT_STAGES", "HELDOUT_FRACTION", "PROFILES", "Profile",
           "StageContext", "cases_by_group", "check_stages", "cna_cases", "cna_stage",
           "correct_cases", "eval_stage", "finish_run", "group_name", "heads_stage", "now",
           "read_stage", "record_stage", "run_arithmetic", "start_run", "top_head_per_op"]
