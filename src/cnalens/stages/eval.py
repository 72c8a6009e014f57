"""The evaluation stage: accuracy of the cases, DIR/eval.csv, eval_cases.csv, eval.json."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cnalens.data.cases import Case, encode_all
from cnalens.evaluate import accuracy_table, evaluate, group_keys
from cnalens.interventions import describe_all
from cnalens.io import write_csv, write_json
from cnalens.stages import now

if TYPE_CHECKING:
    from cnalens.interventions import Intervention
    from cnalens.models import ModelView


def eval_stage(view: ModelView, cases: list[Case], out: Path, settings: dict, batch_size: int = 64,
               progress: bool = True, group_by: str | list[str] | None = None,
               interventions: Sequence[Intervention] = ()) -> pd.DataFrame:
    """Evaluate cases; write eval.csv (the table, grouped by ``group_keys(cases,
    group_by)``, recorded as settings ``group_by``), eval_cases.csv and eval.json.
    ``interventions`` (e.g. ``ZeroExperts``) act on every forward, recorded in eval.json."""
    t0 = time.perf_counter()
    keys = group_keys(cases, group_by)
    settings = {**settings, "group_by": keys}
    enc = encode_all(view.tokenizer, cases)
    per_case = evaluate(view, enc, *interventions, batch_size=batch_size, progress=progress)
    table = accuracy_table(per_case, keys=keys)
    prefixes = {f"{c.labels.get('op')}|{c.labels.get('template')}|{c.labels.get('digits')}":
                c.prefix for c in cases if c.prefix}
    meta = {
        "stage": "eval", "model": view.summary(), "settings": settings,
        "n_cases": len(cases), "batch_size": batch_size, "prefixes": prefixes,
        "interventions": describe_all(interventions, view.shape),
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
