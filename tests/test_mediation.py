"""Verification at the scored positions only, and mediation, against per-case brute force:
one unpadded forward per case with hand-written hooks on the Hugging Face modules."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cnalens.cna import (
    compare,
    mediation,
    run_with_row_masks,
    scored_positions,
    tail_coefficients,
    topk_mask,
    verify,
)
from cnalens.data import encode_all
from cnalens.data.cases import Case
from cnalens.errors import CnaError
from cnalens.interventions import ZeroHeads
from cnalens.models import ModelView
from cnalens.stats import share_of_effect, verdict
from tiny import TinyTokenizer, tiny_model

HEAD = (1, 2)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    view = ModelView(model, TinyTokenizer())
    # one- and two-token answers (the tiny tokenizer has one token per character)
    cases = [Case(p, t, case_id=p) for p, t in
             (("3+5=", "8"), ("12+30=", "42"), ("7*8=", "56"), ("9-4=", "5"))]
    enc = encode_all(view.tokenizer, cases)
    return model, view, enc


def brute(model, e, head=None, zero=None, replace=None, positions="all"):
    """One case, no padding: the answer's scores under a head zeroed at every position
    (``head``), FFN coefficients zeroed (``zero``: {layer: [neurons]}) at every or the
    scored positions, or set to given values at the scored positions (``replace``:
    {layer: (neurons, values (n_scored, n_neurons))}). Returns (correct, first logp,
    {layer: coefficients (T, F)})."""
    ids = torch.tensor([e.input_ids])
    n_ans = len(e.answer_ids)
    t = ids.shape[1]
    scored = list(range(t - n_ans, t))
    layers = model.model.layers
    hd = model.config.hidden_size // model.config.num_attention_heads
    seen, handles = {}, []

    def pre_down(layer):
        def fn(mod, args):
            x = args[0].clone()
            pos = scored if positions == "last" else list(range(t))
            for n in (zero or {}).get(layer, []):
                x[0, pos, n] = 0.0
            if replace and layer in replace:
                ns, vals = replace[layer]
                for j, n in enumerate(ns):
                    x[0, scored, n] = vals[:, j].to(x.dtype)
            seen[layer] = x[0].detach().clone()
            return (x,)
        return fn

    def pre_o(mod, args):
        x = args[0].clone()
        x[..., head[1] * hd:(head[1] + 1) * hd] = 0.0
        return (x,)

    try:
        for i, blk in enumerate(layers):
            handles.append(blk.mlp.down_proj.register_forward_pre_hook(pre_down(i)))
        if head is not None:
            handles.append(layers[head[0]].self_attn.o_proj.register_forward_pre_hook(pre_o))
        with torch.no_grad():
            logits = model(ids).logits[0, scored].double()
    finally:
        for h in handles:
            h.remove()
    lp = torch.log_softmax(logits, -1)
    target = torch.tensor(e.answer_ids)
    correct = bool((logits.argmax(-1) == target).all())
    return correct, float(lp[0, target[0]]), seen


def test_scored_positions():
    got = scored_positions(torch.tensor([1, 2, 0]), 4)
    assert got.tolist() == [[False, False, False, True], [False, False, True, True],
                            [False, False, False, False]]


@pytest.mark.parametrize("positions", ["all", "last"])
def test_row_masks_at_positions_equal_brute_force(setup, positions):
    model, view, enc = setup
    zero = {0: {0: [3], 2: [1, 7]}, 1: {1: [5]}, 2: {}, 3: {2: [0, 9, 11]}}
    factor = torch.ones(len(enc), view.n_layers, view.d_ffn)
    for i, by_layer in zero.items():
        for layer, ns in by_layer.items():
            factor[i, layer, ns] = 0.0
    got = run_with_row_masks(view, enc, factor, batch_size=3, positions=positions)
    for i, e in enumerate(enc):
        correct, logp, _ = brute(model, e, zero=zero[i], positions=positions)
        assert got["logp"][i].item() == pytest.approx(logp, abs=1e-6)
        assert bool(got["correct"][i]) == correct
    # "last" differs from "all" on these edits (the test could fail)
    other = run_with_row_masks(view, enc, factor, batch_size=3,
                               positions="last" if positions == "all" else "all")
    assert not torch.allclose(other["logp"], got["logp"])
    with pytest.raises(CnaError, match="unknown positions"):
        run_with_row_masks(view, enc, factor, positions="first")


def test_tail_coefficients_and_replacement_equal_brute_force(setup):
    model, view, enc = setup
    iv = ZeroHeads([HEAD])
    tv = tail_coefficients(view, enc, (), batch_size=3)
    vals = tv.values
    assert vals.shape[1] == 2  # the longest answer has two tokens
    assert tv.layers == tuple(range(view.n_layers))
    mask = torch.zeros(len(enc), view.n_layers, view.d_ffn, dtype=torch.bool)
    mask[:, 1, [2, 4]] = True
    mask[1, 2, 0] = True
    got = run_with_row_masks(view, enc, None, batch_size=3, interventions=[iv],
                             replace=(mask, tv))
    # only some layers captured: the same values there, less memory, and a mask reaching
    # a layer not captured is refused before any forward
    part = tail_coefficients(view, enc, (), layers=[2, 1], batch_size=3)
    assert part.layers == (1, 2) and part.values.shape[2] == 2
    torch.testing.assert_close(part.values, vals[:, :, [1, 2]], equal_nan=True)
    same = run_with_row_masks(view, enc, None, batch_size=3, interventions=[iv],
                              replace=(mask, part))
    assert torch.equal(same["logp"], got["logp"])
    far = mask.clone()
    far[0, 0, 1] = True
    with pytest.raises(CnaError, match="layer\\(s\\) 0"):
        run_with_row_masks(view, enc, None, batch_size=3, replace=(far, part))
    for i, e in enumerate(enc):
        _, _, seen_a = brute(model, e)
        n_ans = len(e.answer_ids)
        for layer in range(view.n_layers):  # captured values: run A at the scored positions
            want = seen_a[layer][-n_ans:]
            assert torch.allclose(vals[i, -n_ans:, layer], want.float(), atol=1e-6)
            assert torch.isnan(vals[i, :-n_ans, layer]).all()
        rep = {layer: (ns, seen_a[layer][-n_ans:][:, ns]) for layer in range(view.n_layers)
               if (ns := mask[i, layer].nonzero().flatten().tolist())}
        correct, logp, _ = brute(model, e, head=HEAD, replace=rep)
        assert got["logp"][i].item() == pytest.approx(logp, abs=1e-6)
        assert bool(got["correct"][i]) == correct
        # the replacement matters: run B alone differs
        _, logp_b, _ = brute(model, e, head=HEAD)
        assert abs(logp_b - logp) > 1e-6


def fake_comparison(view, enc, seed=0):
    """Random scores of ``enc``'s cases, in order."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(enc), view.n_layers, view.d_ffn)
    imp_a, imp_b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    ids = [e.case.case_id for e in enc]
    return compare(SimpleNamespace(imp=imp_a, coef=torch.randn(*shape, generator=g),
                                   case_ids=ids, meta={}),
                   SimpleNamespace(imp=imp_b, coef=torch.randn(*shape, generator=g),
                                   case_ids=ids, meta={}))


