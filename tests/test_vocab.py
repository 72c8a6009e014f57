"""Vocabulary projection, attention-transformed projection and the zero-shot locator,
each against an independent computation (tiny float64 models of every family)."""

import json

import pandas as pd
import pytest
import torch

from cnalens.cli import main
from cnalens.data.arithmetic import arithmetic_cases
from cnalens.data.lexicon import concept_table
from cnalens.errors import CnaError
from cnalens.interventions import ZeroHeads
from cnalens.lens import neuron_vectors
from cnalens.locator import (
    ConceptCounter,
    LocatorSettings,
    locate,
    random_set,
    transform_layers,
)
from cnalens.models import ModelView
from cnalens.models.view import NO_NORM
from cnalens.stages.shallow import run_shallow
from cnalens.vocab import (
    case_scales,
    head_ov,
    mean_scales,
    project,
    read_neurons,
    transform,
)
from tiny import TinyTokenizer, tiny_model


def _tol(view):
    """Llama-style and Gemma RMS norms compute in float32 even in a float64 model."""
    return 1e-5 if view.family.norm_kind != "layer" else 1e-9


def _hand_final_logits(view, x):
    """Uncapped logits of residual states x through the REAL final norm, its bias and the
    unembedding bias removed (what the frozen lens at x's own scale must give)."""
    fn = view.final_norm
    normed = fn(x)
    if getattr(fn, "bias", None) is not None:
        normed = normed - fn.bias
    return normed @ view.unembed.weight.T


def _own_scale(view, fn, x):
    if fn is NO_NORM:  # no norm before the sublayer (OLMo-2): the identity, scale 1
        return torch.ones_like(x[..., 0])
    eps = getattr(fn, "eps", None) or getattr(fn, "variance_epsilon", 1e-6)
    if view.family.norm_kind == "layer":
        return torch.sqrt(x.var(-1, unbiased=False) + eps)
    return torch.sqrt(x.pow(2).mean(-1) + eps)


