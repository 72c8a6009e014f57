"""The explain stage: one explained case per operation (the four-stage chain,
:mod:`cnalens.explain`), DIR/explain.csv and explain.json."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cnalens.data.arithmetic import arithmetic_cases
from cnalens.data.cases import Case, encode_all
from cnalens.evaluate import evaluate
from cnalens.explain import Chain, chain_records, explain_case
from cnalens.io import read_json, write_csv, write_json
from cnalens.progress import console
from cnalens.stages import StageContext, now

if TYPE_CHECKING:
    from cnalens.models import ModelView


def write_explain(out: str | Path, chains: list[Chain], view: ModelView, settings: dict,
                  seconds: float,
                  merge: bool = False) -> None:
    """``DIR/explain.csv`` (one row per chain element) and ``DIR/explain.json`` (per case:
    prompt tokens, the head's attention, links). ``merge`` keeps the cases already there
    (a case explained again replaces its old rows)."""
    out = Path(out)
    frames = [c.elements for c in chains]
    cases = [chain_records(c) for c in chains]
    new_ids = {c.meta["case"] for c in chains}
    if merge and (out / "explain.csv").is_file() and (out / "explain.json").is_file():
        old = pd.read_csv(out / "explain.csv", keep_default_na=False,
                          na_values={"score": [""], "effect": [""], "coef_drop": [""],
                                     "coef": [""]})
        frames.insert(0, old[~old["case"].astype(str).isin(new_ids)])
        prev = read_json(out / "explain.json").get("cases", [])
        cases = [c for c in prev if c.get("case") not in new_ids] + cases
    df = pd.concat(frames, ignore_index=True)
    write_csv(out / "explain.csv", df)
    write_json(out / "explain.json", {
        "stage": "explain", "model": view.summary(), "settings": settings, "cases": cases,
        "columns": {
            "score": "prediction enhancing: CNA imp_a - imp_b; other stages: first-order "
                     "increase of the deep neurons' coefficient sum sum|m| along the route",
            "effect": "drop of the target's log-probability when the element is zeroed",
            "coef_drop": "relative drop of the deep neurons' coefficient sum (last position) "
                         "when the element is zeroed (deep neuron: of those in higher layers)"},
        "seconds": round(seconds, 2), "finished": now()})


PREFERRED = {"+": (3, 5), "-": (8, 3), "*": (2, 3), "/": (8, 2)}


def pick_case(view: ModelView, op: str, tries: int = 16) -> tuple[Case | None, str]:
    """A 1-digit ``eq`` case of ``op`` that the model answers correctly with a one-token
    answer: the paper-like example first (3+5, 8-3, 2*3, 8/2), then a seeded sample; and
    a sentence saying why this case (or none) was chosen."""
    cases = arithmetic_cases([op], (1,), ("eq",))
    a, b = PREFERRED.get(op, (None, None))
    paper = f"{a}{op}{b}"
    first = [c for c in cases if (c.labels["a"], c.labels["b"]) == (a, b)]
    rest = [c for c in cases if c not in first]
    random.Random(f"explain|{op}").shuffle(rest)
    pool = (first + rest)[:tries]
    enc = encode_all(view.tokenizer, pool)
    res = evaluate(view, enc, progress=False)
    if not first:
        why = f"{paper} is one of the prompt's few-shot examples, so it is never asked"
    elif not res["correct"].iloc[0]:
        why = f"the model answers {paper}= wrongly ({str(res['pred'].iloc[0]).strip()!r})"
    elif len(enc[0].answer_ids) != 1:
        why = f"the answer to {paper}= is more than one token"
    else:
        return pool[0], f"{paper}=, the paper's example"
    for e, ok in zip(enc, res["correct"], strict=True):
        if ok and len(e.answer_ids) == 1:
            return e.case, (f"{e.case.question.strip()} instead of {paper}=: {why}; the first "
                            "correctly answered one-token case of a seeded sample")
    return None, f"{why}, and no other correctly answered one-token case among {tries} tried"


def explain_stage(ctx: StageContext) -> None:
    """Main-job stage: one explained case per operation (its top head from the head scan,
    a case the model answers correctly; the smoke profile: the first operation only);
    writes explain.csv/.json."""

    t0 = time.perf_counter()
    chains, skipped, chosen = [], {}, {}
    ops = ctx.ops[:1] if ctx.profile.name == "smoke" else ctx.ops  # smoke: seconds
    for op in ops:
        head = ctx.top_heads.get(op)
        if head is None:
            skipped[op] = "no head scan for this operation"
            continue
        case, why = pick_case(ctx.view, op)
        if case is None:
            skipped[op] = why
            continue
        chosen[op] = why
        chains.append(explain_case(ctx.view, case, head, top=10))
    if not chains:
        console.print("[yellow]explain: no case to explain; stage skipped[/]")
        return
    write_explain(ctx.out, chains, ctx.view, {**ctx.settings, "top": 10,
                                              "skipped": skipped, "chosen": chosen},
                  time.perf_counter() - t0)


__all__ = ["PREFERRED", "explain_stage", "pick_case", "write_explain"]
