"""The four-stage chain (cnalens.explain): every measured effect against a brute-force run
with hand-written hooks, the route scores against a hand-written inner product, the CLI."""

import copy

import pytest
import torch

from cnalens.data.cases import Case, encode_prompt
from cnalens.explain import _adjoint, _plain_run, deep_key, deep_ranking, explain_case
from cnalens.models import ModelView
from cnalens.vocab import transform
from tiny import TinyTokenizer, tiny_model

CASE = Case("3+5=", "8", "1+2=3\n", {"op": "+"}, "add-3-5")
HEAD = (2, 1)


def _view(family):
    return ModelView(tiny_model(family), TinyTokenizer(), {"spec": family})


def _zero_hook(pos, idx):
    def hook(mod, args):
        x = args[0].clone()
        x[0, slice(None) if pos is None else pos, idx] = 0.0
        return (x,)
    return hook


def _brute(view, ids, target, zero, watch):
    """log p(target) and the watched neurons' coefficients (last position), with hand
    hooks zeroing ``zero`` = [(module, position or None, coordinates)]."""
    got = {}
    handles = [mod.register_forward_pre_hook(_zero_hook(pos, idx)) for mod, pos, idx in zero]
    for layer in sorted({la for la, _ in watch}):
        def rec(mod, args, layer=layer):
            got[layer] = args[0][0, -1].clone()
        handles.append(view.module(layer, "down_proj").register_forward_pre_hook(rec))
    try:
        with torch.no_grad():
            logits = view.model(torch.tensor([ids])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    m = torch.stack([got[la][n] for la, n in watch])
    return torch.log_softmax(logits.double(), -1)[target], m.double()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "phi3", "olmo2"])
def test_effects_equal_brute_force(family, one_thread):
    view = _view(family)
    ch = explain_case(view, CASE, HEAD, top=4, n_shallow=3)
    el = ch.elements
    ids = [1] + TinyTokenizer()(CASE.prompt, add_special_tokens=False).input_ids
    tgt, hd = ch.meta["target_id"], view.head_dim
    deep = [tuple(map(int, n.split("."))) for n in el[el.stage == "prediction enhancing"].name]
    base, m0 = _brute(view, ids, tgt, [], deep)
    assert abs(float(base) - ch.meta["logp"]) < 1e-9
    for row in el.itertuples():
        if row.kind == "ffn_neuron":
            zero = [(view.module(row.layer, "down_proj"),
                     None if row.stage == "prediction enhancing" else row.position, row.index)]
        elif row.kind == "head":
            zero = [(view.module(row.layer, "o_proj"), None,
                     torch.arange(row.index * hd, (row.index + 1) * hd))]
        else:  # a shallow attention layer at one position
            zero = [(view.module(row.layer, "o_proj"), row.position, slice(None))]
        lp, m = _brute(view, ids, tgt, zero, deep)
        assert abs(float(base - lp) - row.effect) < 1e-9, row.name
        if row.stage == "prediction enhancing":  # neurons of higher layers only
            up = torch.tensor([la > row.layer for la, _ in deep])
            if up.any():
                s0, s = (m0.abs() * up).sum(), (m.abs() * up).sum()
                assert abs(float((s0 - s) / s0) - row.coef_drop) < 1e-9
        else:
            s0, s = m0.abs().sum(), m.abs().sum()
            assert abs(float((s0 - s) / s0) - row.coef_drop) < 1e-9
    # a deep neuron removed by editing a copy of the weights instead of a hook
    la, n = deep[0]
    model = copy.deepcopy(view.model)
    w = ModelView(model, TinyTokenizer()).value_vectors(la)
    with torch.no_grad():
        w[n] = 0.0
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)[tgt]
    assert abs(float(base - lp) - el.iloc[0].effect) < 1e-9
    # enhancing links: relative drop of the upper neuron's |m| when the lower is zeroed
    for link in ch.links.itertuples():
        src = tuple(map(int, link.src.split(".")))
        j = deep.index(tuple(map(int, link.dst.split("."))))
        _, m = _brute(view, ids, tgt, [(view.module(src[0], "down_proj"), None, src[1])], deep)
        assert abs(float((m0[j].abs() - m[j].abs()) / m0[j].abs()) - link.drop) < 1e-9