def test_mediation_equals_brute_force(setup):
    model, view, enc = setup
    comp = fake_comparison(view, enc)
    layers = [1, 2]
    df = mediation(view, enc, comp, [3], [ZeroHeads([HEAD])], rank_layers=layers, seeds=2,
                   batch_size=3, progress=False)
    assert set(df.experiment) == {"mediation_restore_acc", "mediation_restore_logp",
                                  "mediation_reproduce_acc", "mediation_reproduce_logp"}
    mask = topk_mask(comp.topk(3, layers=layers), view.n_layers, view.d_ffn)
    res = {"a": [], "b": [], "restore": [], "reproduce": []}
    for i, e in enumerate(enc):
        n_ans = len(e.answer_ids)
        _, logp_a, seen_a = brute(model, e)
        _, logp_b, seen_b = brute(model, e, head=HEAD)
        pick = {layer: mask[i, layer].nonzero().flatten().tolist() for layer in layers}
        rep_a = {la: (ns, seen_a[la][-n_ans:][:, ns]) for la, ns in pick.items() if ns}
        rep_b = {la: (ns, seen_b[la][-n_ans:][:, ns]) for la, ns in pick.items() if ns}
        res["a"].append(logp_a)
        res["b"].append(logp_b)
        res["restore"].append(brute(model, e, head=HEAD, replace=rep_a)[1])
        res["reproduce"].append(brute(model, e, replace=rep_b)[1])
    a, b = np.array(res["a"]), np.array(res["b"])
    want_restore = (np.mean(res["restore"]) - b.mean()) / (a.mean() - b.mean())
    want_repro = (a.mean() - np.mean(res["reproduce"])) / (a.mean() - b.mean())
    row = df.set_index("experiment")
    assert row.loc["mediation_restore_logp", "value"] == pytest.approx(want_restore, abs=1e-5)
    assert row.loc["mediation_reproduce_logp", "value"] == pytest.approx(want_repro, abs=1e-5)
    assert (row["lo"] <= row["value"] + 1e-9).all() or row["value"].isna().any()
    assert np.isfinite(row.loc["mediation_restore_logp", "random_mean"])
    with pytest.raises(CnaError, match="interventions"):
        mediation(view, enc, comp, [3], [])


