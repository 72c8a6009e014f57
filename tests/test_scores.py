"""Importance and coefficient scores: brute force on tiny float64 models, certified top-K."""

import numpy as np
import pytest
import torch
from torch import nn

from cnalens import certified as CE
from cnalens import scores as S
from cnalens import states as ST
from cnalens.cna import cna as cnalens_cna
from cnalens.data.cases import Case, Encoded
from cnalens.errors import CnaError
from cnalens.interventions import ZeroHeads
from cnalens.models import ModelView
from tiny import TinyTokenizer, tiny_model

FAMILIES = ["llama", "gemma3", "gpt2", "gemma2", "neox", "gptj", "phi3", "olmo2"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]  # tests/test_moe.py: by hand
# equal lengths: Gemma 2's eager attention gives NaN on left-pad rows in float64
SEQS = [[1, 5, 9, 13, 7, 22], [1, 40, 3, 3, 17, 9], [1, 8, 8, 30, 31, 4]]


def _pair(v, cases, ivb, **kw):
    """CNA's two runs scored exhaustively: A with its own target and scale, B with A's."""
    a = S.score_neurons(v, cases, **kw)
    rest = {k: x for k, x in kw.items() if k not in ("target", "scale")}
    return a, S.score_neurons(v, cases, *ivb, target=a.target, scale=a.scale, **rest)


def _certified_diff(v, cases, k, ivb, *, by="decrease", layers=None, step=64):
    """``certified.certified_cna`` of the model and the model under ``ivb``."""
    sa, sb = ST.case_states(v, cases), ST.case_states(v, cases, *ivb)
    return CE.certified_cna(v, sa, sb, k, by=by, layers=layers, step=step)


def _input_diff(v, ca, cb, k, *, target="gold", layers=None, screen=256):
    """An input comparison's top-K: certified exact (``screen=0``) or screened."""
    if len(ca) != len(cb):
        raise CnaError(f"{len(ca)} run-A prompts but {len(cb)} run-B prompts: an input "
                       "comparison pairs them one to one")
    sa, sb = ST.case_states(v, ca), ST.case_states(v, cb)
    if screen == 0 and not v.softcap:
        return CE.certified_cna(v, sa, sb, k, target=target, layers=layers, own_scales=True)
    return CE.screened_cna(v, sa, sb, k, target=target, layers=layers, screen=screen)


def _enc(seqs=SEQS):
    return [Encoded(Case(f"q{i}", "t", case_id=f"c{i}"), tuple(s), (5 + i,))
            for i, s in enumerate(seqs)]


def _view(name):
    return ModelView(tiny_model(name), TinyTokenizer(), {"spec": name})


def _tol(view, lens):
    # Gemma's norms compute in float32 even in a float64 model (the real module: renorm)
    return 1e-5 if (view.family.norm_kind == "rms1p" and lens == "renorm") else 1e-6


def _logp(view, x, final, w, lens):
    """Literally: final norm (frozen at the real final residual, or the real module),
    unembedding and soft-capping, then the target's log-probability."""
    h = view.frozen_norm(view.final_norm, x, final) if lens == "frozen" else view.final_norm(x)
    return torch.log_softmax(view.logits(h), -1)[..., w]


def _ffn_parts(view, st, i, layer):
    """Each neuron's contribution m_k v'_k (rows) and the bias part, from the captures."""
    coef = st.coef[i, layer, :view.ffn_width(layer)]
    parts = coef[:, None] * view.value_vectors(layer)
    bias = view.down_bias(layer)
    bias = torch.zeros(view.d_model, dtype=parts.dtype) if bias is None else bias
    post = view.norm(layer, "ln_ffn_post")
    if post is not None:
        raw = view.module(layer, "down_proj")(coef)
        parts = view.frozen_norm(post, parts, raw, bias=False)
        bias = view.frozen_norm(post, bias, raw, bias=False)
    return parts, bias


