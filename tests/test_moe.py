"""Mixtures of experts (Mixtral, Qwen2-MoE with its gated shared expert, Qwen3-MoE, OLMoE):
the experts dimension of the view, checked in float64 against the math written out by hand
from the Hugging Face weights (router softmax and top-k, the experts' fused 3-D
``gate_up_proj``/``down_proj``, the shared expert's sigmoid gate), neuron importance
against an independent brute force, and the interventions against weight edits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

from cnalens import scores as S
from cnalens import states as ST
from cnalens.data.cases import Case, Encoded
from cnalens.errors import CnaError
from cnalens.interventions import ScaleNeurons, ZeroExperts, ZeroNeurons
from cnalens.models import ModelView
from cnalens.models.families import MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE, family_for
from cnalens.models.shape import ExpertLayout, ModelShape
from cnalens.names import parse_neurons
from tiny import MOE_NAMES, TinyTokenizer, tiny_model, zero_value_vectors

SEQS = [[1, 5, 9, 13, 7, 22], [1, 40, 3, 3, 17, 9], [1, 8, 8, 30, 31, 4]]
E, F, K = 6, 12, 2  # experts, neurons per expert, experts per token (tests/tiny.py)


def _view(name: str) -> ModelView:
    return ModelView(tiny_model(name), TinyTokenizer(), {"spec": name})


def _enc(seqs=SEQS):
    return [Encoded(Case(f"q{i}", "t", case_id=f"c{i}"), tuple(s), (5 + i,))
            for i, s in enumerate(seqs)]


# --------------------------------------------------------------------------- by hand
def _by_hand(model, layer: int, x: torch.Tensor) -> dict:
    """The math of one sparse MoE block on FFN inputs ``x`` (..., d), from the weights:
    router ``r`` (..., E) (softmax in float32 over all experts, top-k, renormalised for
    Mixtral and where ``norm_topk_prob``; 0 for the others), every expert's coefficients
    ``m`` (..., E, F) = silu(x W_gate[e]^T) * (x W_up[e]^T), value vectors ``v`` (E, F, d);
    and for Qwen2-MoE the shared expert's coefficients, gate and value vectors."""
    cfg = model.config
    mlp = model.model.layers[layer].mlp
    logits = torch.nn.functional.linear(x, mlp.gate.weight)
    probs = torch.softmax(logits.float(), -1)
    top, idx = probs.topk(cfg.num_experts_per_tok, -1)
    if cfg.model_type == "mixtral" or cfg.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    r = torch.zeros_like(probs).scatter(-1, idx, top).to(x.dtype)
    ex = mlp.experts
    gu = torch.einsum("...d,efd->...ef", x, ex.gate_up_proj)
    n = gu.shape[-1] // 2
    m = torch.nn.functional.silu(gu[..., :n]) * gu[..., n:]
    out = {"r": r, "m": m, "v": ex.down_proj.permute(0, 2, 1)}
    if getattr(mlp, "shared_expert", None) is not None:
        se = mlp.shared_expert
        out["m_s"] = (torch.nn.functional.silu(x @ se.gate_proj.weight.T)
                      * (x @ se.up_proj.weight.T))
        out["g"] = torch.sigmoid(x @ mlp.shared_expert_gate.weight.T)  # (..., 1)
        out["v_s"] = se.down_proj.weight.T
    return out


def _contributions(h: dict) -> torch.Tensor:
    """Each flat neuron's contribution r_e m_{e,n} v_{e,n} (then g m_s v_s): (..., W, d)."""
    u = (h["r"][..., None] * h["m"])[..., None] * h["v"]  # (..., E, F, d)
    u = u.flatten(-3, -2)
    if "m_s" in h:
        u = torch.cat([u, (h["g"] * h["m_s"])[..., None] * h["v_s"]], -2)
    return u