def test_deep_ranking_equals_exhaustive(one_thread):
    """The chain's deep ranking (certified top-K through cna.compare_runs) is the top of an
    exhaustive scoring of both runs (run B with run A's target and scale)."""
    from cnalens.interventions import ZeroHeads
    from cnalens.scores import diff_frame, score_neurons

    view = _view("llama")
    enc = encode_prompt(view.tokenizer, CASE)
    tgt = enc.answer_ids[0]
    got = deep_ranking(view, enc, HEAD, tgt, 6)
    deep = list(range(HEAD[0], view.n_layers))
    a = score_neurons(view, [enc], target=[tgt], layers=deep, progress=False)
    b = score_neurons(view, [enc], ZeroHeads([HEAD]), target=a.target, scale=a.scale,
                      layers=deep, progress=False)
    want = diff_frame(a, b, top=6)
    assert got[["layer", "neuron"]].values.tolist() == want[["layer", "neuron"]].values.tolist()
    assert torch.allclose(torch.tensor(got["diff"].values), torch.tensor(want["diff"].values),
                          atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox", "phi3", "olmo2"])
def test_adjoint_is_the_transpose_of_transform(family):
    view = _view(family)
    ids = [1] + TinyTokenizer()(CASE.prompt, add_special_tokens=False).input_ids
    run = _plain_run(view, ids, 2)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, view.d_model, generator=g, dtype=torch.float64)
    y = torch.randn(view.d_model, generator=g, dtype=torch.float64)
    a = torch.rand(view.n_heads, generator=g, dtype=torch.float64)
    src, dst = 3, len(ids) - 1
    s_in = view.norm_affine(view.norm(1, "ln_attn"), run.cache[("resid_pre", 1)][src])[1]
    post = view.norm(1, "ln_attn_post")
    s_post = None
    if post is not None:
        raw = view.module(1, "o_proj")(run.cache[("z", 1)][dst])
        s_post = view.norm_affine(post, raw)[1]
    fwd = sum(a[h] * transform(view, u, 1, head=h, scale=s_in, post_scale=s_post)
              for h in range(view.n_heads))
    back = _adjoint(view, run, 1, y, a, src, dst)
    assert torch.allclose(fwd @ y, u @ back, atol=1e-10)


def _silu_grad(g):
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


