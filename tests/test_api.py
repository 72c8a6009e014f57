"""The notebook API (``cnalens.cna``, ``evaluate``/``scan_heads`` on strings,
``run_with_cache``, ``cnalens.plot``) against the existing computations, on tiny float64
models; one real-model check against the CNA stage."""

import copy
import warnings

import pandas as pd
import pytest
import torch

import cnalens
from cnalens.certified import certified_cna, screened_cna
from cnalens.cna import compare, from_certified
from cnalens.data.cases import Case, encode_all
from cnalens.errors import CnaError
from cnalens.interventions import ZeroHeads, ZeroNeurons
from cnalens.models import ModelView
from cnalens.scores import score_neurons
from cnalens.states import case_states
from tiny import TinyTokenizer, tiny_model

CASES = [Case("3+5=", "8", case_id="a"), Case("12+30=", "42", case_id="b"),
         Case("7*8=", "56", case_id="c")]
FRAME = ["case", "rank", "layer", "neuron", "imp_a", "imp_b", "coef_a", "coef_b"]


def _view(family="llama"):
    return ModelView(tiny_model(family), TinyTokenizer(), {"spec": family})


def _close(x, y):
    torch.testing.assert_close(x, y.to(x.dtype), rtol=1e-10, atol=1e-12, equal_nan=True)