def test_share_of_effect_by_hand():
    a, b, x = np.array([1.0, 1, 1, 1]), np.array([0.0, 0, 1, 0]), np.array([1.0, 0, 1, 1])
    value, lo, hi = share_of_effect(a, b, x)
    assert value == pytest.approx((0.75 - 0.25) / 0.75)
    assert lo <= value <= hi
    assert np.isnan(share_of_effect(a, a, x)[0])  # no effect: nothing to share


def test_verdict_rule():
    assert verdict(0.8, 0.6, 0.9, 0.1, 30, 0.9) == "reproduces"
    assert verdict(0.3, 0.05, 0.5, 0.1, 30, 0.9) == "does not"  # interval holds control
    assert verdict(0.0, -0.1, 0.05, 0.1, 30, 0.9) == "does not"  # reversed
    assert verdict(0.8, 0.6, 0.9, 0.1, 19, 0.9) == "cannot be judged"  # too few cases
    assert verdict(0.8, 0.6, 0.9, 0.1, 30, 0.4) == "cannot be judged"  # weak model
    assert verdict(0.1, 0.0, 0.2, 0.9, 30, 0.9, higher=False) == "reproduces"
    assert verdict(0.95, 0.9, 1.0, 0.9, 30, 0.9, higher=False) == "does not"


def test_verify_rows_carry_intervals_and_positions(setup):
    _, view, enc = setup
    comp = fake_comparison(view, enc, seed=1)
    df = verify(view, enc, comp, [2], [1, 2], seeds=1, batch_size=4, progress=False,
                positions="last")
    assert isinstance(df, pd.DataFrame) and (df["positions"] == "last").all()
    acc = df[df.experiment == "zero_topk"].iloc[0]
    assert acc["lo"] <= acc["value"] <= acc["hi"]


def test_comparison_methods_on_the_models_own_answers(setup):
    from cnalens.cna import cna

    _, view, enc = setup
    with torch.no_grad():  # each prompt's own greedy answer: cases the model gets right
        own = [int(view.last_logits(view.batch([list(e.prompt_ids)]))[0, -1].argmax())
               for e in enc]
    cases = [e.case for e in enc]
    comp = cna(view, cases, intervention=ZeroHeads([HEAD]), target=own, k=4)
    med = comp.mediation(ks=[2], seeds=1)
    assert len(med) == 4 and (med["n"] == len(own)).all()
    ver = comp.verify(ks=[2], seeds=1, positions="last")
    assert (ver["positions"] == "last").all()
    with pytest.raises(CnaError, match="K 5 exceeds"):
        comp.mediation(ks=[5])
    other = cna(view, cases, cases, target=own, k=4)  # an input comparison: no interventions
    with pytest.raises(CnaError, match="intervention="):
        other.mediation(ks=[2])