@torch.no_grad()
def test_route_scores_equal_hand_inner_product(one_thread):
    """Llama by hand: the deep key from the gate/up rows and SiLU's derivative, each
    shallow neuron's score as the sum over its one-hop routes, the top ones chosen."""
    view = _view("llama")
    model = view.model.model
    ch = explain_case(view, CASE, HEAD, top=4, n_shallow=5)
    ids = [1] + TinyTokenizer()(CASE.prompt, add_special_tokens=False).input_ids
    Lh, h = HEAD
    grp = view.n_heads // view.n_kv_heads
    hd = view.head_dim
    pre, mid, coef = {}, {}, {}
    hooks = []
    for la, lay in enumerate(model.layers):
        hooks.append(lay.input_layernorm.register_forward_pre_hook(
            lambda m, a, la=la: pre.__setitem__(la, a[0][0].double())))
        hooks.append(lay.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, la=la: mid.__setitem__(la, a[0][0].double())))
        hooks.append(lay.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, la=la: coef.__setitem__(la, a[0][0].double())))
    with torch.no_grad(), view.attention_record() as rec:
        view.model(torch.tensor([ids]))
    for x in hooks:
        x.remove()

    def rms(x, eps):
        return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    # the deep key, by hand
    el = ch.elements
    deep = [tuple(map(int, n.split("."))) for n in el[el.stage == "prediction enhancing"].name]
    K = torch.zeros(view.d_model, dtype=torch.float64)
    for la, n in deep:
        mlp, ln = model.layers[la].mlp, model.layers[la].post_attention_layernorm
        x = mid[la][-1]
        scale = ln.weight.double() / rms(x, ln.variance_epsilon)
        xn = x * scale
        wg, wu = mlp.gate_proj.weight[n].double(), mlp.up_proj.weight[n].double()
        g, u = wg @ xn, wu @ xn
        m = torch.nn.functional.silu(g) * u
        K += torch.sign(m) * scale * (_silu_grad(g) * u * wg + torch.nn.functional.silu(g) * wu)
    coef_a = torch.tensor(el[el.stage == "prediction enhancing"].coef.values)
    resid_in = {la: mid[la][-1] for la, _ in deep}
    with torch.enable_grad():
        assert torch.allclose(deep_key(view, resid_in, deep, coef_a), K, atol=1e-10)

    def ov(layer, head, x, pos):  # one head's OV at ``layer``, input norm frozen at ``pos``
        ln = model.layers[layer].input_layernorm
        xn = x * ln.weight.double() / rms(pre[layer][pos], ln.variance_epsilon)
        att = model.layers[layer].self_attn
        wv = att.v_proj.weight.double()[(head // grp) * hd:(head // grp + 1) * hd]
        wo = att.o_proj.weight.double()[:, head * hd:(head + 1) * hd]
        return xn @ wv.T @ wo.T

    p = ch.meta["head_source_position"]
    a_head = rec[Lh][0][0, h, -1, p].double()
    start = ch.meta["question_start"]
    best = []
    for la in range(Lh):
        W = view.value_vectors(la).double()
        for q in range(start, p + 1):
            u = coef[la][q][:, None] * W
            total = ov(Lh, h, u, p) * a_head @ K if q == p else torch.zeros(len(u),
                                                                            dtype=torch.float64)
            for t in range(la + 1, Lh):
                moved = sum(rec[t][0][0, hh, p, q].double() * ov(t, hh, u, q)
                            for hh in range(view.n_heads))
                total = total + ov(Lh, h, moved, p) * a_head @ K
            best += [(float(s), la, n, q) for n, s in enumerate(total)]
    best.sort(reverse=True)
    sh = el[el.stage == "feature enhancing"]
    assert [(r.layer, r.index, r.position) for r in sh.itertuples()] == \
        [(la, n, q) for _, la, n, q in best[:5]]
    assert torch.allclose(torch.tensor(sh.score.values),
                          torch.tensor([b[0] for b in best[:5]], dtype=torch.float64), atol=1e-10)


def test_report_section_renders_cases(tmp_path, one_thread):
    from cnalens.io import write_json
    from cnalens.report import render_report
    from cnalens.stages.explain import write_explain

    view = _view("gemma3")
    chains = [explain_case(view, CASE, HEAD, top=3, n_shallow=2),
              explain_case(view, Case("7-2=", "5", "9-1=8\n", {"op": "-"}, "sub-7-2"), HEAD,
                           top=3, n_shallow=2)]
    write_json(tmp_path / "run.json", {"stages": ["explain"], "model": view.summary()})
    write_explain(tmp_path, chains[:1], view, {}, 1.0)
    write_explain(tmp_path, chains[1:], view, {}, 1.0, merge=True)
    df = __import__("pandas").read_csv(tmp_path / "explain.csv")
    assert list(df.case.unique()) == ["add-3-5", "sub-7-2"] and len(df) == sum(
        len(c.elements) for c in chains)
    page = render_report(tmp_path, strict=True).read_text()
    for text in ("Feature enhancing", "Feature transferring", "Feature predicting",
                 "Prediction enhancing", "3+5=", "7-2=", "zeroed: log p"):
        assert text in page


def _cli(capsys, *argv):
    from cnalens.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("extra, msg", [
    ([], "no --head"),
    (["--head", "x"], "not of the form L.H"),
    (["--head", "99.0"], "out of range"),
    (["--head", "3.0", "--target", "eighty eight"], "give one token"),
    (["--head", "3.0", "--top", "0"], "--top must be at least 1"),
])
def test_cli_errors_one_line(capsys, tmp_path, extra, msg):
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "explain", "3+5=", "--model", "smollm2-135m", "--out", str(out),
                      "-q", *extra)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and msg in lines[0], err
    assert not out.exists()


def test_case_from_prompt():
    from cnalens.data.arithmetic import case_from_prompt

    c = case_from_prompt("3+5=")
    assert c.question == "3+5=" and c.target == "8" and c.prefix.count("\n") == 3
    assert case_from_prompt("3+5=", shots=0).prefix == ""
    assert case_from_prompt("The capital of France is").target == ""


@pytest.mark.real
def test_real_gemma_cli(capsys, tmp_path, gemma, monkeypatch):
    """One real case end to end: 3+5= -> 8 with head 7.0; the head's measured effect
    equals an independent evaluation with the head zeroed."""
    import cnalens.commands.reading as reading
    from cnalens.data.arithmetic import case_from_prompt
    from cnalens.data.cases import encode_all
    from cnalens.evaluate import evaluate
    from cnalens.interventions import ZeroHeads

    monkeypatch.setattr(reading, "load_view", lambda *a, **k: gemma)  # no second load
    rc, out, err = _cli(capsys, "explain", "3+5=", "--model", "gemma3-270m", "--head", "7.0",
                        "--top", "3", "--out", str(tmp_path), "-q")
    assert rc == 0, err
    df = __import__("pandas").read_csv(tmp_path / "explain.csv")
    assert set(df.stage) == {"feature enhancing", "feature transferring", "feature predicting",
                             "prediction enhancing"}
    assert (df.target.astype(str) == "8").all() and (tmp_path / "report.html").is_file()
    enc = encode_all(gemma.tokenizer, [case_from_prompt("3+5=")])
    base = evaluate(gemma, enc, progress=False).logp[0]
    zeroed = evaluate(gemma, enc, ZeroHeads([(7, 0)]), progress=False).logp[0]
    head = df[df.kind == "head"].iloc[0]
    assert abs((base - zeroed) - head.effect) < 2e-3 and head.effect > 0.5


def test_view_ffn_module(tiny_view):
    """ModelView.ffn_module: the down projection's parent; run on the FFN's recorded input
    it gives the FFN's recorded output, and its down projection's input is ``coef``."""
    view = tiny_view
    mod = view.ffn_module(1)
    assert any(c is view.module(1, "down_proj") for c in mod.children())
    got = {}
    h = mod.register_forward_hook(lambda m, a, out: got.update(x=a[0], y=out))
    try:
        with torch.no_grad(), view.capture(["coef"], [1]) as cache:
            view.model(torch.tensor([[1, 5, 9, 4, 7]]))
    finally:
        h.remove()
    seen = {}
    with torch.no_grad(), view.edit("coef", 1, lambda m: seen.setdefault("m", m)):
        y = mod(got["x"])
    assert torch.allclose(y, got["y"], atol=1e-12)
    assert torch.allclose(seen["m"], cache[("coef", 1)], atol=1e-12)


def test_pick_case_says_why(monkeypatch):
    """The paper's example when the model answers it; otherwise the true reason."""
    import pandas as pd

    import cnalens.stages.explain as ev
    from cnalens.data.arithmetic import arithmetic_cases
    from cnalens.stages.explain import pick_case

    view = ModelView(tiny_model("llama"), TinyTokenizer())
    wrong: set[str] = set()

    def fake(view, enc, *a, **k):  # the model answers every case but those in ``wrong``
        q = [e.case.question for e in enc]
        return pd.DataFrame({"correct": [x not in wrong for x in q],
                             "pred": ["1" if x in wrong else "?" for x in q]})

    monkeypatch.setattr(ev, "evaluate", fake)
    case, why = pick_case(view, "+")
    assert case.question == "3+5=" and why == "3+5=, the paper's example"
    wrong.add("3+5=")
    case, why = pick_case(view, "+")
    assert case.question != "3+5=" and "the model answers 3+5= wrongly ('1')" in why
    assert why.startswith(f"{case.question} instead of 3+5=")
    wrong.update(c.question for c in arithmetic_cases(["+"], (1,), ("eq",)))
    case, why = pick_case(view, "+")
    assert case is None and why.endswith("no other correctly answered one-token case "
                                         "among 16 tried")
    # 8/2 is a few-shot example of the "/" prompt, so it is never asked
    div = arithmetic_cases(["/"], (1,), ("eq",))
    assert "8/2=" in div[0].prefix and all(c.question != "8/2=" for c in div)
    case, why = pick_case(view, "/")
    assert "8/2 is one of the prompt's few-shot examples" in why and case is not None
