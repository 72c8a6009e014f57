"""CNA ranking, masks and per-case ablation runs, against direct computations."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cnalens.cna import compare, random_like, run_with_row_masks, topk_mask
from cnalens.data import encode_all
from cnalens.data.cases import Case
from cnalens.errors import CnaError
from cnalens.evaluate import evaluate
from cnalens.interventions import ZeroNeurons
from cnalens.models import ModelView
from cnalens.tables import frequency
from tiny import TinyTokenizer, tiny_model


def fake_scores(imp, coef, ids):
    return SimpleNamespace(imp=imp, coef=coef, case_ids=ids, meta={})


def test_compare_rank_and_frame():
    g = torch.Generator().manual_seed(0)
    imp_a, imp_b = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    coef_a, coef_b = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    ids = ["x", "y", "z"]
    comp = compare(fake_scores(imp_a, coef_a, ids), fake_scores(imp_b, coef_b, ids))
    df = comp.frame(6)
    for case_i, case in enumerate(ids):
        d = (imp_a[case_i] - imp_b[case_i]).flatten()
        order = d.argsort(descending=True)[:6]
        sub = df[df.case == case].sort_values("rank")
        assert list(sub.layer * 5 + sub.neuron) == order.tolist()
        assert torch.allclose(torch.tensor(sub.imp_a.values), imp_a[case_i].flatten()[order])
    inc = comp.frame(2, by="increase")
    assert (inc.imp_b - inc.imp_a >= 0).sum() >= 1
    deep = comp.frame(3, layers=[2, 3])
    assert set(deep.layer) <= {2, 3}
    freq = frequency(df, 6)
    assert freq["count"].sum() == 18 and freq["freq"].max() <= 1
    with pytest.raises(CnaError, match="different shapes"):
        compare(fake_scores(imp_a, coef_a, ids), fake_scores(imp_b[:, :2], coef_b, ids))
    with pytest.raises(CnaError, match="exceeds"):
        comp.topk(100)


def test_masks():
    idx = torch.tensor([[0, 7, 13], [1, 2, 3]])
    m = topk_mask(idx, 3, 5)
    assert m.sum() == 6 and m[0, 1, 2] and m[0, 2, 3] and m[1, 0, 1]
    r = random_like(m, torch.Generator().manual_seed(1))
    assert torch.equal(r.sum(-1), m.sum(-1))


def test_row_masks_equal_per_case_interventions():
    view = ModelView(tiny_model("gemma3"), TinyTokenizer())
    cases = [Case("3+5=", "8"), Case("12+30=", "42"), Case("7*8=", "56")]
    enc = encode_all(view.tokenizer, cases)
    factor = torch.ones(3, view.n_layers, view.d_ffn)
    zero = {0: [(1, 3), (2, 0)], 1: [(0, 5)], 2: []}
    for i, ns in zero.items():
        for layer, n in ns:
            factor[i, layer, n] = 0
    got = run_with_row_masks(view, enc, factor, batch_size=2, capture_coef=True)
    for i, ns in zero.items():
        want = evaluate(view, [enc[i]], *([ZeroNeurons(ns)] if ns else []), progress=False)
        assert abs(got["logp"][i].item() - want.logp.iloc[0]) < 1e-6
        with torch.no_grad(), view.intervene(*([ZeroNeurons(ns)] if ns else [])), \
                view.capture(["coef"], position=-1) as c:
            view.hidden(view.batch([list(enc[i].prompt_ids)]))
        assert torch.allclose(got["coef"][i, 1], c[("coef", 1)][0, 0].float(), atol=1e-6)


def test_lens_faithfulness_real_effect_by_hand():
    from cnalens.cna import lens_faithfulness

    view = ModelView(tiny_model("llama"), TinyTokenizer())
    cases = [Case("3+5=", "8"), Case("12+30=", "42")]
    enc = encode_all(view.tokenizer, cases)
    imp = torch.randn(2, view.n_layers, view.d_ffn, generator=torch.Generator().manual_seed(3))
    df = lens_faithfulness(view, enc, imp, top=3, batch_size=4)
    assert len(df) == 6
    for r in df.itertuples():
        i = r.case_index
        assert imp[i, r.layer, r.neuron] == torch.tensor(r.importance, dtype=imp.dtype)
        base = evaluate(view, [enc[i]], progress=False).logp.iloc[0]
        zero = evaluate(view, [enc[i]], ZeroNeurons([(r.layer, r.neuron)]),
                        progress=False).logp.iloc[0]
        assert abs(r.real - (base - zero)) < 1e-5


def test_certified_comparison_ranks_like_exhaustive():
    from cnalens.cna import compare, compare_runs
    from cnalens.scores import score_neurons

    view = ModelView(tiny_model("llama"), TinyTokenizer())
    enc = encode_all(view.tokenizer, [Case("3+5=", "8"), Case("12+30=", "42")])
    iv = ZeroNeurons([(0, 1)])  # any model intervention works as run B
    a = score_neurons(view, enc, progress=False)
    b = score_neurons(view, enc, iv, target=a.target, scale=a.scale, progress=False)
    exhaustive = compare(a, b)
    cert = compare_runs(view, enc, [iv], k=7, layers=range(view.n_layers))
    assert cert.meta["scoring"] == "certified"
    assert torch.equal(cert.topk(7), exhaustive.topk(7))
    assert torch.allclose(cert.coef_b, exhaustive.coef_b.to(cert.coef_b.dtype))


def test_frequency_set_counts_then_summed_key():
    from cnalens.cna import frequency_set

    # 3 cases, 1 layer x 4 neurons; top-2 per case by imp_a - imp_b
    diff = torch.tensor([[[4.0, 3.0, 0.0, -1.0]],
                         [[0.0, 3.0, 5.0, -1.0]],
                         [[1.0, 2.0, 0.5, 9.0]]])
    z = torch.zeros_like(diff)
    comp = compare(fake_scores(diff, z, ["a", "b", "c"]), fake_scores(z, z, ["a", "b", "c"]))
    # summed diff: 0 -> 5.0, 1 -> 8.0, 2 -> 5.5, 3 -> 7.0
    # top-1 sets {0}, {2}, {3}: a three-way tie in count, broken by the summed diff
    assert frequency_set(comp, 1).flatten().nonzero().flatten().tolist() == [3]
    # top-2 sets {0,1}, {2,1}, {3,1}: neuron 1 three times, then the tie -> 3
    assert frequency_set(comp, 2).flatten().nonzero().flatten().tolist() == [1, 3]
    # top-3 sets {0,1,2}, {2,1,0}, {3,1,0}: counts 0:3, 1:3, 2:2, 3:1
    assert frequency_set(comp, 3).flatten().nonzero().flatten().tolist() == [0, 1, 2]


def test_verify_heldout_equals_zeroing_the_set_by_hand():
    from cnalens.cna import frequency_set, verify_heldout

    view = ModelView(tiny_model("llama"), TinyTokenizer())
    g = torch.Generator().manual_seed(3)
    shape = (4, view.n_layers, view.d_ffn)
    comp = compare(fake_scores(torch.randn(shape, generator=g), torch.zeros(shape), list("abcd")),
                   fake_scores(torch.zeros(shape), torch.zeros(shape), list("abcd")))
    test = encode_all(view.tokenizer, [Case("3+5=", "8"), Case("2+2=", "4"), Case("9-1=", "8")])
    # "correct" by the model's own greedy answers: use its predictions as targets
    base = evaluate(view, test, progress=False)
    test = [e for e, ok in zip(test, base["correct"], strict=True) if ok] or test
    ver = verify_heldout(view, test, comp, [3], seeds=2, progress=False)
    mask = frequency_set(comp, 3)
    neurons = [(int(l_), int(n_)) for l_, n_ in mask.nonzero()]
    want = evaluate(view, test, ZeroNeurons(neurons), progress=False)
    assert ver["experiment"].tolist() == ["heldout_zero_topk"]
    assert ver["value"].iloc[0] == pytest.approx(1 - want["correct"].mean())
    assert ver["n"].iloc[0] == len(test) and ver["random_std"].iloc[0] >= 0


@pytest.mark.parametrize("by", ["decrease", "increase", "abs"])
def test_frame_and_diff_frame_share_the_ranking_rule(by):
    """Many exact ties (integer scores): both tables rank by the rule of design.md, ties by
    (layer, neuron), and topk agrees with the frame."""
    from cnalens.scores import diff_frame

    g = torch.Generator().manual_seed(4)
    imp_a, imp_b = (torch.randint(-3, 4, (3, 4, 5), generator=g).double() for _ in range(2))
    imp_a[1, 2, 3] = float("nan")  # a neuron never scored: left out of both tables
    coef = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    ids = ["x", "y", "z"]
    a, b = fake_scores(imp_a, coef, ids), fake_scores(imp_b, -coef, ids)
    comp = compare(a, b)
    ref = diff_frame(a, b, top=8, by=by)
    got = comp.frame(8, by=by, labels=[{"op": o} for o in "+-*"])
    pd.testing.assert_frame_equal(got.drop(columns="op"), ref.drop(columns="diff"))
    assert list(got.op) == list(np.repeat(list("+-*"), 8))
    flat = torch.tensor((ref.layer * 5 + ref.neuron).to_numpy()).view(3, 8)
    assert torch.equal(comp.topk(8, by), flat)
    for i in range(3):  # brute force: sort by (-key, layer, neuron)
        d = (imp_a[i] - imp_b[i]).flatten()
        key = {"decrease": d, "increase": -d, "abs": d.abs()}[by]
        want = sorted((j for j in range(20) if key[j] == key[j]), key=lambda j: (-key[j], j))
        assert flat[i].tolist() == want[:8]
    deep = comp.frame(15, by=by, layers=[2, 3])  # more than the layers hold: only theirs
    assert set(deep.layer) == {2, 3} and len(deep) == 3 * 10 - 1
