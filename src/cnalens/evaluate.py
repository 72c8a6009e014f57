"""Batched greedy evaluation with teacher forcing, and accuracy tables with intervals.

Metrics (design.md): ``acc`` = every answer token is the greedy top-1 with the gold
prefix appended (all answer tokens scored in one pass); ``acc_first`` = the first answer
token is top-1; ``logp`` = log-probability of the first answer token.
Logits are computed only at the scored positions (the last ones, thanks to left padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from cnalens.data.cases import Case, Encoded, encode_all
from cnalens.progress import track
from cnalens.stats import wilson

KEYS = ("op", "digits", "template")


def batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_batch(view, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
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


def evaluate(view, cases: Sequence[Case] | Sequence[Encoded], *interventions,
             batch_size: int = 64, progress: bool = True,
             description: str = "evaluating") -> pd.DataFrame:
    """Per-case results (one row per case, in input order) under optional interventions."""
    enc = (list(cases) if cases and isinstance(cases[0], Encoded)
           else encode_all(view.tokenizer, cases))
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


def per_case_frame(view, enc: Sequence[Encoded], out: dict[str, torch.Tensor]) -> pd.DataFrame:
    tok = view.tokenizer
    preds = out["pred"].tolist()
    rows = []
    for e, p in zip(enc, preds, strict=True):
        lab = e.case.labels
        rows.append({
            "case_id": e.case.case_id, "op": lab.get("op", "custom"),
            "digits": lab.get("digits", 0), "template": lab.get("template", "custom"),
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


def accuracy_table(per_case: pd.DataFrame, pooled: bool = True) -> pd.DataFrame:
    """acc, acc_first (with Wilson 95% intervals), logp and n per op x digits x template.

    With ``pooled``, rows with template "all" pool each op x digits over templates, and
    one row with op "all" pools everything.
    """
    rows = [{"op": op, "digits": d, "template": t, **_summary_row(g)}
            for (op, d, t), g in per_case.groupby(list(KEYS), sort=True)]
    if pooled:
        if per_case["template"].nunique() > 1:
            rows += [{"op": op, "digits": d, "template": "all", **_summary_row(g)}
                     for (op, d), g in per_case.groupby(["op", "digits"], sort=True)]
        rows.append({"op": "all", "digits": 0, "template": "all", **_summary_row(per_case)})
    return pd.DataFrame(rows)
