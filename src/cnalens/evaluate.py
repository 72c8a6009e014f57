"""Batched greedy evaluation with teacher forcing, and accuracy tables with intervals.

Metrics (design.md): ``acc`` = every answer token is the greedy top-1 with the gold
prefix appended (all answer tokens scored in one pass); ``acc_first`` = the first answer
token is top-1; ``logp`` = log-probability of the first answer token.
Logits are computed only at the scored positions (the last ones, thanks to left padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch

from cnalens.callables import make_callable
from cnalens.data.arithmetic import COLUMNS as KEYS  # op, digits, template
from cnalens.data.cases import Case, Cases, Encoded, Targets, as_encoded
from cnalens.errors import CnaError
from cnalens.names import parse_list
from cnalens.progress import track
from cnalens.stats import wilson

if TYPE_CHECKING:
    from cnalens.interventions import Intervention
    from cnalens.models import ModelView

CASE_COLUMNS = ("case_id", "prompt", "target", "target_first", "pred", "n_answer_tokens",
                "moved_space", "merged", "correct", "correct_first", "logp")
SUMMARY_COLUMNS = ("n", "acc", "acc_lo", "acc_hi", "acc_first", "acc_first_lo",
                   "acc_first_hi", "logp")
# the columns result tables write themselves (eval, heads, cna, verification): no label
# may take one of these names
RESERVED = frozenset({
    *CASE_COLUMNS, *SUMMARY_COLUMNS, "case", "rank", "name", "layer", "neuron", "head",
    "imp_a", "imp_b", "coef_a", "coef_b", "acc_orig", "acc_ablated", "drop", "drop_rel",
    "drop_lo", "drop_hi", "dlogp", "dlogp_est", "model", "experiment", "k", "value",
    "random_mean", "random_std", "case_index", "importance", "real"})
POOLED = "all"


def label_columns(cases: Sequence[Case] | Sequence[Encoded]) -> list[str]:
    """The label columns per-case tables carry (``Case.shown``), in order of first
    appearance; CnaError if one is named like a result column (``RESERVED``)."""
    names = list(dict.fromkeys(k for c in cases
                               for k in (c.case if isinstance(c, Encoded) else c).shown))
    bad = [k for k in names if k in RESERVED]
    if bad:
        raise CnaError(f"label column(s) {', '.join(bad)} clash with result columns; "
                       "rename them in the case file")
    return names


def group_keys(data: Sequence[Case] | Sequence[Encoded] | pd.DataFrame,
               group_by: str | Sequence[str] | None = None,
               default: Sequence[str] = KEYS) -> list[str]:
    """The label columns summaries are grouped by: ``group_by`` (``"a,b"`` or a list),
    checked against the labels of ``data`` (cases, or a per-case frame); without it the
    ``default`` columns the data has (the arithmetic keys), else none (one pooled row)."""
    if isinstance(data, pd.DataFrame):
        names = [c for c in data.columns if c not in RESERVED]
    else:
        names = label_columns(data)
    if group_by is None:
        return [k for k in default if k in names]
    keys = parse_list(group_by, "group-by") if isinstance(group_by, str) else list(group_by)
    missing = [k for k in keys if k not in names]
    if missing:
        have = ", ".join(names) if names else "none"
        raise CnaError(f"group_by: no label column {', '.join(map(repr, missing))} in "
                       f"the cases (their labels: {have})")
    return list(dict.fromkeys(keys))


def batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_batch(view: ModelView, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """Teacher-forced scores of one batch: correct, correct_first, logp, pred (first)."""
    k = max(len(e.answer_ids) for e in items)
    b = view.batch([e.input_ids for e in items])
    logits = view.logits(view.hidden(b)[:, -k:]).float()  # (B, k, V)
    target = torch.full((len(items), k), -1, dtype=torch.long)
    first = torch.empty(len(items), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.answer_ids)
        target[i, k - n:] = torch.as_tensor(e.answer_ids)
        first[i] = k - n
    target, first = target.to(logits.device), first.to(logits.device)
    pred = logits.argmax(-1)
    scored = target >= 0
    correct = ((pred == target) | ~scored).all(-1)
    rows = torch.arange(len(items), device=logits.device)
    first_logits = logits[rows, first]
    first_target = target[rows, first]
    logp = torch.log_softmax(first_logits, -1)[rows, first_target]
    return {"correct": correct, "correct_first": pred[rows, first] == first_target,
            "logp": logp, "pred": pred[rows, first]}


def encode_cases(view: ModelView, cases: Cases, targets: Targets = None) -> list[Encoded]:
    """Cases to score by teacher forcing: Cases or Encoded as they are, or prompt strings
    (or Cases) with ``targets`` (one text or id for all, or one per case:
    ``data.cases.as_encoded``). CnaError for a prompt without a target."""
    if targets is None and not isinstance(cases, (str, Case, Encoded)) and not any(
            isinstance(c, str) for c in cases):
        return as_encoded(view.tokenizer, cases)
    enc = as_encoded(view.tokenizer, cases, targets)
    if not all(e.answer_ids for e in enc):
        raise CnaError("plain prompts need targets=[...]: the answers to score")
    return enc


def evaluate(view: ModelView, cases: Cases, *interventions: Intervention,
             targets: Targets = None, batch_size: int = 64, progress: bool = True,
             description: str = "evaluating") -> pd.DataFrame:
    """Per-case results (one row per case, in input order) under optional interventions.

    ``cases``: Cases, Encoded, or prompt strings with ``targets`` (``encode_cases``)."""
    enc = encode_cases(view, cases, targets)
    out = {k: torch.empty(len(enc), dtype=t) for k, t in
           (("correct", torch.bool), ("correct_first", torch.bool), ("logp", torch.float32),
            ("pred", torch.long))}
    groups = batches(enc, batch_size)
    with view.intervene(*interventions):
        for idx in track(groups, description, show=progress):
            res = score_batch(view, [enc[i] for i in idx])
            ix = torch.as_tensor(idx)
            for k in out:
                out[k][ix] = res[k].cpu()
    return per_case_frame(view, enc, out)


def per_case_frame(view: ModelView, enc: Sequence[Encoded], out: dict[str,
                   torch.Tensor]) -> pd.DataFrame:
    """One row per case: case_id, its labels (``label_columns``), prompt, target, results."""
    tok = view.tokenizer
    preds = out["pred"].tolist()
    names = label_columns(enc)
    rows = []
    for e, p in zip(enc, preds, strict=True):
        lab = e.case.labels
        rows.append({
            "case_id": e.case.case_id, **{k: lab.get(k) for k in names},
            "prompt": e.case.question, "target": e.case.target,
            "target_first": tok.decode([e.answer_ids[0]]), "pred": tok.decode([p]),
            "n_answer_tokens": len(e.answer_ids), "moved_space": e.moved_space,
            "merged": e.merged,
        })
    df = pd.DataFrame(rows)
    df["correct"] = out["correct"].numpy()
    df["correct_first"] = out["correct_first"].numpy()
    df["logp"] = out["logp"].numpy()
    return df


def _summary_row(g: pd.DataFrame) -> dict:
    n = len(g)
    k, kf = int(g["correct"].sum()), int(g["correct_first"].sum())
    lo, hi = wilson(k, n)
    flo, fhi = wilson(kf, n)
    return {"n": n, "acc": k / n, "acc_lo": lo, "acc_hi": hi, "acc_first": kf / n,
            "acc_first_lo": flo, "acc_first_hi": fhi, "logp": float(g["logp"].mean())}


def _pooled_value(key: str, keys: Sequence[str]):
    """The value a pooled row shows for ``key``: "all", but on arithmetic's integer digits
    column 0 (eval.csv's arithmetic rows: digits 0 = pooled)."""
    return 0 if key == "digits" and list(keys) == list(KEYS) else POOLED


def accuracy_table(per_case: pd.DataFrame, pooled: bool = True,
                   keys: Sequence[str] | None = None) -> pd.DataFrame:
    """acc, acc_first (with Wilson 95% intervals), logp and n per group of ``keys``
    (default ``group_keys(per_case)``: op x digits x template when the cases have them).

    With ``pooled``, rows with the last key "all" pool it for each group of the others
    (when it takes more than one value; arithmetic: template "all"), and one row with
    every key "all" (arithmetic's digits: 0) pools everything. No keys: that one pooled row only.
    """
    keys = group_keys(per_case) if keys is None else list(keys)
    groups = per_case.groupby(keys, sort=True, dropna=False) if keys else []
    rows = [{**dict(zip(keys, vals, strict=True)), **_summary_row(g)} for vals, g in groups]
    if pooled or not keys:
        *outer, last = keys or [None]
        if outer and per_case[last].nunique(dropna=False) > 1:
            rows += [{**dict(zip(outer, vals, strict=True)), last: _pooled_value(last, keys),
                      **_summary_row(g)}
                     for vals, g in per_case.groupby(outer, sort=True, dropna=False)]
        rows.append({**{k: _pooled_value(k, keys) for k in keys}, **_summary_row(per_case)})
    return pd.DataFrame(rows)


make_callable(__name__, evaluate)  # cnalens.evaluate(view, ...) is evaluate(view, ...)