# --------------------------------------------------------------------------- tables
def test_tables_shapes_and_the_unsupported_message():
    for name, fam in zip(MOE_NAMES, (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE), strict=True):
        model = tiny_model(name)
        assert family_for(model.config) is fam
        v = ModelView(model)
        assert ModelShape.from_config(model.config) == v.shape
        shared = 20 if name == "qwen2_moe" else 0
        lay = ExpertLayout(E, F, shared, K)
        want = [None if (name == "qwen2_moe" and x == 1) else lay for x in range(3)]
        assert v.experts == want and v.shape.experts == tuple(want)
        assert v.ffn_widths == [40 if w is None else E * F + shared for w in want]
        s = v.summary()
        assert (s["n_experts"], s["expert_width"], s["experts_per_token"]) == (E, F, K)
        assert s["shared_expert_width"] == shared
    cfg = tf.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=20, is_decoder=True)
    with pytest.raises(CnaError, match="unsupported model family 'bert'") as err:
        family_for(cfg)
    assert len(str(err.value).splitlines()) == 1
    assert all(t in str(err.value) for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"))


def test_neuron_names():
    shape = _view("qwen2_moe").shape
    assert parse_neurons("0.3.5,2.S.19,1.39,0.s.0", "neurons", shape) == [
        (0, 3 * F + 5), (2, E * F + 19), (1, 39), (0, E * F)]
    assert shape.neuron_name(0, 3 * F + 5) == "0.3.5"
    assert shape.neuron_name(2, E * F + 19) == "2.S.19" and shape.neuron_name(1, 39) == "1.39"
    for text, msg in [("0.6.0", "neuron 0.6.0 out of range: layer 0 has experts 0..5"),
                      ("0.1.12", "each expert of layer 0 has neurons 0..11"),
                      ("0.S.20", "each expert of layer 0 has neurons 0..19"),
                      ("0.5", "layer 0 is a mixture of 6 experts: name its neurons L.E.N"),
                      ("1.2.3", "layer 1 is dense: name its neurons L.N"),
                      ("0.x.1", "is not of the form L.N")]:
        with pytest.raises(CnaError, match=msg):
            parse_neurons(text, "neurons", shape)
    with pytest.raises(CnaError, match="layer 0 has no shared expert"):
        parse_neurons("0.S.1", "neurons", _view("olmoe").shape)


# --------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("name", MOE_NAMES)
def test_routed_decomposition_by_hand(name):
    """At every position: the captured router weights and weighted coefficients equal the
    math by hand, a neuron of an expert the token was not routed to has coefficient exactly
    0, each position is routed to exactly top-k experts, and the FFN output is the sum of
    r_e m_{e,n} v_{e,n} (+ g m_s v_s): the residual decomposition at routed positions."""
    v = _view(name)
    b = v.batch(SEQS)
    with torch.no_grad():
        with v.capture() as c:
            v.hidden(b)
        for layer in range(v.n_layers):
            lay = v.layout(layer)
            if lay is None:
                assert ("route", layer) not in c
                continue
            x = v.model.model.layers[layer].post_attention_layernorm(c[("resid_mid", layer)])
            h = _by_hand(v.model, layer, x)
            route = c[("route", layer)]
            assert torch.equal((route[..., :E] != 0).sum(-1), torch.full(route.shape[:2], K))
            torch.testing.assert_close(route[..., :E], h["r"], rtol=0, atol=1e-12)
            coef = c[("coef", layer)]
            want = (h["r"][..., None] * h["m"]).flatten(-2)
            if lay.shared:
                torch.testing.assert_close(route[..., E], h["g"][..., 0], rtol=0, atol=1e-12)
                want = torch.cat([want, h["g"] * h["m_s"]], -1)
            torch.testing.assert_close(coef, want, rtol=0, atol=1e-12)
            off = (h["r"] == 0)[..., None].expand(-1, -1, -1, F).flatten(-2)
            assert torch.all(coef[..., :E * F][off] == 0)
            u = _contributions(h)
            torch.testing.assert_close(u.sum(-2), c[("mlp_out", layer)], rtol=0, atol=1e-12)
            torch.testing.assert_close(coef[..., None] * v.value_vectors(layer), u,
                                       rtol=0, atol=1e-12)
            idx = torch.tensor([lay.n_neurons - 1, 0, 3 * F + 4, F - 1])
            assert torch.equal(v.value_vectors(layer, idx), v.value_vectors(layer)[idx])


# --------------------------------------------------------------------------- importance
@pytest.mark.parametrize("lens", ["frozen", "renorm"])
@pytest.mark.parametrize("name", MOE_NAMES)
def test_expert_neuron_importance_brute_force(name, lens):
    """Each neuron's importance equals, in float64, the log-probability change of adding its
    contribution (router weight x coefficient x value vector, by hand) to the captured
    residual and passing the final norm (frozen by hand, or the real module) and the
    unembedding; neurons of experts the case was not routed to contribute exactly 0 and
    are not scored (NaN)."""
    v = _view(name)
    enc = _enc()
    sc = S.score_neurons(v, enc, lens=lens, progress=False)
    st = ST.case_states(v, enc)
    model = v.model
    norm, W = model.model.norm, model.lm_head.weight

    def logp(x, final, w):
        if lens == "frozen":
            x = x / torch.sqrt(final.pow(2).mean() + norm.variance_epsilon) * norm.weight
        else:
            x = norm(x)
        return torch.log_softmax(x @ W.T, -1)[..., w]

    n_routed = n_off = 0
    with torch.no_grad():
        for i in range(len(enc)):
            w = int(sc.target[i])
            for layer in range(v.n_layers):
                s0 = st.resid_mid[i, layer]
                if v.layout(layer) is None:  # Qwen2-MoE's dense layer: m_k v_k
                    u = st.coef[i, layer, :40, None] * v.value_vectors(layer)
                else:
                    x = model.model.layers[layer].post_attention_layernorm(s0)
                    u = _contributions(_by_hand(model, layer, x))
                ref = logp(s0 + u, st.final[i], w) - logp(s0, st.final[i], w)
                got = sc.imp[i, layer, :u.shape[0]]
                off = (u == 0).all(-1)
                assert torch.equal(torch.isnan(got), off), layer
                torch.testing.assert_close(got[~off], ref[~off], rtol=1e-6, atol=1e-6)
                n_routed += int((~off).sum())
                n_off += int(off.sum())
    assert n_routed > 100 and n_off > 100
    if v.layout(0) is not None:
        df = sc.frame()
        moe = df[df["expert"] != ""]
        assert set(moe["expert"]) <= {*map(str, range(E)), "S"}
        assert (moe["route"] > 0).all() and len(moe) == int(torch.isfinite(
            sc.imp[:, [x for x in range(3) if v.layout(x)]]).sum())
        row = moe.iloc[0]
        lay = v.layout(int(row["layer"]))
        assert lay.split(int(row["neuron"])) == (
            row["expert"] if row["expert"] == "S" else int(row["expert"]), row["index"])
        ci = int(row["case"][1:])
        assert row["coef"] * row["route"] == pytest.approx(
            float(sc.coef[ci, int(row["layer"]), int(row["neuron"])]), rel=1e-12)


@pytest.mark.parametrize("name", MOE_NAMES)
def test_read_neurons_names_experts_and_leaves_unrouted_unscored(name):
    """``read_neurons`` with a case (``cnalens neuron --case``): neurons named L.E.N / L.S.N,
    the router weight in ``route`` (by hand), the neuron's own coefficient, and the
    importance of a neuron of an expert the case was not routed to NaN (not ~0); routed
    neurons' importance as the brute force above (gold target, last position)."""
    from cnalens.vocab import read_neurons

    v = _view(name)
    layer = next(x for x in range(v.n_layers) if v.layout(x) is not None)
    lay = v.layout(layer)
    units = [(layer, f) for f in range(0, lay.n_neurons, 5)]
    enc = _enc()[0]
    df = read_neurons(v, units, case=enc, k=3)
    st = ST.case_states(v, [enc])
    model = v.model
    norm, W = model.model.norm, model.lm_head.weight
    with torch.no_grad():
        s0 = st.resid_mid[0, layer]
        hand = _by_hand(model, layer, model.model.layers[layer].post_attention_layernorm(s0))
        u = _contributions(hand)
        final = st.final[0]

        def logp(x):
            x = x / torch.sqrt(final.pow(2).mean() + norm.variance_epsilon) * norm.weight
            return torch.log_softmax(x @ W.T, -1)[..., 5]

        ref = logp(s0 + u) - logp(s0)
    n_off = 0
    for row, (_, f) in zip(df.itertuples(), units, strict=True):
        expert, index = lay.split(f)
        assert row.neuron == f"{layer}.{expert}.{index}"
        r = float(hand["r"][expert]) if expert != "S" else float(hand["g"])
        assert row.route == pytest.approx(r, rel=1e-9)
        if r == 0:
            n_off += 1
            assert np.isnan(row.importance) and np.isnan(row.coef)
        else:
            assert row.importance == pytest.approx(float(ref[f]), rel=1e-6, abs=1e-9)
            assert row.coef * row.route == pytest.approx(float(st.coef[0, layer, f]),
                                                         rel=1e-9, abs=1e-12)
    assert 0 < n_off < len(units)


def test_routing_frame_names_the_changed_experts():
    v = _view("qwen2_moe")
    enc = _enc()
    sa = ST.case_states(v, enc)
    sb = ST.case_states(v, enc, ZeroExperts([(0, e) for e in range(3)], reroute=True))
    df = ST.routing_frame(v, sa, sb)
    assert len(df) and set(df["layer"]) <= {0, 2} and df["changed"].all()
    first = df[df["layer"] == 0]
    assert (first[first["expert"].isin(["0", "1", "2"])]["weight_b"] == 0).all()
    assert set(first[first["weight_b"] != 0]["expert"]) <= {"3", "4", "5", "S"}
    assert ST.routing_frame(v, sa, sa).empty
    assert len(ST.routing_frame(v, sa, sa, changed_only=False)) == 3 * 2 * (K + 1)


# --------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("name", MOE_NAMES)
def test_expert_neuron_interventions_equal_weight_edits(name):
    """Zeroing and scaling experts' neurons (routed or not at a position, the shared
    expert's too) equals editing those columns of the experts' down_proj; zeroing a whole
    expert without re-routing equals zeroing its down_proj."""
    v = _view(name)
    b = v.batch(SEQS)
    lay = v.layout(0)
    neurons = [3, F + 7, 4 * F + 11, lay.n_neurons - 1]
    with torch.no_grad():
        plain = v.hidden(b)
        for factor in (0.0, 0.5):
            with v.intervene(ScaleNeurons([(0, j) for j in neurons] + [(2, 5)], factor)) as d:
                hooked = v.hidden(b)
            restore = [zero_value_vectors(v, 0, neurons, factor),
                       zero_value_vectors(v, 2, [5], factor)]
            by_hand = v.hidden(b)
            for r in restore:
                r()
            torch.testing.assert_close(hooked, by_hand, rtol=0, atol=1e-12)
            assert not torch.allclose(hooked, plain)
        assert d[0]["neurons"][:2] == ["0.0.3", "0.1.7"]
        experts = [(0, 1), (2, 4)] + ([(2, "S")] if lay.shared else [])
        with v.intervene(ZeroExperts(experts)) as d:
            hooked = v.hidden(b)
        down = [v.moe_module(x, "experts").down_proj for x in (0, 2)]
        saved = [w.detach().clone() for w in down]
        down[0][1] = 0
        down[1][4] = 0
        if lay.shared:
            ws = v.moe_module(2, "shared_expert").down_proj.weight
            saved_s = ws.detach().clone()
            ws.zero_()
        by_hand = v.hidden(b)
        for w, s in zip(down, saved, strict=True):
            w.copy_(s)
        if lay.shared:
            ws.copy_(saved_s)
        assert torch.equal(v.hidden(b), plain)
    torch.testing.assert_close(hooked, by_hand, rtol=0, atol=1e-12)
    assert d[0] == {"kind": "zero_experts", "experts": [f"{a}.{e}" for a, e in experts],
                    "reroute": False, "position": None}


def _without_expert(model, drop: int):
    """The same model built with one expert fewer in every MoE layer (expert ``drop`` left
    out of the router and the fused weights): what re-routing around it should equal."""
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    key = "num_local_experts" if cfg.model_type == "mixtral" else "num_experts"
    setattr(cfg, key, getattr(cfg, key) - 1)
    small = tf.AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()
    small.set_experts_implementation("eager")
    keep = [e for e in range(E) if e != drop]
    state = {k: (t[keep] if k.endswith(("mlp.gate.weight", "experts.gate_up_proj",
                                         "experts.down_proj")) else t)
             for k, t in model.state_dict().items()}
    small.load_state_dict(state)
    return small


@pytest.mark.parametrize("name", MOE_NAMES)
def test_zero_expert_rerouted_equals_a_model_without_it(name):
    v = _view(name)
    b = v.batch(SEQS)
    moe = [x for x in range(v.n_layers) if v.is_moe(x)]
    with torch.no_grad():
        plain = v.hidden(b)
        with v.intervene(ZeroExperts([(x, 2) for x in moe], reroute=True)) as d, \
                v.capture(["route", "coef"]) as c:
            hooked = v.hidden(b)
        small = ModelView(_without_expert(v.model, 2), TinyTokenizer())
        want = small.hidden(b)
        assert d[0]["reroute"] is True
        for x in moe:
            route = c[("route", x)]
            assert torch.all(route[..., 2] == 0)
            assert torch.equal((route[..., :E] != 0).sum(-1), torch.full(route.shape[:2], K))
            assert torch.all(c[("coef", x)][..., 2 * F:3 * F] == 0)
        # the last position only
        with v.intervene(ZeroExperts([(moe[0], 2)], reroute=True, position=-1)), \
                v.capture(["route"], [moe[0]]) as c0, v.capture(["route"], [moe[0]]) as c1:
            v.hidden(b)
        with v.capture(["route"], [moe[0]]) as ref:
            v.hidden(b)
    torch.testing.assert_close(hooked, want, rtol=0, atol=1e-12)
    assert not torch.allclose(hooked, plain, atol=1e-3)
    r, r0 = c0[("route", moe[0])], ref[("route", moe[0])]
    assert torch.equal(r, c1[("route", moe[0])])
    assert torch.equal(r[:, :-1], r0[:, :-1]) and torch.all(r[:, -1, 2] == 0)


def test_expert_checks():
    v = _view("mixtral")
    for iv, msg in [(ZeroExperts([(0, 6)]), "expert 0.6 out of range: layer 0 has experts 0..5"),
                    (ZeroExperts([(0, "S")]), "layer 0 has no shared expert"),
                    (ZeroExperts([(0, e) for e in range(5)], reroute=True),
                     "cannot re-route around 5 experts of layer 0: each token needs 2 of its 6"),
                    (ZeroNeurons([(0, E * F)]), r"neuron 0.72 out of range: layer 0 has FFN "
                     r"neurons 0..71 \(flat: 6 experts x 12\)")]:
        with pytest.raises(CnaError, match=msg):
            with v.intervene(iv):
                pass
    q = _view("qwen2_moe")
    with pytest.raises(CnaError, match="layer 1 is dense"):
        with q.intervene(ZeroExperts([(1, 0)])):
            pass
    with pytest.raises(CnaError, match="the shared expert is not routed"):
        with q.intervene(ZeroExperts([(0, "S")], reroute=True)):
            pass


@pytest.mark.parametrize("name", [*MOE_NAMES, "llama", "gpt2", "phi3"])
def test_neuron_weights_hold_the_neurons(name):
    """Zeroing what ``neuron_weights`` names (value vectors, and with ``inputs`` the gate
    and up rows too) equals zeroing the neurons' coefficients, in dense layers (Conv1D and
    fused gate|up included) and in experts (the shared expert's too)."""
    v = _view(name)
    b = v.batch(SEQS)
    ns = {0: [3, 30, v.ffn_width(0) - 1], 2: [5]}
    with torch.no_grad():
        with v.intervene(ZeroNeurons([(x, n) for x, idx in ns.items() for n in idx])):
            want = v.hidden(b)
        for inputs in (False, True):
            saved = []
            for x, idx in ns.items():
                for t, axis, i in v.neuron_weights(x, idx, inputs):
                    saved.append((t, axis, i, t.index_select(axis, i).clone()))
                    t.index_fill_(axis, i, 0.0)
            got = v.hidden(b)
            for t, axis, i, old in reversed(saved):
                t.index_copy_(axis, i, old)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_diff_frame_names_experts_and_routes():
    v = _view("qwen2_moe")
    enc = _enc()
    a = S.score_neurons(v, enc, progress=False)
    b = S.score_neurons(v, enc, ZeroExperts([(0, 1), (2, 4)], reroute=True), target=a.target,
                        scale=a.scale, progress=False)
    df = S.diff_frame(a, b, top=30)
    assert list(df.columns) == ["case", "rank", "layer", "expert", "neuron", "index", "imp_a",
                                "imp_b", "coef_a", "coef_b", "route_a", "route_b", "diff"]
    moe = df[df["layer"] != 1]
    assert (moe["route_a"] > 0).all() and (moe["route_b"] > 0).all()  # routed in both runs
    dense = df[df["layer"] == 1]
    assert (dense["expert"] == "").all() and dense["route_a"].isna().all()
    shared = moe[moe["expert"] == "S"]
    assert len(shared) and (shared["neuron"] == E * F + shared["index"]).all()
    row = moe[moe["expert"] != "S"].iloc[0]
    i, x, j = int(row["case"][1:]), int(row["layer"]), int(row["neuron"])
    assert row["coef_a"] * row["route_a"] == pytest.approx(float(a.coef[i, x, j]), rel=1e-12)
    assert j == int(row["expert"]) * F + row["index"]


# --------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("name", MOE_NAMES)
def test_pruning_experts_equals_rerouting_and_keeping(name, tmp_path):
    """Pruning a mixture-of-experts layer to 4 of its 6 experts, 5 neurons each (and 7 of
    the shared expert's) gives the model the original computes when the 2 dropped experts
    are routed around and only the kept neurons are kept; saved and loaded back, the same."""
    from cnalens.interventions import KeepOnlyNeurons
    from cnalens.models.pruned import (
        expert_keep,
        load_pruned,
        prune_ffn,
        pruned_experts,
        pruned_widths,
        save_pruned,
    )

    v = _view(name)
    b = v.batch(SEQS)
    lay = v.layout(2)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(lay.n_neurons, generator=gen)
    keep = expert_keep(v, 2, order, 5, experts=4, shared=7)
    route = lay.route_of()[keep]
    kept_experts = torch.unique(route[route < E]).tolist()
    dropped = [e for e in range(E) if e not in kept_experts]
    assert len(kept_experts) == 4 and all(int((route == e).sum()) == 5 for e in kept_experts)
    assert int((route == E).sum()) == (7 if lay.shared else 0)
    with torch.no_grad():
        with v.intervene(ZeroExperts([(2, e) for e in dropped], reroute=True),
                         KeepOnlyNeurons([2], [(2, int(j)) for j in keep])):
            want = v.hidden(b)
        plain = v.hidden(b)
        n0 = sum(p.numel() for p in v.model.parameters())
        info = prune_ffn(v, {2: keep})
        got = v.hidden(b)
    assert v.layout(2) == ExpertLayout(4, 5, 7 if lay.shared else 0, K)
    assert v.ffn_widths[2] == len(keep) == info["widths_after"][2]
    assert info["params_removed"] == n0 - sum(p.numel() for p in v.model.parameters()) > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, plain)
    # the pruned layer's neurons, renumbered flat, are the kept ones in order
    with torch.no_grad():
        torch.testing.assert_close(v.value_vectors(2), ModelView(tiny_model(name))
                                   .value_vectors(2)[keep], rtol=0, atol=0)
    save_pruned(v, tmp_path / "pruned")
    assert pruned_widths(tmp_path / "pruned")[2] == len(keep)
    back = ModelView(load_pruned(tmp_path / "pruned", dtype=torch.float64,
                                 experts_implementation="eager"))
    assert back.shape == v.shape == ModelShape.from_config(
        back.model.config, pruned_widths(tmp_path / "pruned"), pruned_experts(tmp_path / "pruned"))
    with torch.no_grad():
        torch.testing.assert_close(back.hidden(b), got, rtol=0, atol=1e-12)