def test_mediation_accuracy_shares_equal_brute_force(setup):
    """On the model's own greedy answers run A is right everywhere and run B (a head
    zeroed) flips some: the accuracy shares are checked, not only the log-prob ones."""
    from cnalens.data.cases import as_encoded

    model, view, enc = setup
    prompts = [Case(p, "0", case_id=p) for p in
               ("3+5=", "1+2=", "7*8=", "9-4=", "2+2=", "6+1=", "8-3=", "4*4=", "5+5=", "9+9=")]
    base = encode_all(view.tokenizer, prompts)
    with torch.no_grad():
        own = [int(view.last_logits(view.batch([list(e.prompt_ids)]))[0, -1].argmax())
               for e in base]
    enc1 = as_encoded(view.tokenizer, base, own)
    head = (0, 1)
    flips = [brute(model, e, head=head)[0] for e in enc1]
    assert not all(flips), "run B flips no case: pick another head"
    comp = fake_comparison(view, enc1, seed=2)
    df = mediation(view, enc1, comp, [4], [ZeroHeads([head])], rank_layers=[0, 1, 2],
                   seeds=1, batch_size=4, progress=False).set_index("experiment")
    mask = topk_mask(comp.topk(4, layers=[0, 1, 2]), view.n_layers, view.d_ffn)
    a, b, rest, repro = [], [], [], []
    for i, e in enumerate(enc1):
        ok_a, _, seen_a = brute(model, e)
        ok_b, _, seen_b = brute(model, e, head=head)
        pick = {la: mask[i, la].nonzero().flatten().tolist() for la in range(3)}
        rep_a = {la: (ns, seen_a[la][-1:][:, ns]) for la, ns in pick.items() if ns}
        rep_b = {la: (ns, seen_b[la][-1:][:, ns]) for la, ns in pick.items() if ns}
        a.append(ok_a)
        b.append(ok_b)
        rest.append(brute(model, e, head=head, replace=rep_a)[0])
        repro.append(brute(model, e, replace=rep_b)[0])
    a, b, rest, repro = (np.array(v, dtype=float) for v in (a, b, rest, repro))
    assert a.all()
    want_rest = (rest.mean() - b.mean()) / (a.mean() - b.mean())
    want_repro = (a.mean() - repro.mean()) / (a.mean() - b.mean())
    assert df.loc["mediation_restore_acc", "value"] == pytest.approx(want_rest)
    assert df.loc["mediation_reproduce_acc", "value"] == pytest.approx(want_repro)


def test_replacement_in_a_batch_shorter_than_the_longest_answer(setup):
    """Values are end-aligned to the longest answer of all cases; a batch of short
    prompts with short answers takes only its own tail."""
    model, view, _ = setup
    enc = encode_all(view.tokenizer, [Case("3", "4"), Case("1+1=", "2345")])
    tv = tail_coefficients(view, enc, (), batch_size=1)
    assert tv.values.shape[1] == 4
    mask = torch.zeros(2, view.n_layers, view.d_ffn, dtype=torch.bool)
    mask[:, 1, :3] = True
    got = run_with_row_masks(view, enc, None, batch_size=1, interventions=[ZeroHeads([HEAD])],
                             replace=(mask, tv))
    for i, e in enumerate(enc):
        n_ans = len(e.answer_ids)
        _, _, seen_a = brute(model, e)
        rep = {1: ([0, 1, 2], seen_a[1][-n_ans:][:, :3])}
        assert got["logp"][i].item() == pytest.approx(brute(model, e, head=HEAD,
                                                           replace=rep)[1], abs=1e-6)


def test_topk_refuses_more_neurons_than_ranked(setup):
    _, view, enc = setup
    comp = fake_comparison(view, enc)
    with pytest.raises(CnaError, match="neurons ranked"):
        comp.topk(view.d_ffn + 1, layers=[1])
    assert comp.topk(view.d_ffn, layers=[1]).shape == (len(enc), view.d_ffn)


def test_verification_refuses_bad_calls_before_any_forward(setup):
    _, view, enc = setup
    comp = fake_comparison(view, enc)
    with pytest.raises(CnaError, match="metric takes"):
        verify(view, enc, comp, [2], [1, 2], metric="logp")
    with pytest.raises(CnaError, match="unknown positions"):
        verify(view, enc, comp, [2], [1, 2], positions="first")
    with pytest.raises(CnaError, match="not the comparison's cases"):
        verify(view, enc[::-1], comp, [2], [1, 2])


