"""Batched teacher-forced evaluation against one-case-at-a-time brute force."""

import math

import numpy as np
import pytest
import torch

from cnalens.data import arithmetic_cases, encode_all
from cnalens.data.cases import Case
from cnalens.evaluate import accuracy_table, evaluate
from cnalens.interventions import ZeroHeads
from cnalens.models import ModelView
from cnalens.stats import bootstrap_diff, wilson
from tiny import TinyTokenizer, tiny_model


def brute_force(view, enc):
    """Each case alone, no padding, full logits, one position at a time."""
    rows = []
    with torch.no_grad():
        for e in enc:
            ids = torch.tensor([list(e.prompt_ids) + list(e.answer_ids)])
            logits = view.model(input_ids=ids).logits[0].float()
            p = len(e.prompt_ids)
            preds = [int(logits[p - 1 + j].argmax()) for j in range(len(e.answer_ids))]
            rows.append({
                "correct": preds == list(e.answer_ids),
                "correct_first": preds[0] == e.answer_ids[0],
                "logp": float(torch.log_softmax(logits[p - 1], -1)[e.answer_ids[0]]),
            })
    return rows


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox", "phi3", "olmo2"])
def test_batched_equals_brute_force_tiny(family):
    view = ModelView(tiny_model(family), TinyTokenizer())
    cases = [Case("3+5=", "8"), Case("12+30=", "42"), Case("7*8=", "56"),
             Case("1+1=2\n4+2=", "6"), Case("is", " 17")]
    enc = encode_all(view.tokenizer, cases)
    got = evaluate(view, enc, batch_size=3, progress=False)
    want = brute_force(view, enc)
    assert list(got["correct"]) == [w["correct"] for w in want]
    assert list(got["correct_first"]) == [w["correct_first"] for w in want]
    np.testing.assert_allclose(got["logp"], [w["logp"] for w in want], atol=1e-5)


def test_accuracy_table_and_intervals():
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    cases = arithmetic_cases(["+", "-"], [1], ["eq", "nl"], n=6, shots=1)
    per_case = evaluate(view, cases, batch_size=4, progress=False)
    table = accuracy_table(per_case)
    row = table[(table.op == "+") & (table.template == "eq")].iloc[0]
    sub = per_case[(per_case.op == "+") & (per_case.template == "eq")]
    assert row.n == len(sub) and row.acc == sub.correct.mean()
    assert (row.acc_lo, row.acc_hi) == wilson(sub.correct.sum(), len(sub))
    assert set(table.template) == {"eq", "nl", "all"}
    assert table[table.op == "all"].iloc[0].n == len(per_case)


def test_wilson_and_bootstrap_by_hand():
    lo, hi = wilson(8, 10)
    z = 1.959963984540054
    p, n = 0.8, 10
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert math.isclose(lo, c - h) and math.isclose(hi, c + h)
    assert all(math.isnan(x) for x in wilson(0, 0))
    a, b = np.ones(50), np.zeros(50)
    assert bootstrap_diff(a, b) == (1.0, 1.0)
    lo, hi = bootstrap_diff(np.r_[np.ones(25), np.zeros(25)], np.zeros(50))
    assert 0.3 < lo < 0.5 < hi < 0.7


def test_intervention_changes_results_and_hooks_are_gone():
    view = ModelView(tiny_model("gemma3"), TinyTokenizer())
    cases = [Case("3+5=", "8"), Case("12+30=", "42")]
    before = evaluate(view, cases, progress=False)
    ablated = evaluate(view, cases, ZeroHeads([(1, 0), (2, 3)]), progress=False)
    after = evaluate(view, cases, progress=False)
    assert not np.allclose(before.logp, ablated.logp)
    np.testing.assert_array_equal(before.logp, after.logp)


@pytest.mark.real
@pytest.mark.parametrize("name", ["gemma", "smollm2"])
def test_batched_equals_single_real(name, request):
    from conftest import near_tie_mask

    view = request.getfixturevalue(name)
    cases = (arithmetic_cases(["+", "*"], [1], ["eq", "qa"], n=4, seed=1)
             + arithmetic_cases(["-"], [2], ["eq"], n=4, seed=1, negative=True))
    enc = encode_all(view.tokenizer, cases)
    batched = evaluate(view, enc, batch_size=16, progress=False)
    ties = 0
    with torch.no_grad():
        for i, e in enumerate(enc):
            one = evaluate(view, [e], batch_size=1, progress=False).iloc[0]
            if one.correct != batched.correct[i] or one.correct_first != batched.correct_first[i]:
                ids = torch.tensor([e.input_ids])
                logits = view.model(input_ids=ids).logits[0, -len(e.answer_ids):]
                assert near_tie_mask(logits).any(), e.case.case_id
                ties += 1
            assert abs(one.logp - batched.logp[i]) < 1e-3
    assert ties <= 1
    # a space-led answer is scored on its digit: the space moved into the prompt
    qa = batched[batched.template == "qa"]
    assert qa.moved_space.all() and (qa.target_first.str.strip() != "").all()
