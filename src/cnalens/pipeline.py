"""Stages that write results folders, and the main job ``cnalens run arithmetic``.

Every stage writes ``DIR/<stage>.csv`` and ``DIR/<stage>.json`` (what was run, on what,
how long) atomically; ``DIR/run.json`` describes the whole run; the report reads files.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from cnalens import __version__
from cnalens.data.arithmetic import OPS, TEMPLATES, arithmetic_cases
from cnalens.data.cases import Case, encode_all
from cnalens.evaluate import accuracy_table, evaluate
from cnalens.io import read_json, write_csv, write_json
from cnalens.progress import console


@dataclass(frozen=True)
class Profile:
    """Sizes of the main job. ``quick`` fits 15 minutes on a 2-core CPU."""

    name: str
    eval_digits: tuple[int, ...]
    eval_templates: tuple[str, ...]
    eval_n: dict[int, int | None] = field(default_factory=dict)  # pairs per (op, digits)


PROFILES = {
    "quick": Profile("quick", (1, 2), tuple(TEMPLATES), {1: None, 2: 40}),
    "full": Profile("full", (1, 2, 3), tuple(TEMPLATES), {1: None, 2: 500, 3: 500}),
    "smoke": Profile("smoke", (1,), ("eq",), {1: 8}),  # for tests: seconds, not minutes
}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def eval_stage(view, cases: list[Case], out: Path, settings: dict, batch_size: int = 64,
               progress: bool = True) -> pd.DataFrame:
    """Evaluate cases; write eval.csv (the table), eval_cases.csv and eval.json."""
    t0 = time.perf_counter()
    enc = encode_all(view.tokenizer, cases)
    per_case = evaluate(view, enc, batch_size=batch_size, progress=progress)
    table = accuracy_table(per_case)
    prefixes = {f"{c.labels.get('op')}|{c.labels.get('template')}|{c.labels.get('digits')}":
                c.prefix for c in cases if c.prefix}
    meta = {
        "stage": "eval", "model": view.summary(), "settings": settings,
        "n_cases": len(cases), "batch_size": batch_size, "prefixes": prefixes,
        "moved_space": int(per_case["moved_space"].sum()),
        "merged_boundary": int(per_case["merged"].sum()),
        "multi_token_answers": int((per_case["n_answer_tokens"] > 1).sum()),
        "metrics": {"acc": "every answer token greedy top-1 under teacher forcing",
                    "acc_first": "first answer token greedy top-1",
                    "logp": "mean log-probability of the first answer token",
                    "interval": "Wilson 95%"},
        "seconds": round(time.perf_counter() - t0, 2), "finished": now(),
    }
    write_csv(out / "eval_cases.csv", per_case)
    write_csv(out / "eval.csv", table)
    write_json(out / "eval.json", meta)
    return table


def start_run(out: Path, view, command: str, profile: str, settings: dict,
              stages: list[str]) -> dict:
    run = {
        "cnalens_version": __version__, "command": command, "profile": profile,
        "started": now(), "finished": None, "seconds": None, "stages": stages,
        "model": view.summary(), "settings": settings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "platform": sys.platform},
    }
    write_json(out / "run.json", run)
    return run


def finish_run(out: Path, run: dict, t0: float) -> None:
    run.update(finished=now(), seconds=round(time.perf_counter() - t0, 1))
    write_json(out / "run.json", run)


def run_arithmetic(view, out: Path, profile: str = "quick", ops=OPS, seed: int = 0,
                   batch_size: int = 64, progress: bool = True,
                   command: str = "cnalens run arithmetic") -> Path:
    """The main job: every stage of the profile, then ``DIR/report.html``."""
    from cnalens.report import render_report

    prof = PROFILES[profile]
    t0 = time.perf_counter()
    cases = [c for d in prof.eval_digits for c in arithmetic_cases(
        ops, (d,), prof.eval_templates, n=prof.eval_n.get(d), seed=seed)]
    encode_all(view.tokenizer, cases)  # fail on bad input before writing anything
    settings = {"ops": list(ops), "digits": list(prof.eval_digits),
                "templates": list(prof.eval_templates), "seed": seed,
                "pairs_per_op_digits": {str(k): v for k, v in prof.eval_n.items()}}
    stages = ["eval"]
    run = start_run(out, view, command, profile, settings, stages)
    console.print(f"[bold]eval[/]: {len(cases)} cases")
    eval_stage(view, cases, out, settings, batch_size, progress)
    finish_run(out, run, t0)
    return render_report(out)


def read_stage(out: Path, stage: str) -> tuple[pd.DataFrame, dict]:
    return pd.read_csv(out / f"{stage}.csv"), read_json(out / f"{stage}.json")


def correct_cases(view, cases: list[Case], batch_size: int = 64, progress: bool = True):
    """The encoded cases the (unmodified) model answers correctly, and how many were not."""
    from cnalens.evaluate import evaluate

    enc = encode_all(view.tokenizer, cases)
    res = evaluate(view, enc, batch_size=batch_size, progress=progress,
                   description="selecting correct cases")
    keep = [e for e, ok in zip(enc, res["correct"], strict=True) if ok]
    return keep, len(enc) - len(keep)


def cna_stage(view, out: Path, cases_by_op: dict[str, list[Case]],
              heads_by_op: dict[str, tuple[int, int]], ks: list[int], seeds: int = 3,
              by: str = "decrease", certified: bool = True, batch_size: int = 32,
              progress: bool = True, settings: dict | None = None) -> pd.DataFrame:
    """CNA of the original model (A) against each op's head zeroed (B), then verification.

    Writes cna_neurons.csv (each case's top-K), verification.csv and cna.json.
    """
    from cnalens.cna import compare, from_certified, verify
    from cnalens.interventions import ZeroHeads
    from cnalens.scores import case_states, certified_topk_diff, score_pair

    t0 = time.perf_counter()
    frames, vers, per_op = [], [], {}
    for op, cases in cases_by_op.items():
        head = heads_by_op[op]
        view.check_heads([head])
        deep = list(range(head[0], view.n_layers))
        enc, skipped = correct_cases(view, cases, batch_size, progress)
        if not enc:
            console.print(f"[yellow]cna {op}: no correctly answered case; skipped[/]")
            per_op[op] = {"head": f"{head[0]}.{head[1]}", "n": 0, "skipped_wrong": skipped}
            continue
        iv = ZeroHeads([head])
        console.print(f"[bold]cna[/] {op}: head {head[0]}.{head[1]}, {len(enc)} correct cases"
                      f" ({skipped} wrong ones skipped)")
        if certified:
            frame, stats = certified_topk_diff(view, enc, max(ks), [iv], layers=deep, rank=by,
                                               batch_size=batch_size, progress=progress)
            sa, sb = case_states(view, enc), case_states(view, enc, iv)
            comp = from_certified(frame, sa.coef, sb.coef, sa.case_ids)
        else:
            a, b = score_pair(view, enc, [iv], layers=deep, progress=progress)
            comp, stats = compare(a, b), {"method": "exhaustive"}
        labels = [{"op": op, "head": f"{head[0]}.{head[1]}", "prompt": e.case.question,
                   "target": e.case.target} for e in enc]
        frames.append(comp.frame(max(ks), by, deep, labels))
        ver = verify(view, enc, comp, ks, deep, by, seeds=seeds, batch_size=batch_size,
                     progress=progress)
        ver.insert(0, "op", op)
        ver.insert(0, "head", f"{head[0]}.{head[1]}")
        ver.insert(0, "model", view.info.get("spec"))
        vers.append(ver)
        per_op[op] = {"head": f"{head[0]}.{head[1]}", "n": len(enc), "skipped_wrong": skipped,
                      "deep_layers": [deep[0], deep[-1]],
                      "scoring": {k: v for k, v in stats.items() if k != "n_exact"}}
    ver_df = pd.concat(vers, ignore_index=True) if vers else pd.DataFrame()
    neurons = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_csv(out / "cna_neurons.csv", neurons)
    write_csv(out / "verification.csv", ver_df)
    meta = {"stage": "cna", "model": view.summary(), "settings": settings or {}, "ks": ks,
            "seeds": seeds, "ranking": by, "lens": "frozen", "target": "prediction of run A",
            "per_op": per_op, "runs": {"a": "original model", "b": "head zeroed"},
            "seconds": round(time.perf_counter() - t0, 2), "finished": now()}
    write_json(out / "cna.json", meta)
    write_json(out / "verification.json", {**meta, "stage": "verification"})
    return ver_df
