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
    cases = [Case("3+5=", "8"), Case("12+30=", "42"), Case("7*8=", "56"), Case("9-4=", "5")]
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
    vals = tail_coefficients(view, enc, (), batch_size=3)
    assert vals.shape[1] == 2  # the longest answer has two tokens
    mask = torch.zeros(len(enc), view.n_layers, view.d_ffn, dtype=torch.bool)
    mask[:, 1, [2, 4]] = True
    mask[1, 2, 0] = True
    got = run_with_row_masks(view, enc, None, batch_size=3, interventions=[iv],
                             replace=(mask, vals))
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


def fake_comparison(view, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, view.n_layers, view.d_ffn)
    imp_a, imp_b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    ids = [f"c{i}" for i in range(n)]
    return compare(SimpleNamespace(imp=imp_a, coef=torch.randn(*shape, generator=g),
                                   case_ids=ids, meta={}),
                   SimpleNamespace(imp=imp_b, coef=torch.randn(*shape, generator=g),
                                   case_ids=ids, meta={}))


def test_mediation_equals_brute_force(setup):
    model, view, enc = setup
    comp = fake_comparison(view, len(enc))
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
    comp = fake_comparison(view, len(enc), seed=1)
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