@torch.no_grad()
def test_projection_equals_hand_computation(tiny_view):
    view = tiny_view
    x = torch.randn(5, view.d_model, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    hand = _hand_final_logits(view, x)
    proj = project(view, x, scale=_own_scale(view, view.final_norm, x), k=7, vocab_block=9)
    top = hand.topk(7, -1)
    bot = hand.topk(7, -1, largest=False)
    assert torch.equal(proj.top_ids, top.indices) and torch.equal(proj.bottom_ids, bot.indices)
    torch.testing.assert_close(proj.top_vals, top.values, rtol=_tol(view), atol=_tol(view))
    torch.testing.assert_close(proj.bottom_vals, bot.values, rtol=_tol(view), atol=_tol(view))
    # the sign of a coefficient picks the side; unit scale ranks alike
    ids, vals = proj.side(torch.tensor([1, -1, 1, -1, 1]))
    assert torch.equal(ids[1], bot.indices[1]) and torch.equal(ids[0], top.indices[0])
    assert (vals[1] > 0).all()
    assert torch.equal(project(view, x, k=7).top_ids, proj.top_ids)


def _zero_attention_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and any(s in name for s in ("attn", "attention", "ln_1",
                                                                 "input_layernorm")):
                p.zero_()


@pytest.mark.parametrize("head", [None, 1])
def test_transform_equals_the_attention_layer(tiny_view, head):
    """A one-token prompt attends to itself with weight 1, so the layer's real attention
    output (other heads zeroed for one head) is the OV circuit of its input, with the real
    input-norm and post-attention-norm scales (biases zeroed: they are not the vector's)."""
    view = tiny_view
    _zero_attention_biases(view.model)
    layer = 1
    ivs = [] if head is None else [ZeroHeads([(layer, h) for h in range(view.n_heads)
                                              if h != head])]
    with torch.no_grad(), view.intervene(*ivs), \
            view.capture(["resid_pre", "attn_out", "z"], layers=[layer]) as c:
        view.hidden(view.batch([[7]]))
    x = c[("resid_pre", layer)][0]
    s_in = _own_scale(view, view.norm(layer, "ln_attn"), x)
    post = view.norm(layer, "ln_attn_post")
    s_post = None
    if post is not None:
        raw = view.module(layer, "o_proj")(c[("z", layer)][0])
        s_post = _own_scale(view, post, raw)
    got = transform(view, x, layer, head=head, scale=s_in, post_scale=s_post)
    torch.testing.assert_close(got, c[("attn_out", layer)][0], rtol=_tol(view), atol=_tol(view))


@torch.no_grad()
def test_transform_weighted_heads_is_the_weighted_sum(tiny_view):
    """``weights=`` equals the weighted sum of the single-head circuits (brute force)."""
    view, layer = tiny_view, 1
    v = torch.randn(3, view.d_model, dtype=view.compute_dtype)
    w = torch.rand(view.n_heads, dtype=view.compute_dtype)
    s_in, s_post = torch.tensor([1.3, 0.7, 2.0]), 0.9
    want = sum(w[h] * transform(view, v, layer, head=h, scale=s_in, post_scale=s_post)
               for h in range(view.n_heads))
    got = transform(view, v, layer, weights=w, scale=s_in, post_scale=s_post)
    torch.testing.assert_close(got, want, rtol=_tol(view), atol=_tol(view))
    with pytest.raises(CnaError, match="one weight per head"):
        transform(view, v, layer, head=0, weights=w)
    with pytest.raises(CnaError, match="one weight per head"):
        transform(view, v, layer, weights=w[:1])


@torch.no_grad()
def test_one_head_circuit_by_hand_gemma3():
    """Gemma 3 (GQA: 4 query heads, 2 KV heads; post-attention norm): the circuit written
    out from the raw weights, then projected."""
    view = ModelView(tiny_model("gemma3"), TinyTokenizer(), {"spec": "gemma3"})
    layer, head = 2, 3
    attn = view.layers[layer].self_attn
    hd = view.head_dim
    kv = head // (view.n_heads // view.n_kv_heads)
    assert kv == 1
    v = torch.randn(4, view.d_model, dtype=torch.float64)
    s_in, s_post = torch.tensor([1.3, 0.7, 2.0, 1.1]), 0.9
    g_in = 1 + view.layers[layer].input_layernorm.weight
    g_post = 1 + view.layers[layer].post_attention_layernorm.weight
    Wv = attn.v_proj.weight[kv * hd:(kv + 1) * hd]  # (hd, d)
    Wo = attn.o_proj.weight[:, head * hd:(head + 1) * hd]  # (d, hd)
    hand = ((v * g_in / s_in[:, None]) @ Wv.T @ Wo.T) * g_post / s_post
    got = transform(view, v, layer, head=head, scale=s_in, post_scale=s_post)
    torch.testing.assert_close(got, hand)
    g_f = 1 + view.final_norm.weight
    logits = (hand * g_f / 2.5) @ view.unembed.weight.T
    proj = project(view, got, scale=2.5, k=5)
    assert torch.equal(proj.top_ids, logits.topk(5, -1).indices)
    torch.testing.assert_close(proj.top_vals, logits.topk(5, -1).values)


@torch.no_grad()
def test_concept_counter_is_exact(tiny_view):
    """The bound-filtered counts equal brute-force counts, whatever the bound's subset."""
    view = tiny_view
    table = concept_table(view.tokenizer, view.vocab_size)
    X = torch.randn(64, view.d_model, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    full = X @ view.unembed.weight.T
    for k in (3, 10):
        brute = table.count(full.topk(k, -1).indices)
        for bound in (4, 20, 10_000):
            counts, cand, ids = ConceptCounter(view, table, k, bound).count(X)
            assert torch.equal(counts, brute)
            assert torch.equal(ids, full[cand].topk(k, -1).indices)
            assert (brute[~torch.isin(torch.arange(64), cand)] == 0).all()


@torch.no_grad()
def test_locator_matches_brute_force():
    view = ModelView(tiny_model("llama"), TinyTokenizer(), {"spec": "llama"})
    head_layer, k = 2, 8
    table = concept_table(view.tokenizer, view.vocab_size)
    for mode in ("all", "head"):
        for sign in ("pos", "both"):
            st = LocatorSettings(top_tokens=k, transforms=mode, sign=sign, null_per_layer=8,
                                 bound_tokens=10)
            loc = locate(view, head_layer, st, progress=False)
            for layer in (0, 1):
                V = neuron_vectors(view, layer)
                best = torch.zeros(V.shape[0], dtype=torch.long)
                for t in transform_layers(layer, head_layer, mode):
                    full = (transform(view, V, t) * view.final_norm.weight) \
                        @ view.unembed.weight.T
                    c = table.count(full.topk(k, -1).indices)
                    if sign == "both":
                        c = torch.maximum(c, table.count((-full).topk(k, -1).indices))
                    best = torch.maximum(best, c)
                got = loc.frame[loc.frame.layer == layer].matches.to_numpy()
                assert (torch.tensor(got) == best).all(), (mode, sign, layer)
    assert set(loc.null.layer) == {0, 1} and len(loc.null) == 16


def test_random_sets_keep_per_layer_counts():
    view = ModelView(tiny_model("llama"), TinyTokenizer(), {"spec": "llama"})
    units = [(0, 1), (0, 5), (0, 9), (2, 3)]
    gen = torch.Generator().manual_seed(0)
    sets = [random_set(view, units, gen) for _ in range(5)]
    for s in sets:
        assert sorted(layer for layer, _ in s) == [0, 0, 0, 2]
        assert len(set(s)) == 4 and all(0 <= n < view.ffn_width(ly) for ly, n in s)
    assert len({tuple(s) for s in sets}) > 1


def test_run_shallow_writes_files_and_report(tmp_path, one_thread):
    from cnalens.report import render_report

    view = ModelView(tiny_model("gemma3"), TinyTokenizer(), {"spec": "gemma3"})
    cases = arithmetic_cases(["+", "-"], (1,), ("eq",), n=3, seed=0)
    st = LocatorSettings(top_tokens=10, ms=(1, 2), seeds=2, null_per_layer=8)
    meta = run_shallow(view, tmp_path, (2, 1), 2, st, cases, progress=False)
    df = pd.read_csv(tmp_path / "shallow.csv")
    saved = json.loads((tmp_path / "shallow.json").read_text())
    assert saved["shallow_layers"] == [0, 1] and saved["n_shallow_neurons"] == 80
    assert [r["m"] for r in meta["sweep"]] == [1, 2]
    assert (df["matches"] >= 1).all() and set(df["layer"]) <= {0, 1}
    m1 = meta["sweep"][0]
    assert m1["n_neurons"] == len(df) and len(m1["random_drops"]) == 2
    assert all(len(json.loads(t)) == 10 for t in df["top_tokens"])
    # concept tokens listed are among the top tokens and as many as the matches
    for r in df.itertuples():
        assert len(json.loads(r.concepts)) == r.matches
    (tmp_path / "run.json").write_text(json.dumps({"stages": ["shallow"], "model": {}}))
    html = render_report(tmp_path).read_text()
    assert "Hidden-interpretable shallow neurons" in html


def test_scales_and_reading(one_thread):
    view = ModelView(tiny_model("gemma3"), TinyTokenizer(), {"spec": "gemma3"})
    cases = arithmetic_cases(["+"], (1,), ("eq",), n=3, seed=0)
    sc = case_scales(view, cases[0], position=-2)
    with torch.no_grad(), view.capture(["resid_pre"]) as c:
        view.hidden(view.batch([view.tokenizer(cases[0].prompt).input_ids]))
    x = c[("resid_pre", 1)][0, -2]
    torch.testing.assert_close(sc.attn_in[1], _own_scale(view, view.norm(1, "ln_attn"), x))
    mean = mean_scales(view, cases)
    assert mean.attn_in.shape == (view.n_layers,) and mean.attn_post is not None
    from cnalens.data.cases import encode

    df = read_neurons(view, [(0, 3), (1, 4)], case=encode(view.tokenizer, cases[0]),
                      transform_layers=[2], head=(2, 1), k=4)
    assert list(df["view"].unique()) == ["untransformed", "T@2", "T@2.1"]
    assert df["coef"].notna().all() and df["importance"].notna().all()
    assert all((r.side == "pos") == (r.coef >= 0) for r in df.itertuples())
    both = read_neurons(view, [(0, 3)], sign="both", k=4)
    assert list(both["side"]) == ["pos", "neg"] and both["coef"].isna().all()
    ov = head_ov(view, 2, 1, k=3)
    assert ov["inputs"].top_ids.shape[1] == 3 and len(ov["directions"]) == 3


@pytest.mark.real
@torch.no_grad()
def test_counter_exact_on_gemma(gemma, one_thread):
    """Real 262k vocabulary: the filtered counts of 48 transformed neurons equal brute force."""
    view = gemma
    table = concept_table(view.tokenizer, view.vocab_size)
    from cnalens.vocab import lens_vectors

    X = lens_vectors(view, transform(view, neuron_vectors(view, 3)[:48], 7))
    brute = table.count((X @ view.unembed.weight.T).topk(50, -1).indices)
    counts, _, _ = ConceptCounter(view, table, 50, 8192).count(X)
    assert torch.equal(counts, brute)


def _run(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, [x for x in err.splitlines() if x.strip()]


@pytest.mark.parametrize("argv, msg", [
    (["neuron", "--model", "smollm2-135m", "3.99999"], "out of range"),
    (["neuron", "--model", "smollm2-135m", "--head", "3.99"], "out of range"),
    (["neuron", "--model", "smollm2-135m"], "give FFN neurons"),
    (["neuron", "3.x"], "is not of the form"),
    (["shallow", "--model", "smollm2-135m"], "no --head"),
    (["shallow", "--head", "7.0", "--deep-from", "3"], "not both"),
    (["shallow", "--head", "7.0", "--sign", "up"], "'up' is not one of 'pos', 'neg', 'both'"),
    (["shallow", "--model", "smollm2-135m", "--head", "3.99"], "out of range"),
])
def test_cli_errors_one_line(capsys, tmp_path, argv, msg):
    out = tmp_path / "out"
    extra = ["--out", str(out)] if argv[0] == "shallow" else []
    rc, lines = _run(capsys, *argv, *extra)
    assert rc == 2 and len(lines) == 1 and msg in lines[0], lines
    assert not out.exists()


@pytest.mark.real
def test_cli_neuron_and_shallow_real(capsys, tmp_path):
    out = tmp_path / "n"
    rc = main(["neuron", "--model", "smollm2-135m", "28.541", "3.74", "--case", "1+2=",
               "--transform-layer", "13", "--head", "13.4", "--k", "5", "--out", str(out),
               "-q"])
    assert rc == 0, capsys.readouterr().err
    df = pd.read_csv(out / "neuron.csv")
    assert list(df["view"].unique()) == ["untransformed", "T@13", "T@13.4"]
    assert df["coef"].notna().all() and (df["target"].astype(str) == "3").all()
    rc = main(["neuron", "--model", "smollm2-135m", "--head", "13.4", "--out", str(out), "-q"])
    assert rc == 0 and (out / "head_ov.csv").is_file()
    sh = tmp_path / "s"
    rc = main(["shallow", "--model", "smollm2-135m", "--deep-from", "1", "--transforms",
               "head", "--n", "2", "--m", "1", "--seeds", "1", "--null", "8", "--out", str(sh),
               "-q"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((sh / "shallow.json").read_text())
    assert meta["shallow_layers"] == [0] and meta["n_cases"] == 4
    assert (sh / "report.html").is_file() and (sh / "shallow.csv").is_file()