def test_top_level_names():
    for name in ("load_model", "ModelView", "cna", "evaluate", "scan_heads", "Comparison",
                 "ZeroHeads", "ZeroNeurons", "KeepOnlyNeurons", "plot", "CnaError"):
        assert hasattr(cnalens, name), name
    assert cnalens.Comparison is cnalens.cna.Comparison  # the module, callable
    assert callable(cnalens.cna) and callable(cnalens.evaluate)


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, cnalens; print(any(m in sys.modules for m in "
            "('cnalens.cna', 'cnalens.scores', 'cnalens.heads', 'pandas')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_as_encoded_takes_what_a_notebook_holds():
    from cnalens.data.cases import as_encoded, encode

    tok = TinyTokenizer()
    enc = as_encoded(tok, ["3+5=", "3+5="], targets=["8", 9])
    assert [e.case.case_id for e in enc] == ["c0", "c1"]  # repeated prompts
    assert enc[0] == encode(tok, Case("3+5=", "8", case_id="c0"))
    assert enc[1].answer_ids == (9,) and enc[1].prompt_ids == enc[0].prompt_ids
    assert as_encoded(tok, "3+5=")[0].answer_ids == ()
    assert as_encoded(tok, CASES[0])[0] == encode(tok, CASES[0])
    with pytest.raises(CnaError, match="2 targets for 3 cases"):
        as_encoded(tok, CASES, ["1", "2"])
    with pytest.raises(CnaError, match="cannot retarget"):
        as_encoded(tok, encode_all(tok, CASES), "8")


def test_model_comparison_equals_score_neurons(one_thread):
    view = _view()
    enc = encode_all(view.tokenizer, CASES)
    iv = ZeroHeads([(1, 0)])
    comp = cnalens.cna(view, CASES, intervention=iv)
    a = score_neurons(view, enc, progress=False)  # run A: its prediction, its scale
    b = score_neurons(view, enc, iv, target=a.target, scale=a.scale, progress=False)
    ref = compare(a, b)
    deep = slice(1, None)  # default layers: from the intervened layer up
    for got, want in ((comp.imp_a, ref.imp_a), (comp.imp_b, ref.imp_b),
                      (comp.diff, ref.diff), (comp.coef_a, ref.coef_a),
                      (comp.coef_b, ref.coef_b)):
        _close(got[:, deep], want[:, deep])
    assert comp.imp_a[:, 0].isnan().all() and comp.layers == [1, 2]
    assert comp.case_ids == ["a", "b", "c"] and comp.view is view
    pd.testing.assert_frame_equal(comp.frame(5), ref.frame(5, layers=[1, 2]), rtol=1e-10)
    assert list(comp.frame().columns) == FRAME
    assert comp.frame().groupby("case").size().tolist() == [20] * 3  # default K
    assert comp.meta["scoring"] == "exhaustive" and comp.meta["runs"]["b"] == [iv.describe()]
    # a list of interventions works the same
    two = cnalens.cna(view, CASES, intervention=[iv, ZeroNeurons([(2, 3)])])
    assert two.layers == [1, 2]


def test_model_comparison_certified_with_k(one_thread):
    view = _view()
    enc = encode_all(view.tokenizer, CASES)
    iv = ZeroHeads([(1, 1)])
    comp = cnalens.cna(view, CASES, intervention=iv, k=6)
    sa, sb = case_states(view, enc), case_states(view, enc, iv)
    frame, _ = certified_cna(view, sa, sb, 6, layers=[1, 2])
    want = from_certified(frame, sa.coef, sb.coef, sa.case_ids)
    _close(comp.diff, want.diff)
    assert comp.meta["scoring"] == "certified" and comp.k == 6
    exhaustive = cnalens.cna(view, CASES, intervention=iv)
    assert torch.equal(comp.topk(6), exhaustive.topk(6))
    assert len(comp.frame()) == 18


def test_input_comparison_equals_existing(one_thread):
    view = _view("gemma3")
    a_prompts, b_prompts = ["3+5=", "2+2="], ["3*5=", "2*2="]
    comp = cnalens.cna(view, a_prompts, b_prompts, target="8")
    tok = view.tokenizer
    ea = encode_all(tok, [Case(p, "8", case_id=p) for p in a_prompts])
    eb = encode_all(tok, [Case(p, "8", case_id=p) for p in b_prompts])
    sa = score_neurons(view, ea, target="gold", progress=False)
    sb = score_neurons(view, eb, target=sa.target, progress=False)  # its own scale
    _close(comp.imp_a, sa.imp)
    _close(comp.imp_b, sb.imp)
    st_a, st_b = case_states(view, ea), case_states(view, eb)
    frame, _ = screened_cna(view, st_a, st_b, 7, target="gold", screen=0)  # every neuron
    pd.testing.assert_frame_equal(comp.frame(7), frame.drop(columns="diff"), rtol=1e-10)
    if not view.softcap:  # with k: certified exact, each run its own scale
        cert = cnalens.cna(view, a_prompts, b_prompts, target="8", k=7)
        assert cert.meta["scoring"] == "certified"
        pd.testing.assert_frame_equal(cert.frame(7), comp.frame(7), rtol=1e-6, atol=1e-9)
    assert comp.case_ids == a_prompts and comp.meta["comparison"] == "inputs"
    # screening is an explicit, recorded option
    scr = cnalens.cna(view, a_prompts, b_prompts, target="8", k=4, screen=9)
    want, _ = screened_cna(view, st_a, st_b, 4, target="gold", screen=9)
    pd.testing.assert_frame_equal(scr.frame(), want.drop(columns="diff"), rtol=1e-10)
    assert scr.meta["scoring"] == "screened"
    # one prompt each, no target: run A's prediction, shared
    one = cnalens.cna(view, "3+5=", "3*5=")
    pred = int(case_states(view, encode_all(tok, [Case("3+5=", "8")])).pred[0])
    assert one.cases[0].answer_ids == (pred,) and one.cases_b[0].answer_ids == (pred,)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_other_model_equals_head_zeroed_by_hand(family, one_thread):
    view = _view(family)
    head = (1, 2)
    other = copy.deepcopy(view.model)
    hd = view.head_dim
    with torch.no_grad():  # zero the head's o_proj columns (an independent brute force)
        view_o = ModelView(other, view.tokenizer).module(head[0], "o_proj")
        view_o.weight[:, head[1] * hd:(head[1] + 1) * hd] = 0
    by_hook = cnalens.cna(view, CASES, intervention=ZeroHeads([head]))
    by_hand = cnalens.cna(view, CASES, other_model=other, layers=range(head[0], 3))
    for name in ("imp_a", "imp_b", "diff", "coef_a", "coef_b"):
        torch.testing.assert_close(getattr(by_hand, name), getattr(by_hook, name),
                                   rtol=1e-9, atol=1e-11, equal_nan=True, msg=name)
    assert by_hand.meta["scoring"] == "exhaustive"
    wrapped = cnalens.cna(view, CASES, other_model=ModelView(other, view.tokenizer), k=4,
                          layers=[1, 2])
    assert torch.equal(wrapped.topk(4), by_hook.topk(4))


def test_adapter_outside_the_layers_is_refused(one_thread):
    """Both runs go through the view's unembedding: a LoRA on lm_head cannot be compared."""
    from peft import LoraConfig, get_peft_model

    view = _view()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(view.model, LoraConfig(r=2, target_modules=["lm_head"]))
    try:
        with pytest.raises(CnaError, match="outside the decoder layers"):
            cnalens.cna(view, CASES, other_model=pm, k=3)
    finally:
        pm.unload()


def test_other_model_peft_adapter_off_equals_lora_comparison(one_thread):
    from peft import LoraConfig, get_peft_model

    from cnalens.apps.lora_cna import lora_comparison

    view = _view()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["model.layers.1.self_attn.o_proj",
                                                          "model.layers.2.mlp.down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(view.model, config)
    pm.eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    enc = encode_all(view.tokenizer, CASES)
    comp = cnalens.cna(view, CASES, other_model=pm, layers=[1, 2])
    want = lora_comparison(view, pm, enc, 1, progress=False)
    for name in ("imp_a", "imp_b", "coef_a", "coef_b"):
        _close(getattr(comp, name), getattr(want, name))
    assert comp.meta["runs"]["b"] == "original (adapter disabled)"
    assert not torch.allclose(comp.imp_a[:, 1:], comp.imp_b[:, 1:])
    pm.unload()


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"a": "3+5="}, "needs run B"),
    ({"a": "3+5=", "b": "3*5=", "intervention": ZeroHeads([(1, 0)])}, "ambiguous"),
    ({"a": "3+5=", "intervention": ZeroHeads([(1, 0)]), "other_model": "x"}, "ambiguous"),
    ({"a": "3+5=", "intervention": "heads"}, "intervention= takes"),
    ({"a": "3+5=", "intervention": ZeroHeads([(1, 0)]), "by": "up"}, "unknown ranking"),
    ({"a": "3+5=", "intervention": ZeroHeads([(1, 0)]), "screen": 5}, "input comparisons"),
    ({"a": ["1+1=", "2+2="], "b": "3*5="}, "one to one"),
    ({"a": "3+5=", "b": "3*5=", "screen": 5}, "needs k="),
    ({"a": "3+5=", "other_model": 3}, "other_model= takes"),
    ({"a": 5, "intervention": ZeroHeads([(1, 0)])}, "a case must be"),
])
def test_bad_calls_are_one_line_errors(kwargs, msg):
    view = _view()
    with pytest.raises(CnaError, match=msg) as err:
        cnalens.cna(view, **kwargs)
    assert "\n" not in str(err.value)


