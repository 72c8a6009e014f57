"""Head scan: the fast scan equals the naive loop (float64 tiny models; a real-model subset
under design.md's near-tie rule), the table, errors, name parsing and the report section."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cnalens.data import Case, arithmetic_cases, encode_all
from cnalens.errors import CnaError
from cnalens.evaluate import evaluate
from cnalens.heads import (
    COLUMNS,
    head_means,
    head_table,
    parse_heads,
    parse_layers,
    scan_fast,
    scan_heads,
    scan_naive,
    select_heads,
    top_heads,
    write_heads,
)
from cnalens.heads.scan import _stats_full, _stats_tiled, _tree_chunks  # engine internals
from cnalens.interventions import ZeroHeads
from cnalens.models import ModelView
from cnalens.stats import bootstrap_diff
from tiny import TinyTokenizer, tiny_model

EXACT = ("correct", "correct_first", "pred")
# GQA llama, Gemma 3 (post-norms, sliding window 4 < prompt length), GPT-2, NeoX, ...
FAMILIES = ["llama", "gemma3", "gpt2", "neox", "qwen3", "gptj", "gemma", "phi3",
            "olmo2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _view(family: str) -> ModelView:
    model = tiny_model(family)
    if family.startswith("gemma"):  # tame near-one-hot predictions, so heads matter
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(0.2)
    return ModelView(model, TinyTokenizer(), {"spec": family})


def _cases(view, ops=("+", "-", "*", "/"), two: bool = True) -> list[Case]:
    """Arithmetic prompts whose first answer token is the model's own greedy choice (so
    accuracy is far from zero); every other case gets a second, gold, answer token."""
    base = arithmetic_cases(ops=ops, digits=(1,), n=9)
    pred = evaluate(view, base, progress=False)["pred"]
    out = []
    for i, (c, p) in enumerate(zip(base, pred, strict=True)):
        if p.strip() and p != "?":
            target = p + (c.target[-1] if i % 2 and two else "")
            out.append(Case(c.question, target, c.prefix, c.labels, c.case_id))
    return out


def _same(a, b, logp_tol: float) -> None:
    for f in EXACT:
        assert torch.equal(a.orig[f], b.orig[f]), f
        assert torch.equal(a.ablated[f], b.ablated[f]), f
    assert torch.allclose(a.orig["logp"], b.orig["logp"], atol=logp_tol)
    assert torch.allclose(a.ablated["logp"], b.ablated["logp"], atol=logp_tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_equals_naive_tiny(family):
    v = _view(family)
    enc = encode_all(v.tokenizer, _cases(v))
    heads = select_heads(v)
    naive = scan_naive(v, enc, heads, batch_size=16)
    assert 0.2 < naive.orig["correct_first"].float().mean() <= 1
    assert (naive.ablated["logp"] - naive.orig["logp"][None]).abs().max() > 1e-3
    # every family runs token trees (gemma/gemma2/3: window masks per layer type)
    trees = _tree_chunks(v, enc, 128)
    assert trees and isinstance(trees[0].mask, dict) == (family == "gemma3")
    for kw in ({}, {"heads_per_pass": 3, "batch_size": 7}, {"reuse": False},
               {"tree": False}, {"tree": False, "batch_size": 7}, {"share_prefix": False}):
        _same(naive, scan_fast(v, enc, heads, **kw), 1e-6)
    # the naive loop is cnalens.evaluate under ZeroHeads
    for j in (0, len(heads) - 1):
        ev = evaluate(v, enc, ZeroHeads([heads[j]]), progress=False)
        assert np.array_equal(ev["correct"].to_numpy(), naive.ablated["correct"][j].numpy())
        assert np.allclose(ev["logp"].to_numpy(), naive.ablated["logp"][j].numpy(), atol=1e-6)
    ev = evaluate(v, enc, progress=False)
    assert np.array_equal(ev["correct_first"].to_numpy(), naive.orig["correct_first"].numpy())


def test_fast_equals_naive_gemma2_and_mean():
    # Gemma 2's eager attention turns left-padded rows into NaN in float64 (test_view), so
    # its naive loop needs equal lengths: division has one-token answers only.
    v = _view("gemma2")
    enc = encode_all(v.tokenizer, _cases(v, ops=("/",), two=False))
    heads = select_heads(v)
    _same(scan_naive(v, enc, heads), scan_fast(v, enc, heads), 1e-6)
    v = _view("gemma3")
    enc = encode_all(v.tokenizer, _cases(v))
    means = head_means(v, enc)
    assert means.shape == (v.n_layers, v.n_heads, v.head_dim)
    assert not torch.equal(head_means(v, enc, "last"), means)
    _same(scan_naive(v, enc, heads, means), scan_fast(v, enc, heads, means), 1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped logits
def test_tiled_vocabulary_stats_equal_whole_rows(family):
    v = _view(family)
    torch.manual_seed(0)
    h = torch.randn(9, v.d_model, dtype=v.dtype)
    target = torch.randint(0, v.vocab_size, (9,))
    first = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    pred, margin, logp = _stats_full(v, h, target, first)
    lg = v.logits(h).float()  # by hand (scores are float32, like cnalens.evaluate)
    assert torch.equal(pred, lg.argmax(-1))
    assert torch.allclose(logp, lg.log_softmax(-1)[first, target[first]], atol=1e-5)
    for tile in (1, 2, 7, v.vocab_size - 1, v.vocab_size, 4096):
        p, m, lp = _stats_tiled(v, h, target, first, tile)
        assert torch.equal(p, pred), tile
        assert torch.allclose(m, margin, atol=1e-5) and torch.allclose(lp, logp, atol=1e-5)
    none = torch.zeros(9, dtype=torch.bool)  # no first-token rows: no log-probs
    assert _stats_tiled(v, h, target, none, 7)[2].shape == (0,)
    v.unembed = torch.nn.Sequential(v.unembed)  # not a plain linear layer: one tile
    assert [s for s, _ in v.logit_tiles(h, 7)] == [0]
    p, m, lp = _stats_tiled(v, h, target, first, 7)
    assert torch.equal(p, pred) and torch.allclose(lp, logp, atol=1e-5)


def test_scan_without_trees_falls_back_to_rows():
    """A sliding window the model cannot take per layer: rows after a prefix cache."""
    import transformers as tf
    cfg = tf.MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=40,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    model = tf.MistralForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(0.3 * torch.randn_like(p))
    v = ModelView(model, TinyTokenizer(), {"spec": "mistral"})
    enc = encode_all(v.tokenizer, _cases(v))
    assert _tree_chunks(v, enc, 128) is None
    heads = select_heads(v, layers=[0, 2])
    _same(scan_naive(v, enc, heads), scan_fast(v, enc, heads), 1e-6)


def test_scan_heads_table_and_top():
    v = _view("llama")
    cases = _cases(v)
    df = scan_heads(v, cases, layers=[1, 2], progress=False)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 8 * 4 and set(df["layer"]) == {1, 2}
    slow = scan_heads(v, cases, layers=[1, 2], progress=False, fast=False)
    pd.testing.assert_frame_equal(df, slow, atol=1e-6)
    assert np.allclose(df["drop"], df["acc_orig"] - df["acc_ablated"])
    assert ((df["drop_lo"] <= df["drop"] + 1e-12) & (df["drop"] <= df["drop_hi"] + 1e-12)).all()
    # the interval is stats.bootstrap_diff's, computed for all heads at once
    enc = encode_all(v.tokenizer, cases)
    scan = scan_fast(v, enc, [(1, 0), (2, 3)])
    tab = head_table(scan, enc)
    ops = [e.case.labels["op"] for e in enc]
    ix = [i for i, o in enumerate(ops) if o == "+"]
    lo, hi = bootstrap_diff(scan.orig["correct"][ix].numpy(),
                            scan.ablated["correct"][1, ix].numpy())
    row = tab[(tab["layer"] == 2) & (tab["op"] == "+")].iloc[0]
    assert row["drop_lo"] == pytest.approx(lo) and row["drop_hi"] == pytest.approx(hi)
    top = top_heads(df, 3)
    assert set(top["op"]) == {"+", "-", "*", "/", "all"}
    for _, g in top.groupby("op"):
        assert list(g["rank"]) == [1, 2, 3] and g["drop"].is_monotonic_decreasing
    mean = scan_heads(v, cases, heads=[(0, 1)], method="mean", metric="acc_first",
                      progress=False)
    assert mean.attrs["meta"]["method"] == "mean" and len(mean) == 4


def test_errors_and_names():
    v = _view("llama")
    cases = arithmetic_cases(ops=("+",), n=3)
    for kw, msg in (({"heads": [(0, 4)]}, "head 0.4 out of range"),
                    ({"heads": [(3, 0)]}, "layer 3 out of range"),
                    ({"layers": [7]}, "layer 7 out of range"),
                    ({"method": "noise"}, "unknown method"),
                    ({"metric": "f1"}, "unknown metric")):
        with pytest.raises(CnaError, match=msg):
            scan_heads(v, cases, progress=False, **kw)
    with pytest.raises(CnaError, match="empty"):
        scan_heads(v, [], progress=False)
    with pytest.raises(CnaError, match="no operations"):
        arithmetic_cases(ops=())
    assert parse_heads("17.22,15.9") == [(17, 22), (15, 9)]
    assert parse_layers("10-12,15") == [10, 11, 12, 15]
    with pytest.raises(CnaError, match="L.H"):
        parse_heads("17-22")
    with pytest.raises(CnaError):
        parse_layers("a-b")


def test_reuse_layers_restores_forward():
    v = _view("llama")
    b = v.batch([[1, 5, 9, 13]])
    with torch.no_grad(), v.capture(["resid_post"]) as c:
        ref = v.hidden(b)
    outs = [c[("resid_post", i)] for i in range(v.n_layers)]
    with pytest.raises(RuntimeError), v.reuse_layers(outs, 2):
        assert "forward" in vars(v.layers[1])
        raise RuntimeError("boom")
    assert all("forward" not in vars(layer) for layer in v.layers)
    with torch.no_grad(), v.reuse_layers(outs, 2, repeat=3):
        again = v.hidden(v.batch([[1, 5, 9, 13]] * 3))
    assert torch.allclose(again, ref.expand(3, -1, -1), atol=1e-12)


def test_report_section(tmp_path):
    from cnalens.report import render_report

    v = _view("llama")
    df = scan_heads(v, _cases(v), progress=False)
    d = tmp_path / "run"
    write_heads(d, df, {"seconds": 3.5, "model": "llama"}, top_k=4)
    (d / "run.json").write_text(json.dumps({"model": {"spec": "tiny-llama"},
                                            "stages": ["heads"]}), encoding="utf-8")
    page = render_report(d, strict=True).read_text(encoding="utf-8")
    assert 'id="heads"' in page and "Top heads" in page
    assert (d / "plots" / "heads_drop.png").read_bytes()[:4] == b"\x89PNG"
    top = json.loads((d / "heads.json").read_text())["top"]
    assert top[0]["name"] in page


@pytest.mark.real
def test_fast_equals_naive_gemma(gemma):
    """gemma3-270m in float32: a disagreement only where a top-2 margin is under 1e-4."""
    enc = encode_all(gemma.tokenizer, arithmetic_cases(digits=(1,), n=8))
    heads = [(0, 1), (9, 2), (17, 3)]
    a, b = scan_naive(gemma, enc, heads), scan_fast(gemma, enc, heads)
    assert a.orig["correct"].float().mean() > 0.5
    ties = 0
    for x, y in ((a.orig, b.orig), (a.ablated, b.ablated)):
        diff = (x["correct"] != y["correct"]) | (x["pred"] != y["pred"])
        tie = torch.minimum(x["margin"], y["margin"]) < 1e-4
        assert not (diff & ~tie).any()
        ties += int((diff & tie).sum())
        assert torch.allclose(x["logp"], y["logp"], atol=1e-3)
    assert ties <= 2


def test_attribution_is_the_first_order_effect():
    from scipy.stats import spearmanr

    from cnalens.heads import scan_heads_attribution
    from cnalens.heads.attribution import _attribution_batch
    from cnalens.interventions import ScaleHeads

    v = _view("gpt2")
    cases = _cases(v)
    enc = encode_all(v.tokenizer, cases)
    est = _attribution_batch(v, enc)  # (cases, layers, heads)
    base = torch.as_tensor(evaluate(v, enc, progress=False)["logp"].to_numpy().copy())
    eps = 1e-3
    for layer, head in ((0, 2), (2, 1)):
        scaled = evaluate(v, enc, ScaleHeads(((layer, head),), 1 - eps), progress=False)
        fd = (torch.as_tensor(scaled["logp"].to_numpy().copy()) - base) / eps
        assert torch.allclose(est[:, layer, head], fd, atol=2e-3, rtol=2e-2)
    att = scan_heads_attribution(v, cases, progress=False)
    exact = scan_heads(v, cases, progress=False)
    m = att.merge(exact, on=["layer", "head", "op", "digits"])
    assert spearmanr(m["dlogp_est"], m["dlogp"]).statistic > 0.5
    # --layers / --heads keep the selected heads' rows, with the same estimates
    sub = scan_heads_attribution(v, cases, progress=False, layers=[2], heads=[(2, 1), (0, 3)])
    assert set(zip(sub["layer"], sub["head"], strict=True)) == {(2, 1)}
    pd.testing.assert_frame_equal(
        sub, att[(att.layer == 2) & (att["head"] == 1)].reset_index(drop=True), atol=1e-12)


def test_attribution_summary_against_hand_ranks(tmp_path):
    from cnalens.heads import attribution_summary, write_attribution

    rng = np.random.default_rng(0)
    rows = [(lay, hd, op, d) for lay in range(3) for hd in range(4) for op in "+-"
            for d in (1, 2)]
    att = pd.DataFrame(rows, columns=["layer", "head", "op", "digits"])
    att["n"] = np.where(att["digits"] == 1, 10, 30)
    att["dlogp_est"] = rng.normal(size=len(att))
    exact = att[["layer", "head", "op", "digits", "n"]].copy()
    exact["dlogp"] = att["dlogp_est"] * 0.5 + rng.normal(size=len(att)) * 0.5
    exact["drop"] = -exact["dlogp"] + rng.normal(size=len(att))
    s = attribution_summary(att, exact, k=3)
    for op in "+-":  # top: digits pooled by n, most negative estimate first
        a = att[att.op == op]
        pooled = (a.dlogp_est * a.n).groupby([a.layer, a["head"]]).sum() / a.n.groupby(
            [a.layer, a["head"]]).sum()
        want = [f"{la}.{he}" for la, he in pooled.sort_values().index[:3]]
        assert [t["name"] for t in s["top"] if t["op"] == op] == want
        m = a.merge(exact, on=["layer", "head", "op", "digits"])
        r = m[["dlogp_est", "dlogp", "drop"]].rank()
        got = next(x for x in s["vs_exact"] if x["op"] == op)
        assert got["n_heads"] == 24
        assert got["spearman_dlogp"] == pytest.approx(r.dlogp_est.corr(r.dlogp))
        assert got["spearman_drop"] == pytest.approx(-r.dlogp_est.corr(r["drop"]))
    assert attribution_summary(att, None)["vs_exact"] == []
    # written beside an exact heads.csv, which stays untouched
    exact.to_csv(tmp_path / "heads.csv", index=False)
    before = (tmp_path / "heads.csv").read_bytes()
    out = write_attribution(tmp_path, att, {"stage": "heads_attribution"}, k=3)
    assert out["vs_exact"] == s["vs_exact"]
    assert (tmp_path / "heads.csv").read_bytes() == before
    assert len(pd.read_csv(tmp_path / "heads_attribution.csv")) == len(att)