def _head_parts(view, st, i, layer):
    z = st.z[i, layer]
    zh = z.reshape(view.n_heads, view.head_dim)
    wo = view.o_proj_by_head(layer)
    heads = torch.einsum("hj,hdj->hd", zh, wo)
    cols = z[:, None] * wo.permute(0, 2, 1).reshape(-1, view.d_model)  # attention neurons
    bias = view.o_proj_bias(layer)
    bias = torch.zeros(view.d_model, dtype=heads.dtype) if bias is None else bias
    post = view.norm(layer, "ln_attn_post")
    if post is not None:
        raw = view.module(layer, "o_proj")(z)
        heads = view.frozen_norm(post, heads, raw, bias=False)
        cols = view.frozen_norm(post, cols, raw, bias=False)
        bias = view.frozen_norm(post, bias, raw, bias=False)
    return heads, cols, bias


@pytest.mark.parametrize("lens", ["frozen", "renorm"])
@pytest.mark.parametrize("family", FAMILIES + MOE)
def test_neuron_importance_brute_force(family, lens):
    """Mixtures of experts: a neuron's part is its router weight x coefficient x value
    vector; those of experts a case was not routed to are exactly 0 and not scored (NaN)."""
    v = _view(family)
    enc = _enc()
    sc = S.score_neurons(v, enc, lens=lens, progress=False)
    st = ST.case_states(v, enc)
    torch.manual_seed(1)
    with torch.no_grad():
        for i in range(len(enc)):
            w = int(sc.target[i])
            assert w == int(st.logits[i].argmax())
            for layer in range(v.n_layers):
                parts, _ = _ffn_parts(v, st, i, layer)
                ks = torch.randperm(v.ffn_width(layer))[:6 if v.layout(layer) is None else 24]
                s0 = st.resid_mid[i, layer]
                ref = (_logp(v, s0 + parts[ks], st.final[i], w, lens)
                       - _logp(v, s0, st.final[i], w, lens))
                got = sc.imp[i, layer, ks]
                off = (parts[ks] == 0).all(-1) & (v.layout(layer) is not None)
                assert torch.equal(torch.isnan(got), off)
                assert torch.allclose(got[~off], ref[~off], atol=_tol(v, lens), rtol=1e-6), (
                    layer, got, ref)
                assert torch.equal(sc.coef[i, layer, ks], st.coef[i, layer, ks])


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_contributions_reconstruct_final_residual(family):
    """resid_mid[l] + sum of neuron parts + bias part + everything later = real final."""
    v = _view(family)
    st = ST.case_states(v, _enc())
    tol = 1e-5 if v.family.norm_kind == "rms1p" else 1e-9
    with torch.no_grad(), v.capture(["attn_out", "mlp_out"], position=-1) as cap:
        v.hidden(v.batch(SEQS))
        for i in range(len(SEQS)):
            for layer in range(v.n_layers):
                parts, bias = _ffn_parts(v, st, i, layer)
                heads, cols, hbias = _head_parts(v, st, i, layer)
                assert torch.allclose(heads.sum(0), cols.sum(0), atol=tol)
                attn = heads.sum(0) + hbias
                assert torch.allclose(attn, cap[("attn_out", layer)][i, 0], atol=tol)
                total = st.resid_mid[i, layer] + parts.sum(0) + bias
                for later in range(layer + 1, v.n_layers):
                    total = (total + cap[("attn_out", later)][i, 0]
                             + cap[("mlp_out", later)][i, 0])
                assert torch.allclose(total, st.final[i], atol=tol)
            # the lens at the real final residual gives the model's own logits
            real = v.logits(v.frozen_norm(v.final_norm, st.final[i], st.final[i]))
            assert torch.allclose(real.float(), st.logits[i], atol=1e-4)