def test_pruning_checks():
    from cnalens.models.pruned import prune_ffn

    v = _view("qwen2_moe")
    flat = torch.arange(v.ffn_width(0))
    for keep, msg in [(torch.cat([flat[:3], flat[F:F + 4], flat[-2:]]),
                       "its kept experts would keep 3, 4 neurons: the experts of a layer share "
                       "one width"),
                      (torch.cat([flat[:3], flat[-2:]]), "cannot prune layer 0 to 1 experts: "
                       "each token is routed to 2"),
                      (flat[:2 * F], "keep at least one neuron of its shared expert")]:
        with pytest.raises(CnaError, match=msg):
            prune_ffn(v, {0: keep})
    assert v.ffn_width(0) == len(flat)


# --------------------------------------------------------------------------- CNA
@pytest.mark.parametrize("name", MOE_NAMES)
def test_cna_on_a_tiny_mixture(name):
    """``cnalens.cna`` (exhaustive, and certified with ``k``) on a mixture of experts: run B
    a head zeroed, or experts routed around; the ranked neurons are those routed in both
    runs, with exactly the importances ``score_neurons`` gives each run; the table names
    experts and routes as ``diff_frame`` does, and ``routing()`` is ``routing_frame``."""
    import cnalens
    from cnalens.interventions import ZeroHeads

    v = _view(name)
    enc = _enc()
    for iv in (ZeroHeads([(1, 1)]), ZeroExperts([(0, 0), (0, 1)], reroute=True),
               ZeroExperts([(2, 3)])):
        comp = cnalens.cna(v, enc, intervention=iv)
        kw = {"layers": comp.layers, "progress": False}
        a = S.score_neurons(v, enc, **kw)
        b = S.score_neurons(v, enc, iv, target=a.target, scale=a.scale, **kw)
        torch.testing.assert_close(comp.imp_a, a.imp, rtol=0, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(comp.imp_b, b.imp, rtol=0, atol=1e-12, equal_nan=True)
        df = comp.frame(20)
        assert len(df) == 20 * len(enc)
        for r in df.itertuples():
            i, lay = int(r.case[1:]), v.layout(r.layer)
            if lay is not None:
                e = int(lay.route_of()[r.neuron])
                assert a.route[i, r.layer, r.neuron] > 0 and b.route[i, r.layer, r.neuron] > 0
                assert e < lay.n_experts or lay.shared
        # each row as diff_frame has it (rows compared by key: near ties may swap)
        want = S.diff_frame(a, b).drop(columns="diff")
        assert list(df.columns) == list(want.columns) and {"expert", "index", "route_a",
                                                           "route_b"} <= set(df.columns)
        got = df.merge(want, on=["case", "layer", "neuron"], suffixes=("", "_want"))
        assert len(got) == len(df)
        for col in ("expert", "index"):
            assert (got[col] == got[f"{col}_want"]).all()
        for col in ("imp_a", "imp_b", "coef_a", "coef_b", "route_a", "route_b"):
            np.testing.assert_allclose(got[col], got[f"{col}_want"], rtol=0, atol=1e-12)
        sa, sb = ST.case_states(v, enc), ST.case_states(v, enc, iv)
        pd.testing.assert_frame_equal(comp.routing(), ST.routing_frame(v, sa, sb))
        full, keys = comp.routing(), ["case", "layer", "expert"]
        part = full[full["case"].isin(["c0", "c2"])].sort_values(keys, ignore_index=True)
        pd.testing.assert_frame_equal(
            comp.subset([2, 0]).routing().sort_values(keys, ignore_index=True), part,
            check_dtype=False)
        top = cnalens.cna(v, enc, intervention=iv, k=5)
        assert top.meta["scoring"] == "certified"
        got, want = top.frame(), S.diff_frame(a, b, top=5).drop(columns="diff")
        assert list(got.columns) == list(want.columns)
        np.testing.assert_allclose(got["imp_a"] - got["imp_b"], want["imp_a"] - want["imp_b"],
                                   rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- commands
@pytest.mark.parametrize("name", MOE_NAMES)
def test_commands_on_a_tiny_mixture(name, tmp_path, monkeypatch, capsys, one_thread):
    """Every command on a mixture of experts saved to a folder (float32, the default
    grouped experts implementation): ``neuron`` takes ``L.E.N``/``L.S.N`` names and writes
    them, ``cna`` names experts in its table, ``prune`` keeps what the fused experts can
    hold (and reloads the same), ``debias`` edits experts' neurons."""
    import json

    from test_new_families import _own_cases, _save, run_every_command

    monkeypatch.setenv("CNALENS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    view = _save(name, model)
    assert view.model.config._experts_implementation == "grouped_mm"
    cases = tmp_path / "cases.jsonl"
    _own_cases(view, cases)
    names = ["0.3.2", "2.5.11"] + (["1.7", "2.S.19"] if name == "qwen2_moe" else [])
    out = run_every_command(model, tmp_path, cases, names, capsys)
    model_meta = json.loads((out / "cna.json").read_text())["model"]
    assert model_meta["n_experts"] == E and model_meta["experts_per_token"] == K
    neuron = pd.read_csv(out / "neuron.csv")
    assert list(dict.fromkeys(neuron["neuron"])) == names
    moe_rows = neuron[neuron["neuron"].str.count(r"\.") == 2]
    assert moe_rows["route"].notna().all()  # the expert's router weight on the case
    assert (moe_rows["importance"].isna() == (moe_rows["route"] == 0)).all()
    top = pd.read_csv(out / "cna_neurons.csv", dtype={"expert": str})
    assert {"expert", "index", "route_a", "route_b"} <= set(top.columns)
    routing = pd.read_csv(out / "cna_routing.csv", dtype={"expert": str})  # maybe empty
    assert {"case", "layer", "weight_a", "weight_b"} <= set(routing.columns)
    debias = json.loads((out / "debias" / "debias.json").read_text())
    assert all(n["name"] == f"{n['layer']}.{n['neuron']}" or n["name"].count(".") == 2
               for n in debias["neurons"])
    # eval with experts zeroed (re-routed or dropped): as the library's evaluate
    from cnalens import load_model
    from cnalens.cli import main
    from cnalens.data import load_cases
    from cnalens.evaluate import evaluate

    v = load_model(str(model), progress=False)
    own = load_cases(cases)
    for reroute in (False, True):
        ev = tmp_path / f"ev{reroute}"
        flags = ["--reroute"] if reroute else []
        assert main(["eval", "--model", str(model), "-q", "--cases", str(cases),
                     "--zero-experts", "0.0,0.3", *flags, "--out", str(ev)]) == 0
        got = pd.read_csv(ev / "eval_cases.csv", usecols=["correct", "logp"])
        want = evaluate(v, own, ZeroExperts([(0, 0), (0, 3)], reroute=reroute),
                        progress=False)
        assert list(got["correct"]) == list(want["correct"])
        np.testing.assert_allclose(got["logp"], want["logp"], rtol=1e-5, atol=1e-5)
        meta = json.loads((ev / "eval.json").read_text())
        assert meta["interventions"] == [{"kind": "zero_experts", "experts": ["0.0", "0.3"],
                                          "reroute": reroute, "position": None}]
    base = evaluate(v, own, progress=False)
    assert not np.allclose(base["logp"], want["logp"])  # the experts mattered
    capsys.readouterr()
    for argv, msg in ((["--zero-experts", "0.9"], "out of range"),
                      (["--zero-experts", "0-1"], "not of the form L.E"),
                      (["--reroute"], "--reroute needs --zero-experts"),
                      (["--zero-experts", ""], "--zero-experts: empty")):
        assert main(["eval", "--model", str(model), "-q", "--cases", str(cases), *argv,
                     "--out", str(tmp_path / "bad")]) != 0
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad" / "eval.csv").exists()
    sizes = json.loads((out / "prune" / "prune.json").read_text())["sizes"]
    assert sizes["reload_max_abs_diff"] < 1e-5 and sizes["ffn_params_removed"] > 0
    kept = pd.read_csv(out / "prune" / "prune_neurons.csv", dtype={"expert": str})
    for (_, layer), rows in kept.groupby(["variant", "layer"]):
        if layer != 1 or name != "qwen2_moe":  # each kept expert keeps one width
            sizes_ = rows[rows["expert"] != "S"].groupby("expert").size()
            assert sizes_.nunique() == 1 and len(sizes_) >= K


# --------------------------------------------------------------------------- certified
@pytest.mark.parametrize("name", MOE_NAMES)
def test_certified_topk_and_cna_equal_exhaustive(name, one_thread):
    """Certified top-K of one run, certified CNA of two (run B a head zeroed, or experts
    routed around: the routing differs) and the screened input comparison equal the
    exhaustive rankings in float64; a neuron of an expert not routed (in either run) is
    never a candidate, as it is never scored."""
    from cnalens import certified as CE
    from cnalens.interventions import ZeroHeads

    v = _view(name)
    enc = _enc(SEQS + [[1, 11, 52, 6, 6, 19]])
    sc = S.score_neurons(v, enc, progress=False)
    for k in (1, 5, 20, 200):
        got, stats = CE.certified_topk(v, enc, k, step=4)
        ex = sc.frame(top=k)
        assert list(got.columns) == list(ex.columns)
        assert got[["case", "layer", "neuron", "expert", "index", "rank"]].equals(
            ex[["case", "layer", "neuron", "expert", "index", "rank"]]), k
        for col in ("importance", "coef", "route"):
            np.testing.assert_allclose(got[col], ex[col], atol=1e-9, err_msg=col)
        assert stats["method"] == "certified"
    sa = ST.case_states(v, enc)
    for iv in (ZeroHeads([(1, 1)]), ZeroExperts([(0, 0), (0, 3)], reroute=True)):
        sb = ST.case_states(v, enc, iv)
        a = S.score_neurons(v, None, states=sa, progress=False)
        b = S.score_neurons(v, None, states=sb, target=a.target, scale=a.scale, progress=False)
        lo, hi = CE.cna_bounds(v, sa, sb, head_tokens=8)
        for r, run in enumerate((a, b)):
            ok = torch.isfinite(run.imp)
            assert torch.equal(ok, torch.isfinite(lo[r])) and torch.equal(ok, torch.isfinite(hi[r]))
            assert bool((lo[r][ok] <= run.imp[ok] + 1e-9).all())
            assert bool((run.imp[ok] <= hi[r][ok] + 1e-9).all())
        for by in ("decrease", "increase", "abs"):
            for k in (1, 5, 20):
                got, _ = CE.certified_cna(v, sa, sb, k, by=by, head_tokens=4, step=4, group=3)
                ex = S.diff_frame(a, b, top=k, by=by)
                assert list(zip(ex.case, ex.layer, ex.neuron, strict=True)) == \
                    list(zip(got.case, got.layer, got.neuron, strict=True)), (iv, by, k)
                np.testing.assert_allclose(got["diff"], ex["diff"], atol=1e-9)
                assert np.isfinite(got[["imp_a", "imp_b"]].to_numpy()).all()
    assert len(ST.routing_frame(v, sa, sb))  # the last run B routes some case otherwise
    # an input comparison (each run its own scale), screened and every neuron
    sb = ST.case_states(v, _enc([s[:1] + s[2:] + [4] for s in SEQS + [[1, 11, 52, 6, 6, 19]]]))
    tg = sa.gold
    a = S.score_neurons(v, None, states=sa, target=tg, progress=False)
    b = S.score_neurons(v, None, states=sb, target=tg, progress=False)
    assert (torch.isnan(a.imp) != torch.isnan(b.imp)).any()  # routed differently
    for screen in (0, 20):
        got, _ = CE.screened_cna(v, sa, sb, 6, target=tg, screen=screen)
        assert np.isfinite(got[["imp_a", "imp_b"]].to_numpy()).all()
        if screen == 0:
            ex = S.diff_frame(a, b, top=6)
            assert list(zip(ex.case, ex.layer, ex.neuron, strict=True)) == \
                list(zip(got.case, got.layer, got.neuron, strict=True))
    got, _ = CE.certified_cna(v, sa, sb, 6, target=tg, own_scales=True, head_tokens=4)
    ex = S.diff_frame(a, b, top=6)
    assert list(zip(ex.case, ex.layer, ex.neuron, strict=True)) == \
        list(zip(got.case, got.layer, got.neuron, strict=True))


def test_a_lora_on_the_shared_experts_down_projection_changes_value_vectors():
    """CNA of a LoRA model scores two runs on one projection of the value vectors only
    where the LoRA leaves them alone: a LoRA on Qwen2-MoE's shared expert's down
    projection is seen."""
    from peft import LoraConfig, get_peft_model

    from cnalens.cna import _lora_down

    view = ModelView(tiny_model("qwen2_moe", dtype=torch.float32), TinyTokenizer())
    assert _lora_down(view, None) == []
    get_peft_model(view.model, LoraConfig(r=2, target_modules=["shared_expert.down_proj"]))
    moe_layers = [x for x in range(view.n_layers) if view.is_moe(x)
                  and view.moe_module(x, "shared_expert") is not None]
    assert moe_layers and _lora_down(view, None) == moe_layers
