"""Invariant tests of the model view on tiny random models of every family (float64)."""

import pytest
import torch
import transformers as tf

from cnalens.errors import CnaError
from cnalens.interventions import KeepOnlyNeurons, ReplaceHeads, ZeroHeads, ZeroNeurons
from cnalens.models import ModelView
from tiny import FAMILY_NAMES, MOE_NAMES, TinyTokenizer, tiny_model, zero_value_vectors

# Equal lengths: transformers' eager attention (Gemma 2) turns fully masked left-pad rows
# into NaN in float64; padding has its own test below.
SEQS = [[1, 5, 9, 13, 7, 22], [1, 40, 3, 3, 17, 9], [1, 8, 8, 30, 31, 4]]
PADDED = [[1, 5, 9, 13, 7, 22], [1, 40, 3], [1, 8, 8, 30, 31]]


@pytest.fixture(params=FAMILY_NAMES + MOE_NAMES)
def tiny_view(request):
    """Every family, the mixtures of experts included."""
    return ModelView(tiny_model(request.param), TinyTokenizer(), {"spec": request.param})


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_residual_decomposition(tiny_view):
    """final residual = embeddings + sum of per-head outputs + sum of m_k v_k (+ biases)."""
    v = tiny_view
    # Gemma's norms, and the post-sublayer norms (whose outputs enter the residual) of
    # OLMo-2, compute in float32 even in a float64 model
    tol = 1e-5 if v.family.norm_kind == "rms1p" or v.family.ln_attn_post else 1e-9
    b = v.batch(SEQS)
    with torch.no_grad(), v.capture() as c:
        hidden = v.hidden(b)
    total = c[("resid_pre", 0)].clone()
    for layer in range(v.n_layers):
        z = c[("z", layer)]
        zh = z.reshape(*z.shape[:2], v.n_heads, v.head_dim)
        heads = torch.einsum("bthd,hmd->bthm", zh, v.o_proj_by_head(layer))
        raw = heads.sum(2)
        if v.o_proj_bias(layer) is not None:
            raw = raw + v.o_proj_bias(layer)
        post = v.norm(layer, "ln_attn_post")
        if post is not None:
            parts = v.frozen_norm(post, heads, raw[:, :, None], bias=False)
            attn = parts.sum(2)
            assert torch.allclose(v.frozen_norm(post, raw, raw), post(raw), atol=tol)
        else:
            attn = raw
        assert torch.allclose(attn, c[("attn_out", layer)], atol=tol)

        coef = c[("coef", layer)]
        neurons = coef[..., None] * v.value_vectors(layer)  # (b, t, n, d)
        raw_ffn = neurons.sum(2)
        if v.down_bias(layer) is not None:
            raw_ffn = raw_ffn + v.down_bias(layer)
        post = v.norm(layer, "ln_ffn_post")
        ffn = (v.frozen_norm(post, neurons, raw_ffn[:, :, None], bias=False).sum(2)
               if post is not None else raw_ffn)
        assert torch.allclose(ffn, c[("mlp_out", layer)], atol=tol)
        total = total + attn + ffn
        assert torch.allclose(total, c[("resid_post", layer)], atol=tol)
        if not v.family.parallel:
            assert torch.allclose(c[("resid_mid", layer)], c[("resid_pre", layer)] + attn, atol=tol)
    assert torch.allclose(v.final_norm(total), hidden, atol=tol)
    # the view's logits equal the model's own, soft-capping included
    full = v.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                   position_ids=b.position_ids).logits
    assert torch.allclose(v.logits(hidden), full, atol=1e-9)


def test_zero_head_equals_weight_edit(tiny_view):
    v = tiny_view
    b = v.batch(SEQS)
    layer, head = v.n_layers - 1, 1
    with torch.no_grad():
        with v.intervene(ZeroHeads([(layer, head)])) as desc:
            hooked = v.hidden(b)
        assert desc[0]["heads"] == [f"{layer}.{head}"]
        w = v.module(layer, "o_proj").weight
        saved = w.detach().clone()
        sl = slice(head * v.head_dim, (head + 1) * v.head_dim)
        if v.family.conv1d:
            w[sl, :] = 0
        else:
            w[:, sl] = 0
        by_hand = v.hidden(b)
        w.copy_(saved)
        plain = v.hidden(b)
    assert torch.allclose(hooked, by_hand, atol=1e-12)
    assert not torch.allclose(hooked, plain)