def test_add_verdicts_follow_the_papers_direction():
    from cnalens.report.findings import mediation_line, verdict_line
    from cnalens.tables import add_verdicts

    rows = [  # experiment, value, lo, hi, random control, n
        ("zero_topk", 0.6, 0.45, 0.73, 0.02, 40),      # above random: reproduces
        ("keep_topk", 0.2, 0.1, 0.35, 0.9, 40),        # below random: reproduces
        ("keep_topk", 1.0, 0.91, 1.0, 1.0, 40),        # both saturated: does not
        ("coef_drop_head", 0.05, -0.02, 0.1, 0.2, 40),  # reversed: does not
        ("mediation_restore_logp", 0.9, 0.8, 0.97, 0.01, 40),
        ("mediation_restore_acc", 0.5, float("nan"), float("nan"), 0.0, 40),  # unclear
        ("heldout_zero_topk", 0.6, 0.45, 0.73, 0.02, 12),  # too few cases
    ]
    df = pd.DataFrame(rows, columns=["experiment", "value", "lo", "hi", "random_mean", "n"])
    df = df.assign(k=10, random_std=0.01, positions="all", base_accuracy=0.9, op="+",
                   head="7.0")
    got = add_verdicts(df)["verdict"].tolist()
    assert got == ["reproduces", "reproduces", "does not", "does not", "reproduces",
                   "cannot be judged", "cannot be judged"]
    weak = add_verdicts(df.assign(base_accuracy=0.3))["verdict"]
    assert set(weak) == {"cannot be judged"}
    ver = add_verdicts(df)
    line = verdict_line(ver)
    assert "zeroing the top-K: reproduces (K = 10)" in line and "keep-only:" in line
    assert "mediation (restored log-prob effect): reproduces" in line
    med = mediation_line(ver, "+")
    assert "restores 90.0% [80.0, 97.0]" in med


def test_random_controls_draw_routed_neurons_only_in_experts_layers():
    from cnalens.cna import random_like, random_pool
    from tiny import MOE_NAMES

    view = ModelView(tiny_model(MOE_NAMES[0]), TinyTokenizer())
    enc = encode_all(view.tokenizer, [Case("3+5=", "8", case_id="a")])
    comp = fake_comparison(view, enc)
    with torch.no_grad(), view.capture(["coef"], position=-1) as cache:
        view.hidden(view.batch([list(enc[0].prompt_ids)]))
    coef = torch.zeros(1, view.n_layers, view.d_ffn)
    for layer in range(view.n_layers):
        c = cache[("coef", layer)][0, 0].float()
        coef[0, layer, :len(c)] = c
    comp.coef_a = coef
    pool = random_pool(view, comp)
    moe = [view.shape.layout(x) is not None for x in range(view.n_layers)]
    assert any(moe)
    for layer, is_moe in enumerate(moe):
        w = view.ffn_width(layer)
        if is_moe:  # exactly the routed experts' neurons
            assert torch.equal(pool[0, layer, :w], coef[0, layer, :w] != 0)
            assert 0 < int(pool[0, layer].sum()) < w
        else:
            assert pool[0, layer, :w].all()
    mask = torch.zeros_like(pool)
    mask[0, :, :2] = True
    for seed in range(5):
        r = random_like(mask, torch.Generator().manual_seed(seed), pool)
        assert not (r & ~pool).any()


def test_cna_cases_of_two_digit_pairs():
    from cnalens.stages.cna import cna_cases

    train, test = cna_cases(["+"], 6, digits=2)
    assert len(train["+"]) == 6 and len(test["+"]) == 6  # held-out sampled too
    pairs = [c.question for c in train["+"] + test["+"]]
    assert all(len(q.split("+")[0]) == 2 and len(q.split("+")[1].rstrip("=")) == 2
               for q in pairs)
    assert not {c.question for c in train["+"]} & {c.question for c in test["+"]}
    one, held = cna_cases(["-"], None, split="all", negative=True)
    assert len(one["-"]) > 90  # negative differences too (the few-shot pairs left out)
    ids = {c.case_id for c in one["-"]}
    assert 40 < len(held["-"]) < 60 and {c.case_id for c in held["-"]} <= ids