def test_other_model_of_another_shape_is_refused():
    big = _view()
    small = ModelView(tiny_model("llama"), TinyTokenizer())
    small.n_layers = 2  # as if it had fewer layers
    with pytest.raises(CnaError, match="another shape"):
        cnalens.cna(big, "3+5=", other_model=small)


def test_strings_and_verify(one_thread):
    from cnalens.cna import verify

    view = _view()
    comp = cnalens.cna(view, ["3+5=", "7*8="], intervention=ZeroHeads([(1, 0)]), k=5)
    pred = case_states(view, comp.cases).pred
    assert [e.answer_ids for e in comp.cases] == [(int(p),) for p in pred]
    assert comp.case_ids == ["3+5=", "7*8="]
    assert list(comp.frame().columns) == FRAME and len(comp.frame()) == 10
    ver = comp.verify(ks=[2, 5], seeds=1)
    want = verify(view, comp.cases, comp, [2, 5], [1, 2], seeds=1, progress=False,
                  rank_layers=[1, 2])
    pd.testing.assert_frame_equal(ver.drop(columns=["base_accuracy", "verdict"]), want)
    assert (ver["base_accuracy"] == 1.0).all()  # run A's predictions: every case right
    assert set(ver["verdict"]) == {"cannot be judged"}  # two cases
    assert set(ver["experiment"]) == {"zero_topk", "keep_topk", "coef_drop_head",
                                      "coef_drop_lowest"}
    with pytest.raises(CnaError, match="exceeds the top-5"):
        comp.verify(ks=[10])
    fig = cnalens.plot.verification(ver)
    assert fig.axes