def test_zero_and_keep_neurons_equal_weight_edit(tiny_view):
    v = tiny_view
    b = v.batch(SEQS)
    last = v.ffn_width(0) - 1  # a mixture's last neuron: the shared expert's, if any
    neurons = [(0, 3), (0, 30), (0, last), (1, 0), (1, 7)]
    with torch.no_grad():
        plain = v.hidden(b)
        with v.intervene(ZeroNeurons(neurons)):
            zeroed = v.hidden(b)
        with v.intervene(KeepOnlyNeurons(layers=[1], keep=[(1, 0), (1, 7)])):
            kept = v.hidden(b)
        restore = [zero_value_vectors(v, 0, [3, 30, last]), zero_value_vectors(v, 1, [0, 7])]
        zero_hand = v.hidden(b)
        for r in restore:
            r()
        keep = torch.ones(v.ffn_width(1), dtype=torch.bool)
        keep[[0, 7]] = False
        restore = zero_value_vectors(v, 1, keep.nonzero()[:, 0].tolist())
        keep_hand = v.hidden(b)
        restore()
        assert torch.equal(v.hidden(b), plain)
    assert torch.allclose(zeroed, zero_hand, atol=1e-12)
    assert torch.allclose(kept, keep_hand, atol=1e-12)
    assert not torch.allclose(zeroed, plain)


def test_replace_heads_and_last_position(tiny_view):
    v = tiny_view
    b = v.batch(SEQS)
    vals = torch.randn(2, v.head_dim, dtype=v.dtype)
    with torch.no_grad():
        with v.intervene(ReplaceHeads(((0, 1), (0, 2)), vals)), v.capture(["z"], [0]) as c:
            v.hidden(b)
        z = c[("z", 0)].reshape(len(SEQS), -1, v.n_heads, v.head_dim)
        assert torch.equal(z[:, :, 1], vals[0].expand_as(z[:, :, 1]))
        assert torch.equal(z[:, :, 2], vals[1].expand_as(z[:, :, 2]))
        with v.capture(["coef"], [0]) as c:
            v.hidden(b)
        plain = c[("coef", 0)]
        j = v.ffn_width(0) - 1  # a mixture's: the shared expert's, which every token uses
        with v.intervene(ZeroNeurons([(0, 1), (0, j)], position=-1)), \
                v.capture(["coef"], [0]) as c:
            v.hidden(b)
        coef = c[("coef", 0)]
        assert torch.all(coef[:, -1, [1, j]] == 0)
        if v.layout(0) is None or v.layout(0).shared:
            assert torch.all(coef[:, :-1, j] != 0)
        assert torch.equal(coef[:, :-1], plain[:, :-1])


def test_hooks_removed_on_exception(tiny_view):
    v = tiny_view
    before = _hook_count(v.model)
    with pytest.raises(RuntimeError):
        with v.intervene(ZeroHeads([(0, 0)]), ZeroNeurons([(1, 1)])), v.capture():
            assert _hook_count(v.model) > before
            raise RuntimeError("boom")
    assert _hook_count(v.model) == before


def test_left_padding_matches_single(tiny_view):
    v = tiny_view
    if v.model.config._attn_implementation == "eager":
        v.model.float()  # see SEQS
    with torch.no_grad():
        batched = v.last_logits(v.batch(PADDED))[:, -1]
        for i, s in enumerate(PADDED):
            single = v.last_logits(v.batch([s]))[0, -1]
            assert torch.allclose(batched[i], single, atol=1e-5), i


def test_capture_last_position(tiny_view):
    v = tiny_view
    b = v.batch(SEQS)
    with torch.no_grad(), v.capture(["resid_post", "coef"], position=-1) as c:
        v.hidden(b)
    assert c[("resid_post", 0)].shape == (len(SEQS), 1, v.d_model)
    assert c[("coef", 0)].shape == (len(SEQS), 1, v.ffn_width(0))
    assert c.stack("coef").shape[0] == v.n_layers


def test_sizes_and_range_checks(tiny_view):
    v = tiny_view
    s = v.summary()
    assert s["n_layers"] == 3 and s["n_heads"] == 4 and s["d_model"] == 32
    assert v.head_dim * v.n_heads == v._in_features(v.module(0, "o_proj"))
    with pytest.raises(CnaError, match="out of range"):
        with v.intervene(ZeroHeads([(0, v.n_heads)])):
            pass
    with pytest.raises(CnaError, match="out of range"):
        with v.intervene(ZeroNeurons([(v.n_layers, 0)])):
            pass
    with pytest.raises(CnaError, match="unknown capture point"):
        with v.capture(["nope"]):
            pass


def test_unsupported_family():
    cfg = tf.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=20, is_decoder=True)
    model = tf.BertLMHeadModel(cfg)
    with pytest.raises(CnaError, match="unsupported model family 'bert'.*llama"):
        ModelView(model)


def test_gqa_sizes():
    v = ModelView(tiny_model("llama"))
    assert v.n_kv_heads == 2 and v.n_heads == 4 and v.head_dim == 8