@pytest.mark.parametrize("lens", ["frozen", "renorm"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gemma2"])
def test_head_and_attention_neuron_importance(family, lens):
    v = _view(family)
    enc = _enc()
    df = S.score_heads(v, enc, lens=lens, progress=False)
    st = ST.case_states(v, enc)
    assert set(df.kind) == {"head", "attn_neuron"}
    assert len(df) == len(enc) * v.n_layers * v.n_heads * (1 + v.head_dim)
    with torch.no_grad():
        for i, cid in enumerate(st.case_ids):
            w = int(st.pred[i])
            for layer in range(v.n_layers):
                heads, cols, _ = _head_parts(v, st, i, layer)
                s0 = st.resid_pre[i, layer]
                base = _logp(v, s0, st.final[i], w, lens)
                sub = df[(df.case == cid) & (df.layer == layer)]
                h = sub[sub.kind == "head"].sort_values("index")
                ref = _logp(v, s0 + heads, st.final[i], w, lens) - base
                np.testing.assert_allclose(h.importance, ref.numpy(), atol=_tol(v, lens))
                n = sub[sub.kind == "attn_neuron"].sort_values("index")
                ref = _logp(v, s0 + cols, st.final[i], w, lens) - base
                np.testing.assert_allclose(n.importance, ref.numpy(), atol=_tol(v, lens))
                np.testing.assert_allclose(n.coef, st.z[i, layer].numpy())
                assert (n["head"].values == n["index"].values // v.head_dim).all()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_position_scores_split_each_head(family):
    v = _view(family)
    enc = _enc()[1]
    before = v.model.config._attn_implementation
    df = S.position_scores(v, enc)
    assert v.model.config._attn_implementation == before
    with v.attention_record() as rec:  # eager softmax runs in float32: use its own states
        st = ST.case_states(v, [enc])
    w = int(st.pred[0])
    k = len(enc.prompt_ids)
    assert len(df) == v.n_layers * v.n_heads * k and df.importance.notna().all()
    assert (df.token.values[:k] == np.asarray(enc.prompt_ids)).all()
    heads_df = S.score_heads(v, [enc], attn_neurons=False, progress=False)
    with torch.no_grad():
        for layer in range(v.n_layers):
            weights, values = rec[layer]
            groups = v.n_heads // v.n_kv_heads
            heads, _, _ = _head_parts(v, st, 0, layer)
            s0 = st.resid_pre[0, layer]
            for h in range(v.n_heads):
                parts = weights[0, h, -1][:, None] * values[0, h // groups]  # (k, hd)
                assert torch.allclose(parts.sum(0), st.z[0, layer].reshape(v.n_heads, -1)[h],
                                      atol=1e-9)
                u = parts @ v.o_proj_by_head(layer)[h].T
                post = v.norm(layer, "ln_attn_post")
                if post is not None:
                    raw = v.module(layer, "o_proj")(st.z[0, layer])
                    u = v.frozen_norm(post, u, raw, bias=False)
                assert torch.allclose(u.sum(0), heads[h], atol=1e-9)
                ref = (_logp(v, s0 + u, st.final[0], w, "frozen")
                       - _logp(v, s0, st.final[0], w, "frozen"))
                sub = df[(df.layer == layer) & (df["head"] == h)].sort_values("index")
                np.testing.assert_allclose(sub.importance, ref.numpy(), atol=1e-6)
                np.testing.assert_allclose(sub.coef.sum(), 1.0, atol=1e-6)  # float32 softmax
            one = heads_df[heads_df.layer == layer].sort_values("head")
            assert len(one) == v.n_heads


def _same_topk(ex, got, scores, tie=1e-9):
    """Equal unit lists, allowing swaps only between scores within ``tie`` (near ties)."""
    a = list(zip(ex.case, ex.layer, ex["neuron"], strict=True))
    b = list(zip(got.case, got.layer, got["neuron"], strict=True))
    if a == b:
        return True
    diff = set(a) ^ set(b)
    vals = [scores[k] for k in diff]
    return max(vals) - min(vals) < tie


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_certified_topk_equals_exhaustive(family):
    v = _view(family)
    enc = _enc()
    sc = S.score_neurons(v, enc, progress=False)
    for k in (1, 5, 20, 200):
        got, stats = CE.certified_topk(v, enc, k, step=4)
        ex = sc.frame(top=k)
        assert list(zip(ex.case, ex.layer, ex["neuron"], strict=True)) == \
            list(zip(got.case, got.layer, got["neuron"], strict=True)), k
        np.testing.assert_allclose(got.importance, ex.importance, atol=1e-9)
        np.testing.assert_allclose(got.coef, ex.coef)
        assert stats["method"] == "certified" and len(stats["n_exact"]) == len(enc)
        assert all(min(k, stats["n_units"]) <= n <= stats["n_units"] for n in stats["n_exact"])
    _, stats = CE.certified_topk(v, enc, 1, step=1)
    assert sum(stats["n_exact"]) < stats["n_units"] * len(enc)  # not every neuron needed


@pytest.mark.parametrize("rank", ["decrease", "increase", "abs"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_certified_diff_equals_exhaustive(family, rank):
    v = _view(family)
    enc = _enc()
    ivb = (ZeroHeads([(0, 1), (1, 2)]),)
    a, b = _pair(v, enc, ivb, progress=False)
    assert torch.equal(a.target, b.target) and torch.equal(a.scale, b.scale)
    for k in (1, 7, 50):
        got, stats = _certified_diff(v, enc, k, ivb, by=rank, step=4)
        ex = S.diff_frame(a, b, top=k, by=rank)
        assert list(zip(ex.case, ex.layer, ex.neuron, strict=True)) == \
            list(zip(got.case, got.layer, got.neuron, strict=True)), (k, rank)
        for col in ("imp_a", "imp_b", "diff", "coef_a", "coef_b"):
            np.testing.assert_allclose(got[col], ex[col], atol=1e-6)
        assert stats["n_exact_total"] >= k * len(enc)


# run B of an input comparison: other prompts of the same length (no padding: Gemma 2)
SEQS_B = [[1, 6, 9, 14, 7, 22], [1, 41, 3, 2, 17, 9], [1, 8, 12, 30, 33, 4]]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gemma2", "neox", "qwen3"])
def test_input_topk_diff_equals_exhaustive(family):
    """Input comparison: brute force = exhaustive score_neurons of each prompt on run A's
    target, each run at its own frozen scale, ranked by diff_frame."""
    v = _view(family)
    ea, eb = _enc(), _enc(SEQS_B)
    tg = torch.tensor([e.answer_ids[0] for e in ea])
    a = S.score_neurons(v, ea, target=tg, progress=False)
    b = S.score_neurons(v, eb, target=tg, progress=False)
    assert not torch.allclose(a.scale, b.scale)  # the runs' own scales differ
    shared = S.score_neurons(v, eb, target=tg, scale=a.scale, progress=False)
    assert not torch.allclose(shared.imp, b.imp)  # so A's scale would give other scores
    full = S.diff_frame(a, b).set_index(["case", "layer", "neuron"])
    for k in (1, 9, 120):
        ref = S.diff_frame(a, b, top=k)
        got, stats = _input_diff(v, ea, eb, k, screen=0)
        assert stats["method"] == ("exhaustive" if v.softcap else "certified")
        assert list(zip(got.case, got["rank"], got.layer, got.neuron, strict=True)) == \
            list(zip(ref.case, ref["rank"], ref.layer, ref.neuron, strict=True)), k
        for col in ("imp_a", "imp_b", "coef_a", "coef_b", "diff"):
            np.testing.assert_allclose(got[col], ref[col], atol=1e-9, rtol=0)
        if k > 40:
            continue
        # screened (a heuristic, not certified): the kept neurons' scores stay exact and
        # ranked, the first-order screen finds most of the true top-k
        got, stats = _input_diff(v, ea, eb, k, screen=40)
        assert stats["method"] == "screened" and stats["screen"] == max(k, 40)
        want = full.loc[list(zip(got.case, got.layer, got.neuron, strict=True))]
        for col in ("imp_a", "imp_b", "coef_a", "coef_b", "diff"):
            np.testing.assert_allclose(got[col], want[col], atol=1e-9, rtol=0)
        assert (got.groupby("case")["diff"].diff().dropna() <= 0).all()
        units = [set(zip(f.case, f.layer, f.neuron, strict=True)) for f in (got, ref)]
        hit = len(units[0] & units[1])
        assert hit >= 0.5 * len(ref), (k, hit)
    got, _ = _input_diff(v, ea, eb, 5, layers=[1, 2], screen=0)
    a2 = S.score_neurons(v, ea, target=tg, layers=[1, 2], progress=False)
    b2 = S.score_neurons(v, eb, target=tg, layers=[1, 2], progress=False)
    ref = S.diff_frame(a2, b2, top=5)
    assert list(zip(got.layer, got.neuron, strict=True)) == \
        list(zip(ref.layer, ref.neuron, strict=True)) and set(got.layer) <= {1, 2}
    ids = torch.tensor([3, 4, 9])  # explicit shared target ids
    got, _ = _input_diff(v, ea, eb, 4, target=ids, screen=0)
    ref = S.diff_frame(S.score_neurons(v, ea, target=ids, progress=False),
                       S.score_neurons(v, eb, target=ids, progress=False), top=4)
    np.testing.assert_allclose(got["diff"], ref["diff"], atol=1e-9, rtol=0)


def test_input_comparison_errors():
    """The public entry point's checks (cna.compare_inputs), before any scoring."""
    from cnalens.cna import compare_inputs

    v = _view("llama")
    ea, eb = _enc(), _enc(SEQS_B)
    with pytest.raises(CnaError, match="3 run-A prompts but 2 run-B"):
        compare_inputs(v, ea, eb[:2], k=3)
    with pytest.raises(CnaError, match="k must be at least 1"):
        cnalens_cna(v, ea, eb, k=0)
    for screen in (None, 9):  # certified and screened say the same
        with pytest.raises(CnaError, match="top-K 41 exceeds the 40 neurons"):
            compare_inputs(v, ea, eb, k=41, layers=[2], screen=screen)
    with pytest.raises(CnaError, match="out of range"):
        compare_inputs(v, ea, eb, k=3, target=999)
    with pytest.raises(CnaError, match="screen= needs k="):
        compare_inputs(v, ea, eb, screen=9)
    with pytest.raises(CnaError, match="screen= needs the frozen lens"):
        compare_inputs(v, ea, eb, k=3, screen=9, lens="renorm")
    with pytest.raises(CnaError, match="repeats"):
        compare_inputs(v, [ea[0], ea[0]], eb[:2], k=3)
    mixed = [ea[0], Encoded(ea[1].case, ea[1].prompt_ids, ())]
    with pytest.raises(CnaError, match="some run-A cases have a target"):
        compare_inputs(v, mixed, eb[:2], k=3)


def test_rank_order_ties_by_layer_then_neuron():
    key = torch.tensor([[1.0, 3.0, float("nan"), 3.0, -2.0, 3.0]])
    assert S.rank_order(key).tolist() == [[1, 3, 5, 0, 4, 2]]
    assert S.rank_order(S.rank_key(key, "abs")).tolist() == [[1, 3, 5, 4, 0, 2]]
    with pytest.raises(CnaError, match="unknown rank"):
        S.rank_key(key, "up")


def test_run_b_uses_a_target_and_scale():
    v = _view("llama")
    enc = _enc()
    ivb = (ZeroHeads([(2, 0), (2, 1), (2, 3)]),)
    a, b = _pair(v, enc, ivb, progress=False)
    own = S.score_neurons(v, enc, *ivb, progress=False)
    assert not torch.equal(own.scale, b.scale)
    assert b.meta["interventions"][0]["kind"] == "zero_heads"
    # layers below the zeroed heads have the same states: scores differ only by the scale
    assert not torch.allclose(own.imp[:, 0], b.imp[:, 0])


def test_softcap_falls_back_to_exhaustive():
    v = _view("gemma2")
    enc = _enc()
    got, stats = CE.certified_topk(v, enc, 5)
    assert stats["method"] == "exhaustive"
    ex = S.score_neurons(v, enc, progress=False).frame(top=5)
    assert list(got["neuron"]) == list(ex["neuron"])
    # a difference on a soft-capped model: exhaustive too, the same top-K as brute force
    ivb = (ZeroHeads([(0, 0)]),)
    got, stats = _certified_diff(v, enc, 5, ivb)
    assert stats["method"] == "exhaustive" and stats["why"] == "final-logit soft-capping"
    a, b = _pair(v, enc, ivb, progress=False)
    ref = S.diff_frame(a, b, top=5)
    assert list(zip(got.layer, got.neuron, strict=True)) == \
        list(zip(ref.layer, ref.neuron, strict=True))


def test_gold_and_explicit_targets_and_frame():
    v = _view("gpt2")
    enc = _enc()
    g = S.score_neurons(v, enc, target="gold", layers=[2], progress=False)
    assert g.target.tolist() == [5, 6, 7]
    e = S.score_neurons(v, enc, target=torch.tensor([5, 6, 7]), layers=[2], progress=False)
    assert torch.equal(g.imp.nan_to_num(), e.imp.nan_to_num())
    assert torch.isnan(g.imp[:, :2]).all() and g.meta["layers"] == [2]
    df = g.frame()
    assert list(df.columns) == ["case", "layer", "kind", "neuron", "coef", "importance"]
    assert len(df) == 3 * v.ffn_width(2) and (df.layer == 2).all()
    top = g.frame(top=3)
    assert (top.groupby("case").size() == 3).all()
    assert (top.groupby("case").importance.apply(lambda s: s.is_monotonic_decreasing)).all()


def test_errors():
    v = _view("llama")
    enc = _enc()
    with pytest.raises(CnaError, match="out of range"):
        S.score_neurons(v, enc, target=torch.tensor([999, 1, 2]), progress=False)
    with pytest.raises(CnaError, match="layer 9 out of range"):
        S.score_neurons(v, enc, layers=[9], progress=False)
    with pytest.raises(CnaError, match="unknown lens"):
        S.score_neurons(v, enc, lens="nope", progress=False)
    with pytest.raises(CnaError, match="unknown target"):
        S.score_neurons(v, enc, target="best", progress=False)
    with pytest.raises(CnaError, match="2 target ids for 3 cases"):
        S.score_neurons(v, enc, target=[1, 2], progress=False)
    with pytest.raises(CnaError, match="finite and positive"):
        S.score_neurons(v, enc, scale=torch.tensor([1.0, float("nan"), 1.0]), progress=False)
    with pytest.raises(CnaError, match="no cases"):
        S.score_neurons(v, [], progress=False)
    with pytest.raises(CnaError, match="k must be at least 1"):
        CE.certified_topk(v, enc, 0)
    with pytest.raises(CnaError, match="unknown rank"):
        _certified_diff(v, enc, 3, (), by="up")
    with pytest.raises(CnaError, match="one case"):
        S.position_scores(v, enc)


def test_narrow_layer_gives_nan():
    """A pruned (narrower) FFN layer: its missing neurons are NaN and leave the frame."""
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    keep = torch.arange(30)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, 30, bias=False, dtype=old.weight.dtype)
        new.weight.data = old.weight.data[keep].clone()
        setattr(mlp, name, new)
    old = mlp.down_proj
    new = nn.Linear(30, old.out_features, bias=False, dtype=old.weight.dtype)
    new.weight.data = old.weight.data[:, keep].clone()
    mlp.down_proj = new
    v = ModelView(model, TinyTokenizer())
    assert v.ffn_widths == [40, 30, 40]
    sc = S.score_neurons(v, _enc(), progress=False)
    assert torch.isnan(sc.imp[:, 1, 30:]).all() and torch.isnan(sc.coef[:, 1, 30:]).all()
    assert torch.isfinite(sc.imp[:, 1, :30]).all() and torch.isfinite(sc.imp[:, 0]).all()
    assert len(sc.frame()) == 3 * 110
    got, _ = CE.certified_topk(v, _enc(), 100)
    ex = sc.frame(top=100)
    assert list(zip(got.layer, got["neuron"], strict=True)) == \
        list(zip(ex.layer, ex["neuron"], strict=True))


# ----------------------------------------------------------------------------- real models
REAL_LAYERS = [16, 17]


def _real_case():
    from cnalens.data.arithmetic import format_prefix

    return Case("3+5=", "8", format_prefix("+", "eq", [(2, 4), (1, 6), (4, 3)]), case_id="3+5")


@pytest.mark.real
def test_real_gemma_brute_force(gemma):
    v = gemma
    case = _real_case()
    st = ST.case_states(v, [case])
    torch.manual_seed(0)
    for lens in ("frozen", "renorm"):
        sc = S.score_neurons(v, [case], lens=lens, layers=[17], progress=False)
        w = int(sc.target[0])
        parts, _ = _ffn_parts(v, st, 0, 17)
        ks = torch.randperm(v.ffn_width(17))[:8]
        s0 = st.resid_mid[0, 17]
        with torch.no_grad():
            ref = (_logp(v, s0 + parts[ks], st.final[0], w, lens)
                   - _logp(v, s0, st.final[0], w, lens))
        assert torch.allclose(sc.imp[0, 17, ks], ref, atol=1e-4), lens


@pytest.mark.real
@pytest.mark.slow
def test_real_gemma_certified_equals_exhaustive(gemma):
    v = gemma
    case = _real_case()
    sc = S.score_neurons(v, [case], layers=REAL_LAYERS, progress=False)
    scores = {("3+5", la, ix): s for la, ix, s in zip(
              *[x.ravel() for x in np.indices(sc.imp.shape[1:])], sc.imp[0].numpy().ravel(),
                  strict=True)}
    for k in (1, 10, 50):
        got, stats = CE.certified_topk(v, [case], k, layers=REAL_LAYERS)
        assert _same_topk(sc.frame(top=k), got, scores, tie=1e-4), k
        assert stats["n_exact"][0] < stats["n_units"]


@pytest.mark.real
@pytest.mark.slow
def test_real_gemma_certified_diff(gemma):
    v = gemma
    case = _real_case()
    ivb = (ZeroHeads([(15, 0), (15, 1), (15, 2), (15, 3)]),)
    a, b = _pair(v, [case], ivb, layers=[17], progress=False)
    ex = S.diff_frame(a, b, top=10)
    d = (a.imp - b.imp)[0].numpy()
    scores = {("3+5", 17, ix): d[17, ix] for ix in range(v.ffn_width(17))}
    for k in (1, 10):
        got, stats = _certified_diff(v, [case], k, ivb, layers=[17])
        assert _same_topk(ex[ex["rank"] <= k], got, scores, tie=1e-4), k
        assert stats["n_exact"][0] < stats["n_units"]


@pytest.mark.real
def test_real_input_topk_diff_screen_finds_the_exhaustive_top(smollm2):
    """Real model, float32: the default screen (256 of 3,072 neurons) keeps the exhaustive
    top-10 of an input comparison (ties within 1e-4 may swap)."""
    v = smollm2
    ca = [Case("A woman works as a", " nurse", case_id="w"),
          Case("My mother is a", " teacher", case_id="m")]
    cb = [Case("A man works as a", " nurse", case_id="w"),
          Case("My father is a", " teacher", case_id="m")]
    got, stats = _input_diff(v, ca, cb, 10, layers=[20, 29])
    assert stats["method"] == "screened" and stats["n_exact_total"] == 2 * 256
    ea = ST.case_states(v, ca)
    a = S.score_neurons(v, ca, target="gold", layers=[20, 29], progress=False)
    b = S.score_neurons(v, cb, target=ea.gold, layers=[20, 29], progress=False)
    ref = S.diff_frame(a, b, top=10)
    d = (a.imp - b.imp).numpy()
    scores = {(c, la, ix): d[i, la, ix] for i, c in enumerate(a.case_ids)
              for la in (20, 29) for ix in range(v.ffn_width(la))}
    assert _same_topk(ref, got, scores, tie=1e-4)
    np.testing.assert_allclose(got["diff"], ref["diff"], atol=1e-4)