def test_evaluate_scan_heads_and_run_with_cache_on_strings(one_thread):
    view = _view()
    prompts, targets = ["3+5=", "12+30="], ["8", "42"]
    got = cnalens.evaluate(view, prompts, targets=targets, progress=False)
    want = cnalens.evaluate(view, [Case(p, t) for p, t in zip(prompts, targets, strict=True)],
                            progress=False)
    pd.testing.assert_frame_equal(got.drop(columns="case_id"), want.drop(columns="case_id"))
    with pytest.raises(CnaError, match="targets="):
        cnalens.evaluate(view, prompts, progress=False)
    heads = cnalens.scan_heads(view, prompts, targets=targets, layers=[1], progress=False)
    assert len(heads) == view.n_heads and {"layer", "head", "drop"} <= set(heads.columns)
    assert cnalens.plot.heads(heads).axes
    logits, cache = view.run_with_cache(prompts, points=["resid_post", "coef"])
    b = view.batch([list(view.tokenizer(p).input_ids) for p in prompts])
    with torch.no_grad():
        ref = view.logits(view.hidden(b)[:, -1])
    torch.testing.assert_close(logits, ref)
    assert cache[("coef", 2)].shape[:2] == b.input_ids.shape
    one, _ = view.run_with_cache("3+5=", points=["z"], position=-1)
    torch.testing.assert_close(one[0], logits[0], rtol=1e-9, atol=1e-9)


def test_cna_equals_the_cna_stage_on_tiny(tmp_path, one_thread):
    from cnalens.pipeline import cna_stage

    view = _view()
    prompts = ["3+5=", "12+30=", "7*8=", "9-4=", "6+6=", "2*3="]
    logits, _ = view.run_with_cache(prompts, points=[])
    chars = [chr(int(t) - 3) for t in logits.argmax(-1)]  # TinyTokenizer: id = 3 + ord
    cases = [Case(p, c, case_id=f"k{i}") for i, (p, c) in enumerate(zip(prompts, chars,
                                                                          strict=True))
             if c.strip()]  # targets the model predicts, so every case is kept
    head = (1, 3)
    cna_stage(view, tmp_path, {"+": cases}, {"+": head}, [5], seeds=0, progress=False)
    stage = pd.read_csv(tmp_path / "cna_neurons.csv")
    assert set(stage["case"]) == {c.case_id for c in cases}
    for k in (5, None):  # certified, exhaustive
        got = cnalens.cna(view, cases, intervention=ZeroHeads([head]), k=k).frame(5)
        assert got[["case", "rank", "layer", "neuron"]].equals(
            stage[["case", "rank", "layer", "neuron"]])
        assert got["imp_a"].to_numpy() == pytest.approx(stage["imp_a"].to_numpy(), rel=1e-9)


@pytest.mark.real
@pytest.mark.slow
def test_cna_equals_the_cna_stage_on_smollm2(smollm2, tmp_path):
    from cnalens.data.arithmetic import arithmetic_cases
    from cnalens.pipeline import cna_stage

    view, head = smollm2, (20, 2)
    cases = arithmetic_cases(["+"], (1,), ("eq",), n=8, seed=0)
    cna_stage(view, tmp_path, {"+": cases}, {"+": head}, [10], seeds=0, progress=False)
    stage = pd.read_csv(tmp_path / "cna_neurons.csv")
    ok = cnalens.evaluate(view, cases, progress=False)["correct"].tolist()
    kept = [c for c, good in zip(cases, ok, strict=True) if good]
    assert kept and set(stage["case"]) == {c.case_id for c in kept}
    comp = cnalens.cna(view, kept, intervention=ZeroHeads([head]), k=10)
    assert comp.meta["scoring"] == "certified"
    got = comp.frame()
    for cid in stage["case"].unique():
        s, g = stage[stage["case"] == cid], got[got["case"] == cid]
        assert s.layer.tolist() == g.layer.tolist(), cid
        assert s.neuron.tolist() == g.neuron.tolist(), cid
        assert s["imp_a"].to_numpy() == pytest.approx(g["imp_a"].to_numpy(), rel=1e-4,
                                                      abs=1e-6)
    exhaustive = cnalens.cna(view, kept, intervention=ZeroHeads([head]))
    assert exhaustive.frame(10)[["case", "layer", "neuron"]].equals(
        got[["case", "layer", "neuron"]])
